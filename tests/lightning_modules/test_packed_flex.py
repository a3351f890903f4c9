"""The flex attention path of the packed backends equals the mask path; its block mask skips padding tiles.

flex_attention runs unfused (eager) and forward-only on CPU (torch has no CPU flex backward): the same math as
the fused CUDA kernel, so these tests check the block mask and the layout, not the kernel or its gradients.
"auto" picks flex only on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from lightning_modules.components.packed_dit import (
    PackedDiT,
    TextConditioning,
    packed_attention,
    padding_block_mask,
    resolve_attention_path,
)
from tests.lightning_modules.test_flow_edit import TINY, tiny, tokenizer_cache  # noqa: F401 (fixture)
from tests.lightning_modules.test_packed_dit import FAMILIES, latents, perturb

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def key_mask(lengths: list[list[tuple[int, int]]], width: int) -> torch.Tensor:
    """[B, width] bool with True on the given (start, end) spans of each row."""
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for row, spans in enumerate(lengths):
        for start, end in spans:
            mask[row, start:end] = True
    return mask


def test_auto_is_the_mask_path_on_cpu_and_names_are_checked():
    assert resolve_attention_path("auto", "cpu") == "mask"
    assert resolve_attention_path("flex", "cpu") == "flex"
    assert resolve_attention_path("mask", "cuda") == "mask"
    with pytest.raises(ValueError, match="attention_path='varlen'"):
        resolve_attention_path("varlen", "cpu")
    cls, config, options, *_ = FAMILIES["qwen-2509"]
    backend = cls.from_spec(config=config, **options)
    assert {p.attention_path for p in backend.model.attn_processors.values()} == {"auto"}
    with pytest.raises(ValueError, match="attention_path"):
        cls.from_spec(config=config, attention_path="flash")


def test_block_mask_keeps_real_tiles_and_skips_padding_tiles():
    # 384 tokens = tiles [0, 128), [128, 256), [256, 384). Real tokens per tile: row 0 (40 real) 40, 0, 0;
    # row 1 (300 real) 128, 128, 44; row 2 (text 0..10 and image 128..256: padding in both parts) 10, 128, 0.
    mask = key_mask([[(0, 40)], [(0, 300)], [(0, 10), (128, 256)]], 384)
    block = padding_block_mask(mask)
    # per query tile (a query tile of padding only is skipped): [B, 3]
    assert block.kv_num_blocks[:, 0].tolist() == [[1, 0, 0], [1, 1, 1], [1, 1, 0]]  # partial key tiles
    assert block.full_kv_num_blocks[:, 0].tolist() == [[0, 0, 0], [2, 2, 2], [1, 1, 0]]  # all-real key tiles
    assert block.kv_indices[2, 0, 0, 0] == 0 and block.full_kv_indices[2, 0, 0, 0] == 1
    # the same tiles, partial and full, as torch's create_block_mask on the dense mask of "a real key, from a
    # query tile that holds a real query"
    tile_real = mask.view(3, 3, 128).any(-1)
    reference = create_block_mask(
        lambda b, h, q, kv: tile_real[b, q // 128] & mask[b, kv], 3, None, 384, 384, device="cpu"
    )
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(block, name), getattr(reference, name)), name


def test_flex_attention_equals_masked_sdpa_on_real_tokens_across_tiles():
    torch.manual_seed(0)
    mask = key_mask([[(0, 40)], [(0, 300)], [(0, 10), (128, 256)]], 300)
    q, k, v = (torch.randn(3, 300, 2, 16) for _ in range(3))
    want = packed_attention(q, k, v, mask, path="mask")
    got = packed_attention(q, k, v, mask, path="flex")
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="replaces the attention backend"):
        packed_attention(q, k, v, mask, backend="xformers", path="flex")


def with_path(backend: PackedDiT, path: str) -> PackedDiT:
    for processor in backend.model.attn_processors.values():
        processor.attention_path = path
    return backend


@pytest.mark.parametrize("name", ["sd3", "qwen-2511", "flux"])
def test_flex_backend_equals_mask_backend_on_a_mixed_padded_batch(name):
    cls, config, options, _, text_dim, pooled_dim = FAMILIES[name]
    torch.manual_seed(0)
    backend = cls.from_spec(config=config, **options, attention_path="mask")
    perturb(backend.model)
    targets = latents((6, 4), (8, 8), (4, 6))
    refs = [[], latents((4, 8)), latents((2, 6), (6, 6), (4, 6))]
    lengths = torch.tensor([3, 6, 4])
    text = TextConditioning(
        torch.randn(3, 6, text_dim),
        torch.arange(6)[None] < lengths[:, None],
        None if pooled_dim is None else torch.randn(3, pooled_dim),
    )
    sigma = torch.tensor([0.2, 0.9, 0.5])

    with torch.no_grad():
        want = with_path(backend, "mask")(targets, refs, sigma, text, max_tokens=64)
        got = with_path(backend, "flex")(targets, refs, sigma, text, max_tokens=64)
    assert backend.last_padding_fraction > 0.3  # the padding is real
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"sample {i}")


def test_flowedit_backbone_dict_reaches_the_processors():
    spec = {**TINY["qwen_image_edit"]["backbone"], "attention_path": "flex"}
    model = tiny("qwen_image_edit", backbone=spec)
    assert {p.attention_path for p in model.backbone.model.attn_processors.values()} == {"flex"}
