"""A minimal data kind and module that exercise the foundation (streams, CLI, tracking, health).

Samples: `<key>.x.npy` (float32[8]) and `<key>.json` {"y": [float, float], "i": int}. The module is a
small MLP regressor that can trace per-step losses and sample keys to JSON lines, and can inject a
NaN loss at chosen steps on a chosen rank.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from datamodules.webdataset import BadSample, ShardWriter, WebDataModule, write_index

WEIGHTS = np.linspace(-1.0, 1.0, 16, dtype=np.float32).reshape(8, 2)


def toy_sample(i: int) -> dict[str, Any]:
    """The i-th toy sample (deterministic)."""
    x = np.random.default_rng(i).standard_normal(8).astype(np.float32)
    return {"__key__": f"s{i:05d}", "x.npy": x, "json": {"y": (x @ WEIGHTS).tolist(), "i": i}}


def write_toy_shards(out: Path, counts: dict[str, list[int]]) -> Path:
    """Write shards with the given per-shard sample counts per split (e.g. {"train": [10, 7, 3]})."""
    i = 0
    splits = {}
    for split, sizes in counts.items():
        names = []
        for s, size in enumerate(sizes):
            name = f"{split}-{s:06d}.tar"
            with ShardWriter(out, f"{split}-tmp{s}", max_count=10**9) as writer:
                for _ in range(size):
                    writer.write(toy_sample(i))
                    i += 1
            (out / f"{split}-tmp{s}-000000.tar").rename(out / name)
            names.append(name)
        splits[split] = {"shards": names, "counts": sizes, "samples": sum(sizes)}
    return write_index(out, kind="toy", seed=0, keys=["json", "x.npy"], splits=splits)


class ToyTransform:
    """Decoded toy sample -> tensors; raises BadSample on a wrong shape."""

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """Build the example."""
        x = sample["x.npy"]
        if x.shape != (8,):
            raise BadSample(f"x has shape {x.shape}, expected (8,)")
        return {"x": torch.from_numpy(x), "y": torch.tensor(sample["json"]["y"], dtype=torch.float32)}


class ToyData(WebDataModule):
    """The toy data kind."""

    required = ("x.npy", "json")

    def transform(self, train: bool) -> ToyTransform:
        """The toy transform."""
        return ToyTransform()


class ToyModule(L.LightningModule):
    """A small MLP regressor.

    Args:
        lr: AdamW learning rate.
        trace_dir: Write `trace-rank<r>.jsonl` lines {phase, step, epoch, loss, keys, params} there.
        nan_steps: Global steps at which the loss becomes NaN.
        nan_rank: The rank that injects the NaN (-1: every rank).
        cosine: Add a cosine LR schedule over `trainer.estimated_stepping_batches`, read in
            `configure_optimizers` (the call that drops a StatefulDataLoader's state, Lightning issue 20550).
    """

    def __init__(
        self,
        lr: float = 1e-2,
        trace_dir: str | None = None,
        nan_steps: list[int] | None = None,
        nan_rank: int = -1,
        cosine: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """MSE loss on the batch (optionally NaN at the configured steps)."""
        loss = nn.functional.mse_loss(self.net(batch["x"]), batch["y"])
        if self.global_step in (self.hparams.nan_steps or []) and self.hparams.nan_rank in (
            -1,
            self.global_rank,
        ):
            loss = loss * float("nan")
        params = float(sum(p.double().sum() for p in self.parameters()))
        self.trace("train", loss=loss.item(), keys=batch["__key__"], params=params)
        self.log("train/loss", loss)
        return loss

    def trace(self, phase: str, **record: Any) -> None:
        """Append one JSON line {phase, step, epoch, ...} to this rank's trace file."""
        if self.hparams.trace_dir:
            path = Path(self.hparams.trace_dir) / f"trace-rank{self.global_rank}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            line = {"phase": phase, "step": self.global_step, "epoch": self.current_epoch, **record}
            with path.open("a") as f:
                f.write(json.dumps(line) + "\n")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Validation MSE."""
        self.trace("val", keys=batch["__key__"])
        loss = nn.functional.mse_loss(self.net(batch["x"]), batch["y"])
        self.log("val/loss", loss, batch_size=len(batch["x"]))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Test MSE."""
        self.log(
            "test/loss", nn.functional.mse_loss(self.net(batch["x"]), batch["y"]), batch_size=len(batch["x"])
        )

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Append the predictions to `<default_root_dir>/predictions/toy.jsonl` (one line per sample)."""
        out = Path(self.trainer.default_root_dir) / "predictions"
        out.mkdir(parents=True, exist_ok=True)
        with (out / "toy.jsonl").open("a") as f:
            for key, y in zip(batch["__key__"], self.net(batch["x"]).tolist()):
                f.write(json.dumps({"key": key, "y": y}) + "\n")

    def configure_optimizers(self) -> Any:
        """AdamW, optionally with a cosine schedule over the estimated number of steps."""
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        if not self.hparams.cosine:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
