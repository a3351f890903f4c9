"""EMA callback: the average worked by hand, evaluation on the EMA weights, exact checkpoint round trip."""

from __future__ import annotations

import io
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from callbacks.ema import EMA


class Scalar(L.LightningModule):
    """One scalar weight w; SGD on loss = -w moves w by +lr per step; val/test steps record w."""

    def __init__(self, w: float = 1.0, lr: float = 1.0) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))
        self.lr = lr
        self.seen: list[float] = []

    def training_step(self, batch, batch_idx):
        return -self.w

    def validation_step(self, batch, batch_idx):
        self.seen.append(self.w.item())

    def test_step(self, batch, batch_idx):
        self.seen.append(self.w.item())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def drive(ema: EMA, module: Scalar, values: list[float]) -> None:
    """Set w to each value as if an optimizer step produced it, and run the EMA's hooks."""
    trainer = SimpleNamespace(global_step=0)
    ema.on_fit_start(trainer, module)
    for step, value in enumerate(values, start=1):
        ema.on_train_batch_start(trainer, module, None, step - 1)
        module.w.data.fill_(value)
        trainer.global_step = step
        ema.on_train_batch_end(trainer, module, None, None, step - 1)


def test_ema_after_k_updates_matches_hand_computation():
    ema, module = EMA(decay=0.5), Scalar(w=1.0)
    drive(ema, module, [2.0, 4.0, 0.0])
    # ema0 = 1; ema1 = .5·1 + .5·2 = 1.5; ema2 = .5·1.5 + .5·4 = 2.75; ema3 = .5·2.75 + .5·0 = 1.375
    assert ema.ema["w"].item() == pytest.approx(1.375)
    assert ema.num_updates == 3 and ema.ema["w"].dtype == torch.float32


def test_every_n_steps_and_start_step():
    ema, module = EMA(decay=0.5, every_n_steps=2, start_step=2), Scalar(w=1.0)
    drive(ema, module, [2.0, 4.0, 6.0, 8.0])
    # step 1: not a multiple of 2; step 2 <= start: copy, ema = 4; step 3: skip; step 4: .5·4 + .5·8 = 6
    assert ema.ema["w"].item() == pytest.approx(6.0)
    assert ema.num_updates == 1


def test_no_update_without_an_optimizer_step():
    ema, module = EMA(decay=0.5), Scalar(w=1.0)
    trainer = SimpleNamespace(global_step=3)
    ema.on_fit_start(trainer, module)
    ema.on_train_batch_start(trainer, module, None, 0)
    module.w.data.fill_(5.0)
    ema.on_train_batch_end(trainer, module, None, None, 0)  # gradient accumulation: global_step unchanged
    assert ema.ema["w"].item() == 1.0 and ema.num_updates == 0


def test_evaluate_ema_swaps_the_weights_in_and_back_under_inference_mode():
    ema, module = EMA(decay=0.5), Scalar(w=1.0)
    drive(ema, module, [3.0])  # ema = 2, w = 3
    with torch.inference_mode():
        ema.on_validation_start(None, module)
        assert module.w.item() == 2.0
        ema.on_validation_end(None, module)
    assert module.w.item() == 3.0 and not module.w.is_inference()
    off = EMA(decay=0.5, evaluate_ema=False)
    drive(off, module, [3.0])
    off.on_test_start(None, module)
    assert module.w.item() == 3.0


def test_state_dict_round_trip():
    ema, module = EMA(decay=0.5), Scalar(w=1.0)
    drive(ema, module, [2.0, 4.0])
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    restored = EMA(decay=0.5)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.num_updates == 2 and torch.equal(restored.ema["w"], ema.ema["w"])
    drive(restored, module, [0.0])  # continues from the restored average: .5·2.75 + 0
    assert restored.ema["w"].item() == pytest.approx(1.375)


def fit_trainer(callbacks, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )


def test_fit_validates_and_checkpoints_the_ema_and_test_restores_it(tmp_path):
    data = DataLoader([torch.zeros(1)] * 4, batch_size=1)
    module, ema = Scalar(w=0.0, lr=1.0), EMA(decay=0.5)
    trainer = fit_trainer([ema], max_steps=2, accumulate_grad_batches=2, enable_checkpointing=False)
    trainer.fit(module, data, data)
    # 4 batches, 2 optimizer steps: w = 1, 2; ema = .5·0 + .5·1 = .5, then .5·.5 + .5·2 = 1.25
    assert module.w.item() == pytest.approx(2.0)
    assert ema.num_updates == 2 and ema.ema["w"].item() == pytest.approx(1.25)
    assert module.seen[-1] == pytest.approx(1.25)  # validation ran on the EMA weights
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["state_dict"]["w"].item() == pytest.approx(2.0)

    fresh, restored = Scalar(w=-7.0), EMA(decay=0.5)
    fit_trainer([restored]).test(fresh, data, ckpt_path=path)
    assert restored.num_updates == 2 and fresh.seen == [pytest.approx(1.25)] * 4
    assert fresh.w.item() == pytest.approx(2.0)  # the checkpoint's trained weights, swapped back
