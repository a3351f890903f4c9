"""EditScore's EditReward-Bench -> preference items: `omnilab data convert editscore_bench`.

The Hugging Face release (EditScore/EditReward-Bench, read by VectorSpaceLab/EditScore's `evaluation.py`):
parquet rows {"key": [key1, key2] (key1's output preferred), "instruction", "input_image" (an image struct
{"bytes", "path"}), "output_images": [2 image structs], "task_type", "dimension" ("prompt_following",
"consistency", "overall")}. Each row is one item of 2 candidates ranked "A>B"; "task_type" is mapped to one
of the 13 canonical types (`metrics.preference.canonical_task`; an unknown type is a counted skip) and
kept raw as "task_type_raw". Scored with benchmark "editscore_bench": 1[s1 > s2] per pair (a tie wrong),
averaged per task type, macro over task types, per dimension.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from datamodules.convert.edit_jsonl import SkipRecord
from datamodules.convert.preference_shards import Item, add_common_arguments, field, image_field, run
from metrics.preference import EDITSCORE_DIMENSIONS, canonical_task

RECORD_KEYS = (
    "key",
    "instruction",
    "input_image",
    "output_images",
    "task_type",
    "dimension",
)  # what a record may hold; any other key is refused (--ignore-keys)


def convert_one(record: dict[str, Any], root: Path, where: str) -> Item:
    """One benchmark row -> (sources, candidates, instruction, ranking, orig_id, extra)."""
    instruction = field(record, "instruction", str)
    keys, outputs = field(record, "key", list), field(record, "output_images", list)
    if len(keys) != 2 or len(outputs) != 2:
        raise SkipRecord(
            "bad_record", f"key and output_images must hold 2 entries, got {len(keys)}, {len(outputs)}"
        )
    raw_task, dimension = field(record, "task_type", str), field(record, "dimension", str)
    if dimension not in EDITSCORE_DIMENSIONS:
        raise SkipRecord(
            "bad_record", f"dimension {dimension!r} is not one of {', '.join(EDITSCORE_DIMENSIONS)}"
        )
    try:
        task = canonical_task(raw_task)
    except ValueError as err:
        raise SkipRecord("unknown_task_type", str(err)) from err
    source = image_field(record.get("input_image"), root, "input_image")
    candidates = [image_field(x, root, f"output_images[{i}]") for i, x in enumerate(outputs)]
    extra = {
        "task_type": task,
        "task_type_raw": raw_task,
        "dimension": dimension,
        "keys": [str(k) for k in keys],
    }
    return [source], candidates, instruction, "A>B", f"{keys[0]}|{keys[1]}", extra


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The converter's command-line options."""
    add_common_arguments(parser, "EditReward-Bench parquet files", "editscore_bench")


def convert(args: argparse.Namespace) -> Path:
    """Convert the files; print the summary; return the index path."""
    return run(args, "editscore_bench", convert_one, RECORD_KEYS)
