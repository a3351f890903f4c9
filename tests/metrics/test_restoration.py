"""PSNR / SSIM on the Y channel (pyiqa's convention) and the registry of learned metrics with explicit weights."""

from __future__ import annotations

import math

import pytest
import torch

from metrics.restoration import MetricUnavailable, RestorationMetrics, build_metric, psnr_y, rgb_to_y, ssim_y


def test_y_is_bt601_studio_swing():
    black, white = torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)
    assert rgb_to_y(black).flatten()[0].item() == pytest.approx(16 / 255)
    assert rgb_to_y(white).flatten()[0].item() == pytest.approx(
        (16 + 219.0) / 255, abs=1e-6
    )  # 65.481+128.553+24.966
    red = torch.zeros(1, 3, 1, 1)
    red[0, 0] = 1.0
    assert rgb_to_y(red).item() == pytest.approx((16 + 65.481) / 255)


def test_psnr_y_worked_by_hand():
    # a grey offset of d in every channel moves Y by d * 219/255: MSE = (d * 219/255)^2
    target = torch.full((2, 3, 8, 8), 0.5)
    pred = target.clone()
    pred[0] += 0.1
    pred[1] -= 0.02
    expected = [10 * math.log10(1 / (d * 219 / 255) ** 2) for d in (0.1, 0.02)]
    assert psnr_y(pred, target).tolist() == pytest.approx(expected, abs=1e-3)


def test_ssim_y_is_one_for_identical_images_and_lower_for_noise():
    img = torch.rand(2, 3, 32, 32)
    assert ssim_y(img, img).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    assert (ssim_y((img + 0.2 * torch.randn_like(img)).clamp(0, 1), img) < 0.9).all()


def test_restoration_metrics_average_per_image():
    metric = RestorationMetrics()
    target = torch.full((2, 3, 48, 48), 0.5)
    metric.update(target + 0.1, target)
    metric.update((target - 0.02)[:1], target[:1])
    values = metric.compute()
    psnr = [10 * math.log10(1 / (d * 219 / 255) ** 2) for d in (0.1, 0.1, 0.02)]
    assert values["count"].item() == 3 and values["psnr"].item() == pytest.approx(sum(psnr) / 3, abs=1e-3)
    small = RestorationMetrics()
    small.update(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))
    assert math.isnan(small.compute()["vif"].item())  # VIF needs 41 px


def test_learned_metrics_need_their_weights_named_and_say_what_is_missing(tmp_path):
    with pytest.raises(KeyError, match="choose from clipiqa, dists, lpips"):
        build_metric("fid", tmp_path)
    with pytest.raises(MetricUnavailable, match="explicit weights_path"):
        build_metric("musiq", None)
    with pytest.raises(MetricUnavailable, match="transformers CLIP folder"):
        build_metric("clipiqa", tmp_path / "clip")
    for name in ("lpips", "dists", "musiq", "maniqa", "niqe", "topiq"):
        with pytest.raises(MetricUnavailable, match=f"metric '{name}'"):
            build_metric(name, tmp_path)
