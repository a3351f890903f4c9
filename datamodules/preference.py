"""Editing-preference items for the reward models (EditReward baseline, JRM, SpatialReward), expanded to pairs.

The data format: one sample is one item: the source image(s), an instruction, K candidate edits and a
human ranking with ties (`omnilab data synth preference` and the converters in `datamodules/convert/`
— editreward_data, editreward_bench, editscore_bench, mmrb2, mer_bench — write exactly this):

- `<key>.json`:
  - "instruction": str; "n_sources": int S (0-6; 0 for text-to-image items); "n_candidates": int K (2-8);
  - "ranking": str, best first: candidate letters (A = cand0, B = cand1, ...) joined by ">" between
    tiers and "=" within a tier ("C>A>B", "A=B", "A>B=C"); "A<B" reads as "B>A"; a ranking of one tie
    may end in a label ("A=B=Good", "A=B=Bad", kept as "tie_label"); every candidate exactly once;
  - "source": str (dataset: "synth", "editreward_bench", ...), "orig_id": str; optional "benchmark"
    (the protocol its metrics follow: "editreward_bench", "editscore_bench", "mmrb2", "mer_bench",
    "synth"), "task_type", "dimension" (EditScore), "subset" (e.g. "3pair");
  - optional, per candidate (lists of K): "rationales" (str or null: JRM's language-model target),
    "verdicts" ({"sc": {...}, "pq": {...}} or null: SpatialReward's target verdicts, see
    `lightning_modules.reward_models.parse_verdict`), "boxes" (ground-truth edit regions, each
    [x1, y1, x2, y2] on the 0-1000 grid), "quality" (str), "local_error" (bool), "rewards" (float).
- `<key>.src0.png` ... `<key>.src{S-1}.png` (or .jpg / .webp): the source / input images, in prompt order.
- `<key>.cand0.png` ... `<key>.cand{K-1}.png` (or .jpg / .webp): the candidates, in ranking-letter order.

Decoding (a sample that breaks a rule is a counted `BadSample` whose reason names the member or field,
never trained on): json fields typed; the ranking parses and names each of the K candidates once;
exactly sources 0..S-1 and candidates 0..K-1 present; per-candidate lists of length K; every box on
the grid (x1 < x2, y1 < y2); every verdict valid under the strict parser. Images become [3, H, W] in
[-1, 1], the longer side at most `max_side` (antialiased) when set.

Training examples are the item's pairs (i, j) with i ranked above j (and, with `keep_ties`, tied pairs
flagged `tie`; without it an item whose candidates all tie is left out, not counted as bad), at most `max_pairs_per_item` of them drawn with the sample's generator; the training
collate flattens the pairs of a batch of items (`collate_pairs`). Evaluation examples are whole items
(`collate_items`).
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.multiref import image_tensor
from datamodules.webdataset import IMAGE_EXTS, BadSample, SkipSample, WebDataModule

MAX_SOURCES, MAX_CANDIDATES = 6, 8
SOURCE_MEMBER = re.compile(r"src(\d+)\.([a-z]+)")
CANDIDATE_MEMBER = re.compile(r"cand(\d+)\.([a-z]+)")
TIE_LABEL = re.compile(r"^(.*[A-Z])=(Good|Bad)$")
PER_CANDIDATE = ("rationales", "verdicts", "boxes", "quality", "local_error", "rewards")


def parse_ranking(text: Any, k: int) -> tuple[list[int], str | None]:
    """(tier of each of the K candidates, 0 = best; tie label or None) of a ranking string; BadSample if it
    does not parse or does not name every candidate exactly once.

    "C>A>B" -> [1, 2, 0]; "A=B=Good" -> [0, 0], "Good"; "A<B" -> [1, 0].
    """
    if not isinstance(text, str) or not text.strip():
        raise BadSample(f"ranking {text!r} is not a non-empty string")
    body, label = text.replace(" ", ""), None
    if m := TIE_LABEL.match(body):
        body, label = m.group(1), m.group(2)
    if "<" in body:
        if ">" in body:
            raise BadSample(f"ranking {text!r} mixes '<' and '>'")
        body = ">".join(reversed(body.split("<")))
    tiers = [tier.split("=") for tier in body.split(">")]
    letters = [letter for tier in tiers for letter in tier]
    expected = [chr(ord("A") + i) for i in range(k)]
    if any(not re.fullmatch(r"[A-Z]", x) for x in letters) or sorted(letters) != expected:
        raise BadSample(
            f"ranking {text!r} does not parse as a ranking of the {k} candidates {''.join(expected)}"
        )
    if label is not None and len(tiers) != 1:
        raise BadSample(f"ranking {text!r}: a Good/Bad label needs all candidates tied")
    out = [0] * k
    for t, tier in enumerate(tiers):
        for letter in tier:
            out[ord(letter) - ord("A")] = t
    return out, label


def item_pairs(tiers: list[int], keep_ties: bool = True) -> list[tuple[int, int, bool]]:
    """(better, worse, tie) for every pair of candidates; tied pairs (i < j) only with `keep_ties`."""
    out = []
    for i, j in itertools.combinations(range(len(tiers)), 2):
        if tiers[i] < tiers[j]:
            out.append((i, j, False))
        elif tiers[j] < tiers[i]:
            out.append((j, i, False))
        elif keep_ties:
            out.append((i, j, True))
    return out


def _gather(
    sample: dict[str, Any], pattern: re.Pattern[str], count: int, what: str, limit: int
) -> list[np.ndarray]:
    """The numbered image members of one kind (src / cand) in order; BadSample naming a missing one."""
    found: dict[int, np.ndarray] = {}
    for ext, value in sample.items():
        if (m := pattern.fullmatch(ext)) and m.group(2) in IMAGE_EXTS:
            k = int(m.group(1))
            if k in found or m.group(1) != str(k):
                raise BadSample(f"{what} {k} appears twice or is misnamed (.{ext})")
            found[k] = value
    if count > limit or len(found) > limit:
        raise BadSample(f"{max(count, len(found))} {what}s, more than {limit}")
    missing = [k for k in range(count) if k not in found]
    if missing:
        name = "cand" if what == "candidate" else "src"
        raise BadSample(
            f"{what} {missing[0]} ({chr(ord('A') + missing[0]) + ', ' if what == 'candidate' else ''}.{name}{missing[0]}.png) is missing"
        )
    if len(found) != count:
        raise BadSample(f"the json says {count} {what}s but the sample holds {sorted(found)}")
    return [found[k] for k in range(count)]


def _check_candidate_fields(meta: dict[str, Any], k: int) -> None:
    """Per-candidate lists have K entries, boxes lie on the grid, verdicts parse; BadSample naming the first bad one."""
    from lightning_modules.reward_models import Verdict, check_box, format_verdict, parse_verdict

    for name in PER_CANDIDATE:
        value = meta.get(name)
        if value is not None and (not isinstance(value, list) or len(value) != k):
            raise BadSample(f".json {name!r} must be a list of {k} (one per candidate)")
    for c, boxes in enumerate(meta.get("boxes") or []):
        if not isinstance(boxes, list):
            raise BadSample(f"candidate {c}: boxes must be a list of [x1, y1, x2, y2]")
        for b, box in enumerate(boxes):
            try:
                check_box(box, f"candidate {c} box {b}")
            except ValueError as err:
                raise BadSample(str(err)) from err
    for c, verdict in enumerate(meta.get("verdicts") or []):
        if verdict is None:
            continue
        if not isinstance(verdict, dict) or sorted(verdict) != ["pq", "sc"]:
            raise BadSample(f"candidate {c}: a verdict must be {{'sc': ..., 'pq': ...}}")
        for kind in ("sc", "pq"):
            try:
                parsed = parse_verdict(format_verdict(verdict[kind]), kind)
            except (KeyError, TypeError, ValueError) as err:
                raise BadSample(f"candidate {c}: {kind} verdict is malformed: {err}") from err
            if not isinstance(parsed, Verdict):
                raise BadSample(f"candidate {c}: {kind} verdict is invalid: {parsed.reason}")


def resize_longest(x: Tensor, max_side: int | None) -> Tensor:
    """[3, H, W] with the longer side at most `max_side` (bicubic, antialiased, clamped); unchanged if None."""
    h, w = x.shape[-2:]
    if max_side is None or max(h, w) <= max_side:
        return x
    scale = max_side / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(x[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0].clamp(
        -1, 1
    )


class PreferenceTransform:
    """Decoded sample -> an item (eval) or its pairs (train); picklable; raises BadSample."""

    def __init__(
        self, train: bool, max_side: int | None, keep_ties: bool, max_pairs_per_item: int | None
    ) -> None:
        self.train, self.max_side, self.keep_ties, self.max_pairs = (
            train,
            max_side,
            keep_ties,
            max_pairs_per_item,
        )

    def item(self, sample: dict[str, Any]) -> dict[str, Any]:
        """The decoded, checked item."""
        meta = sample.get("json")
        if not isinstance(meta, dict):
            raise BadSample(".json is not an object")
        for name, kind in (("instruction", str), ("n_sources", int), ("n_candidates", int)):
            value = meta.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise BadSample(f".json field {name!r} must be {kind.__name__}, got {value!r}")
        k, s = meta["n_candidates"], meta["n_sources"]
        if k < 2:
            raise BadSample(f".json n_candidates is {k}: an item needs at least 2 candidates")
        tiers, label = parse_ranking(meta.get("ranking"), k)
        _check_candidate_fields(meta, k)
        sources = _gather(sample, SOURCE_MEMBER, s, "source", MAX_SOURCES)
        candidates = _gather(sample, CANDIDATE_MEMBER, k, "candidate", MAX_CANDIDATES)
        load = lambda arr, name: resize_longest(image_tensor(arr, name), self.max_side)  # noqa: E731
        return {
            "sources": [load(x, f"src{i}") for i, x in enumerate(sources)],
            "candidates": [load(x, f"cand{i}") for i, x in enumerate(candidates)],
            "instruction": meta["instruction"],
            "tiers": tiers,
            "tie_label": label,
            "rationales": meta.get("rationales") or [None] * k,
            "verdicts": meta.get("verdicts") or [None] * k,
            "meta": meta,
        }

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """An item, or (training) {"pairs": [...]} of its pairs, at most max_pairs_per_item drawn from rng."""
        item = self.item(sample)
        if not self.train:
            return item
        pairs = item_pairs(item["tiers"], self.keep_ties)
        if not pairs:  # left out by the setting, not broken: not counted against max_skip_fraction
            raise SkipSample("the item has no usable pair (all candidates tied and ties are not kept)")
        if self.max_pairs is not None and len(pairs) > self.max_pairs:
            pairs = [pairs[int(i)] for i in sorted(rng.choice(len(pairs), self.max_pairs, replace=False))]
        out = []
        for better, worse, tie in pairs:
            out.append(
                {
                    "sources": item["sources"],
                    "instruction": item["instruction"],
                    "chosen": item["candidates"][better],
                    "rejected": item["candidates"][worse],
                    "tie": tie,
                    "chosen_rationale": item["rationales"][better],
                    "rejected_rationale": item["rationales"][worse],
                    "chosen_verdict": item["verdicts"][better],
                    "rejected_verdict": item["verdicts"][worse],
                }
            )
        return {"pairs": out}


def collate_pairs(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Items' pairs -> one pair batch: lists per field, `tie` a bool tensor, `__key__` per pair."""
    pairs, keys = [], []
    for example in examples:
        pairs.extend(example["pairs"])
        keys.extend([example.get("__key__", "")] * len(example["pairs"]))
    out: dict[str, Any] = {name: [p[name] for p in pairs] for name in pairs[0] if name != "tie"}
    out["tie"] = torch.tensor([p["tie"] for p in pairs], dtype=torch.bool)
    out["__key__"] = keys
    return out


def collate_items(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Items -> a batch of lists (images keep their sizes)."""
    out = {name: [e[name] for e in examples] for name in examples[0] if name != "__key__"}
    out["__key__"] = [e.get("__key__", "") for e in examples]
    return out


def collate_preference(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """`collate_pairs` for training examples (they hold "pairs"), `collate_items` for items."""
    return collate_pairs(examples) if "pairs" in examples[0] else collate_items(examples)


class PreferenceDataModule(WebDataModule):
    """Editing-preference items: pairs for training, whole items for validation and test (see the module doc).

    Training batches (P pairs from `batch_size` items): `sources` (P lists of [3, h, w]), `instruction`,
    `chosen`, `rejected` (P images), `tie` (bool [P]), `chosen_rationale`, `rejected_rationale`,
    `chosen_verdict`, `rejected_verdict` (P entries, None when absent), `__key__`. Evaluation batches (B
    items): `sources`, `candidates` (B lists of K_i images), `instruction`, `tiers` (B lists of K_i ints,
    0 = best), `tie_label`, `rationales`, `verdicts`, `meta` (the json), `__key__`.

    Args:
        max_side: Resize images so their longer side is at most this (None: keep; the VLM's image processor
            resizes again to its own pixel range).
        keep_ties: Keep tied pairs in training (flagged `tie`; the Rao-Kupper loss uses them, the others
            leave them out).
        max_pairs_per_item: Train on at most this many of an item's pairs (drawn anew each epoch); None: all.
        **kwargs: The `WebDataModule` arguments (data_dir, shards, batch sizes, workers, seed, ...).
    """

    required = ("json",)
    synth_kind = "preference"

    def __init__(
        self,
        max_side: int | None = None,
        keep_ties: bool = True,
        max_pairs_per_item: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if max_side is not None and max_side < 16:
            raise ValueError(f"data.max_side must be >= 16 or None, got {max_side}")
        if max_pairs_per_item is not None and max_pairs_per_item < 1:
            raise ValueError(f"data.max_pairs_per_item must be >= 1 or None, got {max_pairs_per_item}")
        self.max_side, self.keep_ties, self.max_pairs_per_item = max_side, keep_ties, max_pairs_per_item

    def transform(self, train: bool) -> PreferenceTransform:
        """Items (eval) or their pairs (train), as a picklable callable."""
        return PreferenceTransform(train, self.max_side, self.keep_ties, self.max_pairs_per_item)

    def collate(self) -> Any:
        """`collate_preference`: pair batches from training examples, item batches from evaluation ones."""
        return collate_preference
