"""`omnilab data convert <dataset>`: the registry of converters from real datasets to shards.

A converter module defines `add_arguments(parser)` and `convert(args) -> Path` (the index it wrote).
"""

from __future__ import annotations

import importlib
from typing import Any

CONVERTERS: dict[str, str] = {
    "edit_jsonl": "datamodules.convert.edit_jsonl",
    "egoexo4d": "datamodules.convert.egoexo4d",
    "gedit_bench": "datamodules.convert.gedit_bench",
    "gligen": "datamodules.convert.gligen",
    "layoutgpt": "datamodules.convert.layoutgpt",
    "mico150k": "datamodules.convert.mico150k",
    "mico_bench": "datamodules.convert.mico_bench",
}


def converter(name: str) -> Any:
    """Import the converter module of a dataset."""
    if name not in CONVERTERS:
        raise KeyError(f"unknown dataset {name!r}; choose from {', '.join(sorted(CONVERTERS))}")
    return importlib.import_module(CONVERTERS[name])
