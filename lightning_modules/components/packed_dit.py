"""Packed multi-reference DiT backends: UniRef-Image-Edit's SELF (Sequence-Extended Latent Fusion) at batch > 1.

SELF serialises all images of one sample (0-6 clean reference latents and the noisy target latent) into ONE
token sequence, pads that sequence to a fixed length with a mask, and batches samples that differ in the number
and sizes of their references. diffusers 0.42 cannot run that batch (docs/methods/uniref.md): its processors
ignore or refuse padding masks, and position ids / RoPE tables are shared by the whole batch. Each backend here
wraps a diffusers DiT and REUSES its weights and modules (patch/time/text embedders, transformer blocks,
norm_out, proj_out); it replaces only how tokens are embedded and positioned, the attention processors (through
`set_attn_processor`, masked SDPA) and the per-image unpatchify:

- `SD3Kontext` — UniPic2-SD3.5M-Kontext (docs/methods/unipic2.md): every image through the same `PatchEmbed`
  (its own centred crop of the 2-D sin-cos table, no offset), references PREPENDED ([ref_1 .. ref_N, target]),
  joint attention with the text stream, one shared timestep (clean references share the target's adaLN).
- `QwenImageEdit` — Qwen-Image-Edit-2509/2511, UniPic 3.0, MICo (docs/methods/uniref.md): [target | ref_1 .. ref_N]
  2x2-packed into `img_in`, MSRoPE with frame index = image index and centred h/w, text positions after
  max(h/2, w/2), computed PER SAMPLE; `zero_cond_t` (2511) modulates reference tokens at t = 0.
- `FluxKontext` — FLUX.1 Kontext (docs/methods/uniref.md): [target | ref_1 .. ref_N] with 3-axis RoPE ids
  (index, h, w), target index 0 and reference k index k on the same h/w grid, per-sample ids; optional guidance.

Padding: padded image keys (and masked text keys) get -inf before the softmax so they change nothing; padded
queries attend to the real keys, produce finite garbage, and are dropped before unpatchify. On CUDA the padding
is skipped, not computed: flex attention with a block mask of the real keys (`attention_path`, `packed_attention`),
or, with the xformers backend, xformers' variable-length attention over the real tokens only (`varlen_attention`:
every sample's real tokens packed into one sequence with a block-diagonal mask, never a dense B x H x L x L bias).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Self

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel, SD3Transformer2DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.nn.utils.rnn import pad_sequence

from lightning_modules.components.backbones import build_backbone

# --- inputs and packing -------------------------------------------------------------------------------


@dataclass
class TextConditioning:
    """Text (or VLM) conditioning of a batch: hidden states [B, T, D], mask [B, T] (True = real), pooled [B, P].

    Inside the backbone a mask of all True becomes None (nothing to mask), as the stock pipelines pass it.
    """

    hidden: Tensor
    mask: Tensor | None
    pooled: Tensor | None = None


class Packing(NamedTuple):
    """Layout of one padded batch: per-sample (h, w) token grids in sequence order and the masks over slots."""

    grids: list[list[tuple[int, int]]]  # grids[i][j]: tokens of image j of sample i, in sequence order
    lengths: list[int]  # real image tokens of each sample
    target_slot: int  # index of the target in each grids[i]: 0 (target first) or -1 (target last)
    length: int  # padded image-sequence length L
    image_mask: Tensor  # [B, L] bool, True = a real image token
    target_mask: Tensor  # [B, L] bool, True = a token of the target image

    def target_span(self, i: int) -> tuple[int, int]:
        """(start, end) of sample i's target tokens in its packed sequence."""
        sizes = [h * w for h, w in self.grids[i]]
        start = 0 if self.target_slot == 0 else sum(sizes[:-1])
        return start, start + sizes[self.target_slot]

    @property
    def layout(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        """The grids as a hashable key (`PackedDiT._memo`)."""
        return layout_key(self.grids)

    @property
    def key_mask(self) -> Tensor | None:
        """`image_mask` for attention, None when no sample is padded (SDPA then runs its unmasked kernels)."""
        return self.image_mask if any(n != self.length for n in self.lengths) else None

    @property
    def padding_fraction(self) -> float:
        """Padded image tokens / all image token slots (B·L)."""
        return 1.0 - sum(self.lengths) / (len(self.lengths) * self.length)  # host ints: no device sync


def layout_key(grids: list[list[tuple[int, int]]]) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per-sample (h, w) token grids as a hashable key: two batches with one key pack identically."""
    return tuple(tuple(g) for g in grids)


def plan_packing(
    grids: list[list[tuple[int, int]]],
    target_first: bool,
    max_tokens: int | None,
    device: torch.device | None = None,
) -> Packing:
    """Pad every sample's image sequence to `max_tokens` (or the longest); ValueError if a sample does not fit."""
    lengths = [sum(h * w for h, w in g) for g in grids]
    if max_tokens is not None:
        for i, n in enumerate(lengths):
            if n > max_tokens:
                raise ValueError(
                    f"sample {i} needs {n} image tokens (target + {len(grids[i]) - 1} references, grids "
                    f"{grids[i]}) but max_tokens={max_tokens}"
                )
    length = max(lengths) if max_tokens is None else max_tokens
    slots = torch.arange(length, device=device)
    image_mask = slots[None] < torch.tensor(lengths, device=device)[:, None]
    packing = Packing(
        grids, lengths, 0 if target_first else -1, length, image_mask, torch.zeros_like(image_mask)
    )
    for i in range(len(grids)):
        start, end = packing.target_span(i)
        packing.target_mask[i, start:end] = True
    return packing


def patchify_2x2(latent: Tensor) -> Tensor:
    """[C, H, W] -> [H/2·W/2, 4C] row-major tokens, features (c, ph, pw): the Flux/Qwen `_pack_latents` layout."""
    c, h, w = latent.shape
    return latent.view(c, h // 2, 2, w // 2, 2).permute(1, 3, 0, 2, 4).reshape(h // 2 * (w // 2), c * 4)


def unpatchify_2x2(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of `patchify_2x2` for an h x w token grid: [h·w, 4C] -> [C, 2h, 2w]."""
    return tokens.view(h, w, -1, 2, 2).permute(2, 0, 3, 1, 4).reshape(-1, 2 * h, 2 * w)


# --- attention ------------------------------------------------------------------------------------------


ATTENTION_PATHS = ("mask", "flex", "auto")
FLEX_BLOCK = 128  # flex attention's default sparse block (query and key tiles)


def resolve_attention_path(path: str, device: torch.device | str) -> str:
    """The path `path` runs on `device`: "mask" or "flex"; "auto" is flex on CUDA (with triton), else mask."""
    if path not in ATTENTION_PATHS:
        raise ValueError(f"attention_path={path!r}: choose one of {', '.join(ATTENTION_PATHS)}")
    if path != "auto":
        return path
    return "flex" if torch.device(device).type == "cuda" and _has_triton() else "mask"


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def padding_block_mask(mask: Tensor, block: int = FLEX_BLOCK) -> BlockMask:
    """flex attention's BlockMask for self-attention over padded sequences: `mask` [B, L] True = a real token.

    Every packed processor attends a sequence to itself, so one mask marks both real queries and real keys.
    On the grid of block x block tiles: a tile whose keys are all padding, or whose queries are all padding,
    is skipped; a tile of real keys only is full (no mask_mod inside); the rest are partial, where mask_mod
    masks the padded keys. Padded queries that share a tile with real ones attend to the real keys (finite
    garbage, dropped with the padding, as on the mask path); padded queries of a skipped tile get 0. So a
    sample costs about its real tokens squared, not the padded length squared. `create_block_mask` would
    evaluate a mask_mod on all B·L² pairs; this works on the B·L/block tiles: O(B·L) work, no host sync.
    """
    batch, length = mask.shape
    n = -(-length // block)
    # padded past L with False: mask_mod may be asked about indices of the last tile beyond L
    padded = F.pad(mask.bool(), (0, n * block - length))
    real = padded.view(batch, n, block).sum(-1)  # [B, n] real tokens per tile
    rows = (real > 0)[:, None, :, None]  # [B, 1, n_q, 1]: query tiles with a real query

    def tiles(chosen: Tensor) -> tuple[Tensor, Tensor]:
        """[B, 1, n_q, n_kv] chosen tiles -> counts [B, 1, n_q] and indices (chosen first, in order)."""
        order = torch.argsort(chosen.int(), dim=-1, descending=True, stable=True)
        return chosen.sum(-1, dtype=torch.int32), order.int().contiguous()

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return padded[b, kv]

    partial = rows & ((real > 0) & (real < block))[:, None, None, :]
    full = rows & (real == block)[:, None, None, :]
    return BlockMask.from_kv_blocks(
        *tiles(partial), *tiles(full), BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(length, length)
    )


@functools.cache
def _compiled_flex() -> Any:
    """flex_attention compiled once (fused kernels on CUDA; eager flex materialises the scores)."""
    return torch.compile(flex_attention)  # a new padded length recompiles once, then runs dynamic


def packed_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_mask: Tensor | None,
    backend: Any = None,
    path: str = "mask",
) -> Tensor:
    """Attention over [B, L, H, D] tensors where keys with `key_mask` [B, Lk] False are ignored; -> [B, Lq, H, D].

    Two paths, the same output (tests/lightning_modules/test_packed_flex.py), chosen by `path` (the
    processors' `attention_path`; "auto" = flex on CUDA, mask on CPU, `resolve_attention_path`):

    - mask: SDPA with a boolean key mask broadcast over heads and queries (False -> -inf before the
      softmax); the padded layout costs B·L² whatever the padding. `backend` is the processor's
      `_attention_backend`, which diffusers' `set_attention_backend` (and so `omnilab.attention.apply_attention`)
      sets: None/native -> SDPA here; xformers -> `varlen_attention`, xformers' block-diagonal attention over the
      real tokens only (without padding, diffusers' dispatcher with no bias); other backends are refused.
    - flex: `flex_attention` with a `padding_block_mask` (queries and keys are the same tokens in every packed
      processor): 128 x 128 tiles of padding are skipped and tiles of real keys run without a mask, so a
      sample costs about its real tokens squared, not the padded length squared. The real queries' outputs
      equal the mask path's; padded queries may differ (0 in a skipped tile) and are dropped anyway. Compiled
      on CUDA (fused kernels); eager elsewhere (unfused, and forward-only on CPU: for tests). It replaces the
      dispatcher, so it runs only under the native backend: explicit flex with xformers is refused, auto
      keeps xformers on the mask path. The reused blocks modulate with a per-sample [B, D] embedding, so the
      [B, L] layout stays everywhere else and only attention skips the padding.
    """
    name = getattr(backend, "value", backend)
    resolved = resolve_attention_path(path, query.device)
    if resolved == "flex" and name not in (None, "native"):
        if path == "flex":
            raise ValueError(
                f"attention_path='flex' replaces the attention backend; got backend {name!r} too"
            )
        resolved = "mask"
    if resolved == "flex" and key_mask is not None:  # no mask: nothing to skip, SDPA's flash kernel serves
        if query.shape[1] != key.shape[1]:
            raise ValueError(
                f"the flex path is self-attention: {query.shape[1]} queries, {key.shape[1]} keys"
            )
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        block_mask = padding_block_mask(key_mask)
        attend = _compiled_flex() if q.is_cuda else flex_attention
        return attend(q, k, v, block_mask=block_mask).transpose(1, 2)
    if name in (None, "native"):
        mask = None if key_mask is None else key_mask[:, None, None, :]
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    if name == "xformers":
        if key_mask is None:
            return dispatch_attention_fn(query, key, value, backend=backend)
        return varlen_attention(query, key, value, key_mask)
    raise ValueError(
        f"packed attention needs a backend that takes a padding mask (native or xformers), got {name!r}"
    )


def varlen_layout(key_mask: Tensor) -> tuple[Tensor, list[int]]:
    """(positions of the real tokens in the flattened [B·L] layout, real tokens per sample) of a [B, L] mask.

    The packed processors attend a sequence to itself, so one mask marks the real queries and the real keys.
    The per-sample lengths come to the host (xformers builds its block-diagonal bias from Python ints).
    """
    return key_mask.flatten().nonzero().squeeze(1), key_mask.sum(1).tolist()


def varlen_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_mask: Tensor,
    attend: Callable[[Tensor, Tensor, Tensor, list[int]], Tensor] | None = None,
) -> Tensor:
    """Attention of each sample's real tokens to its own real tokens, padding never computed: [B, L, H, D] in/out.

    The real tokens of all samples are gathered into one [1, N, H, D] sequence (N = the real tokens of the
    batch) and attended block-diagonally, sample by sample, by `attend(q, k, v, seqlens)` (default: xformers'
    `memory_efficient_attention` with `BlockDiagonalMask.from_seqlens`); the outputs go back to their slots and
    padded slots get 0 (they are dropped anyway). Memory is O(N), not the O(B·H·L²) of a dense bias.
    """
    if query.shape[1] != key.shape[1]:
        raise ValueError(f"varlen attention is self-attention: {query.shape[1]} queries, {key.shape[1]} keys")
    index, seqlens = varlen_layout(key_mask)
    q, k, v = (t.flatten(0, 1).index_select(0, index)[None] for t in (query, key, value))
    out = (attend or xformers_block_diagonal)(q, k, v, seqlens)[0]
    full = out.new_zeros(query.shape[0] * query.shape[1], *out.shape[1:])
    return full.index_copy_(0, index, out).view(*query.shape[:2], *out.shape[1:])


def xformers_block_diagonal(q: Tensor, k: Tensor, v: Tensor, seqlens: list[int]) -> Tensor:
    """xformers' variable-length attention of [1, N, H, D] tensors, one block per sample of `seqlens`."""
    import xformers.ops as xops
    from xformers.ops.fmha import BlockDiagonalMask

    return xops.memory_efficient_attention(q, k, v, attn_bias=BlockDiagonalMask.from_seqlens(seqlens))


def sdpa_block_diagonal(q: Tensor, k: Tensor, v: Tensor, seqlens: list[int]) -> Tensor:
    """The same block-diagonal attention with SDPA, one block at a time (any device; the reference in tests)."""
    outs, start = [], 0
    for n in seqlens:
        block = (t[:, start : start + n].transpose(1, 2) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(*block).transpose(1, 2))
        start += n
    return torch.cat(outs, dim=1)


def _key_mask(*parts: tuple[Tensor | None, int, Tensor]) -> Tensor | None:
    """Concatenate (mask or None, length, like) parts into one [B, Lk] bool key mask; None if every part is None."""
    if all(mask is None for mask, _, _ in parts):
        return None
    full = [
        torch.ones(like.shape[0], n, dtype=torch.bool, device=like.device) if mask is None else mask.bool()
        for mask, n, like in parts
    ]
    return torch.cat(full, dim=1)


def rotate_complex(x: Tensor, freqs: Tensor) -> Tensor:
    """Qwen's complex RoPE (`apply_rotary_emb_qwen(use_real=False)`) with per-sample freqs: x [B,S,H,D], freqs [B,S,D/2]."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs.unsqueeze(2)).flatten(3).type_as(x)


def rotate_real(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Flux's real RoPE (`apply_rotary_emb`, interleaved pairs) with per-sample cos/sin [B, S, D]: x [B, S, H, D]."""
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos[:, :, None] + x_rotated.float() * sin[:, :, None]).to(x.dtype)


class _PackedProcessor:
    """Slots that diffusers' `set_attention_backend` reads and fills on every processor, and the attention path."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, attention_path: str = "auto") -> None:
        resolve_attention_path(attention_path, "cpu")  # checks the name
        self.attention_path = attention_path


class PackedJointAttnProcessor(_PackedProcessor):
    """SD3's JointAttnProcessor2_0 honouring the image padding mask and the text mask ([image, text] order).

    Without a context stream (SD3.5's dual-attention `attn2`, image tokens only) only the image mask applies.
    """

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_mask: Tensor | None = None,
        text_mask: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Joint (or image-only) attention of one block; returns what the stock processor returns."""
        head_dim = attn.to_k.out_features // attn.heads
        query, key, value = (
            p(hidden_states).unflatten(-1, (-1, head_dim)) for p in (attn.to_q, attn.to_k, attn.to_v)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        key_mask = _key_mask((image_mask, hidden_states.shape[1], hidden_states))
        if encoder_hidden_states is not None:
            c_query, c_key, c_value = (
                p(encoder_hidden_states).unflatten(-1, (-1, head_dim))
                for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            )
            if attn.norm_added_q is not None:
                c_query = attn.norm_added_q(c_query)
            if attn.norm_added_k is not None:
                c_key = attn.norm_added_k(c_key)
            query, key, value = (
                torch.cat(p, dim=1) for p in ((query, c_query), (key, c_key), (value, c_value))
            )
            key_mask = _key_mask(
                (image_mask, hidden_states.shape[1], hidden_states),
                (text_mask, encoder_hidden_states.shape[1], encoder_hidden_states),
            )
        out = (
            packed_attention(query, key, value, key_mask, self._attention_backend, self.attention_path)
            .flatten(2)
            .to(query.dtype)
        )
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        out, context = out[:, : hidden_states.shape[1]], out[:, hidden_states.shape[1] :]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](out)), context


class PackedQwenAttnProcessor(_PackedProcessor):
    """QwenDoubleStreamAttnProcessor2_0 with per-sample MSRoPE and the image padding mask ([text, image] order)."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        encoder_hidden_states_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
        image_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Joint text-image attention of one block: (image output, text output)."""
        if encoder_hidden_states is None:
            raise ValueError("PackedQwenAttnProcessor needs encoder_hidden_states (the text stream)")
        head_dim = attn.inner_dim // attn.heads
        img = [p(hidden_states).unflatten(-1, (-1, head_dim)) for p in (attn.to_q, attn.to_k, attn.to_v)]
        txt = [
            p(encoder_hidden_states).unflatten(-1, (-1, head_dim))
            for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        ]
        for stream, norm_q, norm_k in (
            (img, attn.norm_q, attn.norm_k),
            (txt, attn.norm_added_q, attn.norm_added_k),
        ):
            if norm_q is not None:
                stream[0] = norm_q(stream[0])
            if norm_k is not None:
                stream[1] = norm_k(stream[1])
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img[:2] = [rotate_complex(t, img_freqs) for t in img[:2]]
            txt[:2] = [rotate_complex(t, txt_freqs) for t in txt[:2]]
        query, key, value = (torch.cat([t, i], dim=1) for t, i in zip(txt, img))
        key_mask = _key_mask(
            (encoder_hidden_states_mask, encoder_hidden_states.shape[1], encoder_hidden_states),
            (image_mask, hidden_states.shape[1], hidden_states),
        )
        out = (
            packed_attention(query, key, value, key_mask, self._attention_backend, self.attention_path)
            .flatten(2, 3)
            .to(query.dtype)
        )
        seq_txt = encoder_hidden_states.shape[1]
        img_out = attn.to_out[0](out[:, seq_txt:].contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        return img_out, attn.to_add_out(out[:, :seq_txt].contiguous())


class PackedFluxAttnProcessor(_PackedProcessor):
    """FluxAttnProcessor with per-sample RoPE and the combined text + image padding mask ([text, image] order)."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
        image_mask: Tensor | None = None,
        text_mask: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Double-stream (text, image given apart) or single-stream (already [text, image]) attention."""
        query, key, value = (
            p(hidden_states).unflatten(-1, (-1, attn.head_dim)) for p in (attn.to_q, attn.to_k, attn.to_v)
        )
        query, key = attn.norm_q(query), attn.norm_k(key)
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            c_query, c_key, c_value = (
                p(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
                for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            )
            c_query, c_key = attn.norm_added_q(c_query), attn.norm_added_k(c_key)
            query, key, value = (
                torch.cat(p, dim=1) for p in ((c_query, query), (c_key, key), (c_value, value))
            )
        if text_mask is not None:
            n_text = text_mask.shape[1]
        else:
            n_text = query.shape[1] - (image_mask.shape[1] if image_mask is not None else query.shape[1])
        n_image = query.shape[1] - n_text
        key_mask = _key_mask((text_mask, n_text, hidden_states), (image_mask, n_image, hidden_states))
        if image_rotary_emb is not None:
            query, key = (rotate_real(t, *image_rotary_emb) for t in (query, key))
        out = (
            packed_attention(query, key, value, key_mask, self._attention_backend, self.attention_path)
            .flatten(2, 3)
            .to(query.dtype)
        )
        if not joint:
            return out
        context, out = out.split_with_sizes([encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(context.contiguous())


# --- the backends ---------------------------------------------------------------------------------------


class PackedDiT(nn.Module):
    """SELF over a diffusers DiT: embed each image, pack and pad per sample, run the stock blocks, unpatchify targets.

    Subclasses set `model_class`, `target_first` and the processor, and implement `_embed` (one sample's images,
    in sequence order, to [L_i, D] tokens), `_denoise` (padded tokens to [B, L, D_out]) and `_unpatchify`.
    `attention_path` ("mask" | "flex" | "auto", stored on the processors; see `packed_attention`): how attention
    leaves the padding out; "auto" is flex attention with a block mask on CUDA and SDPA with the mask on CPU.
    FlowEdit passes it through its backbone dict (`backbone: {family, config, attention_path: flex}`).
    """

    model_class: ClassVar[type[nn.Module]]
    target_first: ClassVar[bool]
    processor_class: ClassVar[type[_PackedProcessor]]
    patch_size: int = 2  # latent pixels per token side (the 2x2 patch of all three families)

    def __init__(self, model: nn.Module, attention_path: str = "auto") -> None:
        super().__init__()
        self.model = model
        self.latent_channels = self._latent_channels()
        self.last_padding_fraction = 0.0
        self.attention_path = attention_path
        model.set_attn_processor(self.processor_class(attention_path))
        self._memo_table: dict[tuple, Any] = {}
        self._condition_cache: list[tuple[str, Tensor, Any]] | None = None  # inside `reuse_condition()`

    @contextlib.contextmanager
    def reuse_condition(self) -> Iterator[None]:
        """Within: the text conditioning's device/dtype copy and its input projection are computed once per
        conditioning tensor (no-grad calls only), not on every call; a sampler's steps all share them. Leave the
        block before the weights change."""
        self._condition_cache = []
        try:
            yield
        finally:
            self._condition_cache = None

    def _reused(self, tag: str, key: Tensor, build: Callable[[], Any]) -> Any:
        """`build()`, kept for the tensor `key` (by identity) inside `reuse_condition()` under no grad."""
        cache = self._condition_cache
        if cache is None or torch.is_grad_enabled():
            return build()
        for name, tensor, value in cache:
            if name == tag and tensor is key:
                return value
        value = build()
        cache.append((tag, key, value))
        return value

    def _memo(self, key: tuple, build: Callable[[], Any]) -> Any:
        """`build()` for `key`, kept for the last few keys: the layout (packing, RoPE) of a batch is the same on
        every one of a sampler's 2 x steps calls, and rebuilding it costs ~10% of a tiny model's step."""
        key = (*key, torch.is_inference_mode_enabled())  # inference tensors cannot be saved for backward
        if key not in self._memo_table:
            if len(self._memo_table) >= 8:
                self._memo_table.pop(next(iter(self._memo_table)))
            self._memo_table[key] = build()
        return self._memo_table[key]

    @classmethod
    def from_spec(
        cls,
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        subfolder: str | None = None,
        **options: Any,
    ) -> Self:
        """Build from `pretrained` (hub id or dir; `subfolder`, e.g. "transformer") or a random-init `config` dict."""
        if subfolder is not None and pretrained is None:
            raise ValueError(f"{cls.__name__}: `subfolder` needs `pretrained`")
        load = {"subfolder": subfolder} if subfolder is not None else {}
        return cls(build_backbone(cls.model_class, pretrained, config, **load), **options)

    def forward(
        self,
        target: list[Tensor],
        refs: list[list[Tensor]],
        sigma: Tensor,
        text: TextConditioning,
        max_tokens: int | None = None,
    ) -> list[Tensor]:
        """Velocity [C, h_i, w_i] for each noisy target [C, h_i, w_i] given its clean refs, sigma [B] and the text.

        Every sample's packed image sequence is padded to `max_tokens` (ValueError naming the sample that does not
        fit) or to the batch's longest when None.
        """
        batch = len(target)
        if (
            batch == 0
            or len(refs) != batch
            or text.hidden.shape[0] != batch
            or text.mask.shape != text.hidden.shape[:2]
        ):
            raise ValueError(
                f"{batch} targets, {len(refs)} reference lists, text hidden {tuple(text.hidden.shape)} and mask "
                f"{tuple(text.mask.shape)}: need B >= 1 targets, B reference lists, hidden [B, T, D], mask [B, T]"
            )
        # from a parameter: diffusers' ModelMixin.device/.dtype walk every module (13% of a tiny sampling step)
        weight = next(self.model.parameters())
        device, dtype = weight.device, weight.dtype
        sigma = torch.as_tensor(sigma, device=device, dtype=torch.float32).reshape(-1).expand(batch)
        text = self._reused("text", text.hidden, lambda: self._on_device(text, device, dtype))
        images = [[t, *r] if self.target_first else [*r, t] for t, r in zip(target, refs)]
        grids = [[self._grid(x, i) for x in sample] for i, sample in enumerate(images)]
        packing = self._memo(
            ("packing", layout_key(grids), max_tokens, device),
            lambda: plan_packing(grids, self.target_first, max_tokens, device),
        )
        self.last_padding_fraction = packing.padding_fraction
        tokens = [self._embed([x.to(device, dtype) for x in sample]) for sample in images]
        hidden = pad_sequence(tokens, batch_first=True)
        hidden = F.pad(hidden, (0, 0, 0, packing.length - hidden.shape[1]))
        out = self._denoise(hidden, packing, sigma, text)
        velocities = []
        for i, grid in enumerate(grids):
            start, end = packing.target_span(i)
            velocities.append(self._unpatchify(out[i, start:end], *grid[packing.target_slot]))
        return velocities

    @staticmethod
    def _on_device(text: TextConditioning, device: torch.device, dtype: torch.dtype) -> TextConditioning:
        """The conditioning on the model's device and dtype; a mask of all True becomes None."""
        mask = text.mask.to(device).bool()
        return TextConditioning(
            text.hidden.to(device, dtype),
            None if bool(mask.all()) else mask,  # one check per call, not per attention layer
            None if text.pooled is None else text.pooled.to(device, dtype),
        )

    def _grid(self, latent: Tensor, sample: int) -> tuple[int, int]:
        """The (h, w) token grid of one [C, H, W] latent, checked against the model's channels and patch."""
        p = self.patch_size
        if (
            latent.ndim != 3
            or latent.shape[0] != self.latent_channels
            or latent.shape[1] % p
            or latent.shape[2] % p
        ):
            raise ValueError(
                f"sample {sample}: latent of shape {tuple(latent.shape)}; {type(self).__name__} needs "
                f"[{self.latent_channels}, H, W] with H and W multiples of {p}"
            )
        return latent.shape[1] // p, latent.shape[2] // p

    def rotary(self, packing: Packing, text_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The rotary embedding of a layout (the family's `_rotary`), memoised: (image, text) freqs or (cos, sin)."""
        key = ("rotary", packing.layout, packing.length, text_len, device)
        return self._memo(key, lambda: self._rotary(packing, text_len, device))

    def _rotary(self, packing: Packing, text_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no rotary embedding")

    def _run_block(self, block: nn.Module, *args: Any) -> Any:
        """One stock block, through the model's gradient checkpointing when it is enabled."""
        if torch.is_grad_enabled() and getattr(self.model, "gradient_checkpointing", False):
            return self.model._gradient_checkpointing_func(block, *args)
        return block(*args)

    def _latent_channels(self) -> int:
        raise NotImplementedError

    def _embed(self, images: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def _denoise(self, hidden: Tensor, packing: Packing, sigma: Tensor, text: TextConditioning) -> Tensor:
        raise NotImplementedError

    def _unpatchify(self, tokens: Tensor, h: int, w: int) -> Tensor:
        raise NotImplementedError


class SD3Kontext(PackedDiT):
    """UniPic2-SD3.5M-Kontext packing over `SD3Transformer2DModel`: [ref_1 .. ref_N, target], shared PatchEmbed."""

    model_class = SD3Transformer2DModel
    target_first = False
    processor_class = PackedJointAttnProcessor

    def _latent_channels(self) -> int:
        cfg = self.model.config
        if cfg.patch_size != self.patch_size or self.model.out_channels != cfg.in_channels:
            raise ValueError(
                f"SD3Kontext needs patch_size 2 and out_channels == in_channels, got {dict(cfg)}"
            )
        return cfg.in_channels

    def _embed(self, images: list[Tensor]) -> Tensor:
        # PatchEmbed crops its sin-cos table to each image's own h x w: per-image 2-D positions, no offset.
        return torch.cat([self.model.pos_embed(x[None])[0] for x in images])

    def _denoise(self, hidden: Tensor, packing: Packing, sigma: Tensor, text: TextConditioning) -> Tensor:
        if text.pooled is None:
            raise ValueError(
                "SD3Kontext needs text.pooled (the pooled CLIP embedding, [B, pooled_projection_dim])"
            )
        m = self.model
        # SD3 timesteps are sigma·1000, kept in fp32 as the pipeline passes them.
        temb = m.time_text_embed(sigma * 1000, text.pooled)
        context = self._reused("context", text.hidden, lambda: m.context_embedder(text.hidden))
        masks = {"image_mask": packing.key_mask, "text_mask": text.mask}
        for block in m.transformer_blocks:
            context, hidden = self._run_block(block, hidden, context, temb, masks)
        return m.proj_out(m.norm_out(hidden, temb))

    def _unpatchify(self, tokens: Tensor, h: int, w: int) -> Tensor:
        p = self.patch_size
        x = torch.einsum("hwpqc->chpwq", tokens.reshape(h, w, p, p, -1))  # SD3's own unpatchify layout
        return x.reshape(-1, h * p, w * p)


class _PackedLatentsDiT(PackedDiT):
    """Shared by Qwen-Image and Flux: 2x2-packed latents (`_pack_latents` layout) through a linear embedder."""

    target_first = True

    def _latent_channels(self) -> int:
        cin, cout = self._embedder().in_features, self.model.proj_out.out_features
        if cin % 4 or cin != cout:
            raise ValueError(
                f"{type(self).__name__}: image embedder takes {cin}, proj_out gives {cout}: need 4C both"
            )
        return cin // 4

    def _embedder(self) -> nn.Linear:
        raise NotImplementedError

    def _embed(self, images: list[Tensor]) -> Tensor:
        return self._embedder()(torch.cat([patchify_2x2(x) for x in images]))

    def _unpatchify(self, tokens: Tensor, h: int, w: int) -> Tensor:
        return unpatchify_2x2(tokens, h, w)


class QwenImageEdit(_PackedLatentsDiT):
    """Qwen-Image-Edit-Plus packing over `QwenImageTransformer2DModel`: [target | refs], per-sample MSRoPE."""

    model_class = QwenImageTransformer2DModel
    processor_class = PackedQwenAttnProcessor

    def __init__(self, model: QwenImageTransformer2DModel, attention_path: str = "auto") -> None:
        if getattr(model.config, "use_layer3d_rope", False) or getattr(
            model.config, "use_additional_t_cond", False
        ):
            raise ValueError(
                "QwenImageEdit packs the edit models; Qwen-Image-Layered's layer3d/t-cond are not supported"
            )
        super().__init__(model, attention_path)

    def _embedder(self) -> nn.Linear:
        return self.model.img_in

    def _rotary(self, packing: Packing, text_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Per-sample MSRoPE: image freqs [B, L, D/2] (ones at padding) and text freqs [B, T, D/2].

        `QwenEmbedRope.forward` reads only the first sample's `img_shapes`, so it is called once per sample with
        that sample's [(1, h, w), ...] (frame index = image index, centred h/w, text after max(h/2, w/2)).
        """
        half = sum(self.model.pos_embed.axes_dim) // 2
        image = torch.ones(len(packing.grids), packing.length, half, dtype=torch.complex64, device=device)
        texts = []
        for i, grid in enumerate(packing.grids):
            shapes = [(1, h, w) for h, w in grid]
            image_freqs, text_freqs = self.model.pos_embed([shapes], device=device, max_txt_seq_len=text_len)
            image[i, : len(image_freqs)] = image_freqs
            texts.append(text_freqs)
        return image, torch.stack(texts)

    def _denoise(self, hidden: Tensor, packing: Packing, sigma: Tensor, text: TextConditioning) -> Tensor:
        m = self.model
        timestep, modulate_index = sigma.to(hidden.dtype), None  # Timesteps(scale=1000) inside: sigma in
        if (
            m.zero_cond_t
        ):  # 2511: reference tokens modulated at t = 0 (stock: cat([t, 0·t]) + per-token index)
            timestep = torch.cat([timestep, timestep * 0])
            modulate_index = (~packing.target_mask).int()
        context = self._reused("context", text.hidden, lambda: m.txt_in(m.txt_norm(text.hidden)))
        temb = m.time_text_embed(timestep, hidden)
        rotary = self.rotary(packing, text.hidden.shape[1], hidden.device)
        masks = {"image_mask": packing.key_mask}
        for block in m.transformer_blocks:
            context, hidden = self._run_block(
                block, hidden, context, text.mask, temb, rotary, masks, modulate_index
            )
        if m.zero_cond_t:
            temb = temb.chunk(2, dim=0)[0]
        return m.proj_out(m.norm_out(hidden, temb))


class FluxKontext(_PackedLatentsDiT):
    """FLUX.1 Kontext packing over `FluxTransformer2DModel`: [target | refs], ids (k, row, col), per-sample RoPE.

    `guidance` is the distilled guidance scale (FLUX.1 dev/Kontext, `guidance_embeds: true`); None for models
    without a guidance embedder. Flux's time embedding needs `text.pooled` (the CLIP pooled vector).
    """

    model_class = FluxTransformer2DModel
    processor_class = PackedFluxAttnProcessor

    def __init__(
        self, model: FluxTransformer2DModel, guidance: float | None = None, attention_path: str = "auto"
    ) -> None:
        if bool(model.config.guidance_embeds) != (guidance is not None):
            raise ValueError(
                f"FluxKontext: guidance={guidance} but the model has guidance_embeds={model.config.guidance_embeds}; "
                "a guidance-distilled model (dev/Kontext) needs a guidance scale, other models none"
            )
        super().__init__(model, attention_path)
        self.guidance = guidance

    def _embedder(self) -> nn.Linear:
        return self.model.x_embedder

    def _rotary(self, packing: Packing, text_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Per-sample RoPE cos/sin [B, T + L, D] for ids [text: (0, 0, 0)] + [image k: (k, row, col)], zeros at padding."""
        ids = torch.zeros(len(packing.grids), text_len + packing.length, 3, device=device)
        for i, grid in enumerate(packing.grids):
            start = text_len
            for k, (h, w) in enumerate(grid):
                rows, cols = torch.meshgrid(
                    torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
                )
                ids[i, start : start + h * w] = torch.stack(
                    [torch.full_like(rows, k), rows, cols], -1
                ).reshape(-1, 3)
                start += h * w
        cos, sin = self.model.pos_embed(ids.flatten(0, 1))  # row-wise: one call covers every sample
        return cos.view(*ids.shape[:2], -1), sin.view(*ids.shape[:2], -1)

    def _denoise(self, hidden: Tensor, packing: Packing, sigma: Tensor, text: TextConditioning) -> Tensor:
        if text.pooled is None:
            raise ValueError(
                "FluxKontext needs text.pooled (the pooled CLIP embedding, [B, pooled_projection_dim])"
            )
        m = self.model
        timestep = sigma.to(hidden.dtype) * 1000  # the stock forward's scaling
        if self.guidance is None:
            temb = m.time_text_embed(timestep, text.pooled)
        else:
            temb = m.time_text_embed(timestep, torch.full_like(timestep, self.guidance) * 1000, text.pooled)
        context = self._reused("context", text.hidden, lambda: m.context_embedder(text.hidden))
        rotary = self.rotary(packing, text.hidden.shape[1], hidden.device)
        masks = {"image_mask": packing.key_mask, "text_mask": text.mask}
        for block in [*m.transformer_blocks, *m.single_transformer_blocks]:
            context, hidden = self._run_block(block, hidden, context, temb, rotary, masks)
        return m.proj_out(m.norm_out(hidden, temb))
