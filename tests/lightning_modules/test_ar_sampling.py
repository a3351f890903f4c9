"""PURE's sampling processors: entropy-based top-k (hand-worked k and kept sets), the layout constraints, image CFG."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.components.ar_sampling import (
    EntropyTopKLogitsProcessor,
    ImageCFGLogitsProcessor,
    ImageStructureLogitsProcessor,
    entropy_top_k,
    keep_top_k,
    shannon_entropy,
)
from lightning_modules.components.image_tokens import ImageTokenLayout

# a toy vocabulary: 0-9 text, 10-25 the 16 image codes, 26 start, 27 end, 28 row end, 29 turn end, 30.. grid sizes
V = 30 + 65
LAYOUT = ImageTokenLayout(
    code_ids=torch.arange(10, 26),
    image_start=26,
    image_end=27,
    row_end=28,
    turn_end=29,
    grid_ids=torch.arange(30, 95),
    codes_per_cell=2,  # a 1 x 2-cell image is 2 x 4 codes
)


def test_entropy_to_k_matches_the_rule_worked_by_hand():
    # k = round(1 + 1999 sigmoid(H - 5)): H=0 -> 1 + 1999 * 0.0066929 = 14.38; H=2 -> 95.80; H=4 -> 538.61;
    # H=5 -> 1000.5 (half to even: 1000); H=6 -> 1462.39; H=8 -> 1905.19; H=ln 16384=9.704 -> 1982.05;
    # H is clipped to [0, 10] first: H=12 -> 1 + 1999 sigmoid(5) = 1986.62, H=-1 -> as H=0
    h = torch.tensor([0.0, 2.0, 4.0, 5.0, 6.0, 8.0, math.log(16384), 12.0, -1.0])
    assert entropy_top_k(h).tolist() == [14, 96, 539, 1000, 1462, 1905, 1982, 1987, 14]
    assert entropy_top_k(torch.tensor([3.0]), k_min=5, k_max=10).item() == 6  # 5 + 5 * 0.1192 = 5.60


def test_shannon_entropy_in_nats_ignores_masked_tokens():
    uniform4 = torch.tensor([[0.0, 0.0, 0.0, 0.0, -math.inf]])
    assert shannon_entropy(uniform4).item() == pytest.approx(math.log(4), abs=1e-6)
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    assert shannon_entropy(p.log()[None]).item() == pytest.approx(1.279854, abs=1e-5)  # -sum p ln p by hand


def test_keep_top_k_keeps_ties_with_the_kth_and_works_per_row():
    scores = torch.tensor([[3.0, 2.0, 2.0, 1.0], [0.0, 5.0, 4.0, 3.0]])
    out = keep_top_k(scores, torch.tensor([2, 1]))
    assert torch.isfinite(out).tolist() == [[True, True, True, False], [False, True, False, False]]


def _image_prefix(n_body: int) -> list[int]:
    """Prompt text + a started 1 x 2-cell image (2 rows of 4 codes) with n_body body tokens so far."""
    body = []
    for i in range(n_body):
        body.append(28 if (i + 1) % 5 == 0 else 10 + i % 16)
    return [1, 2, 3, 26, 31, 32, *body]


def test_entropy_top_k_inside_an_image_worked_by_hand():
    # p = (0.4, 0.3, 0.2, 0.1) over four codes: H = 1.27985; with k_max 100, k = round(1 + 99 sigmoid(-3.72015))
    # = round(1 + 99 * 0.023655) = round(3.342) = 3 -> the three most likely codes stay
    scores = torch.full((1, V), -math.inf)
    scores[0, 10:14] = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    proc = EntropyTopKLogitsProcessor(LAYOUT, k_min=1, k_max=100)
    out = proc(torch.tensor([_image_prefix(2)]), scores)
    assert proc.last_k.tolist() == [3]
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [10, 11, 12]
    assert torch.equal(out[0, 10:13], scores[0, 10:13])  # values untouched


def test_text_positions_keep_text_top_k_and_fixed_k_replaces_the_rule():
    scores = torch.randn(1, V)
    text = EntropyTopKLogitsProcessor(LAYOUT, text_top_k=1)(torch.tensor([[1, 2, 3]]), scores.clone())
    assert torch.isfinite(text).sum() == 1 and torch.isfinite(text[0, scores.argmax()])
    fixed = EntropyTopKLogitsProcessor(LAYOUT, fixed_k=5)
    out = fixed(torch.tensor([_image_prefix(1)]), scores.clone())
    assert torch.isfinite(out).sum() == 5 and fixed.last_k.tolist() == [5]
    # a prompt image that has ended is not "inside": its end token balances its start
    closed = torch.tensor([[26, 31, 32, 10, 11, 12, 13, 28, 27, 5]])
    assert torch.isfinite(EntropyTopKLogitsProcessor(LAYOUT)(closed, scores.clone())).sum() == 1


def _allowed(proc, prefix: list[int], prompt: int = 3) -> list[int]:
    out = proc(torch.tensor([prefix]), torch.zeros(1, V))
    return torch.isfinite(out[0]).nonzero().flatten().tolist()


def test_structure_forces_row_ends_the_end_token_and_codes_only_in_between():
    proc = ImageStructureLogitsProcessor(LAYOUT, V, prompt_length=3, grid=None)
    codes = list(range(10, 26))
    assert _allowed(proc, _image_prefix(0)) == codes  # first code
    assert _allowed(proc, _image_prefix(3)) == codes
    assert _allowed(proc, _image_prefix(4)) == [28]  # 4 codes in the row: the row end
    assert _allowed(proc, _image_prefix(5)) == codes  # second row starts
    assert _allowed(proc, _image_prefix(9)) == [28]
    assert _allowed(proc, _image_prefix(10)) == [27]  # 2 rows of 4 + row ends: the end token


def test_structure_grid_tokens_forced_or_limited_and_text_kept_clean():
    forced = ImageStructureLogitsProcessor(LAYOUT, V, prompt_length=3, grid=(1, 2))
    assert _allowed(forced, [1, 2, 3, 26]) == [31]  # 1 cell high
    assert _allowed(forced, [1, 2, 3, 26, 31]) == [32]  # 2 cells wide
    free = ImageStructureLogitsProcessor(LAYOUT, V, prompt_length=3, grid=None)
    assert _allowed(free, [1, 2, 3, 26]) == list(range(31, 95))  # any grid size >= 1
    text = _allowed(free, [1, 2, 3, 4])  # answer text: no codes, no structure, no turn end before the image
    assert text == [*range(10), 26, *range(95, V)]
    done = [1, 2, 3, 26, 31, 32, 10, 11, 12, 13, 28, 14, 15, 16, 17, 28, 27]
    assert _allowed(free, done) == [29]  # the generated image is complete: end the turn
    capped = ImageStructureLogitsProcessor(LAYOUT, V, prompt_length=3, max_text_tokens=2)
    assert _allowed(capped, [1, 2, 3, 4, 5]) == [26]  # two text tokens generated: start the image


class _Recorder(torch.nn.Module):
    """A stand-in LM whose logits are 10 x (the last token id) and which records what it was fed."""

    def __init__(self) -> None:
        super().__init__()
        self.fed: list[list[int]] = []
        self.kwargs: list[dict] = []

    def forward(self, input_ids, **kwargs):
        self.fed.append(input_ids[0].tolist())
        self.kwargs.append(kwargs)
        logits = torch.zeros(1, input_ids.shape[1], V)
        logits[0, :, :] = 10.0 * input_ids[0, -1].float()
        return type("Out", (), {"logits": logits})()


def test_image_cfg_is_s_times_cond_minus_uncond_plus_uncond_on_the_image_branch():
    model = _Recorder()
    cfg = ImageCFGLogitsProcessor(model, LAYOUT, scale=0.8, use_cache=True)
    scores = torch.full((1, V), 3.0)
    assert torch.equal(cfg(torch.tensor([[1, 2, 26, 31]]), scores), scores)  # grid not complete: no CFG
    assert model.fed == []
    out = cfg(torch.tensor([[1, 2, 26, 31, 32]]), scores)
    assert model.fed == [[26, 31, 32]]  # the unconditional branch sees the image from its start only
    uncond = 10.0 * 32
    assert torch.allclose(out, 0.8 * (scores - uncond) + uncond)
    cfg(torch.tensor([[1, 2, 26, 31, 32, 10]]), scores)
    assert model.fed[-1] == [10]  # with the cache, one new token a step
    assert model.kwargs[-1]["cache"] is model.kwargs[0]["cache"]
    cfg(torch.tensor([[1, 2, 26, 31, 32, 10, 27]]), scores)  # the image ended: the branch is dropped
    assert cfg.cache is None and len(model.fed) == 2


def test_image_cfg_scale_one_skips_the_branch_and_batches_are_refused():
    model = _Recorder()
    scores = torch.randn(1, V)
    assert torch.equal(
        ImageCFGLogitsProcessor(model, LAYOUT, 1.0)(torch.tensor([[26, 31, 32]]), scores), scores
    )
    assert model.fed == []
    with pytest.raises(ValueError, match="one sequence at a time"):
        ImageCFGLogitsProcessor(model, LAYOUT, 0.8)(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, V))


def test_image_cfg_without_cache_feeds_the_whole_image_each_step():
    model = _Recorder()
    cfg = ImageCFGLogitsProcessor(model, LAYOUT, 0.8, use_cache=False)
    cfg(torch.tensor([[1, 26, 31, 32]]), torch.zeros(1, V))
    cfg(torch.tensor([[1, 26, 31, 32, 12]]), torch.zeros(1, V))
    assert model.fed == [[26, 31, 32], [26, 31, 32, 12]]
