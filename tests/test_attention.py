"""The attention switch: sdpa by default, a clear error for xformers where it cannot run, auto falls back."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from omnilab import attention
from omnilab.attention import apply_attention, resolve_attention, xformers_attention_forward


def test_sdpa_is_the_default_and_auto_falls_back_without_xformers(monkeypatch):
    monkeypatch.setattr(attention, "xformers_problem", lambda: "no CUDA")
    assert resolve_attention("sdpa") == "sdpa"
    assert resolve_attention("auto") == "sdpa"
    with pytest.raises(RuntimeError, match="attention=xformers cannot run here: no CUDA"):
        resolve_attention("xformers")
    with pytest.raises(ValueError, match="flash"):
        resolve_attention("flash")


def test_xformers_on_this_machine_is_refused_with_the_reason():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    attention.xformers_problem.cache_clear()
    with pytest.raises(RuntimeError, match="xformers"):
        resolve_attention("xformers")


def test_apply_attention_switches_transformers_models():
    vit = DINOv3ViTModel(DINOv3ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2))
    vit.set_attn_implementation("eager")
    assert apply_attention(torch.nn.ModuleList([vit]), "sdpa") == "sdpa"
    assert vit.config._attn_implementation == "sdpa"


def reference_memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
    """xformers' contract on [B, L, H, D] tensors, written with torch."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if attn_bias is not None and not isinstance(attn_bias, torch.Tensor):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=scale)
    return out.transpose(1, 2)


def test_xformers_function_matches_sdpa_layout_and_masks(monkeypatch):
    ops = types.SimpleNamespace(memory_efficient_attention=reference_memory_efficient_attention)
    ops.LowerTriangularMask = lambda: "causal"
    monkeypatch.setitem(sys.modules, "xformers", types.SimpleNamespace(ops=ops))
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    module = torch.nn.Module().eval()
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))  # [B, H, L, D]
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[1, ..., 3:] = False
    out, _ = xformers_attention_forward(module, q, k, v, mask, scaling=0.3)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3).transpose(1, 2)
    assert out.shape == (2, 5, 4, 8)
    torch.testing.assert_close(out, expected)
    causal, _ = xformers_attention_forward(module, q, k, v, None, is_causal=True)
    torch.testing.assert_close(
        causal, F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    )
