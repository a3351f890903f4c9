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
