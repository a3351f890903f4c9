"""Lightning's FSDPStrategy on CPU processes (gloo), for the tests: the two CUDA-only parts mapped.

Three things stand between Lightning 2.6's `FSDPStrategy` and CPU processes, and are mapped here:
1. its accelerator connector refuses the class unless the accelerator is a GPU (an exact-type check: a
   subclass passes);
2. it wraps with `device_id=root_device.index`, None on CPU, and torch's FSDP then looks for an accelerator
   and refuses; FSDP runs on CPU when given `device_id=torch.device("cpu")`, which `_setup_model` passes;
3. its precision plugin autocasts only on CUDA (`torch.autocast("cuda", ...)`, a no-op on CPU);
   `CPUFSDPPrecision` autocasts on the CPU.
Everything else (the wrap and activation-checkpointing policies, FSDP's MixedPrecision with bf16 parameters
and reductions, use_orig_params, sharded checkpoints) is Lightning's and torch's own code path. The paper-config
tests substitute `CPUFSDPStrategy` for `FSDPStrategy`, with the same init_args.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
from lightning.pytorch.plugins.precision import FSDPPrecision, Precision
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn


class CPUFSDPPrecision(FSDPPrecision):
    """FSDPPrecision whose mixed-precision autocast runs on the CPU."""

    def forward_context(self) -> AbstractContextManager:
        """bf16 autocast on the CPU for bf16-mixed (Lightning's plugin autocasts CUDA only)."""
        if self.precision == "bf16-mixed":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return super().forward_context()


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy, allowed on CPU processes (gloo); see the module docstring."""

    @property
    def precision_plugin(self) -> Precision:
        """The precision plugin (Lightning's FSDPPrecision is swapped for `CPUFSDPPrecision`)."""
        return self._precision_plugin if self._precision_plugin is not None else Precision()

    @precision_plugin.setter
    def precision_plugin(self, plugin: Any) -> None:
        if type(plugin) is FSDPPrecision:
            plugin = CPUFSDPPrecision(plugin.precision)
        self._precision_plugin = plugin

    def _setup_model(self, model: nn.Module) -> nn.Module:
        """FSDPStrategy._setup_model with `device_id=cpu` (Lightning passes the device index, None on CPU)."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model
