"""Shared test setup: the toy package is allowlisted; every test runs from its own empty folder.

Running from tmp_path keeps runs/, mlruns/, data/ and predictions/ that code under test writes
relative to the working directory out of the repository.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMNILAB_ALLOW_IMPORTS", "tests")


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Run the test from an empty folder (runs/, mlruns/ and data/ land there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip where CUDA is not available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
