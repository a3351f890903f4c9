"""Exponential moving average of the weights, evaluated in place of them (CCMP §4; the flow-matching methods).

After every `every_n_steps`-th optimizer step past `start_step`, ema ← decay·ema + (1 − decay)·θ in
fp32 (before `start_step` the EMA simply follows θ). With `evaluate_ema`, validation, test and predict
run on the EMA weights, swapped in at the loop's start and swapped back at its end. The EMA lives in
the callback's `state_dict()`, which Lightning writes into every checkpoint, so a resumed run continues
it exactly and `trainer.test(ckpt_path=...)` evaluates it (a module loaded on its own has only θ).

Under FSDP each rank's parameters are its shards (use_orig_params views), so each rank averages its own shards.
With sharded checkpoints (`state_dict_type: sharded`) Lightning writes callback states from rank 0 only; there
the EMA shards travel in the sharded model state instead, one key set per rank (`_ema_rank<r>.<name>`, written
by that rank through torch.distributed.checkpoint), and each rank reads its own back from the checkpoint folder
when the run resumes or evaluates it (same world size and wrapping; otherwise a clear error).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

from omnilab.fsdp import is_sharded_state

SHARD_KEY = "_ema_rank{rank}.{name}"  # an EMA shard's key in a sharded FSDP checkpoint's model state


class EMA(Callback):
    """Keep an fp32 EMA of the module's trainable parameters and evaluate it.

    The averaged parameters are those that require grad when the EMA starts (frozen VAEs, text
    encoders and LoRA base weights are left out; a stage that freezes a backbone later keeps it in).

    Args:
        decay: EMA decay per update (0.999: a horizon of about 1000 updates).
        every_n_steps: Update after every n-th optimizer step.
        start_step: Before this optimizer step the EMA copies the weights instead of averaging them.
        evaluate_ema: Swap the EMA weights in for validation, test and predict.
    """

    def __init__(
        self, decay: float = 0.999, every_n_steps: int = 1, start_step: int = 0, evaluate_ema: bool = True
    ) -> None:
        self.decay, self.every_n_steps, self.start_step = decay, every_n_steps, start_step
        self.evaluate_ema = evaluate_ema
        self.ema: dict[str, Tensor] = {}
        self.num_updates = 0
        self._step_before = 0
        self._backup: list[Tensor] | None = None
        self._sharded_names: list[str] | None = None  # restored from a sharded checkpoint: still to be read
        self._trainer: Trainer | None = None

    @staticmethod
    def _params(pl_module: LightningModule) -> dict[str, nn.Parameter]:
        return {n: p for n, p in pl_module.named_parameters() if p.is_floating_point()}

    def _ema_and_params(self, pl_module: LightningModule) -> tuple[list[Tensor], list[Tensor]]:
        """The EMA tensors (on the parameters' device) and the parameters, in the same order."""
        params = self._params(pl_module)
        if self._sharded_names is not None:
            self._read_shards(params)
        if not self.ema:
            self.ema = {n: p.detach().float().clone() for n, p in params.items() if p.requires_grad}
        if missing := self.ema.keys() - params.keys():
            raise KeyError(f"EMA state names parameters the module does not have: {sorted(missing)[:5]}")
        self.ema = {n: t.to(params[n].device) for n, t in self.ema.items()}
        return list(self.ema.values()), [params[n] for n in self.ema]

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Keep the trainer: its checkpoint path holds the EMA shards of a sharded FSDP checkpoint."""
        self._trainer = trainer

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start the EMA from the current weights, unless a checkpoint restored it."""
        self._ema_and_params(pl_module)

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """In a sharded FSDP checkpoint, move this rank's EMA shards into the sharded model state (module doc)."""
        state = checkpoint.get("state_dict")
        if not self.ema or state is None or not is_sharded_state(state):
            return
        for name, tensor in self.ema.items():
            state[SHARD_KEY.format(rank=trainer.global_rank, name=name)] = tensor
        own = (checkpoint.get("callbacks") or {}).get(self.state_key)
        if own is not None:
            own["ema"] = {}
            own["sharded"] = {"names": list(self.ema), "world_size": trainer.world_size}

    def _read_shards(self, params: dict[str, nn.Parameter]) -> None:
        """Read this rank's EMA shards from the sharded checkpoint the trainer restored."""
        import torch.distributed.checkpoint as dcp

        names, self._sharded_names = self._sharded_names, None
        trainer = self._trainer
        path = getattr(trainer, "ckpt_path", None)
        if path is None or not Path(path).is_dir():
            raise RuntimeError(
                f"EMA: the restored checkpoint keeps its EMA shards in a sharded checkpoint folder, but the trainer's "
                f"checkpoint path is {path!r}"
            )
        rank = trainer.global_rank
        missing = [n for n in names if n not in params]
        if missing:
            raise KeyError(f"EMA state names parameters the module does not have: {missing[:5]}")
        templates = {
            SHARD_KEY.format(rank=rank, name=n): torch.empty_like(params[n], dtype=torch.float32)
            for n in names
        }
        dcp.load({"model": templates}, checkpoint_id=path)
        self.ema = {n: templates[SHARD_KEY.format(rank=rank, name=n)] for n in names}

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Remember the step count, to tell after the batch whether the optimizer stepped."""
        self._step_before = trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After an optimizer step: ema ← decay·ema + (1 − decay)·θ (or ema ← θ before start_step)."""
        step = trainer.global_step
        if step == self._step_before or step % self.every_n_steps:
            return  # gradient accumulation, or not an update step
        ema, params = self._ema_and_params(pl_module)
        params = [p.detach().float() for p in params]
        if step <= self.start_step:
            torch._foreach_copy_(ema, params)
        else:
            torch._foreach_lerp_(ema, params, 1.0 - self.decay)
            self.num_updates += 1

    @contextlib.contextmanager
    def applied(self, pl_module: LightningModule) -> Iterator[None]:
        """The EMA weights in the module for the block's duration, the trained ones restored after (a target net).

        Used inside a training step (UniPic 3.0's trajectory mapping takes its targets from the EMA student): run
        only no-grad forwards in the block, before the step's own forward, so autograd never sees the swap.
        """
        with torch.inference_mode(False), torch.no_grad():
            ema, params = self._ema_and_params(pl_module)
            backup = [p.detach().clone() for p in params]
            torch._foreach_copy_(params, ema)
        try:
            yield
        finally:
            with torch.inference_mode(False), torch.no_grad():
                torch._foreach_copy_(params, backup)

    def _swap_in(self, pl_module: LightningModule) -> None:
        """Put the EMA weights into the module, keeping the trained ones aside."""
        if not self.evaluate_ema or not self.ema or self._backup is not None:
            return
        with torch.inference_mode(False), torch.no_grad():
            ema, params = self._ema_and_params(pl_module)
            self._backup = [p.detach().clone() for p in params]
            torch._foreach_copy_(params, ema)

    def _swap_out(self, pl_module: LightningModule) -> None:
        """Put the trained weights back."""
        if self._backup is None:
            return
        with torch.inference_mode(False), torch.no_grad():
            torch._foreach_copy_(list(self._params(pl_module)[n] for n in self.ema), self._backup)
        self._backup = None

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Evaluate the EMA weights."""
        self._swap_in(pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Back to the trained weights."""
        self._swap_out(pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Test the EMA weights."""
        self._swap_in(pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Back to the trained weights."""
        self._swap_out(pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Predict with the EMA weights."""
        self._swap_in(pl_module)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Back to the trained weights."""
        self._swap_out(pl_module)

    def state_dict(self) -> dict[str, Any]:
        """The EMA weights (fp32, by parameter name) and the update count."""
        return {"ema": dict(self.ema), "num_updates": self.num_updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the EMA (moved to the parameters' device on first use; from a sharded checkpoint: read then)."""
        self.ema, self.num_updates = dict(state_dict["ema"]), state_dict["num_updates"]
        sharded = state_dict.get("sharded")
        if sharded is not None:
            world = getattr(self._trainer, "world_size", None)
            if world != sharded["world_size"]:
                raise RuntimeError(
                    f"EMA: the checkpoint's EMA is sharded over {sharded['world_size']} processes, this run has "
                    f"{world}; resume a sharded FSDP checkpoint with the same number of processes"
                )
            self._sharded_names = list(sharded["names"])
