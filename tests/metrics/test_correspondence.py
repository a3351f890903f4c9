"""Ego-Exo4D correspondence metrics, HANDAL-X mIoU and submission JSON: values worked by hand."""

import json
import math

import numpy as np
import pytest
import torch

from metrics.correspondence import (
    CorrespondenceMetrics,
    HandalInstanceIoU,
    SubmissionWriter,
    balanced_accuracy,
    bbox_center,
    boundary_tolerance,
    contour_accuracy,
    decode_rle,
    encode_rle,
    existence_accuracy,
    iou,
    location_error,
    resize_longest,
    seg2bmap,
)

NORMALIZER = 480 * math.sqrt(2)  # sqrt(480² + 480²) = 678.82


def box(shape, rows, cols):
    """A bool mask of `shape` with the inclusive box rows[0]..rows[1] x cols[0]..cols[1] set."""
    mask = np.zeros(shape, dtype=bool)
    mask[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = True
    return mask


# --- IoU ---------------------------------------------------------------------------------------------


def test_iou_counts_overlap_of_two_rectangles():
    pred = box((4, 4), rows=(0, 1), cols=(0, 2))  # 6 pixels
    gt = box((4, 4), rows=(0, 2), cols=(1, 2))  # 6 pixels
    # intersection rows 0-1 x cols 1-2 = 4 pixels; union = 6 + 6 - 4 = 8
    assert iou(pred, gt) == 4 / (8 + 1e-7)


def test_iou_of_two_empty_masks_is_one_and_disjoint_is_zero():
    empty = np.zeros((4, 4), dtype=bool)
    assert iou(empty, empty) == 1.0
    assert iou(box((4, 4), (0, 0), (0, 0)), box((4, 4), (3, 3), (3, 3))) == 0.0


# --- boundaries and CA -------------------------------------------------------------------------------


def test_seg2bmap_outlines_a_square_half_a_pixel_towards_the_origin():
    square = box((5, 5), rows=(1, 2), cols=(1, 2))
    expected = np.array(
        [
            [1, 1, 1, 0, 0],
            [1, 0, 1, 0, 0],
            [1, 1, 1, 0, 0],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(seg2bmap(square), expected)


def test_seg2bmap_last_column_compares_only_with_its_south_neighbour():
    # The whole last column is foreground: zero padding would mark it all (its east is background),
    # DAVIS marks the column left of it instead, including the last row (which compares east only).
    mask = box((4, 4), rows=(0, 3), cols=(3, 3))
    expected = box((4, 4), rows=(0, 3), cols=(2, 2))
    np.testing.assert_array_equal(seg2bmap(mask), expected)


def test_boundary_tolerance_is_five_pixels_exo_and_six_ego():
    assert boundary_tolerance((270, 480)) == 5  # ceil(0.008 · 550.7) = ceil(4.41)
    assert boundary_tolerance((480, 480)) == 6  # ceil(0.008 · 678.8) = ceil(5.43)
    assert boundary_tolerance((20, 20)) == 1  # ceil(0.008 · 28.3) = ceil(0.23)


def test_contour_accuracy_of_identical_masks_is_one():
    gt = box((270, 480), rows=(100, 150), cols=(200, 300))
    assert contour_accuracy(gt.copy(), gt) == 1.0


def test_contour_accuracy_of_a_box_shifted_past_the_tolerance():
    # 20x20 -> d = 1, disk(1) = the 4-neighbourhood. GT box rows 5-9, cols 5-9 has the boundary ring
    # rows 4-9 x cols 4-9 (20 pixels); the prediction, shifted 3 columns right, has the ring
    # rows 4-9 x cols 7-12 (20 pixels). Prediction pixels within 1 of the GT ring: top row cols 7-10 (4),
    # bottom row cols 7-10 (4), left column rows 5 and 8 (next to GT rows 4 and 9) (2), right column
    # none -> P = 10/20. By the mirror argument R = 10/20, so F = 2·0.25/1 = 0.5.
    gt = box((20, 20), rows=(5, 9), cols=(5, 9))
    pred = box((20, 20), rows=(5, 9), cols=(8, 12))
    assert contour_accuracy(pred, gt) == pytest.approx(0.5)


def test_contour_accuracy_accepts_a_shift_of_exactly_the_tolerance():
    # 480x270 -> d = 5: every ring pixel of a box shifted 5 columns lies exactly 5 from the other ring.
    gt = box((270, 480), rows=(100, 150), cols=(200, 300))
    assert contour_accuracy(box((270, 480), (100, 150), (205, 305)), gt) == 1.0
    assert contour_accuracy(box((270, 480), (100, 150), (206, 306)), gt) < 1.0


def test_contour_accuracy_empty_cases_follow_davis():
    gt = box((20, 20), rows=(5, 9), cols=(5, 9))
    empty = np.zeros((20, 20), dtype=bool)
    assert contour_accuracy(empty, gt) == 0.0  # P = 1, R = 0
    assert contour_accuracy(gt, empty) == 0.0  # P = 0, R = 1
    assert contour_accuracy(empty, empty) == 1.0  # P = R = 1


# --- LE ----------------------------------------------------------------------------------------------


def test_location_error_is_bbox_centre_distance_over_fixed_normalizer():
    pred = box((270, 480), rows=(10, 10), cols=(20, 20))
    gt = box((270, 480), rows=(40, 40), cols=(60, 60))
    # distance sqrt(30² + 40²) = 50, normalized by sqrt(480² + 480²) even though the mask is 480x270
    assert location_error(pred, gt) == pytest.approx(50 / NORMALIZER)


def test_bbox_center_is_not_the_centre_of_mass():
    # An L: rows 100-108 of col 200, plus row 108 of cols 200-208. Its bbox centre is (104, 204); its
    # centroid is (100 + 100/17, 200 + 36/17) = (105.9, 202.1).
    mask = box((270, 480), rows=(100, 108), cols=(200, 200)) | box((270, 480), (108, 108), (200, 208))
    assert bbox_center(mask) == (104, 204)
    assert location_error(mask, box((270, 480), rows=(104, 104), cols=(204, 204))) == 0.0
    # (min + max) // 2 floors: cols 0..9 -> 4
    assert bbox_center(box((270, 480), rows=(0, 0), cols=(0, 9))) == (0, 4)


def test_location_error_of_an_empty_prediction_uses_the_official_transposed_centre():
    # The official crop_mask pads a 270x480 mask by 270 on every side (810 x 1020) and takes an empty mask's
    # centre as (H//2, W//2) = (405, 510) of the padded array, read as (x, y). A GT point at row 210, col 175
    # is (x, y) = (175 + 270, 210 + 270) = (445, 480) padded: distance sqrt(40² + 30²) = 50. Unpadded the
    # empty centre is x = 135, y = 240, i.e. row 240, col 135; the untransposed (row 135, col 240) would
    # give sqrt(75² + 65²) = 99.2.
    empty = np.zeros((270, 480), dtype=bool)
    gt = box((270, 480), rows=(210, 210), cols=(175, 175))
    assert bbox_center(empty) == (240, 135)
    assert location_error(empty, gt) == pytest.approx(50 / NORMALIZER)
    assert location_error(gt, empty) == pytest.approx(50 / NORMALIZER)
    # On a square (ego) target the transposition changes nothing: 480x480 -> (240, 240)
    assert bbox_center(np.zeros((480, 480), dtype=bool)) == (240, 240)
    # An odd height: 5x8 padded 15x18 -> (7, 9) -> x = 7 - 5 = 2, y = 9 - 5 = 4 -> (row 4, col 2)
    assert bbox_center(np.zeros((5, 8), dtype=bool)) == (4, 2)


# --- VA ----------------------------------------------------------------------------------------------


def test_balanced_accuracy_averages_tpr_and_tnr():
    gt = [True, True, True, False, False]  # 3 visible, 2 invisible
    pred = [True, True, False, True, False]  # 2 of 3 visible predicted, 1 of 2 invisible predicted
    assert balanced_accuracy(gt, pred) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_balanced_accuracy_with_one_gt_class_is_that_class_recall():
    assert balanced_accuracy([True] * 4, [True, False, True, True]) == pytest.approx(3 / 4)


# --- resize ------------------------------------------------------------------------------------------


def test_resize_longest_gives_the_evaluation_shapes():
    exo = np.zeros((2160, 3840), dtype=bool)
    exo[::8, ::8] = True  # scale 8: source index = 8 · destination index
    resized = resize_longest(exo)
    assert resized.shape == (270, 480)
    assert resized.all()
    assert resize_longest(np.zeros((1408, 1408), dtype=bool)).shape == (480, 480)


def test_resize_longest_takes_floor_of_scaled_index():
    # 5 -> 3: source index floor(x · 5/3) = 0, 1, 3 (the pixel-centre rule would give 0, 2, 4)
    grid = np.arange(25).reshape(5, 5)
    expected = np.array([[0, 1, 3], [5, 6, 8], [15, 16, 18]])
    np.testing.assert_array_equal(resize_longest(grid, longest=3), expected)


# --- CorrespondenceMetrics ---------------------------------------------------------------------------


def test_correspondence_metrics_micro_average_visible_and_count_invisible_only_for_va():
    shape = (20, 20)
    gt_a = box(shape, rows=(2, 4), cols=(2, 4))  # bbox centre (3, 3)
    far = box(shape, rows=(2, 4), cols=(12, 14))  # bbox centre (3, 13); rings 7+ columns apart
    empty = np.zeros(shape, dtype=bool)
    t = torch.from_numpy
    metric = CorrespondenceMetrics()
    # A: exact (IoU 1, CA 1, LE 0, conf .9 -> TP). A2: disjoint far box (IoU 0, CA 0, LE 10/678.8,
    # conf .7 -> TP). B: invisible, conf .1 -> TN.
    metric.update(
        [t(gt_a), t(far), t(empty)],
        [t(gt_a), t(gt_a), t(empty)],
        confidence=torch.tensor([0.9, 0.7, 0.1]),
        gt_visible=torch.tensor([True, True, False]),
    )
    # C: empty prediction (IoU 0, CA 0, LE |(3, 3) - (10, 10)| = 7·sqrt(2), conf .2 -> FN).
    # D: invisible with a non-empty prediction, conf .8 -> FP; were it scored, IoU would change.
    metric.update(
        [t(empty), t(far)],
        [t(gt_a), t(empty)],
        confidence=torch.tensor([0.2, 0.8]),
        gt_visible=torch.tensor([True, False]),
    )
    result = metric.compute()
    assert result["iou"].item() == pytest.approx(1 / 3, abs=1e-6)  # mean over the 3 visible, not per call
    assert result["ca"].item() == pytest.approx(1 / 3)
    assert result["le"].item() == pytest.approx((0 + 10 + 7 * math.sqrt(2)) / NORMALIZER / 3)
    assert result["va"].item() == pytest.approx((2 / 3 + 1 / 2) / 2)  # TP 2, FN 1; TN 1, FP 1
    assert result["existence_acc"].item() == pytest.approx(2 / 3)
    assert all(value.dtype == torch.float64 for value in result.values())


def test_existence_accuracy_is_both_empty_or_both_not_over_visible_instances():
    # The official utils.existence_accuracy: (gt all zero) == (pred all zero), for every visible instance,
    # whose annotated GT mask may be empty. E1: empty GT, empty pred -> 1; E2: empty GT, a pred -> 0;
    # E3: GT and pred non-empty (disjoint) -> 1; E4: GT, empty pred -> 0. Mean 2/4. (The share of
    # non-empty predictions would be 2/4 too, but with E1 and E2 swapped: so test them one by one.)
    shape = (8, 8)
    empty, a, b = np.zeros(shape, bool), box(shape, (0, 1), (0, 1)), box(shape, (5, 6), (5, 6))
    for pred, gt, want in [(empty, empty, 1.0), (a, empty, 0.0), (b, a, 1.0), (empty, a, 0.0)]:
        metric = CorrespondenceMetrics()
        metric.update(
            [torch.from_numpy(pred)], [torch.from_numpy(gt)], torch.tensor([0.9]), torch.tensor([True])
        )
        assert metric.compute()["existence_acc"].item() == want
        assert existence_accuracy(pred, gt) == bool(want)


def test_metrics_are_computed_in_float64_as_the_official_numpy_code():
    # IoUs 16 / (16 + 1e-7) and 1 / (10000 + 1e-7), averaged in float64 (numpy's np.mean of Python
    # floats); a float32 result differs from it in the 8th digit.
    metric = CorrespondenceMetrics()
    full = torch.from_numpy(box((4, 4), (0, 3), (0, 3)))
    one_pixel, column = box((10000, 1), (0, 0), (0, 0)), box((10000, 1), (0, 9999), (0, 0))
    metric.update([full], [full], torch.tensor([0.9]), torch.tensor([True]))
    metric.update(
        [torch.from_numpy(one_pixel)], [torch.from_numpy(column)], torch.tensor([0.9]), torch.tensor([True])
    )
    expected = (16 / (16 + 1e-7) + 1 / (10000 + 1e-7)) / 2
    assert float(np.float32(expected)) != expected
    assert metric.compute()["iou"].item() == expected


def test_correspondence_metrics_confidence_of_exactly_half_predicts_absent():
    metric = CorrespondenceMetrics()
    mask = torch.zeros(4, 4, dtype=torch.bool)
    metric.update([mask, mask], [mask, mask], torch.tensor([0.5, 0.5]), torch.tensor([True, False]))
    assert metric.compute()["va"].item() == pytest.approx(0.5)  # TPR 0, TNR 1


def test_correspondence_metrics_rejects_a_prediction_of_another_shape():
    metric = CorrespondenceMetrics()
    with pytest.raises(ValueError, match=r"\(480, 480\).*\(270, 480\)"):
        metric.update(
            [torch.zeros(480, 480, dtype=torch.bool)],
            [torch.ones(270, 480, dtype=torch.bool)],
            torch.tensor([0.9]),
            torch.tensor([True]),
        )


# --- HANDAL-X ----------------------------------------------------------------------------------------


def test_handal_iou_averages_per_instance_then_over_instances():
    half_pred, half_gt = box((4, 4), (0, 1), (0, 2)), box((4, 4), (0, 2), (1, 2))  # IoU 4/8
    full = box((4, 4), (0, 3), (0, 3))
    corner, other = box((4, 4), (0, 0), (0, 0)), box((4, 4), (3, 3), (3, 3))  # IoU 0
    t = torch.from_numpy
    metric = HandalInstanceIoU()
    metric.update([t(full), t(half_pred)], [t(full), t(half_gt)], ["drill_0", "drill_0"])
    metric.update([t(corner), t(full)], [t(other), t(full)], ["drill_0", "mug_3"])
    # drill_0: (1 + 0.5 + 0) / 3 = 0.5; mug_3: 1 -> 0.75 (the per-frame mean would be 2.5 / 4 = 0.625)
    assert metric.compute().item() == pytest.approx(0.75, abs=1e-6)


# --- submission --------------------------------------------------------------------------------------


def test_rle_is_column_major_and_round_trips():
    # column-major [[0, 1], [0, 1]] reads 0, 0, 1, 1 -> counts [2, 2] -> "22" (row-major would be "1111")
    rle = encode_rle(np.array([[0, 1], [0, 1]], dtype=bool))
    assert rle == {"size": [2, 2], "counts": "22"}
    mask = np.random.default_rng(0).random((7, 5)) > 0.5
    decoded = decode_rle(json.loads(json.dumps(encode_rle(mask))))
    assert decoded.dtype == bool
    np.testing.assert_array_equal(decoded, mask)


def test_submission_json_layout(tmp_path):
    mask = box((270, 480), rows=(10, 20), cols=(30, 40))
    writer = SubmissionWriter()
    writer.add("ego-exo", "take1", "knife_0", "aria01", "cam01", 30, mask, 0.75)
    writer.add("ego-exo", "take1", "knife_0", "aria01", "cam01", "0", mask, 1)
    path = tmp_path / "out" / "pred.json"
    writer.write(path)
    submission = json.loads(path.read_text())

    assert set(submission) == {"ego-exo", "exo-ego"}
    assert submission["exo-ego"]["results"] == {}
    take = submission["ego-exo"]["results"]["take1"]
    assert take["subsample_idx"] == [0, 30]
    frames = take["masks"]["knife_0"]["aria01_cam01"]
    assert set(frames) == {"0", "30"}
    assert frames["0"]["confidence"] == 1.0 and isinstance(frames["0"]["confidence"], float)
    assert frames["30"]["confidence"] == 0.75
    assert frames["30"]["pred_mask"]["size"] == [270, 480]
    np.testing.assert_array_equal(decode_rle(frames["30"]["pred_mask"]), mask)

    writer.add("exo-ego", "take1", "knife_0", "cam01", "aria01", 60, np.zeros((480, 480), bool), 0.1)
    exo_ego = writer.to_dict()["exo-ego"]["results"]["take1"]
    assert list(exo_ego["masks"]["knife_0"]) == ["cam01_aria01"]
    assert exo_ego["subsample_idx"] == [60]


def test_a_plan_shapes_the_submission_fills_gaps_and_leaves_out_unplanned_pairs():
    plan = {
        "split": "val",
        "takes": {
            "take1": {
                "take_name": "t",
                "subsample_idx": [0, 30],
                "objects": {
                    "knife_0": {"ego-exo": {"aria01_cam01": {"frames": [0, 30], "shape": [270, 480]}}},
                    "spatula_0": {},  # no ego camera: no pairs, but the official check counts the object
                },
            },
            "take2": {"take_name": "u", "subsample_idx": [], "objects": {"lid_0": {}}},
        },
    }
    mask = box((270, 480), rows=(10, 20), cols=(30, 40))
    writer = SubmissionWriter(plan)
    writer.add("ego-exo", "take1", "knife_0", "aria01", "cam01", 30, mask, 0.75)
    writer.add("ego-exo", "take1", "knife_0", "aria01", "cam02", 30, mask, 0.75)  # not in the plan
    submission = writer.to_dict()
    results = submission["ego-exo"]["results"]
    assert set(results) == {"take1", "take2"} and results["take2"] == {
        "masks": {"lid_0": {}},
        "subsample_idx": [],
    }
    assert set(results["take1"]["masks"]) == {"knife_0", "spatula_0"}
    frames = results["take1"]["masks"]["knife_0"]["aria01_cam01"]
    np.testing.assert_array_equal(decode_rle(frames["30"]["pred_mask"]), mask)
    assert frames["0"]["confidence"] == 0.0 and frames["0"]["pred_mask"]["size"] == [270, 480]
    assert not decode_rle(frames["0"]["pred_mask"]).any()
    assert writer.filled == 1 and writer.unplanned == 1
    assert submission["exo-ego"]["results"]["take1"]["masks"] == {"knife_0": {}, "spatula_0": {}}
