"""MMRB2 (Multimodal RewardBench 2) -> preference items: `omnilab data convert mmrb2`.

The release layout (facebookresearch/MMRB2, `benchmark/{t2i,edit,interleaved,reasoning}.json` after its
build script): {"pairs": [{"id", "prompt_content": [["image", path] | ["text", str], ...], "response_a":
{"model_name", "response_content": [["image", path]]}, "response_b": {...}, "chosen": "A" | "B",
"human_annotations": [3 ratings 1-6], "prompt_source", "prompt_metadata"}]}. The prompt's images become the
sources (0 for text-to-image, several for multi-image edits), its text parts joined by newlines the
instruction; each response must be exactly one image (else a counted skip `not_single_image`: the
interleaved task's text responses are not scored by these reward models). Ranking "A>B" or "B>A" (no ties).
Scored with benchmark "mmrb2": both orders count. Paths are relative to --image-root (default: the file's folder).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from datamodules.convert.edit_jsonl import SkipRecord
from datamodules.convert.preference_shards import Item, add_common_arguments, field, image_at, run


def _response_image(response: Any, root: Path, name: str) -> Any:
    """The single image of a response."""
    content = response.get("response_content") if isinstance(response, dict) else None
    if not isinstance(content, list):
        raise SkipRecord("bad_record", f"{name}.response_content is missing")
    images = [part for part in content if isinstance(part, list) and len(part) == 2 and part[0] == "image"]
    if len(images) != 1 or len(content) != 1:
        raise SkipRecord("not_single_image", f"{name} holds {len(content)} part(s), {len(images)} image(s)")
    return image_at(images[0][1], root)


RECORD_KEYS = (
    "id", "prompt_content", "response_a", "response_b", "chosen", "human_annotations", "prompt_source",
    "prompt_metadata",
)  # fmt: skip  # what a record may hold; any other key is refused (--ignore-keys)


def convert_one(record: dict[str, Any], root: Path, where: str) -> Item:
    """One pair -> (sources, candidates, instruction, ranking, orig_id, extra)."""
    content = field(record, "prompt_content", list)
    sources, texts = [], []
    for part in content:
        if not (isinstance(part, list) and len(part) == 2 and part[0] in ("image", "text")):
            raise SkipRecord("bad_record", f"a prompt_content part is {part!r:.60}")
        if part[0] == "image":
            sources.append(image_at(part[1], root))
        else:
            texts.append(str(part[1]))
    chosen = record.get("chosen")
    if chosen not in ("A", "B"):
        raise SkipRecord("bad_ranking", f"chosen is {chosen!r}, not A or B")
    candidates = [
        _response_image(record.get("response_a"), root, "response_a"),
        _response_image(record.get("response_b"), root, "response_b"),
    ]
    extra = {
        "human_annotations": record.get("human_annotations"),
        "prompt_source": record.get("prompt_source"),
        "task_type": (record.get("prompt_metadata") or {}).get("task")
        or (record.get("prompt_metadata") or {}).get("category"),
    }
    return (
        sources,
        candidates,
        "\n".join(texts),
        "A>B" if chosen == "A" else "B>A",
        str(record.get("id", where)),
        extra,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The converter's command-line options."""
    add_common_arguments(parser, "MMRB2 task files (edit.json, t2i.json, ...)", "mmrb2")


def convert(args: argparse.Namespace) -> Path:
    """Convert the files; print the summary; return the index path."""
    return run(args, "mmrb2", convert_one, RECORD_KEYS)
