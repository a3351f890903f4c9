"""HANDAL-X (CCMP's second benchmark) -> correspondence pair shards: `omnilab data convert handalx`.

HANDAL-X pairs two frames of one HANDAL video, i and i + 100, and asks for each object instance of frame i
in frame i + 100 (CCMP §6; CCMP's `SegSwap/build_handal.py`, which follows ObjectRelator's HANDAL-X). It
reads either layout CCMP's official code reads:

- the pair JSON (`handal_{train,test}_visual.json`, what `SegSwap/eval_handal.py` and `train_handal.py`
  read): a list of {"image": target path, "image_info": {file_name, height, width}, "anns": [{"segmentation":
  COCO RLE {counts, size}, "area", "category_id"}], "first_frame_image": source path, "first_frame_anns":
  [...], "new_img_id", "video_name"}, paths relative to the dataset root, the i-th of `first_frame_anns`
  and of `anns` the same instance (`--json`);
- the dataset folders `build_handal.py` makes that JSON from (`--from-folders`):
  `<root>/<object>/<split>/<video>/rgb/<frame>.jpg` and `<root>/<object>/<split>/<video>/mask/<frame>_000000.png`
  (one PNG per frame, pixel value = instance id, 0 = background). A pair is frame i and i + 100 of the
  natural-sorted frames, for every i with i + 100 in the video; its instances are the target's non-zero
  values (each must be in the source too, as `build_handal.py` asserts).

One sample is one (pair, instance), in the format of `datamodules/correspondence.py`:
- `json`: {take: the video ("<object>/<split>/<video>"), take_name: the JSON's video_name, object:
  "instance_<id>", src_cam = tgt_cam = "rgb", src_frame, tgt_frame (the frame numbers), setting "exo-exo"
  (two frames of one hand-held video), visible true, scored true, planned false (no submission file),
  src_native, tgt_native [H, W], split}.
- `src.jpg`, `tgt.jpg`: the frames' JPEG bytes as they are.
- `src_mask.png`, `tgt_mask.png`: uint8 {0, 255} instance masks at the frame size.
- `tgt_gt.png`: the same target mask: CCMP's HANDAL-X evaluation scores at the frame's own size (the
  prediction is brought back to it with nearest resizing), so the ground truth is the native mask.

The metric is the mean per-instance IoU (`metrics.correspondence.HandalInstanceIoU`: an instance is
(video, instance id); the `handalx` evaluation protocol of `lightning_modules.ccmp.CCMP`).
HANDAL-X has no validation split: `--val-fraction f` moves the videos whose hash falls under f from the
converted split to a "val" split (by video, so no video is in both). Bad records are counted skips per
reason; `index.json` follows the egoexo4d converter's (kind "correspondence", source "handalx").
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from rich.progress import track

from datamodules.convert.edit_jsonl import add_ignore_keys, check_keys
from datamodules.webdataset import ShardWriter, encode_member, read_index, write_index

SETTING = "exo-exo"
# a pair record of CCMP's handal_{split}_visual.json; any other key is refused (--ignore-keys)
RECORD_KEYS = ("image", "image_info", "anns", "first_frame_image", "first_frame_anns", "new_img_id", "video_name")  # fmt: skip
CAMERA = "rgb"
PAIR_GAP = 100  # build_handal.py: the target is 100 frames after the source
MEMBERS = ("json", "src.jpg", "src_mask.png", "tgt.jpg", "tgt_gt.png", "tgt_mask.png")
SKIP_REASONS = (
    "missing_frame",  # the source or target JPEG is not there
    "unreadable_frame",  # not a readable JPEG
    "bad_mask",  # an RLE that does not decode, or a mask PNG that is not one-channel
    "size_mismatch",  # the mask is not the frame's size
    "new_instance",  # a target instance the source frame does not have (build_handal.py asserts this)
)


class RecordError(ValueError):
    """A pair that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Instance:
    """One (pair, instance) of a layout; its masks are decoded when its sample is written."""

    video: str
    video_name: str
    src_path: str
    tgt_path: str
    instance: int
    src_mask: Any  # a COCO RLE dict, or (mask png path, instance id)
    tgt_mask: Any


@dataclass
class Report:
    """What one conversion wrote and skipped (instance-pair counts)."""

    index: Path
    splits: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """A few lines for the terminal."""
        parts = ", ".join(f"{s}: {n}" for s, n in sorted(self.splits.items()))
        lines = [f"handalx: wrote {sum(self.splits.values())} instance pairs ({parts}) -> {self.index}"]
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  skipped {count} ({reason}), e.g. {self.examples[reason]}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- the two layouts


def natural_key(name: str) -> list[Any]:
    """Sort key that orders "2" before "10" (natsort's, for frame names)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def frame_number(path: str) -> int:
    """The frame number of `.../rgb/000123.jpg` (123); the last run of digits in the file name."""
    digits = re.findall(r"\d+", Path(path).stem)
    if not digits:
        raise ValueError(f"no frame number in {path!r}")
    return int(digits[-1])


def video_of(path: str) -> str:
    """The video of a frame path `<object>/<split>/<video>/rgb/<frame>.jpg`: "<object>/<split>/<video>"."""
    return str(Path(path).parent.parent)


def instances_from_json(path: Path, ignore_keys: list[str] | tuple[str, ...] = ()) -> list[Instance]:
    """The (pair, instance)s of a CCMP pair JSON (handal_{split}_visual.json); UnknownKey on a key outside
    RECORD_KEYS."""
    if not path.is_file():
        raise FileNotFoundError(f"HANDAL-X pair JSON not found: {path}")
    records = json.loads(path.read_text())
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a list of pair records (handal_{{split}}_visual.json)")
    out = []
    for i, rec in enumerate(records):
        check_keys(rec, RECORD_KEYS, f"{path}: record {i}", ignore_keys)
    for i, rec in enumerate(records):
        try:
            src, tgt = rec["first_frame_image"], rec["image"]
            pairs = list(zip(rec["first_frame_anns"], rec["anns"], strict=True))
            video_name = str(rec.get("video_name", ""))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{path}: record {i}: not a HANDAL-X pair record ({type(err).__name__}: {err})"
            ) from err
        for first, ann in pairs:
            if first["category_id"] != ann["category_id"]:
                raise ValueError(
                    f"{path}: record {i}: first_frame_anns and anns disagree on the instance order"
                )
            out.append(
                Instance(
                    video_of(tgt),
                    video_name,
                    src,
                    tgt,
                    int(ann["category_id"]),
                    first["segmentation"],
                    ann["segmentation"],
                )
            )
    return out


def instances_from_folders(root: Path, split: str) -> list[Instance]:
    """The (pair, instance)s `build_handal.py` makes from `<root>/<object>/<split>/<video>/{rgb,mask}`."""
    if not root.is_dir():
        raise FileNotFoundError(f"HANDAL-X root not found: {root}")
    out = []
    for obj in sorted(p for p in root.iterdir() if p.is_dir()):
        for video in sorted(p for p in (obj / split).glob("*") if p.is_dir()):
            frames = sorted((p.stem for p in (video / "rgb").glob("*.jpg")), key=natural_key)
            rgb = video.relative_to(root) / "rgb"
            for i, frame in enumerate(frames[: max(0, len(frames) - PAIR_GAP)]):
                target = frames[i + PAIR_GAP]
                src_png, tgt_png = (
                    video / "mask" / f"{frame}_000000.png",
                    video / "mask" / f"{target}_000000.png",
                )
                for instance in instance_ids(tgt_png):
                    out.append(
                        Instance(
                            str(video.relative_to(root)), obj.name, str(rgb / f"{frame}.jpg"), str(rgb / f"{target}.jpg"),
                            instance, (src_png, instance), (tgt_png, instance),
                        )
                    )  # fmt: skip
    return out


def instance_ids(png: Path) -> list[int]:
    """The non-zero values of an instance-mask PNG ([] if it is missing or unreadable: the pair is then skipped)."""
    try:
        return [int(v) for v in np.unique(read_png(png)) if v != 0]
    except RecordError:
        return []


def read_png(path: Path) -> np.ndarray:
    """A one-channel PNG as an HxW array; RecordError("bad_mask") when it is missing or not one channel."""
    try:
        with Image.open(path) as img:
            arr = np.asarray(img)
    except Exception as err:
        raise RecordError("bad_mask", f"{path}: {type(err).__name__}: {err}") from err
    if arr.ndim != 2:
        raise RecordError("bad_mask", f"{path} has shape {arr.shape}, not one channel")
    return arr


def decode(spec: Any, what: str) -> np.ndarray:
    """The HxW bool mask of an instance: a COCO RLE dict, or (instance PNG, id)."""
    if isinstance(spec, tuple):
        png, instance = spec
        return read_png(png) == instance
    try:
        return mask_utils.decode({"size": list(spec["size"]), "counts": str(spec["counts"]).encode()}).astype(
            bool
        )
    except Exception as err:
        raise RecordError("bad_mask", f"{what}: {type(err).__name__}: {err}") from err


# --------------------------------------------------------------------------- samples


def frame_bytes(root: Path, rel: str) -> tuple[bytes, tuple[int, int]]:
    """(JPEG bytes, (H, W)) of a frame; RecordError when it is missing or not a JPEG."""
    path = root / rel
    if not path.is_file():
        raise RecordError("missing_frame", str(path))
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            ok, (w, h) = img.format == "JPEG", img.size
    except Exception as err:
        raise RecordError("unreadable_frame", f"{path}: {type(err).__name__}: {err}") from err
    if not ok:
        raise RecordError("unreadable_frame", f"{path} is not a JPEG")
    return data, (h, w)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", lambda m: f"~{ord(m.group()):02x}", text)


def sample(item: Instance, root: Path, split: str) -> dict[str, Any]:
    """The shard sample of one (pair, instance); raises RecordError to skip it."""
    src, src_hw = frame_bytes(root, item.src_path)
    tgt, tgt_hw = frame_bytes(root, item.tgt_path)
    src_mask, tgt_mask = decode(item.src_mask, item.src_path), decode(item.tgt_mask, item.tgt_path)
    for mask, hw, rel in ((src_mask, src_hw, item.src_path), (tgt_mask, tgt_hw, item.tgt_path)):
        if mask.shape != hw:
            raise RecordError(
                "size_mismatch", f"instance {item.instance} of {rel}: mask {mask.shape}, frame {hw}"
            )
    if not src_mask.any():
        raise RecordError(
            "new_instance", f"instance {item.instance} of {item.tgt_path} is not in {item.src_path}"
        )
    src_frame, tgt_frame = frame_number(item.src_path), frame_number(item.tgt_path)
    meta = {
        "take": item.video,
        "take_name": item.video_name,
        "object": f"instance_{item.instance}",
        "src_cam": CAMERA,
        "tgt_cam": CAMERA,
        "src_frame": src_frame,
        "tgt_frame": tgt_frame,
        "setting": SETTING,
        "visible": True,
        "scored": True,
        "planned": False,
        "src_native": list(src_hw),
        "tgt_native": list(tgt_hw),
        "split": split,
    }
    tgt_png = encode_member("png", tgt_mask.astype(np.uint8) * np.uint8(255))
    return {
        "__key__": f"{_safe(item.video)}_{item.instance}_{src_frame}-{tgt_frame}",
        "json": meta,
        "src.jpg": src,
        "src_mask.png": encode_member("png", src_mask.astype(np.uint8) * np.uint8(255)),
        "tgt.jpg": tgt,
        "tgt_mask.png": tgt_png,
        "tgt_gt.png": tgt_png,
    }


def split_of(video: str, split: str, val_fraction: float) -> str:
    """`split`, or "val" for the videos whose stable hash falls under `val_fraction`."""
    if val_fraction <= 0:
        return split
    digest = hashlib.blake2b(video.encode(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "little") / 2**64 < val_fraction else split


# --------------------------------------------------------------------------- conversion


def convert_split(
    out: str | Path,
    split: str,
    root: str | Path,
    json_path: str | Path | None = None,
    from_folders: bool = False,
    val_fraction: float = 0.0,
    shard_size: int = 200,
    ignore_keys: list[str] | tuple[str, ...] = (),
) -> Report:
    """Convert one HANDAL-X split (its pair JSON, or its folders) into `<out>/<split>-NNNNNN.tar` + index.json."""
    out, root = Path(out), Path(root)
    if (json_path is None) == (not from_folders):
        raise ValueError(
            "give exactly one of --json (the pair JSON) and --from-folders (the dataset folders)"
        )
    if not re.fullmatch(r"\w+", split):
        raise ValueError(f"split name {split!r} must be letters, digits or '_'")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    items = (
        instances_from_json(Path(json_path), ignore_keys)
        if json_path is not None
        else instances_from_folders(root, split)
    )
    names = sorted({split_of(i.video, split, val_fraction) for i in items} | {split})
    for name in names:
        for stale in out.glob(f"{name}-*.tar"):
            if re.fullmatch(rf"{name}-\d{{6}}\.tar", stale.name):
                stale.unlink()
    report = Report(index=out / "index.json")
    writers = {name: ShardWriter(out, name, max_count=shard_size) for name in names}
    keys: set[str] = set()
    try:
        for item in track(items, description=f"handalx/{split}", transient=True):
            name = split_of(item.video, split, val_fraction)
            try:
                record = sample(item, root, name)
            except RecordError as err:
                report.skipped[err.reason] += 1
                report.examples.setdefault(err.reason, str(err))
                continue
            if record["__key__"] in keys:
                raise ValueError(f"two instance pairs share the key {record['__key__']!r}")
            keys.add(record["__key__"])
            writers[name].write(record)
            report.splits[name] += 1
    finally:
        for writer in writers.values():
            writer.close()
    index = read_index(out) or {"kind": "correspondence", "source": "handalx", "splits": {}}
    if (index.get("kind"), index.get("source")) != ("correspondence", "handalx"):
        raise ValueError(
            f"{out / 'index.json'} belongs to another dataset; convert handalx into another folder"
        )
    splits = dict(index.get("splits", {}))
    for name, writer in writers.items():
        splits[name] = {
            "shards": [shard for shard, _ in writer.shards],
            "counts": [n for _, n in writer.shards],
            "samples": report.splits[name],
            "settings": {SETTING: report.splits[name]},
            "options": {
                "from": "folders" if from_folders else Path(json_path).name,
                "val_fraction": val_fraction,
            },
        }
    skipped = {**index.get("skipped", {}), split: dict(sorted(report.skipped.items()))}
    report.index = write_index(
        out,
        kind="correspondence",
        source="handalx",
        seed=0,
        keys=sorted(MEMBERS),
        splits=splits,
        skipped=skipped,
    )
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The converter's command-line options."""
    parser.add_argument(
        "--root", type=Path, required=True, help="the HANDAL-X root the paths are relative to"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="CCMP's pair JSON, e.g. handal/handal_test_visual.json"
    )
    parser.add_argument(
        "--from-folders",
        action="store_true",
        help="pair <root>/<object>/<split>/<video> frames i, i+100 instead",
    )
    parser.add_argument(
        "--split", required=True, help="output split name (and the folder split with --from-folders)"
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.0, help="share of videos moved to a 'val' split"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (an index.json there is merged)"
    )
    parser.add_argument("--shard-size", type=int, default=200, help="instance pairs per shard")
    add_ignore_keys(parser)


def convert(args: argparse.Namespace) -> Path:
    """Run the conversion the parsed arguments describe, print its summary and return the index path."""
    report = convert_split(
        args.out, args.split, args.root, args.json, args.from_folders, args.val_fraction, args.shard_size,
        getattr(args, "ignore_keys", ()),
    )  # fmt: skip
    print(report.summary())
    return report.index
