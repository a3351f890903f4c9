"""`omnilab data curate dere`: Decomposition-and-Recomposition (MICo's De&Re, docs/methods/mico.md).

Decomposition: an image and its component label map (0 = background, k > 0 = component k) become the
sources of a composition: the background (the clean background when the sample has one, else the image with
every component filled by the mean colour of the background pixels around it: a flat fill, not an
inpainting) and each component cropped to its box (plus a margin), the pixels outside its mask set to a
light grey, with its mask. Recomposition is the sample's task: from those sources, the original image.

Input shards: samples with an image (`image.<ext>`, or the only image member), `labels.png` (8- or 16-bit
label map of the image's size) and optionally `background.<ext>` and a json with "components": [{"label",
"name"}]. Output: MICo-kind samples (category "dere", task "compose", ref_roles ["scene", "component",
...]) with `mask{k}.png` per component reference. Components smaller than `--min-pixels` are dropped
(counted); a sample with none left, or without labels, is skipped (counted).
"""

from __future__ import annotations

import argparse
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from datamodules.curate import input_shards, run_sharded
from datamodules.synth.multiref import png
from datamodules.webdataset import IMAGE_EXTS, ShardWriter, iter_raw_samples

FILL = (235, 235, 235)
MARGIN = 4


def decompose(
    image: np.ndarray, labels: np.ndarray, background: np.ndarray | None = None, min_pixels: int = 16
) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """([background, component 1, ...], [None, mask 1, ...]) of an HxWx3 image and its HxW label map."""
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels {labels.shape} do not match the image {image.shape[:2]}")
    fg = labels > 0
    if background is None:
        background = image.copy()
        bg_pixels = image[~fg]
        background[fg] = bg_pixels.mean(0).round().astype(np.uint8) if len(bg_pixels) else FILL
    sources: list[np.ndarray] = [background]
    masks: list[np.ndarray | None] = [None]
    h, w = labels.shape
    for label in sorted(int(v) for v in np.unique(labels) if v > 0):
        mask = labels == label
        if mask.sum() < min_pixels:
            continue
        ys, xs = np.nonzero(mask)
        y0, y1 = max(0, ys.min() - MARGIN), min(h, ys.max() + 1 + MARGIN)
        x0, x1 = max(0, xs.min() - MARGIN), min(w, xs.max() + 1 + MARGIN)
        crop = image[y0:y1, x0:x1].copy()
        inside = mask[y0:y1, x0:x1]
        crop[~inside] = FILL
        sources.append(crop)
        masks.append((inside * 255).astype(np.uint8))
    return sources, masks


def dere_instruction(names: list[str]) -> str:
    """The recomposition prompt: every component back in the scene of image 1, each named by its image."""
    parts = [f"the {name} from image {k + 2}" for k, name in enumerate(names)]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"Recompose the original picture: place {listed} back into the scene of image 1."


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.array(img if img.mode in ("L", "I;16", "I") else img.convert("RGB"))


def dere_shard(index: int, url: str, writer: ShardWriter, min_pixels: int) -> Counter:
    """Decompose every sample of one shard."""
    counts: Counter = Counter()
    for sample in iter_raw_samples(url):
        images = [
            k
            for k in sample
            if k.rsplit(".", 1)[-1] in IMAGE_EXTS and not k.startswith(("labels", "background"))
        ]
        main = next((k for k in images if k.startswith("image.")), images[0] if len(images) == 1 else None)
        if main is None or "labels.png" not in sample:
            counts["no_image_or_labels"] += 1
            continue
        try:
            image = _decode(sample[main])
            labels = _decode(sample["labels.png"]).astype(np.int64)
            if labels.ndim == 3:
                labels = labels[..., 0]
            bg_key = next((k for k in sample if k.startswith("background.")), None)
            background = _decode(sample[bg_key]) if bg_key else None
            sources, masks = decompose(image, labels, background, min_pixels)
        except (OSError, ValueError) as err:
            counts["unreadable"] += 1
            del err
            continue
        if len(sources) < 2:
            counts["no_component"] += 1
            continue
        meta = json.loads(sample["json"]) if "json" in sample else {}
        names = {int(c["label"]): c.get("name", "object") for c in meta.get("components", []) if "label" in c}
        labels_kept = sorted(int(v) for v in np.unique(labels) if v > 0 and (labels == v).sum() >= min_pixels)
        out_meta = {"instruction": dere_instruction([names.get(label, "object") for label in labels_kept]),
                    "task": "compose", "category": "dere", "n_refs": len(sources), "source": "curate_dere",
                    "orig_id": sample["__key__"], "ref_roles": ["scene"] + ["component"] * (len(sources) - 1),
                    "human_indices": [], "components": [{"label": label, "name": names.get(label, "object")}
                                                        for label in labels_kept]}  # fmt: skip
        out: dict[str, Any] = {"__key__": sample["__key__"], "json": out_meta, "target.png": png(image)}
        for k, (source, mask) in enumerate(zip(sources, masks)):
            out[f"ref{k}.png"] = png(source)
            if mask is not None:
                out[f"mask{k}.png"] = png(np.repeat(mask[..., None], 3, 2))
        writer.write(out)
        counts["components"] += len(sources) - 1
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The step's options."""
    parser.add_argument("--inputs", nargs="+", required=True, help="shards with image + labels.png")
    parser.add_argument("--out", required=True)
    parser.add_argument("--min-pixels", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--split", default="train")


def run(args: argparse.Namespace) -> Path:
    """Run the step from parsed arguments."""
    urls = input_shards(args.inputs)
    return run_sharded(
        urls, args.out, lambda i, url, w: dere_shard(i, url, w, args.min_pixels), "mico", args.split, args.workers,
        {"min_pixels": args.min_pixels}, "dere",
    )  # fmt: skip
