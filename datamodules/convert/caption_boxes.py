"""Caption-box JSON (LayoutGPT / GLIGEN style) + images -> layout shards: `omnilab data convert layoutgpt|gligen`.

Writes the layout data kind (datamodules/layout.py): text-to-image samples whose instruction is the caption in
SCoT's interleaved format (each phrase followed by its box on the 0-1000 grid, lightning_modules/components/
layout.py), with "caption" and "layout". The input is a JSON file holding a list of records (or {"data": [...]}
/ {"annotations": [...]}) and a folder of images:
- LayoutGPT style (its NSR-1K files): {"id", "prompt", "object_list": [[name, [x, y, w, h]], ...]}, boxes
  as fractions of the image (`--box-unit unit`, the default) or pixels (`--box-unit pixels`); the image is
  "image" / "file_name", else `<id>.png|.jpg` in `--images`.
- GLIGEN style (its inference inputs): {"file_name" | "image", "prompt" | "caption", "phrases": [...],
  "locations": [[x0, y0, x1, y1], ...]}, corners as fractions of the image (pixels with `--box-unit pixels`).
A record key outside the format's `RECORD_KEYS` stops the conversion before anything is written, naming the
record and the nearest known key (`--ignore-keys` drops such keys). A phrase found in the caption gets its box right after it; the others follow the caption ("..., with a cup
[..]"). A record without a readable image, without boxes, or whose plan fails the format's checks is a
counted skip (reasons in the summary and index.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from datamodules.convert.edit_jsonl import MultiRefShards, SkipRecord, add_ignore_keys, check_keys, read_image
from lightning_modules.components.layout import Layout, PlanError, Region, format_box, parse_layout, to_grid

FORMATS = ("layoutgpt", "gligen")
RECORD_KEYS = {  # what a record may hold; any other key is refused (--ignore-keys)
    "layoutgpt": ("id", "prompt", "object_list", "image", "file_name"),
    # GLIGEN's inference meta also names its checkpoint, alpha schedule and output folder (not used here)
    "gligen": (
        "id",
        "file_name",
        "image",
        "prompt",
        "caption",
        "phrases",
        "locations",
        "ckpt",
        "alpha_type",
        "save_folder_name",
    ),
}


def interleave(caption: str, regions: list[Region]) -> str:
    """The caption with each region's box after its phrase (first occurrence, in order); others appended."""
    lower, pos, out, rest = caption.lower(), 0, [], []
    for region in regions:
        at = lower.find(region.phrase.lower(), pos)
        if at < 0:
            rest.append(region)
            continue
        end = at + len(region.phrase)
        out.append(caption[pos:end] + " " + format_box(region.box))
        pos = end
    text = "".join(out) + caption[pos:]
    if rest:
        text = text.rstrip(" .") + ", with " + ", ".join(f"{r.phrase} {format_box(r.box)}" for r in rest)
    return text.strip()


def _records(path: Path) -> list[Any]:
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        data = data.get("data") or data.get("annotations") or []
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of records (or {{'data': [...]}})")
    return data


def regions_of(
    record: dict[str, Any], fmt: str, size: tuple[int, int], unit: str
) -> tuple[str, list[Region]]:
    """(caption, regions on the grid) of one record; SkipRecord("bad_record") when it has neither."""
    w, h = size if unit == "pixels" else (1, 1)
    pairs: list[tuple[str, list[float]]] = []
    if fmt == "layoutgpt":
        caption = record.get("prompt")
        for item in record.get("object_list") or []:
            if not (isinstance(item, list | tuple) and len(item) == 2 and len(item[1]) == 4):
                raise SkipRecord("bad_record", f"object_list entry {item!r} is not [name, [x, y, w, h]]")
            x, y, bw, bh = (float(v) for v in item[1])
            pairs.append((str(item[0]), [x, y, x + bw, y + bh]))
    else:
        caption = record.get("prompt") or record.get("caption")
        phrases, locations = record.get("phrases") or [], record.get("locations") or []
        if len(phrases) != len(locations):
            raise SkipRecord("bad_record", f"{len(phrases)} phrases for {len(locations)} locations")
        pairs = [(str(p), [float(v) for v in loc]) for p, loc in zip(phrases, locations)]
    if not isinstance(caption, str) or not pairs:
        raise SkipRecord("bad_record", "no caption or no boxes")
    return caption, [Region(p, to_grid(box, w, h)) for p, box in pairs]


def convert_file(
    json_path: str | Path,
    images: str | Path,
    out: str | Path,
    fmt: str,
    split: str = "train",
    unit: str = "unit",
    shard_size: int = 200,
    ignore_keys: list[str] | tuple[str, ...] = (),
) -> Any:
    """Convert one caption-box JSON file into `<out>/<split>-NNNNNN.tar` + index.json; returns the report."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: choose {', '.join(FORMATS)}")
    records = _records(Path(json_path))
    for i, record in enumerate(records):
        check_keys(record, RECORD_KEYS[fmt], f"{json_path}: record {i}", ignore_keys)
    shards = MultiRefShards(out, split, fmt, shard_size)
    root = Path(images)
    for i, record in enumerate(records):
        where = f"record {i}"
        try:
            if not isinstance(record, dict):
                raise SkipRecord("bad_record", "not a JSON object")
            name = record.get("image") or record.get("file_name")
            if name is None and "id" in record:
                name = next((f"{record['id']}{e}" for e in (".png", ".jpg") if (root / f"{record['id']}{e}").is_file()), f"{record['id']}.png")  # fmt: skip
            if name is None:
                raise SkipRecord("bad_record", "no image name")
            target = read_image(str(name), root)
            caption, regions = regions_of(record, fmt, target[2], unit)
            instruction = interleave(caption, regions)
            try:
                layout: Layout = parse_layout(instruction, repair=False)
            except PlanError as err:
                raise SkipRecord("bad_record", f"plan: {err}") from err
            extra = {"caption": layout.caption, "layout": layout.to_json()}
            shards.write([], target, instruction, "t2i", str(record.get("id", name)), extra)
        except SkipRecord as err:
            shards.report.skip(where, err)
    return shards.close({"json": str(json_path), "images": str(images), "format": fmt, "box_unit": unit})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The converter's command-line options."""
    parser.add_argument("--json", type=Path, required=True, help="the caption-box JSON file")
    parser.add_argument("--images", type=Path, required=True, help="the folder of the images it names")
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (an index.json there is merged)"
    )
    parser.add_argument("--split", default="train", help="output split name")
    parser.add_argument(
        "--box-unit", choices=("unit", "pixels"), default="unit", help="boxes as fractions or pixels"
    )
    parser.add_argument("--shard-size", type=int, default=200, help="samples per shard")
    add_ignore_keys(parser)


def run(args: argparse.Namespace, fmt: str) -> Path:
    """Run the conversion, print its summary and return the index path."""
    report = convert_file(
        args.json, args.images, args.out, fmt, args.split, args.box_unit, args.shard_size,
        getattr(args, "ignore_keys", ()),
    )  # fmt: skip
    print(report.summary())
    assert report.index is not None
    return report.index
