"""`omnilab data curate compose`: composition samples synthesized from collected source images.

MICo synthesizes its composites with proprietary image models from curated sources and prompts; here the
target is a collage laid out exactly, so the samples (and any model trained on them) have a known answer:
- the sources of one sample are 2-`max_refs` consecutive images of a shard after a seeded shuffle, a
  "scene" (by the collected json's role) first when the group has one;
- the canvas is the scene resized to `--size` on its long side, else a light flat background of that size;
- every other source is cut out by its foreground (pixels farther than `--tau` in RGB from the median of
  its border: a source on a plain background, as MICo's object and person crops are; the whole image when
  that leaves under 5% of it) and pasted, scaled to 80% of a cell, into its own cell of a 3x3 grid;
- the instruction names each source by its image number and role ("Put the object from image 2 at the top
  left ... in the scene of image 1."); the json has category (datamodules/mico.py), ref_roles,
  human_indices and "program" (cell and box of every placement).
The targets are collages, not the natural composites of MICo: this makes the pipeline's data and exact
checks, and a generator (an editing model) can replace the collage where one is available.
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
from datamodules.curate.filter import main_image
from datamodules.mico import category_from_kinds
from datamodules.synth.multiref import POSITIONS, png
from datamodules.webdataset import ShardWriter, iter_raw_samples
from omnilab.seeding import numpy_rng

WORDS = {"human": "person", "object": "object", "clothes": "garment", "scene": "scene"}


def foreground(image: np.ndarray, tau: float) -> np.ndarray:
    """Pixels farther than tau from the median border colour; all of them when that is under 5% of the image."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float64)
    distance = np.linalg.norm(image.astype(np.float64) - np.median(border, 0), axis=-1)
    mask = distance > tau
    return mask if mask.mean() >= 0.05 else np.ones(mask.shape, bool)


def collage(
    sources: list[np.ndarray], roles: list[str], size: int, tau: float, rng: np.random.Generator
) -> tuple[np.ndarray, list[dict[str, Any]], str]:
    """(target, placements, instruction) of one composition (see the module docstring)."""
    if roles[0] == "scene":
        h, w = sources[0].shape[:2]
        scale = size / max(h, w)
        width, height = max(8, round(w * scale)), max(8, round(h * scale))
        canvas = np.asarray(Image.fromarray(sources[0]).resize((width, height), Image.BICUBIC)).copy()
        first = 1
    else:
        width = height = size
        canvas = np.full((height, width, 3), 245, np.uint8)
        first = 0
    cells = [str(c) for c in rng.permutation(list(POSITIONS))]
    placements, parts = [], []
    for k in range(first, len(sources)):
        source, cell = sources[k], cells.pop()
        mask = foreground(source, tau)
        ys, xs = np.nonzero(mask)
        crop, crop_mask = (
            source[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1],
            mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1],
        )
        cw, ch = 0.8 * width / 3, 0.8 * height / 3
        scale = min(cw / crop.shape[1], ch / crop.shape[0])
        bw, bh = max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale))
        pixels = np.asarray(Image.fromarray(crop).resize((bw, bh), Image.BICUBIC))
        inside = (
            np.asarray(Image.fromarray(crop_mask.astype(np.uint8) * 255).resize((bw, bh), Image.NEAREST))
            > 127
        )
        row, col = POSITIONS[cell]
        x0, y0 = round((col + 0.5) * width / 3 - bw / 2), round((row + 0.5) * height / 3 - bh / 2)
        canvas[y0 : y0 + bh, x0 : x0 + bw][inside] = pixels[inside]
        placements.append({"op": "place", "ref": k + 1, "position": cell, "box": [x0, y0, bw, bh]})
        parts.append(f"the {WORDS.get(roles[k], 'object')} from image {k + 1} at the {cell}")
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    where = "in the scene of image 1" if first else "on a light grey background"
    return canvas, placements, f"Put {listed} {where}."


def compose_shard(
    index: int, url: str, writer: ShardWriter, seed: int, min_refs: int, max_refs: int, size: int, tau: float
) -> Counter:
    """Group one shard's images into compositions and write them."""
    counts: Counter = Counter()
    rng = numpy_rng(seed, "curate-compose", index)
    items = []
    for sample in iter_raw_samples(url):
        found = main_image(sample)
        if found is None:
            counts["no_image"] += 1
            continue
        role = json.loads(sample["json"]).get("role", "object") if "json" in sample else "object"
        with Image.open(io.BytesIO(found[1])) as img:
            items.append(
                (sample["__key__"], np.array(img.convert("RGB")), role if role in WORDS else "object")
            )
    order = [int(i) for i in rng.permutation(len(items))]
    g = 0
    while len(order) >= min_refs:
        n = int(rng.integers(min_refs, max_refs + 1))
        group = [items[i] for i in order[:n]]
        order = order[n:]
        scenes = [x for x in group if x[2] == "scene"][:1]
        group = scenes + [x for x in group if x[2] != "scene"]
        roles = [x[2] for x in group]
        target, program, instruction = collage([x[1] for x in group], roles, size, tau, rng)
        meta = {"instruction": instruction, "task": "compose", "n_refs": len(group), "source": "curate_compose",
                "orig_id": "+".join(x[0] for x in group), "ref_roles": roles,
                "category": category_from_kinds("human" in roles, "object" in roles, "clothes" in roles,
                                                "scene" in roles),
                "human_indices": [i for i, r in enumerate(roles) if r == "human"], "program": program}  # fmt: skip
        sample: dict[str, Any] = {
            "__key__": f"comp{index:06d}_{g:05d}",
            "json": meta,
            "target.png": png(target),
        }
        for k, (_, image, _) in enumerate(group):
            sample[f"ref{k}.png"] = png(image)
        writer.write(sample)
        counts[meta["category"]] += 1
        g += 1
    counts["leftover_images"] += len(order)
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The step's options."""
    parser.add_argument("--inputs", nargs="+", required=True, help="collected (and filtered) image shards")
    parser.add_argument("--out", required=True)
    parser.add_argument("--min-refs", type=int, default=2)
    parser.add_argument("--max-refs", type=int, default=4)
    parser.add_argument("--size", type=int, default=512, help="the target's long side")
    parser.add_argument("--tau", type=float, default=40.0, help="foreground distance to the border colour")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--split", default="train")


def run(args: argparse.Namespace) -> Path:
    """Run the step from parsed arguments."""
    if not 2 <= args.min_refs <= args.max_refs <= 9:
        raise ValueError("need 2 <= --min-refs <= --max-refs <= 9 (a 3x3 grid)")
    urls = input_shards(args.inputs)
    return run_sharded(
        urls, args.out,
        lambda i, url, w: compose_shard(i, url, w, args.seed, args.min_refs, args.max_refs, args.size, args.tau),
        "mico", args.split, args.workers, {k: v for k, v in vars(args).items() if k != "inputs"}, "compose",
    )  # fmt: skip
