"""TIGER EditReward-Bench -> preference items: `omnilab data convert editreward_bench`.

The layout its evaluation reads (TIGER-AI-Lab/EditReward, `evaluate/eval_bench.py`, the files
EditReward_Bench_{2,3,4}pair.json): a JSON list of items {"prompt", "path_src", "paths_generated": [K
paths], "human_vote": {"ranking": "C>A>B" | "A>B" | "B>A" | "A=B=Good" | "A=B=Bad", ...}}. The candidates keep
their order (A = paths_generated[0]); the subset is "<K>pair". Items' rankings are checked strictly: one that
does not name every candidate once is a counted skip (bad_ranking). The metrics are those of
`metrics/preference.py` for benchmark "editreward_bench" (pairwise accuracy with tie calibration, strict
group accuracy). Paths are relative to --image-root (default: the file's folder).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from datamodules.convert.edit_jsonl import SkipRecord
from datamodules.convert.preference_shards import Item, add_common_arguments, field, image_at, run

RECORD_KEYS = (
    "prompt",
    "path_src",
    "paths_generated",
    "human_vote",
    "id",
)  # what a record may hold; any other key is refused (--ignore-keys)


def convert_one(record: dict[str, Any], root: Path, where: str) -> Item:
    """One benchmark item -> (sources, candidates, instruction, ranking, orig_id, extra)."""
    prompt = field(record, "prompt", str)
    paths = field(record, "paths_generated", list)
    vote = field(record, "human_vote", dict)
    ranking = vote.get("ranking")
    if not isinstance(ranking, str):
        raise SkipRecord("bad_ranking", f"human_vote.ranking is {ranking!r}")
    candidates = [image_at(p, root) for p in paths]
    orig = record.get("id", where)
    return [image_at(record.get("path_src"), root)], candidates, prompt, ranking, str(orig), {}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The converter's command-line options."""
    add_common_arguments(parser, "EditReward_Bench_{2,3,4}pair.json files", "editreward_bench")


def convert(args: argparse.Namespace) -> Path:
    """Convert the files; print the summary; return the index path."""
    return run(args, "editreward_bench", convert_one, RECORD_KEYS)
