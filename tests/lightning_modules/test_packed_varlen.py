"""xformers on packed sequences: block-diagonal attention over the real tokens, never a dense bias.

xformers has no CPU kernels, so on CPU the layout (which tokens, which blocks) is checked with the same
block-diagonal attention computed by SDPA one sample at a time; the `gpu` tests run the real xformers kernel and
the compiled flex path against the mask path when CUDA is present.
"""

from __future__ import annotations

import pytest
import torch

from lightning_modules.components import packed_dit
from lightning_modules.components.packed_dit import (
    packed_attention,
    sdpa_block_diagonal,
    varlen_attention,
    varlen_layout,
)
from tests.lightning_modules.test_packed_dit import FAMILIES, latents, perturb
from tests.lightning_modules.test_packed_flex import key_mask, with_path


def test_varlen_layout_lists_the_real_tokens_and_one_length_per_sample():
    mask = key_mask([[(0, 2)], [(0, 1), (3, 5)]], 5)  # row 0: tokens 0, 1; row 1: tokens 0, 3, 4
    index, seqlens = varlen_layout(mask)
    assert index.tolist() == [0, 1, 5, 8, 9] and seqlens == [2, 3]


def test_block_diagonal_attention_equals_the_masked_path_on_real_tokens_and_zeroes_padding():
    torch.manual_seed(0)
    mask = key_mask([[(0, 40)], [(0, 300)], [(0, 10), (128, 256)]], 300)
    q, k, v = (torch.randn(3, 300, 2, 16) for _ in range(3))
    want = packed_attention(q, k, v, mask, path="mask")
    got = varlen_attention(q, k, v, mask, sdpa_block_diagonal)
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[~mask], torch.zeros_like(got[~mask]))
    with pytest.raises(ValueError, match="self-attention"):
        varlen_attention(q, k[:, :200], v[:, :200], mask, sdpa_block_diagonal)


@pytest.fixture
def xformers_on_cpu(monkeypatch):
    """The xformers backend with its kernel replaced by the SDPA reference; a dense masked call fails the test."""
    calls = []

    def kernel(q, k, v, seqlens):
        calls.append(list(seqlens))
        return sdpa_block_diagonal(q, k, v, seqlens)

    def dense(query, key, value, attn_mask=None, **kwargs):
        if attn_mask is not None:
            raise AssertionError("a dense attention bias was built for a packed batch")
        return torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (query, key, value))
        ).transpose(1, 2)

    monkeypatch.setattr(packed_dit, "xformers_block_diagonal", kernel)
    monkeypatch.setattr(packed_dit, "dispatch_attention_fn", dense)
    return calls


@pytest.mark.parametrize("name", ["sd3", "qwen-2511", "flux"])
def test_the_xformers_backend_runs_each_family_block_diagonally(name, xformers_on_cpu):
    cls, config, options, _, text_dim, pooled_dim = FAMILIES[name]
    torch.manual_seed(0)
    backend = cls.from_spec(config=config, **options, attention_path="mask")
    perturb(backend.model)
    targets = latents((6, 4), (8, 8), (4, 6))
    refs = [[], latents((4, 8)), latents((2, 6), (6, 6), (4, 6))]
    lengths = torch.tensor([3, 6, 4])
    text = packed_dit.TextConditioning(
        torch.randn(3, 6, text_dim),
        torch.arange(6)[None] < lengths[:, None],
        None if pooled_dim is None else torch.randn(3, pooled_dim),
    )
    sigma = torch.tensor([0.2, 0.9, 0.5])
    with torch.no_grad():
        want = backend(targets, refs, sigma, text, max_tokens=64)
        for processor in backend.model.attn_processors.values():
            processor._attention_backend = "xformers"
        got = backend(targets, refs, sigma, text, max_tokens=64)
    assert xformers_on_cpu, "the xformers kernel was never called"
    # every joint call sees each sample's real tokens only: its text tokens plus its image tokens
    image = [6 * 4 // 4, (8 * 8 + 4 * 8) // 4, (6 * 4 + 2 * 6 + 6 * 6 + 4 * 6) // 4]
    if name != "sd3":  # SD3's dual-attention blocks add image-only calls; FLUX's single blocks are joint too
        assert all(seqlens == [t + i for t, i in zip(lengths.tolist(), image)] for seqlens in xformers_on_cpu)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"sample {i}")


# --- on a GPU -------------------------------------------------------------------------------------------


def _cuda_batch(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cuda").manual_seed(0)
    mask = key_mask([[(0, 700)], [(0, 2100)], [(0, 90), (512, 1800)]], 2100).cuda()
    q, k, v = (torch.randn(3, 2100, 8, 64, device="cuda", dtype=dtype, generator=g) for _ in range(3))
    return q, k, v, mask


@pytest.mark.gpu
def test_xformers_block_diagonal_equals_the_mask_path_on_cuda():
    pytest.importorskip("xformers.ops")
    q, k, v, mask = _cuda_batch(torch.bfloat16)
    want = packed_attention(q, k, v, mask, path="mask")
    got = packed_attention(q, k, v, mask, backend="xformers", path="mask")
    torch.testing.assert_close(got[mask].float(), want[mask].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_compiled_flex_equals_the_mask_path_on_cuda():
    q, k, v, mask = _cuda_batch(torch.bfloat16)
    want = packed_attention(q, k, v, mask, path="mask")
    got = packed_attention(q, k, v, mask, path="flex")  # CUDA: torch.compile(flex_attention)
    assert packed_dit._compiled_flex.cache_info().currsize == 1
    torch.testing.assert_close(got[mask].float(), want[mask].float(), atol=2e-2, rtol=2e-2)
    q.requires_grad_(True)
    packed_attention(q, k, v, mask, path="flex").float().sum().backward()  # the fused kernel has a backward
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["qwen-2511", "flux"])
def test_flex_backend_equals_mask_backend_on_cuda(name):
    cls, config, options, _, text_dim, pooled_dim = FAMILIES[name]
    torch.manual_seed(0)
    backend = cls.from_spec(config=config, **options, attention_path="mask").cuda()
    targets = [x.cuda() for x in latents((6, 4), (8, 8), (4, 6))]
    refs = [[], [x.cuda() for x in latents((4, 8))], [x.cuda() for x in latents((2, 6), (6, 6))]]
    lengths = torch.tensor([3, 6, 4], device="cuda")
    text = packed_dit.TextConditioning(
        torch.randn(3, 6, text_dim, device="cuda"),
        torch.arange(6, device="cuda")[None] < lengths[:, None],
        None if pooled_dim is None else torch.randn(3, pooled_dim, device="cuda"),
    )
    sigma = torch.tensor([0.2, 0.9, 0.5], device="cuda")
    with torch.no_grad():
        want = with_path(backend, "mask")(targets, refs, sigma, text, max_tokens=64)
        got = with_path(backend, "flex")(targets, refs, sigma, text, max_tokens=64)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
