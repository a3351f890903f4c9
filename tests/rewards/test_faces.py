"""The ArcFace face weight: IResNet weights from a path, faces found with or without a detector, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rewards.faces import FaceMatcher, IResNet

TINY = {"layers": (1, 1, 1, 1), "widths": (8, 8, 16, 16), "num_features": 32}


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(0)
    net = IResNet(**TINY).eval()
    path = tmp_path / "arcface.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "backbone.pth"
    )
    return path


def faces(seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)


def test_the_pasted_source_face_matches_best_without_a_detector(weights):
    matcher = FaceMatcher(str(weights), **TINY, device="cpu", window_scales=(1.0, 0.6))
    face, other = faces(0), faces(1)
    canvas = np.full((112, 224, 3), 200, np.uint8)
    canvas[:, 112:224] = face  # the source face, at one of the full-height windows
    (same,) = matcher([face], canvas)
    (different,) = matcher([other], canvas)
    assert same == pytest.approx(1.0, abs=1e-5) and different < same


def test_a_pth_state_dict_with_a_module_prefix_loads_the_same(weights):
    a = FaceMatcher(str(weights), **TINY, device="cpu")
    b = FaceMatcher(str(weights.parent / "backbone.pth"), **TINY, device="cpu")
    crop = [faces(3)]
    assert torch.equal(a.embed(crop), b.embed(crop))


def test_missing_or_onnx_weights_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ArcFace weights not found at .*nowhere\.pth"):
        FaceMatcher(str(tmp_path / "nowhere.pth"), **TINY).load()
    onnx = tmp_path / "w600k_r50.onnx"
    onnx.write_bytes(b"onnx")
    with pytest.raises(ValueError, match="ONNX"):
        FaceMatcher(str(onnx), **TINY).load()


def test_with_a_detector_an_undetected_source_face_zeroes_every_face(weights):
    def detector(image):
        return [] if image.mean() < 10 else [[0, 0, image.shape[1], image.shape[0]]]

    matcher = FaceMatcher(str(weights), **TINY, device="cpu", detector=detector)
    blank = np.zeros((112, 112, 3), np.uint8)
    assert matcher([faces(0), blank], faces(0)) == [0.0, 0.0]
    assert matcher([faces(0)], faces(0))[0] == pytest.approx(1.0, abs=1e-5)
