"""Layout evaluation: GenEval's position and counting rules, Hungarian layout fidelity, the detectors."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.multiref import image_tensor
from datamodules.synth.layout import make_sample
from metrics.layout import (
    ColourDetector,
    Detection,
    OpenVocabDetector,
    box_iou,
    geneval_correct,
    layout_scores,
    match_boxes,
    relative_position,
)


@pytest.mark.parametrize(
    "a, b, expected",
    [
        # offset (-20, 0), shrink 0.1·20 = 2 -> (-18, 0) / 20 = (-0.9, 0)
        ((0, 0, 10, 10), (20, 0, 30, 10), {"left of"}),
        # offset (-8, 0) -> (-6, 0) / 8 = -0.75
        ((0, 0, 10, 10), (8, 0, 18, 10), {"left of"}),
        # offset (-10, -10) -> (-8, -8) / 14.14 = (-0.57, -0.57): both
        ((-5, -5, 5, 5), (5, 5, 15, 15), {"left of", "above"}),
        # offset (-10, -3) -> (-8, -1) / 10.44 = (-0.77, -0.10)
        ((-5, -5, 5, 5), (5, -2, 15, 8), {"left of"}),
        # offset (0, 1.5): both components shrink to 0 -> no relation
        ((0, 0, 10, 10), (0, -1.5, 10, 8.5), set()),
        ((0, 20, 10, 30), (0, 0, 10, 10), {"below"}),
    ],
)
def test_relative_position_follows_geneval_worked_by_hand(a, b, expected):
    assert relative_position(a, b) == expected


def det(phrase: str, box: tuple[float, ...], score: float = 1.0) -> Detection:
    return Detection(phrase, score, box)


def test_counting_needs_exactly_the_count_through_the_exclude():
    meta = {
        "include": [{"class": "red circle", "count": 3}],
        "exclude": [{"class": "red circle", "count": 4}],
    }
    for n, ok in ((2, False), (3, True), (4, False)):
        found = {"red circle": [det("red circle", (i * 10, 0, i * 10 + 5, 5)) for i in range(n)]}
        assert geneval_correct(found, meta) is ok


def test_position_requirement_reads_geneval_metadata():
    meta = {"include": [{"class": "blue star", "count": 1}, {"class": "red circle", "count": 1, "position": ["left of", 0]}]}  # fmt: skip
    left = {
        "red circle": [det("red circle", (0, 0, 10, 10))],
        "blue star": [det("blue star", (20, 0, 30, 10))],
    }
    right = {
        "red circle": [det("red circle", (20, 0, 30, 10))],
        "blue star": [det("blue star", (0, 0, 10, 10))],
    }
    assert geneval_correct(left, meta) and not geneval_correct(right, meta)
    assert not geneval_correct({"red circle": left["red circle"]}, meta)  # the anchor is missing


def test_match_boxes_is_hungarian_not_greedy():
    # IoU: P0-D0 80/120, P0-D1 0, P1-D0 80/120, P1-D1 20/180; the best total pairs P0-D0, P1-D1
    ious = match_boxes([(0, 0, 10, 10), (4, 0, 14, 10)], [(2, 0, 12, 10), (12, 0, 22, 10)])
    assert ious == pytest.approx([80 / 120, 20 / 180])
    assert match_boxes([(0, 0, 1, 1)], []) == [0.0]
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 5)) == pytest.approx(0.5)


def scene(split: str, index: int) -> tuple[torch.Tensor, dict]:
    sample = make_sample(split, index, 0)
    image = np.asarray(Image.open(io.BytesIO(sample["target.png"])).convert("RGB"))
    return image_tensor(image.copy(), "target"), sample["json"]


def test_colour_detector_finds_the_rendered_boxes_of_generated_scenes_exactly():
    detector, checked = ColourDetector(), 0
    for index in range(12):
        image, meta = scene("test", index)
        if meta["task"] != "t2i":
            continue
        scores = layout_scores(
            image, [(r["phrase"], r["box"]) for r in meta["layout"]], detector, meta["geneval"]
        )
        assert scores["correct"] == 1.0
        assert scores["miou"] > 0.98 and scores["hit"] == 1.0
        checked += 1
    assert checked >= 6


def test_layout_scores_fail_a_swapped_scene_and_leave_undetectable_phrases_out():
    image, meta = scene("test", 0)
    flipped = image.flip(-1)  # mirror: left/right relations and boxes move
    scores = layout_scores(
        flipped, [(r["phrase"], r["box"]) for r in meta["layout"]], ColourDetector(), meta["geneval"]
    )
    assert scores["miou"] < 0.9
    nothing = layout_scores(image, [("an astronaut", (0, 0, 500, 500))], ColourDetector(), None)
    assert math.isnan(nothing["miou"]) and math.isnan(nothing["correct"])


TINY_OWL = {
    "model_type": "owlv2",
    "text_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                    "max_position_embeddings": 16},
    "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "image_size": 32, "patch_size": 16},
    "projection_dim": 16,
    "tokenizer": {"model_max_length": 16},
}  # fmt: skip


TINY_DINO = {
    "model_type": "grounding-dino",
    "backbone_config": {"image_size": 32, "patch_size": 4, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 1],
                        "window_size": 4, "out_indices": [1, 2]},
    "text_config": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                    "max_position_embeddings": 64},
    "d_model": 32, "encoder_layers": 1, "decoder_layers": 2, "encoder_attention_heads": 2,
    "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "num_queries": 10,
    "num_feature_levels": 2, "encoder_n_points": 2, "decoder_n_points": 2, "max_text_len": 32,
}  # fmt: skip


@pytest.mark.parametrize("config", [TINY_OWL, TINY_DINO], ids=["owlv2", "grounding-dino"])
def test_open_vocab_detector_runs_from_config_and_from_pretrained(tmp_path, config):
    torch.manual_seed(0)  # a random-init detector: its boxes depend on the init (some inits give none valid)
    image = torch.zeros(3, 48, 64)
    tiny = OpenVocabDetector(config=config, threshold=0.0, max_per_phrase=3)
    found = tiny.detect(image, ["a red circle", "a blue star"])
    assert set(found) <= {"a red circle", "a blue star"} and found
    for phrase, boxes in found.items():
        assert 1 <= len(boxes) <= 3 and all(d.phrase == phrase for d in boxes)
        assert all(0 <= d.box[0] < d.box[2] <= 64 and 0 <= d.box[1] < d.box[3] <= 48 for d in boxes)
    tiny.model.save_pretrained(tmp_path)
    tiny.processor.save_pretrained(tmp_path)
    loaded = OpenVocabDetector(pretrained=str(tmp_path), threshold=0.0, max_per_phrase=3)
    again = loaded.detect(image, ["a red circle", "a blue star"])
    assert {k: [d.box for d in v] for k, v in again.items()} == {
        k: [d.box for d in v] for k, v in found.items()
    }
    with pytest.raises(ValueError, match="exactly one"):
        OpenVocabDetector()
