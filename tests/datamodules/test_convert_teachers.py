"""The teacher-caching step: tiny random-init Depth-Anything-V2 and SAM saved in the hub layout, run once into shards."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.convert import teachers
from datamodules.scenes import SceneDataModule

SAM = dict(
    vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, output_channels=16, image_size=64,
                       patch_size=16, global_attn_indexes=[0], window_size=0, mlp_dim=64, num_pos_feats=8),
    prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4),
    mask_decoder_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32,
                             iou_head_hidden_dim=16),
)  # fmt: skip
DEPTH = dict(
    backbone_config=dict(model_type="dinov2", hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                         intermediate_size=64, image_size=28, patch_size=14, reshape_hidden_states=False,
                         out_features=["stage1", "stage2", "stage3", "stage4"]),
    reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8,
    patch_size=14,
)  # fmt: skip


def write_teachers(root):
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        DPTImageProcessorPil,
        SamConfig,
        SamImageProcessorPil,
        SamModel,
        SamProcessor,
    )

    torch.manual_seed(0)
    DepthAnythingForDepthEstimation(DepthAnythingConfig(**DEPTH)).save_pretrained(root / "depth")
    DPTImageProcessorPil(
        size={"height": 28, "width": 28}, keep_aspect_ratio=True, ensure_multiple_of=14
    ).save_pretrained(root / "depth")
    SamModel(SamConfig(**SAM)).save_pretrained(root / "sam")
    image_processor = SamImageProcessorPil(
        size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}, mask_size={"longest_edge": 16}
    )
    SamProcessor(image_processor).save_pretrained(root / "sam")


def test_a_missing_teacher_path_is_named():
    with pytest.raises(FileNotFoundError, match=r"--depth-model /no/such/dir.*Depth-Anything-V2"):
        teachers.DepthTeacher("/no/such/dir")
    with pytest.raises(FileNotFoundError, match=r"--sam-model /nowhere.*SAM"):
        teachers.SegmentationTeacher("/nowhere")


def test_paint_draws_the_larger_mask_first_so_the_smaller_stays_visible():
    big = np.zeros((4, 4), bool)
    big[:, :] = True
    small = np.zeros((4, 4), bool)
    small[0, 0] = True
    out = teachers.paint([small, big], (4, 4))
    palette = np.random.default_rng(0).integers(32, 256, size=(2, 3), dtype=np.uint8)
    assert (out[0, 0] == palette[0]).all() and (out[3, 3] == palette[1]).all()
    assert teachers.mask_iou(big, small) == pytest.approx(1 / 16)


def test_llava_conversations_become_question_answer_pairs():
    conv = [
        {"from": "human", "value": "<image>\nWhat is on the table?"},
        {"from": "gpt", "value": "A cup."},
        {"from": "human", "value": "What colour is it?"},
        {"from": "gpt", "value": "White."},
    ]
    assert teachers.qa_items(conv) == [
        {"question": "What is on the table?", "answer": "A cup."},
        {"question": "What colour is it?", "answer": "White."},
    ]


def test_teachers_are_cached_into_shards_that_train_reads(tmp_path):
    write_teachers(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)).save(
        images / "a.jpg"
    )
    records = [
        {"id": "a", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]},
        {"id": "b", "conversations": [{"from": "human", "value": "no image"}, {"from": "gpt", "value": "x"}]},
    ]  # fmt: skip
    (tmp_path / "records.json").write_text(json.dumps(records))
    args = SimpleNamespace(
        records=str(tmp_path / "records.json"), image_root=str(images), out=str(tmp_path / "shards"),
        depth_model=str(tmp_path / "depth"), sam_model=str(tmp_path / "sam"), split="train", points_per_side=2,
        iou_threshold=0.0, shard_size=10, limit=None,
    )  # fmt: skip
    index = json.loads(teachers.convert(args).read_text())
    assert index["splits"]["train"]["samples"] == 1 and index["skipped"] == {"no_image_or_qa": 1}
    dm = SceneDataModule(
        image_size=16, need=["depth", "seg", "qa"], data_dir=str(tmp_path / "shards"), synth=False,
        batch_size=1, batches_per_epoch=1,
    )  # fmt: skip
    batch = next(iter(dm.train_dataloader()))
    assert batch["depth"].shape == (1, 3, 16, 16) and batch["seg"].shape == (1, 3, 16, 16)
    assert batch["question"] == ["Q?"] and batch["answer"] == ["A."]
    assert float(batch["depth"].min()) == -1.0 and float(batch["depth"].max()) == 1.0
