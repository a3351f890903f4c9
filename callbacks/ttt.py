"""Per-pair test-time training as a Callback (CCMP, arXiv 2602.18996, §3), knowing no method.

Before the module predicts an evaluation pair, a fresh AdamW updates only the parameters the module
names (CCMP: its last K ViT blocks) for T steps of the module's self-supervised loss (CCMP: the
cycle-consistency loss); the module's own `test_step`/`predict_step` then predicts with the adapted
weights, and afterwards every adapted parameter is restored bit for bit, so nothing carries over to
the next pair. K and T may differ per group of pairs (CCMP: Ego→Exo K=4, T=2; Exo→Ego K=11, T=6).

The module's whole contract is the `SupportsTestTimeTraining` protocol below. The module stays in its
evaluation mode during the steps (CCMP switches only the adapted DINOv3 blocks to train mode, which
changes nothing there: they have no dropout), and the steps run in the trainer's precision.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning_utilities import apply_to_collection
from torch import Tensor, nn


@runtime_checkable
class SupportsTestTimeTraining(Protocol):
    """What a module offers for test-time training."""

    def ttt_parameters(self, blocks: int) -> list[nn.Parameter]:
        """The parameters to adapt, given how many blocks (counted from the output) to adapt."""
        ...

    def ttt_loss(self, batch: dict[str, Any]) -> Tensor:
        """The self-supervised loss of one evaluation pair (a scalar with grad)."""
        ...

    def ttt_group(self, batch: dict[str, Any]) -> str:
        """The pair's group (e.g. "ego-exo"), which picks `blocks` and `steps`."""
        ...


def _batch_size(batch: Any) -> int:
    """The number of samples in a collated batch: the largest length among its tensors and lists."""
    values = (
        batch.values() if isinstance(batch, dict) else batch if isinstance(batch, list | tuple) else [batch]
    )
    sizes = [len(v) for v in values if isinstance(v, list | tuple) or (isinstance(v, Tensor) and v.ndim)]
    return max(sizes, default=1)


def _per_group(table: dict[str, int] | int, group: str, name: str) -> int:
    """`table[group]`, else `table["default"]`; an int applies to every group."""
    if isinstance(table, int):
        return table
    if group in table:
        return table[group]
    if "default" in table:
        return table["default"]
    raise KeyError(f"TestTimeTraining.{name} has no entry for group {group!r} and no 'default'")


class TestTimeTraining(Callback):
    """Adapt the module to each evaluation pair before it predicts it, then restore its weights.

    Args:
        blocks: How many blocks to adapt, per group (`ttt_group(batch)`) with a "default", or one int.
        steps: Optimizer steps per pair, per group with a "default", or one int.
        lr: AdamW learning rate (CCMP 5e-6).
        weight_decay: AdamW weight decay (CCMP 1e-3).
        on_validation: Also adapt during validation (off by default: TTT multiplies evaluation cost).
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self,
        blocks: dict[str, int] | int = {"ego-exo": 4, "exo-ego": 11, "default": 6},  # noqa: B006
        steps: dict[str, int] | int = {"ego-exo": 2, "exo-ego": 6, "default": 6},  # noqa: B006
        lr: float = 5e-6,
        weight_decay: float = 1e-3,
        on_validation: bool = False,
    ) -> None:
        self.blocks, self.steps = blocks, steps
        self.lr, self.weight_decay, self.on_validation = lr, weight_decay, on_validation
        self._saved: list[tuple[nn.Parameter, Tensor]] = []  # the pair in flight's adapted params
        self._requires_grad: list[tuple[nn.Parameter, bool]] = []

    def adapt(
        self, trainer: Trainer, module: LightningModule, batch: dict[str, Any], log: bool = False
    ) -> None:
        """Snapshot the chosen parameters, then take `steps` AdamW steps of `module.ttt_loss(batch)`."""
        if not isinstance(module, SupportsTestTimeTraining):
            raise TypeError(f"{type(module).__name__} does not implement ttt_parameters/ttt_loss/ttt_group")
        if (n := _batch_size(batch)) != 1:
            raise ValueError(
                f"TestTimeTraining adapts the model to one image pair at a time, but the batch has {n}: "
                "set data.eval_batch_size=1"
            )
        group = module.ttt_group(batch)
        params = module.ttt_parameters(_per_group(self.blocks, group, "blocks"))
        steps = _per_group(self.steps, group, "steps")
        # Lightning evaluates under inference_mode: leave it, and clone the batch (inference tensors
        # cannot be saved for backward)
        with torch.inference_mode(False), torch.enable_grad():
            batch = apply_to_collection(batch, Tensor, Tensor.clone)
            self._saved = [(p, p.detach().clone()) for p in params]
            self._requires_grad = [(p, p.requires_grad) for p in module.parameters()]
            chosen = {id(p) for p in params}
            for p in module.parameters():
                p.requires_grad_(id(p) in chosen)
            optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
            fp16 = getattr(trainer.precision_plugin, "scaler", None) is not None  # a fresh scaler per pair
            scaler = torch.amp.GradScaler(module.device.type, enabled=fp16)
            losses = []
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                with trainer.precision_plugin.train_step_context():
                    loss = module.ttt_loss(batch)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                losses.append(loss.detach())
            optimizer.zero_grad(set_to_none=True)
        if log and len(losses) > 1:
            change = (losses[-1] - losses[0]).float()
            module.log("ttt/loss_change", change, on_step=False, on_epoch=True, batch_size=1)

    def restore(self) -> None:
        """Copy the snapshot back exactly and restore every requires_grad flag."""
        with torch.inference_mode(False), torch.no_grad():
            for p, saved in self._saved:
                p.copy_(saved)
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)
        self._saved, self._requires_grad = [], []

    def on_test_batch_start(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Adapt to the pair."""
        self.adapt(trainer, pl_module, batch, log=True)

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Restore the weights."""
        self.restore()

    def on_predict_batch_start(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Adapt to the pair (predict does not log)."""
        self.adapt(trainer, pl_module, batch, log=False)

    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Restore the weights."""
        self.restore()

    def on_validation_batch_start(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Adapt to the pair if `on_validation`."""
        if self.on_validation and not trainer.sanity_checking:
            self.adapt(trainer, pl_module, batch, log=True)

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Restore the weights (a no-op when nothing was adapted)."""
        self.restore()
