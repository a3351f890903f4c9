"""Ego-Exo4D correspondence (relations) -> pair shards: `omnilab data convert egoexo4d`.

Implements the data side of CCMP (docs/methods/ccmp.md): §7 (the raw `relations_{split}.json`
with LZString-compressed COCO RLE, and the processed frame folders `<frames>/<take_uid>/<cam>/<frame>.jpg`,
Aria downscaled by 2 and exo by 4), §5 (which (take, object, camera pair, frame) instances the official
evaluation scores, and its ground truth resized nearest to longest side 480) and §4 (the asynchronous
same-view and relaxed-alignment training pairs).

One sample is one correspondence pair; its members (the format the correspondence datamodule reads):
- `json`: {take, take_name, object, src_cam, tgt_cam, src_frame, tgt_frame, setting ("ego-exo" | "exo-ego" |
  "ego-ego" | "exo-exo"), visible, scored, planned, src_native [H, W], tgt_native [H, W], split}.
- `src.jpg`, `tgt.jpg`: the processed frames, the JPEG files' bytes as they are (not re-encoded).
- `src_mask.png`, `tgt_mask.png`: uint8 {0, 255} masks at the frame's size, decoded at the native size
  and resized nearest; the target's is all zeros when the object is not visible there. An annotated mask
  may be empty (all zeros): such a source is kept, as the official evaluation queries it too.
- `tgt_gt.png`: the official evaluation ground truth: the native target mask resized nearest to longest
  side 480 (exo 270x480, Aria 480x480), uint8 {0, 255}; all zeros when not visible.

Pairs (§5), exactly what the official evaluation loop (`evaluate_egoexo.py` / `evaluate_exoego.py`
`evaluate_take`) iterates: for each object with an ego camera (name contains "aria"), each of its exo
cameras and each direction, every frame f that has a source mask (`annotation` key, empty masks
included); `planned` (always true for these) marks the pairs the submission must hold (`validate_predictions`
asks for every such f), `scored` those the evaluators score (f in the target camera's `annotated_frames`),
`visible` whether the target has a mask at f (the rest count only for VA). `--same-view` adds, per masked
source frame, one other masked frame of the same camera (CCMP's `create_pairs.py`); `--relaxed-alignment`
adds the same for the other view (CCMP's training pairs); neither is planned or scored.

`<split>-plan.json` is the submission the official `validate_predictions` requires: {split, takes: {take:
{take_name, subsample_idx, objects: {object: {"ego-exo" | "exo-ego": {"<src>_<tgt>": {frames, shape}}}}}}},
every annotated object of every take (an object without an ego camera has no pairs, but the official check
counts it), `shape` the target's evaluation shape. `metrics.correspondence.SubmissionWriter` fills it.
Bad masks and frames are skipped and counted per reason (in pairs); a malformed relations file raises, and so
does a take or camera entry with a key outside TAKE_KEYS / CAMERA_KEYS (naming it and the nearest known key;
`--ignore-keys` drops such keys).
`index.json` (merged when converting several splits into one folder): kind "correspondence", source
"egoexo4d", splits.<split> = {shards, counts, samples, settings, visible, scored, plan, options},
skipped.<split> = {reason: pairs}.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lzstring
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from rich.progress import track

from datamodules.convert.edit_jsonl import add_ignore_keys, check_keys
from datamodules.webdataset import ShardWriter, encode_member, read_index, write_index
from metrics.correspondence import eval_shape, resize_longest
from omnilab.seeding import numpy_rng

SETTINGS = ("ego-exo", "exo-ego", "ego-ego", "exo-exo")
TAKE_KEYS = ("take_name", "object_masks")  # a take record of relations_{split}.json (§7); others are refused
CAMERA_KEYS = ("annotated_frames", "annotation")  # one object's entry for one camera
MEMBERS = ("json", "src.jpg", "src_mask.png", "tgt.jpg", "tgt_gt.png", "tgt_mask.png")
DOWNSCALE = {True: 2, False: 4}  # processed frame = native // this (Aria: True, exo: False), §7
SKIP_REASONS = (
    "take_not_in_split",  # --split-file does not list the take under --split
    "missing_frame",  # no <frames>/<take>/<cam>/<frame>.jpg
    "unreadable_frame",  # the frame file is not a readable JPEG
    "undecodable_mask",  # the LZString or RLE string does not decode
    "rle_size_mismatch",  # the RLE's runs do not cover exactly height x width pixels
    "native_size_mismatch",  # the frame is not the native size // 2 (Aria) or // 4 (exo)
    "unknown_native_size",  # invisible target whose camera has no single native size in the take
)


class SchemaError(ValueError):
    """The relations file does not have the released schema (the message names the file and the key)."""


class MaskError(ValueError):
    """A mask or frame that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Pair:
    """One correspondence pair: query mask in (src_cam, src_frame), answer in (tgt_cam, tgt_frame)."""

    take: str
    obj: str
    src_cam: str
    tgt_cam: str
    src_frame: int
    tgt_frame: int
    setting: str
    visible: bool
    scored: bool = False  # the official evaluators score it (f in the target's annotated_frames)
    planned: bool = False  # the submission must hold it (a synchronous cross-view pair)


@dataclass
class Report:
    """What one conversion wrote and skipped (pair counts)."""

    split: str
    index: Path
    settings: Counter = field(default_factory=Counter)
    visible: int = 0
    scored: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    notes: Counter = field(default_factory=Counter)

    @property
    def samples(self) -> int:
        """Pairs written."""
        return sum(self.settings.values())

    def summary(self) -> str:
        """A few lines for the terminal: pairs per setting, skips per reason with one example each."""
        lines = [
            f"egoexo4d/{self.split}: wrote {self.samples} pairs ({self.visible} visible, {self.scored} scored)"
            f" -> {self.index}",
            "  " + ", ".join(f"{s}: {self.settings[s]}" for s in SETTINGS if self.settings[s]),
        ]
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  skipped {count} ({reason}), e.g. {self.examples[reason]}")
        for note, count in sorted(self.notes.items()):
            lines.append(f"  note: {count} pairs with {note} (kept, as the official evaluation scores them)")
        lines.append(f"  submission plan: {self.index.parent / (self.split + '-plan.json')}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- relations: schema, masks


def is_ego(cam: str) -> bool:
    """Whether a camera is the egocentric one (the official rule: its name contains "aria")."""
    return "aria" in cam


def _require(ok: bool, path: Path, key: str, what: str) -> None:
    if not ok:
        raise SchemaError(f"{path}: {key}: {what}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_relations(path: str | Path, ignore_keys: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Read `relations_{split}.json`, check the released schema and return its `annotations` by take uid."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"relations file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SchemaError(f"{path}: not valid JSON: {err}") from err
    _require(
        isinstance(data, dict) and isinstance(data.get("annotations"), dict), path, "annotations", "missing"
    )
    for take_uid, take in data["annotations"].items():
        at = f"annotations.{take_uid}"
        _require(isinstance(take, dict), path, at, "not an object")
        check_keys(take, TAKE_KEYS, f"{path}: {at}", ignore_keys)
        _require(isinstance(take.get("take_name"), str), path, f"{at}.take_name", "missing or not a string")
        objects = take.get("object_masks")
        _require(
            isinstance(objects, dict), path, f"{at}.object_masks", "missing or not {object: {camera: ...}}"
        )
        for obj, cams in objects.items():
            _require(isinstance(cams, dict), path, f"{at}.object_masks.{obj}", "not {camera: ...}")
            egos = sorted(c for c in cams if is_ego(c))
            _require(len(egos) <= 1, path, f"{at}.object_masks.{obj}", f"several ego cameras {egos}")
            for cam, entry in cams.items():
                ck = f"{at}.object_masks.{obj}.{cam}"
                _require(isinstance(entry, dict), path, ck, "not an object")
                check_keys(entry, CAMERA_KEYS, f"{path}: {ck}", ignore_keys)
                frames = entry.get("annotated_frames")
                _require(
                    isinstance(frames, list) and all(_is_int(f) for f in frames),
                    path,
                    f"{ck}.annotated_frames",
                    "missing or not a list of integer frame indices",
                )
                masks = entry.get("annotation")
                _require(isinstance(masks, dict), path, f"{ck}.annotation", "missing or not {frame: mask}")
                for frame, mask in masks.items():
                    fk = f"{ck}.annotation.{frame}"
                    _require(
                        frame.isascii() and frame.isdigit() and str(int(frame)) == frame,
                        path,
                        fk,
                        "bad frame",
                    )
                    _require(isinstance(mask, dict), path, fk, "not an object")
                    for name in ("width", "height"):
                        ok = _is_int(mask.get(name)) and mask[name] > 0
                        _require(ok, path, f"{fk}.{name}", "missing or not a positive integer")
                    _require(isinstance(mask.get("encodedMask"), str), path, f"{fk}.encodedMask", "missing")
    return data["annotations"]


def rle_counts(counts: str) -> list[int]:
    """The run lengths of a COCO compressed RLE string (pycocotools' `rleFrString`, in Python)."""
    runs: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts):
                raise MaskError("undecodable_mask", "RLE string ends inside a run")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise MaskError("undecodable_mask", f"character {counts[p]!r} is not RLE")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def decode_mask(entry: dict[str, Any]) -> np.ndarray:
    """Decode one relations mask {width, height, encodedMask} to an HxW uint8 {0, 1} array at native size."""
    height, width = entry["height"], entry["width"]
    try:
        counts = lzstring.LZString().decompressFromEncodedURIComponent(entry["encodedMask"])
    except Exception as err:
        raise MaskError("undecodable_mask", f"LZString: {type(err).__name__}: {err}") from err
    if not counts:
        raise MaskError("undecodable_mask", "LZString gives an empty string")
    runs = rle_counts(counts)
    if any(r < 0 for r in runs) or sum(runs) != height * width:
        raise MaskError(
            "rle_size_mismatch", f"runs cover {sum(runs)} pixels, size {height}x{width} has {height * width}"
        )
    return mask_utils.decode({"size": [height, width], "counts": counts.encode()})


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    # cv2.INTER_NEAREST's double arithmetic, floor(i * (1 / (n_out / n_in))) clamped, as `resize_longest`
    # does; the exact floor(i * n_in / n_out) differs from cv2 for some sizes (e.g. 2 -> 98).
    src = np.floor(np.arange(n_out, dtype=np.float64) * (1.0 / (n_out / n_in))).astype(np.int64)
    return np.minimum(src, n_in - 1)


def resize_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a 2-D array to height x width as cv2.resize(..., INTER_NEAREST) does (for the frame size)."""
    return mask[_nearest_index(mask.shape[0], height)[:, None], _nearest_index(mask.shape[1], width)[None, :]]


# --------------------------------------------------------------------------- pairs


def _other_frame(frames: list[int], frame: int, seed: int, *where: str | int) -> int | None:
    others = [f for f in frames if f != frame]
    if not others:
        return None
    return others[int(numpy_rng(seed, "egoexo4d", *where, frame).integers(len(others)))]


def plan_pairs(
    take_uid: str, take: dict[str, Any], same_view: bool = False, relaxed: bool = False, seed: int = 0
) -> list[Pair]:
    """The pairs of one take: what the official evaluation loop iterates (§5), plus optional asynchronous pairs (§4).

    For an object with one ego camera E, each exo camera X: ego-exo pairs (E -> X) at every frame with an E
    mask, exo-ego pairs (X -> E) at every frame with an X mask; scored when the frame is in the target's
    `annotated_frames`, visible when the target has a mask there. An object without an ego camera has none.
    """
    pairs: list[Pair] = []
    for obj in sorted(take["object_masks"]):
        cams = take["object_masks"][obj]
        masked = {cam: sorted(int(f) for f in cams[cam]["annotation"]) for cam in cams}
        egos = sorted(c for c in cams if is_ego(c))
        exos = sorted(c for c in cams if not is_ego(c))
        cross = [(e, x, "ego-exo") for e in egos for x in exos] + [
            (x, e, "exo-ego") for e in egos for x in exos
        ]
        for src, tgt, setting in cross:
            annotated, target_masks = set(cams[tgt]["annotated_frames"]), set(masked[tgt])
            for f in masked[src]:
                pairs.append(
                    Pair(take_uid, obj, src, tgt, f, f, setting, f in target_masks, f in annotated, True)
                )
            for f in masked[src] if relaxed else []:
                g = _other_frame(masked[tgt], f, seed, take_uid, obj, src, tgt)
                if g is not None:
                    pairs.append(Pair(take_uid, obj, src, tgt, f, g, setting, True))
        for cam in sorted(cams) if same_view else []:
            setting = "ego-ego" if is_ego(cam) else "exo-exo"
            for f in masked[cam]:
                g = _other_frame(masked[cam], f, seed, take_uid, obj, cam, cam)
                if g is not None:
                    pairs.append(Pair(take_uid, obj, cam, cam, f, g, setting, True))
    return pairs


def native_sizes(take: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """{camera: (H, W)} of the cameras whose masks in this take all have one native size."""
    sizes: dict[str, set[tuple[int, int]]] = {}
    for cams in take["object_masks"].values():
        for cam, entry in cams.items():
            for m in entry["annotation"].values():
                sizes.setdefault(cam, set()).add((m["height"], m["width"]))
    return {cam: next(iter(s)) for cam, s in sizes.items() if len(s) == 1}


def submission_plan(take: dict[str, Any], pairs: list[Pair]) -> dict[str, Any]:
    """The take's entry of `<split>-plan.json`: every annotated object and the planned pairs' frames and shapes."""
    native = native_sizes(take)
    objects: dict[str, dict[str, Any]] = {obj: {} for obj in sorted(take["object_masks"])}
    for pair in pairs:
        if not pair.planned:
            continue
        direction = objects[pair.obj].setdefault(pair.setting, {})
        entry = direction.setdefault(
            f"{pair.src_cam}_{pair.tgt_cam}",
            {
                "frames": [],
                "shape": list(eval_shape(*native[pair.tgt_cam])) if pair.tgt_cam in native else None,
            },
        )
        entry["frames"].append(pair.tgt_frame)
    frames = {
        int(f) for cams in take["object_masks"].values() for e in cams.values() for f in e["annotation"]
    }
    return {"take_name": take["take_name"], "subsample_idx": sorted(frames), "objects": objects}


_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def _safe(text: str) -> str:
    # Injective: keep [A-Za-z0-9_-], write any other UTF-8 byte as ~XX ("cutting board" -> "cutting~20board").
    return "".join(chr(b) if chr(b) in _KEY_CHARS else f"~{b:02x}" for b in text.encode())


def pair_key(pair: Pair) -> str:
    """The sample key: `<take>_<object>_<srccam>-<tgtcam>_<srcframe>-<tgtframe>`, no '.' or '/'."""
    cams = f"{_safe(pair.src_cam)}-{_safe(pair.tgt_cam)}"
    return f"{_safe(pair.take)}_{_safe(pair.obj)}_{cams}_{pair.src_frame}-{pair.tgt_frame}"


# --------------------------------------------------------------------------- one take -> samples


class _Take:
    """Frames and masks of one take, each read and decoded once (masks cached as encoded PNGs)."""

    def __init__(self, take_uid: str, take: dict[str, Any], frames_root: Path) -> None:
        self.uid, self.take, self.root = take_uid, take, frames_root
        self.frames: dict[tuple[str, int], tuple[Path, tuple[int, int]] | MaskError] = {}
        self.masks: dict[tuple[str, str, int], tuple[tuple[int, int], bytes, bytes, bool] | MaskError] = {}
        self.native = native_sizes(take)

    def frame(self, cam: str, f: int) -> tuple[Path, tuple[int, int]]:
        """(path, (H, W)) of a processed frame; raises MaskError when it is missing or unreadable."""
        if (cam, f) not in self.frames:
            path = self.root / self.uid / cam / f"{f}.jpg"
            try:
                if not path.is_file():
                    raise MaskError("missing_frame", str(path))
                try:
                    with Image.open(path) as img:
                        ok, (w, h) = img.format == "JPEG", img.size
                except Exception as err:
                    raise MaskError("unreadable_frame", f"{path}: {type(err).__name__}: {err}") from err
                if not ok:
                    raise MaskError("unreadable_frame", f"{path} is not a JPEG")
                self.frames[cam, f] = (path, (h, w))
            except MaskError as err:
                self.frames[cam, f] = err
        got = self.frames[cam, f]
        if isinstance(got, MaskError):
            raise got
        return got

    def check_native(self, cam: str, f: int, native: tuple[int, int]) -> tuple[int, int]:
        """The frame size, checked to be the native size // 2 (Aria) or // 4 (exo); raises MaskError."""
        _, size = self.frame(cam, f)
        s = DOWNSCALE[is_ego(cam)]
        if size != (native[0] // s, native[1] // s):
            raise MaskError(
                "native_size_mismatch",
                f"{self.uid}/{cam}/{f}.jpg is {size[0]}x{size[1]}, mask {native} // {s}",
            )
        return size

    def mask(self, obj: str, cam: str, f: int) -> tuple[tuple[int, int], bytes, bytes, bool]:
        """(native [H, W], PNG at the frame size, PNG at the evaluation size, empty) of one mask."""
        if (obj, cam, f) not in self.masks:
            entry = self.take["object_masks"][obj][cam]["annotation"][str(f)]
            native = (entry["height"], entry["width"])
            try:
                size = self.check_native(cam, f, native)
                m = decode_mask(entry)
                at_frame, at_eval = (
                    resize_nearest(m, *size) * np.uint8(255),
                    resize_longest(m) * np.uint8(255),
                )
                self.masks[obj, cam, f] = (
                    native,
                    encode_member("png", at_frame),
                    encode_member("png", at_eval),
                    not m.any(),
                )
            except MaskError as err:
                self.masks[obj, cam, f] = err
        got = self.masks[obj, cam, f]
        if isinstance(got, MaskError):
            raise got
        return got

    def sample(self, pair: Pair, split: str) -> tuple[dict[str, Any], bool, bool]:
        """The shard sample of a pair and whether its source / target masks are empty; MaskError skips it."""
        src_path, _ = self.frame(pair.src_cam, pair.src_frame)
        tgt_path, tgt_size = self.frame(pair.tgt_cam, pair.tgt_frame)
        src_native, src_mask, _, src_empty = self.mask(pair.obj, pair.src_cam, pair.src_frame)
        if pair.visible:
            tgt_native, tgt_mask, tgt_gt, tgt_empty = self.mask(pair.obj, pair.tgt_cam, pair.tgt_frame)
        else:
            if pair.tgt_cam not in self.native:
                raise MaskError("unknown_native_size", f"{self.uid}/{pair.tgt_cam} has no single mask size")
            tgt_native, tgt_empty = self.native[pair.tgt_cam], False
            self.check_native(pair.tgt_cam, pair.tgt_frame, tgt_native)
            tgt_mask = _zeros_png(*tgt_size)
            tgt_gt = _zeros_png(*resize_longest(np.broadcast_to(np.uint8(0), tgt_native)).shape)
        meta = {
            "take": self.uid,
            "take_name": self.take["take_name"],
            "object": pair.obj,
            "src_cam": pair.src_cam,
            "tgt_cam": pair.tgt_cam,
            "src_frame": pair.src_frame,
            "tgt_frame": pair.tgt_frame,
            "setting": pair.setting,
            "visible": pair.visible,
            "scored": pair.scored,
            "planned": pair.planned,
            "src_native": list(src_native),
            "tgt_native": list(tgt_native),
            "split": split,
        }
        sample = {
            "__key__": pair_key(pair),
            "json": meta,
            "src.jpg": src_path.read_bytes(),
            "src_mask.png": src_mask,
            "tgt.jpg": tgt_path.read_bytes(),
            "tgt_mask.png": tgt_mask,
            "tgt_gt.png": tgt_gt,
        }
        return sample, src_empty, tgt_empty


_ZEROS: dict[tuple[int, int], bytes] = {}


def _zeros_png(height: int, width: int) -> bytes:
    if (height, width) not in _ZEROS:
        _ZEROS[height, width] = encode_member("png", np.zeros((height, width), np.uint8))
    return _ZEROS[height, width]


# --------------------------------------------------------------------------- conversion


def _split_takes(split_file: Path, split: str) -> set[str]:
    if not split_file.is_file():
        raise FileNotFoundError(f"split file not found: {split_file}")
    splits = json.loads(split_file.read_text())
    if not isinstance(splits, dict) or not isinstance(splits.get(split), list):
        raise SchemaError(f"{split_file}: {split}: missing or not a list of take uids")
    return set(splits[split])


def _merged_index(out: Path, split: str, entry: dict[str, Any], skipped: dict[str, int], seed: int) -> Path:
    index = read_index(out) or {"kind": "correspondence", "source": "egoexo4d", "seed": seed, "splits": {}}
    if (index.get("kind"), index.get("source"), index.get("seed")) != ("correspondence", "egoexo4d", seed):
        raise ValueError(
            f"{out / 'index.json'} holds kind={index.get('kind')!r} source={index.get('source')!r} "
            f"seed={index.get('seed')!r}; convert egoexo4d (seed {seed}) into another folder"
        )
    splits = {**index.get("splits", {}), split: entry}
    all_skipped = {**index.get("skipped", {}), split: skipped}
    return write_index(
        out,
        kind="correspondence",
        seed=seed,
        keys=sorted(MEMBERS),
        splits=splits,
        source="egoexo4d",
        skipped=all_skipped,
    )


def convert_split(
    relations: str | Path,
    frames: str | Path,
    out: str | Path,
    split: str | None = None,
    split_file: str | Path | None = None,
    same_view: bool = False,
    relaxed: bool = False,
    shard_size: int = 200,
    seed: int = 0,
    ignore_keys: list[str] | tuple[str, ...] = (),
) -> Report:
    """Convert one relations file into `<out>/<split>-NNNNNN.tar` + index.json; return what was written."""
    relations, frames, out = Path(relations), Path(frames), Path(out)
    if split is None:
        found = re.fullmatch(r"relations_(\w+)\.json", relations.name)
        if found is None:
            raise ValueError(f"cannot infer the split from {relations.name!r}; pass --split")
        split = found.group(1)
    if not re.fullmatch(r"\w+", split):
        raise ValueError(f"split name {split!r} must be letters, digits or '_'")
    annotations = load_relations(relations, ignore_keys)
    if not frames.is_dir():
        raise FileNotFoundError(f"frames root not found: {frames}")
    allowed = _split_takes(Path(split_file), split) if split_file is not None else None
    for stale in out.glob(f"{split}-*.tar"):  # a previous conversion of this split: replaced, not mixed in
        if re.fullmatch(rf"{split}-\d{{6}}\.tar", stale.name):
            stale.unlink()
    report = Report(split=split, index=out / "index.json")
    keys: set[str] = set()
    plan: dict[str, Any] = {"split": split, "takes": {}}
    with ShardWriter(out, split, max_count=shard_size) as writer:
        for take_uid in track(sorted(annotations), description=f"egoexo4d/{split}", transient=True):
            pairs = plan_pairs(take_uid, annotations[take_uid], same_view, relaxed, seed)
            if allowed is not None and take_uid not in allowed:
                report.skipped["take_not_in_split"] += len(pairs)
                report.examples.setdefault("take_not_in_split", f"{take_uid} not in {split_file}[{split!r}]")
                continue
            plan["takes"][take_uid] = submission_plan(annotations[take_uid], pairs)
            take = _Take(take_uid, annotations[take_uid], frames)
            for pair in pairs:
                try:
                    sample, src_empty, tgt_empty = take.sample(pair, split)
                except MaskError as err:
                    report.skipped[err.reason] += 1
                    report.examples.setdefault(err.reason, f"{pair_key(pair)}: {err}")
                    continue
                if sample["__key__"] in keys:
                    raise ValueError(
                        f"two pairs share the key {sample['__key__']!r} (object or camera names)"
                    )
                keys.add(sample["__key__"])
                writer.write(sample)
                report.settings[pair.setting] += 1
                report.visible += pair.visible
                report.scored += pair.scored
                if pair.visible and tgt_empty:
                    report.notes["an empty target mask"] += 1
                if src_empty:
                    report.notes["an empty source mask"] += 1
    plan_path = out / f"{split}-plan.json"
    plan_path.write_text(json.dumps(plan, sort_keys=True))
    entry = {
        "shards": [name for name, _ in writer.shards],
        "counts": [n for _, n in writer.shards],
        "samples": report.samples,
        "settings": {s: report.settings[s] for s in SETTINGS},
        "visible": report.visible,
        "scored": report.scored,
        "plan": plan_path.name,
        "options": {"same_view": same_view, "relaxed_alignment": relaxed, "relations": relations.name},
    }
    report.index = _merged_index(out, split, entry, dict(sorted(report.skipped.items())), seed)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The converter's command-line options."""
    parser.add_argument("--relations", type=Path, required=True, help="annotations/relations_{split}.json")
    parser.add_argument(
        "--frames", type=Path, required=True, help="processed root: <root>/<take_uid>/<cam>/<f>.jpg"
    )
    parser.add_argument(
        "--split-file", type=Path, default=None, help="split.json; takes not in --split are skipped"
    )
    parser.add_argument(
        "--split", default=None, help="output split name (default: from relations_<split>.json)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (an index.json there is merged)"
    )
    parser.add_argument("--same-view", action="store_true", help="add asynchronous ego-ego / exo-exo pairs")
    parser.add_argument(
        "--relaxed-alignment", action="store_true", help="add cross-view pairs at another masked target frame"
    )
    parser.add_argument("--shard-size", type=int, default=200, help="pairs per shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the asynchronous target-frame choice")
    add_ignore_keys(parser)


def convert(args: argparse.Namespace) -> Path:
    """Run the conversion the parsed arguments describe, print its summary and return the index path."""
    report = convert_split(
        relations=args.relations,
        frames=args.frames,
        out=args.out,
        split=args.split,
        split_file=args.split_file,
        same_view=args.same_view,
        relaxed=getattr(args, "relaxed_alignment", False),
        shard_size=args.shard_size,
        seed=getattr(args, "seed", 0),
        ignore_keys=getattr(args, "ignore_keys", ()),
    )
    print(report.summary())
    return report.index
