"""FID/KID with an explicit feature extractor: a hand-worked FID, the tiny encoder at any size, clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from metrics.distribution import (
    TinyEncoder,
    build_feature_extractor,
    distribution_metrics,
    fit_tiny_encoder,
    info_nce,
)


class MeanColour(nn.Module):
    """Features = the mean of each channel in [0, 1] (so the FID can be worked by hand)."""

    num_features = 3

    def forward(self, images):
        assert images.is_floating_point()  # torchmetrics hands a custom extractor the [0, 1] images as given
        return images.mean(dim=(2, 3)).double()


def constant(values):
    """One 8x8 image per red value (green and blue 0), in [0, 1]."""
    out = torch.zeros(len(values), 3, 8, 8)
    out[:, 0] = torch.tensor(values)[:, None, None]
    return out


def test_fid_of_a_shifted_set_is_the_squared_shift():
    # equal covariances: FID = ||mu_1 - mu_2||² + Tr(S + S - 2 S) = (51/255)² = 0.04
    fid, kid = distribution_metrics(MeanColour(), kid_subset_size=4)
    real = constant([51 / 255, 102 / 255, 153 / 255, 204 / 255])
    fake = constant([102 / 255, 153 / 255, 204 / 255, 1.0])
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    assert float(fid.compute()) == pytest.approx(0.04, abs=1e-6)
    kid_mean, _ = kid.compute()
    assert float(kid_mean) > 0


def test_identical_sets_have_zero_fid_with_the_tiny_encoder():
    torch.manual_seed(0)
    fid, _ = distribution_metrics(build_feature_extractor("tiny"), kid_subset_size=4)
    images = torch.rand(80, 3, 32, 32)
    fid.update(images, real=True)
    fid.update(images, real=False)
    assert abs(float(fid.compute())) < 1e-2
    assert TinyEncoder()(torch.zeros(2, 3, 48, 32, dtype=torch.uint8)).shape == (2, 64)


def test_missing_weights_are_named():
    with pytest.raises(FileNotFoundError, match=r"clip.*weights_path='nowhere'"):
        build_feature_extractor("clip", "nowhere")
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        build_feature_extractor("tiny", "nope.safetensors")
    with pytest.raises(ValueError, match="choose tiny, clip or inception"):
        build_feature_extractor("vgg")


def test_info_nce_by_hand():
    # a = b = [e1, e2], T = 1: logits [[1, 0], [0, 1]], each row's CE = -log(e / (e + 1)) = log(1 + 1/e)
    eye = torch.eye(2)
    assert float(info_nce(eye, eye, temperature=1.0)) == pytest.approx(math.log(1 + math.exp(-1)))


def test_the_tiny_encoder_trains_in_the_suite_deterministically():
    # 8 images of distinct colours and stripe positions: the contrastive loss falls well below chance (log 8)
    images = []
    for i in range(8):
        image = torch.zeros(3, 16, 16)
        image[i % 3] = 0.2 + 0.08 * i
        image[:, :, 2 * i : 2 * i + 2] = 1.0
        images.append(image)
    encoder, loss = fit_tiny_encoder(images, steps=20, batch_size=8, size=16, seed=3)
    again, _ = fit_tiny_encoder(images, steps=20, batch_size=8, size=16, seed=3)
    assert loss < 0.5 * math.log(8), loss
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), again.state_dict().values()))
    seeded = build_feature_extractor("tiny", seed=3)
    assert not all(
        torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), seeded.state_dict().values())
    )
    with pytest.raises(ValueError, match="at least 2 images"):
        fit_tiny_encoder(images[:1])
