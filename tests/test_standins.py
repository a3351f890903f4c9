"""The stand-ins of tests/standins.py: written in the release's layout, family and file dtype, read by the loaders."""

from __future__ import annotations

import json

import pytest
import torch

from tests.standins import release, saved_dtypes, write_standin

# editreward/tiny's backbone spec in brief: a tiny Qwen3-VL (the release below is Qwen2.5-VL)
QWEN3_TINY = {
    "family": "qwen3_vl",
    "config": {"text_config": {"hidden_size": 32, "num_attention_heads": 2, "head_dim": 16}},
    "tokenizer": {"vocab_size": 512},
    "image_processor": {"min_pixels": 3136, "max_pixels": 4096},
    "extra_tokens": ['", "score": ['],
}
VQ = {
    "codebook_size": 32,
    "codebook_embed_dim": 8,
    "ch": 8,
    "z_channels": 16,
    "num_res_blocks": 1,
    "norm_groups": 4,
}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNILAB_CACHE", str(tmp_path / "cache"))


def test_a_vlm_release_is_written_in_its_own_family_and_dtype(tmp_path):
    from lightning_modules.components.vlm import build_vlm

    folder = write_standin("Qwen/Qwen2.5-VL-7B-Instruct", {"model": QWEN3_TINY}, tmp_path)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    assert saved_dtypes(folder) == {torch.bfloat16}
    assert (folder / "preprocessor_config.json").is_file() and (folder / "tokenizer.json").is_file()
    vlm = build_vlm("qwen2_5_vl", pretrained=str(folder), added_tokens=["<|Reward|>"])
    assert vlm.dtype == torch.bfloat16 and '", "score": [' in vlm.tokenizer.get_vocab()
    same = write_standin("Qwen/Qwen3-VL-8B-Instruct", {"model": QWEN3_TINY}, tmp_path)
    text = json.loads((same / "config.json").read_text())["text_config"]
    assert text["hidden_size"] == 32  # the tiny config itself where the families agree


def test_a_local_conversion_is_keyed_by_its_path_and_written_through_the_conversion(tmp_path):
    from lightning_modules.components.vq import LlamaGenVQModel

    assert release("checkpoints/llamagen_vq_ds8").one_folder
    folder = write_standin("checkpoints/llamagen_vq_ds8", {"model": {"family": None, "config": VQ}}, tmp_path)
    assert "converted_from" in json.loads((folder / "omnilab_source.json").read_text())
    assert saved_dtypes(folder) == {torch.float32} and not list(tmp_path.glob("*.pt"))
    vq = LlamaGenVQModel.from_pretrained(folder)
    assert vq.config.codebook_size == 32 and vq.downsample == 8
