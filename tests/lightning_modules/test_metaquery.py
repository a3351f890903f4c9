"""MetaQuery: the pure pieces against hand-worked values, and the tiny model's stages, tasks and query path."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from lightning_modules.metaquery import (
    MetaQuery,
    chance_accuracy,
    option_logprobs,
    scale_gradient,
    weighted_loss,
)

FRAGMENT = Path(__file__).resolve().parents[2] / "experiments" / "_base" / "tiny_unified.yaml"


def tiny_args() -> dict:
    """The tiny unified model's arguments (experiments/_base/tiny_unified.yaml)."""
    return yaml.safe_load(FRAGMENT.read_text())["model"]["init_args"]


def test_weighted_loss_sums_the_weighted_tasks():
    losses = {"t2i": torch.tensor(2.0), "understanding": torch.tensor(3.0)}
    assert float(weighted_loss(losses, {"t2i": 1.0, "edit": 1.0, "understanding": 0.5})) == pytest.approx(3.5)
    with pytest.raises(KeyError, match="understanding"):
        weighted_loss(losses, {"t2i": 1.0})


def test_option_logprobs_sums_the_log_probabilities_of_the_labelled_tokens():
    # vocabulary of 2; position 0 predicts token 1 with p = 1/2, position 1 predicts token 0 with p = 3/4
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[-100, 1, 0]])
    assert float(option_logprobs(logits, labels)[0]) == pytest.approx(math.log(0.5 * 0.75), abs=1e-6)


def test_scale_gradient_keeps_the_value_and_scales_the_gradient():
    x = torch.tensor(2.0, requires_grad=True)
    y = scale_gradient(x, 0.1) * 3
    y.backward()
    assert float(y.detach()) == pytest.approx(6.0) and float(x.grad) == pytest.approx(0.3)


def test_chance_accuracy_is_the_mean_of_one_over_the_options():
    assert chance_accuracy([["1", "2", "3"], ["left", "right"]]) == pytest.approx((1 / 3 + 1 / 2) / 2)


@pytest.fixture(scope="module")
def connector_stage() -> MetaQuery:
    torch.manual_seed(0)
    args = {**tiny_args(), "sampler": {"steps": 1, "guidance": 1.0}}
    model = MetaQuery(**args, trainable=["queries", "connector"])
    model.configure_model()
    return model


def images(n: int) -> list[torch.Tensor]:
    return [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in range(n)]


def test_connector_stage_trains_queries_and_connector_through_the_frozen_vlm(connector_stage):
    model = connector_stage
    model.zero_grad(set_to_none=True)
    x = images(2)
    loss = model.image_to_image_loss([[x[0]], []], ["remove the red circle", "a blue square"], x, "t", 0)
    loss.backward()
    enc = model.text_encoder
    assert enc.queries.grad is not None and float(enc.queries.grad.abs().sum()) > 0
    assert all(p.grad is not None for p in enc.connector.parameters())
    assert all(not p.requires_grad and p.grad is None for p in enc.vlm.parameters())
    assert all(not p.requires_grad for p in model.backbone.parameters())


def test_the_queries_are_what_the_dit_reads(connector_stage):
    enc = connector_stage.text_encoder
    with torch.no_grad():
        a = enc(["a red circle"]).hidden.clone()
        saved = enc.queries.data.clone()
        enc.queries.data.add_(1.0)
        b = enc(["a red circle"]).hidden
        enc.queries.data.copy_(saved)
    assert a.shape == (1, 16, 32) and not torch.allclose(a, b)


def test_representation_loss_reaches_the_dit_without_a_kontext_reference(connector_stage, monkeypatch):
    model, seen = connector_stage, []
    forward = model.backbone.forward

    def spy(target, refs, *args, **kwargs):
        seen.append([len(r) for r in refs])
        return forward(target, refs, *args, **kwargs)

    monkeypatch.setattr(model.backbone, "forward", spy)
    x = images(2)
    with torch.no_grad():
        model.representation_loss([[x[0]], [x[1]]], ["Generate the depth map of this image."] * 2, x, "r", 0)
        model.image_to_image_loss([[x[0]], [x[1]]], ["remove it"] * 2, x, "e", 0)
    assert seen == [[0, 0], [1, 1]]  # the representation task sees the image only through the VLM


def test_one_model_generates_edits_and_answers(connector_stage):
    model, x = connector_stage, images(2)
    t2i = model.sample([[], []], ["a red circle", "a blue square"], size=(32, 32), steps=1)
    edit = model.sample([[x[0]]], ["remove the red circle"], steps=1)
    assert [tuple(i.shape) for i in t2i] == [(3, 32, 32)] * 2 and tuple(edit[0].shape) == (3, 32, 32)
    picks = model.choose(
        x, ["How many objects are there?", "Is it left or right?"], [["1", "2", "3"], ["left", "right"]]
    )
    assert picks[0] in (0, 1, 2) and picks[1] in (0, 1)
    assert math.isfinite(float(model.understanding_loss(x, ["How many objects are there?"] * 2, ["1", "2"])))


def test_joint_stage_trains_the_dit_and_the_configuration_is_checked():
    model = MetaQuery(**tiny_args(), trainable=["queries", "connector", "dit"])
    model.configure_model()
    assert all(p.requires_grad for p in model.backbone.parameters())
    assert not any(p.requires_grad for p in model.vlm.parameters())
    with pytest.raises(ValueError, match="trainable"):
        MetaQuery(**tiny_args(), trainable=["decoder"])
    with pytest.raises(ValueError, match="task_weights"):
        MetaQuery(**tiny_args(), task_weights={"caption": 1.0})


def test_visual_grad_scale_scales_the_gradient_reaching_the_vision_tower():
    grads = {}
    for scale in (1.0, 0.1):
        torch.manual_seed(0)
        model = MetaQuery(**tiny_args(), trainable=["vlm"], visual_grad_scale=scale)
        model.configure_model()
        model.understanding_loss(images(1), ["How many objects are there?"], ["2"]).backward()
        visual = model.vlm.model.model.visual
        grads[scale] = torch.cat([p.grad.flatten() for p in visual.parameters() if p.grad is not None])
        text_grad = model.vlm.model.lm_head.weight.grad
        grads[f"lm{scale}"] = text_grad.clone()
    # x·s + stop_grad(x)·(1 − s) rounds the forward value by an ulp, hence the tolerance; unscaled would be 10x off
    assert torch.allclose(grads[0.1], 0.1 * grads[1.0], rtol=1e-2, atol=1e-7)
    assert torch.allclose(
        grads["lm0.1"], grads["lm1.0"], rtol=1e-2, atol=1e-7
    )  # the language side is not scaled
