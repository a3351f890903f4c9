"""Rewards without downloaded weights: checks against the generated data's exact ground truth, and JPEG size.

The embedded default of the RL methods (Flow-GRPO, docs/methods/flow_grpo.md; MSGRPO's
multi-source rewards, §3 and UniRef-Image-Edit paper; PDTR's edit and T2I stages, UniPic 2.0 paper) trains on
`omnilab data synth multiref`, whose `.json` says exactly what the result must hold
(datamodules/synth/multiref.py): `objects` (each with "kind", "colour", "rgb", "fill", "box" = the
placement (x, y, w, h) centred in its grid cell, "bbox" = [x0, y0, x1, y1) tight around its visible
pixels, "pixels"), `program` (the operations; a "place" op names its reference "ref": k for "image k"),
`background`, `target_size` [w, h] and `ref_roles`. GenEval-style checks (colour, position, count) and
per-reference consistency read those; boxes are scaled from `target_size` to the generated image's size.

Formulas (images in RGB 0..255; tau, sigma and the rest are the classes' arguments):
- a colour's shades: its "rgb", plus rgb x SHADE (0.6) for striped / checkered objects; the distance of a
  pixel p to a colour is d(p) = min over shades ||p - shade||_2 (RGB); p *has* the colour if
  d(p) < match_tau and p does not look like the known background (||p - bg(p)|| >= match_tau, with bg
  the flat colour or the photo crop rendered at the image's size).
- colour (per object, in its bbox): min(1, mean_bbox exp(-d² / (2 tau²)) / f), f = pixels / bbox area
  (the share of the box the object covers); the sample's score is the mean over its shape objects.
- position (per object): c = centroid of the pixels having the object's colour (each such pixel goes to
  the nearest expected centre among the objects of that colour), p = its placement box's centre, both
  in image fractions; exp(-||c - p||² / (2 sigma²)) (sigma 1/6 = half a grid cell: 1 on target, 0.14
  one cell away), 0 with no such pixel; mean over shape objects.
- count (per colour named by a shape object): n = connected components (8-connected) of the pixels
  having the colour, counting those of at least min_fraction x the smallest expected object's area;
  1 / (1 + |n - expected|); mean over colours.
- JPEG compressibility (Flow-GRPO's `jpeg_compressibility`, no model): -bytes of the JPEG at quality 95
  per pixel, -B / (H W). Flow-GRPO's -kB / 500 at 512² is 0.524 x this.
- consistency with reference k, in [0, 1]. An object reference (the "place" op with "ref": k + 1) is
  cropped to its foreground F (pixels at least match_tau from the reference's border colour), the
  output to the op's bbox; both are resized (antialiased) to size x size thumbnails (8: coarse enough
  that patterns and resolution wash out); over the cells inside F, mean exp(-||ref cell - output
  cell||² / (2 tau²)). An object the instruction recolours must keep its shape, not its colour: the
  soft IoU sum min / sum max of the thumbnails of F and of the output pixels having the new colour.
  A scene reference (role "scene": the edited image, or image 1 of a composition) is resized to the
  output and compared by the global SSIM over the pixels outside every box the program touches
  ((2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a² + mu_b² + C1)(s_a² + s_b² + C2)) per RGB channel,
  C1 = (0.01·255)², C2 = (0.03·255)², averaged, clamped to [0, 1]). NaN for a reference the program
  says nothing about, and beyond a sample's references.
A check that does not apply (no shape object, no program: real data) is NaN, "not applicable".
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from torch import Tensor

from rewards.base import Reward, to_rgb, to_uint8

TAU = 40.0
MATCH_TAU = 45.0
POSITION_SIGMA = 1 / 6
MIN_FRACTION = 0.25
THUMB = 8
SSIM_C1 = (0.01 * 255) ** 2
SSIM_C2 = (0.03 * 255) ** 2
EDIT_BOXES = ("box_before", "box")


def _synth() -> Any:
    """The generator module, imported when first needed (it pulls in the data stack)."""
    from datamodules.synth import multiref

    return multiref


# --------------------------------------------------------------------------- geometry and colour


def _scale(meta: dict[str, Any], height: int, width: int) -> tuple[float, float]:
    """(sx, sy): image pixels per target pixel (the json's boxes are in `target_size` pixels)."""
    tw, th = meta.get("target_size") or (width, height)
    return width / tw, height / th


def _bbox_slices(bbox: list[int], sx: float, sy: float, height: int, width: int) -> tuple[slice, slice]:
    """Rows and columns of a [x0, y0, x1, y1) target box in the image (outward-rounded, clipped)."""
    x0, y0, x1, y1 = bbox
    return (
        slice(max(0, math.floor(y0 * sy)), min(height, math.ceil(y1 * sy))),
        slice(max(0, math.floor(x0 * sx)), min(width, math.ceil(x1 * sx))),
    )


def _xywh_to_bbox(box: list[int]) -> list[int]:
    x, y, w, h = box
    return [x, y, x + w, y + h]


def shape_objects(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The target's procedural objects that show pixels and a named colour (what the checks can verify)."""
    return [
        o
        for o in meta.get("objects") or []
        if o.get("kind") == "shape" and o.get("rgb") and o.get("bbox") and o.get("pixels", 0) > 0
    ]


def shades(obj: dict[str, Any]) -> np.ndarray:
    """The RGB shades [S, 3] an object shows: its colour, and colour x SHADE when striped or checkered."""
    base = np.asarray(obj["rgb"], np.float32)
    if obj.get("fill", "flat") in (None, "flat"):
        return base[None]
    return np.stack([base, np.rint(base * _synth().SHADE)])


def colour_distance(rgb: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """d(p) = min over colours [S, 3] of ||p - colour||_2, for every pixel of an H x W x 3 image."""
    diff = rgb[..., None, :] - colours.astype(np.float32)
    return np.sqrt((diff**2).sum(-1)).min(-1)


def background_like(rgb: np.ndarray, meta: dict[str, Any], tau: float = MATCH_TAU) -> np.ndarray | None:
    """bool H x W: pixels within tau of the known background (flat colour or photo crop); None if unknown."""
    spec = meta.get("background")
    if not isinstance(spec, dict) or spec.get("kind") not in ("flat", "photo"):
        return None
    height, width = rgb.shape[:2]
    if spec["kind"] == "flat":
        bg = np.asarray(spec["rgb"], np.float32)
    else:
        bg = _synth().background(spec, width, height).astype(np.float32)
    return np.sqrt(((rgb - bg) ** 2).sum(-1)) < tau


def colour_mask(
    rgb: np.ndarray, colours: np.ndarray, background: np.ndarray | None, tau: float
) -> np.ndarray:
    """bool H x W: pixels that have one of the colours (d < tau) and do not look like the background."""
    mask = colour_distance(rgb, colours) < tau
    return mask & ~background if background is not None else mask


def _by_colour(objects: list[dict[str, Any]]) -> dict[tuple[int, ...], list[dict[str, Any]]]:
    groups: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for o in objects:
        groups.setdefault(tuple(o["rgb"]), []).append(o)
    return groups


# --------------------------------------------------------------------------- the checks (one image)


def colour_score(image: Tensor, meta: dict[str, Any], tau: float = TAU) -> float:
    """Mean over shape objects of min(1, mean_bbox exp(-d² / (2 tau²)) / coverage); NaN if none."""
    objects = shape_objects(meta)
    if not objects:
        return math.nan
    rgb = to_rgb(image)
    height, width = rgb.shape[:2]
    sx, sy = _scale(meta, height, width)
    scores = []
    for o in objects:
        rows, cols = _bbox_slices(o["bbox"], sx, sy, height, width)
        region = rgb[rows, cols]
        if region.size == 0:
            scores.append(0.0)
            continue
        x0, y0, x1, y1 = o["bbox"]
        coverage = min(1.0, o["pixels"] / max(1, (x1 - x0) * (y1 - y0)))
        match = float(np.exp(-(colour_distance(region, shades(o)) ** 2) / (2 * tau**2)).mean())
        scores.append(min(1.0, match / coverage))
    return float(np.mean(scores))


def position_score(
    image: Tensor, meta: dict[str, Any], tau: float = MATCH_TAU, sigma: float = POSITION_SIGMA
) -> float:
    """Mean over shape objects of exp(-||centroid of its colour - placement centre||² / (2 sigma²)); NaN if none."""
    objects = [o for o in shape_objects(meta) if o.get("box")]
    if not objects:
        return math.nan
    rgb = to_rgb(image)
    height, width = rgb.shape[:2]
    tw, th = meta.get("target_size") or (width, height)
    background = background_like(rgb, meta, tau)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = (xs + 0.5) / width, (ys + 0.5) / height
    scores = []
    for group in _by_colour(objects).values():
        mask = colour_mask(rgb, np.concatenate([shades(o) for o in group]), background, tau)
        centres = np.array([[(x + w / 2) / tw, (y + h / 2) / th] for x, y, w, h in (o["box"] for o in group)])
        owner = np.argmin((u[..., None] - centres[:, 0]) ** 2 + (v[..., None] - centres[:, 1]) ** 2, axis=-1)
        for k, (cu, cv) in enumerate(centres):
            mine = mask & (owner == k)
            if not mine.any():
                scores.append(0.0)
                continue
            du, dv = u[mine].mean() - cu, v[mine].mean() - cv
            scores.append(float(np.exp(-(du**2 + dv**2) / (2 * sigma**2))))
    return float(np.mean(scores))


def count_score(
    image: Tensor, meta: dict[str, Any], tau: float = MATCH_TAU, min_fraction: float = MIN_FRACTION
) -> float:
    """Mean over named colours of 1 / (1 + |components of that colour - objects of that colour|); NaN if none."""
    objects = shape_objects(meta)
    if not objects:
        return math.nan
    rgb = to_rgb(image)
    height, width = rgb.shape[:2]
    sx, sy = _scale(meta, height, width)
    background = background_like(rgb, meta, tau)
    scores = []
    for group in _by_colour(objects).values():
        mask = colour_mask(rgb, np.concatenate([shades(o) for o in group]), background, tau)
        labels, found = ndimage.label(mask, structure=np.ones((3, 3), bool))
        sizes = np.bincount(labels.ravel(), minlength=found + 1)[1:]
        smallest = min(o["pixels"] for o in group) * sx * sy
        seen = int((sizes >= min_fraction * smallest).sum())
        scores.append(1.0 / (1.0 + abs(seen - len(group))))
    return float(np.mean(scores))


def jpeg_size(image: Tensor, quality: int = 95) -> int:
    """Bytes of the image saved as JPEG at `quality` (PIL, as Flow-GRPO's `jpeg_incompressibility`)."""
    buf = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buf, format="JPEG", quality=quality)
    return buf.tell()


# --------------------------------------------------------------------------- consistency with references


def masked_ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Global SSIM of two H x W x C images (0..255) over the pixels of `mask`, channel mean, clamped to [0, 1].

    NaN with fewer than two pixels in the mask.
    """
    if int(mask.sum()) < 2:
        return math.nan
    a, b = a[mask].astype(np.float64), b[mask].astype(np.float64)  # [P, C]
    mu_a, mu_b = a.mean(0), b.mean(0)
    var_a, var_b = a.var(0), b.var(0)
    cov = ((a - mu_a) * (b - mu_b)).mean(0)
    ssim = ((2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)) / (
        (mu_a**2 + mu_b**2 + SSIM_C1) * (var_a + var_b + SSIM_C2)
    )
    return float(np.clip(ssim.mean(), 0.0, 1.0))


def _resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear (antialiased) resize of an H x W x C float array."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
    out = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    """sum min(a, b) / sum max(a, b) of two masks in [0, 1] (NaN when both are empty)."""
    union = float(np.maximum(a, b).sum())
    return float(np.minimum(a, b).sum()) / union if union > 0 else math.nan


def _object_consistency(
    output: np.ndarray, ref: np.ndarray, op: dict[str, Any], meta: dict[str, Any], size: int, tau: float
) -> float:
    """Consistency of the output in the place op's bbox with the object shown alone in `ref` (see the module doc)."""
    border = np.concatenate([ref[0], ref[-1], ref[:, 0], ref[:, -1]])
    fg = np.sqrt(((ref - np.median(border, 0)) ** 2).sum(-1)) >= MATCH_TAU
    if not fg.any():
        return math.nan
    rows, cols = np.nonzero(fg.any(1))[0], np.nonzero(fg.any(0))[0]
    ref_crop = ref[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    fg_small = _resize(
        fg[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1, None].astype(np.float32), size, size
    )
    height, width = output.shape[:2]
    r, c = _bbox_slices(op["bbox"], *_scale(meta, height, width), height, width)
    out_crop = output[r, c]
    if out_crop.shape[0] < 1 or out_crop.shape[1] < 1:
        return math.nan
    recolour = [o for o in meta.get("objects") or [] if o.get("id") == op.get("object") and o.get("rgb")]
    if op.get("colour") is not None and recolour:
        has = colour_distance(out_crop, shades(recolour[0])) < MATCH_TAU
        return _soft_iou(fg_small[..., 0], _resize(has[..., None].astype(np.float32), size, size)[..., 0])
    inside = fg_small[..., 0] > 0.99
    if not inside.any():
        return math.nan
    d = np.sqrt(((_resize(ref_crop, size, size) - _resize(out_crop, size, size)) ** 2).sum(-1))
    return float(np.exp(-(d[inside] ** 2) / (2 * tau**2)).mean())


def _scene_consistency(output: np.ndarray, ref: np.ndarray, meta: dict[str, Any]) -> float:
    """Consistency of the output with the scene reference outside every box the program touches."""
    height, width = output.shape[:2]
    sx, sy = _scale(meta, height, width)
    keep = np.ones((height, width), bool)
    for op in meta.get("program") or []:
        for key in EDIT_BOXES:
            if op.get(key):
                r, c = _bbox_slices(_xywh_to_bbox(op[key]), sx, sy, height, width)
                keep[r, c] = False
    return masked_ssim(_resize(ref, height, width), output, keep)


def reference_consistency(
    images: list[Tensor],
    references: list[list[Tensor]],
    meta: list[dict[str, Any]],
    size: int = THUMB,
    tau: float = TAU,
) -> Tensor:
    """Per-reference consistency [N, R] in [0, 1] (R = the most references of a sample, at least 1); NaN where n/a."""
    n_cols = max([1, *(len(r) for r in references)])
    out = torch.full((len(images), n_cols), math.nan)
    for i, (image, refs, m) in enumerate(zip(images, references, meta)):
        if not refs or not m.get("program"):
            continue
        output = to_rgb(image)
        roles = m.get("ref_roles") or []
        places = {op["ref"]: op for op in m["program"] if op.get("op") == "place" and "ref" in op}
        for k, ref in enumerate(refs):
            op = places.get(k + 1)
            if op is not None and op.get("bbox"):
                score = _object_consistency(output, to_rgb(ref), op, m, size, tau)
            elif k < len(roles) and roles[k] == "scene":
                score = _scene_consistency(output, to_rgb(ref), m)
            else:
                continue
            out[i, k] = score
    return out


# --------------------------------------------------------------------------- the rewards


class _PerImage(Reward):
    """A reward computed image by image from (image, meta): {"score": Tensor [N]}."""

    nan_ok = True

    def one(self, image: Tensor, meta: dict[str, Any]) -> float:
        """The score of one image."""
        raise NotImplementedError

    def __call__(
        self,
        images: list[Tensor],
        prompts: list[str],
        references: list[list[Tensor]],
        meta: list[dict[str, Any]],
    ) -> dict[str, Tensor]:
        """{"score": [N]}, one `one(image, meta)` per image."""
        return {
            "score": torch.tensor([self.one(img, m) for img, m in zip(images, meta)], dtype=torch.float32)
        }


class ColourCheck(_PerImage):
    """Every named-colour object's box shows its colour (formula in the module docstring); NaN if none.

    Args:
        tau: RGB distance at which a pixel's match falls to exp(-1/2).
        name: The reward's name.
    """

    def __init__(self, tau: float = TAU, name: str = "colour") -> None:
        self.tau, self.name = tau, name

    def one(self, image: Tensor, meta: dict[str, Any]) -> float:
        """`colour_score` of one image."""
        return colour_score(image, meta, self.tau)


class PositionCheck(_PerImage):
    """Each named-colour object's pixels are centred where the program placed it; NaN if none.

    Args:
        tau: RGB distance under which a pixel has a colour.
        sigma: Position tolerance, in image fractions (1/6: half a grid cell).
        name: The reward's name.
    """

    def __init__(self, tau: float = MATCH_TAU, sigma: float = POSITION_SIGMA, name: str = "position") -> None:
        self.tau, self.sigma, self.name = tau, sigma, name

    def one(self, image: Tensor, meta: dict[str, Any]) -> float:
        """`position_score` of one image."""
        return position_score(image, meta, self.tau, self.sigma)


class CountCheck(_PerImage):
    """Each named colour shows as many connected blobs as the program has objects of it; NaN if none.

    Args:
        tau: RGB distance under which a pixel has a colour.
        min_fraction: Blobs smaller than this fraction of the smallest expected object are ignored.
        name: The reward's name.
    """

    def __init__(
        self, tau: float = MATCH_TAU, min_fraction: float = MIN_FRACTION, name: str = "count"
    ) -> None:
        self.tau, self.min_fraction, self.name = tau, min_fraction, name

    def one(self, image: Tensor, meta: dict[str, Any]) -> float:
        """`count_score` of one image."""
        return count_score(image, meta, self.tau, self.min_fraction)


class JpegCompressibility(_PerImage):
    """Flow-GRPO's model-free reward: -(JPEG bytes at quality 95) / (H W); smoother images score higher.

    Args:
        quality: JPEG quality (Flow-GRPO: 95).
        name: The reward's name.
    """

    nan_ok = False

    def __init__(self, quality: int = 95, name: str = "jpeg") -> None:
        self.quality, self.name = quality, name

    def one(self, image: Tensor, meta: dict[str, Any]) -> float:
        """-jpeg_size / (H W) of one image."""
        return -jpeg_size(image, self.quality) / (image.shape[-2] * image.shape[-1])


class ReferenceConsistency(Reward):
    """Consistency of the output with each reference: {"ref0": [N], "ref1": [N], ...} (NaN where n/a).

    Args:
        size: Side of the thumbnails an object reference and its output region are compared at.
        tau: RGB distance at which a thumbnail cell's match falls to exp(-1/2).
        name: The reward's name.
    """

    nan_ok = True

    def __init__(self, size: int = THUMB, tau: float = TAU, name: str = "consistency") -> None:
        self.size, self.tau, self.name = size, tau, name

    def __call__(
        self,
        images: list[Tensor],
        prompts: list[str],
        references: list[list[Tensor]],
        meta: list[dict[str, Any]],
    ) -> dict[str, Tensor]:
        """{"ref<k>": [N]} from `reference_consistency`."""
        scores = reference_consistency(images, references, meta, self.size, self.tau)
        return {f"ref{k}": scores[:, k] for k in range(scores.shape[1])}
