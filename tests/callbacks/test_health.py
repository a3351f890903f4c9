"""RunHealth: a non-finite step leaves weights and optimizer state untouched; K in a row stop the run."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from callbacks.health import NonFiniteStepError, RunHealth
from tests.toy import ToyData, ToyModule, write_toy_shards


class Snapshot(L.Callback):
    """Record parameters and optimizer state at the start of every batch."""

    def __init__(self) -> None:
        self.params, self.steps = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.params.append([p.detach().clone() for p in pl_module.parameters()])
        state = trainer.optimizers[0].state
        self.steps.append([float(state[p]["step"]) if p in state else 0.0 for p in pl_module.parameters()])


def fit(tmp_path, nan_steps, max_consecutive=5):
    write_toy_shards(tmp_path / "data", {"train": [12]})
    L.seed_everything(0)
    health, snap = RunHealth(max_consecutive_skips=max_consecutive, log_every_n_steps=1), Snapshot()
    trainer = L.Trainer(
        max_steps=6,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[health, snap],
    )
    data = ToyData(data_dir=str(tmp_path / "data"), batch_size=2, batches_per_epoch=6)
    trainer.fit(ToyModule(nan_steps=nan_steps), datamodule=data)
    return trainer, health, snap


def test_a_nan_loss_skips_the_step_without_touching_weights_or_moments(tmp_path):
    trainer, health, snap = fit(tmp_path, nan_steps=[2])
    assert health.skipped == 1 and health.consecutive == 0
    assert all(torch.equal(a, b) for a, b in zip(snap.params[3], snap.params[2]))  # step 2 did nothing
    assert not all(torch.equal(a, b) for a, b in zip(snap.params[2], snap.params[1]))
    assert snap.steps[3] == snap.steps[2] == [2.0] * 4  # AdamW's step count did not advance either
    assert snap.steps[4] == [3.0] * 4
    assert trainer.callback_metrics["train/nonfinite_skips"] == 1.0


def test_k_skips_in_a_row_stop_the_run_with_a_clear_message(tmp_path):
    with pytest.raises(NonFiniteStepError, match="3 optimizer steps in a row"):
        fit(tmp_path, nan_steps=[1, 2, 3], max_consecutive=3)


def test_state_survives_a_checkpoint():
    health = RunHealth()
    health.skipped, health.consecutive = 4, 2
    other = RunHealth()
    other.load_state_dict(health.state_dict())
    assert (other.skipped, other.consecutive) == (4, 2)
