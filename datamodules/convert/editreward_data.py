"""EditReward's training pairs -> preference items: `omnilab data convert editreward_data`.

The layout its trainer reads (TIGER-AI-Lab/EditReward, `data/dataset/*.json`): a JSON list (or JSONL) of
pairs {"prompt", "path_src", "path1", "path2", "model1_dim1_score", "model2_dim1_score"} with optional
"model1_dim2_score" / "model2_dim2_score" (instruction following and visual quality, 1-4 each: EditReward
Data's per-image scores), "model1" / "model2" (the editing models) and "tie_case". The ranking follows the
summed dimensions present (the overall score, 2-8, when both are): "A>B", "B>A" or the tie "A=B". The per-
candidate scores are kept as "human_scores". Paths are relative to --image-root (default: the file's folder).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from datamodules.convert.edit_jsonl import SkipRecord
from datamodules.convert.preference_shards import Item, add_common_arguments, field, image_at, run


def _score(record: dict[str, Any], k: int) -> float:
    """Candidate k's summed dimension scores (dim1, plus dim2 when given)."""
    value = record.get(f"model{k}_dim1_score")
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise SkipRecord("bad_record", f"model{k}_dim1_score is {value!r}, not a number")
    extra = record.get(f"model{k}_dim2_score")
    return float(value) + (
        float(extra) if isinstance(extra, int | float) and not isinstance(extra, bool) else 0.0
    )


RECORD_KEYS = (
    "prompt", "path_src", "path1", "path2", "model1_dim1_score", "model2_dim1_score", "model1_dim2_score",
    "model2_dim2_score", "model1", "model2", "tie_case",
)  # fmt: skip  # what a record may hold; any other key is refused (--ignore-keys)


def convert_one(record: dict[str, Any], root: Path, where: str) -> Item:
    """One training pair -> (sources, candidates, instruction, ranking, orig_id, extra)."""
    prompt = field(record, "prompt", str)
    source = image_at(record.get("path_src"), root)
    candidates = [image_at(record.get("path1"), root), image_at(record.get("path2"), root)]
    s1, s2 = _score(record, 1), _score(record, 2)
    ranking = "A>B" if s1 > s2 else "B>A" if s2 > s1 else "A=B"
    extra = {
        "human_scores": [s1, s2],
        "models": [record.get("model1"), record.get("model2")],
        "tie_case": record.get("tie_case"),
    }
    return [source], candidates, prompt, ranking, where, extra


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The converter's command-line options."""
    add_common_arguments(parser, "EditReward pair files (.json list or .jsonl)", "editreward_data")
    parser.set_defaults(split="train")


def convert(args: argparse.Namespace) -> Path:
    """Convert the files; print the summary; return the index path."""
    return run(args, "editreward_data", convert_one, RECORD_KEYS)
