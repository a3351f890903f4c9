"""Run health: skip non-finite steps on every rank together, stop after K in a row, log data skips.

README "Security and reliability": a non-finite loss or gradient norm on any rank makes all ranks skip the
optimizer step together (a flag is all-reduced), the skip is counted, and K skips in a row stop the run
with a clear message. Returning None from `training_step` would hang DDP, so the step is skipped by
dropping the gradients instead: `torch.optim` optimizers leave a parameter without `.grad` untouched
(no moment update, no weight decay, no step count).

The skip decision needs one scalar on the host per optimizer step; nothing else here syncs per step.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class NonFiniteStepError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class RunHealth(Callback):
    """Skips steps whose loss or gradients are non-finite on any rank and logs data/skipped samples.

    Args:
        max_consecutive_skips: Stop the run after this many skipped optimizer steps in a row.
        log_every_n_steps: How often to log the skip counters.
    """

    def __init__(self, max_consecutive_skips: int = 5, log_every_n_steps: int = 50) -> None:
        self.max_consecutive_skips, self.log_every_n_steps = max_consecutive_skips, log_every_n_steps
        self.skipped, self.consecutive = 0, 0
        self._loss_ok: torch.Tensor | None = None

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        """Remember (on device, no sync) whether every micro-batch loss of this step is finite."""
        ok = torch.isfinite(loss.detach()).all()
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        """Agree across ranks on whether to step; if not, drop all gradients so the step does nothing."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        bad = torch.zeros((), device=pl_module.device)
        if self._loss_ok is not None:
            bad = bad + (~self._loss_ok).float()
        # fp16 loss scaling expects overflowing gradients and skips them itself
        if params and str(trainer.precision) not in ("16-mixed", "16", "16-true"):
            norms = torch._foreach_norm([p.grad for p in params])
            bad = bad + (~torch.isfinite(torch.stack(norms).sum())).float()
        self._loss_ok = None
        bad = trainer.strategy.reduce(bad, reduce_op="sum")
        if float(bad) == 0.0:
            self.consecutive = 0
            return
        for p in params:
            p.grad = None
        self.skipped += 1
        self.consecutive += 1
        pl_module.print(
            f"step {trainer.global_step}: non-finite loss or gradient, optimizer step skipped on all ranks"
        )
        if self.consecutive >= self.max_consecutive_skips:
            raise NonFiniteStepError(
                f"{self.consecutive} optimizer steps in a row had a non-finite loss or gradient "
                f"(last at step {trainer.global_step}); stopping. Lower the learning rate or check the data."
            )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log the skip counters every `log_every_n_steps` batches."""
        if batch_idx % self.log_every_n_steps:
            return
        pl_module.log("train/nonfinite_skips", float(self.skipped), on_step=True, on_epoch=False)
        stats = getattr(trainer.datamodule, "data_stats", None)
        if callable(stats):
            pl_module.log("data/skipped", float(stats()["skipped"]), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, int]:
        """The skip counters, so a resumed run keeps counting."""
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Restore the skip counters."""
        self.skipped, self.consecutive = state_dict["skipped"], state_dict["consecutive"]
