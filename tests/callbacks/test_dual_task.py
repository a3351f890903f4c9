"""PDTR's stage schedule: the switch at the configured step changes the GRPO task filter and reward; resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.dual_task import DualTaskSchedule
from callbacks.grpo import GRPORollouts
from tests.callbacks.test_grpo import Recorder, redness
from tests.lightning_modules.test_flow_edit import QUIET
from tests.lightning_modules.test_flow_grpo import (
    one_thread,
    prompt_batch,
    prompt_loader,
    tiny_grpo,
    tokenizer_cache,
)

__all__ = ["one_thread", "tokenizer_cache"]  # module-scoped fixtures: one thread, a private tokenizer cache

MIXED = prompt_batch(
    prompts=("a red star", "make image 1 red"),
    tasks=("t2i", "edit"),
    refs=[[], [torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1]],
)


class Named:
    """A reward that records its calls."""

    def __init__(self, name: str, calls: list[str]) -> None:
        self.name, self.calls = name, calls

    def __call__(self, images, prompts, references, meta):
        self.calls.append(self.name)
        return redness(images, prompts, references, meta)


class TaskMixData(L.LightningDataModule):
    """A datamodule with the optional set_task_mix protocol (records what it is told)."""

    def __init__(self) -> None:
        super().__init__()
        self.mixes: list[dict[str, float]] = []

    def set_task_mix(self, mix: dict[str, float]) -> None:
        self.mixes.append(mix)

    def train_dataloader(self):
        return prompt_loader(MIXED)


def schedule(calls: list[str], **kw) -> DualTaskSchedule:
    stages = [
        {
            "name": "t2i",
            "steps": 2,
            "tasks": ["t2i"],
            "reward": {"rewards": {"geneval": Named("geneval", calls)}},
        },
        {
            "name": "edit",
            "steps": 3,
            "tasks": ["edit"],
            "reward": {"rewards": {"edit": Named("edit", calls)}},
        },
    ]
    return DualTaskSchedule(stages, **kw)


def run(max_steps: int, root=None, ckpt=None, data=None, **kw):
    calls: list[str] = []
    model = tiny_grpo()
    grpo = GRPORollouts(
        reward={"red": redness}, group_size=2, steps=2, train_steps="all", steps_per_rollout=1
    )
    dual, recorder = schedule(calls, **kw), Recorder()
    callbacks = [recorder, dual, grpo]
    args = {**QUIET, "max_steps": max_steps, "limit_val_batches": 0}
    if root is not None:
        callbacks.append(ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=1, save_top_k=0))
        args["enable_checkpointing"] = True
    trainer = L.Trainer(callbacks=callbacks, default_root_dir=root, **args)
    if data is not None:
        trainer.fit(model, datamodule=data, ckpt_path=ckpt)
    else:
        trainer.fit(model, prompt_loader(MIXED), ckpt_path=ckpt)
    return trainer, model, dual, recorder, calls


def test_stage_switch_at_the_configured_step_changes_task_filter_and_reward():
    trainer, _, dual, recorder, calls = run(max_steps=10)
    prompts = [set(s.prompts) for s in recorder.slices]
    assert prompts == [{"a red star"}] * 2 + [{"make image 1 red"}] * 3
    assert calls == ["geneval"] * 2 + ["edit"] * 3
    assert trainer.global_step == 5 and dual.stage == 1 and dual.steps_in_stage == 3  # stopped at the end


def test_the_datamodule_task_mix_is_set_when_it_offers_the_protocol():
    data = TaskMixData()
    run(max_steps=3, data=data)
    assert data.mixes == [{"t2i": 1.0}, {"edit": 1.0}]


def test_state_survives_a_checkpoint_and_a_resumed_run_switches_at_the_same_step(tmp_path):
    _, full, _, full_rec, full_calls = run(max_steps=10)
    run(max_steps=1, root=tmp_path / "a")  # mid-stage 1
    _, resumed, dual, rec, calls = run(
        max_steps=10, root=tmp_path / "b", ckpt=str(tmp_path / "a" / "last.ckpt")
    )
    assert [s.prompts for s in rec.slices] == [s.prompts for s in full_rec.slices[1:]]
    assert calls == full_calls[1:]
    assert dual.stage == 1 and dual.steps_in_stage == 3
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_restart_adapter_merges_stage_one_into_the_base_at_the_switch():
    _, model, _, _, _ = run(max_steps=10, restart_adapter=True)
    assert model.merged_adapters == 1


def test_state_dict_round_trip_and_a_different_schedule_is_refused():
    dual = schedule([])
    dual.stage, dual.steps_in_stage = 1, 2
    other = schedule([])
    other.load_state_dict(dual.state_dict())
    assert (other.stage, other.steps_in_stage) == (1, 2)
    renamed = DualTaskSchedule([{"name": "x", "steps": 1}, {"name": "y"}])
    with pytest.raises(ValueError, match="differ"):
        renamed.load_state_dict(dual.state_dict())


def test_bad_schedules_and_a_missing_rl_callback_are_clear_errors():
    with pytest.raises(ValueError, match="only the last stage"):
        DualTaskSchedule([{"name": "a"}, {"name": "b", "steps": 1}])
    with pytest.raises(ValueError, match="unknown keys"):
        DualTaskSchedule([{"name": "a", "step": 1}])
    trainer = L.Trainer(callbacks=[schedule([])], **{**QUIET, "max_steps": 1})
    with pytest.raises(TypeError, match="set_stage"):
        trainer.fit(tiny_grpo(), prompt_loader(MIXED))
