"""Real-world super-resolution data for PURE: high-quality images degraded on the fly, or paired LQ/HQ test sets.

PURE (arXiv 2503.11073, §4.1) trains on LSDIR + FFHQ-10k crops whose low-quality inputs come from Real-ESRGAN's
second-order degradation (`datamodules/degradations.py`, SeeSR's milder settings), x4, the LQ bicubic-resized back
to the HQ size (512 in the paper) before the VQ tokenizer sees it; it tests on paired real LQ/HQ sets (RealSR,
DRealSR). Here the degradation runs in the data workers, from a generator seeded by (seed, epoch, stream, sample
index) in training and by (seed, key) in evaluation, so a held-out set is degraded the same way every time.

The data format, one sample per image:
- `<key>.hq.png` / `<key>.hq.jpg`: the high-quality image (8-bit RGB; grey is replicated, 16-bit is reduced to 8
  bits, RGBA is composited on white, as Chameleon's tokenizer does).
- `<key>.lq.png` / `<key>.lq.jpg` (optional, paired test sets): the real low-quality image, 1/scale of the HQ.
- `<key>.json`: {"description": str (what the image shows; "" if unknown), "source": str, "scale": int
  (paired sets)}.
`omnilab data synth restoration` (real photos) and `omnilab data convert restoration` (image folders, paired
folders) write exactly this.

One example: `hq` and `lq` [3, S, S] in [0, 1] (`lq` is the LQ bicubic-upsampled to S), `lq_small` [3, S/s, S/s],
`label` (the degradation text, e.g. "Medium blur, small noise"; "" for a real pair), `description`, `degradation`
(the drawn parameters as JSON text; "" for a real pair).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.degradations import (
    DegradationSettings,
    degradation_json,
    degradation_label,
    degrade,
    sample_degradation,
)
from datamodules.webdataset import BadSample, WebDataModule


def rgb8(arr: np.ndarray, name: str) -> np.ndarray:
    """Any decoded image as HxWx3 uint8: grey replicated, 16-bit divided by 257, RGBA composited on white.

    A BadSample names anything else (32-bit or float pixels, a channel count other than 1, 2, 3 or 4).
    """
    if arr.dtype == np.uint16:
        arr = np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)
    if arr.dtype != np.uint8:
        raise BadSample(f".{name} has {arr.dtype} pixels: only 8- and 16-bit images are read")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise BadSample(f".{name} has shape {arr.shape}: expected H x W (grey) or H x W x 1-4 channels")
    if arr.shape[2] in (2, 4):  # grey + alpha or RGBA: blend with white
        alpha = arr[..., -1:].astype(np.float64) / 255.0
        colour = arr[..., :-1].astype(np.float64)
        arr = np.round(colour * alpha + 255.0 * (1 - alpha)).astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


def to_tensor(arr: np.ndarray) -> Tensor:
    """HxWx3 uint8 -> [3, H, W] float in [0, 1]."""
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0


def bicubic(img: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic resize of [3, H, W] (antialiased when shrinking), clamped to [0, 1]."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    out = F.interpolate(img[None], size=size, mode="bicubic", align_corners=False, antialias=True)[0]
    return out.clamp(0, 1)


def member(sample: dict[str, Any], role: str) -> tuple[str, np.ndarray] | None:
    """The `<role>.png|jpg|...` member of a decoded sample as (name, array), or None."""
    for name, value in sample.items():
        if name.startswith(role + ".") and isinstance(value, np.ndarray):
            return name, value
    return None


@dataclass(frozen=True)
class RestorationTransform:
    """Decoded sample -> (hq, lq) tensors; picklable for workers."""

    image_size: int
    scale: int
    train: bool
    degrade: bool = True
    settings: DegradationSettings = field(default_factory=DegradationSettings)

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """One example (see the module docstring); BadSample when the image cannot be used."""
        meta = sample.get("json") or {}
        if not isinstance(meta, dict):
            raise BadSample(".json is not an object")
        found = member(sample, "hq")
        if found is None:
            raise BadSample("no .hq image member (expected <key>.hq.png or <key>.hq.jpg)")
        hq = rgb8(found[1], found[0])
        size = self.image_size
        h, w = hq.shape[:2]
        if min(h, w) < size:
            raise BadSample(f".{found[0]} is {h}x{w}, smaller than the {size} px crop")
        paired = member(sample, "lq")
        if self.train:
            top, left = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
        else:
            top, left = (h - size) // 2, (w - size) // 2
        if paired is not None:  # a real pair: crop the LQ at the matching place
            lq_full = rgb8(paired[1], paired[0])
            s = self.scale
            if (lq_full.shape[0] * s, lq_full.shape[1] * s) != (h, w):
                raise BadSample(f".{paired[0]} is {lq_full.shape[:2]}, not 1/{s} of the HQ {h}x{w}")
            top, left = top // s * s, left // s * s
            lq_small = to_tensor(lq_full[top // s : (top + size) // s, left // s : (left + size) // s].copy())
        hq_crop = to_tensor(hq[top : top + size, left : left + size].copy())
        flip = self.train and rng.random() < 0.5
        if flip:
            hq_crop = hq_crop.flip(-1)
        out: dict[str, Any] = {"hq": hq_crop, "description": str(meta.get("description", ""))}
        if paired is not None:
            lq_small = lq_small.flip(-1) if flip else lq_small
            out.update(label="", degradation="")
        elif self.degrade:
            d = sample_degradation(rng, self.settings)
            lq_small = degrade(hq_crop, d)
            out.update(label=degradation_label(d), degradation=json.dumps(degradation_json(d)))
        else:
            return out
        out["lq_small"] = lq_small
        out["lq"] = bicubic(lq_small, (size, size))
        return out


class RestorationDataModule(WebDataModule):
    """High-quality images degraded on the fly (Real-ESRGAN, x`scale`), or real LQ/HQ pairs, for PURE.

    Batches hold `hq`, `lq` [B, 3, S, S] in [0, 1], `lq_small` [B, 3, S/s, S/s] and the lists `label`,
    `description`, `degradation`. With `degrade: false` only `hq` and `description` (VQ tokenizer training).

    Args:
        image_size: Side S of the HQ crop and of the upsampled LQ (PURE 512: a 64 x 64 code grid).
        scale: Super-resolution factor (PURE x4: a 128 px LQ).
        degrade: Make LQ images (false: HQ only, for training the VQ tokenizer).
        degradation: Overrides of the degradation settings (`DegradationSettings` fields, e.g. {noise_range: [1, 5]}).
        **kwargs: The `WebDataModule` arguments (data_dir, shards, batch sizes, workers, seed, ...).
    """

    required = ("json",)
    synth_kind = "restoration"

    def __init__(
        self,
        image_size: int = 512,
        scale: int = 4,
        degrade: bool = True,
        degradation: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if image_size < 1 or scale < 1 or image_size % scale:
            raise ValueError(
                f"data.image_size ({image_size}) must be a positive multiple of data.scale ({scale})"
            )
        self.image_size, self.scale, self.degrade = image_size, scale, degrade
        self.settings = DegradationSettings.from_dict({**(degradation or {}), "scale": scale})

    def transform(self, train: bool) -> RestorationTransform:
        """Random crop + flip + degradation (train) or centre crop + the key's fixed degradation (eval)."""
        return RestorationTransform(self.image_size, self.scale, train, self.degrade, self.settings)
