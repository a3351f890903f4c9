"""`omnilab data convert layoutgpt`: LayoutGPT-style caption-box JSON -> layout shards (datamodules/convert/caption_boxes.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from datamodules.convert.caption_boxes import add_arguments, run

__all__ = ["add_arguments", "convert"]


def convert(args: argparse.Namespace) -> Path:
    """Convert records {"id", "prompt", "object_list": [[name, [x, y, w, h]], ...]}."""
    return run(args, "layoutgpt")
