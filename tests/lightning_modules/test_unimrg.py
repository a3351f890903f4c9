"""UniMRG: the task losses and their equal weighting on a stub unified model (values worked by hand)."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.unimrg import EQUAL_WEIGHTS, PROMPTS, UnifiedModel, UniMRG, unconditional_mask

VALUES = {"understanding": 1.0, "pixel": 2.0, "depth": 3.0, "seg": 4.0}


class Stub(UniMRG):
    """A unified model whose losses are constants, recording what UniMRG asks of it."""

    def __init__(self, weights=None, uncond_prob=0.0):
        self.calls, self.seed = [], 0
        self.init_unimrg(weights, None, uncond_prob)

    def understanding_loss(self, images, questions, answers):
        self.calls.append(("understanding", list(answers)))
        return torch.tensor(VALUES["understanding"])

    def representation_loss(self, images, prompts, targets, *stream):
        task = stream[0]
        self.calls.append((task, [len(s) for s in images], list(prompts), [float(t.mean()) for t in targets]))
        return torch.tensor(VALUES[task])

    def choose(self, images, questions, options):
        return [0 for _ in questions]


def batch(n=2):
    return {
        "image": torch.zeros(n, 3, 4, 4),
        "depth": torch.ones(n, 3, 4, 4),
        "seg": torch.full((n, 3, 4, 4), -1.0),
        "question": ["q"] * n,
        "answer": ["a"] * n,
    }


def test_equal_weights_sum_the_four_tasks():
    from lightning_modules.metaquery import weighted_loss

    stub = Stub()
    assert stub.weights == EQUAL_WEIGHTS == {"understanding": 1.0, "pixel": 1.0, "depth": 1.0, "seg": 1.0}
    losses = stub.task_losses(batch(), "s", 0)
    assert float(weighted_loss(losses, stub.weights)) == pytest.approx(1 + 2 + 3 + 4)
    # each representation is generated from the image, with its prompt, towards its own target
    calls = {c[0]: c for c in stub.calls}
    assert calls["depth"][2] == [PROMPTS["depth"]] * 2 and calls["depth"][3] == [1.0, 1.0]
    assert calls["seg"][3] == [-1.0, -1.0] and calls["pixel"][3] == [0.0, 0.0]
    assert calls["depth"][1] == [1, 1]


def test_a_zero_weight_task_is_not_run():
    from lightning_modules.metaquery import weighted_loss

    stub = Stub(weights={"pixel": 0.0, "seg": 0.0})
    losses = stub.task_losses(batch(), "s", 0)
    assert set(losses) == {"understanding", "depth"}
    assert float(weighted_loss(losses, stub.weights)) == pytest.approx(1 + 3)


def test_unconditional_reconstruction_drops_image_and_prompt_together():
    stub = Stub(weights={"understanding": 0.0, "depth": 0.0, "seg": 0.0}, uncond_prob=0.5)
    stub.task_losses(batch(64), "s", 0)
    (_, sources, prompts, _) = stub.calls[0]
    dropped = [n == 0 for n in sources]
    assert 0 < sum(dropped) < 64
    assert all((p == "") == d for p, d in zip(prompts, dropped))


def test_unconditional_mask_draws_about_its_probability():
    drawn = unconditional_mask(20000, 0.1, torch.Generator().manual_seed(0))
    assert abs(sum(drawn) / 20000 - 0.1) < 0.01


def test_a_missing_target_key_and_bad_weights_are_named():
    stub = Stub()
    b = batch()
    del b["seg"]
    with pytest.raises(KeyError, match="seg"):
        stub.task_losses(b, "s", 0)
    with pytest.raises(ValueError, match="weights"):
        Stub(weights={"caption": 1.0})


def test_a_model_without_the_protocol_is_refused():
    class NotUnified(UniMRG):
        pass

    assert not isinstance(NotUnified(), UnifiedModel)
    with pytest.raises(TypeError, match="UnifiedModel"):
        NotUnified().init_unimrg(None, None, 0.1)
