"""`omnilab data curate filter`: resolution and aspect, near-duplicates by perceptual hash, judged quality and
identity consistency; the scores are kept in each sample's json (`curation`), drops are counted per reason.

The image a sample is judged by is its `target` (multiref / mico samples) or its only image (`images`
shards). In order, a sample is dropped for:
- `too_small`: its short side is below `--min-side`; `bad_aspect`: long / short side above `--max-aspect`;
- `near_duplicate`: its 64-bit perceptual hash (`phash`: the sign of the 8x8 lowest frequencies of the
  32x32 grey image's 2-D DCT against their median, as imagehash's phash) is within `--max-hamming` bits of
  an earlier kept sample's, in input order over all shards (8 bands of 8 bits index the kept hashes, so
  every pair within 7 bits is compared);
- with `--judge-url`: `low_quality` when sqrt(naturalness x artifacts) of MICo's PQ prompt is below
  `--min-quality`, `inconsistent` when the share of references the judge says appear in the target
  (MICo's element prompt, per reference) is below `--min-consistency`; `judge_failed` when the judge gives
  no usable answer (kept instead with `--keep-unjudged`).
Hashing runs in a first pass over all shards (the duplicate verdict needs them all), judging and writing in
a second; both are parallel over shards and the second is resumable per shard (datamodules/curate).
"""

from __future__ import annotations

import argparse
import io
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy.fft import dctn

from datamodules.curate import input_shards, run_sharded
from datamodules.webdataset import IMAGE_EXTS, ShardWriter, iter_raw_samples, read_index
from omnilab.chat import ChatClient, ChatError, user_message
from rewards.viescore import MICO_ELEMENT_PROMPT, MICO_PQ_PROMPT, AnswerError, parse_scores, parse_yes_no


def phash(image: Image.Image) -> int:
    """The 64-bit perceptual hash: DCT of the 32x32 grey image, 8x8 low frequencies above their median."""
    grey = np.asarray(image.convert("L").resize((32, 32), Image.LANCZOS), dtype=np.float64)
    low = dctn(grey, type=2, norm="ortho")[:8, :8]
    bits = (low > np.median(low)).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    """Bits that differ between two hashes."""
    return (a ^ b).bit_count()


class NearDuplicates:
    """Kept hashes, indexed by 8 bands of 8 bits: `seen(h)` is True when a kept hash is within `max_hamming`."""

    def __init__(self, max_hamming: int) -> None:
        if not 0 <= max_hamming <= 7:
            raise ValueError("max_hamming must be in 0..7 (8 bands of 8 bits find every such pair)")
        self.max_hamming, self.bands = max_hamming, [dict() for _ in range(8)]

    def seen(self, h: int) -> bool:
        """Whether `h` is a near-duplicate of a kept hash; if not, it is kept."""
        keys = [(h >> (8 * b)) & 0xFF for b in range(8)]
        for band, key in zip(self.bands, keys):
            if any(hamming(h, other) <= self.max_hamming for other in band.get(key, ())):
                return True
        for band, key in zip(self.bands, keys):
            band.setdefault(key, []).append(h)
        return False


def main_image(sample: dict[str, Any]) -> tuple[str, bytes] | None:
    """(member, bytes) of the image a sample is judged by: its target, else its only image."""
    images = [k for k in sample if not k.startswith("__") and k.rsplit(".", 1)[-1] in IMAGE_EXTS]
    target = [k for k in images if k.startswith("target.")]
    if target:
        return target[0], sample[target[0]]
    plain = [k for k in images if "." not in k]
    return (plain[0], sample[plain[0]]) if plain else None


def refs_of(sample: dict[str, Any]) -> list[bytes]:
    """The reference images of a multiref sample, in order."""
    keys = [k for k in sample if k.startswith("ref") and k.split(".")[0][3:].isdigit()]
    return [sample[k] for k in sorted(keys, key=lambda k: int(k.split(".")[0][3:]))]


def hash_pass(url: str, min_side: int, max_aspect: float) -> list[tuple[str, str | None, int | None]]:
    """(key, drop reason or None, hash) of each sample of a shard."""
    out = []
    for sample in iter_raw_samples(url):
        found = main_image(sample)
        if found is None:
            out.append((sample["__key__"], "no_image", None))
            continue
        try:
            with Image.open(io.BytesIO(found[1])) as img:
                img.load()
                w, h = img.size
                value = phash(img)
        except (OSError, ValueError):
            out.append((sample["__key__"], "unreadable_image", None))
            continue
        reason = (
            "too_small"
            if min(w, h) < min_side
            else "bad_aspect"
            if max(w, h) / min(w, h) > max_aspect
            else None
        )
        out.append((sample["__key__"], reason, value))
    return out


def judge_shard(
    samples: list[dict[str, Any]], judge: ChatClient, max_side: int
) -> list[tuple[dict[str, Any] | None, str | None]]:
    """(judge record or None, failure) per sample: PQ sub-scores and per-reference yes/no."""
    requests, spans = [], []
    for sample in samples:
        image = main_image(sample)[1]  # type: ignore[index]
        refs = refs_of(sample)
        spans.append((len(requests), len(refs)))
        requests.append([user_message(MICO_PQ_PROMPT, [image], max_side=max_side)])
        requests.extend([user_message(MICO_ELEMENT_PROMPT, [r, image], max_side=max_side)] for r in refs)
    answers = judge.complete_many(requests)
    out: list[tuple[dict[str, Any] | None, str | None]] = []
    for start, n in spans:
        try:
            if isinstance(answers[start], ChatError):
                raise answers[start]
            nat, art = parse_scores(answers[start].text, 2)  # type: ignore[union-attr]
            found = []
            for a in answers[start + 1 : start + 1 + n]:
                if isinstance(a, ChatError):
                    raise a
                found.append(parse_yes_no(a.text))
        except (ChatError, AnswerError) as err:
            out.append((None, f"{getattr(err, 'kind', 'judge_error')}: {err}"))
            continue
        record = {"naturalness": nat, "artifacts": art, "quality": math.sqrt(nat * art),
                  "refs_found": found, "consistency": (sum(found) / n) if n else None}  # fmt: skip
        out.append((record, None))
    return out


def filter_shards(
    inputs: str | list[str],
    out: str | Path,
    min_side: int = 256,
    max_aspect: float = 3.0,
    max_hamming: int = 4,
    judge: ChatClient | None = None,
    min_quality: float = 0.0,
    min_consistency: float = 0.0,
    keep_unjudged: bool = False,
    judge_max_side: int = 512,
    workers: int = 2,
    split: str = "train",
) -> Path:
    """Filter the input shards into `<out>`; returns index.json (report.json has the drops per reason)."""
    from concurrent.futures import ThreadPoolExecutor

    urls = input_shards(inputs)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        hashed = list(pool.map(lambda u: hash_pass(u, min_side, max_aspect), urls))
    duplicates = NearDuplicates(max_hamming)
    verdicts: dict[tuple[int, str], tuple[str | None, int | None]] = {}
    for i, rows in enumerate(hashed):
        for key, reason, value in rows:
            if reason is None and value is not None and duplicates.seen(value):
                reason = "near_duplicate"
            verdicts[(i, key)] = (reason, value)

    def one(i: int, url: str, writer: ShardWriter) -> Counter:
        counts: Counter = Counter()
        kept = []
        for sample in iter_raw_samples(url):
            reason, value = verdicts.get((i, sample["__key__"]), ("unreadable_image", None))
            if reason is not None:
                counts[reason] += 1
                continue
            kept.append((sample, value))
        judged = (
            judge_shard([s for s, _ in kept], judge, judge_max_side) if judge is not None and kept else []
        )
        for j, (sample, value) in enumerate(kept):
            meta = json.loads(sample["json"]) if "json" in sample else {}
            curation: dict[str, Any] = {"phash": f"{value:016x}"}
            if judge is not None:
                record, failure = judged[j]
                curation["judge"] = judge.model_id
                if record is None:
                    curation["judge_error"] = failure
                    if not keep_unjudged:
                        counts["judge_failed"] += 1
                        continue
                else:
                    curation.update(record)
                    if record["quality"] < min_quality:
                        counts["low_quality"] += 1
                        continue
                    if record["consistency"] is not None and record["consistency"] < min_consistency:
                        counts["inconsistent"] += 1
                        continue
            meta["curation"] = {**meta.get("curation", {}), **curation}
            writer.write({**{k: v for k, v in sample.items() if k not in ("__url__", "json")}, "json": meta})
            counts["kept"] += 1
        return counts

    kind = (read_index(Path(urls[0]).parent) or {}).get("kind", "images")
    options = {"min_side": min_side, "max_aspect": max_aspect, "max_hamming": max_hamming,
               "judge": judge.model_id if judge else None, "min_quality": min_quality,
               "min_consistency": min_consistency}  # fmt: skip
    return run_sharded(urls, out, one, kind, split, workers, options, "filter")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The step's options."""
    parser.add_argument("--inputs", nargs="+", required=True, help="input shard folder(s) or patterns")
    parser.add_argument("--out", required=True)
    parser.add_argument("--min-side", type=int, default=256)
    parser.add_argument("--max-aspect", type=float, default=3.0)
    parser.add_argument("--max-hamming", type=int, default=4, help="near-duplicate distance (0..7 bits)")
    parser.add_argument("--judge-url", help="an OpenAI-compatible base URL: enables the judged filters")
    parser.add_argument("--judge-model", default="gpt-4.1")
    parser.add_argument("--judge-cache", help="the judge's answer cache folder")
    parser.add_argument("--min-quality", type=float, default=0.0, help="sqrt(naturalness x artifacts), 0-10")
    parser.add_argument("--min-consistency", type=float, default=0.0, help="share of references found, 0-1")
    parser.add_argument("--keep-unjudged", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--split", default="train")


def run(args: argparse.Namespace) -> Path:
    """Run the step from parsed arguments."""
    judge = None
    if args.judge_url:
        judge = ChatClient(args.judge_url, args.judge_model, cache_dir=args.judge_cache)
    return filter_shards(
        args.inputs, args.out, args.min_side, args.max_aspect, args.max_hamming, judge, args.min_quality,
        args.min_consistency, args.keep_unjudged, workers=args.workers, split=args.split,
    )  # fmt: skip
