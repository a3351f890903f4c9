"""`omnilab bench gpu`: the packed DiTs at their released width and depth on one GPU (random bf16 weights).

One prepared script, under 8 minutes on one H100; it refuses to run without CUDA. Two tables:

1. Per DiT family (SD3.5-Medium, Qwen-Image-Edit-2511, FLUX.1-Kontext-dev, their released transformer configs):
   one training step of the DiT alone (forward + backward through the suite's packed backend, activation
   checkpointing per block, no optimizer: AdamW states of a 20B model do not fit one GPU) on one UniPic-3
   sample: a 1024² target and references under a joint 1024² budget (4096 + 4096 image tokens) and 256 text
   tokens. Step time, peak memory, tokens/s, and MFU = model FLOPs / (step time x the GPU's dense bf16 peak),
   the model FLOPs counted by torch's FlopCounterMode on the same shapes without recomputation (so MFU leaves
   the checkpointing's extra forward out, as is usual). A model whose weights and gradients do not fit is
   measured at the depth that fits and the row says so (step time and tokens/s extrapolated to full depth;
   MFU is depth-independent to first order).
2. Attention paths on a packed multi-reference batch (Qwen-Image width, 4 blocks; 4 samples with 1, 2, 4 and 6
   references under one 1024² budget and 1024² targets, padded to SELF's fixed length): the mask path (SDPA
   with a boolean mask), the flex path (torch.compile of flex_attention with the padding block mask; compile
   time reported apart) and xformers' block-diagonal attention (when xformers imports), forward + backward,
   as ratios to the mask path.

Whoever has a GPU runs it (`make bench` skips it without CUDA) and the figures land in benchmarks/RESULTS.md
with the device. `rows_for_family` and `attention_rows` also run on CPU at tiny width (tests/benchmarks).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from benchmarks.common import record, table
from datamodules.budget import fit_to_budget
from lightning_modules.components.packed_dit import (
    FluxKontext,
    PackedDiT,
    QwenImageEdit,
    SD3Kontext,
    TextConditioning,
)

# dense bf16 peak (TFLOP/s, no sparsity) of the GPUs the suite is run on
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "B200": 2250.0}


@dataclass(frozen=True)
class FamilySpec:
    """A DiT family as released: its backend, transformer config, text width and pooled width."""

    name: str
    backend: type[PackedDiT]
    config: dict[str, Any]
    text_dim: int
    pooled_dim: int | None
    options: dict[str, Any] = field(default_factory=dict)
    depth_keys: tuple[str, ...] = ("num_layers",)


FAMILIES = [
    FamilySpec(  # stabilityai/stable-diffusion-3.5-medium transformer/config.json
        "SD3.5-Medium (2.5B)",
        SD3Kontext,
        {
            "sample_size": 128,
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 16,
            "num_layers": 24,
            "attention_head_dim": 64,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "caption_projection_dim": 1536,
            "pooled_projection_dim": 2048,
            "pos_embed_max_size": 384,
            "dual_attention_layers": list(range(13)),
            "qk_norm": "rms_norm",
        },
        4096,
        2048,
    ),
    FamilySpec(  # Qwen/Qwen-Image-Edit-2511 transformer/config.json
        "Qwen-Image-Edit-2511 (20B)",
        QwenImageEdit,
        {
            "patch_size": 2,
            "in_channels": 64,
            "out_channels": 16,
            "num_layers": 60,
            "attention_head_dim": 128,
            "num_attention_heads": 24,
            "joint_attention_dim": 3584,
            "axes_dims_rope": [16, 56, 56],
            "zero_cond_t": True,
        },
        3584,
        None,
    ),
    FamilySpec(  # black-forest-labs/FLUX.1-Kontext-dev transformer/config.json
        "FLUX.1-Kontext-dev (12B)",
        FluxKontext,
        {
            "patch_size": 1,
            "in_channels": 64,
            "num_layers": 19,
            "num_single_layers": 38,
            "attention_head_dim": 128,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "pooled_projection_dim": 768,
            "guidance_embeds": True,
            "axes_dims_rope": [16, 56, 56],
        },
        4096,
        768,
        {"guidance": 2.5},
        ("num_layers", "num_single_layers"),
    ),
]
TARGET = (128, 128)  # latent side of a 1024² target (VAE /8)
REF_SIZES = [(1024, 768), (640, 896)]  # two references, resized under one joint 1024² budget
TEXT_TOKENS = 256


# --- inputs -----------------------------------------------------------------------------------------------


def latent(
    channels: int, h: int, w: int, device: torch.device, dtype: torch.dtype, gen: torch.Generator
) -> Tensor:
    """A random [C, h, w] latent (sides floored to the 2x2 patch, at least one patch)."""
    h, w = (max(2, side // 2 * 2) for side in (h, w))
    return torch.randn(channels, h, w, device=device, dtype=dtype, generator=gen)


def sample_inputs(
    spec: FamilySpec, channels: int, device: torch.device, dtype: torch.dtype, scale: int = 1
) -> tuple[list[Tensor], list[list[Tensor]], Tensor, TextConditioning]:
    """One UniPic-3 sample (target + references under a joint budget), all sides divided by `scale`."""
    gen = torch.Generator(device=device).manual_seed(0)
    th, tw = (s // scale for s in TARGET)
    refs = [
        latent(channels, h // 8 // scale, w // 8 // scale, device, dtype, gen)
        for w, h in fit_to_budget(REF_SIZES, 1024, multiple=32, min_side=128)
    ]
    text_tokens = max(8, TEXT_TOKENS // scale)
    text = TextConditioning(
        torch.randn(1, text_tokens, spec.text_dim, device=device, dtype=dtype, generator=gen),
        torch.ones(1, text_tokens, dtype=torch.bool, device=device),
        None if spec.pooled_dim is None else torch.randn(1, spec.pooled_dim, device=device, dtype=dtype),
    )
    return [latent(channels, th, tw, device, dtype, gen)], [refs], torch.tensor([0.7], device=device), text


def tokens_of(targets: list[Tensor], refs: list[list[Tensor]], text: TextConditioning) -> int:
    """Image tokens (2x2 latent patches) plus text tokens of a batch."""
    image = sum(x.shape[-2] * x.shape[-1] // 4 for x in [*targets, *(r for rs in refs for r in rs)])
    return image + text.hidden.shape[0] * text.hidden.shape[1]


# --- building ---------------------------------------------------------------------------------------------


def build(
    spec: FamilySpec, depth: dict[str, int], device: torch.device, dtype: torch.dtype, **options: Any
) -> PackedDiT:
    """The family's backend with random weights in `dtype` on `device`, at the given block counts."""
    config = {**spec.config, **depth}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = spec.backend.model_class.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    return spec.backend(model, **{**spec.options, **options})


def count_params(spec: FamilySpec, depth: dict[str, int]) -> int:
    """Parameters of the family's transformer at the given depth (built on the meta device)."""
    with torch.device("meta"):
        model = spec.backend.model_class.from_config({**spec.config, **depth})
    return sum(p.numel() for p in model.parameters())


def fitting_depth(spec: FamilySpec, free_bytes: int, bytes_per_param: int = 4) -> dict[str, int]:
    """The block counts whose bf16 weights + gradients fit in 85% of `free_bytes` (the full depth if it fits).

    Parameters are linear in the block counts: counted at one block (and two of each kind), then solved.
    """
    full = {k: spec.config[k] for k in spec.depth_keys}
    ones = dict.fromkeys(spec.depth_keys, 1)
    one = count_params(spec, ones)
    per_block = {k: count_params(spec, {**ones, k: 2}) - one for k in spec.depth_keys}
    base = one - sum(per_block.values())
    budget = 0.85 * free_bytes / bytes_per_param - base
    fraction = min(1.0, budget / sum(per_block[k] * full[k] for k in full))
    return {k: max(1, int(full[k] * fraction)) for k in full}


# --- measuring --------------------------------------------------------------------------------------------


def train_step(backend: PackedDiT, inputs: tuple[Any, ...], max_tokens: int | None = None) -> None:
    """Forward + backward of one batch (loss = mean square of the velocities)."""
    targets, refs, sigma, text = inputs
    out = backend(targets, refs, sigma, text, max_tokens=max_tokens)
    loss = sum(v.float().square().mean() for v in out)
    loss.backward()


def model_flops(
    spec: FamilySpec,
    depth: dict[str, int],
    inputs: Callable[[], tuple[Any, ...]],
    device: torch.device,
    dtype: torch.dtype,
) -> float:
    """FLOPs of one train step at `depth`: counted at 1 block (per key) and extrapolated linearly, no recompute."""
    from torch.utils.flop_counter import FlopCounterMode

    def count(d: dict[str, int]) -> float:
        backend = build(spec, d, device, dtype, attention_path="mask")
        with FlopCounterMode(display=False) as counter:
            train_step(backend, inputs())
        del backend
        return float(counter.get_total_flops())

    ones = dict.fromkeys(spec.depth_keys, 1)
    base = count(ones)
    total = base
    for key in spec.depth_keys:
        per_block = count({**ones, key: 2}) - base
        total += per_block * (depth[key] - 1)
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device, warmup: int, steps: int) -> tuple[float, float]:
    """(median seconds per call, peak memory in GB) after `warmup` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
    return sorted(times)[len(times) // 2], peak


def rows_for_family(
    spec: FamilySpec,
    device: torch.device,
    dtype: torch.dtype,
    peak_tflops: float,
    warmup: int = 2,
    steps: int = 5,
    scale: int = 1,
    free_bytes: int | None = None,
) -> dict[str, Any]:
    """One table row: the family's train step at the depth that fits (full when it does)."""
    full = {k: spec.config[k] for k in spec.depth_keys}
    depth = full if free_bytes is None else fitting_depth(spec, free_bytes)
    channels = (
        spec.config["in_channels"] // 4 if spec.backend is not SD3Kontext else spec.config["in_channels"]
    )
    inputs = lambda: sample_inputs(spec, channels, device, dtype, scale)  # noqa: E731
    flops = model_flops(spec, depth, inputs, device, dtype)
    backend = build(spec, depth, device, dtype, attention_path="auto")
    backend.model.enable_gradient_checkpointing()
    batch = inputs()
    seconds, peak = timed(lambda: train_step(backend, batch), device, warmup, steps)
    stretch = sum(full.values()) / sum(depth.values())
    tokens = tokens_of(batch[0], batch[1], batch[3])
    return {
        "family": spec.name,
        "depth": "/".join(f"{depth[k]}" for k in spec.depth_keys)
        + ("" if depth == full else f" of {'/'.join(str(full[k]) for k in spec.depth_keys)}"),
        "tokens": tokens,
        "step ms (full depth)": seconds * stretch * 1e3,
        "peak GB": peak,
        "tokens/s": tokens / (seconds * stretch),
        "TFLOP/s": flops / seconds / 1e12,
        "MFU %": 100 * flops / seconds / (peak_tflops * 1e12),
    }


def packed_batch(
    spec: FamilySpec, device: torch.device, dtype: torch.dtype, scale: int = 1
) -> tuple[tuple[Any, ...], int]:
    """4 samples with 1, 2, 4 and 6 references under one 1024² joint budget and 1024² targets; SELF's length."""
    gen = torch.Generator(device=device).manual_seed(1)
    channels = spec.config["in_channels"] // 4
    shapes = [(1024, 768), (768, 1024), (1024, 1024), (512, 896), (896, 640), (1024, 576)]
    refs, targets = [], []
    for n in (1, 2, 4, 6):
        sizes = fit_to_budget(shapes[:n], 1024, multiple=32, min_side=128)
        refs.append(
            [latent(channels, h // 8 // scale, w // 8 // scale, device, dtype, gen) for w, h in sizes]
        )
        targets.append(latent(channels, TARGET[0] // scale, TARGET[1] // scale, device, dtype, gen))
    text_tokens = max(8, TEXT_TOKENS // scale)
    lengths = torch.tensor([text_tokens, text_tokens // 2, text_tokens, text_tokens // 3], device=device)
    text = TextConditioning(
        torch.randn(4, text_tokens, spec.text_dim, device=device, dtype=dtype, generator=gen),
        torch.arange(text_tokens, device=device)[None] < lengths[:, None],
        None,
    )
    max_tokens = (1024 // 16 // scale) ** 2 + (TARGET[0] // 2 // scale) * (TARGET[1] // 2 // scale)
    return (targets, refs, torch.tensor([0.3, 0.5, 0.7, 0.9], device=device), text), max_tokens


def attention_rows(
    device: torch.device,
    dtype: torch.dtype,
    paths: dict[str, dict[str, Any]],
    blocks: int = 4,
    warmup: int = 2,
    steps: int = 5,
    scale: int = 1,
    width: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Forward + backward of `blocks` Qwen-Image blocks on the packed batch under each attention path."""
    spec = FAMILIES[1]
    if width is not None:
        spec = FamilySpec(
            spec.name, spec.backend, {**spec.config, **width}, width["joint_attention_dim"], None
        )
    inputs, max_tokens = packed_batch(spec, device, dtype, scale)
    rows, base = [], None
    for name, options in paths.items():
        backend = build(spec, {"num_layers": blocks}, device, dtype, attention_path=options["path"])
        for processor in backend.model.attn_processors.values():
            processor._attention_backend = options.get("backend")
        start = time.perf_counter()
        train_step(backend, inputs, max_tokens)  # first call: compiles the flex kernel
        _sync(device)
        first = time.perf_counter() - start
        seconds, peak = timed(lambda b=backend: train_step(b, inputs, max_tokens), device, warmup, steps)
        base = base or seconds
        rows.append(
            {
                "attention": name,
                "padding %": 100 * backend.last_padding_fraction,
                "fwd+bwd ms": seconds * 1e3,
                "vs mask": seconds / base,
                "peak GB": peak,
                "first call s": first,
            }
        )
        del backend
    return rows


def main(argv: list[str] | None = None) -> None:
    """Measure both tables on this GPU and record them in RESULTS.md (refuses without CUDA)."""
    parser = argparse.ArgumentParser(prog="omnilab bench gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: from its name)"
    )
    args, _ = parser.parse_known_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(
            "omnilab bench gpu needs a CUDA GPU (it measures the released DiTs at full size); none here"
        )
    device, dtype = torch.device("cuda"), torch.bfloat16
    name = torch.cuda.get_device_name(device)
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    if peak is None:
        raise SystemExit(f"no bf16 peak known for {name!r}: pass --peak-tflops")
    torch.backends.cuda.matmul.allow_tf32 = True
    families = []
    for spec in FAMILIES:
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(device)
        families.append(
            rows_for_family(spec, device, dtype, peak, steps=args.steps, free_bytes=free - 12 * 2**30)
        )
        print(families[-1], flush=True)
    paths = {"mask (SDPA + bool mask)": {"path": "mask"}, "flex (compiled, block mask)": {"path": "flex"}}
    with contextlib.suppress(Exception):
        import xformers.ops  # noqa: F401

        paths["xformers (block-diagonal varlen)"] = {"path": "mask", "backend": "xformers"}
    attention = attention_rows(device, dtype, paths, steps=args.steps)
    print(attention, flush=True)
    notes = (
        "Table 1: one DiT train step (forward + backward, activation checkpointing per block, no optimizer) on one "
        "sample: a 1024² target and two references under one 1024² budget, 256 text tokens, random bf16 weights of "
        "the released transformer configs. MFU = FlopCounterMode's model FLOPs (no recompute) / (step time x "
        f"{peak} TFLOP/s dense bf16). Rows with 'of' ran at the depth whose weights + gradients fit; their step "
        "time and tokens/s are scaled to full depth. Goals (issue 11): SD3.5-M >= 35% MFU, Qwen-Image >= 45%.\n\n"
        "Table 2: 4 Qwen-Image blocks at full width on a packed batch of 4 samples with 1/2/4/6 references "
        "padded to SELF's fixed length; 'vs mask' is the time ratio to the mask path; 'first call s' includes "
        "torch.compile for the flex path.\n\n" + table(attention)
    )
    record("gpu", f"Packed DiTs at full size on {name}", families, notes)
