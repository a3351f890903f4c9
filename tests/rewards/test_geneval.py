"""GenEval's position rule and requirement checks on hand-worked detections; the reward on tiny stand-in weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rewards.base import RewardError
from rewards.geneval import Detection, GenEvalReward, evaluate, relative_position


def test_relative_position_shrinks_the_offset_by_a_tenth_of_the_sizes():
    # centres (5, 5) and (35, 5): offset (-30, 0); shrink 0.1 (10 + 10) = 2 -> (-28, 0) / 30 = -0.93: left of
    assert relative_position((0, 0, 10, 10), (30, 0, 40, 10)) == {"left of"}
    assert relative_position((30, 0, 40, 10), (0, 0, 10, 10)) == {"right of"}
    # diagonal: offset (20, 20), shrink 2 each -> (18, 18) / 28.28 = 0.64 each: right of and below
    assert relative_position((20, 20, 30, 30), (0, 0, 10, 10)) == {"right of", "below"}
    # offset (0, 3) between 20-px boxes: shrink 4 > 3 -> no relation at all
    assert relative_position((0, 3, 20, 23), (0, 0, 20, 20)) == set()


def det(label: str, x: float) -> Detection:
    return Detection(label, 0.9, (x, 0.0, x + 10.0, 10.0))


def test_requirements_count_colour_position_and_exclusion():
    dogs, cats = [det("dog", 0), det("dog", 50)], [det("cat", 100)]
    found = {"dog": dogs, "cat": cats}
    colours = {id(dogs[0]): "red", id(dogs[1]): "blue", id(cats[0]): "red"}
    counting = {
        "tag": "counting",
        "include": [{"class": "dog", "count": 2}],
        "exclude": [{"class": "dog", "count": 3}],
    }
    assert evaluate(found, colours, counting) == (2, 2)
    three = {"include": [{"class": "dog", "count": 3}], "exclude": [{"class": "dog", "count": 4}]}
    assert evaluate(found, colours, three) == (1, 2)  # too few dogs; the exclusion holds
    colour = {
        "include": [
            {"class": "dog", "count": 1, "color": "red"},
            {"class": "cat", "count": 1, "color": "blue"},
        ]
    }
    assert evaluate(found, colours, colour) == (1, 2)  # the first dog is red, the cat is not blue
    position = {
        "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}]
    }
    assert evaluate(found, colours, position) == (2, 2)  # the first dog is left of the cat
    wrong = {
        "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}]
    }
    assert evaluate(found, colours, wrong) == (1, 2)


TINY_DETECTOR = {
    "backbone_config": {"model_type": "swin", "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2],
                        "window_size": 4, "image_size": 64, "out_features": ["stage1", "stage2", "stage3", "stage4"]},
    "hidden_dim": 32, "mask_feature_size": 32, "feature_size": 32, "encoder_feedforward_dim": 64, "dim_feedforward": 64,
    "encoder_layers": 1, "decoder_layers": 2, "num_queries": 8, "num_attention_heads": 2, "common_stride": 4,
    "id2label": {0: "dog", 1: "cat"}, "label2id": {"dog": 0, "cat": 1}, "use_pretrained_backbone": False,
    "image_processor": {"size": {"shortest_edge": 64, "longest_edge": 64}, "size_divisor": 32},
}  # fmt: skip
TINY_CLIP = {
    "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 512, "max_position_embeddings": 77},
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    "projection_dim": 16, "tokenizer": {"vocab_size": 512},
}  # fmt: skip


def tiny_geneval(**kw) -> GenEvalReward:
    torch.manual_seed(0)
    return GenEvalReward(detector_config=TINY_DETECTOR, colour_config=TINY_CLIP, device="cpu", **kw)


@pytest.mark.slow
def test_the_reward_runs_end_to_end_and_is_nan_without_geneval_metadata():
    reward = tiny_geneval(threshold=0.0)
    images = [torch.rand(3, 48, 64) * 2 - 1 for _ in range(3)]
    meta = [
        {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}]},
        {
            "tag": "two_object",
            "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}],
            "exclude": [],
        },
        {},
    ]
    out = reward(images, ["a red dog", "a dog and a cat", "x"], [[], [], []], meta)["score"]
    assert out.shape == (3,) and math.isnan(out[2]) and bool(((out[:2] >= 0) & (out[:2] <= 1)).all())
    assert np.isfinite(out[:2].numpy()).all()


@pytest.mark.slow
def test_malformed_geneval_metadata_fails_the_batch_naming_it():
    with pytest.raises(RewardError, match="malformed"):
        tiny_geneval()([torch.zeros(3, 32, 32)], ["x"], [[]], [{"include": [{"count": 1}]}])
