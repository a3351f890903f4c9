"""Ego-exo object correspondence pairs for CCMP: decoding, augmentation and test preprocessing.

Implements the data side of CCMP (docs/methods/ccmp.md): §1 (the square model input,
512x512 in the paper), §4 (training augmentation; test preprocessing: pad to square, resize, and scoring
at the official resolution) and §7 (the pair format that `omnilab data convert egoexo4d` and
`omnilab data synth correspondence` write).

The data format: one sample is one correspondence pair (query mask in the source view, answer in the target):
- `<key>.json`: {"take": str, "take_name": str, "object": str, "src_cam": str, "tgt_cam": str,
  "src_frame": int, "tgt_frame": int, "setting": "ego-exo" | "exo-ego" | "ego-ego" | "exo-exo",
  "visible": bool, "src_native": [H, W], "tgt_native": [H, W], "split": str}, and optionally "scored":
  bool (the official evaluation scores the pair; default true) and "planned": bool (the submission must
  hold it; default: a cross-view pair of one frame), which converted Ego-Exo4D shards carry.
- `<key>.src.jpg`: the source RGB image.
- `<key>.src_mask.png`: the query mask, uint8 {0, 255}, at the source image's size.
- `<key>.tgt.jpg`: the target RGB image.
- `<key>.tgt_mask.png`: the answer mask, uint8 {0, 255}, at the target image's size (all zeros when
  invisible).
- `<key>.tgt_gt.png` (optional; converted shards have it): the evaluation ground truth. Ego-Exo4D's is the
  native mask resized nearest to longest side 480 (the official evaluation's shape); HANDAL-X's is the
  target mask at the frame's own size (CCMP scores HANDAL-X there). When absent it is derived from
  `tgt_mask` as Ego-Exo4D's (`metrics.correspondence.resize_longest`).

Training (§4): each view on its own, with its own draws: short side -> image_size + 1 (bilinear, masks too,
so the mask targets are soft in [0, 1]: CCMP's `dataloader.py` resizes both with cv2.INTER_LINEAR), an
image_size crop that keeps a mask pixel when the mask has one (albumentations' CropNonEmptyMaskIfExists), a
horizontal flip with p = 0.5, ImageNet normalization. A pair whose query mask is empty trains as a negative
(target zeroed, not visible), as CCMP's dataloader does; a pair the official loop does not score and whose
target has no mask (visibility unknown) is left out of training.
Evaluation (§4): centre-pad to square with zeros, resize to image_size with nearest neighbour, images and
masks alike (CCMP's and the Ego-Exo4D baseline's `reshape_img_war` resize a uint8 array, image or mask, with
cv2.INTER_NEAREST); `tgt_gt` and `gt_crop` let `prediction_to_gt` bring a prediction to the official shape.

Both nearest-neighbour resizes of evaluation (padded square -> image_size, prediction -> 480) sample the
source pixel nearest to d · (n_in / n_out), pixels taken at their top-left corners (`nearest_index`). That is
cv2.INTER_NEAREST's convention, in which the official ground truth (cv2 nearest from the native size, an
integer factor for exo) and the converter's frame masks are exact subsamples of the native mask, but
rounded where cv2 floors: floor shifts the content down-right by up to one source pixel per resize, which
at image_size 512 put the round trip 0.6 GT pixels off the ground truth (oracle IoU 0.93 against 0.99 at
480). Rounded, the round trip adds no offset at any size (tests/datamodules/test_correspondence.py, the
oracle at several sizes); the pixel-centre rule (INTER_NEAREST_EXACT) would sit half a GT pixel off the
cv2-resized ground truth.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.webdataset import BadSample, SkipSample, WebDataModule, expand_shards
from metrics.correspondence import EVAL_LONGEST_SIDE, eval_shape, resize_longest

SETTINGS = ("ego-exo", "exo-ego", "ego-ego", "exo-exo")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MASK_THRESHOLD = 0.5  # CCMP: sigmoid(logits) > 0.5 is the predicted mask


# --------------------------------------------------------------------------- geometry


def resize(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """Resize a [C, H, W] float tensor: "bilinear" (as cv2 INTER_LINEAR, no antialias) or "nearest" (`nearest_resize`)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "nearest":
        return nearest_resize(x, size)
    return F.interpolate(x[None], size=size, mode=mode, align_corners=False)[0]


def nearest_index(n_in: int, n_out: int) -> Tensor:
    """Source index of each of n_out destination pixels: the nearest to d · n_in / n_out, = floor(d · n_in / n_out + ½).

    Integer arithmetic, (2 d n_in + n_out) // (2 n_out), clamped to n_in − 1. An integer factor f gives d · f,
    as cv2.INTER_NEAREST does; other factors round where cv2 floors (the module docstring says why).
    """
    d = torch.arange(n_out, dtype=torch.int64)
    return ((2 * d * n_in + n_out) // (2 * n_out)).clamp_max(n_in - 1)


def nearest_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of a [..., H, W] tensor to `size` with `nearest_index` on each axis."""
    rows, cols = nearest_index(x.shape[-2], size[0]), nearest_index(x.shape[-1], size[1])
    return x.index_select(-2, rows.to(x.device)).index_select(-1, cols.to(x.device))


def short_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(H, W) scaled so that the short side is `short` (the long side rounded, never below `short`)."""
    if height <= width:
        return short, max(short, round(width * short / height))
    return max(short, round(height * short / width)), short


def crop_window(mask: Tensor, size: int, rng: np.random.Generator) -> tuple[int, int]:
    """(top, left) of a size x size window that holds a random mask pixel, or a random window if none.

    As albumentations' CropNonEmptyMaskIfExists: pick a foreground pixel (y, x) (>= 0.5 when the soft
    mask has such a pixel, else > 0), then top = y - U{0..size-1}, clipped to the image, and the same for x.
    """
    height, width = mask.shape[-2:]
    m = mask.reshape(height, width).numpy()
    ys, xs = np.nonzero(m >= 0.5) if (m >= 0.5).any() else np.nonzero(m > 0)
    if len(ys):
        i = int(rng.integers(len(ys)))
        top = int(ys[i]) - int(rng.integers(size))
        left = int(xs[i]) - int(rng.integers(size))
        return min(max(top, 0), height - size), min(max(left, 0), width - size)
    return int(rng.integers(height - size + 1)), int(rng.integers(width - size + 1))


def pad_to_square(x: Tensor) -> Tensor:
    """Centre a [C, H, W] tensor on a zero square of side max(H, W) (top/left pad = difference // 2)."""
    height, width = x.shape[-2:]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    return F.pad(x, (left, side - width - left, top, side - height - top))


def square_nearest(x: Tensor, size: int) -> Tensor:
    """`nearest_resize(pad_to_square(x), (size, size))` of a [..., H, W] tensor, without building the square.

    Each output pixel reads the square's pixel `nearest_index` picks; those that fall in the padding are 0.
    Works on any dtype (an image is resized as uint8 and converted afterwards: cheap at full resolution).
    """
    height, width = x.shape[-2:]
    side = max(height, width)
    index = nearest_index(side, size)
    rows, cols = index - (side - height) // 2, index - (side - width) // 2
    r0, r1 = int((rows < 0).sum()), int((rows < height).sum())  # the rows that fall on the content
    c0, c1 = int((cols < 0).sum()), int((cols < width).sum())
    out = x.new_zeros((*x.shape[:-2], size, size))
    inside = x.index_select(-2, rows[r0:r1].to(x.device))
    out[..., r0:r1, c0:c1] = inside.index_select(-1, cols[c0:c1].to(x.device))
    return out


def gt_crop_box(gt_height: int, gt_width: int, canvas: int = EVAL_LONGEST_SIDE) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the image content in the canvas x canvas resize of the padded square.

    The content is centred, so top = (canvas - height) // 2 (the official `remove_pad`'s offset); the box
    has exactly the ground truth's size, so a cropped prediction always has the ground truth's shape.
    """
    return (canvas - gt_height) // 2, (canvas - gt_width) // 2, gt_height, gt_width


def prediction_to_gt(
    prob: Tensor, gt_crop: tuple[int, int, int, int] | Tensor, shape: tuple[int, int] | None = None
) -> Tensor:
    """A [S, S] probability map -> the bool mask at the ground truth's shape (§4 test preprocessing).

    prob > 0.5, nearest resize (`nearest_resize`) to 480x480 (the padded square at the evaluation
    resolution), then the crop `gt_crop` = (top, left, height, width) removes the padding; a ground truth
    of another `shape` (HANDAL-X's, at the frame's size) gets the crop resized nearest to it, as CCMP's
    `eval_handal.py` does.
    """
    if prob.ndim != 2 or prob.shape[0] != prob.shape[1]:
        raise ValueError(f"prediction_to_gt expects a square [S, S] map, got shape {tuple(prob.shape)}")
    top, left, height, width = (int(v) for v in gt_crop)
    binary = (prob.detach() > MASK_THRESHOLD).float()[None]
    full = nearest_resize(binary, (EVAL_LONGEST_SIDE, EVAL_LONGEST_SIDE))[0]
    cropped = full[top : top + height, left : left + width]
    if shape is not None and tuple(shape) != (height, width):
        cropped = nearest_resize(cropped, tuple(shape))
    return cropped > 0.5


# --------------------------------------------------------------------------- decoding


def image_uint8(arr: np.ndarray, name: str) -> Tensor:
    """HxWx3 (or grey HxW) uint8 -> [3, H, W] uint8 (a view where it can be); raises BadSample otherwise."""
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise BadSample(f".{name} is not an 8-bit RGB or grey image (dtype {arr.dtype}, shape {arr.shape})")
    if arr.ndim == 2:
        return torch.from_numpy(np.ascontiguousarray(arr))[None].expand(3, -1, -1)
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


def image_tensor(arr: np.ndarray, name: str) -> Tensor:
    """HxWx3 (or grey HxW) uint8 -> [3, H, W] float in [0, 1]."""
    return image_uint8(arr, name).float() / 255.0


def mask_tensor(arr: np.ndarray, name: str, size: tuple[int, int]) -> Tensor:
    """HxW uint8 {0, 255} mask of the image size `size` -> [1, H, W] float {0, 1} (foreground = > 127)."""
    if arr.ndim != 2:
        raise BadSample(f".{name} must be a single-channel mask, got shape {arr.shape}")
    if arr.shape != tuple(size):
        raise BadSample(f".{name} is {arr.shape[0]}x{arr.shape[1]} but its image is {size[0]}x{size[1]}")
    return torch.from_numpy(np.ascontiguousarray(arr > 127)).float()[None]


def normalize(img: Tensor) -> Tensor:
    """ImageNet normalization of a [3, H, W] image in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (img - mean) / std


def pair_meta(meta: Any) -> dict[str, Any]:
    """The `.json` fields the transform uses, checked; raises BadSample on a missing or mistyped one."""
    if not isinstance(meta, dict):
        raise BadSample(".json is not an object")
    fields = {
        "setting": str,
        "visible": bool,
        "take": str,
        "object": str,
        "src_cam": str,
        "tgt_cam": str,
        "tgt_frame": int,
    }
    for name, kind in fields.items():
        value = meta.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise BadSample(f".json field {name!r} must be {kind.__name__}, got {value!r}")
    if meta["setting"] not in SETTINGS:
        raise BadSample(f".json setting {meta['setting']!r} is not one of {', '.join(SETTINGS)}")
    for name in ("scored", "planned"):
        if name in meta and not isinstance(meta[name], bool):
            raise BadSample(f".json field {name!r} must be bool, got {meta[name]!r}")
    return meta


def is_planned(meta: dict[str, Any]) -> bool:
    """Whether the submission must hold the pair: `planned`, else a cross-view pair of one frame."""
    if "planned" in meta:
        return meta["planned"]
    return (
        meta["setting"] in ("ego-exo", "exo-ego")
        and meta.get("src_frame", meta["tgt_frame"]) == meta["tgt_frame"]
    )


# --------------------------------------------------------------------------- the transform


@dataclass(frozen=True)
class CorrespondenceTransform:
    """Decoded pair -> tensors (training augmentation or test preprocessing); picklable for workers."""

    image_size: int
    train: bool
    settings: tuple[str, ...] | None = None

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """Transform one decoded sample; raises BadSample when the pair cannot be used."""
        meta = pair_meta(sample["json"])
        if self.settings is not None and meta["setting"] not in self.settings:
            raise SkipSample(f"setting {meta['setting']!r} is not in data.settings {list(self.settings)}")
        src = image_uint8(sample["src.jpg"], "src.jpg")
        tgt = image_uint8(sample["tgt.jpg"], "tgt.jpg")
        src_mask = mask_tensor(sample["src_mask.png"], "src_mask.png", src.shape[-2:])
        tgt_mask = mask_tensor(sample["tgt_mask.png"], "tgt_mask.png", tgt.shape[-2:])
        visible, scored = meta["visible"], meta.get("scored", True)
        if not visible and tgt_mask.any():
            raise BadSample("the pair is marked invisible but its target mask is not empty")
        if self.train and not (visible or scored):
            raise SkipSample("the target's visibility at this frame is not annotated (an unscored pair)")
        if self.train and not src_mask.any():  # CCMP's dataloader: an empty query is a negative pair
            tgt_mask, visible = torch.zeros_like(tgt_mask), False
        out = {
            "visible": torch.tensor(1.0 if visible else 0.0),
            "scored": torch.tensor(scored),
            "planned": torch.tensor(is_planned(meta)),
            "setting": meta["setting"],
            "take": meta["take"],
            "object": meta["object"],
            "src_cam": meta["src_cam"],
            "tgt_cam": meta["tgt_cam"],
            "frame": meta["tgt_frame"],
        }
        if self.train:
            if visible and not tgt_mask.any():
                raise BadSample("the pair is marked visible but its target mask is empty")
            src_keep, tgt_keep = "source" if src_mask.any() else None, "target" if visible else None
            out["src"], out["src_mask"] = self._augment(src.float() / 255.0, src_mask, rng, src_keep)
            out["tgt"], out["tgt_mask"] = self._augment(tgt.float() / 255.0, tgt_mask, rng, tgt_keep)
        else:
            # A visible pair with an empty target mask stays: the official evaluation scores it (§5).
            out["src"], out["src_mask"] = self._square(src, src_mask)
            out["tgt"], out["tgt_mask"] = self._square(tgt, tgt_mask)
            out["tgt_gt"] = self._ground_truth(sample, tgt_mask)
            out["gt_crop"] = torch.tensor(gt_crop_box(*eval_shape(*tgt_mask.shape[-2:])))
        return out

    def _augment(
        self, img: Tensor, mask: Tensor, rng: np.random.Generator, keep: str | None
    ) -> tuple[Tensor, Tensor]:
        """§4 training augmentation of one view; `keep` names a mask that must survive the resize."""
        size = self.image_size
        scaled = short_side_size(*img.shape[-2:], size + 1)
        img, mask = resize(img, scaled, "bilinear"), resize(mask, scaled, "bilinear").clamp(0, 1)
        if keep and not mask.any():
            raise BadSample(f"the {keep} mask vanishes when resized to short side {size + 1}")
        top, left = crop_window(mask, size, rng)
        img, mask = (
            img[:, top : top + size, left : left + size],
            mask[:, top : top + size, left : left + size],
        )
        if rng.random() < 0.5:
            img, mask = img.flip(-1), mask.flip(-1)
        return normalize(img), mask

    def _square(self, img: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """§4 test preprocessing of one view (uint8 image): centre-pad to square, resize nearest (both, as CCMP)."""
        img = square_nearest(img, self.image_size).float() / 255.0
        return normalize(img), square_nearest(mask, self.image_size)

    def _ground_truth(self, sample: dict[str, Any], tgt_mask: Tensor) -> Tensor:
        """The evaluation target mask: `tgt_gt.png` (at longest side 480, or at the target's own size), else
        `tgt_mask` resized to longest side 480."""
        if "tgt_gt.png" not in sample:
            return torch.from_numpy(np.ascontiguousarray(resize_longest(tgt_mask[0].numpy() > 0.5)))
        gt = sample["tgt_gt.png"]
        if gt.ndim != 2:
            raise BadSample(f".tgt_gt.png must be a single-channel mask, got shape {gt.shape}")
        frame, scaled = tuple(tgt_mask.shape[-2:]), eval_shape(*tgt_mask.shape[-2:])
        at_eval = max(gt.shape) == EVAL_LONGEST_SIDE and all(
            abs(a - b) <= 1 for a, b in zip(gt.shape, scaled)
        )
        if not (at_eval or gt.shape == frame):
            raise BadSample(
                f".tgt_gt.png is {gt.shape[0]}x{gt.shape[1]}, but the target image is {frame[0]}x{frame[1]} "
                f"({scaled[0]}x{scaled[1]} at longest side {EVAL_LONGEST_SIDE})"
            )
        return torch.from_numpy(np.ascontiguousarray(gt > 127))


# --------------------------------------------------------------------------- the DataModule


class CorrespondenceDataModule(WebDataModule):
    """Ego-exo correspondence pairs (CCMP): source image + query mask -> target image + answer mask.

    Training batches hold `src`, `tgt` [B, 3, S, S] (ImageNet-normalized), `src_mask`, `tgt_mask`
    [B, 1, S, S] (soft, in [0, 1]), `visible` [B] (1.0 / 0.0), `scored`, `planned` [B] (bool), `frame`
    [B], and the lists `setting`, `take`, `object`, `src_cam`, `tgt_cam`. Evaluation batches have binary
    masks and add `tgt_gt` (bool, longest side 480: stacked when the shapes agree, else a list) and
    `gt_crop` [B, 4].

    Args:
        image_size: Side S of the square model input (CCMP: 512; training crops S from short side S + 1).
        settings: Keep only pairs of these settings ("ego-exo", "exo-ego", "ego-ego", "exo-exo"); None: all.
        submission_plan: The `<split>-plan.json` the prediction's submission must follow (what the official
            `validate_predictions` requires); default: the one beside the prediction shards, named after their
            split (`val-000000.tar` -> `val-plan.json`), when it exists.
        **kwargs: The `WebDataModule` arguments (data_dir, shards, batch sizes, workers, seed, ...).
    """

    required = ("json", "src.jpg", "src_mask.png", "tgt.jpg", "tgt_mask.png")
    synth_kind = "correspondence"

    def __init__(
        self,
        image_size: int = 512,
        settings: list[str] | None = None,
        submission_plan: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if image_size < 1:
            raise ValueError(f"data.image_size must be positive, got {image_size}")
        unknown = sorted(set(settings or ()) - set(SETTINGS))
        if unknown or settings == []:
            raise ValueError(f"data.settings {settings} must be a non-empty subset of {list(SETTINGS)}")
        self.image_size = image_size
        self.settings = tuple(settings) if settings is not None else None
        self.plan_path = submission_plan

    def transform(self, train: bool) -> CorrespondenceTransform:
        """Training augmentation (train=True) or test preprocessing, as a picklable callable."""
        return CorrespondenceTransform(self.image_size, train, self.settings)

    def submission_plan(self) -> dict[str, Any] | None:
        """The prediction split's submission plan (`data.submission_plan`, else beside its shards), or None."""
        if self.plan_path is not None:
            path = Path(self.plan_path)
            if not path.is_file():
                raise FileNotFoundError(f"data.submission_plan not found: {path}")
            return json.loads(path.read_text())
        spec = self.shard_spec("predict")
        if spec is None:
            return None
        shards = expand_shards(spec)
        found = {re.fullmatch(r"(\w+)-\d{6}\.tar", Path(s).name) for s in shards}
        if None in found or len({m.group(1) for m in found}) != 1 or "://" in shards[0]:
            return None
        path = Path(shards[0]).parent / f"{next(iter(found)).group(1)}-plan.json"
        return json.loads(path.read_text()) if path.is_file() else None
