"""Shared test setup: the toy package is allowlisted, MLflow writes into the test's tmp dir."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMNILAB_ALLOW_IMPORTS", "tests")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run the test from an empty folder (runs/, mlruns/ and data/ land there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
