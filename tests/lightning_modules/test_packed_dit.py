"""Packed SELF backends: the stock diffusers model on each sample alone is the reference for every packed batch.

The references run the UNMODIFIED diffusers forward with its stock attention processors, fed the way the
pipelines feed it (`_pack_latents`, `img_shapes`, Kontext image ids) on one sample's real text tokens only.
SD3 has no multi-image input, so its reference stacks a sample's images along height and swaps `pos_embed` for
a wrapper that runs the stock PatchEmbed on each image (UniPic2's per-image positions); the stock forward then
runs its blocks, norm_out, proj_out and unpatchify on [ref_1 .. ref_N, target], and the target is the bottom.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux_kontext import FluxKontextPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import QwenImageEditPlusPipeline
from torch import Tensor, nn

from lightning_modules.components.packed_dit import (
    FluxKontext,
    PackedDiT,
    QwenImageEdit,
    SD3Kontext,
    TextConditioning,
    packed_attention,
    plan_packing,
)
from omnilab.attention import apply_attention

C = 4  # latent channels of the tiny models
GUIDANCE = 3.5
SD3_TINY = {
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": C,
    "out_channels": C,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 8,
    "pos_embed_max_size": 16,
    "dual_attention_layers": [0],  # SD3.5's image-only attn2 in block 0
    "qk_norm": "rms_norm",
}
QWEN_TINY = {
    "patch_size": 2,
    "in_channels": 4 * C,
    "out_channels": C,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 12,
    "axes_dims_rope": [2, 2, 4],
}
FLUX_TINY = {
    "patch_size": 1,
    "in_channels": 4 * C,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 12,
    "pooled_projection_dim": 8,
    "axes_dims_rope": [2, 2, 4],
    "guidance_embeds": True,
}


class StackedPatchEmbed(nn.Module):
    """The stock PatchEmbed run on each image of a height-stacked latent, tokens concatenated in order."""

    def __init__(self, inner: nn.Module, heights: list[int]) -> None:
        super().__init__()
        self.inner, self.heights = inner, heights

    def forward(self, latent: Tensor) -> Tensor:
        return torch.cat([self.inner(x) for x in latent.split(self.heights, dim=-2)], dim=1)


def sd3_stock(
    stock: Any, target: Tensor, refs: list[Tensor], hidden: Tensor, pooled: Tensor, sigma: Tensor
) -> Tensor:
    images = [*refs, target]
    assert all(x.shape[2] == target.shape[2] for x in images), "the SD3 reference stacks images of one width"
    inner = stock.pos_embed
    stock.pos_embed = StackedPatchEmbed(inner, [x.shape[1] for x in images])
    try:
        out = stock(
            hidden_states=torch.cat(images, dim=1)[None],
            encoder_hidden_states=hidden[None],
            pooled_projections=pooled[None],
            timestep=sigma[None] * 1000,
        ).sample
    finally:
        stock.pos_embed = inner
    return out[0, :, -target.shape[1] :]


def qwen_stock(
    stock: Any, target: Tensor, refs: list[Tensor], hidden: Tensor, pooled: None, sigma: Tensor
) -> Tensor:
    pipe = QwenImageEditPlusPipeline
    images = [target, *refs]  # Qwen-Image-Edit-Plus: [noisy target | ref_1 .. ref_N]
    packed = torch.cat([pipe._pack_latents(x[None], 1, C, *x.shape[1:]) for x in images], dim=1)
    out = stock(
        hidden_states=packed,
        encoder_hidden_states=hidden[None],
        encoder_hidden_states_mask=torch.ones(1, hidden.shape[0], dtype=torch.bool),
        timestep=sigma[None],
        img_shapes=[[(1, x.shape[1] // 2, x.shape[2] // 2) for x in images]],
    ).sample
    n = target.shape[1] * target.shape[2] // 4
    return pipe._unpack_latents(out[:, :n], target.shape[1] * 8, target.shape[2] * 8, 8)[0, :, 0]


def flux_stock(
    stock: Any, target: Tensor, refs: list[Tensor], hidden: Tensor, pooled: Tensor, sigma: Tensor
) -> Tensor:
    pipe = FluxKontextPipeline
    images = [target, *refs]  # FluxKontextPipeline: cat([latents, image_latents]), image ids index 1 (k here)
    packed = torch.cat([pipe._pack_latents(x[None], 1, C, *x.shape[1:]) for x in images], dim=1)
    ids = []
    for k, x in enumerate(images):
        image_ids = pipe._prepare_latent_image_ids(1, x.shape[1] // 2, x.shape[2] // 2, x.device, x.dtype)
        image_ids[..., 0] = k
        ids.append(image_ids)
    out = stock(
        hidden_states=packed,
        encoder_hidden_states=hidden[None],
        pooled_projections=pooled[None],
        timestep=sigma[None],
        img_ids=torch.cat(ids),
        txt_ids=torch.zeros(hidden.shape[0], 3),
        guidance=torch.full([1], GUIDANCE),
    ).sample
    n = target.shape[1] * target.shape[2] // 4
    return pipe._unpack_latents(out[:, :n], target.shape[1] * 8, target.shape[2] * 8, 8)[0]


FAMILIES = {
    "sd3": (SD3Kontext, SD3_TINY, {}, sd3_stock, 16, 8),
    "qwen-2509": (QwenImageEdit, QWEN_TINY, {}, qwen_stock, 12, None),
    "qwen-2511": (QwenImageEdit, {**QWEN_TINY, "zero_cond_t": True}, {}, qwen_stock, 12, None),
    "flux": (FluxKontext, FLUX_TINY, {"guidance": GUIDANCE}, flux_stock, 12, 8),
}


@dataclass
class Family:
    backend: PackedDiT
    stock: Any
    reference: Any
    text_dim: int
    pooled_dim: int | None

    def texts(self, lengths: list[int]) -> tuple[list[tuple[Tensor, Tensor | None]], TextConditioning]:
        """Each sample's real text (hidden [T_i, D], pooled) and the batch padded with garbage behind its mask."""
        width = max(lengths)
        hidden = torch.randn(len(lengths), width, self.text_dim)  # padding slots hold garbage, not zeros
        mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
        pooled = None if self.pooled_dim is None else torch.randn(len(lengths), self.pooled_dim)
        real = [(hidden[i, :n], None if pooled is None else pooled[i]) for i, n in enumerate(lengths)]
        return real, TextConditioning(hidden, mask, pooled)

    def alone(
        self, target: Tensor, refs: list[Tensor], text: tuple[Tensor, Tensor | None], sigma: Tensor
    ) -> Tensor:
        """The stock model's velocity for one sample."""
        with torch.no_grad():
            return self.reference(self.stock, target, refs, text[0], text[1], sigma)


def perturb(model: nn.Module) -> None:
    """Shift every weight a little so no zero-initialised parameter can hide a wrong path."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


@pytest.fixture(params=list(FAMILIES))
def family(request) -> Family:
    cls, config, options, reference, text_dim, pooled_dim = FAMILIES[request.param]
    torch.manual_seed(0)
    backend = cls.from_spec(config=config, **options)
    perturb(backend.model)
    stock = cls.model_class.from_config(config)
    stock.load_state_dict(backend.model.state_dict())
    return Family(backend.eval(), stock.eval(), reference, text_dim, pooled_dim)


def latents(*shapes: tuple[int, int]) -> list[Tensor]:
    return [torch.randn(C, h, w) for h, w in shapes]


def test_batch1_one_ref_of_target_size_equals_stock(family):
    torch.manual_seed(1)
    (target,), refs = latents((8, 8)), latents((8, 8))
    real, text = family.texts([5])
    sigma = torch.tensor([0.7])
    with torch.no_grad():
        (got,) = family.backend([target], [refs], sigma, text)
    assert family.backend.last_padding_fraction == 0.0
    torch.testing.assert_close(got, family.alone(target, refs, real[0], sigma[0]), atol=1e-5, rtol=1e-5)


def test_mixed_batch_of_0_1_3_refs_equals_stock_on_each_sample_alone(family):
    torch.manual_seed(2)
    # One width per sample (the SD3 reference stacks along height); sizes differ within and across samples.
    targets = latents((6, 4), (8, 8), (4, 6))
    refs = [[], latents((4, 8)), latents((2, 6), (6, 6), (4, 6))]
    real, text = family.texts([3, 6, 4])
    sigma = torch.tensor([0.2, 0.9, 0.5])
    with torch.no_grad():
        got = family.backend(targets, refs, sigma, text)
    assert [v.shape for v in got] == [t.shape for t in targets]
    for i in range(3):  # sample 0 has no references: plain text-to-image
        expected = family.alone(targets[i], refs[i], real[i], sigma[i])
        torch.testing.assert_close(got[i], expected, atol=1e-5, rtol=1e-5, msg=f"sample {i}")


def test_padding_and_batch_mates_change_nothing(family):
    torch.manual_seed(3)
    targets = latents((6, 4), (8, 8))
    refs = [latents((4, 4), (2, 6)), latents((8, 8))]  # ref sizes differ from the target and between samples
    _, text = family.texts([4, 6])
    sigma = torch.tensor([0.3, 0.8])
    first = TextConditioning(
        text.hidden[:1, :4], text.mask[:1, :4], None if text.pooled is None else text.pooled[:1]
    )
    with torch.no_grad():
        (alone,) = family.backend(targets[:1], refs[:1], sigma[:1], first)
        (padded,) = family.backend(targets[:1], refs[:1], sigma[:1], first, max_tokens=40)
        assert family.backend.last_padding_fraction == pytest.approx(1 - 13 / 40)
        batched = family.backend(targets, refs, sigma, text, max_tokens=40)
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[0], alone, atol=1e-5, rtol=1e-5)


def test_sample_over_max_tokens_is_named():
    grids = [[(2, 2)], [(4, 4), (2, 4), (2, 2)]]  # 4 and 16 + 8 + 4 = 28 tokens
    with pytest.raises(ValueError, match=r"sample 1 needs 28 image tokens \(target \+ 2 references"):
        plan_packing(grids, target_first=True, max_tokens=24)
    torch.manual_seed(0)
    backend = SD3Kontext.from_spec(config=SD3_TINY)
    text = TextConditioning(torch.randn(2, 3, 16), torch.ones(2, 3, dtype=torch.bool), torch.randn(2, 8))
    with pytest.raises(ValueError, match="sample 1 needs 28 image tokens"):
        backend(latents((4, 4), (8, 8)), [[], latents((4, 8), (4, 4))], torch.rand(2), text, max_tokens=24)


def test_padding_fraction_and_masks_by_hand():
    # sample 0: target 2x2 + ref 2x4 = 12 tokens; sample 1: target 2x2 = 4 tokens.
    grids = [[(2, 2), (2, 4)], [(2, 2)]]
    fixed = plan_packing(grids, target_first=True, max_tokens=16)
    assert fixed.padding_fraction == pytest.approx((4 + 12) / 32)
    longest = plan_packing(grids, target_first=True, max_tokens=None)
    assert longest.length == 12 and longest.padding_fraction == pytest.approx(8 / 24)
    assert fixed.image_mask.sum(1).tolist() == [12, 4]
    assert fixed.target_mask[0].nonzero().flatten().tolist() == [0, 1, 2, 3]
    last = plan_packing([[(2, 4), (2, 2)]], target_first=False, max_tokens=16)  # SD3: [refs, target]
    assert last.target_span(0) == (8, 12)
    torch.manual_seed(0)
    backend = QwenImageEdit.from_spec(config=QWEN_TINY)
    text = TextConditioning(torch.randn(2, 3, 12), torch.ones(2, 3, dtype=torch.bool))
    backend(latents((4, 4), (4, 4)), [latents((4, 8)), []], torch.rand(2), text, max_tokens=16)
    assert backend.last_padding_fraction == pytest.approx(0.5)


def test_builds_from_a_save_pretrained_dir(family, tmp_path):
    cls = type(family.backend)
    family.backend.model.save_pretrained(tmp_path / "transformer")
    options = {"guidance": GUIDANCE} if cls is FluxKontext else {}
    loaded = cls.from_spec(pretrained=str(tmp_path), subfolder="transformer", **options).eval()
    torch.manual_seed(4)
    (target,), refs = latents((4, 4)), latents((4, 4))
    _, text = family.texts([3])
    with torch.no_grad():
        want = family.backend([target], [refs], torch.tensor([0.5]), text)[0]
        got = loaded([target], [refs], torch.tensor([0.5]), text)[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)  # same weights, float rounding only
    assert loaded.latent_channels == C and loaded.patch_size == 2


def test_attention_switch_reaches_the_packed_processors():
    torch.manual_seed(0)
    backend = FluxKontext.from_spec(config=FLUX_TINY, guidance=GUIDANCE).eval()
    text = TextConditioning(torch.randn(1, 3, 12), torch.ones(1, 3, dtype=torch.bool), torch.randn(1, 8))
    args = (latents((4, 4)), [latents((4, 4))], torch.tensor([0.4]), text)
    with torch.no_grad():
        before = backend(*args)[0]
        assert apply_attention(backend, "sdpa") == "sdpa"
        after = backend(*args)[0]
    processors = backend.model.attn_processors.values()
    assert {getattr(p._attention_backend, "value", None) for p in processors} == {"native"}
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    q = torch.randn(1, 3, 2, 8)
    with pytest.raises(ValueError, match="padding mask"):
        packed_attention(q, q, q, torch.ones(1, 3, dtype=torch.bool), backend="flash")


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    backend = SD3Kontext.from_spec(config=SD3_TINY)
    text = TextConditioning(
        torch.randn(2, 3, 16), torch.tensor([[1, 1, 1], [1, 1, 0]]).bool(), torch.randn(2, 8)
    )
    args = (latents((4, 4), (4, 6)), [latents((4, 4)), []], torch.tensor([0.3, 0.6]), text)

    def grads() -> list[Tensor]:
        backend.zero_grad()
        sum(v.square().sum() for v in backend(*args, max_tokens=12)).backward()
        return [p.grad.clone() for p in backend.parameters() if p.grad is not None]

    plain = grads()
    backend.model.enable_gradient_checkpointing()
    checkpointed = grads()
    assert len(plain) == len(checkpointed) > 0
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_a_repeated_layout_is_planned_once_and_gives_the_same_velocity(family, monkeypatch):
    # a sampler calls the backbone 2 x steps times on one layout: packing and RoPE are built once
    import lightning_modules.components.packed_dit as packed

    plans = []
    real_plan = packed.plan_packing
    monkeypatch.setattr(packed, "plan_packing", lambda *a, **k: plans.append(a) or real_plan(*a, **k))
    torch.manual_seed(5)
    targets, refs = latents((4, 4)), [latents((4, 8))]
    _, text = family.texts([3])
    with torch.no_grad():
        first = family.backend(targets, refs, torch.tensor([0.4]), text)
        second = family.backend(targets, refs, torch.tensor([0.4]), text)
        family.backend(targets, refs, torch.tensor([0.4]), text, max_tokens=40)  # a new layout: planned
    assert len(plans) == 2
    torch.testing.assert_close(first, second, atol=0, rtol=0)
