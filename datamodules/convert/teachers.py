"""Real images + conversations -> scene shards with teacher depth and segmentation: `omnilab data convert teachers`.

UniMRG (docs/methods/unimrg.md) trains on LLaVA images whose depth comes from Depth-Anything-V2 (ViT-L; its
relative inverse depth, `--grayscale --pred-only`) and whose segmentation comes from SAM (ViT-H) automatic masks
saved as a coloured mask. This step runs both teachers once and caches their outputs in the shards
(`datamodules/scenes.py` format: `image`, `depth.npy`, `seg.png`, `json` with the conversation as `qa`), so training
never runs a teacher.

- `--records FILE`: LLaVA-style JSON (a list) or JSON lines, each {"id", "image": path under `--image-root`,
  "conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}, ...]}; every
  human/gpt pair becomes a `qa` item (`<image>` removed).
- `--depth-model DIR`, `--sam-model DIR`: the teachers' weight folders in the hub's layout
  (`depth-anything/Depth-Anything-V2-Large-hf`, `facebook/sam-vit-huge`), loaded with the transformers classes
  `DepthAnythingForDepthEstimation` and `SamModel`; a path that does not exist is a clear error naming it.
- Segmentation: SAM prompted by a `--points-per-side`² grid of single points (SAM's automatic mask generator),
  the best of the three masks per point kept when its predicted IoU is at least `--iou-threshold` (SAM AMG:
  0.88), masks overlapping a kept one by IoU > 0.7 dropped, painted largest first with colours from a fixed
  seeded palette (SAM AMG's stability-score filter and crop layers are not reproduced).

Unreadable images and records without an image or a question/answer pair are skipped and counted per reason; a
record with a key outside RECORD_KEYS stops the conversion before a teacher runs, naming the record and the
nearest known key (`--ignore-keys` drops such keys).
"""

from __future__ import annotations

import argparse
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from rich.progress import track

from datamodules.convert.edit_jsonl import add_ignore_keys, check_keys
from datamodules.convert.restoration import sample_key
from datamodules.webdataset import ShardWriter, split_entry, write_index

TEACHER_HELP = {
    "depth": "Depth-Anything-V2 weights in the hub layout (e.g. depth-anything/Depth-Anything-V2-Large-hf)",
    "sam": "SAM weights in the hub layout (e.g. facebook/sam-vit-huge)",
}


def teacher_path(path: str | Path, kind: str) -> Path:
    """The teacher's weight folder; FileNotFoundError naming it and what it should hold when it does not exist."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"--{kind}-model {folder}: no config.json there; expected {TEACHER_HELP[kind]}"
        )
    return folder


class DepthTeacher:
    """Depth-Anything-V2: an RGB image -> its relative inverse depth (H x W float32, larger = nearer)."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoImageProcessor, DepthAnythingForDepthEstimation

        folder = teacher_path(path, "depth")
        self.model = DepthAnythingForDepthEstimation.from_pretrained(folder).eval()
        self.processor = AutoImageProcessor.from_pretrained(folder)

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        """The prediction resized (bicubic, as the released `--pred-only` script does) to the image's size."""
        inputs = self.processor(images=image, return_tensors="pt")
        pred = self.model(pixel_values=inputs["pixel_values"]).predicted_depth[:, None]
        pred = F.interpolate(pred, size=image.shape[:2], mode="bicubic", align_corners=False)
        return pred[0, 0].float().numpy().astype(np.float32)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """|a ∩ b| / |a ∪ b| of two boolean masks (0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def paint(masks: list[np.ndarray], shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A coloured H x W x 3 mask: background black, masks painted largest first, colour i from a seeded palette."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(32, 256, size=(max(len(masks), 1), 3), dtype=np.uint8)
    out = np.zeros((*shape, 3), dtype=np.uint8)
    for i in np.argsort([-int(m.sum()) for m in masks], kind="stable"):
        out[masks[i]] = palette[i]
    return out


class SegmentationTeacher:
    """SAM automatic masks (grid of point prompts) -> a coloured segmentation mask (H x W x 3 uint8)."""

    def __init__(
        self, path: str | Path, points_per_side: int = 32, iou_threshold: float = 0.88, batch: int = 64
    ) -> None:
        from transformers import SamModel, SamProcessor

        folder = teacher_path(path, "sam")
        self.model = SamModel.from_pretrained(folder).eval()
        self.processor = SamProcessor.from_pretrained(folder)
        self.points_per_side, self.iou_threshold, self.batch = points_per_side, iou_threshold, batch

    def grid(self, h: int, w: int) -> list[list[float]]:
        """The point prompts: cell centres of a points_per_side² grid over the image (x, y in pixels)."""
        n = self.points_per_side
        return [[(i + 0.5) * w / n, (j + 0.5) * h / n] for j in range(n) for i in range(n)]

    @torch.no_grad()
    def masks(self, image: np.ndarray) -> list[np.ndarray]:
        """The kept masks (boolean H x W), best of three per point, IoU-filtered and de-duplicated."""
        h, w = image.shape[:2]
        points = self.grid(h, w)
        pixels = self.processor(images=image, return_tensors="pt")
        embeddings = self.model.get_image_embeddings(pixels["pixel_values"])
        kept: list[np.ndarray] = []
        for start in range(0, len(points), self.batch):
            chunk = [[[p] for p in points[start : start + self.batch]]]
            inputs = self.processor(images=image, input_points=chunk, return_tensors="pt")
            out = self.model(
                image_embeddings=embeddings, input_points=inputs["input_points"], multimask_output=True
            )
            masks = self.processor.image_processor.post_process_masks(
                out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"]
            )[0]
            scores = out.iou_scores[0]
            best = scores.argmax(-1)
            for k in range(masks.shape[0]):
                if float(scores[k, best[k]]) < self.iou_threshold:
                    continue
                m = masks[k, best[k]].numpy().astype(bool)
                if m.any() and all(mask_iou(m, other) <= 0.7 for other in kept):
                    kept.append(m)
        return kept

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """The coloured segmentation of one image."""
        return paint(self.masks(image), image.shape[:2])


def qa_items(conversations: Any) -> list[dict[str, str]]:
    """Each (human, gpt) pair of a LLaVA conversation as {question, answer}, `<image>` removed."""
    items, question = [], None
    for turn in conversations or []:
        text = str(turn.get("value", "")).replace("<image>", "").strip()
        if turn.get("from") == "human":
            question = text
        elif turn.get("from") == "gpt" and question is not None:
            items.append({"question": question, "answer": text})
            question = None
    return items


RECORD_KEYS = ("id", "image", "conversations", "model")  # a LLaVA record (some name the model that wrote it)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON list or JSON lines file."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def checked_records(path: str | Path, ignore_keys: list[str] | tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The records of `path`; UnknownKey naming the first record with a key outside RECORD_KEYS."""
    rows = read_records(path)
    for i, row in enumerate(rows):
        check_keys(row, RECORD_KEYS, f"{path}: record {i + 1}", ignore_keys)
    return rows


def convert_records(
    records: str | Path,
    image_root: str | Path,
    out: str | Path,
    depth: DepthTeacher,
    seg: SegmentationTeacher,
    split: str = "train",
    shard_size: int = 200,
    limit: int | None = None,
    ignore_keys: list[str] | tuple[str, ...] = (),
) -> tuple[Path, int, Counter]:
    """Write one split of scene shards with the teachers' targets; return (index, written, skips per reason)."""
    rows = checked_records(records, ignore_keys)[:limit]
    skipped: Counter = Counter()
    keys: set[str] = set()
    written = 0
    with ShardWriter(out, split, max_count=shard_size) as writer:
        for row in track(rows, description=f"teachers {split}", transient=True):
            qa = qa_items(row.get("conversations"))
            if not row.get("image") or not qa:
                skipped["no_image_or_qa"] += 1
                continue
            path = Path(image_root) / str(row["image"])
            try:
                with Image.open(path) as img:
                    image = np.asarray(img.convert("RGB"))
            except (OSError, ValueError):
                skipped["unreadable_image"] += 1
                continue
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            writer.write(
                {
                    "__key__": sample_key(str(row.get("id") or path.stem), keys),
                    "image.png": buf.getvalue(),
                    "depth.npy": depth(image),
                    "seg.png": seg(image),
                    "json": {"caption": "", "edit": "", "qa": qa, "source": f"teachers:{row['image']}"},
                }
            )
            written += 1
        shards = writer.shards
    index = write_index(
        out,
        kind="scenes",
        splits={split: split_entry(shards, written)},
        skipped=dict(skipped),
    )
    return index, written, skipped


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The converter's options."""
    parser.add_argument(
        "--records", required=True, help="LLaVA-style JSON / JSON lines with image + conversations"
    )
    parser.add_argument("--image-root", required=True, help="folder the records' image paths are relative to")
    parser.add_argument("--out", required=True, help="output folder of the shards")
    parser.add_argument("--depth-model", required=True, help=TEACHER_HELP["depth"])
    parser.add_argument("--sam-model", required=True, help=TEACHER_HELP["sam"])
    parser.add_argument("--split", default="train")
    parser.add_argument(
        "--points-per-side", type=int, default=32, help="SAM AMG grid (32: 1024 point prompts)"
    )
    parser.add_argument("--iou-threshold", type=float, default=0.88, help="SAM AMG's predicted-IoU threshold")
    parser.add_argument("--shard-size", type=int, default=200)
    parser.add_argument("--limit", type=int, default=None, help="convert only the first N records")
    add_ignore_keys(parser)


def convert(args: argparse.Namespace) -> Path:
    """Run both teachers over the records and write the shards (the records' keys are checked first)."""
    checked_records(args.records, getattr(args, "ignore_keys", ()))
    depth = DepthTeacher(args.depth_model)
    seg = SegmentationTeacher(args.sam_model, args.points_per_side, args.iou_threshold)
    path, written, skipped = convert_records(
        args.records, args.image_root, args.out, depth, seg, args.split, args.shard_size, args.limit,
        getattr(args, "ignore_keys", ()),
    )  # fmt: skip
    print(f"teachers/{args.split}: wrote {written} samples -> {path}")
    for reason, count in sorted(skipped.items()):
        print(f"  skipped {count} ({reason})")
    return path
