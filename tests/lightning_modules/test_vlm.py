"""The VLM builder: a tiny model saved in the hub layout and dtype loads back through from_pretrained unchanged."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.components.vlm import Conversation, build_vlm

TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}  # fmt: skip


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_a_saved_tiny_vlm_loads_from_pretrained_in_bf16_with_the_same_answers(family, tmp_path):
    text = {**TEXT, "head_dim": 16} if family == "qwen3_vl" else TEXT
    torch.manual_seed(0)
    vlm = build_vlm(
        family, config={"text_config": text}, tokenizer={"vocab_size": 512}, added_tokens=["<|Reward|>"]
    )
    vlm.model.to(torch.bfloat16)
    vlm.save_pretrained(tmp_path / "hub")
    loaded = build_vlm(family, pretrained=str(tmp_path / "hub"), load={"dtype": torch.bfloat16})
    assert loaded.dtype == torch.bfloat16 and len(loaded.tokenizer) == len(vlm.tokenizer)
    assert loaded.tokenizer.convert_tokens_to_ids("<|Reward|>") == vlm.tokenizer.convert_tokens_to_ids(
        "<|Reward|>"
    )
    conv = [Conversation(images=[torch.rand(3, 40, 56) * 2 - 1], text="Make it red. <|Reward|>")]
    with torch.no_grad():
        a, b = vlm.hidden_states(vlm.inputs(conv)), loaded.hidden_states(loaded.inputs(conv))
    # the same weights; buffers (rotary frequencies) stay fp32 when loaded, so allow bf16 rounding
    assert a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=0.05)


def test_extra_tokens_only_extend_an_offline_tokenizer():
    with pytest.raises(ValueError, match="extra_tokens extend an offline tokenizer"):
        build_vlm("qwen2_5_vl", pretrained="unused", extra_tokens=["x"])
    with pytest.raises(ValueError, match="exactly one of"):
        build_vlm("qwen2_5_vl")


def test_pixel_bounds_fold_into_the_processor_size():
    from lightning_modules.components.vlm import processor_options

    base = {"shortest_edge": 3136, "longest_edge": 1003520}
    assert processor_options({"min_pixels": 784, "max_pixels": 1568, "merge_size": 2}, base) == {
        "merge_size": 2,
        "size": {"shortest_edge": 784, "longest_edge": 1568},
    }
    # one bound given: the other is the loaded one, pulled in so that the two never cross
    assert processor_options({"max_pixels": 784}, base)["size"] == {"shortest_edge": 784, "longest_edge": 784}
    assert processor_options({"patch_size": 14}, base) == {"patch_size": 14}
    with pytest.raises(ValueError, match="min_pixels=900 exceeds max_pixels=800"):
        processor_options({"min_pixels": 900, "max_pixels": 800}, base)


def test_pixel_bounds_of_a_pretrained_processor_apply_without_the_deprecated_attributes(tmp_path):
    """min/max pixels over a loaded processor: the image is resized to them, through `size`, with no FutureWarning."""
    import warnings

    vlm = build_vlm("qwen2_5_vl", config={"text_config": TEXT}, tokenizer={"vocab_size": 512})
    vlm.save_pretrained(tmp_path / "hub")  # saved with the default bounds (3136 .. 1003520 px)
    image = torch.rand(3, 112, 112) * 2 - 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        small = build_vlm(
            "qwen2_5_vl", pretrained=str(tmp_path / "hub"), image_processor={"max_pixels": 28 * 28}
        )
        grid = small.inputs([Conversation(images=[image], text="hi")])["image_grid_thw"]
        plain = build_vlm("qwen2_5_vl", pretrained=str(tmp_path / "hub"))
        full = plain.inputs([Conversation(images=[image], text="hi")])["image_grid_thw"]
    assert grid.tolist() == [[1, 2, 2]]  # 28 x 28 px: 2 x 2 patches of 14 px
    assert full.tolist() == [[1, 8, 8]]  # 112 x 112 px within the saved bounds: kept
    assert small.image_processor.size.longest_edge == 784 and not hasattr(small.image_processor, "max_pixels")
