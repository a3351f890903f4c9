"""`omnilab data convert gligen`: GLIGEN-style caption-box JSON -> layout shards (datamodules/convert/caption_boxes.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from datamodules.convert.caption_boxes import add_arguments, run

__all__ = ["add_arguments", "convert"]


def convert(args: argparse.Namespace) -> Path:
    """Convert records {"file_name", "prompt", "phrases": [...], "locations": [[x0, y0, x1, y1], ...]}."""
    return run(args, "gligen")
