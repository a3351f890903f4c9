"""The console's progress bar (callbacks/progress.py): loss and monitored metric, no v_num, a true epoch count."""

from __future__ import annotations

from types import SimpleNamespace

from callbacks.progress import RunProgressBar
from omnilab.cli import main
from tests.test_cli import toy_experiment


def test_the_bar_shows_the_training_loss_and_the_monitored_metric(in_tmp, capsys):
    exp = toy_experiment(in_tmp, enable_progress_bar=True, log_every_n_steps=1)
    main(["fit", "--config", str(exp), "--test_after_fit=false"])
    out = capsys.readouterr().out
    assert "train/loss:" in out and "val/loss:" in out  # val/loss is the toy experiment's checkpoint.monitor
    assert "v_num" not in out
    assert "run folder" in out and "best checkpoint" in out  # the summary after the fit


def test_a_run_bounded_by_steps_reads_epoch_n_not_minus_two():
    bar = RunProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1)
    assert bar._get_train_description(0).strip() == "Epoch 0"
    bar._trainer = SimpleNamespace(max_epochs=3)
    assert bar._get_train_description(1).strip() == "Epoch 1/2"
