"""The Ego-Exo4D converter on the tiny official-layout fixture (tests/fixtures/egoexo4d).

Pair counts worked by hand from the fixture's README and relations_val.json (one take, aria01 + cam01,
frames 0/30/60; cutting board_0 masked everywhere; knife_0 masked in aria01 at 0/30/60 and in cam01 at
0/30, with cam01 annotated_frames [0, 30, 60]):
- ego-exo (source aria01 mask at f, f in cam01's annotated_frames): cutting board 0/30/60 + knife 0/30
  visible, knife 60 invisible -> 6 pairs, 5 visible.
- exo-ego (source cam01 mask at f, f in aria01's annotated_frames): cutting board 0/30/60 + knife 0/30
  -> 5 pairs, all visible.
- same-view (one other masked frame of the same camera per masked source frame): ego-ego 3 + 3 = 6;
  exo-exo 3 + 2 = 5 (knife in cam01: 0 -> 30 and 30 -> 0, the only choices).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import lzstring
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from datamodules.convert import egoexo4d
from datamodules.convert.egoexo4d import (
    MEMBERS,
    MaskError,
    SchemaError,
    convert_split,
    decode_mask,
    resize_nearest,
)
from datamodules.webdataset import decode_sample, iter_raw_samples

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "egoexo4d"  # a small take in the released layout
TAKE = "3f1c9a52-7d2e-4b8e-9a41-0c6d2b7e5f10"
VAL_PAIRS = {  # (setting, object, frame, visible), by hand from the fixture (module docstring)
    *(("ego-exo", "cutting board_0", f, True) for f in (0, 30, 60)),
    ("ego-exo", "knife_0", 0, True),
    ("ego-exo", "knife_0", 30, True),
    ("ego-exo", "knife_0", 60, False),
    *(("exo-ego", "cutting board_0", f, True) for f in (0, 30, 60)),
    ("exo-ego", "knife_0", 0, True),
    ("exo-ego", "knife_0", 30, True),
}
SCALE = {"aria01": 1408 / 704, "cam01": 3840 / 960}  # native / processed frame
GT_SCALE = {"aria01": 1408 / 480, "cam01": 3840 / 480}  # native / evaluation size


# --------------------------------------------------------------------------- helpers


def read_split(out: Path, split: str = "val") -> list[dict]:
    index = json.loads((out / "index.json").read_text())
    shards = index["splits"][split]["shards"]
    return [decode_sample(raw, MEMBERS) for s in shards for raw in iter_raw_samples(str(out / s))]


def convert(tmp_path: Path, root: Path = FIXTURE, **kwargs) -> tuple[egoexo4d.Report, list[dict]]:
    out = tmp_path / "out"
    report = convert_split(root / "relations_val.json", root / "takes", out, **kwargs)
    return report, read_split(out, report.split)


def writable_copy(tmp_path: Path) -> Path:
    root = tmp_path / "fixture"
    shutil.copytree(FIXTURE, root)
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


def edit_mask(
    root: Path, obj: str, cam: str, frame: str, mask: np.ndarray, rle_size: tuple[int, int]
) -> None:
    """Replace one relations mask by `mask`, LZString-compressed, declaring `rle_size` as its height/width."""
    path = root / "relations_val.json"
    data = json.loads(path.read_text())
    counts = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
    entry = data["annotations"][TAKE]["object_masks"][obj][cam]["annotation"][frame]
    entry["height"], entry["width"] = rle_size
    entry["encodedMask"] = lzstring.LZString().compressToEncodedURIComponent(counts)
    path.write_text(json.dumps(data))


def relations_entry(obj: str, cam: str, frame: str) -> dict:
    data = json.loads((FIXTURE / "relations_val.json").read_text())
    return data["annotations"][TAKE]["object_masks"][obj][cam]["annotation"][frame]


def box(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


def by_pair(samples: list[dict]) -> dict[tuple, dict]:
    return {(s["json"]["setting"], s["json"]["object"], s["json"]["src_frame"]): s for s in samples}


# --------------------------------------------------------------------------- masks


def test_decoded_masks_match_expected_area_and_inclusive_box() -> None:
    expected = json.loads((FIXTURE / "expected.json").read_text())
    for name, want in expected.items():
        obj, cam, frame = name.split("|")
        entry = relations_entry(obj, cam, frame)
        mask = decode_mask(entry)
        assert mask.shape == (entry["height"], entry["width"]), name
        assert int(mask.sum()) == want["area"], name
        assert box(mask) == want["bbox_xyxy"], name


def test_resize_nearest_uses_cv2_double_arithmetic() -> None:
    # cv2: src = floor(dst * (1 / (dst_len / src_len))); 49 * (1 / 49.0) = 0.9999999999999999 -> 0, where
    # the exact floor(49 * 2 / 98) would give 1.
    assert resize_nearest(np.array([[0, 1]]), 1, 98)[0, 49] == 0
    assert resize_nearest(np.array([[0, 1]]), 1, 98)[0, 50] == 1
    assert resize_nearest(np.array([[0, 1, 2, 3]]), 1, 2).tolist() == [[0, 2]]
    assert resize_nearest(np.array([[0, 1]]), 1, 4).tolist() == [[0, 0, 1, 1]]
    assert resize_nearest(np.arange(6).reshape(3, 2), 2, 2).tolist() == [[0, 1], [2, 3]]  # row 1 * 1.5 -> 1


def test_rle_whose_runs_disagree_with_its_size_raises_mask_error() -> None:
    entry = dict(relations_entry("knife_0", "cam01", "0"), height=2159)
    with pytest.raises(MaskError, match="rle_size_mismatch") as err:
        decode_mask(entry)
    assert err.value.reason == "rle_size_mismatch"
    with pytest.raises(MaskError) as err:
        decode_mask(dict(entry, encodedMask="not lzstring at all"))
    assert err.value.reason in {"undecodable_mask", "rle_size_mismatch"}


# --------------------------------------------------------------------------- pairs


def test_val_pairs_are_the_scored_instances(tmp_path: Path) -> None:
    report, samples = convert(tmp_path, split_file=FIXTURE / "split.json")
    got = {
        (s["json"]["setting"], s["json"]["object"], s["json"]["src_frame"], s["json"]["visible"])
        for s in samples
    }
    assert len(samples) == 11 and got == VAL_PAIRS
    assert dict(report.settings) == {"ego-exo": 6, "exo-ego": 5} and report.visible == 10
    assert not report.skipped
    assert all(s["json"]["src_frame"] == s["json"]["tgt_frame"] for s in samples)  # synchronized
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["splits"]["val"]["samples"] == 11 and index["kind"] == "correspondence"
    assert index["source"] == "egoexo4d" and index["skipped"] == {"val": {}}
    assert index["keys"] == sorted(MEMBERS)


def test_knife_at_60_in_cam01_is_an_invisible_ego_exo_pair(tmp_path: Path) -> None:
    _, samples = convert(tmp_path)
    s = by_pair(samples)["ego-exo", "knife_0", 60]
    assert s["__key__"] == f"{TAKE}_knife_0_aria01-cam01_60-60"
    meta = s["json"]
    assert meta == {
        "take": TAKE,
        "take_name": "fixture_cooking_01",
        "object": "knife_0",
        "src_cam": "aria01",
        "tgt_cam": "cam01",
        "src_frame": 60,
        "tgt_frame": 60,
        "setting": "ego-exo",
        "visible": False,
        "scored": True,
        "planned": True,
        "src_native": [1408, 1408],
        "tgt_native": [2160, 3840],
        "split": "val",
    }
    assert s["tgt_mask.png"].shape == (540, 960) and not s["tgt_mask.png"].any()
    assert s["tgt_gt.png"].shape == (270, 480) and not s["tgt_gt.png"].any()
    assert s["src_mask.png"].shape == (704, 704) and s["src_mask.png"].any()


def test_members_have_frame_and_evaluation_shapes_and_unique_keys(tmp_path: Path) -> None:
    _, samples = convert(tmp_path, same_view=True)
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == len(keys) == 22
    assert all("." not in k and "/" not in k for k in keys)
    assert any(k.startswith(f"{TAKE}_cutting~20board_0_") for k in keys)
    for s in samples:
        meta = s["json"]
        assert s["src_mask.png"].shape == s["src.jpg"].shape[:2], s["__key__"]
        assert s["tgt_mask.png"].shape == s["tgt.jpg"].shape[:2], s["__key__"]
        assert s["tgt_gt.png"].shape == ((480, 480) if meta["tgt_cam"] == "aria01" else (270, 480)), s[
            "__key__"
        ]
        for m in ("src_mask.png", "tgt_mask.png", "tgt_gt.png"):
            assert set(np.unique(s[m])) <= {0, 255}, (s["__key__"], m)


def test_resized_masks_keep_the_native_box(tmp_path: Path) -> None:
    # Nearest resizing by s keeps a box's corners within s native pixels of expected.json's.
    expected = json.loads((FIXTURE / "expected.json").read_text())
    _, samples = convert(tmp_path)
    checked = 0
    for s in samples:
        meta = s["json"]
        views = [("src_mask.png", meta["src_cam"], meta["src_frame"], SCALE)]
        if meta["visible"]:
            views += [("tgt_mask.png", meta["tgt_cam"], meta["tgt_frame"], SCALE)]
            views += [("tgt_gt.png", meta["tgt_cam"], meta["tgt_frame"], GT_SCALE)]
        for member, cam, frame, scale in views:
            want = expected[f"{meta['object']}|{cam}|{frame}"]
            got = np.array(box(s[member])) * scale[cam]
            assert np.abs(got - np.array(want["bbox_xyxy"])).max() <= scale[cam], (s["__key__"], member)
            area = (s[member] > 0).sum() * scale[cam] ** 2
            assert abs(area - want["area"]) <= 0.1 * want["area"], (s["__key__"], member)
            checked += 1
    assert checked == 11 + 2 * 10


def test_shards_read_back_with_the_source_jpeg_bytes(tmp_path: Path) -> None:
    convert(tmp_path)
    raws = list(iter_raw_samples(str(tmp_path / "out" / "val-000000.tar")))
    assert len(raws) == 11
    for raw in raws:
        meta = decode_sample(raw, MEMBERS)["json"]
        frames = FIXTURE / "takes" / TAKE
        assert raw["src.jpg"] == (frames / meta["src_cam"] / f"{meta['src_frame']}.jpg").read_bytes()
        assert raw["tgt.jpg"] == (frames / meta["tgt_cam"] / f"{meta['tgt_frame']}.jpg").read_bytes()


def test_same_view_pairs_are_asynchronous_frames_of_one_camera(tmp_path: Path) -> None:
    report, samples = convert(tmp_path, same_view=True)
    assert dict(report.settings) == {"ego-exo": 6, "exo-ego": 5, "ego-ego": 6, "exo-exo": 5}
    same = [s["json"] for s in samples if s["json"]["setting"] in ("ego-ego", "exo-exo")]
    assert all(
        m["src_cam"] == m["tgt_cam"] and m["src_frame"] != m["tgt_frame"] and m["visible"] for m in same
    )
    knife_exo = {
        (m["src_frame"], m["tgt_frame"]) for m in same if m["object"] == "knife_0" and m["src_cam"] == "cam01"
    }
    assert knife_exo == {(0, 30), (30, 0)}


def test_relaxed_alignment_adds_one_other_masked_target_frame_per_source_frame(tmp_path: Path) -> None:
    # ego-exo: 3 (cutting board) + 3 (knife, to cam01 frames 0/30) extra; exo-ego: 3 + 2 extra.
    report, samples = convert(tmp_path, relaxed=True)
    assert dict(report.settings) == {"ego-exo": 12, "exo-ego": 10}
    relaxed = [s["json"] for s in samples if s["json"]["src_frame"] != s["json"]["tgt_frame"]]
    assert len(relaxed) == 11 and all(m["visible"] for m in relaxed)
    knife = [m for m in relaxed if m["object"] == "knife_0" and m["setting"] == "ego-exo"]
    assert all(m["tgt_frame"] in (0, 30) for m in knife)


# --------------------------------------------------------------------------- bad input


def test_rle_of_the_wrong_size_is_a_counted_skip(tmp_path: Path) -> None:
    root = writable_copy(tmp_path)
    wrong = decode_mask(relations_entry("knife_0", "cam01", "0"))[:2159]  # 2159 rows, declared 2160
    edit_mask(root, "knife_0", "cam01", "0", wrong, rle_size=(2160, 3840))
    report, samples = convert(tmp_path, root)
    # knife_0 cam01 frame 0 is the target of ego-exo knife 0 and the source of exo-ego knife 0.
    assert dict(report.skipped) == {"rle_size_mismatch": 2}
    assert len(samples) == 9 and ("ego-exo", "knife_0", 0) not in by_pair(samples)
    assert ("exo-ego", "knife_0", 0) not in by_pair(samples)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["skipped"] == {"val": {"rle_size_mismatch": 2}}


def test_missing_frame_is_a_counted_skip(tmp_path: Path) -> None:
    root = writable_copy(tmp_path)
    (root / "takes" / TAKE / "aria01" / "30.jpg").unlink()
    report, samples = convert(tmp_path, root)
    # aria01 frame 30 is in ego-exo and exo-ego pairs of both objects.
    assert dict(report.skipped) == {"missing_frame": 4} and len(samples) == 7
    assert "aria01/30.jpg" in report.examples["missing_frame"]
    assert "skipped 4 (missing_frame)" in report.summary()


def test_native_size_that_does_not_match_the_frame_is_a_counted_skip(tmp_path: Path) -> None:
    root = writable_copy(tmp_path)
    mask = np.zeros((1400, 1400), np.uint8)
    mask[600:700, 900:1100] = 1
    edit_mask(root, "knife_0", "aria01", "0", mask, rle_size=(1400, 1400))  # 1400 // 2 != 704
    report, samples = convert(tmp_path, root)
    assert dict(report.skipped) == {"native_size_mismatch": 2} and len(samples) == 9


def test_an_annotated_empty_source_mask_is_kept_and_noted(tmp_path: Path) -> None:
    # The official evaluation iterates every annotated ego frame, an empty mask included, and
    # validate_predictions requires a prediction for it.
    root = writable_copy(tmp_path)
    edit_mask(root, "knife_0", "aria01", "60", np.zeros((1408, 1408), np.uint8), rle_size=(1408, 1408))
    report, samples = convert(tmp_path, root)
    assert not report.skipped and len(samples) == 11 and report.notes["an empty source mask"] == 1
    assert not by_pair(samples)["ego-exo", "knife_0", 60]["src_mask.png"].any()
    assert "1 pairs with an empty source mask" in report.summary()


def test_take_outside_the_split_is_a_counted_skip(tmp_path: Path) -> None:
    report, samples = convert(tmp_path, split="train", split_file=FIXTURE / "split.json")
    assert dict(report.skipped) == {"take_not_in_split": 11} and samples == []


def test_corrupted_relations_schema_raises_naming_path_and_key(tmp_path: Path) -> None:
    root = writable_copy(tmp_path)
    path = root / "relations_val.json"
    data = json.loads(path.read_text())
    del data["annotations"][TAKE]["object_masks"]["knife_0"]["cam01"]["annotated_frames"]
    path.write_text(json.dumps(data))
    with pytest.raises(SchemaError) as err:
        convert(tmp_path, root)
    assert str(path) in str(err.value)
    assert f"annotations.{TAKE}.object_masks.knife_0.cam01.annotated_frames" in str(err.value)

    data = json.loads((FIXTURE / "relations_val.json").read_text())
    data["annotations"][TAKE]["object_masks"]["knife_0"]["aria01"]["annotation"]["30"]["width"] = "1408"
    path.write_text(json.dumps(data))
    with pytest.raises(SchemaError, match=r"knife_0\.aria01\.annotation\.30\.width"):
        convert(tmp_path, root)

    with pytest.raises(FileNotFoundError, match=r"relations_test\.json"):
        convert_split(root / "relations_test.json", root / "takes", tmp_path / "out")


# --------------------------------------------------------------------------- output folder


def test_converting_twice_gives_identical_tar_files(tmp_path: Path) -> None:
    a = convert_split(
        FIXTURE / "relations_val.json", FIXTURE / "takes", tmp_path / "a", shard_size=4, same_view=True
    )
    b = convert_split(
        FIXTURE / "relations_val.json", FIXTURE / "takes", tmp_path / "b", shard_size=4, same_view=True
    )
    names = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert names == [f"val-{i:06d}.tar" for i in range(6)] and a.samples == b.samples == 22
    for name in [*names, "index.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_splits_merge_into_one_index_and_a_rerun_replaces_old_shards(tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert_split(FIXTURE / "relations_val.json", FIXTURE / "takes", out, shard_size=2)
    assert len(list(out.glob("val-*.tar"))) == 6
    convert_split(FIXTURE / "relations_val.json", FIXTURE / "takes", out)
    convert_split(FIXTURE / "relations_val.json", FIXTURE / "takes", out, split="train", same_view=True)
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "val-000000.tar"]
    index = json.loads((out / "index.json").read_text())
    assert {k: v["samples"] for k, v in index["splits"].items()} == {"val": 11, "train": 22}
    assert index["skipped"] == {"val": {}, "train": {}}
    assert len(read_split(out, "val")) == 11 and read_split(out, "train")[0]["json"]["split"] == "train"


def test_cli_infers_the_split_and_prints_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    egoexo4d.add_arguments(parser)
    relations, frames, split = FIXTURE / "relations_val.json", FIXTURE / "takes", FIXTURE / "split.json"
    argv = ["--relations", relations, "--frames", frames, "--split-file", split, "--out", tmp_path / "out"]
    args = parser.parse_args([*map(str, argv), "--same-view"])
    assert args.shard_size == 200 and not args.relaxed_alignment
    index = egoexo4d.convert(args)
    assert index == tmp_path / "out" / "index.json"
    assert json.loads(index.read_text())["splits"]["val"]["samples"] == 22
    printed = capsys.readouterr().out
    assert "ego-exo: 6, exo-ego: 5, ego-ego: 6, exo-exo: 5" in printed


# --------------------------------------------------------------------------- the official evaluation's pairs


def encoded(mask: np.ndarray) -> dict:
    """A relations mask entry {width, height, encodedMask} of an HxW mask (LZString of the COCO RLE counts)."""
    counts = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
    height, width = mask.shape
    return {
        "width": width,
        "height": height,
        "encodedMask": lzstring.LZString().compressToEncodedURIComponent(counts),
    }


def release_shaped(tmp_path: Path) -> Path:
    """The fixture grown into every case the official loop treats specially (one more take, camera, objects).

    - cutting board_0 gets a second exo camera cam02, annotated at frames 0 and 30 (60 is missing from that
      view) with a mask at 0 only (invisible at 30); its cam01 mask at 30 is annotated but empty.
    - knife_0's aria01 mask at 60 is annotated but empty (and the knife is invisible in cam01 at 60).
    - spatula_0 has no ego camera (cam01 only); pan_0 no exo camera (aria01 only).
    - a second take holds one object, lid_0, seen by cam01 alone.
    """
    root = writable_copy(tmp_path)
    shutil.copytree(root / "takes" / TAKE / "cam01", root / "takes" / TAKE / "cam02")
    path = root / "relations_val.json"
    data = json.loads(path.read_text())
    objects = data["annotations"][TAKE]["object_masks"]
    exo = np.zeros((2160, 3840), np.uint8)
    exo[1000:1200, 1500:1900] = 1
    ego = np.zeros((1408, 1408), np.uint8)
    ego[300:500, 700:900] = 1
    objects["cutting board_0"]["cam02"] = {"annotated_frames": [0, 30], "annotation": {"0": encoded(exo)}}
    objects["cutting board_0"]["cam01"]["annotation"]["30"] = encoded(np.zeros_like(exo))
    objects["knife_0"]["aria01"]["annotation"]["60"] = encoded(np.zeros_like(ego))
    objects["spatula_0"] = {"cam01": {"annotated_frames": [0], "annotation": {"0": encoded(exo)}}}
    objects["pan_0"] = {"aria01": {"annotated_frames": [0, 30], "annotation": {"30": encoded(ego)}}}
    lid = {"cam01": {"annotated_frames": [0], "annotation": {"0": encoded(exo)}}}
    data["annotations"]["9d0e1f2a-0000-4000-8000-000000000002"] = {
        "take_name": "other",
        "object_masks": {"lid_0": lid},
    }
    path.write_text(json.dumps(data))
    return root


def official_loop(relations: dict) -> tuple[set, set]:
    """(required, scored): the (direction, take, object, "<src>_<tgt>", frame) that the official
    `validate_predictions` asks for and that `evaluate_take` scores, read straight off the relations JSON
    (the processed annotation.json keeps every `annotation` key; `annotated_frames` comes from relations)."""
    required, scored = set(), set()
    for take, entry in relations["annotations"].items():
        for obj, cams in entry["object_masks"].items():
            egos = [c for c in cams if "aria" in c]
            if len(egos) < 1:
                continue
            (ego,) = egos
            for exo in [c for c in cams if "aria" not in c]:
                for direction, src, tgt in (("ego-exo", ego, exo), ("exo-ego", exo, ego)):
                    for frame in cams[src]["annotation"]:
                        key = (direction, take, obj, f"{src}_{tgt}", frame)
                        required.add(key)
                        if int(frame) in cams[tgt]["annotated_frames"]:
                            scored.add(key)
    return required, scored


def test_the_submission_holds_exactly_what_the_official_evaluation_iterates(tmp_path: Path) -> None:
    import lightning as L

    from datamodules.correspondence import CorrespondenceDataModule
    from tests.lightning_modules.test_ccmp import tiny_ccmp

    root = release_shaped(tmp_path)
    relations = json.loads((root / "relations_val.json").read_text())
    required, scored = official_loop(relations)
    # By hand: cutting board aria01 -> cam01 / cam02 at 0, 30, 60 (6), cam01 -> aria01 at 0, 30, 60 and
    # cam02 -> aria01 at 0 (4); knife aria01 -> cam01 at 0, 30, 60 (3), cam01 -> aria01 at 0, 30 (2); spatula,
    # pan and lid none. All scored but aria01 -> cam02 at 60 (cam02's annotated_frames are 0 and 30).
    assert len(required) == 15 and len(scored) == 14

    out = tmp_path / "shards"
    report = convert_split(root / "relations_val.json", root / "takes", out)
    assert not report.skipped and report.samples == 15 and report.scored == 14
    samples = read_split(out)

    def key(m: dict) -> tuple:
        return m["setting"], m["take"], m["object"], f"{m['src_cam']}_{m['tgt_cam']}", str(m["src_frame"])

    assert {key(s["json"]) for s in samples} == required
    assert {key(s["json"]) for s in samples if s["json"]["scored"]} == scored

    data = CorrespondenceDataModule(
        data_dir=str(out),
        synth=False,
        predict_shards=str(out / "val-*.tar"),
        image_size=32,
        eval_batch_size=4,
    )
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path)
    )
    trainer.predict(tiny_ccmp(image_size=32), datamodule=data)
    submission = json.loads((tmp_path / "predictions" / "submission.json").read_text())

    got = set()
    for direction, section in submission.items():
        assert section["version"] == section["challenge"] == "xx"
        assert set(section["results"]) == set(relations["annotations"])  # every take
        for take, result in section["results"].items():
            assert set(result) == {"masks", "subsample_idx"}
            assert set(result["masks"]) == set(relations["annotations"][take]["object_masks"])  # every object
            for obj, pairs in result["masks"].items():
                for pair_name, frames in pairs.items():
                    for frame, entry in frames.items():
                        got.add((direction, take, obj, pair_name, frame))
                        assert set(entry) == {"pred_mask", "confidence"} and isinstance(
                            entry["confidence"], float
                        )
                        tgt = pair_name.split("_")[1]
                        assert entry["pred_mask"]["size"] == ([480, 480] if "aria" in tgt else [270, 480])
                        assert isinstance(entry["pred_mask"]["counts"], str)
    assert got == required
    objects = submission["ego-exo"]["results"][TAKE]["masks"]
    assert objects["spatula_0"] == {} and objects["pan_0"] == {}
