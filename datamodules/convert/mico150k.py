"""MICo-150K parquet (BAGEL layout) -> multiref shards: `omnilab data convert mico150k`.

Implements the data side of docs/methods/uniref.md for MICo's BAGEL adapter: each parquet
row holds `image_list` (a list of encoded images: the inputs in prompt order, the LAST one the target;
an element may also be a {"bytes": ..., "path": ...} struct, as Hugging Face writes images) and
`instruction`. The HF release is over 5 GB in about 300 files, so files are read one record batch at a
time (`pyarrow.parquet.ParquetFile.iter_batches`, only the columns used), never whole.

Writes the sample format of `datamodules/multiref.py` through the same writer as the JSONL converter
(`datamodules/convert/edit_jsonl.py`): image bytes copied as they are when PNG or JPEG (`ref0.png` or
`ref0.jpg` by sniffing), the task "compose" (2+ inputs) / "edit" (1) / "t2i" (0), source "mico150k",
orig_id "<file>:<row>" (or the row's "id" column). A column outside COLUMNS and OPTIONAL_COLUMNS stops the
conversion before anything is written, naming the file and the nearest known column (`--ignore-keys` drops it). Skips are counted per reason in index.json
(`bad_record`, `unreadable_image`, `too_many_inputs`, `no_images`, `names_missing_image`).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from datamodules.convert.edit_jsonl import (
    PASS_THROUGH,
    MultiRefShards,
    Report,
    SkipRecord,
    add_ignore_keys,
    check_keys,
    default_task,
    image_member,
)
from datamodules.multiref import MAX_REFS

COLUMNS = ("image_list", "instruction")
OPTIONAL_COLUMNS = ("id", "task", *PASS_THROUGH)


def parquet_files(paths: list[str | Path]) -> list[Path]:
    """The parquet files named, a folder standing for its `*.parquet` files (sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.glob("*.parquet")))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"parquet file or folder not found: {p}")
    if not files:
        raise FileNotFoundError(f"no parquet files in {[str(p) for p in paths]}")
    return files


def iter_rows(path: Path, batch_size: int = 16) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, row dict) of one parquet file, read one record batch at a time."""
    file = pq.ParquetFile(path)
    names = set(file.schema_arrow.names)
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; MICo's BAGEL parquet has {list(COLUMNS)}")
    columns = [*COLUMNS, *(c for c in OPTIONAL_COLUMNS if c in names)]
    row = 0
    for batch in file.iter_batches(batch_size=batch_size, columns=columns):
        for record in batch.to_pylist():
            yield row, record
            row += 1


def image_bytes(item: Any) -> bytes:
    """The encoded bytes of one `image_list` element: raw bytes or a {"bytes": ...} struct."""
    if isinstance(item, dict):
        item = item.get("bytes")
    if not isinstance(item, bytes | bytearray):
        raise SkipRecord("bad_record", f"an image_list element is {type(item).__name__}, not image bytes")
    return bytes(item)


def convert_row(record: dict[str, Any], max_refs: int) -> tuple[list, tuple, str, str, dict[str, Any]]:
    """(refs, target, instruction, task, extra json fields) of one row; raises SkipRecord."""
    images, instruction = record.get("image_list"), record.get("instruction")
    if not isinstance(images, list) or not isinstance(instruction, str):
        raise SkipRecord("bad_record", "image_list must be a list and instruction a string")
    if not images:
        raise SkipRecord("no_images", "empty image_list (the last image is the target)")
    if len(images) - 1 > max_refs:
        raise SkipRecord("too_many_inputs", f"{len(images) - 1} input images > --max-refs {max_refs}")
    members = [image_member(image_bytes(item), f"image_list[{i}]") for i, item in enumerate(images)]
    task = record["task"] if isinstance(record.get("task"), str) else default_task(len(members) - 1)
    extra = {k: record[k] for k in PASS_THROUGH if record.get(k) is not None}
    return members[:-1], members[-1], instruction, task, extra


def convert_parquet(
    parquet: list[str | Path],
    out: str | Path,
    split: str = "train",
    source: str = "mico150k",
    max_refs: int = MAX_REFS,
    shard_size: int = 200,
    batch_size: int = 16,
    ignore_keys: list[str] | tuple[str, ...] = (),
) -> Report:
    """Convert MICo parquet files into `<out>/<split>-NNNNNN.tar` + index.json; return what was written."""
    files = parquet_files(parquet)
    for path in files:
        names = pq.ParquetFile(path).schema_arrow.names
        check_keys(dict.fromkeys(names), (*COLUMNS, *OPTIONAL_COLUMNS), f"{path} (columns)", ignore_keys)
    shards = MultiRefShards(out, split, source, shard_size)
    for path in files:
        for row, record in iter_rows(path, batch_size):
            where = f"{path.name}:{row}"
            try:
                refs, target, instruction, task, extra = convert_row(record, max_refs)
                orig = record.get("id") if record.get("id") is not None else where
                shards.write(refs, target, instruction, task, str(orig), extra)
            except SkipRecord as err:
                shards.report.skip(where, err)
    return shards.close({"files": [p.name for p in files], "max_refs": max_refs})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The converter's command-line options."""
    parser.add_argument(
        "--parquet", type=Path, nargs="+", required=True, help="MICo-150K parquet files or folders of them"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (an index.json there is merged)"
    )
    parser.add_argument("--split", default="train", help="output split name")
    parser.add_argument("--source", default="mico150k", help="json 'source' field")
    parser.add_argument("--max-refs", type=int, default=MAX_REFS, help="rows with more inputs are skipped")
    parser.add_argument("--shard-size", type=int, default=200, help="samples per shard")
    parser.add_argument("--batch-size", type=int, default=16, help="rows read from parquet at a time")
    add_ignore_keys(parser)


def convert(args: argparse.Namespace) -> Path:
    """Run the conversion the parsed arguments describe, print its summary and return the index path."""
    report = convert_parquet(
        args.parquet,
        args.out,
        split=args.split,
        source=args.source,
        max_refs=args.max_refs,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        ignore_keys=getattr(args, "ignore_keys", ()),
    )
    print(report.summary())
    assert report.index is not None
    return report.index
