"""The VQ image tokenizer PURE uses: LlamaGen's VQ-8 (8x downsampling, 16,384 codes of dimension 8, L2-normalised).

PURE (arXiv 2503.11073, §3 and the released `pure/model/chameleon_vae_ori`) swaps Lumina-mGPT's Chameleon VQGAN
(16x, 8,192 codes) for LlamaGen's `vq_ds8_c2i.pt`: a VQGAN-style convolutional encoder/decoder (taming
transformers' layout: ResNet blocks with GroupNorm and swish, self-attention at the lowest resolution and in the
middle), `ch_mult = (1, 2, 2, 4)` so three stride-2 downsamplings, a 1x1 projection to the code dimension 8, and a
vector quantiser whose codebook and inputs are both L2-normalised before the nearest-neighbour search (the
distance is then 2 - 2 cos). A 512x512 image becomes 64x64 codes.

`LlamaGenVQModel` is a diffusers `ModelMixin`/`ConfigMixin`, so it saves and loads in the hub layout
(`config.json` + safetensors) and `build_backbone` builds it from `pretrained:` or `config:`; its parameter names
are LlamaGen's, so `convert_llamagen_checkpoint` turns the released `.pt` (loaded with `weights_only=True`) into
that layout by dropping only the usage buffer. Training losses (`quantizer_losses`) are the VQ-VAE codebook and
commitment terms LlamaGen uses; the LightningModule that trains the tokenizer is `lightning_modules/vq.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn


def swish(x: Tensor) -> Tensor:
    """x * sigmoid(x)."""
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv twice plus a (1x1 when the width changes) shortcut."""

    def __init__(self, cin: int, cout: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        """x + the residual branch."""
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (1x1 conv projections), residual."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """x + attention(x)."""
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))  # [B, HW, C]
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one pixel on the right and bottom."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        """Half the resolution."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Twice the resolution."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], attns: list[nn.Module], resample: nn.Module | None) -> nn.Module:
    """One resolution level, named as LlamaGen names it (`res`, `attn`, `downsample`/`upsample`)."""
    level = nn.Module()
    level.res, level.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
    if resample is not None:
        setattr(level, "downsample" if isinstance(resample, Downsample) else "upsample", resample)
    return level


class Encoder(nn.Module):
    """Image [B, 3, H, W] -> features [B, z, H / 2^(L-1), W / 2^(L-1)] for L = len(ch_mult) levels."""

    def __init__(
        self, ch: int, ch_mult: tuple[int, ...], blocks: int, z: int, groups: int, dropout: float, cin: int
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(cin, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        width = ch
        for i, mult in enumerate(ch_mult):
            last = i == len(ch_mult) - 1
            res, attn = [], []
            for _ in range(blocks):
                res.append(ResnetBlock(width, ch * mult, groups, dropout))
                width = ch * mult
                if last:
                    attn.append(AttnBlock(width, groups))
            self.conv_blocks.append(_level(res, attn, None if last else Downsample(width)))
        self.mid = nn.ModuleList(
            [
                ResnetBlock(width, width, groups, dropout),
                AttnBlock(width, groups),
                ResnetBlock(width, width, groups, dropout),
            ]
        )
        self.norm_out = nn.GroupNorm(groups, width, eps=1e-6)
        self.conv_out = nn.Conv2d(width, z, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Encode an image."""
        h = self.conv_in(x)
        for level in self.conv_blocks:
            for i, block in enumerate(level.res):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Features [B, z, h, w] -> image [B, 3, h * 2^(L-1), w * 2^(L-1)]; the mirror of `Encoder`."""

    def __init__(
        self, ch: int, ch_mult: tuple[int, ...], blocks: int, z: int, groups: int, dropout: float, cout: int
    ) -> None:
        super().__init__()
        width = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z, width, 3, padding=1)
        self.mid = nn.ModuleList(
            [
                ResnetBlock(width, width, groups, dropout),
                AttnBlock(width, groups),
                ResnetBlock(width, width, groups, dropout),
            ]
        )
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(len(ch_mult))):
            res, attn = [], []
            for _ in range(blocks + 1):
                res.append(ResnetBlock(width, ch * ch_mult[i], groups, dropout))
                width = ch * ch_mult[i]
                if i == len(ch_mult) - 1:
                    attn.append(AttnBlock(width, groups))
            self.conv_blocks.append(_level(res, attn, Upsample(width) if i != 0 else None))
        self.norm_out = nn.GroupNorm(groups, width, eps=1e-6)
        self.conv_out = nn.Conv2d(width, cout, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """Decode features."""
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            for i, block in enumerate(level.res):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class Quantized(NamedTuple):
    """A quantiser's output, each [B, D, h, w]: straight-through z_q, the chosen entries e, the (normalised) inputs z;
    and the indices [B, h, w]."""

    z_q: Tensor
    e: Tensor
    z: Tensor
    codes: Tensor


class VectorQuantizer(nn.Module):
    """Nearest codebook entry per position; with `l2_norm` both inputs and entries are unit vectors first."""

    def __init__(self, n_codes: int, dim: int, l2_norm: bool) -> None:
        super().__init__()
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(n_codes, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_codes, 1.0 / n_codes)
        if l2_norm:
            with torch.no_grad():
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))

    def codebook(self) -> Tensor:
        """The entries [N, D] the search uses (unit vectors with `l2_norm`)."""
        weight = self.embedding.weight
        return F.normalize(weight, dim=-1) if self.l2_norm else weight

    def forward(self, z: Tensor) -> Quantized:
        """Quantise features [B, D, h, w]."""
        z = z.permute(0, 2, 3, 1)  # [B, h, w, D]
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        book = self.codebook()
        flat = z.reshape(-1, z.shape[-1])
        # |z - e|^2 = |z|^2 + |e|^2 - 2 z.e; the |z|^2 term does not change the argmin
        dist = (book**2).sum(-1)[None] - 2 * flat @ book.t()
        codes = dist.argmin(-1).view(z.shape[:-1])
        e = book[codes]
        z_q = z + (e - z).detach()  # straight-through: the value of e, the gradient of z
        return Quantized(*(t.permute(0, 3, 1, 2) for t in (z_q, e, z)), codes)

    def lookup(self, codes: Tensor) -> Tensor:
        """Codes [B, h, w] -> entries [B, D, h, w]."""
        return self.codebook()[codes].permute(0, 3, 1, 2)


def quantizer_losses(e: Tensor, z: Tensor, beta: float = 0.25) -> tuple[Tensor, Tensor]:
    """(codebook, commitment) = (mean |e - sg(z)|^2, beta * mean |z - sg(e)|^2), as VQ-VAE and LlamaGen define them.

    `e` are the chosen codebook entries (gradient to the codebook), `z` the encoder outputs (gradient to the encoder).
    """
    return ((e - z.detach()) ** 2).mean(), beta * ((z - e.detach()) ** 2).mean()


class LlamaGenVQModel(ModelMixin, ConfigMixin):
    """LlamaGen's VQ tokenizer (VQ-8 by default: `ch_mult` (1, 2, 2, 4), 16,384 codes of dim 8, L2-normalised).

    `encode(images in [-1, 1]) -> codes [B, h, w]`, `decode_codes(codes) -> images in [-1, 1]`; the downsampling
    factor is 2^(len(ch_mult) - 1). The tiny configs shrink `ch`, `norm_groups`, `num_res_blocks` and the codebook.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        codebook_size: int = 16384,
        codebook_embed_dim: int = 8,
        codebook_l2_norm: bool = True,
        encoder_ch_mult: tuple[int, ...] = (1, 2, 2, 4),
        decoder_ch_mult: tuple[int, ...] = (1, 2, 2, 4),
        z_channels: int = 256,
        ch: int = 128,
        num_res_blocks: int = 2,
        norm_groups: int = 32,
        dropout_p: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        enc, dec = tuple(encoder_ch_mult), tuple(decoder_ch_mult)
        if len(enc) != len(dec):
            raise ValueError(f"encoder_ch_mult {enc} and decoder_ch_mult {dec} must have the same length")
        self.encoder = Encoder(ch, enc, num_res_blocks, z_channels, norm_groups, dropout_p, in_channels)
        self.decoder = Decoder(ch, dec, num_res_blocks, z_channels, norm_groups, dropout_p, in_channels)
        self.quantize = VectorQuantizer(codebook_size, codebook_embed_dim, codebook_l2_norm)
        self.quant_conv = nn.Conv2d(z_channels, codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(codebook_embed_dim, z_channels, 1)
        # No initial bias direction: with L2-normalised codes a bias that dominates the early encoder outputs maps
        # every position to one direction, one code, and a short run never leaves that collapse. (Released weights
        # overwrite this.)
        nn.init.zeros_(self.quant_conv.bias)

    @property
    def downsample(self) -> int:
        """Pixels per code along each side (8 for VQ-8)."""
        return 2 ** (len(self.config.encoder_ch_mult) - 1)

    def quantize_images(self, images: Tensor) -> Quantized:
        """Images [B, 3, H, W] in [-1, 1] (H, W multiples of `downsample`) -> the quantiser's output."""
        f = self.downsample
        if images.shape[-1] % f or images.shape[-2] % f:
            raise ValueError(
                f"image size {tuple(images.shape[-2:])} is not a multiple of the VQ's {f}x downsampling"
            )
        return self.quantize(self.quant_conv(self.encoder(images)))

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> codes [B, H/f, W/f] (int64)."""
        return self.quantize_images(images).codes

    def decode_latents(self, z_q: Tensor) -> Tensor:
        """Quantised latents [B, D, h, w] -> images [B, 3, h*f, w*f] (unclamped, about [-1, 1])."""
        return self.decoder(self.post_quant_conv(z_q))

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Codes [B, h, w] -> images [B, 3, h*f, w*f] clamped to [-1, 1]."""
        if int(codes.min()) < 0 or int(codes.max()) >= self.config.codebook_size:
            raise ValueError(
                f"codes must lie in [0, {self.config.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]"
            )
        return self.decode_latents(self.quantize.lookup(codes)).clamp(-1, 1)

    def forward(self, images: Tensor) -> tuple[Tensor, Quantized]:
        """Reconstruction [B, 3, H, W] and the quantiser's output (for the losses)."""
        q = self.quantize_images(images)
        return self.decode_latents(q.z_q), q


LLAMAGEN_VQ8 = dict(
    encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4)
)  # LlamaGen `VQ_8` (vq_model.py)
LLAMAGEN_DROPPED = ("quantize.codebook_used",)  # a usage ring buffer LlamaGen saves with the weights


def convert_llamagen_checkpoint(checkpoint: str | Path, out_dir: str | Path, **config: object) -> Path:
    """Write LlamaGen's released tokenizer (`vq_ds8_c2i.pt`) in the hub layout that `from_pretrained` reads.

    The `.pt` is read with `weights_only=True` (its `model` entry is a plain state dict); every weight must match
    a `LlamaGenVQModel(**LLAMAGEN_VQ8, **config)` parameter by name and shape, or a KeyError/ValueError says which.
    """
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(
            f"{checkpoint}: expected a state dict (or {{'model': state dict}}), got {type(state).__name__}"
        )
    state = {k: v for k, v in state.items() if k not in LLAMAGEN_DROPPED}
    model = LlamaGenVQModel(**{**LLAMAGEN_VQ8, **config})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(
            f"{checkpoint} does not match LlamaGenVQModel: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    out = Path(out_dir)
    model.save_pretrained(out)
    (out / "omnilab_source.json").write_text(json.dumps({"converted_from": str(checkpoint)}) + "\n")
    return out
