"""GEdit-Bench's released parquet -> its official folder layout plus `cases.jsonl`: `omnilab data convert gedit_bench`.

GEdit-Bench (stepfun-ai/GEdit-Bench on the Hugging Face hub) is a parquet dataset with the columns `task_type`
(one of the 11 groups of `datamodules.bench.GEDIT_GROUPS`), `key`, `instruction`, `instruction_language`
("en" / "cn"), `input_image` and `input_image_raw` (images as {"bytes", "path"} structs) and
`Intersection_exist` (bool). Step1X-Edit's `GEdit-Bench/generate_image_example.py` writes each source as
`fullset/{task_type}/{instruction_language}/{key}_SRCIMG.png`, and its scorer reads the edited image beside
it as `{key}.png`; this converter writes the same source files, plus `cases.jsonl` (one record per case:
key, task_type, instruction, instruction_language, intersection_exist, source = the relative path), which
`datamodules.bench.gedit_bench_cases` reads. Files are read one record batch at a time. A row whose image
does not decode or whose group or language is unknown is skipped and counted (printed, and in
`cases.jsonl`'s sibling `convert_report.json`). A parquet column outside COLUMNS and `input_image_raw` stops the
conversion before anything is written, naming the file and the nearest known column (`--ignore-keys` drops it).
"""

from __future__ import annotations

import argparse
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from datamodules.bench import GEDIT_GROUPS, GEDIT_LANGUAGES
from datamodules.convert.edit_jsonl import add_ignore_keys, check_keys
from datamodules.convert.mico150k import parquet_files

COLUMNS = ("task_type", "key", "instruction", "instruction_language", "input_image", "Intersection_exist")


def _image_bytes(item: Any) -> bytes:
    """The encoded bytes of an image cell: raw bytes or a {"bytes": ...} struct."""
    data = item.get("bytes") if isinstance(item, dict) else item
    if not isinstance(data, bytes | bytearray):
        raise ValueError(f"an image cell is {type(data).__name__}, not image bytes")
    return bytes(data)


def convert_parquet(
    parquet: list[str | Path],
    out: str | Path,
    batch_size: int = 16,
    ignore_keys: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Write `<out>/fullset/...` sources and `<out>/cases.jsonl`; return the report (written, skipped)."""
    files = parquet_files(list(parquet))
    for path in files:
        names = pq.ParquetFile(path).schema_arrow.names
        check_keys(dict.fromkeys(names), (*COLUMNS, "input_image_raw"), f"{path} (columns)", ignore_keys)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written, skipped, examples = Counter(), Counter(), {}
    records = []
    for path in files:
        file = pq.ParquetFile(path)
        missing = [c for c in COLUMNS if c not in file.schema_arrow.names]
        if missing:
            raise ValueError(f"{path}: no column(s) {missing}; GEdit-Bench's parquet has {list(COLUMNS)}")
        row = 0
        for batch in file.iter_batches(batch_size=batch_size, columns=list(COLUMNS)):
            for record in batch.to_pylist():
                row += 1
                where = f"{path.name}:{row}"
                group, language, key = record["task_type"], record["instruction_language"], str(record["key"])
                try:
                    if group not in GEDIT_GROUPS or language not in GEDIT_LANGUAGES:
                        raise ValueError(f"unknown group {group!r} or language {language!r}")
                    with Image.open(io.BytesIO(_image_bytes(record["input_image"]))) as img:
                        image = img.convert("RGB")
                except (ValueError, OSError) as err:
                    reason = "bad_record" if isinstance(err, ValueError) else "unreadable_image"
                    skipped[reason] += 1
                    examples.setdefault(reason, f"{where}: {err}")
                    continue
                rel = Path("fullset") / group / language / f"{key}_SRCIMG.png"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                image.save(out / rel)
                records.append(
                    {
                        "key": key,
                        "task_type": group,
                        "instruction": record["instruction"],
                        "instruction_language": language,
                        "intersection_exist": bool(record["Intersection_exist"]),
                        "source": str(rel),
                    }
                )
                written[f"{group}/{language}"] += 1
    (out / "cases.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    report = {"cases": len(records), "per_group": dict(sorted(written.items())), "skipped": dict(skipped),
              "examples": examples}  # fmt: skip
    (out / "convert_report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The converter's command-line options."""
    parser.add_argument(
        "--parquet", type=Path, nargs="+", required=True, help="GEdit-Bench parquet files or folders"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (the bench's data_dir)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows read from parquet at a time")
    add_ignore_keys(parser)


def convert(args: argparse.Namespace) -> Path:
    """Run the conversion, print its summary, return the cases.jsonl path."""
    report = convert_parquet(args.parquet, args.out, args.batch_size, getattr(args, "ignore_keys", ()))
    print(
        f"gedit_bench: wrote {report['cases']} cases -> {args.out / 'cases.jsonl'}; skipped {report['skipped']}"
    )
    return Path(args.out) / "cases.jsonl"
