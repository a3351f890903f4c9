"""Progressive pixel-budget schedule: the reference budget grows with the training step (UniRef SFT).

Implements UniRef-Image-Edit's progressive sequence-length training (UniRef-Image-Edit paper: all input images
resized to a total pixel budget of 1024², then gradually 1536² and 2048²; docs/methods/uniref.md
§1: under the joint rule that is 4096 -> 9216 -> 16384 reference tokens). The callback knows no method or
data kind: the datamodule implements `SupportsPixelBudget` (`datamodules.multiref.MultiRefDataModule`
does), and the schedule is `milestones` {step: budget}, the budget of the last milestone at or before
the current global step.

When the budget is set (checked in Lightning 2.6's `Trainer._run`, `FitLoop` and `_DataFetcher`): `setup`
finds the datamodule; on resume Lightning restores the callbacks (`load_state_dict`, which applies the
saved budget at once) after `setup` and before `on_fit_start`; `on_fit_start` sets the budget of the
current step on a fresh run and keeps the restored one on resume (the global step is restored only after
`on_fit_start`); only then does `FitLoop.setup_data` create the train iterator and start its workers.
During the epoch, `on_train_batch_end` (after the optimizer step, so `global_step` is the step the next
batch trains) sets the next step's budget. Lightning fetches a batch of a sized loader at the start of its
step, without fetching ahead, so with `num_workers=0` the batch of global step S is resized under exactly
`budget_at(S)`, and a resumed run (whose checkpoint, written after `on_train_batch_end`, holds the next
step's budget) sees the same budgets as an uninterrupted one. With workers, batches already prefetched
keep the old budget (see datamodules/multiref.py): the data follows a milestone a few batches late.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from lightning.pytorch import Callback, LightningModule, Trainer


@runtime_checkable
class SupportsPixelBudget(Protocol):
    """What the schedule asks of the datamodule: use budget B (B² pixels for the references) from now on."""

    def set_pixel_budget(self, budget: int) -> None:
        """Resize the references under budget B from now on (running workers included)."""
        ...


def parse_milestones(milestones: Mapping[int, int] | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """{step: budget} or [[step, budget], ...] -> sorted (step, budget) pairs, checked (one at step 0)."""
    pairs = milestones.items() if isinstance(milestones, Mapping) else milestones
    out = sorted((int(step), int(budget)) for step, budget in pairs)
    if not out or out[0][0] != 0:
        raise ValueError(f"pixel budget milestones {milestones} must start at step 0")
    steps = [s for s, _ in out]
    if len(set(steps)) != len(steps) or any(b <= 0 for _, b in out):
        raise ValueError(f"pixel budget milestones {milestones}: steps must differ and budgets be positive")
    return out


class PixelBudgetSchedule(Callback):
    """Set the datamodule's reference pixel budget from a step schedule; the budget travels in checkpoints.

    Args:
        milestones: {global step: budget B} (or [[step, B], ...]), starting at step 0; UniRef:
            {0: 1024, S1: 1536, S2: 2048} (the paper gives no step counts).
        log_every_n_steps: Log `data/pixel_budget` every this many batches (and whenever it changes).
    """

    def __init__(self, milestones: dict[int, int] | list[list[int]], log_every_n_steps: int = 50) -> None:
        self.milestones = parse_milestones(milestones)
        self.log_every_n_steps = log_every_n_steps
        self.budget: int | None = None  # the budget last set on the datamodule (or restored)
        self._restored = False  # a checkpoint's budget was loaded: on_fit_start keeps it
        self._pending: int | None = None  # a loaded budget waiting for the datamodule
        self._target: SupportsPixelBudget | None = None
        self._changed = False  # log at the next batch

    def budget_at(self, step: int) -> int:
        """The budget of the last milestone at or before `step`."""
        return [b for s, b in self.milestones if s <= step][-1]

    def _apply(self, budget: int) -> bool:
        """Set `budget` on the datamodule when it differs from the current one; whether it changed."""
        if self._target is None or budget == self.budget:
            return False
        self._target.set_pixel_budget(budget)
        self.budget, self._changed = budget, True
        return True

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Find the datamodule that takes the budget (fitting without one is a clear error)."""
        datamodule = trainer.datamodule
        self._restored = False  # a checkpoint restores callbacks after setup
        if not isinstance(datamodule, SupportsPixelBudget):
            if stage != "fit":
                return
            raise TypeError(
                f"PixelBudgetSchedule needs a datamodule with set_pixel_budget(budget), got "
                f"{type(datamodule).__name__} (e.g. datamodules.multiref.MultiRefDataModule)"
            )
        if datamodule is not self._target:  # a new datamodule holds its own budget
            self._target, self.budget = datamodule, None
        if self._pending is not None:
            self._apply(self._pending)
            self._pending = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Before the train iterator exists: the budget of the current step, or the one a checkpoint saved."""
        if not self._restored:
            self._apply(self.budget_at(trainer.global_step))
        self._restored = False

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Make sure the budget is the current step's (normally set already); log it now and then."""
        self._apply(self.budget_at(trainer.global_step))
        if (self._changed or batch_idx % self.log_every_n_steps == 0) and self.budget is not None:
            pl_module.log("data/pixel_budget", float(self.budget), on_step=True, on_epoch=False, batch_size=1)
            self._changed = False

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After the optimizer step: the budget of the step the next batch trains (before it is fetched)."""
        self._apply(self.budget_at(trainer.global_step))

    def state_dict(self) -> dict[str, Any]:
        """The current budget and the schedule it came from."""
        return {"budget": self.budget, "milestones": [list(m) for m in self.milestones]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the budget of a checkpoint and set it at once when the datamodule is known."""
        budget = state_dict.get("budget")
        if budget is None:
            return
        self._restored = True
        if self._target is None:
            self._pending = int(budget)
        else:
            self._apply(int(budget))
