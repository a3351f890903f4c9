"""Rectified-flow math: each function against a value worked by hand, and the schedule against diffusers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from lightning_modules.components.flow import (
    cfg,
    euler_step,
    interpolate,
    predicted_x0,
    resolution_shift,
    sample_sigmas,
    sigma_schedule,
    time_shift,
    true_cfg,
    velocity,
)


def test_interpolate_and_velocity_by_hand():
    x0, eps = torch.tensor([2.0]), torch.tensor([-1.0])
    assert interpolate(x0, eps, 0.25).item() == pytest.approx(0.75 * 2 + 0.25 * -1)  # 1.25
    assert velocity(x0, eps).item() == -3.0
    # one sigma per sample: sigma 0 is the data, sigma 1 the noise
    x0, eps = torch.ones(2, 3, 2, 2), -torch.ones(2, 3, 2, 2)
    out = interpolate(x0, eps, torch.tensor([0.0, 1.0]))
    assert torch.equal(out[0], x0[0]) and torch.equal(out[1], eps[1])


def test_time_shift_by_hand():
    # shift 3: 0.5 -> 1.5 / 2 = 0.75; 0.25 -> 0.75 / 1.5 = 0.5; shift 1 is the identity; the ends stay put
    assert time_shift(torch.tensor([0.5, 0.25, 0.0, 1.0]), 3.0).tolist() == pytest.approx(
        [0.75, 0.5, 0.0, 1.0]
    )
    assert time_shift(torch.tensor(0.3), 1.0).item() == pytest.approx(0.3)


def test_resolution_shift_unipic3_line():
    # mu(256) = 0.5, mu(8192) = 0.9, halfway (4224 tokens) 0.7, and the line extrapolates below 256
    got = resolution_shift(torch.tensor([256.0, 8192.0, 4224.0, 0.0]))
    slope = 0.4 / (8192 - 256)
    expected = [math.exp(0.5), math.exp(0.9), math.exp(0.7), math.exp(0.5 - 256 * slope)]
    assert got.tolist() == pytest.approx(expected, rel=1e-6)


def test_sample_sigmas_degenerate_and_median():
    g = torch.Generator().manual_seed(0)
    # std 0: sigma = sigmoid(mean) exactly, then shifted per sample (0.5 under shift 3 -> 0.75)
    assert sample_sigmas(2, g, mean=1.0, std=0.0).tolist() == pytest.approx([1 / (1 + math.exp(-1))] * 2)
    assert sample_sigmas(2, g, std=0.0, shift=torch.tensor([1.0, 3.0])).tolist() == pytest.approx([0.5, 0.75])
    # the shift is monotone, so the median of the logit-normal (0.5) maps to time_shift(0.5, 3) = 0.75
    draws = sample_sigmas(20000, g, shift=3.0)
    assert draws.median().item() == pytest.approx(0.75, abs=0.01)
    assert draws.min() > 0 and draws.max() < 1 and draws.dtype == torch.float32


def test_sample_sigmas_same_generator_state_same_draw():
    a = sample_sigmas(4, torch.Generator().manual_seed(7))
    b = sample_sigmas(4, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_sigma_schedule_by_hand():
    assert sigma_schedule(4).tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    # shift 3: linspace(1, 1/2, 2) = [1, 0.5] -> [1, 0.75], then 0
    assert sigma_schedule(2, 3.0).tolist() == pytest.approx([1.0, 0.75, 0.0])
    per_sample = sigma_schedule(2, torch.tensor([1.0, 3.0]))
    assert per_sample.shape == (2, 3)
    assert per_sample.tolist() == [pytest.approx([1.0, 0.5, 0.0]), pytest.approx([1.0, 0.75, 0.0])]


@pytest.mark.parametrize("shift", [1.0, 3.0, math.exp(0.7)])
def test_sigma_schedule_matches_diffusers_scheduler(shift):
    steps = 8
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=math.log(shift))
    assert torch.allclose(sigma_schedule(steps, shift), sched.sigmas, atol=1e-6)
    static = FlowMatchEulerDiscreteScheduler(shift=shift)
    static.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
    assert torch.allclose(sigma_schedule(steps, shift), static.sigmas, atol=1e-6)


def test_sd3_grid_and_shift_terminal_by_hand():
    # SD3 pipeline: the scheduler's own grid linspace(1, sigma_min, N), sigma_min = the shifted training minimum
    # shift(1/1000) = 3 * 0.001 / (1 + 2 * 0.001) = 0.0029940; the grid is shifted again:
    # [1, 0.0029940] -> [1, 3 * 0.0029940 / (1 + 2 * 0.0029940)] = [1, 0.0089286], then 0
    assert sigma_schedule(2, 3.0, grid="sd3").tolist() == pytest.approx([1.0, 0.0089286, 0.0], abs=1e-6)
    # Qwen-Image's shift_terminal: 1 - sigma stretched so the last nonzero sigma is the terminal:
    # [1, 0.5] -> one_minus [0, 0.5], scale 0.5 / 0.98 -> [1, 1 - 0.98] = [1, 0.02], then 0
    assert sigma_schedule(2, 1.0, terminal=0.02).tolist() == pytest.approx([1.0, 0.02, 0.0])
    per_sample = sigma_schedule(2, torch.tensor([1.0, 3.0]), grid="sd3")
    assert per_sample[1].tolist() == pytest.approx([1.0, 0.0089286, 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="grid='karras'"):
        sigma_schedule(2, grid="karras")


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sd3_grid_matches_the_sd3_pipeline_scheduler(shift):
    steps = 28
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)  # what StableDiffusion3Pipeline does (no sigmas passed)
    assert torch.allclose(sigma_schedule(steps, shift, grid="sd3"), sched.sigmas, atol=1e-6)


@pytest.mark.parametrize("shift", [1.0, math.exp(0.7)])
def test_shift_terminal_matches_the_qwen_image_scheduler(shift):
    steps = 8
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift_terminal=0.02)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=math.log(shift))
    assert torch.allclose(sigma_schedule(steps, shift, terminal=0.02), sched.sigmas, atol=1e-6)


def test_euler_step_by_hand_and_against_scheduler():
    # x' = x + (sigma' - sigma) v = 1 + (0.25 - 0.5) * 2 = 0.5
    assert euler_step(torch.tensor([1.0]), torch.tensor([2.0]), 0.5, 0.25).item() == pytest.approx(0.5)
    g = torch.Generator().manual_seed(0)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4))
    x, ours = torch.randn(1, 4, 3, 3, generator=g), None
    ours = x.clone()
    sigmas = sigma_schedule(4, 3.0)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(1, 4, 3, 3, generator=g)
        x = sched.step(v, t, x).prev_sample
        ours = euler_step(ours, v, sigmas[i], sigmas[i + 1])
    assert torch.allclose(ours, x, atol=1e-6)


def test_euler_recovers_x0_on_a_straight_path_in_fp32():
    # the exact velocity eps - x0 is constant along the path, so Euler lands on x0 whatever the schedule
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    x, sigmas = eps.to(torch.bfloat16), sigma_schedule(5, 3.0)
    for i in range(5):
        x = euler_step(x, velocity(x0, eps), sigmas[i], sigmas[i + 1])
        assert x.dtype == torch.float32
    assert torch.allclose(x, x0, atol=1e-2)  # only the bf16 start is rounded
    xs = interpolate(x0, eps, 0.3)
    assert torch.allclose(predicted_x0(xs, velocity(x0, eps), 0.3), x0, atol=1e-6)


def test_cfg_by_hand():
    u, c = torch.tensor([1.0]), torch.tensor([3.0])
    assert cfg(u, c, 4.0).item() == 9.0  # 1 + 4 (3 - 1)
    assert cfg(u, c, 1.0).item() == 3.0  # scale 1 is the conditional prediction
    assert cfg(u, c, 0.0).item() == 1.0


def test_true_cfg_norm_rescale_per_pixel_by_hand():
    # channels (dim -3): pos = (1, 0), neg = (0, 1), scale 2 -> (2, -1), |.| = sqrt 5; |pos| = 1
    pos, neg = torch.tensor([1.0, 0.0])[:, None, None], torch.tensor([0.0, 1.0])[:, None, None]
    assert true_cfg(neg, pos, 2.0).flatten().tolist() == [2.0, -1.0]
    rescaled = true_cfg(neg, pos, 2.0, norm_rescale=True).flatten()
    assert rescaled.tolist() == pytest.approx([2 / math.sqrt(5), -1 / math.sqrt(5)])


def test_true_cfg_norm_rescale_per_2x2_token_by_hand():
    # one channel, one 2x2 token: combined = neg + 2 (pos - neg) = [[2, 0], [0, -1]], token norm sqrt 5;
    # pos's token norm is 1, so the whole token is divided by sqrt 5 (per pixel it would give 0/0 and 1)
    pos = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    neg = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])
    got = true_cfg(neg, pos, 2.0, norm_rescale=True, patch=2)
    expected = torch.tensor([[[2.0, 0.0], [0.0, -1.0]]]) / math.sqrt(5)
    assert torch.allclose(got, expected)
    per_pixel = true_cfg(neg, pos, 2.0, norm_rescale=True, patch=1)
    assert per_pixel.flatten().tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])  # zero tokens stay zero
