"""PDTR as a Callback: RL in stages (text-to-image, then editing), each stage from the previous stage's weights.

Implements UniPic 2.0's Progressive Dual-Task Reinforcement (UniPic 2.0 paper) as the notes reproduce it
(docs/methods/flow_grpo.md: "two sequential Flow-GRPO runs with different prompt sets and
rewards, the second starting from the stage-1 weights"). The callback knows no method: it switches what the
GRPO callback trains on through `SupportsStageSwitch` (callbacks/grpo.py's `GRPORollouts.set_stage`: the data
tasks and the reward of the stage), the data through `SupportsTaskMix` when the datamodule offers it
(`datamodules.multiref.MultiRefDataModule` does, in running workers too: a stage's batches then hold only its
tasks, and the GRPO callback's task filter drops only what workers had made before a switch; without it the
filter picks the stage's samples out of mixed batches and the others go unused), and, with `restart_adapter`,
merges the stage's LoRA into the base weights and starts a fresh adapter through `SupportsAdapterRestart` (the
default continues the same adapter, so stage 2 starts from stage 1's weights either way).

A stage is {name, steps, tasks, reward}: `steps` optimizer steps (the last stage may give None: until the run
ends), `tasks` the data tasks it trains on ("t2i", "edit", ...), `reward` the GRPO reward of the stage
({rewards: {name: {class_path, init_args}}, weights, rule, use_min}; omitted: keep the current one). The switch
happens after the optimizer step that completes a stage (`on_train_batch_end`), so the next step rolls out
under the new stage. state_dict holds the current stage and the steps done in it: a run resumed mid-stage
finishes that stage and switches at the same step as the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, TypedDict, runtime_checkable

from lightning.pytorch import Callback, LightningModule, Trainer

from rewards.remote import check_reward_servers


class Stage(TypedDict, total=False):
    """One RL stage: its name, length in optimizer steps, data tasks and reward."""

    name: str
    steps: int | None  # None: the last stage runs until the trainer stops
    tasks: list[str] | None  # None: every task
    reward: dict[str, Any]  # {rewards: {name: {class_path, init_args}}, weights, rule, use_min}


@runtime_checkable
class SupportsStageSwitch(Protocol):
    """What the schedule asks of the RL callback (callbacks.grpo.GRPORollouts implements it)."""

    def set_stage(
        self, tasks: list[str] | None, reward: Mapping[str, Any] | None = None, fresh_rollout: bool = True
    ) -> None:
        """Train on samples of `tasks` with `reward` (None: keep) from now on; drop the current rollout if fresh."""
        ...


@runtime_checkable
class SupportsTaskMix(Protocol):
    """Optional, of the datamodule: draw only (or mostly) these tasks from now on, e.g. {"t2i": 1.0}."""

    def set_task_mix(self, mix: dict[str, float]) -> None:
        """Keep a sample of task t with probability mix[t] / max(mix) (running workers included)."""
        ...


@runtime_checkable
class SupportsAdapterRestart(Protocol):
    """Of the module, for `restart_adapter`: merge the adapter into the base weights and start a fresh one."""

    def restart_adapter(self) -> None:
        """Merge the LoRA into the base, re-initialise it (B = 0) and reset its optimizer state."""
        ...


class DualTaskSchedule(Callback):
    """Run RL stages in order (PDTR: T2I, then editing), switching the GRPO callback's tasks and reward.

    Args:
        stages: The stages, in order (`Stage`: name, steps, tasks, reward).
        restart_adapter: At each switch, merge the stage's LoRA into the base weights and start a fresh
            adapter (the reference then is the previous stage's model); default: continue the same adapter.
        stop_at_end: Stop the run when the last stage's steps are done.
        log_every_n_steps: Log `pdtr/stage` every this many steps (and at every switch).
    """

    def __init__(
        self,
        stages: list[Stage],
        restart_adapter: bool = False,
        stop_at_end: bool = True,
        log_every_n_steps: int = 10,
    ) -> None:
        if not stages:
            raise ValueError("DualTaskSchedule needs at least one stage")
        for i, stage in enumerate(stages):
            unknown = set(stage) - set(Stage.__annotations__)
            if unknown:
                raise ValueError(
                    f"stage {i}: unknown keys {sorted(unknown)} (known: {sorted(Stage.__annotations__)})"
                )
            steps = stage.get("steps")
            if (steps is None and i != len(stages) - 1) or (steps is not None and steps < 1):
                raise ValueError(
                    f"stage {i}: steps must be >= 1 (only the last stage may give None), got {steps}"
                )
            if "reward" in stage and "rewards" not in stage["reward"]:
                raise ValueError(
                    f"stage {i}: reward must give `rewards: {{name: {{class_path, init_args}}}}`"
                )
        self.stages = [dict(s) for s in stages]
        self.restart_adapter, self.stop_at_end = restart_adapter, stop_at_end
        self.log_every_n_steps = max(1, log_every_n_steps)
        self.stage, self.steps_in_stage = 0, 0
        self._last_step: int | None = None
        self._restored = False
        self._rl: SupportsStageSwitch | None = None
        self._changed = True

    def name(self, index: int | None = None) -> str:
        """The name of stage `index` (default: the current one)."""
        index = self.stage if index is None else index
        return str(self.stages[index].get("name", f"stage{index}"))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Find the RL callback that takes the stage switch; check the module can restart its adapter if asked."""
        if stage != "fit":
            return
        found = [c for c in trainer.callbacks if isinstance(c, SupportsStageSwitch) and c is not self]
        if len(found) != 1:
            raise TypeError(
                f"DualTaskSchedule needs exactly one callback with set_stage(tasks, reward) (e.g. "
                f"callbacks.grpo.GRPORollouts), found {len(found)}"
            )
        self._rl = found[0]
        if self.restart_adapter and not isinstance(pl_module, SupportsAdapterRestart):
            raise TypeError(
                f"restart_adapter needs a module with restart_adapter(), got {type(pl_module).__name__}"
            )
        self._restored = False  # a checkpoint restores callbacks after setup

    def _apply(self, trainer: Trainer, fresh_rollout: bool) -> None:
        """Tell the RL callback (and the datamodule, when it can) what the current stage trains on."""
        spec = self.stages[self.stage]
        tasks = spec.get("tasks")
        self._rl.set_stage(tasks, spec.get("reward"), fresh_rollout=fresh_rollout)
        datamodule = trainer.datamodule
        if tasks is not None and isinstance(datamodule, SupportsTaskMix):
            datamodule.set_task_mix(dict.fromkeys(tasks, 1.0))
        self._changed = True

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Apply the current stage: stage 0 on a fresh run, the restored one (keeping its rollout) on resume.

        Every stage's reward servers must answer now (a later stage's missing server would stop the run hours in).
        """
        check_reward_servers([spec.get("reward") for spec in self.stages])
        self._apply(trainer, fresh_rollout=not self._restored)
        self._last_step = None if not self._restored else self._last_step
        self._restored = False

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Log the stage now and then."""
        if self._last_step is None:
            self._last_step = trainer.global_step
        if self._changed or trainer.global_step % self.log_every_n_steps == 0:
            pl_module.log("pdtr/stage", float(self.stage), on_step=True, on_epoch=False, batch_size=1)
            self._changed = False

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Count the optimizer steps of the stage; after its last one, switch to the next stage (or stop)."""
        step = trainer.global_step
        self.steps_in_stage += step - (self._last_step if self._last_step is not None else step)
        self._last_step = step
        length = self.stages[self.stage].get("steps")
        if length is None or self.steps_in_stage < length:
            return
        if self.stage + 1 >= len(self.stages):
            if self.stop_at_end and not trainer.should_stop:
                pl_module.print(f"step {step}: the last stage ({self.name()}) is done; stopping")
                trainer.should_stop = True
            return
        self.stage, self.steps_in_stage = self.stage + 1, 0
        pl_module.print(f"step {step}: stage {self.name(self.stage - 1)} done; starting stage {self.name()}")
        if self.restart_adapter:
            pl_module.restart_adapter()
        self._apply(trainer, fresh_rollout=True)

    def state_dict(self) -> dict[str, Any]:
        """The current stage, the optimizer steps done in it, and the stage names (to check on resume)."""
        return {
            "stage": self.stage,
            "steps_in_stage": self.steps_in_stage,
            "last_step": self._last_step,
            "names": [self.name(i) for i in range(len(self.stages))],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the stage and its step count; on_fit_start re-applies it."""
        names = [self.name(i) for i in range(len(self.stages))]
        if state_dict.get("names", names) != names:
            raise ValueError(
                f"the checkpoint's stages {state_dict.get('names')} differ from this schedule's {names}"
            )
        self.stage, self.steps_in_stage = int(state_dict["stage"]), int(state_dict["steps_in_stage"])
        self._last_step = state_dict.get("last_step")
        self._restored = True
