"""One folder per run (issue 12 items 1-2): runs/<method>/<name>/<run id>/ with a `latest` link; eval, predict and
resume default to `latest`, say which checkpoint they use and write into the run they use; fast_dev_run writes
no checkpoint; a resumed fit continues its folder and its MLflow run (one curve stays one curve)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from omnilab.cli import main
from omnilab.runs import find_checkpoint, latest_run, resolve_latest, set_latest
from tests.test_cli import toy_experiment

REPO = Path(__file__).resolve().parents[1]
LOGGER = "--trainer.logger=lightning.pytorch.loggers.MLFlowLogger"


def runs_of(root: Path) -> list[Path]:
    return sorted(p for p in (root / "runs" / "toy" / "tiny").iterdir() if p.is_dir() and not p.is_symlink())


def test_each_fit_gets_its_own_folder_and_latest_names_the_newest(in_tmp, capsys):
    exp = toy_experiment(in_tmp)
    main(["fit", "--config", str(exp)])
    main(["fit", "--config", str(exp), "--model.init_args.lr=0.05"])
    first, second = runs_of(in_tmp)  # timestamps sort in start order
    assert latest_run(in_tmp / "runs" / "toy" / "tiny") == second
    for run in (first, second):  # each run whole in its folder, no best-v1.ckpt beside another run's files
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert (
        "lr: 0.05" in (second / "config.yaml").read_text()
        and "lr: 0.05" not in (first / "config.yaml").read_text()
    )
    out = capsys.readouterr().out
    assert f"run folder     runs/toy/tiny/{second.name}  (latest)" in out  # the summary
    assert f"best checkpoint runs/toy/tiny/{second.name}/checkpoints/best.ckpt  val/loss = " in out


def test_eval_and_predict_use_latest_say_so_and_write_into_that_run(in_tmp, capsys):
    exp = toy_experiment(in_tmp)
    main(["fit", "--config", str(exp), "--test_after_fit=false"])
    (run,) = runs_of(in_tmp)
    config = (run / "config.yaml").read_bytes()
    capsys.readouterr()
    main(["test", "--config", str(exp), "--ckpt_path", "latest"])
    out = capsys.readouterr().out
    assert "omnilab test uses checkpoint runs/toy/tiny/latest/checkpoints/best.ckpt" not in out  # resolved
    assert (
        f"omnilab test uses checkpoint {run.relative_to(in_tmp)}/checkpoints/best.ckpt (the latest run" in out
    )
    main(["predict", "--config", str(exp), "--ckpt_path", "latest"])
    out = capsys.readouterr().out
    assert (
        f"written        {run.relative_to(in_tmp)}/predict_config.yaml, {run.relative_to(in_tmp)}/predictions"
        in out
    )
    assert len((run / "predictions" / "toy.jsonl").read_text().splitlines()) == 4  # the 4 test samples
    assert (run / "test_config.yaml").is_file() and (
        run / "config.yaml"
    ).read_bytes() == config  # not overwritten
    assert runs_of(in_tmp) == [run]  # eval and predict made no run folder of their own
    main(["fit", "--config", str(exp), "--ckpt_path", str(run), "--test_after_fit=false"])  # a run folder
    assert "resumes from checkpoint" in capsys.readouterr().out


def test_a_missing_latest_is_an_error_naming_it(in_tmp, capsys):
    exp = toy_experiment(in_tmp)
    with pytest.raises(SystemExit):
        main(["test", "--config", str(exp), "--ckpt_path", "latest"])
    assert "runs/toy/tiny/latest does not exist" in capsys.readouterr().err
    assert not (in_tmp / "runs" / "toy" / "tiny").exists()  # nothing was started


def test_fast_dev_run_writes_no_checkpoint_and_keeps_latest(in_tmp):
    exp = toy_experiment(in_tmp)
    main(["fit", "--config", str(exp), "--trainer.fast_dev_run=true"])
    assert not list((in_tmp / "runs").rglob("*.ckpt"))
    assert not (in_tmp / "runs" / "toy" / "tiny" / "latest").exists()


def test_latest_falls_back_to_a_pointer_file_where_symlinks_fail(in_tmp, monkeypatch):
    exp_dir = in_tmp / "runs" / "m" / "n"
    for run in ("a", "b"):
        (exp_dir / run / "checkpoints").mkdir(parents=True)
        torch.save({"run": run}, exp_dir / run / "checkpoints" / "last.ckpt")
    set_latest(exp_dir / "a")
    assert (exp_dir / "latest").is_symlink() and latest_run(exp_dir) == exp_dir / "a"

    def no_symlinks(*args, **kwargs):
        raise OSError("symlinks are not supported here")

    monkeypatch.setattr(os, "symlink", no_symlinks)
    set_latest(exp_dir / "b")  # replaces the link by a file, atomically
    link = exp_dir / "latest"
    assert not link.is_symlink() and link.read_text().strip() == "b" and latest_run(exp_dir) == exp_dir / "b"
    assert not list(exp_dir.glob(".latest*"))  # no temp file left
    ckpt = resolve_latest("runs/m/n/latest/checkpoints/last.ckpt")  # an init_checkpoint path
    assert torch.load(ckpt, weights_only=True) == {"run": "b"}
    assert find_checkpoint("latest", Path("runs/m/n"), resume=False) == (ckpt, "the latest run of runs/m/n")


def test_a_resumed_fit_continues_its_folder_and_mlflow_run(in_tmp, capsys):
    """The user path: `make train`, the run dies, `make resume` (`--ckpt_path latest`)."""
    uri = f"sqlite:///{in_tmp}/mlruns/mlflow.db"
    exp = toy_experiment(in_tmp, logger=None, log_every_n_steps=1)
    args = ["fit", "--config", str(exp), LOGGER, f"--trainer.logger.tracking_uri={uri}", "--test_after_fit=false",
            "--trainer.max_epochs=2"]  # fmt: skip
    with pytest.raises(SystemError):  # 3 steps per epoch: last.ckpt at step 3, killed at step 4
        main([*args, "--trainer.callbacks+=tests.test_resume.Crash", "--trainer.callbacks.step=4"])
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    (folder,) = runs_of(in_tmp)
    assert folder.name == run.info.run_id  # the run folder is named by the MLflow run id
    capsys.readouterr()
    main([*args, "--ckpt_path", "latest"])
    out = capsys.readouterr().out
    assert f"resumes from checkpoint runs/toy/tiny/{folder.name}/checkpoints/last.ckpt" in out
    assert f"MLflow run     {folder.name}  (store {uri}; make mlflow-ui, then http://127.0.0.1:5000/#/" in out
    (resumed,) = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    assert resumed.info.run_id == folder.name and resumed.info.status == "FINISHED"
    assert runs_of(in_tmp) == [folder] and latest_run(folder.parent) == folder
    steps = [m.step for m in client.get_metric_history(folder.name, "train/loss")]
    assert sorted(set(steps)) == list(range(6))  # one curve: the steps before the crash and after
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


def test_make_eval_predict_and_resume_default_to_latest():
    def dry(*args: str) -> str:
        done = subprocess.run(
            ["make", "-n", "-C", str(REPO), *args], capture_output=True, text=True, check=True
        )
        return done.stdout

    assert "test --config" in dry("eval", "EXP=ccmp/tiny") and "--ckpt_path latest" in dry(
        "eval", "EXP=ccmp/tiny"
    )
    assert "predict --config" in dry("predict") and "--ckpt_path latest" in dry("predict")
    assert "fit --config" in dry("resume") and "--ckpt_path latest" in dry("resume")
    assert "--ckpt_path runs/x.ckpt" in dry("eval", "CKPT=runs/x.ckpt")
    assert "--ckpt_path" not in dry("eval", "CKPT=none")
