"""The multiref data kind: budgeted resizing, bad samples, task mixing, batches, and the live budget."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from datamodules.multiref import MultiRefDataModule, collate_multiref, mentioned_images
from datamodules.synth import synthesize
from datamodules.webdataset import BadSample, SkipSample

TINY = {"budget": 128, "target_budget": 128, "min_side": 32, "multiple": 32, "synth": False}


def transform(train=True, **kw):
    return MultiRefDataModule(**{**TINY, **kw}).transform(train)


def image(w, h, value=128):
    return np.full((h, w, 3), value, np.uint8)


def sample(
    refs=((200, 100), (100, 100)), target=(150, 90), instruction="Put image 2 on image 1", task=None, n=None
):
    n_refs = len(refs) if n is None else n
    out = {
        "__key__": "k",
        "json": {
            "instruction": instruction,
            "task": task or ("compose" if n_refs > 1 else "edit" if n_refs else "t2i"),
            "n_refs": n_refs,
            "source": "test",
            "orig_id": "k",
        },
        "target.png": image(*target, value=255),
    }
    for k, (w, h) in enumerate(refs):
        out[f"ref{k}.{'png' if k % 2 == 0 else 'jpg'}"] = image(w, h, value=40 * k)
    return out


def rng(seed=0):
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- the transform


def test_refs_share_the_joint_budget_and_the_target_has_its_own():
    # refs 200x100 + 100x100 under B = 128: r = 128 / sqrt(30000) = 0.739 -> 147.8 x 73.9 -> 128 x 64, 73.9 -> 64;
    # target 150x90 under its own 128: 13500 px fit, scale 1, floor to 32 -> 128 x 64
    out = transform()(sample(), rng())
    assert [tuple(r.shape) for r in out["refs"]] == [(3, 64, 128), (3, 64, 64)]
    assert tuple(out["target"].shape) == (3, 64, 128)
    assert out["n_refs"] == 2 and out["task"] == "compose" and out["ref_budget"] == 128
    # uint8 v -> v / 127.5 - 1, kept by the resize of a flat image: 0 -> -1, 40 -> -0.686, 255 -> 1
    assert torch.allclose(out["refs"][0], torch.tensor(-1.0))
    assert torch.allclose(out["refs"][1], torch.tensor(40 / 127.5 - 1), atol=1e-5)
    assert torch.allclose(out["target"], torch.tensor(1.0))


def test_unipic2_edge_rule_gives_reference_and_target_the_same_size():
    # edge, B = 128: the reference 200x100 -> longer edge 128 -> 128 x 64; the target (150x90) takes that size
    t = transform(budget_mode="edge", target_like_ref=True, max_refs=1)
    out = t(sample(refs=((200, 100),), instruction="Make image 1 red"), rng())
    assert tuple(out["refs"][0].shape) == tuple(out["target"].shape) == (3, 64, 128)
    assert out["ref_pixel_cap"] == 128 * 128  # one image with its longer edge at 128
    # text-to-image: the target's own longer edge to target_budget: 150x90 -> 128 x 76.8 -> 128 x 64
    out = t(sample(refs=(), instruction="a red star"), rng())
    assert tuple(out["target"].shape) == (3, 64, 128)


def test_refs_come_in_numeric_order_whatever_the_member_order():
    s = sample(refs=((64, 32), (32, 32), (96, 32)), instruction="x")
    shuffled = {k: s[k] for k in ["json", "ref2.png", "target.png", "ref0.png", "ref1.jpg"]}
    out = transform(budget=1024)(shuffled, rng())
    assert [r.shape[-1] for r in out["refs"]] == [64, 32, 96]


def test_text_to_image_and_single_image_edit():
    out = transform()(sample(refs=(), instruction="a red star at the center"), rng())
    assert out["refs"] == [] and out["n_refs"] == 0 and out["task"] == "t2i"
    out = transform()(sample(refs=((96, 96),), instruction="Make image 1 red"), rng())
    assert [tuple(r.shape) for r in out["refs"]] == [(3, 96, 96)] and out["task"] == "edit"


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"refs": ((64, 64),) * 7, "instruction": ""}, "7 references, more than max_refs=6"),
        ({"refs": ((64, 64), (64, 20))}, "ref1 is 64x20, smaller than min_side=32"),
        ({"target": (20, 64)}, "target is 20x64, smaller than min_side=32"),
        ({"instruction": "Put image 3 on image 1"}, "names image 3 but the sample has 2"),
        ({"instruction": "Put <image3> on <image1>"}, "names image 3"),
        ({"instruction": "Put Picture 3 here"}, "names image 3"),
        ({"refs": (), "instruction": "a cat like image 1"}, "names image 1 but the sample has 0"),
        ({"n": 3}, r"n_refs is 3 but the sample holds references \[0, 1\]"),
    ],
)
def test_unusable_samples_are_bad_with_a_reason(kwargs, reason):
    with pytest.raises(BadSample, match=reason):
        transform()(sample(**kwargs), rng())


def test_a_budget_too_small_for_the_refs_is_a_bad_sample_with_the_budget_error_text():
    # six refs at min_side 32 need at least 6 x 32² = 6144 px > 64² = 4096
    t = transform(budget=64, target_budget=64)
    with pytest.raises(BadSample, match=r"budget: the budget 64 \(4096 pixels\) cannot hold 6 images"):
        t(sample(refs=((200, 200),) * 6, instruction=""), rng())


def test_a_missing_target_is_a_bad_sample():
    s = sample()
    del s["target.png"]
    with pytest.raises(BadSample, match="missing target image"):
        transform()(s, rng())


def test_mentions_of_images_are_found_in_every_spelling():
    assert mentioned_images("Put image 2 in <image3>, Picture #4 and img5; Image1 stays") == [1, 2, 3, 4, 5]
    assert mentioned_images("a red star on a white background") == []


def test_task_mix_keeps_each_task_in_proportion_to_its_weight_and_leaves_unnamed_tasks_out():
    t = transform(task_mix={"edit": 1.0, "compose": 0.25})
    edit = sample(refs=((64, 64),), target=(64, 64), instruction="")  # sizes that need no resize: fast
    compose = sample(refs=((32, 32), (32, 32)), target=(64, 64), instruction="")
    kept_edit = sum(_kept(t, edit, seed) for seed in range(400))
    kept_compose = sum(_kept(t, compose, seed) for seed in range(400))
    assert kept_edit == 400
    assert 70 <= kept_compose <= 130  # 400 x 0.25 = 100
    with pytest.raises(SkipSample):
        t(sample(refs=(), instruction=""), rng())  # t2i is not named
    evaluation = transform(train=False, task_mix={"edit": 1.0, "compose": 0.25})
    assert all(_kept(evaluation, compose, seed) for seed in range(50))


def _kept(t, s, seed):
    try:
        t(s, rng(seed))
    except SkipSample:
        return False
    return True


def test_drop_text_empties_the_instruction_in_training_only():
    t = transform(drop_text=0.3)
    s = sample(refs=((64, 64),), target=(64, 64), instruction="Make image 1 red")
    dropped = sum(t(s, rng(seed))["instruction"] == "" for seed in range(300))
    assert 60 <= dropped <= 120  # 300 x 0.3 = 90
    assert all(transform(train=False, drop_text=0.3)(s, rng(seed))["instruction"] for seed in range(30))


def test_the_live_budget_changes_the_sizes_and_survives_pickling():
    dm = MultiRefDataModule(**TINY)
    t = dm.transform(True)
    copy = pickle.loads(pickle.dumps(t))
    dm.set_pixel_budget(256)
    # B = 256: r = 256 / sqrt(30000) = 1.478 > 1 -> capped: 200x100 -> 192 x 96, 100x100 -> 96 x 96
    out = t(sample(), rng())
    assert [tuple(r.shape) for r in out["refs"]] == [(3, 96, 192), (3, 96, 96)]
    assert out["ref_budget"] == 256 and dm.pixel_budget == 256
    assert tuple(out["target"].shape) == (3, 64, 128)  # the target keeps its own budget
    assert (
        copy(sample(), rng())["ref_budget"] == 128
    )  # a plain pickle is a snapshot (workers use shared memory)
    with pytest.raises(ValueError, match=r"below data\.min_side"):
        dm.set_pixel_budget(16)


def test_whether_a_sample_fits_is_judged_at_the_configured_budget_when_the_budget_grows():
    # 6 refs of 200² at min_side 32 need 6144 px: too many for B = 64 (4096) but not for B = 256. Raised to 256,
    # the sample stays skipped, so a resumed run replays the same samples as the uninterrupted one.
    dm = MultiRefDataModule(**{**TINY, "budget": 64, "target_budget": 64})
    dm.set_pixel_budget(256)
    with pytest.raises(BadSample, match="budget 64"):
        dm.transform(True)(sample(refs=((200, 200),) * 6, instruction=""), rng())


def test_collate_keeps_images_as_lists_and_counts_tokens():
    t = transform()
    batch = collate_multiref([t(sample(), rng()), t(sample(refs=(), instruction=""), rng())])
    assert len(batch["refs"]) == 2 and len(batch["refs"][0]) == 2 and batch["refs"][1] == []
    assert batch["n_refs"].tolist() == [2, 0]
    # (128/16)(64/16) + (64/16)(64/16) = 32 + 16; the target 128x64 -> 32 tokens
    assert batch["ref_tokens"].tolist() == [48, 0]
    assert batch["target_tokens"].tolist() == [32, 32]
    assert batch["task"] == ["compose", "t2i"] and batch["ref_budget"].tolist() == [128, 128]
    assert batch["ref_pixel_cap"].tolist() == [128 * 128] * 2  # the joint rule's cap: B²


def test_bad_configuration_is_refused():
    for kw in (
        {"budget_mode": "tiles"},
        {"min_side": 48},
        {"max_refs": 7},
        {"task_mix": {}},
        {"drop_text": 1.0},
    ):
        with pytest.raises(ValueError):
            MultiRefDataModule(**{**TINY, **kw})


# --------------------------------------------------------------------------- on generated shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("multiref")
    synthesize("multiref", out, samples={"train": 24, "val": 6, "test": 6}, seed=0)
    return out


def module(shards, **kw):
    args = {**TINY, "synth": True, "data_dir": str(shards), "batch_size": 2, "max_skip_fraction": 0.3}
    return MultiRefDataModule(**{**args, **kw})


def test_batches_from_generated_shards_fit_the_budget(shards):
    dm = module(shards)
    batches = list(dm.train_dataloader())
    assert len(batches) == 24 // 2
    for batch in batches:
        assert set(batch) >= {
            "refs",
            "target",
            "instruction",
            "task",
            "n_refs",
            "ref_tokens",
            "target_tokens",
        }
        for refs, n, tok in zip(batch["refs"], batch["n_refs"].tolist(), batch["ref_tokens"].tolist()):
            assert len(refs) == n
            assert sum(r.shape[-1] * r.shape[-2] for r in refs) <= 128**2
            assert tok <= 128**2 // 256
            assert all(r.shape[0] == 3 and r.shape[-1] % 32 == 0 and r.shape[-2] % 32 == 0 for r in refs)
    assert {t for b in batches for t in b["task"]} == {"edit", "compose", "t2i"}
    val = list(dm.val_dataloader())
    assert sum(len(b["target"]) for b in val) == 6


def test_workers_see_a_budget_set_in_the_main_process(shards):
    dm = module(shards, num_workers=2, batches_per_epoch=14)
    dm.set_pixel_budget(256)  # before the loader iterates: the very first batch has it
    loader = dm.train_dataloader()
    it = iter(loader)
    first = next(it)
    assert first["ref_budget"].tolist() == [256, 256]
    dm.set_pixel_budget(128)
    rest = [b["ref_budget"].tolist() for b in it]
    # batches the workers had made keep 256: at most workers x (prefetch_factor + 1) = 6 of them
    assert all(budgets == [128, 128] for budgets in rest[6:]), rest
    assert rest[-1] == [128, 128]
