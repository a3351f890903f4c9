"""The generated edits and compositions: determinism, the format, and targets exact to the program."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from datamodules.multiref import mentioned_images
from datamodules.synth import synthesize
from datamodules.synth.multiref import (
    COLOURS,
    POSITIONS,
    SHADE,
    Thing,
    background,
    cell_box,
    samples,
)
from datamodules.webdataset import decode_sample, iter_raw_samples

COUNTS = {"train": 6, "val": 2, "test": 2}


def pixels(data):
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def many():
    out = []
    for s in samples("train", 150, seed=5):
        n = s["json"]["n_refs"]
        out.append((s["json"], [pixels(s[f"ref{k}.png"]) for k in range(n)], pixels(s["target.png"])))
    return out


def test_same_seed_writes_the_same_bytes(tmp_path):
    synthesize("multiref", tmp_path / "a", samples=COUNTS, seed=7)
    synthesize("multiref", tmp_path / "b", samples=COUNTS, seed=7)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "train-000000.tar" in names and "index.json" in names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    synthesize("multiref", tmp_path / "c", samples=COUNTS, seed=8)
    assert (tmp_path / "c" / "train-000000.tar").read_bytes() != (
        tmp_path / "a" / "train-000000.tar"
    ).read_bytes()


def test_index_and_members_follow_the_data_format(tmp_path):
    index = json.loads(synthesize("multiref", tmp_path, samples=COUNTS, seed=0).read_text())
    assert index["kind"] == "multiref"
    assert {s: index["splits"][s]["samples"] for s in COUNTS} == COUNTS
    assert {"json", "target.png"} <= set(index["keys"])
    for raw in iter_raw_samples(str(tmp_path / "train-000000.tar")):
        s = decode_sample(raw, ("json",))
        meta = s["json"]
        refs = sorted(k for k in s if k.startswith("ref"))
        assert refs == [f"ref{k}.png" for k in range(meta["n_refs"])]
        assert meta["ref_sizes"] == [[s[r].shape[1], s[r].shape[0]] for r in refs]
        assert meta["target_size"] == [s["target.png"].shape[1], s["target.png"].shape[0]]
        assert meta["source"] == "synth" and meta["orig_id"] == s["__key__"]
        assert len(meta["ref_roles"]) == meta["n_refs"]


def test_tasks_ref_counts_sizes_and_mentions(many):
    tasks = {m["task"] for m, _, _ in many}
    assert tasks == {"edit", "compose", "t2i"}
    assert {m["n_refs"] for m, _, _ in many} == set(range(7))
    for meta, refs, target in many:
        n = meta["n_refs"]
        assert {"edit": n == 1, "t2i": n == 0, "compose": 2 <= n <= 6}[meta["task"]]
        assert set(mentioned_images(meta["instruction"])) <= set(range(1, n + 1))
        assert min(target.shape[:2]) >= 96 and max(target.shape[:2]) <= 256
        for ref in refs:
            assert min(ref.shape[:2]) >= 48 and max(ref.shape[:2]) <= 256


def test_shapes_render_analytically():
    # a square fills |u|, |v| <= 0.9 of its box; pixel centres of a 20 px box are at u = -0.95, -0.85, ..., 0.95,
    # so the outer ring is out: 18 x 18 pixels
    _, mask = Thing(kind="shape", shape="square", colour="red").render(20, 20)
    assert mask.sum() == 18 * 18 and not mask[0].any() and mask[1, 1:19].all()
    # a cell of a 96 x 96 target is 32 px; fill 0.75 -> 24 px, centred at (48, 48) -> box (36, 36, 24, 24)
    assert cell_box("center", 96, 96, Thing(kind="shape", shape="circle", colour="red"), 0.75) == (
        36,
        36,
        24,
        24,
    )


def test_text_to_image_targets_hold_exactly_the_described_objects(many):
    seen = 0
    for meta, _, target in many:
        if meta["task"] != "t2i":
            continue
        seen += 1
        bg = np.array(meta["background"]["rgb"], np.uint8)
        assert meta["background"]["colour"] in meta["instruction"]
        assert (target != bg).any(-1).sum() == sum(o["pixels"] for o in meta["objects"])
        for obj in meta["objects"]:
            assert f"{obj['colour']} {obj['shape']} at the {obj['position']}" in meta["instruction"]
            x0, y0, x1, y1 = obj["bbox"]
            crop = target[y0:y1, x0:x1]
            hit = (crop == np.array(COLOURS[obj["colour"]], np.uint8)).all(-1)
            assert hit.sum() == obj["pixels"] > 0
            assert hit[0].any() and hit[-1].any() and hit[:, 0].any() and hit[:, -1].any()  # tight box
            row, col = POSITIONS[obj["position"]]
            cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
            h, w = target.shape[:2]
            assert row == int(3 * cy // h) and col == int(3 * cx // w)
    assert seen >= 5


def _shades(name):
    rgb = np.array(COLOURS[name], np.float64)
    return [np.rint(rgb).astype(np.uint8), np.rint(rgb * SHADE).astype(np.uint8)]


def test_placed_objects_show_their_colour_at_their_box(many):
    checked = 0
    for meta, _, target in many:
        if meta["task"] != "compose" or meta["background"]["kind"] != "flat":
            continue
        for op in meta["program"]:
            obj = next(o for o in meta["objects"] if o["id"] == op["object"])
            assert op["bbox"] == obj["bbox"] and obj["source"] == f"image {op['ref']}"
            if obj["kind"] != "shape":
                continue
            if op["colour"] is not None:  # recoloured on the way
                assert obj["colour"] == op["colour"] and f", in {op['colour']}," in meta["instruction"]
            x0, y0, x1, y1 = obj["bbox"]
            crop = target[y0:y1, x0:x1]
            hit = np.zeros(crop.shape[:2], bool)
            for c in _shades(obj["colour"]):
                hit |= (crop == c).all(-1)
            assert hit.sum() == obj["pixels"]
            checked += 1
    assert checked >= 10


def _in_box(mask, box):
    x, y, w, h = box
    out = np.zeros_like(mask)
    out[max(y, 0) : y + h, max(x, 0) : x + w] = True
    return mask & out


def test_edits_change_the_scene_only_where_the_program_says(many):
    ops = set()
    for meta, (source,), target in ((m, r, t) for m, r, t in many if m["task"] == "edit"):
        assert source.shape == target.shape
        changed = (source != target).any(-1)
        allowed = np.zeros_like(changed)
        for op in meta["program"]:
            ops.add(op["op"])
            for box in (op.get("box_before"), op.get("box")):
                if box is not None:
                    allowed |= _in_box(np.ones_like(changed), box)
            obj = next((o for o in meta["objects"] if o["id"] == op["object"]), None)
            if op["op"] == "remove":
                assert obj is None and op["bbox"] is None
            elif op["op"] == "move":
                assert obj["position"] == op["to"] != op["from"]
            elif op["op"] == "recolor":
                assert obj["colour"] == op["to"] != op["from"]
                assert f"{op['from']} {obj['shape']}" in meta["instruction"]
            else:  # resize: the box scales by the factor (to the pixel)
                (_, _, w0, h0), (_, _, w1, h1) = op["box_before"], op["box"]
                assert abs(w1 - w0 * op["factor"]) <= 0.5 and abs(h1 - h0 * op["factor"]) <= 0.5
        assert changed.any()
        assert not (changed & ~allowed).any()  # nothing outside the edited objects' old and new boxes
        if meta["program"][0]["op"] == "remove" and not meta["objects"]:
            spec, (h, w) = meta["background"], target.shape[:2]
            assert (target == background(spec, w, h)).all()  # nothing left: exactly the background
    assert ops == {"recolor", "resize", "remove", "move"}


def test_a_recolour_keeps_the_silhouette(many):
    checked = 0
    for meta, (source,), target in ((m, r, t) for m, r, t in many if m["task"] == "edit"):
        if meta["background"]["kind"] != "flat" or len(meta["program"]) != 1:
            continue
        (op,) = meta["program"]
        if op["op"] != "recolor":
            continue
        x, y, w, h = op["box"]
        before, after = source[y : y + h, x : x + w], target[y : y + h, x : x + w]
        old = np.any([(before == c).all(-1) for c in _shades(op["from"])], axis=0)
        new = np.any([(after == c).all(-1) for c in _shades(op["to"])], axis=0)
        obj = next(o for o in meta["objects"] if o["id"] == op["object"])
        assert (old == new).all() and new.sum() == obj["pixels"] > 0
        checked += 1
    assert checked >= 1
