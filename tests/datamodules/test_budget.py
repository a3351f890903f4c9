"""The pixel-budget rules (notes §1): the worked example by hand, each mode, the minimum side, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from datamodules.budget import BudgetError, fit_to_budget, reference_capacity, tokens

WORKED = [(1024, 1024), (768, 1152), (512, 512)]  # the notes' example, B = 1024


def area(sizes):
    return sum(w * h for w, h in sizes)


# --------------------------------------------------------------------------- joint (UniPic-3 / MICo / SELF)


def test_joint_round_reproduces_the_notes_worked_example():
    # r = 1024 / sqrt(1024² + 768·1152 + 512²) = 0.6911: 707.7 -> 704; 530.8 x 796.1 -> 544 x 800; 353.8 -> 352
    sizes = fit_to_budget(WORKED, 1024, "joint", rounding="round", hold=False)
    assert sizes == [(704, 704), (544, 800), (352, 352)]
    assert tokens(sizes) == 44 * 44 + 34 * 50 + 22 * 22 == 4120  # overshoots 4096, as the notes say
    assert area(sizes) > 1024**2


def test_joint_round_is_held_under_the_budget_by_shrinking_the_largest_image():
    # the unheld 4120 tokens: 704² (the largest) loses 32 px on a side -> 672 x 704:
    # 672·704 + 544·800 + 352² = 473088 + 435200 + 123904 = 1032192 <= 1024² = 1048576
    sizes = fit_to_budget(WORKED, 1024, "joint", rounding="round")
    assert sizes == [(672, 704), (544, 800), (352, 352)]
    assert tokens(sizes) == 42 * 44 + 34 * 50 + 22 * 22 == 4032 <= 4096


def test_joint_floor_never_exceeds_the_budget_on_the_worked_example():
    # floor: 530.8 -> 512, 796.1 -> 768; 704 and 352 as with round
    sizes = fit_to_budget(WORKED, 1024, "joint", rounding="floor")
    assert sizes == [(704, 704), (512, 768), (352, 352)]
    assert tokens(sizes) == 1936 + 32 * 48 + 484 == 3956
    assert area(sizes) <= 1024**2


def test_joint_with_upscale_and_round_enlarges_a_small_set_as_unipic3():
    # r = 1024 / sqrt(256² + 512·256) = 2.3094: 591.2 -> 576, 1182.4 -> 1184
    assert fit_to_budget([(256, 256), (512, 256)], 1024, upscale=True, rounding="round") == [
        (576, 576),
        (1184, 576),
    ]


def test_joint_floor_keeps_the_total_under_the_budget_for_random_sets():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        n = int(rng.integers(1, 7))
        sizes = [(int(rng.integers(128, 3000)), int(rng.integers(128, 3000))) for _ in range(n)]
        budget = int(rng.choice([512, 1024, 1536, 2048]))
        for mode in ("joint", "equal"):
            least = sum(w * h * (128 / min(w, h)) ** 2 for w, h in sizes)
            if least > budget**2:
                with pytest.raises(BudgetError):
                    fit_to_budget(sizes, budget, mode)
                continue
            out = fit_to_budget(sizes, budget, mode)
            checked += 1
            assert area(out) <= budget**2, (sizes, budget, mode, out)
            for (w, h), (w2, h2) in zip(sizes, out):
                assert w2 % 32 == 0 and h2 % 32 == 0
                assert min(w2, h2) >= 128
                assert w2 <= w and h2 <= h  # never enlarged
    assert checked > 400


# --------------------------------------------------------------------------- equal, independent, table


def test_equal_area_with_upscale_reproduces_the_notes_example():
    # each image B²/3 = 349525 px: 1024² -> 591.2 -> 576; 768x1152 -> 482.7 x 724.1; 512² -> 591.2 -> 576
    rounded = fit_to_budget(WORKED, 1024, "equal", upscale=True, rounding="round")
    assert rounded == [(576, 576), (480, 736), (576, 576)]
    assert tokens(rounded) == 1296 + 30 * 46 + 1296 == 3972
    floored = fit_to_budget(WORKED, 1024, "equal", upscale=True, rounding="floor")
    assert floored == [(576, 576), (480, 704), (576, 576)]
    assert tokens(floored) == 1296 + 30 * 44 + 1296 == 3912


def test_equal_area_without_upscale_gives_a_small_image_share_to_the_others():
    # 512² keeps its 262144 px; the other two share (1024² - 512²) / 2 = 393216 px each:
    # 1024² -> sqrt(393216) = 627.1 (floor 608, round 640); 768x1152 -> scale 2/3 -> 512 x 768 exactly
    assert fit_to_budget(WORKED, 1024, "equal") == [(608, 608), (512, 768), (512, 512)]
    unheld = fit_to_budget(WORKED, 1024, "equal", rounding="round", hold=False)
    assert unheld == [(640, 640), (512, 768), (512, 512)]  # 409600 + 393216 + 262144 = 1064960 > 1024²
    # held: 640² loses 32 px on a side: 389120 + 393216 + 262144 = 1044480 <= 1048576
    assert fit_to_budget(WORKED, 1024, "equal", rounding="round") == [(608, 640), (512, 768), (512, 512)]


def test_independent_caps_each_image_on_its_own():
    # B = 512: 1024² -> 512²; 768x1152 -> scale 512 / sqrt(884736) = 0.5443 -> 418.1 x 627.1 -> 416 x 608;
    # 512² is within the cap and stays
    out = fit_to_budget(WORKED, 512, "independent")
    assert out == [(512, 512), (416, 608), (512, 512)]
    assert area(out) > 512**2  # the sequence grows with N
    # with upscale every image gets the whole budget (Qwen-Image-Edit-Plus): 836.1 x 1254.2 -> 832 x 1248
    assert fit_to_budget(WORKED, 1024, "independent", upscale=True) == [
        (1024, 1024),
        (832, 1248),
        (1024, 1024),
    ]


def test_table_follows_omnigen2_counts_and_max_side():
    # N = 3 -> 768² per image: 1024² -> 768²; 768x1152 -> scale 0.8165 -> 627.1 x 940.6 -> 608 x 928; 512² stays
    assert fit_to_budget(WORKED, 1024, "table") == [(768, 768), (608, 928), (512, 512)]
    # N = 1 -> 1024², longest side 2048: 8192x512 -> min(1024 / 2048, 2048 / 8192) = 0.25 -> 2048 x 128
    assert fit_to_budget([(8192, 512)], 1024, "table") == [(2048, 128)]
    # N >= 4 -> 512²; scaled by B / 1024: at B = 2048 that is 1024²
    assert fit_to_budget([(1024, 1024)] * 5, 1024, "table") == [(512, 512)] * 5
    assert fit_to_budget([(2048, 2048)] * 4, 2048, "table") == [(1024, 1024)] * 4


# --------------------------------------------------------------------------- minimum side, multiples, errors


def test_a_thin_reference_is_held_at_min_side_and_the_others_shrink_to_keep_the_budget():
    # B = 256 (65536 px). Unclamped r = 0.2238 would make 2000x130 29 px tall; it is held at 32 / 130
    # (492.3 x 32 -> 480 x 32, 15754 px before snapping) and 1024² gets the rest: sqrt(65536 - 15754) = 223.1
    # -> floor 192
    out = fit_to_budget([(1024, 1024), (2000, 130)], 256, "joint", multiple=32, min_side=32)
    assert out == [(192, 192), (480, 32)]
    assert area(out) <= 256**2


def test_sides_are_multiples_and_small_sets_are_not_enlarged():
    assert fit_to_budget([(200, 120)], 1024, multiple=8, min_side=16) == [(200, 120)]
    # upscale: r = 1024 / sqrt(24000) = 6.610 -> 1322.0 x 793.2 -> 1320 x 792
    assert fit_to_budget([(200, 120)], 1024, multiple=8, min_side=16, upscale=True) == [(1320, 792)]
    assert fit_to_budget([(301, 250)], 1024, multiple=32, min_side=32) == [(288, 224)]
    assert fit_to_budget([], 1024) == []


def test_too_many_refs_for_the_budget_is_a_budget_error_with_the_numbers():
    with pytest.raises(BudgetError, match=r"budget 128 \(16384 pixels\).*6 images.*min_side 64.*24576"):
        fit_to_budget([(256, 256)] * 6, 128, "joint", min_side=64, multiple=32)
    with pytest.raises(BudgetError, match="more than its independent budget"):
        fit_to_budget([(4000, 130)], 128, "independent", min_side=32)
    assert isinstance(BudgetError("x"), ValueError)


def test_edge_resizes_the_longer_edge_to_the_budget_as_unipic2():
    assert fit_to_budget([(1024, 768)], 512, "edge") == [(512, 384)]  # scale 1/2
    # 600 x 400: scale 512/600 -> 512 x 341.3: floor 320, round 352
    assert fit_to_budget([(600, 400)], 512, "edge") == [(512, 320)]
    assert fit_to_budget([(600, 400)], 512, "edge", rounding="round") == [(512, 352)]
    # smaller than the budget: kept (300 -> 288, 200 -> 192 on the 32 grid) unless upscaling (x 1.7067)
    assert fit_to_budget([(300, 200)], 512, "edge") == [(288, 192)]
    assert fit_to_budget([(300, 200)], 512, "edge", upscale=True, rounding="round") == [(512, 352)]


def test_round_is_held_under_an_own_cap_too():
    # edge at B = 500: 1000² -> 500² rounds to 512² on the 32 grid; held: 480 x 512, then 480²
    assert fit_to_budget([(1000, 1000)], 500, "edge", rounding="round", hold=False) == [(512, 512)]
    assert fit_to_budget([(1000, 1000)], 500, "edge", rounding="round") == [(480, 480)]
    # independent at B = 1010: 1010² rounds to 1024² (1010 / 32 = 31.56) > 1010²; held: 992 x 1024 = 1015808
    assert fit_to_budget([(1010, 1010)], 1010, "independent", rounding="round", hold=False) == [(1024, 1024)]
    assert fit_to_budget([(1010, 1010)], 1010, "independent", rounding="round") == [(992, 1024)]


def test_reference_capacity_is_the_most_pixels_each_rule_gives():
    assert reference_capacity(1024, "joint", 6) == reference_capacity(1024, "equal", 2) == 1024**2
    assert reference_capacity(1024, "independent", 3) == 3 * 1024**2
    assert reference_capacity(512, "edge", 1) == 512**2
    # OmniGen2's table: N · P(N)² = 1024², 2·1024², 3·768², 4·512², 5·512², 6·512² -> the largest is N = 2
    assert reference_capacity(1024, "table", 6) == 2 * 1024**2
    assert reference_capacity(1024, "table", 1) == 1024**2
    assert reference_capacity(1024, "joint", 0) == 0


def test_a_reference_below_min_side_is_refused_unless_upscaling():
    with pytest.raises(ValueError, match="below min_side 32") as info:
        fit_to_budget([(100, 20)], 1024, min_side=32)
    assert not isinstance(info.value, BudgetError)
    # upscale: r = 1024 / sqrt(2000) = 22.9 -> 2289.7 x 457.9 -> 2272 x 448
    assert fit_to_budget([(100, 20)], 1024, min_side=32, upscale=True) == [(2272, 448)]


def test_bad_arguments_are_refused():
    for kwargs in ({"mode": "tiled"}, {"rounding": "ceil"}, {"min_side": 48}, {"min_side": 0}):
        with pytest.raises(ValueError):
            fit_to_budget(WORKED, 1024, **kwargs)


def test_tokens_count_16_px_patches():
    assert tokens([(704, 704), (544, 800), (352, 352)]) == 4120
    assert tokens([(64, 32)], pixels_per_token=8) == 8 * 4
    assert tokens([]) == 0
    assert tokens([(1024, 1024)]) == math.prod((64, 64))


# --------------------------------------------------------------------------- every shipped multiref experiment


def _multiref_experiments():
    """The experiments whose data is a multiref kind (MultiRefDataModule or a subclass) packed by max_ref_tokens."""
    import importlib

    from datamodules.multiref import MultiRefDataModule
    from tests.configs import EXPERIMENTS, class_path, init_args

    def multiref(path) -> bool:
        module, _, name = str(class_path(path, "data")).rpartition(".")
        cls = getattr(importlib.import_module(module), name, None) if module else None
        return isinstance(cls, type) and issubclass(cls, MultiRefDataModule)

    return [p for p in EXPERIMENTS if multiref(p) and init_args(p, "model").get("max_ref_tokens") is not None]


def _pixels_per_token(model_args: dict) -> int:
    """The packed model's pixels per token side: 16 for the released VAEs (/8, patch 2), else the tiny VAE's."""
    from diffusers import AutoencoderKL, AutoencoderKLQwenImage

    from lightning_modules.components.backbones import build_backbone
    from lightning_modules.flow_edit import LatentCodec

    vae = model_args["vae"]
    if vae.get("pretrained") is not None:
        return 16
    cls = AutoencoderKLQwenImage if model_args["backbone"]["family"] == "qwen_image_edit" else AutoencoderKL
    return LatentCodec(build_backbone(cls, config=vae["config"])).factor * 2


@pytest.mark.parametrize("path", _multiref_experiments(), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_references_never_overflow_the_packed_length(path):
    """Random reference sets under each experiment's data rule fit the length its model packs them to."""
    import inspect
    from types import SimpleNamespace

    import torch

    from datamodules.multiref import MultiRefDataModule
    from lightning_modules.flow_edit import FlowEdit
    from tests.configs import callback_args, init_args

    defaults = {
        k: v.default for k, v in inspect.signature(MultiRefDataModule).parameters.items() if k != "kwargs"
    }
    data = {**defaults, **init_args(path, "data")}
    model_args = init_args(path, "model")
    budgets = {data["budget"]}
    for schedule in callback_args(path, "PixelBudgetSchedule"):
        budgets |= set(schedule["milestones"].values())
    ppt = _pixels_per_token(model_args)
    model = SimpleNamespace(max_ref_tokens=model_args["max_ref_tokens"], pixels_per_token=ppt)
    rng = np.random.default_rng(0)
    lo = 8 if data["upscale"] else data["min_side"]
    for budget in sorted(budgets):
        cap = reference_capacity(budget, data["budget_mode"], data["max_refs"])
        batch = {"ref_budget": torch.tensor([budget] * 2), "ref_pixel_cap": torch.tensor([cap] * 2)}
        length = FlowEdit.max_tokens(model, [0, 0], batch)  # the model's packed reference length
        fitted = 0
        for _ in range(1000):
            n = int(rng.integers(1, data["max_refs"] + 1))
            sides = np.exp(rng.uniform(np.log(lo), np.log(4 * budget), size=(n, 2))).astype(int)
            try:
                out = fit_to_budget(
                    [tuple(s) for s in sides], budget, data["budget_mode"], data["multiple"], data["min_side"],
                    data["upscale"], data["rounding"],
                )  # fmt: skip
            except ValueError:  # BudgetError or below min_side: the data skips the sample (counted)
                continue
            fitted += 1
            assert tokens(out, ppt) <= length, (budget, sides.tolist(), out, length)
        assert fitted > 300, f"{path}: only {fitted} of 1000 random sets fit at budget {budget}"
