"""FID and KID of generated images with an explicit feature extractor (UniPic 3.0's few-step students vs teacher).

torchmetrics' `FrechetInceptionDistance` / `KernelInceptionDistance` take any `nn.Module` as the feature
extractor; here the module is always named, never downloaded:

- "tiny": `TinyEncoder`, a small convolutional encoder (random init, or its weights from a safetensors file) for
  the embedded CPU default, where Inception features of 32-px synthetic images would say little;
- "clip": the vision tower of a local transformers CLIP folder (`weights_path`), pooled output;
- "inception": torchmetrics' Inception-v3 (needs `torch-fidelity` and its weights file at `weights_path`).

A missing library or weight path is a `FileNotFoundError` / `ImportError` that says what to stage.
`distribution_metrics(extractor)` returns a FID and a KID metric sharing the extractor; both take images in
[0, 1] (`normalize=True`); torchmetrics hands a custom extractor those float images as they are (its own
Inception gets uint8), so each extractor here takes either.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance


class TinyEncoder(nn.Module):
    """uint8 [N, 3, H, W] -> [N, num_features]: three strided convs, GELU, global average pooling (any size)."""

    def __init__(self, width: int = 32, num_features: int = 64) -> None:
        super().__init__()
        self.num_features = num_features
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, 2, 1),
            nn.GELU(),
            nn.Conv2d(width, num_features, 3, 2, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, images: Tensor) -> Tensor:
        """Features of uint8 (or [0, 1] float) images, fp32."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return self.net(x * 2 - 1)


class ClipFeatures(nn.Module):
    """The pooled output of a local transformers CLIP vision tower, on uint8 images resized to its input size."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        self.model = CLIPVisionModelWithProjection.from_pretrained(str(path)).eval()
        cfg = self.model.config
        self.size = cfg.image_size
        self.num_features = cfg.projection_dim
        self.register_buffer("mean", torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Image embeddings [N, projection_dim] (fp32)."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        return self.model(pixel_values=(x - self.mean) / self.std).image_embeds.float()


def build_feature_extractor(kind: str = "tiny", weights_path: str | Path | None = None) -> nn.Module:
    """The named feature extractor (module doc); clear errors when its library or weights are missing."""
    if kind == "tiny":
        encoder = TinyEncoder()
        if weights_path is not None:
            from safetensors.torch import load_file

            path = Path(weights_path)
            if not path.is_file():
                raise FileNotFoundError(f"feature extractor 'tiny': weights file {path} does not exist")
            encoder.load_state_dict(load_file(str(path)))
        return encoder.eval()
    if kind in ("clip", "inception"):
        if weights_path is None or not Path(weights_path).exists():
            raise FileNotFoundError(
                f"feature extractor {kind!r} needs its weights staged locally: weights_path={weights_path!r} does not "
                f"exist ({'a transformers CLIP folder' if kind == 'clip' else 'the FID Inception-v3 .pth file'})"
            )
        if kind == "clip":
            return ClipFeatures(weights_path)
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "feature extractor 'inception' needs torch-fidelity (pip install torch-fidelity)"
            ) from err
        return NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=str(weights_path),
        )
    raise ValueError(f"feature extractor {kind!r}: choose tiny, clip or inception")


def distribution_metrics(
    extractor: nn.Module, kid_subset_size: int = 50
) -> tuple[FrechetInceptionDistance, KernelInceptionDistance]:
    """(FID, KID) over `extractor`'s features; `update(images in [0, 1], real=...)`, then `compute()`."""
    fid = FrechetInceptionDistance(feature=extractor, normalize=True)
    kid = KernelInceptionDistance(feature=extractor, subset_size=kid_subset_size, normalize=True)
    return fid, kid
