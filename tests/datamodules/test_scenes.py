"""Generated scenes: exact depth and segmentation, exact answers, UniMRG's target encoding, counted skips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.scenes import SceneTransform, depth_target, image_tensor
from datamodules.synth import scenes
from datamodules.webdataset import BadSample
from omnilab.seeding import numpy_rng


def test_floor_disparity_runs_from_the_wall_at_the_horizon_to_the_near_row():
    size = 64
    y_h = scenes.horizon_row(size)  # round(0.35 * 64) = 22
    assert y_h == 22
    assert scenes.floor_disparity(22, size) == pytest.approx(1.0)
    assert scenes.floor_disparity(63, size) == pytest.approx(2.5)
    # halfway down the floor: 1 + 1.5 * (42.5 - 22) / 41 = 1.75
    assert scenes.floor_disparity(42.5, size) == pytest.approx(1.75)


def test_render_gives_each_object_its_own_disparity_and_id_and_the_nearer_one_occludes():
    size = 64
    bg = np.full((size, size, 3), 100, np.uint8)
    far = {
        "shape": "square",
        "colour": "red",
        "cx": 30.0,
        "base": 40.0,
        "half": 6.0,
        "disparity": 1.6,
        "id": 1,
    }
    near = {
        "shape": "square",
        "colour": "blue",
        "cx": 34.0,
        "base": 44.0,
        "half": 6.0,
        "disparity": 2.0,
        "id": 2,
    }
    image, disparity, seg = scenes.render(bg, [near, far], size)  # given near first: drawing is far to near
    # (38, 34) lies in both squares: the near one wins
    assert seg[38, 34] == 2 and disparity[38, 34] == pytest.approx(2.0)
    assert tuple(image[38, 34]) == scenes.COLOURS["blue"]
    # (30, 25) only in the far square (x 24..36, y 28..40); the near one spans x 28..40, y 32..44
    assert seg[30, 25] == 1 and disparity[30, 25] == pytest.approx(1.6)
    # the wall above the horizon is at disparity 1, the background has id 0
    assert disparity[5, 5] == pytest.approx(1.0) and seg[5, 5] == 0


def test_questions_have_the_answers_the_geometry_gives():
    a = {"shape": "circle", "colour": "red", "cx": 10.0, "disparity": 2.0}
    b = {"shape": "square", "colour": "blue", "cx": 50.0, "disparity": 1.2}
    for seed in range(6):
        qa = {q["type"]: q for q in scenes.questions([a, b], numpy_rng(seed))}
        assert qa["count"]["answer"] == "2"
        lr, nf = qa["left_right"], qa["near_far"]
        first_red = lr["question"].startswith("Is the red circle")
        assert lr["answer"] == ("left" if first_red else "right")
        assert nf["answer"] == ("nearer" if nf["question"].startswith("Is the red circle") else "farther")
        colour = qa["colour"]
        assert colour["answer"] == ("red" if "circle" in colour["question"] else "blue")


def test_generated_scene_members_agree_with_its_objects():
    sample = next(scenes.samples("train", 1, seed=3))
    objects, seg, disp = sample["json"]["objects"], sample["seg.png"], sample["depth.npy"]
    for obj in objects:
        ids = np.flatnonzero((seg == scenes.PALETTE[obj["id"]]).all(-1))
        if ids.size:  # visible pixels carry the object's disparity exactly
            assert np.allclose(disp.reshape(-1)[ids], obj["disparity"])
    assert sample["json"]["edit"].startswith("remove the ")
    assert not np.array_equal(sample["image.png"], sample["edit.png"])


def test_depth_target_is_min_max_to_minus_one_one_in_three_channels():
    t = depth_target(np.array([[1.0, 2.0], [3.0, 5.0]], np.float32), 2)
    # (d - 1) / 4 * 2 - 1
    expected = torch.tensor([[-1.0, -0.5], [0.0, 1.0]])
    assert t.shape == (3, 2, 2) and torch.allclose(t, expected.expand(3, 2, 2))
    assert torch.equal(depth_target(np.full((4, 4), 7.0, np.float32), 2), torch.zeros(3, 2, 2))


def test_segmentation_resize_is_nearest_so_colours_stay_exact():
    seg = np.zeros((4, 4, 3), np.uint8)
    seg[:2, :2] = (255, 0, 0)
    t = image_tensor(seg, 2, nearest=True)
    assert set(t.unique().tolist()) <= {-1.0, 1.0}
    assert t[:, 0, 0].tolist() == [1.0, -1.0, -1.0] and t[:, 1, 1].tolist() == [-1.0, -1.0, -1.0]


def test_a_sample_without_a_needed_depth_target_is_a_bad_sample_naming_it():
    sample = next(scenes.samples("val", 1, seed=0))
    decoded = {
        "__key__": "k",
        "json": sample["json"],
        "image.png": sample["image.png"],
        "seg.png": sample["seg.png"],
    }
    transform = SceneTransform(32, ("depth", "seg", "qa"), train=False, seed=0)
    with pytest.raises(BadSample, match=r"no \.depth member"):
        transform(decoded, numpy_rng(0))
    # without `need: depth` the same sample is fine (no depth key in the example)
    example = SceneTransform(32, ("seg",), train=False, seed=0)(decoded, numpy_rng(0))
    assert "depth" not in example and example["seg"].shape == (3, 32, 32) and example["options"]
