"""Validate at the end of a run cut short by `max_steps` (issue 12: `--trainer.max_steps=10` still validates).

Lightning validates at its `val_check_interval` or at the end of an epoch; a fit that stops at `max_steps` in
between ends without a validation, so without a best checkpoint, a sample grid or the monitored metric.
Lightning validates after a batch when the trainer is asked to stop there (`trainer.should_stop`); this callback
asks for it on the batch that reaches `max_steps`, so the validation (and the checkpoint selected on it) runs
once more, at the last step, only when one was not due anyway.
"""

from __future__ import annotations

from typing import Any

import lightning as L


class FinalValidation(L.Callback):
    """Ask Lightning to stop (and so validate) on the batch whose optimizer step reaches `max_steps`."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Set `trainer.should_stop` once `global_step` reaches `max_steps` (a no-op for unbounded runs)."""
        if 0 < trainer.max_steps <= trainer.global_step and not trainer.sanity_checking:
            trainer.should_stop = True
