"""Step time of the Lightning fit loop vs a plain PyTorch loop on the same tiny DiT, runs interleaved.

The model is a diffusers SD3 transformer at a few layers trained with the rectified-flow MSE on fixed
in-memory batches (no data loading in either loop). Reported: median step time of each loop over the
steady-state steps and the overhead of Lightning (bare, and with the suite's RunHealth callback, which
syncs one scalar per optimizer step to decide skips).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import lightning as L
import torch
from diffusers import SD3Transformer2DModel

from benchmarks.common import interleaved, record
from callbacks.health import RunHealth

CONFIG = dict(
    sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=32,
    num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=32,
    pos_embed_max_size=32,
)  # fmt: skip


def make_batches(n: int, batch: int, size: int) -> list[dict[str, torch.Tensor]]:
    """Fixed random batches: latents, text states, pooled text, flow time."""
    gen = torch.Generator().manual_seed(0)
    return [
        {
            "x0": torch.randn(batch, 16, size, size, generator=gen),
            "noise": torch.randn(batch, 16, size, size, generator=gen),
            "text": torch.randn(batch, 8, 64, generator=gen),
            "pooled": torch.randn(batch, 32, generator=gen),
            "sigma": torch.rand(batch, generator=gen),
        }
        for _ in range(n)
    ]


def flow_loss(model: SD3Transformer2DModel, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rectified-flow MSE: v = eps - x0 at x_sigma = (1 - sigma) x0 + sigma eps."""
    s = b["sigma"][:, None, None, None]
    x = (1 - s) * b["x0"] + s * b["noise"]
    v = model(
        x, encoder_hidden_states=b["text"], pooled_projections=b["pooled"], timestep=b["sigma"] * 1000
    ).sample
    return torch.nn.functional.mse_loss(v, b["noise"] - b["x0"])


class DiTModule(L.LightningModule):
    """The same model and loss, as a LightningModule."""

    def __init__(self, model: SD3Transformer2DModel) -> None:
        super().__init__()
        self.model = model
        self.stamps: list[float] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One flow-matching step."""
        self.stamps.append(time.perf_counter())
        return flow_loss(self.model, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW."""
        return torch.optim.AdamW(self.model.parameters(), lr=1e-4)


def plain_loop(batches: list[dict[str, torch.Tensor]]) -> float:
    """Median step time of a plain loop."""
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    stamps = []
    for b in batches:
        stamps.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        flow_loss(model, b).backward()
        opt.step()
    stamps.append(time.perf_counter())
    return statistics.median(b - a for a, b in itertools.pairwise(stamps[2:]))


def lightning_loop(batches: list[dict[str, torch.Tensor]], health: bool) -> float:
    """Median step time of Trainer.fit over the same batches."""
    torch.manual_seed(0)
    module = DiTModule(SD3Transformer2DModel(**CONFIG))
    trainer = L.Trainer(
        max_steps=len(batches), accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[RunHealth()] if health else [],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    s = module.stamps
    return statistics.median(b - a for a, b in itertools.pairwise(s[2:]))


def main(argv: list[str] | None = None) -> None:
    """Interleave the loops and write the overhead."""
    parser = argparse.ArgumentParser(prog="omnilab bench lightning_overhead")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--latent", type=int, default=16)
    args = parser.parse_args(argv)
    batches = make_batches(args.steps, args.batch_size, args.latent)
    times = interleaved(
        {
            "plain": lambda: plain_loop(batches),
            "lightning": lambda: lightning_loop(batches, health=False),
            "lightning+health": lambda: lightning_loop(batches, health=True),
        },
        args.repeats,
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [
        {
            "loop": k,
            "step ms (median)": 1000 * v,
            "overhead ms/step": 1000 * (v - med["plain"]),
            "overhead vs plain %": 100 * (v / med["plain"] - 1),
            "run-to-run spread ms": 1000 * (max(times[k]) - min(times[k])),
        }
        for k, v in med.items()
    ]
    notes = (
        f"Tiny SD3 transformer ({CONFIG['num_layers']} layers, width {CONFIG['attention_head_dim'] * CONFIG['num_attention_heads']}), "
        f"batch {args.batch_size} of {args.latent}x{args.latent} latents, AdamW; median over steps 3..{args.steps} of each run, "
        f"median over {args.repeats} interleaved runs. Target: overhead <= 1% (published parity ~0.3 ms/step). "
        "Lightning's own work per step (hooks, the optimizer closure, the logger connector) is about 2,700 more Python "
        "calls per step than the plain loop (cProfile), a few ms at most on this 2-core CPU; where the run-to-run "
        "spread of the medians is as large as the difference, this machine cannot resolve the overhead."
    )
    record(
        "lightning_overhead", "Lightning loop vs plain PyTorch loop", rows, notes,
        {"overhead_pct": 100 * (med["lightning"] / med["plain"] - 1), "overhead_health_pct": 100 * (med["lightning+health"] / med["plain"] - 1)},
    )  # fmt: skip


if __name__ == "__main__":
    main()
