"""Real-ESRGAN's second-order degradation, with the milder settings PURE trains on, and its degradation labels.

PURE (arXiv 2503.11073, §4.1) follows SeeSR: high-quality LSDIR + FFHQ crops degraded by Real-ESRGAN's pipeline
(Wang et al. 2021, §3). SeeSR's `dataloaders/params_realesrgan.yml` (`DegradationSettings` below) is milder than
Real-ESRGAN's defaults. The pipeline, for an HQ image of H x W and scale s = 4:

1. blur with kernel 1 (p 0.1 a 2-D sinc, else one of iso / aniso / generalised iso / generalised aniso / plateau
   iso / plateau aniso Gaussians with probabilities .45 / .25 / .12 / .03 / .12 / .03; size 7-21; sigma in
   [0.2, 3]); resize by a factor drawn up / down / keep (.2 / .7 / .1) in [0.3, 1.5] with area, bilinear or
   bicubic; Gaussian noise (p .5, sigma in [1, 15] / 255, grey with p .4) or Poisson noise (scale [0.05, 2]); JPEG
   with quality [60, 95];
2. blur with kernel 2 (p .5; sigma [0.2, 1.5]); resize to (H / s, W / s) x a factor (.3 / .4 / .3 in [0.6, 1.2]);
   noise (sigma [1, 12] or Poisson [0.05, 1]); then, in random order, [resize to H / s x W / s + the final sinc
   filter (p .8, else none)] and JPEG [60, 100]; round to 8 bits.

Everything runs on the CPU in the data workers (torch, numpy, PIL's JPEG in place of Real-ESRGAN's DiffJPEG), from
plain parameters: `sample_degradation(rng)` draws them all (`Degradation`, JSON-able, including the seed of the
noise), `degrade(hq, d)` applies them deterministically. The kernels follow basicsr's formulas (`basicsr/data/
degradations.py`: `bivariate_Gaussian`, `bivariate_generalized_Gaussian`, `bivariate_plateau`,
`circular_lowpass_kernel`); `filter2d` is its reflect-padded `filter2D`.

`degradation_label(d)` turns the parameters into PURE's perception text ("Medium blur, small noise"): the blur level
from the kernels' spatial spread (second moment, in HQ pixels, kernel 2 and the final sinc scaled by the resolution
they act at), the noise level from the two noise stages' standard deviation in 8-bit levels (Poisson at mid-grey);
the thresholds are the tertiles of the default settings, so each level labels about a third of the samples. PURE
labels its data with a degradation-estimation model that is not released; these labels are a documented stand-in.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import special
from torch import Tensor

KernelType = Literal[
    "iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso", "sinc"
]
KERNEL_TYPES: tuple[str, ...] = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)
KERNEL_SIZES = tuple(range(7, 22, 2))  # 7 .. 21
PAD_TO = 21
RESIZE_MODES = ("area", "bilinear", "bicubic")


@dataclass(frozen=True)
class KernelSettings:
    """How one blur kernel is drawn (SeeSR `kernel_info`)."""

    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)  # over KERNEL_TYPES
    sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    sinc_prob: float = 0.1


@dataclass(frozen=True)
class DegradationSettings:
    """The degradation settings (defaults: SeeSR's `params_realesrgan.yml`, which PURE follows)."""

    scale: int = 4
    kernel1: KernelSettings = field(default_factory=KernelSettings)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.3, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 15.0)
    poisson_scale_range: tuple[float, float] = (0.05, 2.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (60.0, 95.0)
    second_blur_prob: float = 0.5
    kernel2: KernelSettings = field(default_factory=lambda: KernelSettings(sigma=(0.2, 1.5)))
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.6, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 12.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 1.0)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[float, float] = (60.0, 100.0)
    final_sinc_prob: float = 0.8

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> DegradationSettings:
        """Settings from a config dict (`kernel1`/`kernel2` as dicts); an unknown key is a ValueError naming it."""
        values = dict(values or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown degradation setting(s) {unknown}; known: {sorted(known)}")
        for key in ("kernel1", "kernel2"):
            if isinstance(values.get(key), dict):
                kernel_known = set(KernelSettings.__dataclass_fields__)
                bad = sorted(set(values[key]) - kernel_known)
                if bad:
                    raise ValueError(f"unknown {key} setting(s) {bad}; known: {sorted(kernel_known)}")
                base = KernelSettings() if key == "kernel1" else cls().kernel2
                values[key] = KernelSettings(**{**asdict(base), **values[key]})
        return cls(**values)


# --------------------------------------------------------------------------- kernels (basicsr's formulas)


@dataclass(frozen=True)
class Kernel:
    """One drawn blur kernel: its type, odd size, and shape parameters (sigma in pixels, theta in radians)."""

    type: str
    size: int
    sigma_x: float = 0.0
    sigma_y: float = 0.0
    theta: float = 0.0
    beta: float = 1.0
    omega_c: float = 0.0  # sinc cut-off (radians per pixel)


def _grid(size: int) -> np.ndarray:
    """[size, size, 2] (x, y) offsets from the centre."""
    ax = np.arange(-(size // 2), size // 2 + 1, dtype=np.float64)
    xx, yy = np.meshgrid(ax, ax)
    return np.stack([xx, yy], axis=-1)


def _quadratic_form(k: Kernel) -> np.ndarray:
    """x^T Sigma^-1 x on the grid, Sigma = R diag(sx^2, sy^2) R^T (isotropic: sy = sx, theta = 0)."""
    isotropic = "aniso" not in k.type
    sx, sy, theta = (k.sigma_x, k.sigma_x, 0.0) if isotropic else (k.sigma_x, k.sigma_y, k.theta)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    sigma = rot @ np.diag([sx**2, sy**2]) @ rot.T
    g = _grid(k.size)
    return np.einsum("hwi,ij,hwj->hw", g, np.linalg.inv(sigma), g)


def kernel_array(k: Kernel, pad_to: int = PAD_TO) -> np.ndarray:
    """The normalised kernel (sum 1), zero-padded to pad_to x pad_to.

    Gaussian exp(-q/2), generalised Gaussian exp(-q^beta/2), plateau 1/(1 + q^beta) with q = x^T Sigma^-1 x;
    sinc: omega_c J1(omega_c r) / (2 pi r), omega_c^2 / (4 pi) at r = 0 (a circular low-pass filter).
    """
    if k.type == "sinc":
        g = _grid(k.size)
        r = np.sqrt((g**2).sum(-1))
        with np.errstate(divide="ignore", invalid="ignore"):
            out = k.omega_c * special.j1(k.omega_c * r) / (2 * np.pi * r)
        out[k.size // 2, k.size // 2] = k.omega_c**2 / (4 * np.pi)
    else:
        q = _quadratic_form(k)
        if k.type in ("iso", "aniso"):
            out = np.exp(-0.5 * q)
        elif k.type.startswith("generalized"):
            out = np.exp(-0.5 * q**k.beta)
        elif k.type.startswith("plateau"):
            out = 1.0 / (q**k.beta + 1.0)
        else:
            raise ValueError(f"unknown kernel type {k.type!r}; choose from {(*KERNEL_TYPES, 'sinc')}")
    out = out / out.sum()
    pad = (pad_to - k.size) // 2
    return np.pad(out, pad) if pad > 0 else out


def sample_kernel(rng: np.random.Generator, s: KernelSettings) -> Kernel:
    """Real-ESRGAN's kernel draw: a size in 7..21; p sinc_prob a sinc, else a mixed Gaussian-family kernel."""
    size = int(rng.choice(KERNEL_SIZES))
    if rng.uniform() < s.sinc_prob:
        low = np.pi / 3 if size < 13 else np.pi / 5
        return Kernel("sinc", size, omega_c=float(rng.uniform(low, np.pi)))
    kind = str(rng.choice(KERNEL_TYPES, p=np.asarray(s.kernel_prob) / sum(s.kernel_prob)))
    sigma_x = float(rng.uniform(*s.sigma))
    sigma_y, theta = sigma_x, 0.0
    if "aniso" in kind:
        sigma_y, theta = float(rng.uniform(*s.sigma)), float(rng.uniform(-np.pi, np.pi))
    beta = 1.0
    if kind.startswith(("generalized", "plateau")):
        lo, hi = s.betag_range if kind.startswith("generalized") else s.betap_range
        beta = float(rng.uniform(lo, 1.0) if rng.uniform() < 0.5 else rng.uniform(1.0, hi))
    return Kernel(kind, size, sigma_x, sigma_y, theta, beta)


def kernel_spread(k: Kernel | None) -> float:
    """The kernel's spatial spread: sqrt(sum K(x, y) (x^2 + y^2) / 2), its per-axis std in pixels (0 for none)."""
    if k is None:
        return 0.0
    arr = kernel_array(k, pad_to=k.size)
    g = _grid(k.size)
    return float(math.sqrt(max((arr * (g**2).sum(-1)).sum() / 2.0, 0.0)))


def filter2d(img: Tensor, kernel: np.ndarray) -> Tensor:
    """Correlate [C, H, W] with a k x k kernel per channel, reflect padding: basicsr's `filter2D`.

    Computed with FFTs (4-10x faster than a depthwise conv for Real-ESRGAN's 21 x 21 kernels on a CPU worker); the
    result equals the direct correlation to float32 rounding.
    """
    k = kernel.shape[-1]
    h, w = img.shape[-2:]
    pad = k // 2
    mode = "reflect" if min(h, w) > pad else "replicate"
    padded = F.pad(img[None].float(), (pad, pad, pad, pad), mode=mode)[0]
    size = tuple(padded.shape[-2:])
    flipped = torch.as_tensor(np.ascontiguousarray(kernel[::-1, ::-1]), dtype=torch.float32)
    spectrum = torch.fft.rfft2(padded, s=size) * torch.fft.rfft2(flipped, s=size)
    out = torch.fft.irfft2(spectrum, s=size)[:, k - 1 : k - 1 + h, k - 1 : k - 1 + w]
    return out.to(img.dtype)


# --------------------------------------------------------------------------- noise, resize, JPEG


@dataclass(frozen=True)
class Noise:
    """One noise draw: Gaussian (sigma in 8-bit levels) or Poisson (scale), colour or grey."""

    kind: Literal["gaussian", "poisson"]
    level: float
    gray: bool


def sample_noise(
    rng: np.random.Generator, gaussian_prob: float, sigma: tuple, poisson: tuple, gray_prob: float
) -> Noise:
    """Gaussian with probability `gaussian_prob` (sigma in `sigma`), else Poisson (scale in `poisson`)."""
    if rng.uniform() < gaussian_prob:
        return Noise("gaussian", float(rng.uniform(*sigma)), bool(rng.uniform() < gray_prob))
    return Noise("poisson", float(rng.uniform(*poisson)), bool(rng.uniform() < gray_prob))


def rgb_to_gray(img: Tensor) -> Tensor:
    """[3, H, W] -> [1, H, W] luma 0.299 R + 0.587 G + 0.114 B."""
    return (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]


def add_noise(img: Tensor, noise: Noise, gen: torch.Generator) -> Tensor:
    """Add the noise and clip to [0, 1] (basicsr `random_add_{gaussian,poisson}_noise_pt`, clip, no rounding).

    Poisson: the image is rounded to 8 bits, v = 2^ceil(log2(#distinct values)), noise = (Poisson(I v) / v - I)
    times the scale; grey noise is computed on the luma and added to every channel.
    """
    if noise.kind == "gaussian":
        shape = (1, *img.shape[1:]) if noise.gray else img.shape
        out = img + torch.randn(shape, generator=gen, dtype=img.dtype) * (noise.level / 255.0)
        return out.clamp(0, 1)
    base = rgb_to_gray(img) if noise.gray else img
    base = torch.clamp((base * 255.0).round(), 0, 255) / 255.0
    vals = 2 ** math.ceil(math.log2(max(len(torch.unique(base)), 1)))
    shot = torch.poisson(base * vals, generator=gen) / vals - base
    return (img + shot * noise.level).clamp(0, 1)


def resize(img: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """Resize [C, H, W] to `size` with torch's area / bilinear / bicubic (no antialias, as Real-ESRGAN)."""
    size = (max(1, int(size[0])), max(1, int(size[1])))
    if tuple(img.shape[-2:]) == size:
        return img
    extra = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(img[None], size=size, mode=mode, **extra)[0]


def jpeg(img: Tensor, quality: float) -> Tensor:
    """JPEG round trip through PIL at `quality` (rounded), on the 8-bit image."""
    arr = (img.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=round(quality))
    with Image.open(io.BytesIO(buf.getvalue())) as out:
        decoded = np.asarray(out.convert("RGB"))
    return torch.from_numpy(decoded.copy()).permute(2, 0, 1).to(img.dtype) / 255.0


# --------------------------------------------------------------------------- the pipeline


@dataclass(frozen=True)
class Degradation:
    """Every random choice of one second-order degradation (plain values; `asdict` gives its JSON)."""

    scale: int
    kernel1: Kernel
    resize1: float
    mode1: str
    noise1: Noise
    jpeg1: float
    kernel2: Kernel | None
    resize2: float
    mode2: str
    noise2: Noise
    sinc: Kernel | None
    final_mode: str
    sinc_first: bool  # [resize + sinc] then JPEG, else JPEG then [resize + sinc]
    jpeg2: float
    noise_seed: int


def _resize_factor(rng: np.random.Generator, prob: tuple, bounds: tuple) -> float:
    """Up (U(1, hi)), down (U(lo, 1)) or keep (1) with probabilities `prob`."""
    kind = rng.choice(3, p=np.asarray(prob) / sum(prob))
    return (
        float(rng.uniform(1, bounds[1]))
        if kind == 0
        else float(rng.uniform(bounds[0], 1))
        if kind == 1
        else 1.0
    )


def sample_degradation(rng: np.random.Generator, s: DegradationSettings | None = None) -> Degradation:
    """Draw every parameter of one degradation (Real-ESRGAN's order of draws, SeeSR's ranges)."""
    s = s or DegradationSettings()
    kernel1 = sample_kernel(rng, s.kernel1)
    kernel2 = sample_kernel(rng, s.kernel2)
    sinc = None
    if rng.uniform() < s.final_sinc_prob:
        sinc = Kernel("sinc", int(rng.choice(KERNEL_SIZES)), omega_c=float(rng.uniform(np.pi / 3, np.pi)))
    resize1 = _resize_factor(rng, s.resize_prob, s.resize_range)
    mode1 = str(rng.choice(RESIZE_MODES))
    noise1 = sample_noise(rng, s.gaussian_noise_prob, s.noise_range, s.poisson_scale_range, s.gray_noise_prob)
    jpeg1 = float(rng.uniform(*s.jpeg_range))
    blur2 = rng.uniform() < s.second_blur_prob
    resize2 = _resize_factor(rng, s.resize_prob2, s.resize_range2)
    mode2 = str(rng.choice(RESIZE_MODES))
    noise2 = sample_noise(
        rng, s.gaussian_noise_prob2, s.noise_range2, s.poisson_scale_range2, s.gray_noise_prob2
    )
    sinc_first = bool(rng.uniform() < 0.5)
    final_mode = str(rng.choice(RESIZE_MODES))
    jpeg2 = float(rng.uniform(*s.jpeg_range2))
    return Degradation(
        scale=s.scale,
        kernel1=kernel1,
        resize1=resize1,
        mode1=mode1,
        noise1=noise1,
        jpeg1=jpeg1,
        kernel2=kernel2 if blur2 else None,
        resize2=resize2,
        mode2=mode2,
        noise2=noise2,
        sinc=sinc,
        final_mode=final_mode,
        sinc_first=sinc_first,
        jpeg2=jpeg2,
        noise_seed=int(rng.integers(2**63 - 1)),
    )


def degrade(hq: Tensor, d: Degradation) -> Tensor:
    """The low-quality image [3, H / s, W / s] in [0, 1] (8-bit values) of an HQ image [3, H, W] in [0, 1]."""
    if hq.ndim != 3 or hq.shape[0] != 3:
        raise ValueError(f"degrade expects a [3, H, W] image, got shape {tuple(hq.shape)}")
    h, w = hq.shape[-2:]
    if h < d.scale or w < d.scale:
        raise ValueError(f"a {h}x{w} image is smaller than the scale factor {d.scale}")
    gen = torch.Generator().manual_seed(d.noise_seed)
    out = filter2d(hq.float(), kernel_array(d.kernel1))
    out = resize(out, (round(h * d.resize1), round(w * d.resize1)), d.mode1)
    out = jpeg(add_noise(out, d.noise1, gen), d.jpeg1)
    if d.kernel2 is not None:
        out = filter2d(out, kernel_array(d.kernel2))
    out = resize(out, (int(h / d.scale * d.resize2), int(w / d.scale * d.resize2)), d.mode2)
    out = add_noise(out, d.noise2, gen)
    sinc = kernel_array(d.sinc) if d.sinc is not None else None
    size = (h // d.scale, w // d.scale)
    if d.sinc_first:
        out = resize(out, size, d.final_mode)
        out = filter2d(out, sinc) if sinc is not None else out
        out = jpeg(out, d.jpeg2)
    else:
        out = jpeg(out, d.jpeg2)
        out = resize(out, size, d.final_mode)
        out = filter2d(out, sinc) if sinc is not None else out
    return torch.clamp((out * 255.0).round(), 0, 255) / 255.0


# --------------------------------------------------------------------------- labels

LEVELS = ("small", "medium", "large")
# tertiles of `blur_amount` / `noise_amount` over 20,000 draws of the default settings (see the tests)
BLUR_THRESHOLDS = (1.93, 3.98)
NOISE_THRESHOLDS = (9.98, 14.18)


def blur_amount(d: Degradation) -> float:
    """Combined kernel spread in HQ pixels: sqrt(s1^2 + (s2 / r1)^2 + (scale s_sinc)^2), r1 = the first resize."""
    k1, k2, ks = kernel_spread(d.kernel1), kernel_spread(d.kernel2), kernel_spread(d.sinc)
    return math.sqrt(k1**2 + (k2 / d.resize1) ** 2 + (d.scale * ks) ** 2)


def noise_std(noise: Noise) -> float:
    """A noise draw's standard deviation in 8-bit levels: sigma, or Poisson's scale * 255 sqrt(0.5 / 256) at mid-grey."""
    return noise.level if noise.kind == "gaussian" else noise.level * 255.0 * math.sqrt(0.5 / 256)


def noise_amount(d: Degradation) -> float:
    """sqrt(n1^2 + n2^2): the two noise stages' standard deviations in 8-bit levels, combined."""
    return math.sqrt(noise_std(d.noise1) ** 2 + noise_std(d.noise2) ** 2)


def level(value: float, thresholds: tuple[float, float]) -> str:
    """'small' below the first threshold, 'large' from the second, else 'medium'."""
    return LEVELS[int(value >= thresholds[0]) + int(value >= thresholds[1])]


def degradation_label(d: Degradation) -> str:
    """PURE's perception text, e.g. "Medium blur, small noise"."""
    blur = level(blur_amount(d), BLUR_THRESHOLDS)
    return f"{blur.capitalize()} blur, {level(noise_amount(d), NOISE_THRESHOLDS)} noise"


def degradation_json(d: Degradation) -> dict[str, Any]:
    """The parameters as plain JSON-able data (for logs and shards)."""
    return asdict(d)
