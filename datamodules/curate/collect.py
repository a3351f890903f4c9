"""`omnilab data curate collect`: image files -> `images` shards (the first curation step).

Inputs: folders (every image file below them, sorted), glob patterns, or JSONL files of records
{"image": path (relative to the JSONL's folder), "role": "human" | "object" | "clothes" | "scene" (optional),
"caption": str (optional)}. Every `--shard-size` inputs make one output shard: `<key>.<ext>` holds the
file's bytes as they are (PNG / JPEG; other formats re-encoded as PNG) and `<key>.json` {"source", "width",
"height", "role", "caption"}. A file that is not a readable image is skipped and counted (unreadable_image).
"""

from __future__ import annotations

import argparse
import glob
import json
from collections import Counter
from pathlib import Path
from typing import Any

from datamodules.convert.edit_jsonl import SkipRecord, image_member
from datamodules.curate import run_sharded
from datamodules.webdataset import IMAGE_EXTS, ShardWriter


def list_inputs(paths: list[str]) -> list[dict[str, Any]]:
    """One record {"image", "role", "caption"} per input image, in a stable order."""
    records: list[dict[str, Any]] = []
    for spec in paths:
        path = Path(spec)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS)
            records.extend({"image": str(p)} for p in files)
        elif path.suffix == ".jsonl" and path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    record["image"] = str(path.parent / record["image"])
                    records.append(record)
        else:
            matches = sorted(glob.glob(spec))
            if not matches:
                raise FileNotFoundError(f"no images at {spec}")
            records.extend({"image": m} for m in matches)
    return records


def collect_shard(index: int, chunk: list[dict[str, Any]], writer: ShardWriter, shard_size: int) -> Counter:
    """Write one chunk of input records as one shard."""
    counts: Counter = Counter()
    for j, record in enumerate(chunk):
        try:
            path = Path(record["image"])
            if not path.is_file():
                raise SkipRecord("missing_image", str(path))
            ext, data, (w, h) = image_member(path.read_bytes(), str(path))
        except SkipRecord as err:
            counts[err.reason] += 1
            continue
        meta = {"source": str(path), "width": w, "height": h, "role": record.get("role", "object"),
                "caption": record.get("caption", "")}  # fmt: skip
        writer.write({"__key__": f"img{index * shard_size + j:08d}", ext: data, "json": meta})
    return counts


def collect(
    paths: list[str], out: str | Path, shard_size: int = 256, workers: int = 2, split: str = "train"
) -> Path:
    """Collect the images into `<out>/<split>-NNNNNN.tar`; returns index.json."""
    records = list_inputs(paths)
    chunks = [records[i : i + shard_size] for i in range(0, len(records), shard_size)]
    return run_sharded(
        chunks,
        out,
        lambda i, chunk, writer: collect_shard(i, chunk, writer, shard_size),
        kind="images",
        split=split,
        workers=workers,
        options={"inputs": paths, "shard_size": shard_size},
        description="collect",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The step's options."""
    parser.add_argument("--inputs", nargs="+", required=True, help="image folders, globs or JSONL files")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--split", default="train")


def run(args: argparse.Namespace) -> Path:
    """Run the step from parsed arguments."""
    return collect(args.inputs, args.out, args.shard_size, args.workers, args.split)
