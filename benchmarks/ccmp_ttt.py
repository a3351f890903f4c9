"""CCMP test-time training cost (paper §3): wall time per pair vs plain inference, and memory.

Per pair TTT runs T steps of the cycle loss (forward, soft mask, reverse forward, backward through
both) over the last K blocks, then one prediction. The ideal cost is T x (one cycle-loss forward +
backward) + one forward; the measured ratio (TTT pair time / plain inference time) is reported beside
it. Memory: on CUDA, peak allocated bytes; on CPU, the bytes autograd saves for backward plus the
gradients and AdamW moments of the trained parameters (what a GPU would have to hold on top of the
weights), with only the last K blocks trainable vs every parameter.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch

from benchmarks.common import interleaved, record
from callbacks.ttt import TestTimeTraining
from lightning_modules.ccmp import CCMP

VIT = dict(
    hidden_size=192,
    intermediate_size=768,
    num_hidden_layers=12,
    num_attention_heads=3,
    patch_size=16,
    num_register_tokens=4,
)
CONVNEXT = dict(depths=[1, 1, 3, 1], hidden_sizes=[24, 48, 96, 192])


def pair(size: int) -> dict:
    """One evaluation pair of random images and a square query mask."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4 : size // 2, size // 4 : size // 2] = 1
    return {"src": torch.randn(1, 3, size, size, generator=gen), "src_mask": mask, "tgt": torch.randn(1, 3, size, size, generator=gen), "setting": ["ego-exo"]}  # fmt: skip


def train_cost(module: CCMP, batch: dict, params: list[torch.nn.Parameter]) -> tuple[int, float]:
    """(bytes held for one TTT step beyond the weights, seconds): saved activations + grads + AdamW moments."""
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    for p in module.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = module.ttt_loss(batch)
    loss.backward()
    seconds = time.perf_counter() - start
    state = sum(3 * p.numel() * p.element_size() for p in params)  # grad + exp_avg + exp_avg_sq
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), seconds
    return saved + state, seconds


def main(argv: list[str] | None = None) -> None:
    """Measure TTT time and memory on a ViT-S-sized CCMP at a few resolutions."""
    parser = argparse.ArgumentParser(prog="omnilab bench ccmp_ttt")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    module = CCMP({"config": CONVNEXT}, {"config": VIT}, image_size=args.size)
    module.configure_model()
    module.eval()
    batch = pair(args.size)
    ttt = TestTimeTraining(blocks=args.blocks, steps=args.steps)

    def infer() -> None:
        with torch.no_grad():
            module.predict_pairs(batch)

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)

    def adapt_and_infer() -> None:
        ttt.adapt(trainer, module, batch)
        infer()
        ttt.restore()

    def fwd_bwd() -> float:
        return train_cost(module, batch, module.ttt_parameters(args.blocks))[1]

    times = interleaved({"inference": infer, "ttt": adapt_and_infer, "cycle fwd+bwd": fwd_bwd}, args.repeats)
    t = {k: statistics.median(v[1:]) for k, v in times.items()}
    ideal = args.steps * t["cycle fwd+bwd"] + t["inference"]
    mem_k, _ = train_cost(module, batch, module.ttt_parameters(args.blocks))
    mem_all, _ = train_cost(module, batch, list(module.parameters()))
    rows = [
        {"quantity": "plain inference per pair (ms)", "value": 1000 * t["inference"]},
        {"quantity": f"TTT per pair, K={args.blocks} T={args.steps} (ms)", "value": 1000 * t["ttt"]},
        {"quantity": "measured ratio TTT / inference", "value": t["ttt"] / t["inference"]},
        {"quantity": "ideal ratio (T x cycle fwd+bwd + 1 fwd) / inference", "value": ideal / t["inference"]},
        {"quantity": f"training memory, last {args.blocks} of {VIT['num_hidden_layers']} blocks (MiB)", "value": mem_k / 2**20},
        {"quantity": "training memory, all parameters (MiB)", "value": mem_all / 2**20},
        {"quantity": "memory ratio last-K / all", "value": mem_k / mem_all},
    ]  # fmt: skip
    kind = (
        "peak CUDA allocation" if torch.cuda.is_available() else "saved activations + grads + AdamW moments"
    )
    notes = (
        f"CCMP with a ViT-S-sized target encoder (12 blocks, width 192) and a small ConvNeXt, {args.size} px, "
        f"one pair; medians of {args.repeats - 1} interleaved repeats after a warm-up. Memory = {kind}. "
        "The paper's ViT-L at 512 px with K=4 (Ego->Exo) / K=11 (Exo->Ego) of 24 blocks was not run here."
    )
    record(
        "ccmp_ttt", "CCMP test-time training: time and memory", rows, notes,
        {"ttt_over_inference": t["ttt"] / t["inference"], "ideal_over_inference": ideal / t["inference"], "memory_lastk_over_all": mem_k / mem_all},
    )  # fmt: skip


if __name__ == "__main__":
    main()
