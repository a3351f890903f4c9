"""Image folders -> restoration shards: `omnilab data convert restoration`.

Two kinds of source, both written in the format of `datamodules/restoration.py`:
- high-quality folders (LSDIR, FFHQ; PURE trains on LSDIR + FFHQ-10k): `--hq DIR [DIR ...]`, every image under
  them (recursively, sorted) becomes `<key>.hq.{png,jpg}`; the LQ inputs are made on the fly by the datamodule;
- paired test sets (RealSR, DRealSR): `--hq HR_DIR --lq LR_DIR --scale 4`, images paired by name after removing a
  trailing `_HR` / `_LR4` / `_x1` / `_x4`-style tag (RealSR "Canon_001_HR.png" / "Canon_001_LR4.png", DRealSR
  "x_x1.png" / "x_x4.png"), each pair checked to be exactly 1 : scale in size.

`--captions FILE` (JSON object or JSON lines: {"image" or "file": name, "caption" or "description": text}) adds the
descriptions PURE's answers need (PURE used LLaVA captions of the HQ images; none ship with these datasets); a
caption row with another key is refused, naming it and the nearest known one (`--ignore-keys` drops such keys).
Image bytes are copied as they are when PNG or JPEG; other formats are re-encoded as PNG. Unreadable images, images
smaller than `--min-size`, unpaired files and size mismatches are skipped and counted per reason in index.json.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.progress import track

from datamodules.convert.edit_jsonl import SkipRecord, add_ignore_keys, check_keys, image_member
from datamodules.webdataset import IMAGE_EXTS, ShardWriter, read_index, write_index

PAIR_TAG = re.compile(r"[_-](hr|lr\d*|x\d+|gt|lq|hq)$", re.IGNORECASE)


def image_files(folder: str | Path) -> list[Path]:
    """Every image file under `folder`, recursively, sorted (a missing folder is a FileNotFoundError)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS)


def pair_name(path: Path, root: Path) -> str:
    """The name two images of a pair share: the path under its root without suffix and HR/LR/x4 tag, lower-cased."""
    rel = path.relative_to(root).with_suffix("")
    return str(rel.parent / PAIR_TAG.sub("", rel.name)).lower()


def sample_key(name: str, taken: set[str]) -> str:
    """A shard key from a file name: only letters, digits, '_' and '-', made unique."""
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "image"
    base, n = key, 1
    while key in taken:
        n += 1
        key = f"{base}_{n}"
    taken.add(key)
    return key


CAPTION_KEYS = ("image", "file", "caption", "description")  # what a caption row may hold


def read_captions(path: str | Path | None, ignore_keys: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """{image file name (and stem): caption} from a JSON object or JSON lines file."""
    if path is None:
        return {}
    text = Path(path).read_text()
    try:
        data: Any = json.loads(text)
        if isinstance(data, dict) and not {"image", "file"} & set(data):  # {name: caption}
            rows = [{"image": k, "caption": v} for k, v in data.items()]
        else:  # a list of rows, or JSON lines that happen to be one row
            rows = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    out: dict[str, str] = {}
    for i, row in enumerate(rows):
        check_keys(row, CAPTION_KEYS, f"{path}: caption row {i + 1}", ignore_keys)
        name = row.get("image") or row.get("file")
        caption = row.get("caption") or row.get("description")
        if not isinstance(name, str) or not isinstance(caption, str):
            raise ValueError(
                f"{path}: each caption needs 'image' (or 'file') and 'caption' (or 'description'): {row}"
            )
        out[Path(name).name] = caption
        out[Path(name).stem] = caption
    return out


def pairs(hq_root: Path, lq_root: Path, skipped: Counter, examples: dict) -> Iterator[tuple[Path, Path]]:
    """(HQ, LQ) files matched by `pair_name`; the unmatched ones are counted as skipped."""
    lq = {pair_name(p, lq_root): p for p in image_files(lq_root)}
    for hq in image_files(hq_root):
        match = lq.pop(pair_name(hq, hq_root), None)
        if match is None:
            skipped["unpaired"] += 1
            examples.setdefault("unpaired", f"{hq}: no LQ image named like it under {lq_root}")
            continue
        yield hq, match
    for name, path in lq.items():
        skipped["unpaired"] += 1
        examples.setdefault("unpaired", f"{path}: no HQ image named like it ({name})")


def convert_folders(
    out: str | Path,
    hq: list[str],
    lq: str | None = None,
    split: str = "train",
    scale: int = 4,
    captions: str | None = None,
    min_size: int = 0,
    shard_size: int = 200,
    source: str = "folder",
    ignore_keys: list[str] | tuple[str, ...] = (),
) -> tuple[Path, int, Counter, dict[str, str]]:
    """Write one split; return (index path, samples written, skips per reason, an example per reason)."""
    if not re.fullmatch(r"\w+", split):
        raise ValueError(f"split name {split!r} must be letters, digits or '_'")
    if lq is not None and len(hq) != 1:
        raise ValueError("a paired conversion takes exactly one --hq folder beside --lq")
    out = Path(out)
    index = read_index(out) or {"kind": "restoration", "splits": {}, "skipped": {}}
    if index.get("kind") != "restoration":
        raise ValueError(
            f"{out / 'index.json'} is of kind {index.get('kind')!r}; convert into another folder"
        )
    for stale in out.glob(f"{split}-*.tar"):
        if re.fullmatch(rf"{split}-\d{{6}}\.tar", stale.name):
            stale.unlink()
    texts = read_captions(captions, ignore_keys)
    skipped: Counter = Counter()
    examples: dict[str, str] = {}
    if lq is None:
        items: list[tuple[Path, Path | None]] = [(p, None) for root in hq for p in image_files(root)]
    else:
        items = list(pairs(Path(hq[0]), Path(lq), skipped, examples))
    keys: set[str] = set()
    written = 0
    with ShardWriter(out, split, max_count=shard_size) as writer:
        for hq_path, lq_path in track(items, description=f"convert {split}", transient=True):
            try:
                ext, data, (w, h) = image_member(hq_path.read_bytes(), str(hq_path))
                if min(w, h) < min_size:
                    raise SkipRecord("too_small", f"{hq_path} is {w}x{h}, below --min-size {min_size}")
                sample: dict[str, Any] = {f"hq.{ext}": data}
                meta: dict[str, Any] = {
                    "description": texts.get(hq_path.name, texts.get(hq_path.stem, "")),
                    "source": f"{source}:{hq_path.name}",
                }
                if lq_path is not None:
                    lq_ext, lq_data, (lw, lh) = image_member(lq_path.read_bytes(), str(lq_path))
                    if (lw * scale, lh * scale) != (w, h):
                        raise SkipRecord("size_mismatch", f"{lq_path} is {lw}x{lh}, HQ {w}x{h} at x{scale}")
                    sample[f"lq.{lq_ext}"] = lq_data
                    meta["scale"] = scale
            except SkipRecord as err:
                skipped[err.reason] += 1
                examples.setdefault(err.reason, str(err))
                continue
            sample["json"] = meta
            sample["__key__"] = sample_key(hq_path.stem, keys)
            writer.write(sample)
            written += 1
    shards = writer.shards
    entry = {
        "shards": [name for name, _ in shards],
        "counts": [n for _, n in shards],
        "samples": written,
        "source": source,
        "options": {"hq": hq, "lq": lq, "scale": scale, "captions": captions, "min_size": min_size},
    }
    path = write_index(
        out,
        kind="restoration",
        seed=index.get("seed", 0),
        keys=sorted(
            set(index.get("keys", [])) | {"json", "hq.png", "hq.jpg", *(["lq.png", "lq.jpg"] if lq else [])}
        ),
        splits={**index.get("splits", {}), split: entry},
        skipped={**index.get("skipped", {}), split: dict(sorted(skipped.items()))},
        source=source,
    )
    return path, written, skipped, examples


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The converter's command-line arguments."""
    parser.add_argument(
        "--hq", nargs="+", required=True, help="high-quality image folder(s) (LSDIR, FFHQ, HR)"
    )
    parser.add_argument("--lq", help="low-quality folder paired with --hq by name (RealSR / DRealSR LR)")
    parser.add_argument("--out", required=True, help="output shard folder (index.json is merged per split)")
    parser.add_argument("--split", default=None, help="split name (default: train, or test with --lq)")
    parser.add_argument("--scale", type=int, default=4, help="HQ / LQ size ratio of a paired set")
    parser.add_argument("--captions", help="JSON / JSONL of {image, caption}: the description of each image")
    parser.add_argument("--min-size", type=int, default=0, help="skip HQ images whose short side is smaller")
    parser.add_argument("--shard-size", type=int, default=200)
    parser.add_argument("--source", default="folder", help="dataset name stored with each sample")
    add_ignore_keys(parser)


def convert(args: argparse.Namespace) -> Path:
    """Run the conversion of the parsed arguments; print what was written and skipped."""
    split = args.split or ("test" if args.lq else "train")
    path, written, skipped, examples = convert_folders(
        args.out,
        args.hq,
        args.lq,
        split,
        args.scale,
        args.captions,
        args.min_size,
        args.shard_size,
        args.source,
        getattr(args, "ignore_keys", ()),
    )
    print(f"restoration/{split}: wrote {written} samples -> {path}")
    for reason, count in sorted(skipped.items()):
        print(f"  skipped {count} ({reason}), e.g. {examples[reason]}")
    return path
