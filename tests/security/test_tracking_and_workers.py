"""Tracking and processes (issue 9 items 13-15).

- a new MLflow store is created under a lock, so fits started together all open it, and a store that cannot
  be opened is one plain line naming it;
- a resumed fit continues the same MLflow run; a run left RUNNING by a killed process is marked KILLED
  when the next fit of that experiment and name starts;
- DataLoader workers die with their parent, even when the parent is killed with SIGKILL;
- the MLflow UI binds loopback only (what held before).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from omnilab.cli import main
from omnilab.tracking import PROCESS_TAG, StoreError, open_store, store_lock
from tests.test_cli import toy_experiment

REPO = Path(__file__).resolve().parents[2]
LOGGER = "--trainer.logger=lightning.pytorch.loggers.MLFlowLogger"

OPEN_STORE = """
import sys, time
from pathlib import Path
from omnilab.tracking import open_store
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
open_store(sys.argv[1])
print("opened")
"""


def test_a_new_store_is_created_under_the_lock(in_tmp):
    uri = f"sqlite:///{in_tmp}/mlruns/mlflow.db"
    opened = threading.Event()
    with store_lock(uri):  # another fit creating the store
        thread = threading.Thread(target=lambda: (open_store(uri), opened.set()), daemon=True)
        thread.start()
        assert not opened.wait(2.0)  # waits for the lock, creates nothing meanwhile
        assert not (in_tmp / "mlruns" / "mlflow.db").exists()
    thread.join(120)
    assert opened.is_set() and (in_tmp / "mlruns" / "mlflow.db").exists()


@pytest.mark.slow
def test_fits_started_together_all_open_a_new_store(in_tmp):
    uri = f"sqlite:///{in_tmp}/mlruns/mlflow.db"
    go = in_tmp / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_STORE, uri, str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    time.sleep(30)  # let all of them import mlflow and wait at the start line
    go.touch()
    outs = [p.communicate(timeout=600) for p in procs]
    assert [o[0].strip() for o in outs] == ["opened"] * 4, [o[1][-1500:] for o in outs]


def test_a_store_that_cannot_be_opened_is_one_plain_error_naming_it(in_tmp, capsys):
    (in_tmp / "afile").write_text("not a folder")
    uri = f"sqlite:///{in_tmp}/afile/mlflow.db"
    with pytest.raises(StoreError, match=rf"cannot open the MLflow store at {re.escape(uri)}: "):
        open_store(uri)
    exp = toy_experiment(in_tmp, logger=None)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(exp), LOGGER, f"--trainer.logger.tracking_uri={uri}"])
    err = capsys.readouterr().err + str(exit_.value)
    assert "cannot open the MLflow store at" in err and "Union" not in err


def dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def test_a_resumed_fit_continues_its_run_and_a_dead_run_is_marked_killed(in_tmp):
    uri = f"sqlite:///{in_tmp}/mlruns/mlflow.db"
    exp = toy_experiment(in_tmp, logger=None, log_every_n_steps=1)
    args = ["fit", "--config", str(exp), LOGGER, f"--trainer.logger.tracking_uri={uri}", "--test_after_fit=false",
            "--trainer.max_epochs=2"]  # fmt: skip
    with pytest.raises(SystemError):  # 3 steps per epoch: last.ckpt at step 3, killed at step 4
        main([*args, "--trainer.callbacks+=tests.test_resume.Crash", "--trainer.callbacks.step=4"])
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("toy").experiment_id
    (run,) = client.search_runs([experiment])
    # what a kill -9 leaves behind: RUNNING, owned by a process that is gone
    client.update_run(run.info.run_id, status="RUNNING")
    client.set_tag(run.info.run_id, PROCESS_TAG, f"{dead_pid()}@{socket.gethostname()}")
    main([*args, "--ckpt_path", "runs/toy/tiny/latest/checkpoints/last.ckpt"])
    (resumed,) = client.search_runs([experiment])  # the same run, continued
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert resumed.data.tags["omnilab.resumes"] == "1" and resumed.data.tags["resumed/ckpt_path"].endswith(
        "last.ckpt"
    )
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps[0] == 0 and max(steps) == 5 and set(steps) == set(range(6))  # before the kill and after

    # a later fresh fit of the same name: a RUNNING run of a dead process is marked KILLED
    client.update_run(run.info.run_id, status="RUNNING")
    client.set_tag(run.info.run_id, PROCESS_TAG, f"{dead_pid()}@{socket.gethostname()}")
    main(args)
    runs = {r.info.run_id: r.info.status for r in client.search_runs([experiment])}
    assert runs.pop(run.info.run_id) == "KILLED" and list(runs.values()) == ["FINISHED"]


WORKERS = """
import os, sys, time, numpy as np
from pathlib import Path
from datamodules.webdataset import StreamLoader, TrainStream, expand_shards
from tests.toy import ToyTransform

class Slow(ToyTransform):
    def __call__(self, sample, rng):
        Path(sys.argv[2], f"worker-{os.getpid()}").touch()
        time.sleep(60)  # a worker busy decoding when its parent dies
        return super().__call__(sample, rng)

stream = TrainStream(expand_shards(sys.argv[1]), Slow(), ("x.npy", "json"), batch_size=2, seed=0,
                     max_skip_fraction=0.5, batches_per_epoch=4, shuffle_buffer=2, num_streams=None)
next(iter(StreamLoader(stream, num_workers=2)))
"""


def test_workers_exit_with_their_parent_after_kill_9(in_tmp):
    from tests.toy import write_toy_shards

    write_toy_shards(in_tmp / "data", {"train": [6, 6]})
    pids = in_tmp / "pids"
    pids.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen(
        [sys.executable, "-c", WORKERS, str(in_tmp / "data" / "train-*.tar"), str(pids)], env=env
    )
    try:
        deadline = time.monotonic() + 300
        while len(list(pids.iterdir())) < 2:
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.05)
        workers = [int(p.name.split("-")[1]) for p in pids.iterdir()]
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10  # the workers sleep 60 s: only their parent's death ends them sooner
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in workers)
    finally:
        parent.kill()
        for p in pids.iterdir():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(p.name.split("-")[1]), signal.SIGKILL)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by init, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_the_mlflow_ui_binds_loopback_only():
    makefile = (REPO / "Makefile").read_text()
    (line,) = [x for x in makefile.splitlines() if "mlflow ui" in x]
    assert "--host 127.0.0.1" in line
