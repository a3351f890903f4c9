"""FSDP per transformer block vs the whole model as one unit: peak memory per process on 2 CPU processes (gloo).

A Qwen-Image-style packed DiT (the suite's `QwenImageEdit` backend, random fp32 weights, 8 blocks of width
512) trains 2 AdamW steps on each of 2 processes, wrapped by `omnilab.fsdp.BlockPolicy` (one unit per block)
or as one unit (the paper configs before this policy), with activation checkpointing per block in both. Each process reports its resident memory above the
memory it had before the model was built: after the steps (what stays: the sharded weights, gradients and
AdamW moments) and at the peak during the steps (Linux's high-water mark, reset after a warm-up step, so the
one-time full model built before sharding is not counted).

The goal (issue 11): per process at most 1/(number of processes) of the unsharded weights + gradients + AdamW
state, plus one block (its gathered weights and gradients). Allocations above 64 KiB go through mmap
(MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set and the high-water mark is the tensors' peak.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import record

CONFIG = {
    "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 8, "attention_head_dim": 64,
    "num_attention_heads": 8, "joint_attention_dim": 64, "axes_dims_rope": [16, 24, 24],
}  # fmt: skip
WORLD = 2


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def _trim() -> None:
    """Give freed heap memory back to the OS (glibc), so the resident set counts live tensors."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak() -> None:
    """Reset the high-water mark of the resident set to the current one (Linux clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def worker(rank: int, per_block: bool, port: int, out: str) -> None:
    """One process: build, wrap, 1 warm-up step, reset the peak, 2 measured steps; write its figures."""
    import torch.distributed as dist
    from diffusers import QwenImageTransformer2DModel
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    from lightning_modules.components.packed_dit import QwenImageEdit, TextConditioning
    from omnilab.fsdp import BlockPolicy

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    _trim()
    before = _status("VmRSS")
    torch.manual_seed(0)
    backend = QwenImageEdit(QwenImageTransformer2DModel.from_config(CONFIG), attention_path="mask")
    params = sum(p.numel() for p in backend.parameters())
    block = sum(p.numel() for p in backend.model.transformer_blocks[0].parameters())
    model = FullyShardedDataParallel(
        backend,
        auto_wrap_policy=BlockPolicy(["qwen_image"]) if per_block else None,
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        device_id=torch.device("cpu"),
        use_orig_params=True,
    )
    apply_activation_checkpointing(  # per block in both arms, as the paper configs run
        model,
        checkpoint_wrapper_fn=checkpoint_wrapper,
        auto_wrap_policy=BlockPolicy(["qwen_image"], trainable_only=True),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(rank)
    targets = [torch.randn(16, 32, 32, generator=gen)]
    refs = [[torch.randn(16, 32, 32, generator=gen)]]
    text = TextConditioning(
        torch.randn(1, 32, CONFIG["joint_attention_dim"], generator=gen), torch.ones(1, 32, dtype=torch.bool)
    )

    def step() -> None:
        out = model(targets, refs, torch.tensor([0.5]), text)
        sum(v.square().mean() for v in out).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # AdamW's moments exist from here on
    _trim()
    _reset_peak()
    for _ in range(2):
        step()
    peak = _status("VmHWM") - before
    _trim()
    kept = _status("VmRSS") - before
    Path(out).with_suffix(f".{rank}.json").write_text(
        json.dumps({"peak": peak, "kept": kept, "params": params, "block": block})
    )
    dist.destroy_process_group()


def run(per_block: bool, port: int) -> list[dict[str, Any]]:
    """Both processes of one arm (fresh processes); their figures."""
    import torch.multiprocessing as mp

    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # big tensors are mmapped: freed memory leaves the RSS
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "mem")
        mp.spawn(worker, args=(per_block, port, out), nprocs=WORLD, join=True)
        return [json.loads(Path(out).with_suffix(f".{r}.json").read_text()) for r in range(WORLD)]


def main(argv: list[str] | None = None) -> None:
    """Measure both arms and record the ratios in RESULTS.md."""
    parser = argparse.ArgumentParser(prog="omnilab bench fsdp_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=29531)
    args, _ = parser.parse_known_args(argv)
    arms = {"one unit": run(False, args.port), "per block": run(True, args.port + 1)}
    params, block = arms["per block"][0]["params"], arms["per block"][0]["block"]
    state = params * 4 * 4  # fp32 weights, gradients and AdamW's two moments
    goal = (
        state / WORLD + block * 4 * 2
    )  # a shard of everything, plus one block's gathered weights and gradients
    rows = []
    for name, ranks in arms.items():
        peak = max(r["peak"] for r in ranks)
        rows.append(
            {
                "wrapping": name,
                "peak MB / process (max of 2)": peak / 2**20,
                "kept after the steps MB": max(r["kept"] for r in ranks) / 2**20,
                "peak / unsharded state": peak / state,
                "peak / goal": peak / goal,
            }
        )
    ratio = rows[1]["peak MB / process (max of 2)"] / rows[0]["peak MB / process (max of 2)"]
    notes = (
        f"Model: {params / 1e6:.1f}M parameters (one block {block / 1e6:.2f}M); unsharded fp32 weights + gradients + "
        f"AdamW moments = {state / 2**20:.0f} MB; goal per process = that / {WORLD} + one block's weights and "
        f"gradients = {goal / 2**20:.0f} MB. Peak per process, per block / one unit = {ratio:.3f}. Activations "
        "(a 32x32 latent target, one reference of the same size, 32 text tokens; activation checkpointing per "
        "block in both arms, as the paper configs run) are small beside the weights here."
    )
    record(
        "fsdp_memory", "FSDP per block vs one unit: peak memory per process (2 CPU processes)", rows, notes
    )
