"""The generated correspondence pairs: determinism, counts, exact masks, visibility share."""

from __future__ import annotations

import json

import numpy as np
import pytest

from datamodules.correspondence import SETTINGS
from datamodules.synth import synthesize
from datamodules.synth.correspondence import (
    EGO_SIZE,
    EXO_SIZE,
    SynthObject,
    make_sample,
    paste,
    samples,
    scaling,
    translation,
)
from datamodules.webdataset import decode_sample, iter_raw_samples

COUNTS = {"train": 5, "val": 2, "test": 2}


@pytest.fixture(scope="module")
def many():
    return list(samples("train", 100, seed=3))


def test_same_seed_writes_the_same_bytes(tmp_path):
    synthesize("correspondence", tmp_path / "a", samples=COUNTS, seed=7)
    synthesize("correspondence", tmp_path / "b", samples=COUNTS, seed=7)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert "train-000000.tar" in names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    other = tmp_path / "c"
    synthesize("correspondence", other, samples=COUNTS, seed=8)
    assert (other / "train-000000.tar").read_bytes() != (tmp_path / "a" / "train-000000.tar").read_bytes()


def test_index_counts_and_decoded_masks_are_binary(tmp_path):
    index = json.loads(synthesize("correspondence", tmp_path, samples=COUNTS, seed=0).read_text())
    assert index["kind"] == "correspondence"
    assert {s: index["splits"][s]["samples"] for s in COUNTS} == COUNTS
    assert set(index["keys"]) == {"json", "src.jpg", "src_mask.png", "tgt.jpg", "tgt_mask.png"}
    decoded = [
        decode_sample(raw, ("json",))
        for split in COUNTS
        for raw in iter_raw_samples(str(tmp_path / f"{split}-000000.tar"))
    ]
    assert len(decoded) == sum(COUNTS.values())
    for s in decoded:
        for view in ("src", "tgt"):
            mask, img = s[f"{view}_mask.png"], s[f"{view}.jpg"]
            assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
            assert mask.shape == img.shape[:2]
            assert list(img.shape[:2]) == s["json"][f"{view}_native"]
        assert s["json"]["split"] in COUNTS and s["__key__"].startswith(s["json"]["split"])


def test_query_is_in_the_source_and_visibility_matches_the_target_mask(many):
    for s in many:
        meta = s["json"]
        assert meta["setting"] in SETTINGS
        assert (s["src_mask.png"] == 255).sum() >= 48
        assert (s["tgt_mask.png"] == 255).any() == meta["visible"]
        src_kind, tgt_kind = meta["setting"].split("-")
        assert s["src.jpg"].shape[:2] == (EGO_SIZE if src_kind == "ego" else EXO_SIZE)
        assert s["tgt.jpg"].shape[:2] == (EGO_SIZE if tgt_kind == "ego" else EXO_SIZE)
        assert ("aria" in meta["src_cam"]) == (src_kind == "ego")
        assert ("aria" in meta["tgt_cam"]) == (tgt_kind == "ego")
        same_view = src_kind == tgt_kind
        assert (meta["src_frame"] != meta["tgt_frame"]) == same_view


def test_about_a_fifth_of_the_pairs_are_invisible_and_every_setting_occurs(many):
    invisible = sum(not s["json"]["visible"] for s in many) / len(many)
    assert 0.10 <= invisible <= 0.35
    assert {s["json"]["setting"] for s in many} == set(SETTINGS)


def test_a_sample_depends_only_on_seed_split_and_index():
    a, b = make_sample("val", 3, 11), list(samples("val", 4, 11))[3]
    assert a["json"] == b["json"]
    for k in ("src.jpg", "src_mask.png", "tgt.jpg", "tgt_mask.png"):
        assert np.array_equal(a[k], b[k])
    assert make_sample("test", 3, 11)["json"] != a["json"]


def test_pasted_mask_is_exactly_the_painted_pixels_and_has_the_ellipse_area():
    ellipse = SynthObject("ellipse", 0, 0.5, "red", (40, 70, 220), "stripes", 8.0, 0.3)
    canvas, owner = np.zeros((100, 100, 3), np.float32), np.zeros((100, 100), np.int32)
    pose = translation(50, 50) @ scaling(30, 30)  # semi-axes 30 and 15 pixels
    paste(canvas, owner, ellipse, pose, 1)
    assert np.array_equal(owner == 1, canvas.sum(-1) > 0)  # every colour is far from black
    assert (owner == 1).sum() == pytest.approx(np.pi * 30 * 15, rel=0.03)
    ys, xs = np.nonzero(owner)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (20, 79, 35, 64)


def test_scenes_come_from_several_photos(many):
    photos = {s["json"]["take"].split("-")[1] for s in many}
    assert len(photos) >= 4
