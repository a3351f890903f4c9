"""The HANDAL-X converter on a small dataset written here in the released layout, and its evaluation.

The layout (CCMP's `SegSwap/build_handal.py`, ObjectRelator's HANDAL-X): `<root>/<object>/<split>/<video>/rgb/
<frame>.jpg` and `mask/<frame>_000000.png` (pixel = instance id). Pairs are frames i and i + 100. By hand:
- drill/test/video_a has frames 0..101: pairs (0, 100) and (1, 101); instances 1 and 2 in every frame but
  101, which holds only instance 1 -> 3 instance pairs;
- mug/test/video_b has frames 0..100: pair (0, 100) with instance 3 -> 1 instance pair.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from datamodules.convert import handalx
from datamodules.convert.handalx import MEMBERS, convert_split
from datamodules.correspondence import CorrespondenceDataModule
from datamodules.webdataset import decode_sample, iter_raw_samples
from tests.lightning_modules.test_ccmp import tiny_ccmp

H, W = 24, 32


def instance_mask(frame: int, instances: list[int]) -> np.ndarray:
    """A frame's instance-id mask: instance k is a box that moves one pixel right every 10 frames."""
    mask = np.zeros((H, W), np.uint8)
    for k in instances:
        top, left = 2 + 7 * (k - 1), 2 + frame // 10
        mask[top : top + 5, left : left + 6 + k] = k
    return mask


def write_video(root: Path, video: str, frames: int, instances_at) -> None:
    rgb, masks = root / video / "rgb", root / video / "mask"
    rgb.mkdir(parents=True)
    masks.mkdir(parents=True)
    for f in range(frames):
        pixels = np.full((H, W, 3), (f * 2) % 255, np.uint8)
        Image.fromarray(pixels).save(rgb / f"{f:06d}.jpg")
        Image.fromarray(instance_mask(f, instances_at(f))).save(masks / f"{f:06d}_000000.png")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("handal")
    write_video(root, "drill/test/video_a", 102, lambda f: [1] if f == 101 else [1, 2])
    write_video(root, "mug/test/video_b", 101, lambda f: [3])
    return root


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"counts": encoded["counts"].decode("ascii"), "size": [int(s) for s in encoded["size"]]}


def anns(frame: int, instances: list[int]) -> list[dict]:
    """The COCO annotations of a frame's instances, in instance order (build_handal.py's)."""
    ids = instance_mask(frame, instances)
    return [
        {"segmentation": rle(ids == k), "area": float((ids == k).sum()), "category_id": float(k)}
        for k in instances
    ]


def pair_json(root: Path, records: list[tuple[str, int, int, list[int]]]) -> Path:
    """The pair JSON CCMP reads (handal_test_visual.json's record layout), for (video, i, j, instances)."""
    out = []
    for video, i, j, instances in records:
        out.append(
            {
                "image": f"{video}/rgb/{j:06d}.jpg",
                "image_info": {"file_name": f"{video}/rgb/{j:06d}.jpg", "height": H, "width": W},
                "anns": anns(j, instances),
                "first_frame_image": f"{video}/rgb/{i:06d}.jpg",
                "first_frame_anns": anns(i, instances),
                "new_img_id": len(out),
                "video_name": video.split("/")[0],
            }
        )
    path = root / "handal_test_visual.json"
    path.write_text(json.dumps(out))
    return path


def read(out: Path, split: str = "test") -> list[dict]:
    index = json.loads((out / "index.json").read_text())
    return [
        decode_sample(raw, MEMBERS)
        for s in index["splits"][split]["shards"]
        for raw in iter_raw_samples(str(out / s))
    ]


def test_folder_pairs_are_frames_i_and_i_plus_100_per_target_instance(dataset, tmp_path):
    report = convert_split(tmp_path / "out", "test", dataset, from_folders=True)
    samples = read(tmp_path / "out")
    got = {
        (s["json"]["take"], s["json"]["object"], s["json"]["src_frame"], s["json"]["tgt_frame"])
        for s in samples
    }
    assert got == {
        ("drill/test/video_a", "instance_1", 0, 100),
        ("drill/test/video_a", "instance_2", 0, 100),
        ("drill/test/video_a", "instance_1", 1, 101),
        ("mug/test/video_b", "instance_3", 0, 100),
    }
    assert dict(report.splits) == {"test": 4} and not report.skipped
    s = next(s for s in samples if s["json"]["object"] == "instance_2")
    np.testing.assert_array_equal(s["src_mask.png"] > 127, instance_mask(0, [1, 2]) == 2)
    np.testing.assert_array_equal(s["tgt_mask.png"] > 127, instance_mask(100, [1, 2]) == 2)
    np.testing.assert_array_equal(s["tgt_gt.png"], s["tgt_mask.png"])  # scored at the frame's own size
    assert s["json"]["setting"] == "exo-exo" and s["json"]["visible"] and not s["json"]["planned"]
    assert s["src.jpg"].shape == (H, W, 3) and s["json"]["tgt_native"] == [H, W]


def test_the_pair_json_gives_the_same_shards_as_the_folders(dataset, tmp_path):
    records = [
        ("drill/test/video_a", 0, 100, [1, 2]),
        ("drill/test/video_a", 1, 101, [1]),
        ("mug/test/video_b", 0, 100, [3]),
    ]
    convert_split(tmp_path / "json", "test", dataset, json_path=pair_json(tmp_path, records))
    convert_split(tmp_path / "folders", "test", dataset, from_folders=True)
    by_key = lambda samples: {s["__key__"]: s for s in samples}  # noqa: E731
    a, b = by_key(read(tmp_path / "json")), by_key(read(tmp_path / "folders"))
    assert set(a) == set(b) and len(a) == 4
    for key in a:
        for member in ("src_mask.png", "tgt_mask.png", "tgt_gt.png", "src.jpg"):
            np.testing.assert_array_equal(a[key][member], b[key][member])
        assert {k: v for k, v in a[key]["json"].items() if k != "take_name"} == {
            k: v for k, v in b[key]["json"].items() if k != "take_name"
        }


def test_missing_frames_are_counted_and_val_takes_whole_videos(dataset, tmp_path):
    records = [("drill/test/video_a", 0, 100, [1, 2]), ("mug/test/video_c", 0, 100, [3])]  # video_c absent
    report = convert_split(tmp_path / "out", "test", dataset, json_path=pair_json(tmp_path, records))
    assert dict(report.skipped) == {"missing_frame": 1} and dict(report.splits) == {"test": 2}
    fraction = next(  # a fraction that sends one of the two videos to val
        f / 20
        for f in range(1, 20)
        if len({handalx.split_of(v, "test", f / 20) for v in ("drill/test/video_a", "mug/test/video_b")}) == 2
    )
    report = convert_split(tmp_path / "split", "test", dataset, from_folders=True, val_fraction=fraction)
    videos = {name: {s["json"]["take"] for s in read(tmp_path / "split", name)} for name in ("test", "val")}
    assert sorted(report.splits.values()) == [1, 3]  # video_b's one pair, video_a's three: whole videos
    assert len(videos["test"]) == len(videos["val"]) == 1 and not videos["test"] & videos["val"]
    with pytest.raises(ValueError, match="exactly one"):
        convert_split(tmp_path / "x", "test", dataset)


def test_cli_converts_and_the_handalx_protocol_scores_mean_per_instance_iou(dataset, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    handalx.add_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args(["--root", str(dataset), "--from-folders", "--split", "test", "--out", str(out)])
    assert handalx.convert(args) == out / "index.json"
    assert "wrote 4 instance pairs (test: 4)" in capsys.readouterr().out

    data = CorrespondenceDataModule(data_dir=str(out), synth=False, image_size=32, eval_batch_size=2)
    model = tiny_ccmp(image_size=32, eval_protocol="handalx")
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    records = [r for batch in trainer.predict(model, datamodule=data) for r in batch]
    gts = {s["__key__"]: s["tgt_gt.png"] > 127 for s in read(out)}
    per_instance: dict[tuple, list[float]] = {}
    for r in records:
        pred, gt = r["mask"].numpy(), gts[r["__key__"]]
        assert pred.shape == gt.shape == (H, W)  # brought back to the frame's size, as CCMP's eval_handal
        union = (pred | gt).sum()
        per_instance.setdefault((r["take"], r["object"]), []).append(
            1.0 if union == 0 else (pred & gt).sum() / (union + 1e-7)
        )
    assert len(per_instance) == 3  # video_a instances 1 and 2, video_b instance 3
    expected = np.mean([np.mean(v) for v in per_instance.values()])
    (results,) = trainer.test(model, datamodule=data)
    assert results["test/instances/iou"] == pytest.approx(expected, abs=1e-6)
