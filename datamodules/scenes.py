"""Scenes for unified models: images with depth and segmentation targets, captions, edits and questions.

One data kind serves MetaQuery (text-to-image from the caption, editing from the edit, understanding from the
questions; docs/methods/metaquery.md) and UniMRG (understanding plus generating the image's pixels, depth and
segmentation; docs/methods/unimrg.md).

The data format, one sample per image:
- `<key>.image.png` / `.image.jpg`: the image (8-bit RGB).
- `<key>.depth.npy`: float32 H x W relative inverse depth (larger = nearer): exact for generated scenes
  (`omnilab data synth scenes`), Depth-Anything-V2's prediction for real images (`omnilab data teachers`).
- `<key>.seg.png`: the segmentation as a coloured RGB mask (one colour per region), exact for generated scenes,
  SAM's automatic masks for real images.
- `<key>.edit.png` (optional): the edited image of the json's `edit` instruction.
- `<key>.json`: {"caption": str, "edit": str, "qa": [{"question": str, "answer": str, "options": [str] (optional:
  the closed answer set, for accuracy), "type": str (optional)}], "source": str}.

Targets follow UniMRG's encoding (UniMRG code, data pipeline): depth is min-max normalised per image to [-1, 1]
and copied to 3 channels (a constant map becomes 0), the mask is resized NEAREST and scaled to [-1, 1]. A sample
missing a member the run needs (`need`: e.g. depth or seg) is a counted skip naming the member.

One example: `image`, `depth`, `seg`, `edit` [3, S, S] in [-1, 1] (those present), `caption`, `instruction` (the
edit), `question`, `answer`, `options` (list, [] when the item has none), `qa_type`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.restoration import member, rgb8
from datamodules.webdataset import BadSample, WebDataModule
from omnilab.seeding import numpy_rng

ROLES = ("image", "depth", "seg", "edit")


def image_tensor(arr: np.ndarray, size: int, nearest: bool = False) -> Tensor:
    """HxWx3 uint8 -> [3, size, size] in [-1, 1] (area resize, or nearest for masks)."""
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float()[None]
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="nearest" if nearest else "area")
    return x[0] / 127.5 - 1.0


def depth_target(depth: np.ndarray, size: int) -> Tensor:
    """H x W depth -> [3, size, size]: resized (bilinear), min-max to [-1, 1] per image, 3 channels; constant -> 0.

    d' = 2 (d − min d) / (max d − min d) − 1.
    """
    x = torch.from_numpy(np.asarray(depth, dtype=np.float32))[None, None]
    if not bool(torch.isfinite(x).all()):
        raise BadSample(".depth.npy has non-finite values")
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    lo, hi = x.min(), x.max()
    x = torch.zeros_like(x) if float(hi - lo) == 0.0 else 2 * (x - lo) / (hi - lo) - 1
    return x[0].expand(3, -1, -1).clone()


@dataclass(frozen=True)
class SceneTransform:
    """Decoded sample -> example (module docstring); picklable for workers."""

    image_size: int
    need: tuple[str, ...]
    train: bool
    seed: int

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """One example; BadSample names a missing or unusable member."""
        meta = sample.get("json")
        if not isinstance(meta, dict):
            raise BadSample(".json is not an object")
        out: dict[str, Any] = {}
        for role in ROLES:
            found = member(sample, role)
            if found is None:
                if role in self.need or role == "image":
                    raise BadSample(f"no .{role} member (needed: {', '.join(('image', *self.need))})")
                continue
            name, arr = found
            if role == "depth":
                if arr.ndim != 2:
                    raise BadSample(f".{name} has shape {arr.shape}: expected H x W")
                out[role] = depth_target(arr, self.image_size)
            else:
                out[role] = image_tensor(rgb8(arr, name), self.image_size, nearest=role == "seg")
        qa = meta.get("qa") or []
        if "qa" in self.need and not qa:
            raise BadSample(".json has no `qa` items")
        if qa:
            pick = rng if self.train else numpy_rng(self.seed, "qa", sample["__key__"])
            item = qa[int(pick.integers(len(qa)))]
            options = [str(o) for o in item.get("options") or []]
            out.update(
                question=str(item["question"]),
                answer=str(item["answer"]),
                options=options,
                qa_type=str(item.get("type", "")),
            )
        else:
            out.update(question="", answer="", options=[], qa_type="")
        out["caption"] = str(meta.get("caption", ""))
        out["instruction"] = str(meta.get("edit", ""))
        if "edit" in self.need and not out["instruction"]:
            raise BadSample(".json has no `edit` instruction")
        return out


class SceneDataModule(WebDataModule):
    """Images with depth/segmentation targets, captions, edits and questions (`omnilab data synth scenes`).

    Batches hold `image` (and the `depth`, `seg`, `edit` present) [B, 3, S, S] in [-1, 1] and the lists `caption`,
    `instruction`, `question`, `answer`, `options`, `qa_type`.

    Args:
        image_size: Side S every image and target is resized to.
        need: Members a sample must have (any of depth, seg, edit, qa); one without them is a counted skip.
        **kwargs: The `WebDataModule` arguments (data_dir, shards, batch sizes, workers, seed, ...).
    """

    required = ("json",)
    synth_kind = "scenes"

    def __init__(self, image_size: int = 64, need: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        need = list(need or [])
        unknown = set(need) - {"depth", "seg", "edit", "qa"}
        if unknown:
            raise ValueError(f"data.need has {sorted(unknown)}: choose from depth, seg, edit, qa")
        if image_size < 1:
            raise ValueError(f"data.image_size={image_size}: give a positive side")
        self.image_size, self.need = image_size, tuple(need)

    def transform(self, train: bool) -> SceneTransform:
        """Resize, encode the targets, pick one question (at random in training, by key in evaluation)."""
        return SceneTransform(self.image_size, self.need, train, self.seed)
