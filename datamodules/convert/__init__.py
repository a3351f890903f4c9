"""`omnilab data convert <dataset>`: the registry of converters from real datasets to shards.

A converter module defines `add_arguments(parser)` and `convert(args) -> Path` (the index it wrote).
"""

from __future__ import annotations

import importlib
from typing import Any

CONVERTERS: dict[str, str] = {
    "edit_jsonl": "datamodules.convert.edit_jsonl",
    "editreward_bench": "datamodules.convert.editreward_bench",
    "editreward_data": "datamodules.convert.editreward_data",
    "editscore_bench": "datamodules.convert.editscore_bench",
    "egoexo4d": "datamodules.convert.egoexo4d",
    "gedit_bench": "datamodules.convert.gedit_bench",
    "handalx": "datamodules.convert.handalx",
    "mer_bench": "datamodules.convert.mer_bench",
    "mico150k": "datamodules.convert.mico150k",
    "mico_bench": "datamodules.convert.mico_bench",
    "mmrb2": "datamodules.convert.mmrb2",
    "restoration": "datamodules.convert.restoration",
    "teachers": "datamodules.convert.teachers",
    "understanding_bench": "datamodules.convert.understanding_bench",
}


def converter(name: str) -> Any:
    """Import the converter module of a dataset."""
    if name not in CONVERTERS:
        raise KeyError(f"unknown dataset {name!r}; choose from {', '.join(sorted(CONVERTERS))}")
    return importlib.import_module(CONVERTERS[name])
