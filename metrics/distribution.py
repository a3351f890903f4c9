"""FID and KID of generated images with an explicit feature extractor (UniPic 3.0's few-step students vs teacher).

torchmetrics' `FrechetInceptionDistance` / `KernelInceptionDistance` take any `nn.Module` as the feature
extractor; here the module is always named, never downloaded:

- "tiny": `TinyEncoder`, a small convolutional encoder for the embedded CPU default, where Inception features of
  32-px synthetic images would say little: its weights from a safetensors file, or trained in the suite on the
  run's own target images (`fit_tiny_encoder`: contrastive, two augmented views of each image must find each
  other among the batch, InfoNCE), or (neither) a seeded random init;
- "clip": the vision tower of a local transformers CLIP folder (`weights_path`), pooled output;
- "inception": torchmetrics' Inception-v3 (needs `torch-fidelity` and its weights file at `weights_path`).

A missing library or weight path is a `FileNotFoundError` / `ImportError` that says what to stage.
`distribution_metrics(extractor)` returns a FID and a KID metric sharing the extractor; both take images in
[0, 1] (`normalize=True`); torchmetrics hands a custom extractor those float images as they are (its own
Inception gets uint8), so each extractor here takes either. `DistributionScores` accumulates generated and
target images of any sizes in [-1, 1] over an evaluation (the few-step distillation modules' `val/fid`, `val/kid`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
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


def augmented_view(image: Tensor, size: int, gen: torch.Generator) -> Tensor:
    """A random crop (60-100 % of each side), flip and brightness (x0.8-1.2) of a [3, H, W] image in [0, 1], at size²."""
    _, h, w = image.shape
    scale = 0.6 + 0.4 * float(torch.rand((), generator=gen))
    ch, cw = max(1, round(h * scale)), max(1, round(w * scale))
    top = int(torch.randint(h - ch + 1, (), generator=gen))
    left = int(torch.randint(w - cw + 1, (), generator=gen))
    crop = image[None, :, top : top + ch, left : left + cw]
    view = nn.functional.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0]
    if float(torch.rand((), generator=gen)) < 0.5:
        view = view.flip(-1)
    return (view * (0.8 + 0.4 * float(torch.rand((), generator=gen)))).clamp(0, 1)


def info_nce(a: Tensor, b: Tensor, temperature: float = 0.2) -> Tensor:
    """Symmetric InfoNCE of paired rows: CE(cos(a_i, b_j) / T, j = i), averaged over both directions (fp32)."""
    a, b = nn.functional.normalize(a.float(), dim=1), nn.functional.normalize(b.float(), dim=1)
    logits = a @ b.T / temperature
    labels = torch.arange(len(a), device=a.device)
    return 0.5 * (nn.functional.cross_entropy(logits, labels) + nn.functional.cross_entropy(logits.T, labels))


def fit_tiny_encoder(
    images: Iterable[Tensor],
    steps: int = 200,
    batch_size: int = 32,
    size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
) -> tuple[TinyEncoder, float]:
    """Train a `TinyEncoder` on images in [0, 1] ([3, H, W], any sizes; a pool drawn from with replacement):
    two augmented views of each image of a batch must match each other (`info_nce` over a linear projection,
    dropped after). Returns the encoder (eval mode, frozen) and the last loss. Seeded: the same images and
    seed give the same encoder."""
    pool = [im.detach().float().cpu() for im in images]
    if len(pool) < 2:
        raise ValueError(f"fit_tiny_encoder needs at least 2 images, got {len(pool)}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = TinyEncoder()
        head = nn.Linear(encoder.num_features, encoder.num_features)
    optimizer = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=lr)
    loss = torch.tensor(math.nan)
    encoder.train()
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randperm(len(pool), generator=gen)[:batch_size]  # distinct images: one positive each
            views = [torch.stack([augmented_view(pool[int(i)], size, gen) for i in idx]) for _ in range(2)]
            loss = info_nce(head(encoder(views[0])), head(encoder(views[1])))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return encoder.eval().requires_grad_(False), float(loss.detach())


def build_feature_extractor(
    kind: str = "tiny", weights_path: str | Path | None = None, seed: int = 0
) -> nn.Module:
    """The named feature extractor (module doc); clear errors when its library or weights are missing.

    The tiny encoder without a weights file is initialised from `seed` (global RNG untouched), so every run and
    every model is measured with the same features.
    """
    if kind == "tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
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


class DistributionScores:
    """FID and KID of generated vs target images accumulated over an evaluation, with a named feature extractor.

    Not an `nn.Module` (a LightningModule holding it keeps it out of its state dict, optimizer and FSDP wrap).
    Images are [3, H, W] in [-1, 1], any sizes (each is featurised on its own). KID's subset size is capped at
    the number of images; fewer than 2 images of either set give NaN (FID needs two).

    Args:
        kind: The feature extractor (`build_feature_extractor`: tiny, clip or inception).
        weights_path: Its weights (a safetensors file for tiny, a CLIP folder, the Inception .pth).
        kid_subset_size: KID's subset size (torchmetrics' default 1000 at scale).
        seed: The random-init tiny encoder's seed.
        extractor: A ready feature extractor (e.g. `fit_tiny_encoder`'s), instead of `kind` / `weights_path`.
    """

    def __init__(
        self,
        kind: str = "tiny",
        weights_path: str | Path | None = None,
        kid_subset_size: int = 50,
        seed: int = 0,
        extractor: nn.Module | None = None,
    ) -> None:
        if extractor is None:
            extractor = build_feature_extractor(kind, weights_path, seed)
        self.fid, self.kid = distribution_metrics(extractor, kid_subset_size)
        self.kid_subset_size = kid_subset_size
        self.counts = {True: 0, False: 0}

    def update(self, images: Sequence[Tensor], real: bool) -> None:
        """Add images in [-1, 1] to the generated (real=False) or the target (real=True) set."""
        for image in images:
            x = ((image.detach().float()[None] + 1) / 2).clamp(0, 1)
            if self.fid.device != x.device:
                self.fid.to(x.device)
                self.kid.to(x.device)
            self.fid.update(x, real=real)
            self.kid.update(x, real=real)
            self.counts[real] += 1

    def compute(self) -> dict[str, float]:
        """{"fid", "kid", "kid_std"} over everything added since the last `reset` (NaN below 2 images a set)."""
        n = min(self.counts.values())
        if n < 2:
            return {"fid": math.nan, "kid": math.nan, "kid_std": math.nan}
        self.kid.subset_size = min(self.kid_subset_size, n)
        kid_mean, kid_std = self.kid.compute()
        return {"fid": float(self.fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}

    def reset(self) -> None:
        """Forget the images added so far."""
        self.fid.reset()
        self.kid.reset()
        self.counts = {True: 0, False: 0}
