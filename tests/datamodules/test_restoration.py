"""Restoration data: the generated photo shards, on-the-fly degradation, real pairs, odd images, the converter."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.convert.restoration import convert_folders, pair_name
from datamodules.restoration import RestorationDataModule, RestorationTransform, rgb8
from datamodules.synth import synthesize
from datamodules.synth.restoration import CAPTIONS, region, samples, source
from datamodules.webdataset import BadSample, ShardWriter, write_index


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("restoration")
    synthesize("restoration", out, samples={"train": 14, "val": 4, "test": 4})
    return out


def test_generated_crops_come_from_disjoint_train_val_test_columns():
    for split in ("train", "val", "test"):
        for sample in samples(split, 7, seed=0):
            _, left, _, w = sample["json"]["box"]
            name = sample["json"]["source"].split(":")[1]
            x0, x1 = region(source(name).shape[1], split, 128)
            assert x0 <= left and left + w <= x1
            assert sample["hq.png"].shape == (128, 128, 3) and sample["json"]["description"] == CAPTIONS[name]
    assert region(600, "train", 128) == (0, 344) and region(600, "test", 128) == (472, 600)


def test_training_batches_hold_degraded_x4_inputs_with_labels(shards):
    dm = RestorationDataModule(image_size=64, data_dir=str(shards), batch_size=4, batches_per_epoch=2)
    batch = next(iter(dm.train_dataloader()))
    assert batch["hq"].shape == batch["lq"].shape == (4, 3, 64, 64) and batch["lq_small"].shape == (
        4,
        3,
        16,
        16,
    )
    assert all(label.endswith("noise") and "blur" in label for label in batch["label"])
    assert all(d.startswith("The image features") for d in batch["description"])
    params = json.loads(batch["degradation"][0])
    assert params["scale"] == 4 and "kernel1" in params


def test_evaluation_degradations_are_fixed_per_key(shards):
    dm = RestorationDataModule(image_size=64, data_dir=str(shards), eval_batch_size=4)
    a, b = next(iter(dm.test_dataloader())), next(iter(dm.test_dataloader()))
    assert a["__key__"] == b["__key__"] and torch.equal(a["lq"], b["lq"]) and a["label"] == b["label"]


def test_vq_training_mode_skips_the_degradation(shards):
    dm = RestorationDataModule(
        image_size=64, data_dir=str(shards), batch_size=2, batches_per_epoch=1, degrade=False
    )
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"hq", "description", "__key__"}


def _png(arr: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    from datamodules.webdataset import decode_image

    return decode_image(buf.getvalue())


def test_odd_images_are_converted_or_refused_by_name():
    grey16 = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    out = rgb8(_png(grey16), "hq.png")
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert out[0, 1, 0] == round(16 / 257) and out[-1, -1, 0] == round(int(grey16[-1, -1]) / 257)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent black -> white
    assert (rgb8(rgba, "x") == 255).all()
    with pytest.raises(BadSample, match="float32 pixels"):
        rgb8(np.zeros((4, 4), np.float32), "hq.tif")
    transform = RestorationTransform(64, 4, train=True)
    with pytest.raises(BadSample, match="smaller than the 64 px crop"):
        transform({"json": {}, "hq.png": np.zeros((40, 80, 3), np.uint8)}, np.random.default_rng(0))


def test_real_pairs_crop_the_lq_where_the_hq_is_cropped(tmp_path):
    hq = np.random.default_rng(0).integers(0, 255, (128, 96, 3), dtype=np.uint8)
    lq = hq[::4, ::4].copy()
    with ShardWriter(tmp_path, "test") as writer:
        writer.write({"__key__": "p0", "json": {"description": "", "scale": 4}, "hq.png": hq, "lq.png": lq})
    write_index(tmp_path, kind="restoration", splits={"test": {"samples": 1}})
    dm = RestorationDataModule(image_size=64, data_dir=str(tmp_path), synth=False)
    batch = next(iter(dm.test_dataloader()))
    assert batch["label"] == [""] and batch["lq_small"].shape == (1, 3, 16, 16)
    top, left = (128 - 64) // 2, (96 - 64) // 2
    expected = torch.from_numpy(hq[top : top + 64 : 4, left : left + 64 : 4].copy()).permute(2, 0, 1) / 255
    assert torch.allclose(batch["lq_small"][0], expected)


def _save(path, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 128, np.uint8)).save(path)


def test_pair_names_drop_realsr_and_drealsr_tags():
    from pathlib import Path

    root = Path("/d")
    assert pair_name(root / "Canon_001_HR.png", root) == pair_name(root / "Canon_001_LR4.png", root)
    assert pair_name(root / "sub/img_x1.png", root) == pair_name(root / "sub/img_x4.png", root) == "sub/img"


def test_convert_writes_hq_folders_with_captions_and_paired_sets(tmp_path):
    _save(tmp_path / "lsdir" / "0001.png", (64, 64))
    _save(tmp_path / "lsdir" / "sub" / "0002.jpg", (80, 64))
    _save(tmp_path / "lsdir" / "tiny.png", (16, 16))
    (tmp_path / "caps.jsonl").write_text(
        json.dumps({"image": "0001.png", "caption": "A grey square."}) + "\n"
    )
    index, written, skipped, _ = convert_folders(
        tmp_path / "out", [str(tmp_path / "lsdir")], captions=str(tmp_path / "caps.jsonl"), min_size=32
    )
    assert written == 2 and skipped == {"too_small": 1}
    dm = RestorationDataModule(image_size=64, data_dir=str(tmp_path / "out"), batch_size=2, synth=False)
    batch = next(iter(dm.train_dataloader()))
    assert batch["hq"].shape == (2, 3, 64, 64) and sorted(batch["description"]) == ["", "A grey square."]
    # a paired set: one pair, one size mismatch, one unpaired file
    _save(tmp_path / "HR" / "Canon_001_HR.png", (64, 64))
    _save(tmp_path / "LR" / "Canon_001_LR4.png", (16, 16))
    _save(tmp_path / "HR" / "Canon_002_HR.png", (64, 64))
    _save(tmp_path / "LR" / "Canon_002_LR4.png", (20, 16))
    _save(tmp_path / "HR" / "Canon_003_HR.png", (64, 64))
    index, written, skipped, _ = convert_folders(
        tmp_path / "out", [str(tmp_path / "HR")], lq=str(tmp_path / "LR"), split="test"
    )
    assert written == 1 and skipped == {"size_mismatch": 1, "unpaired": 1}
    info = json.loads(index.read_text())
    assert set(info["splits"]) == {"train", "test"} and info["skipped"]["test"]["unpaired"] == 1
    batch = next(iter(dm.test_dataloader()))
    assert batch["lq_small"].shape == (1, 3, 16, 16) and batch["label"] == [""]
