"""SCoT: what the model sees of a plan per conditioning, GLIGEN-style gated box tokens, planning, edit scores."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from callbacks.images import draw_boxes
from lightning_modules.components.layout import PlanStats, parse_layout
from lightning_modules.components.packed_dit import TextConditioning
from lightning_modules.components.planners import Planner, RulePlanner
from lightning_modules.components.text import TextEncoder
from lightning_modules.scot import GroundedConditioning, LayoutTextEncoder, SCoT, edit_scores, fourier
from tests.test_experiments import model_args

TINY = Path(__file__).resolve().parents[2] / "experiments" / "scot" / "tiny.yaml"
PLAN = "a red circle [120, 40, 380, 300] left of a blue star [600, 420, 900, 760] on a white background"


def tiny(conditioning: str = "inline", **kwargs) -> SCoT:
    args = {k: v for k, v in model_args(TINY).items() if k not in ("planner", "detector")}
    model = SCoT(**{**args, "conditioning": conditioning, **kwargs})
    model.configure_model()
    return model


def test_fourier_embedding_worked_by_hand():
    # x = 0.25, 2 frequencies: angles pi/4, pi/2 -> (sin, sin, cos, cos)
    out = fourier(torch.tensor([0.25]), freqs=2)
    assert out.tolist() == pytest.approx([math.sqrt(0.5), 1.0, math.sqrt(0.5), 0.0], abs=1e-6)


class Recorder(TextEncoder):
    """A text encoder that records what it is given and returns zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[str]] = []

    def forward(self, prompts, images=None):
        self.seen.append(list(prompts))
        hidden = torch.zeros(len(prompts), 3, 4)
        return TextConditioning(hidden, torch.ones(len(prompts), 3, dtype=torch.bool), None)


@pytest.mark.parametrize(
    "conditioning, text, boxes",
    [
        ("inline", PLAN, False),
        ("text", "a red circle left of a blue star on a white background", False),
        ("boxes", "a red circle left of a blue star on a white background", True),
        ("inline+boxes", PLAN, True),
    ],
)
def test_the_layout_encoder_gives_the_text_and_boxes_each_conditioning_asks_for(conditioning, text, boxes):
    inner = Recorder()
    cond = LayoutTextEncoder(inner, conditioning, PlanStats())([PLAN, "a cat"])
    assert inner.seen[0] == [text, "a cat"]
    assert isinstance(cond, GroundedConditioning) is boxes
    if boxes:
        assert cond.counts == [2, 0] and inner.seen[1] == ["a red circle", "a blue star"]
        assert cond.boxes.flatten().tolist() == pytest.approx([0.12, 0.04, 0.38, 0.3, 0.6, 0.42, 0.9, 0.76])


def test_gated_box_tokens_leave_the_backbone_unchanged_at_init_then_steer_it_by_the_boxes():
    model = tiny("boxes").eval()
    x, refs, sigma = [torch.randn(16, 8, 8) for _ in range(2)], [[], []], torch.tensor([0.5, 0.7])
    other = PLAN.replace("[120, 40, 380, 300]", "[600, 600, 1000, 1000]")
    with torch.no_grad():
        grounded = model.text_encoder([PLAN, other])
        plain = TextConditioning(grounded.hidden, grounded.mask, grounded.pooled)
        assert torch.equal(torch.stack(model.backbone(x, refs, sigma, grounded)), torch.stack(model.backbone(x, refs, sigma, plain)))  # fmt: skip
        model.grounding.gates.fill_(1.0)
        v = model.backbone(x, refs, sigma, model.text_encoder([PLAN, PLAN]))
        w = model.backbone(x, refs, sigma, model.text_encoder([PLAN, other]))
        assert not torch.allclose(v[0], model.backbone(x, refs, sigma, plain)[0])
        assert torch.equal(v[0], w[0]) and not torch.allclose(v[1], w[1])  # only sample 1's boxes differ


def test_box_tokens_get_a_gradient_through_the_backbone():
    model = tiny("boxes")
    x, refs, sigma = [torch.randn(16, 8, 8) for _ in range(2)], [[], []], torch.tensor([0.5, 0.7])
    with torch.no_grad():
        text = model.text_encoder([PLAN, PLAN])
    loss = sum((v**2).mean() for v in model.backbone(x, refs, sigma, text))
    loss.backward()
    assert (
        model.grounding.gates.grad.abs().sum() > 0
    )  # the gate learns first (its attention starts gated off)
    assert model._grounded is None  # released after the call


class Garbage(Planner):
    def plan(self, prompts, meta=None):
        return ["no boxes here", "a cat [0, 0, 500, 1200]"][: len(prompts)]


def test_plans_fall_back_to_the_request_when_a_plan_is_refused_and_count_repairs():
    model = tiny("inline", planner=Garbage())
    batch = {"instruction": [PLAN, "a cat [0, 0, 500, 500]"], "refs": [[], []],
             "meta": [{"prompt": "a photo of a red circle left of a blue star"}, {"prompt": "a photo of a cat"}]}  # fmt: skip
    assert model.plans(batch) == ["a photo of a red circle left of a blue star", "a cat [0, 0, 500, 1000]"]
    assert model.plan_stats.refused == 1 and model.plan_stats.repairs["out_of_grid"] == 1
    model.planner = RulePlanner()
    assert model.plans(batch)[0].startswith("a red circle [")
    assert (
        "planner" not in model.hparams and "detector" not in model.hparams
    )  # objects stay out of checkpoints


def test_box_tokens_of_bad_plans_are_repaired_or_left_out_and_counted():
    stats = PlanStats()
    texts = [
        "a cat [0, 0, 500, 1200] and a cat [0, 0, 500, 1200]",  # clipped twice, then a duplicate: dropped
        "a dog [1, 2, x, 4] and a hat [0, 0, 100, 100]",  # the unparsable box dropped, the hat kept
        "a cup [900, 900, 100, 100]",  # inverted: corners swapped
        "a hat [5, 5, 5, 9]",  # no area: no usable box, refused, no token
    ]
    cond = LayoutTextEncoder(Recorder(), "boxes", stats)(texts)
    assert cond.counts == [1, 1, 1, 0]
    assert cond.boxes.flatten().tolist() == pytest.approx([0, 0, 0.5, 1, 0, 0, 0.1, 0.1, 0.1, 0.1, 0.9, 0.9])
    assert stats.as_dict() == {
        "plans": 3, "refused": 1, "out_of_grid": 2, "inverted": 1, "empty": 1, "duplicate": 1, "unparsable": 1,
    }  # fmt: skip


def test_edit_scores_worked_by_hand():
    source = torch.zeros(3, 10, 10)
    target = source.clone()
    target[:, :5, :5] = 1.0  # the edit box [0, 0, 500, 500] covers the top-left 5 x 5 pixels
    output = target.clone()
    output[:, 5:, :] += 0.1  # outside the box, off by 0.1: MSE 0.01 on those pixels
    output[:, :5, 5:] += 0.1
    scores = edit_scores(output, source, target, [0, 0, 500, 500])
    assert scores["edit_inside_psnr"] == 100.0  # exact (capped)
    assert scores["edit_outside_psnr"] == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-3)


def test_draw_boxes_outlines_the_box_and_leaves_the_rest():
    image = torch.zeros(3, 10, 10)
    out = draw_boxes(image, [(0.2, 0.2, 0.6, 0.6)])
    assert out[:, 2, 2:6].eq(torch.tensor([1.0, -1.0, 1.0])[:, None]).all()  # top edge, rows 2, cols 2..5
    assert out[:, 4, 4].eq(0).all() and out[:, 8, 8].eq(0).all() and image.eq(0).all()


def test_sample_grid_draws_the_layout_on_the_target_and_the_plan_on_the_sample_and_records_keep_the_plan():
    model = tiny("inline", planner=RulePlanner(), eval_steps=2)
    model.sampler["steps"] = 2
    meta = {
        "prompt": "a photo of a red circle left of a blue star",
        "layout": [{"phrase": "a red circle", "box": [100, 100, 500, 500]}],
        "geneval": {
            "tag": "position",
            "include": [
                {"class": "red circle", "count": 1},
                {"class": "blue star", "count": 1, "position": ["right of", 0]},
            ],
            "exclude": [],
        },
    }
    batch = {"instruction": [PLAN], "refs": [[]], "target": [torch.zeros(3, 32, 32)], "meta": [meta], "__key__": ["k0"]}  # fmt: skip
    plan = RulePlanner().plan([meta["prompt"]], [meta])[0]
    ((refs, target, sample),) = model.sample_grid(batch, 4)
    magenta = torch.tensor([1.0, -1.0, 1.0])
    assert (
        refs == [] and target[:, 3, 3].eq(magenta).all() and target[:, 8, 8].eq(0).all()
    )  # [100, ..] of 32 px
    x0, y0 = (int(v * 32 / 1000) for v in parse_layout(plan).regions[0].box[:2])
    assert sample[:, y0, x0].eq(magenta).all()
    (record,) = model.score_batch(batch, "test")
    assert (
        record["plan"] == plan
        and record["key"] == "k0"
        and set(record) >= {"miou", "box_hit", "position_acc"}
    )
