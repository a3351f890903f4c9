"""MultiEditReward-Bench (MER) -> preference items: `omnilab data convert mer_bench`.

The Hugging Face release read by SpatialReward's `eval/MERBench/dataset.py` (splits 2pair / 3pair / 4pair as
parquet files): rows {"pair_id", "instruction", "original_image" (an image struct), "edited_images" (2-4
image structs ordered best first), "label", "sample_id"}. Each row is one item whose strict ranking follows
the order ("A>B>C" ...). Scored with benchmark "mer_bench": exact-match ranking accuracy (score ties wrong),
Kendall tau, NDCG, top-1.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from datamodules.convert.preference_shards import Item, add_common_arguments, field, image_field, letters, run

RECORD_KEYS = (
    "pair_id",
    "instruction",
    "original_image",
    "edited_images",
    "label",
    "sample_id",
)  # what a record may hold; any other key is refused (--ignore-keys)


def convert_one(record: dict[str, Any], root: Path, where: str) -> Item:
    """One row -> (sources, candidates, instruction, ranking, orig_id, extra)."""
    instruction = field(record, "instruction", str)
    edited = field(record, "edited_images", list)
    source = image_field(record.get("original_image"), root, "original_image")
    candidates = [image_field(x, root, f"edited_images[{i}]") for i, x in enumerate(edited)]
    extra = {"label": record.get("label"), "sample_id": record.get("sample_id")}
    return (
        [source],
        candidates,
        instruction,
        ">".join(letters(len(candidates))),
        str(record.get("pair_id", where)),
        extra,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The converter's command-line options."""
    add_common_arguments(parser, "MER-Bench parquet files (2pair, 3pair, 4pair)", "mer_bench")


def convert(args: argparse.Namespace) -> Path:
    """Convert the files; print the summary; return the index path."""
    return run(args, "mer_bench", convert_one, RECORD_KEYS)
