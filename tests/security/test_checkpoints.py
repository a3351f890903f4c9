"""Checkpoints are always fresh and never corrupt (issue 9 items 6-9).

- last.ckpt follows every checkpoint interval and the end of training, improved metric or not;
- a resumed run leaves the same final checkpoint as the uninterrupted one, and extending either trains the
  extra steps (step-based training, where Lightning counted the resumed epoch's end twice);
- a writer killed mid-write leaves the previous checkpoint whole (temp file beside it, fsync, replace);
- a checkpoint folder that cannot be written and a missing --ckpt_path stop the run before any work.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from callbacks.checkpoint import AtomicCheckpointIO, RunCheckpoint, clean_stale_temp_files
from omnilab.cli import main
from tests.test_cli import toy_experiment
from tests.test_resume import Crash
from tests.toy import ToyData, ToyModule, write_toy_shards

REPO = Path(__file__).resolve().parents[2]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# --- item 6: last.ckpt at every interval and at the end


def test_last_ckpt_follows_every_interval_and_the_end_not_only_improvements(in_tmp):
    exp = toy_experiment(in_tmp)
    ckpts = in_tmp / "runs" / "toy" / "tiny" / "latest" / "checkpoints"
    # mode=max on a falling loss: only the first validation (step 3 of 3-batch epochs) "improves"
    args = ["fit", "--config", str(exp), "--checkpoint.mode=max", "--test_after_fit=false",
            "--trainer.max_epochs=-1", "--trainer.max_steps=10"]  # fmt: skip
    with pytest.raises(SystemError):
        main([*args, "--trainer.callbacks+=tests.test_resume.Crash", "--trainer.callbacks.step=8"])
    assert load(ckpts / "best.ckpt")["global_step"] == 3
    assert load(ckpts / "last.ckpt")["global_step"] == 6  # the last interval before the crash, not step 3
    main([*args, "--ckpt_path", "latest"])
    assert load(ckpts / "last.ckpt")["global_step"] == 10  # the end (validated there too: issue 12 item 5)
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]  # no last-v1.ckpt


# --- item 7: resumed == uninterrupted, and extending either trains the extra steps


def fit(
    root: Path, data: Path, workers: int, max_steps: int, ckpt: str | None = None, crash: int | None = None
):
    """A step-based fit (max_steps, 3-batch epochs, validation each epoch) with the CLI's checkpointing."""
    L.seed_everything(0)
    callbacks = [RunCheckpoint(dirpath=root, filename="best", monitor="val/loss", save_last=True,
                               enable_version_counter=False)]  # fmt: skip
    if crash is not None:
        callbacks.append(Crash(crash))
    trainer = L.Trainer(
        max_steps=max_steps, max_epochs=4, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
    )  # fmt: skip
    data_module = ToyData(
        data_dir=str(data), batch_size=3, batches_per_epoch=3, num_workers=workers, shuffle_buffer=5
    )
    try:
        trainer.fit(ToyModule(lr=0.05), datamodule=data_module, ckpt_path=ckpt, weights_only=True)
    except SystemError:
        return None
    return trainer


def same_checkpoint(a: dict, b: dict) -> None:
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    assert a["loops"]["fit_loop"]["epoch_progress"] == b["loops"]["fit_loop"]["epoch_progress"]
    assert (
        a["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        == b["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    )
    assert a["ToyData"] == b["ToyData"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert all(torch.equal(sa[p][k], sb[p][k]) for p in sa for k in sa[p])


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_and_uninterrupted_runs_leave_the_same_checkpoint_and_both_extend(tmp_path, workers):
    data = tmp_path / "data"
    write_toy_shards(data, {"train": [8, 6, 5, 3], "val": [4]})
    full, cut = tmp_path / "full", tmp_path / "cut"
    fit(full, data, workers, max_steps=9)
    assert fit(cut, data, workers, max_steps=9, crash=5) is None  # last.ckpt: end of epoch 0 (step 3)
    fit(cut, data, workers, max_steps=9, ckpt=str(cut / "last.ckpt"))
    same_checkpoint(load(full / "last.ckpt"), load(cut / "last.ckpt"))
    assert load(cut / "last.ckpt")["epoch"] == 2
    for root in (full, cut):  # extend both to 12 steps: 3 more, in the 4th epoch (max_epochs=4)
        (root / "final.ckpt").write_bytes((root / "last.ckpt").read_bytes())
        assert fit(root, data, workers, max_steps=12, ckpt=str(root / "final.ckpt")).global_step == 12
    direct = tmp_path / "direct"
    fit(direct, data, workers, max_steps=12)
    same_checkpoint(load(direct / "last.ckpt"), load(full / "last.ckpt"))
    same_checkpoint(load(direct / "last.ckpt"), load(cut / "last.ckpt"))


# --- item 8: a writer killed mid-write


WRITER = """
import os, sys, torch
from callbacks.checkpoint import AtomicCheckpointIO
io, path = AtomicCheckpointIO(), sys.argv[1]
io.save_checkpoint({"version": 1, "w": torch.zeros(4)}, path)
print("ready", flush=True)
big = {"version": 2, "w": torch.ones(64 * 2**20 // 4)}  # 64 MB: the kill lands mid-write
while True:
    io.save_checkpoint(big, path)
"""


def test_a_writer_killed_mid_write_leaves_the_previous_checkpoint_whole(in_tmp):
    ckpts = in_tmp / "ckpts"
    other = in_tmp / "elsewhere"  # TMPDIR on another folder (another filesystem on the reporter's machine)
    other.mkdir()
    target = ckpts / "last.ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(other)}
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 120
        while not any(p.name.endswith(".tmp") and p.stat().st_size > 0 for p in ckpts.iterdir()):
            assert time.monotonic() < deadline and writer.poll() is None
            time.sleep(0.005)
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait()
    state = load(target)  # whole: the first checkpoint, or a later one that completed
    assert state["version"] in (1, 2) and state["w"].numel() in (4, 64 * 2**20 // 4)
    assert not list(
        other.iterdir()
    )  # the temp file was beside the target (the wait above saw it), not in TMPDIR
    stale = [
        p for p in ckpts.iterdir() if p.name.endswith(".tmp")
    ]  # (none if the kill fell between two writes)
    assert clean_stale_temp_files(ckpts) == stale and sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]


def test_the_checkpoint_callback_cleans_stale_temp_files_at_start(in_tmp):
    exp = toy_experiment(in_tmp)
    main(
        [
            "fit",
            "--config",
            str(exp),
            "--trainer.max_steps=1",
            "--trainer.max_epochs=-1",
            "--test_after_fit=false",
        ]
    )
    ckpts = in_tmp / "runs" / "toy" / "tiny" / "latest" / "checkpoints"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = ckpts / f".last.ckpt.{int(dead.stdout)}.abc123.tmp"
    stale.write_bytes(b"partial")  # a writer killed mid-write; the run is resumed
    main(["fit", "--config", str(exp), "--trainer.max_steps=2", "--trainer.max_epochs=-1", "--test_after_fit=false",
          "--ckpt_path=latest"])  # fmt: skip
    assert not stale.exists() and load(ckpts / "last.ckpt")["global_step"] == 2


# --- item 9: problems found before any work


def test_an_unwritable_checkpoint_folder_stops_before_any_work(in_tmp, capsys):
    exp = toy_experiment(in_tmp, logger=None)
    (in_tmp / "blocker").write_text("a file where the folder should be")
    uri = f"sqlite:///{in_tmp}/mlruns/mlflow.db"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(exp), f"--checkpoint.dirpath={in_tmp}/blocker/checkpoints",
              "--trainer.logger=lightning.pytorch.loggers.MLFlowLogger", f"--trainer.logger.tracking_uri={uri}"])  # fmt: skip
    err = capsys.readouterr().err
    assert "checkpoint folder" in err and "blocker/checkpoints" in err and "not writable" in err
    assert not (in_tmp / "mlruns").exists() and not list((in_tmp / "runs").rglob("config.yaml"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_checkpoint_folder_stops_before_any_work(in_tmp, capsys):
    exp = toy_experiment(in_tmp)
    ckpts = in_tmp / "ro"
    ckpts.mkdir()
    ckpts.chmod(0o555)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(exp), f"--checkpoint.dirpath={ckpts}"])
    assert "not writable" in capsys.readouterr().err


def test_eval_with_a_missing_checkpoint_stops_before_building_or_tracking(in_tmp, capsys):
    exp = toy_experiment(in_tmp, logger=None)
    config = yaml.safe_load(exp.read_text())
    config["model"]["init_args"]["trace_dir"] = str(in_tmp / "trace")  # would be written if the model ran
    exp.write_text(yaml.safe_dump(config))
    uri = f"sqlite:///{in_tmp}/mlruns/mlflow.db"
    with pytest.raises(SystemExit):
        main(["test", "--config", str(exp), "--ckpt_path", "runs/toy/tiny/some-run/checkpoints/best.ckpt",
              "--trainer.logger=lightning.pytorch.loggers.MLFlowLogger", f"--trainer.logger.tracking_uri={uri}"])  # fmt: skip
    assert "no such checkpoint file" in capsys.readouterr().err
    assert not (in_tmp / "mlruns").exists() and not (in_tmp / "trace").exists()
