"""PDTR's stage schedule: the switch at the configured step changes the GRPO task filter and reward; resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.dual_task import DualTaskSchedule, SupportsTaskMix
from callbacks.grpo import GRPORollouts
from datamodules.multiref import MultiRefDataModule
from datamodules.synth import synthesize
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


def run(max_steps: int, root=None, ckpt=None, data=None, before=(), **kw):
    calls: list[str] = []
    model = tiny_grpo()
    grpo = GRPORollouts(
        reward={"red": redness}, group_size=2, steps=2, train_steps="all", steps_per_rollout=1
    )
    dual, recorder = schedule(calls, **kw), Recorder()
    callbacks = [*before, recorder, dual, grpo]
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


class TaskRecorder(L.Callback):
    """The tasks of each training batch, before the GRPO callback uses it."""

    def __init__(self) -> None:
        self.tasks: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.tasks.append(list(batch["task"]))


def test_each_stage_draws_only_its_tasks_from_the_multiref_datamodule(tmp_path):
    # The schedule sets the datamodule's task mix, so every batch of a stage holds only the stage's tasks:
    # the GRPO callback's task filter has nothing to drop and every prompt of a batch is rolled out.
    synthesize("multiref", tmp_path, samples={"train": 24, "val": 2, "test": 2}, seed=0)
    data = MultiRefDataModule(
        data_dir=str(tmp_path), budget=64, target_budget=64, min_side=32, multiple=32, batch_size=3,
        batches_per_epoch=10, max_skip_fraction=0.5,
    )  # fmt: skip
    grpo = GRPORollouts(
        reward={"red": redness}, group_size=2, steps=2, train_steps="all", steps_per_rollout=1, size=(16, 16)
    )
    stages = [
        {"name": "t2i", "steps": 2, "tasks": ["t2i"]},
        {"name": "edit", "steps": 2, "tasks": ["edit"]},
    ]
    tasks, recorder = TaskRecorder(), Recorder()
    trainer = L.Trainer(
        callbacks=[tasks, recorder, DualTaskSchedule(stages), grpo],
        **{**QUIET, "max_steps": 10, "limit_val_batches": 0},
    )
    trainer.fit(tiny_grpo(), datamodule=data)
    assert trainer.global_step == 4 and data.task_mix == {"edit": 1.0}
    assert tasks.tasks == [["t2i"] * 3] * 2 + [["edit"] * 3] * 2
    assert grpo.no_prompts == 0 and [len(s) for s in recorder.slices] == [3 * 2] * 4  # all 3 prompts x G


def test_the_multiref_task_mix_reaches_running_workers(tmp_path):
    synthesize("multiref", tmp_path, samples={"train": 24, "val": 2, "test": 2}, seed=0)
    data = MultiRefDataModule(
        data_dir=str(tmp_path), budget=128, target_budget=64, min_side=32, multiple=32, batch_size=2,
        batches_per_epoch=24, num_workers=2, max_skip_fraction=0.5,
    )  # fmt: skip
    assert isinstance(data, SupportsTaskMix)
    data.set_task_mix({"t2i": 1.0})
    batches = iter(data.train_dataloader())
    assert next(batches)["task"] == ["t2i", "t2i"]
    data.set_task_mix({"edit": 1.0, "compose": 1.0})
    rest = [b["task"] for b in batches]
    # batches the workers had made keep t2i: at most workers x (prefetch_factor + 1) = 6 of them
    assert all(t in ("edit", "compose") for batch in rest[6:] for t in batch), rest
    assert {t for batch in rest[6:] for t in batch} == {"edit", "compose"}


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


class LoraSnapshot(L.Callback):
    """Each LoRA layer's (base weight, LoRA delta) after every step, before the schedule's switch runs."""

    def __init__(self) -> None:
        self.steps: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(lora_state(pl_module))


def lora_state(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from peft.tuners.lora import LoraLayer

    return {
        name: (m.get_base_layer().weight.detach().clone(), m.get_delta_weight("default").detach().clone())
        for name, m in model.backbone.named_modules()
        if isinstance(m, LoraLayer)
    }


def test_restart_adapter_merges_stage_one_into_the_base_at_the_switch():
    # Stage 1 ends after step 2: its LoRA delta goes into the base weights (W + BA) and a fresh adapter
    # (B = 0) starts, so the network computes the same function across the switch.
    snapshot = LoraSnapshot()
    _, model, _, _, _ = run(max_steps=2, restart_adapter=True, before=[snapshot])
    before, after = snapshot.steps[-1], lora_state(model)  # the snapshot runs before the switch
    assert model.merged_adapters == 1 and len(before) > 0
    assert all(delta.abs().max() > 0 for _, delta in before.values())  # stage 1 trained the adapter
    for name, (base, delta) in before.items():
        torch.testing.assert_close(after[name][0], base + delta, rtol=0, atol=1e-6)
        assert not torch.equal(after[name][0], base) and after[name][1].abs().max() == 0, name
    # without restart_adapter the base stays and the adapter carries on
    snapshot = LoraSnapshot()
    _, model, _, _, _ = run(max_steps=2, before=[snapshot])
    assert model.merged_adapters == 0
    assert all(torch.equal(lora_state(model)[n][0], base) for n, (base, _) in snapshot.steps[-1].items())


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
