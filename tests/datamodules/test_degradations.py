"""Real-ESRGAN's second-order degradation with SeeSR's settings: kernels by hand, the pipeline, the labels."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datamodules.degradations import (
    BLUR_THRESHOLDS,
    NOISE_THRESHOLDS,
    DegradationSettings,
    Kernel,
    Noise,
    add_noise,
    blur_amount,
    degradation_label,
    degrade,
    filter2d,
    kernel_array,
    kernel_spread,
    level,
    noise_amount,
    sample_degradation,
)


def test_isotropic_gaussian_kernel_worked_by_hand():
    # 3 x 3, sigma 1: weights exp(-r^2 / 2) = 1 (centre), e^-0.5 (edges), e^-1 (corners), normalised
    k = kernel_array(Kernel("iso", 3, sigma_x=1.0), pad_to=3)
    total = 1 + 4 * math.exp(-0.5) + 4 * math.exp(-1)
    assert k[1, 1] == pytest.approx(1 / total) and k[0, 1] == pytest.approx(math.exp(-0.5) / total)
    assert k[0, 0] == pytest.approx(math.exp(-1) / total) and k.sum() == pytest.approx(1.0)
    assert kernel_array(Kernel("iso", 7, sigma_x=1.0)).shape == (21, 21)  # padded to Real-ESRGAN's 21


def test_anisotropic_plateau_generalised_and_sinc_kernels():
    # aniso rotated by 90 degrees swaps the axes
    a = kernel_array(Kernel("aniso", 9, sigma_x=2.0, sigma_y=0.5, theta=0.0), pad_to=9)
    b = kernel_array(Kernel("aniso", 9, sigma_x=2.0, sigma_y=0.5, theta=math.pi / 2), pad_to=9)
    assert np.allclose(a, b.T, atol=1e-12) and a[4, 8] > a[8, 4]  # wide along x (columns)
    # plateau, beta 1, sigma 1: 1 / (1 + r^2): centre 1, edge 1/2 before normalising
    p = kernel_array(Kernel("plateau_iso", 3, sigma_x=1.0, beta=1.0), pad_to=3)
    assert p[0, 1] / p[1, 1] == pytest.approx(0.5)
    # generalised Gaussian with beta 1 is the Gaussian
    g = kernel_array(Kernel("generalized_iso", 5, sigma_x=1.3, beta=1.0), pad_to=5)
    assert np.allclose(g, kernel_array(Kernel("iso", 5, sigma_x=1.3), pad_to=5))
    # sinc: omega_c J1(omega_c r) / (2 pi r); the centre omega_c^2 / (4 pi) is the limit r -> 0
    from scipy.special import j1

    s = kernel_array(Kernel("sinc", 7, omega_c=math.pi / 2), pad_to=7)
    w = math.pi / 2
    assert s[3, 4] / s[3, 3] == pytest.approx((w * j1(w) / (2 * math.pi)) / (w**2 / (4 * math.pi)))


def test_kernel_spread_is_the_gaussian_sigma():
    assert kernel_spread(Kernel("iso", 21, sigma_x=1.5)) == pytest.approx(1.5, rel=1e-3)
    assert kernel_spread(None) == 0.0


def test_filter2d_is_basicsr_reflect_padded_correlation():
    img = torch.rand(3, 12, 10)
    kernel = np.random.default_rng(0).random((5, 5))
    padded = F.pad(img[None], (2, 2, 2, 2), mode="reflect")
    direct = F.conv2d(padded, torch.tensor(kernel, dtype=torch.float32).expand(3, 1, 5, 5), groups=3)[0]
    assert torch.allclose(filter2d(img, kernel), direct, atol=1e-5)


def test_degrade_is_x4_8_bit_and_fixed_by_its_parameters():
    hq = torch.rand(3, 64, 48)
    d = sample_degradation(np.random.default_rng(3))
    lq = degrade(hq, d)
    assert lq.shape == (3, 16, 12)
    assert torch.allclose(lq * 255, (lq * 255).round(), atol=1e-4)
    assert torch.equal(lq, degrade(hq, d))  # the noise comes from the parameters' own seed
    other = sample_degradation(np.random.default_rng(4))
    assert not torch.equal(lq, degrade(hq, other))
    with pytest.raises(ValueError, match="smaller than the scale"):
        degrade(torch.rand(3, 2, 2), d)


def test_noise_has_the_drawn_strength():
    gen = torch.Generator().manual_seed(0)
    flat = torch.full((3, 128, 128), 0.5)
    gaussian = add_noise(flat, Noise("gaussian", 10.0, gray=False), gen) - flat
    assert gaussian.std().item() * 255 == pytest.approx(10.0, rel=0.05)
    grey = add_noise(flat, Noise("gaussian", 10.0, gray=True), gen) - flat
    assert torch.equal(grey[0], grey[1])  # grey noise is the same in every channel
    # Poisson at 0.5 with 2 distinct values -> v = 2: std of Poisson(1)/2 is 0.5, times the scale 0.1
    two = flat.clone()
    two[:, 0, 0] = 0.0
    shot = add_noise(two, Noise("poisson", 0.1, gray=False), gen) - two
    assert shot[:, 1:].std().item() == pytest.approx(0.05, rel=0.1)


def test_the_default_settings_are_seesr_and_overrides_are_checked():
    s = DegradationSettings()
    assert (s.noise_range, s.jpeg_range, s.final_sinc_prob, s.kernel2.sigma) == (
        (1, 15),
        (60, 95),
        0.8,
        (0.2, 1.5),
    )
    assert (
        DegradationSettings.from_dict(
            {"noise_range": [1, 5], "kernel2": {"sinc_prob": 0.0}}
        ).kernel2.sinc_prob
        == 0
    )
    with pytest.raises(ValueError, match="unknown degradation setting"):
        DegradationSettings.from_dict({"noise_rnage": [1, 5]})


def test_labels_split_the_default_draws_into_thirds():
    rng = np.random.default_rng(11)
    draws = [sample_degradation(rng) for _ in range(1500)]
    blur = Counter(level(blur_amount(d), BLUR_THRESHOLDS) for d in draws)
    noise = Counter(level(noise_amount(d), NOISE_THRESHOLDS) for d in draws)
    for counts in (blur, noise):
        assert all(abs(counts[k] / 1500 - 1 / 3) < 0.05 for k in ("small", "medium", "large")), counts
    label = degradation_label(draws[0])
    assert label.split(", ")[0].split()[1] == "blur" and label.endswith(" noise") and label[0].isupper()


def test_level_thresholds_are_inclusive_from_below():
    assert [level(v, (2.0, 4.0)) for v in (1.99, 2.0, 3.99, 4.0)] == ["small", "medium", "medium", "large"]
