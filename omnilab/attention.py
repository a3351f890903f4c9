"""One attention switch for every model of the suite: `sdpa` (default), `xformers` (CUDA), or `auto`.

docs/architecture.md: asking for xformers where it cannot run is a clear error; `auto` uses
xformers when it runs here and falls back to SDPA; the run logs the backend actually used.
diffusers models switch through `set_attention_backend`; transformers models through
`set_attn_implementation`, with xformers registered as a transformers attention function below.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

BACKENDS = ("sdpa", "xformers", "auto")
XFORMERS_HINT = "install the CUDA extra: `make install CUDA=1` (xformers 0.0.35 needs torch 2.10)"


@functools.cache
def xformers_problem() -> str | None:
    """Why xformers cannot run here (None when it can): not installed, no CUDA, or its kernels fail."""
    try:
        import xformers.ops as xops
    except Exception as err:  # ImportError, or a torch ABI mismatch raising at import
        return f"xformers does not import ({type(err).__name__}: {err}); {XFORMERS_HINT}"
    if not torch.cuda.is_available():
        return "xformers has no CPU kernels and CUDA is not available"
    try:
        q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.float16)
        xops.memory_efficient_attention(q, q, q)
    except Exception as err:
        return f"xformers kernels fail on this torch/CUDA ({type(err).__name__}: {err}); {XFORMERS_HINT}"
    return None


def resolve_attention(requested: str) -> str:
    """The backend to use for `requested` (sdpa | xformers | auto); raises if xformers cannot run."""
    if requested not in BACKENDS:
        raise ValueError(f"attention={requested!r}: choose one of {', '.join(BACKENDS)}")
    if requested == "sdpa":
        return "sdpa"
    problem = xformers_problem()
    if problem is None:
        return "xformers"
    if requested == "auto":
        return "sdpa"
    raise RuntimeError(f"attention=xformers cannot run here: {problem}. Use attention=sdpa or auto.")


def xformers_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function over xformers: [B, H, L, D] in, [B, L, H, D] out (as SDPA's)."""
    import xformers.ops as xops

    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # -> [B, L, H, D]
    if key.shape[1] != query.shape[1]:  # grouped-query attention: repeat kv heads
        rep = query.shape[1] // key.shape[1]
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    bias: Any = None
    if attention_mask is not None:
        mask = attention_mask
        if mask.dtype == torch.bool:
            mask = torch.zeros_like(mask, dtype=q.dtype).masked_fill(~mask, float("-inf"))
        b, h, lq, lk = q.shape[0], q.shape[2], q.shape[1], k.shape[1]
        padded = -(-lk // 8) * 8  # xformers wants the bias rows 8-aligned
        storage = mask.new_zeros(b, h, lq, padded)
        storage[..., :lk] = mask[..., :lq, :lk].to(q.dtype).expand(b, h, lq, lk)
        bias = storage[..., :lk]
    elif is_causal if is_causal is not None else getattr(module, "is_causal", False):
        bias = xops.LowerTriangularMask()
    p = dropout if module.training else 0.0
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=p, scale=scaling)
    return out, None


def _register_transformers_xformers() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register("xformers", xformers_attention_forward)


def apply_attention(model: nn.Module, requested: str = "sdpa") -> str:
    """Switch every diffusers and transformers model inside `model` to the backend; return the one used."""
    backend = resolve_attention(requested)
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    if backend == "xformers":
        _register_transformers_xformers()
    for sub in model.modules():
        if isinstance(sub, ModelMixin):
            sub.set_attention_backend("native" if backend == "sdpa" else "xformers")
        elif isinstance(sub, PreTrainedModel):
            sub.set_attn_implementation(backend)
    return backend
