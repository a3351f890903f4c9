"""Scene rewards on hand-made images whose right answer is obvious, and CombinedReward's checks and rules."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_modules.components.grpo import aggregate_rewards
from rewards.base import CombinedReward, Reward, RewardError, per_reference, to_uint8
from rewards.scene import (
    ColourCheck,
    CountCheck,
    JpegCompressibility,
    PositionCheck,
    ReferenceConsistency,
    colour_score,
    count_score,
    position_score,
    reference_consistency,
)

RED, BLUE, WHITE = (215, 40, 40), (40, 70, 220), (245, 245, 245)
EPS = 1e-4


def canvas(h, w, rgb=WHITE):
    return np.broadcast_to(np.array(rgb, np.uint8), (h, w, 3)).copy()


def tensor(img):
    """H x W x 3 uint8 -> [3, H, W] in [-1, 1] (as the data kind decodes)."""
    return torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1


def obj(rgb, box, ident=0, fill="flat", pixels=None):
    """A json object record; box = (x, y, w, h) placement, its tight bbox the same box."""
    x, y, w, h = box
    return {
        "id": ident,
        "kind": "shape",
        "rgb": list(rgb),
        "fill": fill,
        "box": list(box),
        "bbox": [x, y, x + w, y + h],
        "pixels": w * h if pixels is None else pixels,
    }


def meta(*objects, size=24, background=WHITE, **extra):
    return {
        "objects": list(objects),
        "target_size": [size, size],
        "background": {"kind": "flat", "rgb": list(background)},
        **extra,
    }


def red_top_left(size=24):
    img = canvas(size, size)
    img[: size // 3, : size // 3] = RED
    return tensor(img)


RED_TL = obj(RED, (0, 0, 8, 8))
BLUE_BR = obj(BLUE, (16, 16, 8, 8))


# --------------------------------------------------------------------------- colour


def test_colour_red_top_left_scores_one_and_blue_bottom_right_zero():
    assert colour_score(red_top_left(), meta(RED_TL)) == 1.0  # d = 0 in the whole box, coverage 1
    # the box at the bottom right is white: d² = 205² + 175² + 25² = 73275 -> exp(-73275 / 3200) ~ 1e-10
    assert colour_score(red_top_left(), meta(BLUE_BR)) == pytest.approx(math.exp(-73275 / 3200), abs=1e-9)


def test_colour_score_by_hand_at_distance_tau():
    img = canvas(24, 24)
    img[:8, :8] = (215, 40, 80)  # 40 from red: exp(-40² / (2 · 40²)) = exp(-1/2)
    assert colour_score(tensor(img), meta(RED_TL)) == pytest.approx(math.exp(-0.5), rel=1e-4)


def test_colour_score_divides_by_the_coverage_and_scales_boxes():
    img = canvas(24, 24)
    img[:8, :4] = RED  # half the box red: match .5 / coverage (32 of 64 pixels) .5 = 1
    assert colour_score(tensor(img), meta(obj(RED, (0, 0, 8, 8), pixels=32))) == pytest.approx(1.0, abs=1e-6)
    # a 48 x 48 output of a 24 x 24 target: the box [0, 8) becomes [0, 16)
    assert colour_score(red_top_left(48), meta(RED_TL)) == 1.0


def test_checks_do_not_apply_without_objects():
    for check in (colour_score, position_score, count_score):
        assert math.isnan(check(red_top_left(), {"instruction": "make it nicer"}))


# --------------------------------------------------------------------------- position


def test_position_red_top_left_by_hand():
    assert position_score(red_top_left(), meta(RED_TL)) == pytest.approx(1.0)
    # red expected at the bottom right: centroid (1/6, 1/6) vs (5/6, 5/6): exp(-(8/9) / (2/36)) = exp(-16)
    red_br = obj(RED, (16, 16, 8, 8))
    assert position_score(red_top_left(), meta(red_br)) == pytest.approx(math.exp(-16), rel=1e-3)
    assert position_score(red_top_left(), meta(BLUE_BR)) == 0.0  # no blue pixel at all


def test_position_one_cell_off_by_hand():
    img = canvas(24, 24)
    img[:8, 8:16] = (
        RED  # top centre; asked for top left: one cell (1/3) off -> exp(-(1/9) / (2/36)) = exp(-2)
    )
    assert position_score(tensor(img), meta(RED_TL)) == pytest.approx(math.exp(-2), rel=1e-4)


def test_position_two_objects_of_one_colour_each_find_their_own():
    img = canvas(24, 24)
    img[:8, :8] = RED
    img[16:, 16:] = RED
    assert position_score(tensor(img), meta(RED_TL, obj(RED, (16, 16, 8, 8), ident=1))) == pytest.approx(1.0)


def test_position_excludes_pixels_that_look_like_the_known_background():
    # on a red background (as the json says) no pixel can count as the red object: it is all background
    img = canvas(24, 24, RED)
    assert position_score(tensor(img), meta(RED_TL, background=RED)) == 0.0
    assert position_score(tensor(img), meta(RED_TL)) == pytest.approx(math.exp(-2 * (1 / 3) ** 2 / (2 / 36)))


# --------------------------------------------------------------------------- count


def test_count_by_hand():
    two = meta(RED_TL, obj(RED, (16, 16, 8, 8), ident=1))
    img = canvas(24, 24)
    img[:8, :8] = RED
    assert count_score(tensor(img), two) == 0.5  # 1 blob, 2 expected: 1 / (1 + 1)
    img[16:, 16:] = RED
    img[12, 12] = RED  # a one-pixel speck is below min_fraction x 64 pixels: not an object
    assert count_score(tensor(img), two) == 1.0
    img[16:, :8] = RED
    assert count_score(tensor(img), two) == 0.5  # 3 blobs


def test_count_a_striped_object_is_one_blob():
    img = canvas(24, 24)
    img[:8, :8] = RED
    img[:8:2, :8] = np.rint(np.array(RED) * 0.6)  # dark stripes: SHADE x red
    assert count_score(tensor(img), meta(obj(RED, (0, 0, 8, 8), fill="stripes"))) == 1.0


# --------------------------------------------------------------------------- JPEG


def test_jpeg_compressibility_is_minus_bytes_per_pixel():
    rng = np.random.default_rng(0)
    flat, noisy = canvas(32, 32), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    scores = JpegCompressibility()([tensor(flat), tensor(noisy)], ["", ""], [[], []], [{}, {}])["score"]
    for img, score in zip((flat, noisy), scores.tolist()):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
        assert score == pytest.approx(-len(buf.getvalue()) / (32 * 32))
    assert scores[0] > scores[1]


def test_to_uint8_maps_minus_one_and_one_to_0_and_255():
    assert to_uint8(torch.tensor([[[-1.0, 1.0]]]).expand(3, 1, 2)).tolist() == [[[0, 0, 0], [255, 255, 255]]]


# --------------------------------------------------------------------------- consistency with references


def object_ref(rgb=RED):
    img = canvas(16, 16)
    img[4:12, 4:12] = rgb
    return tensor(img)


def placed(colour=None, rgb=RED):
    return meta(
        obj(rgb, (0, 0, 8, 8)),
        ref_roles=["object"],
        program=[
            {
                "op": "place",
                "ref": 1,
                "object": 0,
                "colour": colour,
                "box": [0, 0, 8, 8],
                "bbox": [0, 0, 8, 8],
            }
        ],
    )


def test_object_reference_kept_lost_and_by_hand():
    ref = object_ref()
    assert reference_consistency([red_top_left()], [[ref]], [placed()]).item() == pytest.approx(1.0)
    img = canvas(24, 24)
    img[:8, :8] = BLUE  # ||red - blue||² = 175² + 30² + 180² = 63925
    got = reference_consistency([tensor(img)], [[ref]], [placed()]).item()
    assert got == pytest.approx(math.exp(-63925 / 3200), abs=1e-8)
    img[:8, :8] = (215, 40, 80)  # 40 away: exp(-1/2)
    assert reference_consistency([tensor(img)], [[ref]], [placed()]).item() == pytest.approx(
        math.exp(-0.5), rel=1e-4
    )


def test_recoloured_object_must_change_colour_and_keep_shape():
    ref, asked = object_ref(RED), placed(colour="blue", rgb=BLUE)
    img = canvas(24, 24)
    img[:8, :8] = BLUE
    assert reference_consistency([tensor(img)], [[ref]], [asked]).item() == pytest.approx(1.0)
    assert reference_consistency([red_top_left()], [[ref]], [asked]).item() == 0.0  # kept red: IoU 0


def test_scene_reference_by_hand():
    scene = canvas(24, 24, (100, 100, 100))
    m = meta(ref_roles=["scene"], program=[{"op": "remove", "object": 0, "box_before": [16, 16, 8, 8]}])
    out = scene.copy()
    out[16:, 16:] = RED  # inside the edited box: not compared
    assert reference_consistency([tensor(out)], [[tensor(scene)]], [m]).item() == pytest.approx(1.0)
    out[:16] = 150  # the top 16 rows brightened
    got = reference_consistency([tensor(out)], [[tensor(scene)]], [m]).item()
    # outside the box: 16 x 24 pixels at 150 and 8 x 16 at 100 against a flat 100 (variance 0, covariance 0):
    # SSIM = (2 mu_a mu_b + C1)(0 + C2) / ((mu_a² + mu_b² + C1)(0 + var_b + C2)), the same in every channel
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_b = (384 * 150 + 128 * 100) / 512  # 137.5
    var_b = (384 * (150 - mu_b) ** 2 + 128 * (100 - mu_b) ** 2) / 512  # 468.75
    ssim = (2 * 100 * mu_b + c1) * c2 / ((100**2 + mu_b**2 + c1) * (var_b + c2))
    assert got == pytest.approx(ssim, rel=1e-4)


def test_consistency_is_nan_beyond_a_samples_references():
    two = meta(
        obj(RED, (0, 0, 8, 8)),
        ref_roles=["object", "object"],
        program=[{"op": "place", "ref": 1, "object": 0, "colour": None, "bbox": [0, 0, 8, 8]}],
    )
    scores = ReferenceConsistency()(
        [red_top_left()] * 3,
        ["", "", ""],
        [[object_ref(), object_ref()], [object_ref()], []],
        [two, placed(), {}],
    )
    matrix = per_reference(scores)
    assert matrix.shape == (3, 2)
    assert matrix[0, 0].item() == pytest.approx(1.0) and matrix[1, 0].item() == pytest.approx(1.0)
    assert math.isnan(matrix[0, 1]) and math.isnan(
        matrix[1, 1]
    )  # ref 2 has no place op; sample 1 has one ref
    assert torch.isnan(matrix[2]).all()  # text-to-image: no references


@pytest.mark.parametrize("index", range(8))
def test_exact_generated_targets_score_high(index):
    from datamodules.synth.multiref import make_sample

    sample = make_sample("train", index, 3)
    m = sample["json"]

    def load(data):
        return tensor(np.array(Image.open(io.BytesIO(data)).convert("RGB")))

    target = load(sample["target.png"])
    refs = [load(sample[f"ref{k}.png"]) for k in range(m["n_refs"])]
    for check in (ColourCheck(), PositionCheck(), CountCheck()):
        score = check([target], [m["instruction"]], [refs], [m])["score"].item()
        assert math.isnan(score) or score >= 0.9, (check.name, score, m["instruction"])
    consistency = reference_consistency([target], [refs], [m])[0]
    assert bool((consistency[~torch.isnan(consistency)] >= 0.9).all()), (consistency, m["instruction"])


# --------------------------------------------------------------------------- CombinedReward


class Fixed(Reward):
    """A reward returning fixed scores."""

    def __init__(self, name, nan_ok=False, **scores):
        self.name, self.nan_ok, self.scores = name, nan_ok, {k: torch.tensor(v) for k, v in scores.items()}

    def __call__(self, images, prompts, references, meta):
        return self.scores


def batch(n):
    return [torch.zeros(3, 4, 4)] * n, [""] * n, [[]] * n, [{}] * n


def test_combined_reward_names_the_broken_reward():
    good = Fixed("good", score=[1.0, 2.0])
    cases = {
        "NaN": Fixed("bad", score=[1.0, math.nan]),
        "shape": Fixed("bad", score=[1.0, 2.0, 3.0]),
        "inf": Fixed("bad", nan_ok=True, score=[1.0, math.inf]),
    }
    for message, bad in cases.items():
        combined = CombinedReward({"good": good, "bad": bad}, {"good": 1.0, "bad": 1.0})
        with pytest.raises(RewardError, match=f"'bad'.*{message}"):
            combined(*batch(2))

    def crashes(images, prompts, references, meta):
        raise ZeroDivisionError("boom")

    with pytest.raises(RewardError, match="'crash' failed: ZeroDivisionError: boom"):
        CombinedReward({"crash": crashes}, {"crash": 1.0})(*batch(2))


def test_combined_reward_allows_nan_when_it_means_not_applicable():
    scores = CombinedReward({"c": Fixed("c", nan_ok=True, score=[math.nan, 1.0])}, {"c": 1.0})(*batch(2))
    assert math.isnan(scores["c/score"][0]) and scores["c/score"][1] == 1.0


def test_combined_reward_rules():
    a = Fixed("a", score=[1.0, 0.0, 0.0, 0.0])
    cons = Fixed("consistency", nan_ok=True, ref0=[1.0, 0.0, 1.0, 0.0], ref1=[0.0, 1.0, math.nan, math.nan])
    groups = torch.tensor([0, 0, 1, 1])
    rewards = {"a": a, "consistency": cons, "log": Fixed("log", score=[9.0, 9.0, 9.0, 9.0])}
    plain = CombinedReward(rewards, {"a": 1.0, "consistency": 2.0})
    scores = plain(*batch(4))
    assert set(scores) == {"a/score", "consistency/ref0", "consistency/ref1", "log/score"}
    # per-reference scores are one component, their mean over the sample's refs: [.5, .5, 1, 0]
    assert plain.aggregate(scores, groups).tolist() == pytest.approx([1 + 1, 0 + 1, 0 + 2, 0 + 0])
    gdpo = CombinedReward(rewards, {"a": 1.0, "consistency": 2.0}, "normalize_then_sum")
    expected = aggregate_rewards(
        {"a": scores["a/score"], "c": torch.tensor([0.5, 0.5, 1.0, 0.0])},
        {"a": 1.0, "c": 2.0},
        groups,
        "normalize_then_sum",
    )
    assert torch.allclose(gdpo.aggregate(scores, groups), expected)
    # msgrpo: instruction z(a) = [c, -c, 0, 0] (z-scored once, weight 1); consistency: group 0 mean of
    # [c, -c] and [-c, c] = 0, group 1 [c, -c]: s = [c, -c, c, -c], batch std c
    msgrpo = CombinedReward(rewards, {"a": 1.0, "consistency": 1.0}, "msgrpo")
    c = 0.5 / (0.5 + EPS)
    k = c / (c + EPS)
    assert msgrpo.aggregate(scores, groups).tolist() == pytest.approx([k, -k, k, -k], rel=1e-5)
    # with the instruction weighted 3: s = [3c, -3c, c, -c], std c sqrt(5)
    heavy = CombinedReward(rewards, {"a": 3.0, "consistency": 1.0}, "msgrpo").aggregate(scores, groups)
    std = c * math.sqrt(5)
    assert heavy.tolist() == pytest.approx(
        [3 * c / (std + EPS), -3 * c / (std + EPS), c / (std + EPS), -c / (std + EPS)], rel=1e-5
    )


def test_combined_reward_rejects_bad_config():
    with pytest.raises(ValueError, match="rule"):
        CombinedReward({"a": Fixed("a")}, {"a": 1.0}, rule="best_of_n")
    with pytest.raises(ValueError, match="must name"):
        CombinedReward({"a": Fixed("a")}, {"b": 1.0})
    with pytest.raises(ValueError, match="one prompt"):
        CombinedReward({"a": Fixed("a", score=[1.0])}, {"a": 1.0})([torch.zeros(3, 2, 2)], [], [[]], [{}])
