"""Two-process CPU DDP (gloo): same loss curve as one process, exact-once eval splits, NaN skipped together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.toy import write_toy_shards

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(root: Path, devices: int, batch_size: int, **model) -> dict[int, list[dict]]:
    """`omnilab fit` of the toy module in a subprocess; returns each rank's trace lines."""
    config = {
        "model": {"class_path": "tests.toy.ToyModule", "init_args": {"lr": 0.05, "trace_dir": str(root / "trace"), **model}},
        "data": {
            "class_path": "tests.toy.ToyData",
            "init_args": {"data_dir": str(root.parent / "data"), "batch_size": batch_size, "num_streams": 2,
                          "batches_per_epoch": 5, "shuffle_buffer": 4},
        },
        "trainer": {
            "max_epochs": 2, "accelerator": "cpu", "devices": devices, "strategy": "ddp" if devices > 1 else "auto",
            "logger": False, "enable_progress_bar": False, "num_sanity_val_steps": 0,
        },
        "test_after_fit": False,
    }  # fmt: skip
    root.mkdir(parents=True)
    (root / "exp.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMNILAB_ALLOW_IMPORTS": "tests", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "omnilab", "fit", "--config", str(root / "exp.yaml")]
    subprocess.run(cmd, cwd=root, env=env, check=True, timeout=600, capture_output=True)
    traces = {}
    for rank in range(devices):
        lines = (root / "trace" / f"trace-rank{rank}.jsonl").read_text().splitlines()
        traces[rank] = [json.loads(line) for line in lines]
    return traces


def phase(lines: list[dict], name: str) -> list[dict]:
    return [line for line in lines if line["phase"] == name]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    write_toy_shards(root / "data", {"train": [8, 6, 5, 3], "val": [5, 4, 2]})  # uneven shards
    return root


def test_two_ranks_give_the_loss_curve_of_one_process(shards):
    one = phase(run(shards / "one", 1, batch_size=4)[0], "train")
    two = run(shards / "two", 2, batch_size=2)
    r0, r1 = phase(two[0], "train"), phase(two[1], "train")
    assert len(one) == len(r0) == len(r1) == 10
    for a, b, c in zip(one, r0, r1):
        assert a["keys"] == b["keys"] + c["keys"]  # the same global batch
        assert a["loss"] == pytest.approx((b["loss"] + c["loss"]) / 2, rel=1e-5, abs=1e-6)
    epoch0 = [k for line in one if line["epoch"] == 0 for k in line["keys"]]
    epoch1 = [k for line in one if line["epoch"] == 1 for k in line["keys"]]
    assert epoch0 != epoch1  # consecutive epochs differ in order
    # the finite validation pass over 3 uneven shards on 2 ranks: every sample once, nothing padded
    for epoch in (0, 1):
        keys = [
            k for r in (0, 1) for line in phase(two[r], "val") if line["epoch"] == epoch for k in line["keys"]
        ]
        assert sorted(keys) == [f"s{i:05d}" for i in range(22, 33)]


def test_a_nan_on_one_rank_skips_the_step_on_both(shards):
    root = shards / "nan"
    two = run(root, 2, batch_size=2, nan_steps=[2], nan_rank=1)
    for rank in (0, 1):
        train = phase(two[rank], "train")
        assert [line["step"] for line in train] == list(range(10))
        assert train[3]["params"] == train[2]["params"] != train[1]["params"]  # step 2 changed nothing
        assert train[4]["params"] != train[3]["params"]
    last_ckpt = root / "runs" / "default" / "run" / "latest" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last_ckpt, weights_only=True)
    (health,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("RunHealth")]
    assert health == {"skipped": 1, "consecutive": 0}
