"""The console's progress bar: training loss and the monitored validation metric, an epoch count that reads.

Lightning's bar shows what a module logs with `prog_bar=True` and `v_num`. `RunProgressBar` shows instead the
training loss (`train/loss`) and the metric the best checkpoint is selected on (`checkpoint.monitor`, e.g.
`val/iou`), read from `trainer.callback_metrics` only at the trainer's log interval (`log_every_n_steps`) and
after each validation, so the bar adds no device sync per step. A run bounded by steps (`max_epochs: -1`)
reads `Epoch 3` instead of Lightning's `Epoch 3/-2`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar

TRAIN_LOSS = "train/loss"


class RunProgressBar(RichProgressBar):
    """RichProgressBar showing `train/loss` and the checkpoint's monitored metric, refreshed at log intervals."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._shown: dict[str, str] = {}
        self._read_at: int | None = None

    def shown_keys(self, trainer: L.Trainer) -> list[str]:
        """The metrics the bar shows: the training loss and the monitored validation metric."""
        monitor = getattr(trainer.checkpoint_callback, "monitor", None)
        return [TRAIN_LOSS, *([monitor] if monitor else [])]

    def read(self, trainer: L.Trainer) -> None:
        """Copy the shown metrics from `callback_metrics` (one host transfer each)."""
        self._read_at = trainer.global_step
        for key in self.shown_keys(trainer):
            value = trainer.callback_metrics.get(key)
            if value is not None:
                self._shown[key] = f"{float(value):.4g}"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """Read the metrics at the log interval, then let the bar refresh."""
        step = trainer.global_step
        if step != self._read_at and step % max(trainer.log_every_n_steps, 1) == 0:
            self.read(trainer)
        super().on_train_batch_end(trainer, pl_module, *args)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A validation just logged the monitored metric: show it."""
        if not trainer.sanity_checking:
            self.read(trainer)
        super().on_validation_end(trainer, pl_module)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int | str | float]:
        """The module's progress-bar metrics without `v_num`, plus the shown ones."""
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return {**items, **self._shown}

    def _get_train_description(self, current_epoch: int) -> str:
        """`Epoch n/N`, or `Epoch n` when the run is bounded by steps (max_epochs -1 or None)."""
        max_epochs = self.trainer.max_epochs
        text = f"Epoch {current_epoch}" + (f"/{max_epochs - 1}" if max_epochs and max_epochs > 0 else "")
        return (
            f"{text:{len(self.validation_description)}}"
            if len(self.validation_description) > len(text)
            else text
        )
