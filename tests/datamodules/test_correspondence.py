"""The correspondence data kind: CCMP §4 augmentation and test preprocessing, bad pairs, batches."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.convert.egoexo4d import decode_mask, resize_nearest
from datamodules.correspondence import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CorrespondenceDataModule,
    CorrespondenceTransform,
    gt_crop_box,
    nearest_index,
    nearest_resize,
    pad_to_square,
    prediction_to_gt,
    square_nearest,
)
from datamodules.webdataset import BadSample, SkipSample
from metrics.correspondence import resize_longest

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "egoexo4d"
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def box(hw, top, left, height, width):
    mask = np.zeros(hw, np.uint8)
    mask[top : top + height, left : left + width] = 255
    return mask


def pair(src_hw=(40, 40), tgt_hw=(40, 40), src_mask=None, tgt_mask=None, visible=True, setting="ego-exo"):
    """A decoded sample; masks default to a box in the middle (target: empty when invisible)."""
    if src_mask is None:
        src_mask = box(src_hw, src_hw[0] // 4, src_hw[1] // 4, src_hw[0] // 2, src_hw[1] // 2)
    if tgt_mask is None:
        tgt_mask = box(tgt_hw, tgt_hw[0] // 4, tgt_hw[1] // 4, tgt_hw[0] // 2, tgt_hw[1] // 2) * visible
    meta = {
        "take": "t0",
        "take_name": "take_0",
        "object": "cup",
        "src_cam": "aria01",
        "tgt_cam": "cam01",
        "src_frame": 30,
        "tgt_frame": 60,
        "setting": setting,
        "visible": visible,
        "src_native": list(src_hw),
        "tgt_native": list(tgt_hw),
        "split": "train",
    }
    return {
        "__key__": "k",
        "json": meta,
        "src.jpg": np.full((*src_hw, 3), 128, np.uint8),
        "src_mask.png": src_mask,
        "tgt.jpg": np.full((*tgt_hw, 3), 128, np.uint8),
        "tgt_mask.png": tgt_mask,
    }


def rng(seed=0):
    return np.random.default_rng(seed)


def pixels(img):
    """Undo the ImageNet normalization."""
    return img * STD + MEAN


# --------------------------------------------------------------------------- training (§4)


def test_training_crop_keeps_a_small_mask_far_from_the_centre():
    # 100x300 -> short side 65 -> 65x195; the 11x16 box at rows 5..15, cols 280..295 lands near cols 182..192,
    # which a random 64-wide crop (left in 0..131) would mostly miss.
    sample = pair((100, 300), (100, 300), box((100, 300), 5, 280, 11, 16), box((100, 300), 80, 2, 10, 10))
    transform = CorrespondenceTransform(64, train=True)
    for seed in range(20):
        out = transform(sample, rng(seed))
        assert out["src"].shape == out["tgt"].shape == (3, 64, 64)
        assert out["src_mask"].shape == out["tgt_mask"].shape == (1, 64, 64)
        assert out["src_mask"].sum() > 1 and out["tgt_mask"].sum() > 1


def test_flip_moves_the_mask_to_the_mirrored_column():
    # A 9x9 image is already at short side S + 1 = 9 (no resize); the 8x8 crop starts at column 0 or 1.
    # Red encodes the column (20 * x), so the output's red tells the crop offset and the flip.
    s = 8
    img = np.zeros((9, 9, 3), np.uint8)
    img[..., 0] = 20 * np.arange(9)
    mask = np.zeros((9, 9), np.uint8)
    mask[:, 3] = 255
    sample = pair((9, 9), (9, 9), mask, mask.copy())
    sample["src.jpg"], sample["tgt.jpg"] = img, img.copy()
    flips = set()
    for seed in range(24):
        out = CorrespondenceTransform(s, train=True)(sample, rng(seed))
        for view in ("src", "tgt"):
            red = torch.round(pixels(out[view])[0, 0] * 255).long().tolist()
            flipped = red[0] > red[-1]
            left = (red[-1] if flipped else red[0]) // 20
            column = s - 1 - (3 - left) if flipped else 3 - left
            cols = torch.nonzero(out[f"{view}_mask"][0].sum(0)).flatten().tolist()
            assert cols == [column]
            assert red[column] == 60  # the mask stays on the image column it marked
            flips.add((view, flipped))
    assert flips == {("src", True), ("src", False), ("tgt", True), ("tgt", False)}


def test_source_and_target_draw_their_augmentation_independently():
    sample = pair((50, 90), (50, 90), box((50, 90), 0, 0, 50, 90), box((50, 90), 0, 0, 50, 90))
    img = np.zeros((50, 90, 3), np.uint8)
    img[..., 0] = np.arange(90) * 2
    sample["src.jpg"], sample["tgt.jpg"] = img, img.copy()
    same = [
        torch.equal(out["src"], out["tgt"])
        for out in (CorrespondenceTransform(32, train=True)(sample, rng(seed)) for seed in range(10))
    ]
    assert not all(same)


def test_training_masks_are_soft_and_in_unit_range():
    # 40x40 -> 65x65 (x 1.625): the box edges fall between output pixels
    out = CorrespondenceTransform(64, train=True)(pair((40, 40), (40, 40)), rng(1))
    for m in (out["src_mask"], out["tgt_mask"]):
        assert m.min() >= 0 and m.max() <= 1
        assert ((m > 0) & (m < 1)).any()  # bilinear edges (CCMP: INTER_LINEAR targets)
    assert out["visible"].item() == 1.0 and out["frame"] == 60 and out["setting"] == "ego-exo"


def test_invisible_pair_trains_on_an_empty_target():
    out = CorrespondenceTransform(32, train=True)(pair(visible=False), rng(0))
    assert out["visible"].item() == 0.0 and out["tgt_mask"].sum() == 0


# --------------------------------------------------------------------------- evaluation (§4)


def test_eval_pads_to_square_then_resizes_a_wide_image():
    # 100x200: the 200x200 square has the content at rows 50..149, i.e. rows 16..47 at S = 64 (x 0.32),
    # and at the 480 scale a 240x480 box at row 120.
    h, w = 100, 200
    sample = pair((h, w), (h, w), np.full((h, w), 255, np.uint8), box((h, w), 20, 50, 20, 50))
    sample["src.jpg"] = np.full((h, w, 3), 255, np.uint8)
    out = CorrespondenceTransform(64, train=False)(sample, rng())
    img = pixels(out["src"])
    assert torch.allclose(img[:, 16:48], torch.ones(3, 32, 64), atol=1e-5)
    assert torch.allclose(img[:, :16], torch.zeros(3, 16, 64), atol=1e-5)
    assert torch.allclose(img[:, 48:], torch.zeros(3, 16, 64), atol=1e-5)
    expected = torch.zeros(1, 64, 64)
    expected[:, 16:48] = 1
    assert torch.equal(out["src_mask"], expected)  # nearest: binary
    assert out["tgt_gt"].dtype == torch.bool and out["tgt_gt"].shape == (240, 480)
    assert out["gt_crop"].tolist() == [120, 0, 240, 480]
    # target box rows 20..39, cols 50..99 -> nearest at x 2.4: rows 48..95, cols 120..239
    expected_gt = torch.zeros(240, 480, dtype=torch.bool)
    expected_gt[48:96, 120:240] = True
    assert torch.equal(out["tgt_gt"], expected_gt)


@pytest.mark.parametrize(
    ("tgt_hw", "gt_shape", "crop"),
    [((256, 256), (480, 480), [0, 0, 480, 480]), ((144, 256), (270, 480), [105, 0, 270, 480])],
)
def test_prediction_maps_to_exactly_the_ground_truth_shape(tgt_hw, gt_shape, crop):
    out = CorrespondenceTransform(128, train=False)(pair((256, 256), tgt_hw), rng())
    assert tuple(out["tgt_gt"].shape) == gt_shape and out["gt_crop"].tolist() == crop
    assert prediction_to_gt(torch.rand(128, 128), out["gt_crop"]).shape == gt_shape
    # the preprocessed target mask, taken as a prediction, lands on the ground truth
    pred = prediction_to_gt(out["tgt_mask"][0], out["gt_crop"])
    iou = (pred & out["tgt_gt"]).sum() / (pred | out["tgt_gt"]).sum()
    assert iou > 0.95


@pytest.mark.parametrize("hw", [(1080, 1920), (1408, 1408), (1520, 2704), (160, 288), (99, 101), (701, 300)])
def test_prediction_shape_matches_the_official_ground_truth_for_any_size(hw):
    gt = resize_longest(np.zeros(hw, np.uint8))
    for s in (64, 512):
        assert prediction_to_gt(torch.zeros(s, s), gt_crop_box(*gt.shape)).shape == gt.shape


def test_prediction_to_gt_thresholds_resizes_nearest_and_crops():
    prob = torch.tensor([[0.9, 0.1], [0.5, 0.2]])  # 0.5 is not above the threshold
    out = prediction_to_gt(prob, (105, 0, 270, 480))
    # 2 -> 480: destination d takes source round(d · 2 / 480) = (4d + 480) // 960: d < 120 -> 0, else 1.
    # Only the 0.9 corner is set: rows 0..119, cols 0..119 of the 480 square; the crop keeps rows 105..119.
    assert out.shape == (270, 480)
    assert out.sum() == 15 * 120 and out[:15, :120].all()


def test_nearest_index_rounds_where_cv2_floors_and_is_exact_at_integer_factors():
    # 5 -> 3: d · 5/3 = 0, 1.67, 3.33 -> nearest 0, 2, 3 (cv2 INTER_NEAREST floors to 0, 1, 3)
    assert nearest_index(5, 3).tolist() == [0, 2, 3]
    # 960 -> 480 (exo padded frame to the evaluation square): 2d, as cv2 and the official ground truth
    assert torch.equal(nearest_index(960, 480), torch.arange(480) * 2)
    # 480 -> 512 (x 15/16): d = 8 -> 7.5 rounds up to 8; d = 511 -> 479.06 -> 479
    assert nearest_index(480, 512)[[0, 8, 15, 16, 511]].tolist() == [0, 8, 14, 15, 479]
    x = torch.arange(12.0).reshape(1, 3, 4)
    assert nearest_resize(x, (3, 2)).tolist() == [[[0.0, 2.0], [4.0, 6.0], [8.0, 10.0]]]


@pytest.mark.parametrize(("hw", "size"), [((5, 8), 7), ((9, 4), 6), ((54, 96), 64), ((7, 7), 3)])
def test_square_nearest_is_pad_to_square_then_nearest_resize(hw, size):
    x = torch.randint(1, 255, (3, *hw), dtype=torch.uint8)
    assert torch.equal(square_nearest(x, size), nearest_resize(pad_to_square(x), (size, size)))


@pytest.fixture(scope="module")
def fixture_masks() -> list[tuple[np.ndarray, np.ndarray]]:
    """(frame-size mask, evaluation ground truth) of each mask of the release-shaped fixture, as converted."""
    relations = json.loads((FIXTURE / "relations_val.json").read_text())["annotations"]
    out = []
    for cams in next(iter(relations.values()))["object_masks"].values():
        for cam, entry in cams.items():
            for mask in map(decode_mask, entry["annotation"].values()):
                step = 2 if cam.startswith("aria") else 4  # Aria 1408² -> 704², exo 3840x2160 -> 960x540
                frame = resize_nearest(mask, mask.shape[0] // step, mask.shape[1] // step) * np.uint8(255)
                out.append((frame, resize_longest(mask) * np.uint8(255)))
    return out


@pytest.mark.parametrize("size", [256, 448, 480, 512, 518, 1024])
def test_the_oracle_round_trip_lands_on_the_official_ground_truth_at_every_training_size(fixture_masks, size):
    # The converter's masks of the release-shaped fixture, the target mask the transform makes at S fed
    # back as the prediction: what is lost is only what the S grid cannot hold. With floor nearest
    # resizes (cv2's, torch's "nearest") the round trip drifts 0.6 GT pixels down-right at S = 512 (mean
    # IoU 0.935) and 0.7 at 518 (0.92); at S = 480 it is an exact subsample.
    ious, shifts = [], []
    for frame, gt_png in fixture_masks:
        sample = pair((8, 8), frame.shape, tgt_mask=frame)  # only the target view matters here
        sample["tgt_gt.png"] = gt_png
        out = CorrespondenceTransform(size, train=False)(sample, rng())
        pred, gt = prediction_to_gt(out["tgt_mask"][0], out["gt_crop"]).numpy(), out["tgt_gt"].numpy()
        ious.append((pred & gt).sum() / (pred | gt).sum())
        shifts.append(np.mean(np.nonzero(pred), axis=1) - np.mean(np.nonzero(gt), axis=1))
    assert len(ious) == 11
    assert np.mean(ious) >= (0.99 if size == 480 else 0.95), np.mean(ious)
    assert np.abs(np.mean(shifts, axis=0)).max() < 0.3, np.mean(shifts, axis=0)  # no drift (GT pixels)


def test_tgt_gt_png_is_used_when_present():
    sample = pair((144, 256), (144, 256))
    gt = np.zeros((270, 480), np.uint8)
    gt[0, 0] = 255
    sample["tgt_gt.png"] = gt
    out = CorrespondenceTransform(64, train=False)(sample, rng())
    assert out["tgt_gt"].sum() == 1 and out["tgt_gt"][0, 0]


# --------------------------------------------------------------------------- bad pairs


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda s: s.update({"src_mask.png": box((40, 30), 0, 0, 9, 9)}), "but its image is 40x40"),
        (lambda s: s.update({"tgt_mask.png": box((30, 40), 0, 0, 9, 9)}), "but its image is 40x40"),
        (lambda s: s["json"].update({"visible": False}), "marked invisible"),
        (lambda s: s["json"].pop("object"), "'object'"),
        (lambda s: s["json"].update({"setting": "ego-side"}), "is not one of"),
        (lambda s: s.update({"src_mask.png": np.zeros((40, 40, 3), np.uint8)}), "single-channel"),
    ],
)
def test_bad_pairs_are_bad_samples(train, change, reason):
    sample = pair()
    change(sample)
    with pytest.raises(BadSample, match=reason):
        CorrespondenceTransform(32, train=train)(sample, rng())


def test_an_empty_query_trains_as_a_negative_and_is_predicted_in_evaluation():
    # CCMP's dataloader: FM1.sum() < 1e-6 -> target zeroed, negative; the official evaluation scores the
    # annotated (empty) query too.
    sample = pair(src_mask=np.zeros((40, 40), np.uint8))
    out = CorrespondenceTransform(32, train=True)(sample, rng())
    assert out["visible"].item() == 0.0 and out["tgt_mask"].sum() == 0 and out["src_mask"].sum() == 0
    out = CorrespondenceTransform(32, train=False)(sample, rng())
    assert out["visible"].item() == 1.0 and out["tgt_gt"].any() and out["src_mask"].sum() == 0


def test_unscored_pairs_of_unknown_visibility_stay_out_of_training_but_are_predicted():
    sample = pair(visible=False)
    sample["json"].update(scored=False, planned=True)
    with pytest.raises(SkipSample, match="not annotated"):
        CorrespondenceTransform(32, train=True)(sample, rng())
    out = CorrespondenceTransform(32, train=False)(sample, rng())
    assert not out["scored"] and out["planned"]
    visible = pair()
    visible["json"].update(scored=False)  # a target mask outside annotated_frames: its visibility is known
    assert CorrespondenceTransform(32, train=True)(visible, rng())["visible"].item() == 1.0
    # without the fields (generated shards): scored, and planned when cross-view at one frame
    plain = CorrespondenceTransform(32, train=False)(pair(), rng())
    assert plain["scored"] and not plain["planned"]  # src_frame 30, tgt_frame 60
    sample = pair()
    sample["json"]["tgt_frame"] = 30
    assert CorrespondenceTransform(32, train=False)(sample, rng())["planned"]


def test_evaluation_images_are_resized_nearest_as_the_official_preprocessing():
    # CCMP's eval_segswap.reshape_img_war resizes the uint8 frame with cv2.INTER_NEAREST: a one-pixel
    # checkerboard 64 -> 32 keeps pure values (bilinear would average them to grey).
    sample = pair((64, 64), (64, 64))
    board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    sample["src.jpg"] = np.repeat(board[..., None], 3, axis=2)
    out = pixels(CorrespondenceTransform(32, train=False)(sample, rng())["src"])
    assert set(torch.unique(out.round(decimals=4)).tolist()) <= {0.0, 1.0}
    train = pixels(CorrespondenceTransform(32, train=True)(sample, rng())["src"])
    assert ((train > 0.05) & (train < 0.95)).any()  # training: bilinear (CCMP: cv2.INTER_LINEAR)


def test_visible_pair_with_an_empty_target_is_bad_for_training_but_scored_in_evaluation():
    sample = pair(tgt_mask=np.zeros((40, 40), np.uint8))
    with pytest.raises(BadSample, match="marked visible but its target mask is empty"):
        CorrespondenceTransform(32, train=True)(sample, rng())
    out = CorrespondenceTransform(32, train=False)(sample, rng())  # the official evaluation scores it (§5)
    assert out["visible"].item() == 1.0 and not out["tgt_gt"].any()


def test_a_tgt_gt_of_another_aspect_is_a_bad_sample():
    sample = pair((144, 256), (144, 256))
    sample["tgt_gt.png"] = np.zeros((480, 480), np.uint8)
    with pytest.raises(BadSample, match="tgt_gt"):
        CorrespondenceTransform(32, train=False)(sample, rng())


def test_settings_keep_only_the_listed_pairs():
    transform = CorrespondenceTransform(32, train=True, settings=("ego-exo",))
    assert transform(pair(setting="ego-exo"), rng())["setting"] == "ego-exo"
    with pytest.raises(SkipSample, match=r"not in data\.settings"):
        transform(pair(setting="exo-ego"), rng())
    with pytest.raises(ValueError, match="subset"):
        CorrespondenceDataModule(settings=["ego-side"])


def test_transform_survives_pickling():
    transform = CorrespondenceDataModule(image_size=32, settings=["exo-ego"]).transform(True)
    again = pickle.loads(pickle.dumps(transform))
    assert again == transform
    a = transform(pair(setting="exo-ego"), rng(5))
    b = again(pair(setting="exo-ego"), rng(5))
    assert torch.equal(a["src"], b["src"]) and torch.equal(a["tgt_mask"], b["tgt_mask"])


# --------------------------------------------------------------------------- end to end


def test_datamodule_generates_shards_and_delivers_batches(tmp_path):
    dm = CorrespondenceDataModule(
        data_dir=str(tmp_path),
        synth_samples={"train": 8, "val": 3, "test": 2},
        image_size=64,
        batch_size=2,
        batches_per_epoch=3,
    )
    dm.prepare_data()
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    for batch in batches:
        for key in ("src", "tgt"):
            assert batch[key].shape == (2, 3, 64, 64) and batch[key].dtype == torch.float32
        for key in ("src_mask", "tgt_mask"):
            assert batch[key].shape == (2, 1, 64, 64) and 0 <= batch[key].min() <= batch[key].max() <= 1
        assert batch["visible"].shape == (2,) and batch["frame"].shape == (2,)
        assert (batch["src_mask"].flatten(1).sum(1) > 0).all()
        assert ((batch["tgt_mask"].flatten(1).sum(1) > 0) == (batch["visible"] > 0.5)).all()
        for key in ("setting", "take", "object", "src_cam", "tgt_cam"):
            assert isinstance(batch[key], list) and len(batch[key]) == 2
    val = list(dm.val_dataloader())
    assert [len(b["setting"]) for b in val] == [2, 1]
    for batch in val:
        assert batch["gt_crop"].shape == (len(batch["setting"]), 4)
        for gt, crop in zip(batch["tgt_gt"], batch["gt_crop"]):
            assert gt.dtype == torch.bool and tuple(gt.shape) in {(480, 480), (270, 480)}
            assert prediction_to_gt(torch.rand(64, 64), crop).shape == gt.shape
    assert dm.data_stats()["skipped"] == 0
