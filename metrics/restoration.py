"""Image-restoration metrics for PURE: PSNR / SSIM on the Y channel, and a registry of the learned metrics.

PURE (arXiv 2503.11073, Tables 2-3) reports PSNR, SSIM, LPIPS, DISTS, FID, NIQE, MUSIQ, MANIQA, CLIPIQA and TOPIQ.
Its evaluation script is not released; the convention of its line of work (SeeSR, OSEDiff) is pyiqa's: PSNR and
SSIM on the Y channel of BT.601 YCbCr (`test_y_channel=True`), no border crop. Here:

- `rgb_to_y`, `psnr_y`, `ssim_y`: torchmetrics' PSNR and SSIM on Y = 16/255 + (65.481 R + 128.553 G + 24.966 B)/255
  (basicsr's `rgb2ycbcr(y_only=True)`); images in [0, 1]. `RestorationMetrics` accumulates their per-image means.
- `build_metric(name, weights_path)`: the learned metrics, each from the library that maintains it, with its weights
  named explicitly (nothing is downloaded): `clipiqa` (torchmetrics' CLIP-IQA over a local transformers CLIP
  folder), `lpips` and `dists` (torchmetrics; they need torchvision and its VGG/AlexNet weights under
  `<weights_path>/hub/checkpoints/`), `musiq`, `maniqa`, `niqe`, `topiq` (pyiqa, `pretrained_model_path`).
  A missing library or weight file is a `MetricUnavailable` that says what to install or stage. `vif` (torchmetrics'
  visual information fidelity) needs no weights and stands in as the offline perceptual metric.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
    visual_information_fidelity,
)

Y_WEIGHTS = (65.481, 128.553, 24.966)  # BT.601, for RGB in [0, 1] (basicsr rgb2ycbcr)
VIF_MIN_SIZE = 41


def rgb_to_y(img: Tensor) -> Tensor:
    """[B, 3, H, W] RGB in [0, 1] -> [B, 1, H, W] Y in [16/255, 235/255]."""
    if img.ndim != 4 or img.shape[1] != 3:
        raise ValueError(f"expected RGB images [B, 3, H, W], got shape {tuple(img.shape)}")
    w = torch.tensor(Y_WEIGHTS, dtype=img.dtype, device=img.device).view(1, 3, 1, 1)
    return (img * w).sum(1, keepdim=True) / 255.0 + 16.0 / 255.0


def psnr_y(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image PSNR (dB) on Y, [B]: 10 log10(1 / MSE) with data range 1."""
    return peak_signal_noise_ratio(
        rgb_to_y(pred.float()), rgb_to_y(target.float()), data_range=1.0, reduction="none", dim=(1, 2, 3)
    )


def ssim_y(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image SSIM on Y, [B] (Gaussian window 11, sigma 1.5, data range 1)."""
    return structural_similarity_index_measure(
        rgb_to_y(pred.float()), rgb_to_y(target.float()), data_range=1.0, reduction="none"
    )


def vif(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image visual information fidelity on Y (pixel-domain VIF, torchmetrics), [B]; NaN below 41 x 41 px."""
    y_pred, y_target = rgb_to_y(pred.float()), rgb_to_y(target.float())
    if min(pred.shape[-2:]) < VIF_MIN_SIZE:  # its largest Gaussian window
        return torch.full((len(pred),), float("nan"), device=pred.device)
    return torch.stack([visual_information_fidelity(p[None], t[None]) for p, t in zip(y_pred, y_target)])


class RestorationMetrics(Metric):
    """Means over images of PSNR-Y, SSIM-Y and VIF-Y; `compute()` -> {"psnr", "ssim", "vif", "count"}."""

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("psnr", "ssim", "vif", "count"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch of restored images and their references ([B, 3, H, W] in [0, 1])."""
        pred, target = pred.detach().clamp(0, 1), target.detach()
        self.psnr += psnr_y(pred, target).double().sum()
        self.ssim += ssim_y(pred, target).double().sum()
        self.vif += vif(pred, target).double().sum()
        self.count += len(pred)

    def compute(self) -> dict[str, Tensor]:
        """The means (NaN with no images)."""
        n = self.count
        return {"psnr": self.psnr / n, "ssim": self.ssim / n, "vif": self.vif / n, "count": n}


# --------------------------------------------------------------------------- learned metrics


class MetricUnavailable(RuntimeError):
    """A metric whose library or weights are not here (the message says what to install or stage)."""


def _need(module: str, metric: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MetricUnavailable(f"metric {metric!r} needs the {module!r} package: {install}")


def _need_file(path: Path, metric: str, what: str) -> None:
    if not path.exists():
        raise MetricUnavailable(f"metric {metric!r}: {what} not found at {path} (nothing is downloaded)")


def _clipiqa(weights_path: Path) -> Callable[[Tensor], Tensor]:
    """torchmetrics CLIP-IQA ("Good photo." vs "Bad photo.") over a local transformers CLIP folder."""
    _need("transformers", "clipiqa", "pip install transformers")
    _need_file(
        weights_path / "config.json",
        "clipiqa",
        "a transformers CLIP folder (config.json, weights, processor)",
    )
    from torchmetrics.multimodal import CLIPImageQualityAssessment

    metric = CLIPImageQualityAssessment(model_name_or_path=str(weights_path), data_range=1.0)
    return lambda images: metric(images.float().clamp(0, 1)).flatten()


TORCHVISION_WEIGHTS = {"lpips": "alexnet-owt-7be5be79.pth", "dists": "vgg16-397923af.pth"}


def _torchvision_metric(name: str, weights_path: Path) -> Callable[[Tensor, Tensor], Tensor]:
    """torchmetrics LPIPS (AlexNet) / DISTS (VGG16), whose backbones torchvision loads from $TORCH_HOME."""
    _need(
        "torchvision",
        name,
        "torchvision is not a dependency of this suite; install it where you run this metric",
    )
    _need_file(
        weights_path / "hub" / "checkpoints" / TORCHVISION_WEIGHTS[name], name, "the torchvision backbone"
    )
    import os

    os.environ["TORCH_HOME"] = str(weights_path)
    if name == "lpips":
        from torchmetrics.image import LearnedPerceptualImagePatchSimilarity

        lpips = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True, reduction="mean")
        return lambda pred, target: torch.stack([lpips(p[None], t[None]) for p, t in zip(pred, target)])
    from torchmetrics.image import DeepImageStructureAndTextureSimilarity

    dists = DeepImageStructureAndTextureSimilarity(reduction="none")
    return lambda pred, target: dists(pred, target)


def _pyiqa_metric(name: str, weights_path: Path) -> Callable[..., Tensor]:
    """pyiqa's implementation (musiq, maniqa-pipal, niqe, topiq_nr) with its checkpoint given explicitly."""
    _need("pyiqa", name, "pip install pyiqa (it also needs torchvision)")
    _need_file(weights_path, name, "the metric's checkpoint")
    import pyiqa

    pyiqa_name = {"maniqa": "maniqa-pipal", "topiq": "topiq_nr"}.get(name, name)
    metric = pyiqa.create_metric(pyiqa_name, as_loss=False, pretrained_model_path=str(weights_path))
    return lambda images: metric(images.float().clamp(0, 1)).flatten()


METRICS: dict[str, tuple[str, Callable[[str, Path], Callable[..., Tensor]]]] = {
    "clipiqa": ("no-reference", lambda name, path: _clipiqa(path)),
    "lpips": ("full-reference", _torchvision_metric),
    "dists": ("full-reference", _torchvision_metric),
    "musiq": ("no-reference", _pyiqa_metric),
    "maniqa": ("no-reference", _pyiqa_metric),
    "niqe": ("no-reference", _pyiqa_metric),
    "topiq": ("no-reference", _pyiqa_metric),
}


def build_metric(name: str, weights_path: str | Path | None) -> Callable[..., Tensor]:
    """A learned metric as a function of images in [0, 1] ([B, 3, H, W]; full-reference ones take (pred, target)).

    Returns per-image scores [B]. A KeyError lists the known names; a `MetricUnavailable` says what is missing.
    """
    if name not in METRICS:
        raise KeyError(f"unknown metric {name!r}; choose from {', '.join(sorted(METRICS))}")
    if weights_path is None:
        raise MetricUnavailable(f"metric {name!r} needs an explicit weights_path (nothing is downloaded)")
    return METRICS[name][1](name, Path(weights_path))
