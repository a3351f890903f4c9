"""The progressive pixel-budget schedule: milestones, resume, and the datamodule's workers following it."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.pixel_budget import PixelBudgetSchedule, SupportsPixelBudget, parse_milestones
from datamodules.multiref import MultiRefDataModule
from datamodules.synth import synthesize


class Recorder(L.LightningModule):
    """A one-parameter module that records the budget and the reference tokens of every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.budgets: list[list[int]] = []
        self.tokens: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.budgets.append(batch["ref_budget"].tolist())
        self.tokens.append(batch["ref_tokens"].tolist())
        return (self.w**2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("multiref")
    synthesize("multiref", out, samples={"train": 24, "val": 2, "test": 2}, seed=1)
    return out


def datamodule(shards, **kw):
    args = dict(data_dir=str(shards), batch_size=2, budget=128, target_budget=128, min_side=32, multiple=32)
    return MultiRefDataModule(**{**args, "batches_per_epoch": 12, **kw})


def trainer(tmp_path, callbacks, max_steps):
    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )


def test_milestones_give_the_budget_of_the_last_one_reached():
    schedule = PixelBudgetSchedule({0: 1024, 3000: 1536, 6000: 2048})
    assert [schedule.budget_at(s) for s in (0, 2999, 3000, 5999, 6000, 10**6)] == [
        1024,
        1024,
        1536,
        1536,
        2048,
        2048,
    ]
    assert parse_milestones([[3000, 1536], [0, 1024]]) == [(0, 1024), (3000, 1536)]
    for bad in ({5: 1024}, {}, [[0, 1024], [0, 2048]], {0: 0}):
        with pytest.raises(ValueError):
            parse_milestones(bad)


def test_the_multiref_datamodule_implements_the_protocol():
    assert isinstance(MultiRefDataModule(synth=False), SupportsPixelBudget)


def test_fitting_without_a_budget_datamodule_is_a_clear_error(tmp_path):
    class Plain(L.LightningDataModule):
        def train_dataloader(self):
            return [torch.zeros(1)]

    with pytest.raises(TypeError, match="needs a datamodule with set_pixel_budget"):
        trainer(tmp_path, [PixelBudgetSchedule({0: 128})], 1).fit(Recorder(), datamodule=Plain())


def test_reference_sizes_grow_exactly_at_the_milestone(tmp_path, shards):
    model, schedule = Recorder(), PixelBudgetSchedule({0: 128, 3: 256}, log_every_n_steps=100)
    t = trainer(tmp_path, [schedule], 8)
    t.fit(model, datamodule=datamodule(shards))
    # num_workers=0: the batch of global step S is resized under budget_at(S), no earlier, no later
    assert model.budgets == [[128, 128]] * 3 + [[256, 256]] * 5
    early, late = (
        [tok for toks in model.tokens[:3] for tok in toks],
        [tok for toks in model.tokens[3:] for tok in toks],
    )
    assert max(early) <= 128**2 // 256 < max(late) <= 256**2 // 256  # B²/256 tokens at most
    assert t.callback_metrics["data/pixel_budget"] == 256  # logged at the change, between the every-100 logs
    assert schedule.state_dict()["budget"] == 256


def test_a_resumed_run_sees_the_budgets_of_the_uninterrupted_one(tmp_path, shards):
    whole = Recorder()
    every_step = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    run = trainer(tmp_path, [PixelBudgetSchedule({0: 128, 4: 256}), every_step], 7)
    run.fit(whole, datamodule=datamodule(shards))
    assert [b[0] for b in whole.budgets] == [128] * 4 + [256] * 3
    for stop in (3, 4):  # cut just before the milestone and just at it
        schedule, model, dm = PixelBudgetSchedule({0: 128, 4: 256}), Recorder(), datamodule(shards)
        resumed = trainer(tmp_path, [schedule], 7)
        resumed.fit(
            model, datamodule=dm, ckpt_path=tmp_path / "ckpt" / f"epoch=0-step={stop}.ckpt", weights_only=True
        )
        assert resumed.global_step == 7
        assert model.budgets == whole.budgets[stop:]  # the first batch already has the saved budget
        assert model.tokens == whole.tokens[stop:]  # the same samples at the same sizes
        assert dm.pixel_budget == 256 and schedule.budget == 256


def test_running_workers_follow_a_budget_the_callback_sets(tmp_path, shards):
    model = Recorder()
    trainer(tmp_path, [PixelBudgetSchedule({0: 128, 2: 256})], 12).fit(
        model, datamodule=datamodule(shards, num_workers=2)
    )
    budgets = [b[0] for b in model.budgets]
    assert budgets[0] == 128 and budgets[-4:] == [256] * 4  # the workers started at 128 and read the change
