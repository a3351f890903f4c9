"""SLURM launch: partition, account and memory from make; the effective global batch against the paper's."""

from __future__ import annotations

import subprocess

import pytest

from omnilab.cli import main
from omnilab.slurm import GlobalBatch, global_batch, sbatch_script
from tests.configs import BASE, REPO

SFT = ["fit", "--config", str(BASE), "--config", str(REPO / "experiments" / "uniref" / "sft.yaml")]


def test_the_global_batch_is_nodes_times_devices_times_batch_times_accumulation():
    batch = global_batch(SFT, nodes=4, devices=8)  # uniref/sft: batch 1, accumulation 2, paper 64
    assert (batch.batch_size, batch.accumulation, batch.paper) == (1, 2, 64)
    assert batch.effective == 4 * 8 * 1 * 2 == 64 and batch.warning() is None
    halved = global_batch([*SFT, "--trainer.accumulate_grad_batches=1"], nodes=4, devices=8)
    assert halved.effective == 32
    assert "= 32 (paper: 64)" in halved.warning() and "paper's global batch is 64" in halved.warning()
    assert GlobalBatch(1, 8, 2, 16, None).warning() is None  # no paper number: nothing to compare


def test_the_script_carries_partition_account_memory_and_prints_the_global_batch():
    batch = GlobalBatch(2, 8, 1, 2, 64)
    script = sbatch_script(["fit"], 2, 8, "job", partition="gpu", account="proj42", mem="480G", batch=batch)
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --account=proj42" in script
    assert "#SBATCH --mem=480G" in script
    lines = script.strip().splitlines()
    assert (
        lines[-2]
        == "echo 'effective global batch: 2 nodes x 8 devices x batch 1 x accumulation 2 = 32 (paper: 64)'"
    )
    assert lines[-1].startswith("srun omnilab fit")


def test_omnilab_slurm_warns_when_the_launch_misses_the_paper_batch(capsys):
    main(["slurm", "--nodes", "2", "--gpus", "8", "--mem", "0", "--dry-run", "--", *SFT])
    out, err = capsys.readouterr()
    assert "WARNING" in err and "= 32 (paper: 64)" in err
    assert "#SBATCH --mem=0" in out


def test_make_passes_partition_account_and_memory_through():
    # make -n prints the recipe without running it (the install step included)
    done = subprocess.run(
        ["make", "-n", "train", "EXP=uniref/sft", "CLUSTER=slurm", "NODES=4", "GPUS=8", "PARTITION=gpu",
         "ACCOUNT=proj42", "MEM=480G", "DRY=1"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    (line,) = [line for line in done.stdout.splitlines() if " slurm " in line]
    assert "--nodes 4 --gpus 8" in line and "--partition gpu --account proj42 --mem 480G --dry-run" in line


@pytest.mark.parametrize("name", ["uniref/sft", "unipic3/compose", "ccmp/egoexo"])
def test_paper_configs_state_a_global_batch_their_launch_meets(name):
    batch = global_batch(
        ["fit", "--config", str(BASE), "--config", str(REPO / "experiments" / f"{name}.yaml")], 0, 0
    )
    assert batch.paper is not None
    import yaml

    trainer = yaml.safe_load((REPO / "experiments" / f"{name}.yaml").read_text())["trainer"]
    launched = GlobalBatch(
        trainer.get("num_nodes", 1), trainer["devices"], batch.batch_size, batch.accumulation, batch.paper
    )
    assert launched.warning() is None, launched.describe()
