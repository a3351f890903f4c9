"""FSDP per transformer block: the wrap and activation-checkpointing policy the large paper configs name.

Large-model trainers shard a DiT or a VLM one transformer block at a time: each block is its own FSDP unit,
so a forward or backward gathers one block's weights at a time, never the whole model. `BlockPolicy` is that
rule for Lightning's `FSDPStrategy` (its `auto_wrap_policy` and `activation_checkpointing_policy`), named in a
config by class path with the block families it wraps:

    strategy:
      class_path: lightning.pytorch.strategies.FSDPStrategy
      init_args:
        auto_wrap_policy: {class_path: omnilab.fsdp.BlockPolicy, init_args: {blocks: [qwen_image, qwen2_5_vl]}}
        activation_checkpointing_policy:
          {class_path: omnilab.fsdp.BlockPolicy, init_args: {blocks: [qwen_image], trainable_only: true}}

Units, from the inside out:
- every block of the named families (`BLOCKS`: the DiT blocks of SD3, Qwen-Image and FLUX, the Qwen2.5-VL and
  Qwen3-VL decoder layers and vision blocks, T5 and CLIP layers, the DINOv3 ViT layers and ConvNeXt layers);
- each frozen part (`frozen_parts`): a module outside the blocks whose parameters all have requires_grad False
  when the model is wrapped, inside a module that trains (FlowEdit's VAE codec and text encoder, direct
  children of the LightningModule; MetaQuery's frozen VLM, a child of its partly trainable query encoder), is a
  unit of its own, so it is sharded apart from the trainable units and never shares a flat parameter with them
  (a frozen part in a release dtype, e.g. a bf16 VLM, beside fp32 trainable parts is then allowed);
- the root: what is left (a DiT's embedders, norm_out, proj_out).

FSDP flattens the parameters of a unit into one tensor, which must have one dtype. Every unit here holds one
model's weights, loaded in one dtype (diffusers loads a DiT and VAE in fp32, transformers v5 a VLM in its
release dtype, bf16 for Qwen2.5-VL), so the mix that breaks a single unit cannot arise; when it still does
(e.g. a release that keeps some modules in fp32), the policy stops before wrapping with the unit's name, its
dtypes and the parameters of each, instead of FSDP's "Must flatten tensors with uniform dtype".

Frozen parts run under FSDP only through their `forward` (FSDP gathers a unit's weights in its forward hook):
FlowEdit calls its codec as `self.codec(images)` / `self.codec(latents, decode=True)`, never `.encode()`;
MetaQuery calls its VLM as `self.vlm(inputs)` / `self.vlm(inputs, logits=True)` (components/vlm.py).
Work outside the LightningModule's own steps (GRPO rollouts and held-out samples made in callbacks) goes
through `run_in_root`, so that the root unit's weights are gathered too.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

# family -> the dotted paths of its transformer-block classes
BLOCKS: dict[str, tuple[str, ...]] = {
    "sd3": (
        "diffusers.models.attention.JointTransformerBlock",
        "diffusers.models.transformers.transformer_sd3.SD3SingleTransformerBlock",
    ),
    "qwen_image": ("diffusers.models.transformers.transformer_qwenimage.QwenImageTransformerBlock",),
    "flux": (
        "diffusers.models.transformers.transformer_flux.FluxTransformerBlock",
        "diffusers.models.transformers.transformer_flux.FluxSingleTransformerBlock",
    ),
    "qwen2_5_vl": (
        "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VLDecoderLayer",
        "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VLVisionBlock",
    ),
    "qwen3_vl": (
        "transformers.models.qwen3_vl.modeling_qwen3_vl.Qwen3VLTextDecoderLayer",
        "transformers.models.qwen3_vl.modeling_qwen3_vl.Qwen3VLVisionBlock",
    ),
    "t5": ("transformers.models.t5.modeling_t5.T5Block",),
    "clip": ("transformers.models.clip.modeling_clip.CLIPEncoderLayer",),
    "dinov3": (
        "transformers.models.dinov3_vit.modeling_dinov3_vit.DINOv3ViTLayer",
        "transformers.models.dinov3_convnext.modeling_dinov3_convnext.DINOv3ConvNextLayer",
    ),
}


def block_classes(families: Iterable[str]) -> tuple[type[nn.Module], ...]:
    """The block classes of the named families (`BLOCKS`); ValueError naming an unknown family."""
    classes: list[type[nn.Module]] = []
    for family in families:
        if family not in BLOCKS:
            raise ValueError(f"FSDP block family {family!r} is not one of {', '.join(BLOCKS)}")
        for path in BLOCKS[family]:
            module, _, name = path.rpartition(".")
            classes.append(getattr(importlib.import_module(module), name))
    return tuple(classes)


def _has_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class BlockPolicy(ModuleWrapPolicy):
    """Wrap every transformer block of `blocks` (and each frozen part) in its own FSDP unit; see the module doc.

    Args:
        blocks: Block families (`BLOCKS` keys: sd3, qwen_image, flux, qwen2_5_vl, qwen3_vl, t5, clip, dinov3);
            None: all.
        frozen_parts: Also make each entirely frozen module outside the blocks, inside one that trains (a VAE, a
            text encoder, a frozen VLM beside trainable queries), a unit (`frozen_parts`).
        trainable_only: Select only blocks with a trainable parameter, no frozen parts (the activation-checkpointing
            policy: recomputing a frozen encoder run under no_grad saves nothing).
    """

    def __init__(
        self, blocks: list[str] | None = None, frozen_parts: bool = True, trainable_only: bool = False
    ) -> None:
        self.families = list(blocks) if blocks is not None else list(BLOCKS)
        classes = block_classes(self.families)
        super().__init__(classes)
        self.classes = classes
        self.frozen_parts, self.trainable_only = frozen_parts, trainable_only

    def __call__(self, module: nn.Module, recurse: bool, *args: Any, **kwargs: Any) -> bool:
        """The recursive form of the rule (torch's `apply_activation_checkpointing` calls a callable policy so,
        never `_run_policy`): descend everywhere; select a block of `blocks`, with `trainable_only` a trainable one."""
        if recurse:
            return True
        return isinstance(module, self.classes) and (not self.trainable_only or _has_trainable(module))

    def units(self, root: nn.Module) -> list[nn.Module]:
        """The modules of `root` this policy makes units (blocks, then frozen parts), in module order."""
        units = []
        for module in root.modules():
            if isinstance(module, self.classes) and (not self.trainable_only or _has_trainable(module)):
                units.append(module)
        if self.frozen_parts and not self.trainable_only and _has_trainable(root):
            units.extend(frozen_parts(root, self.classes))
        return units

    def _run_policy(
        self, root_module: nn.Module, ignored_modules: set[nn.Module], root_kwargs: dict[str, Any]
    ) -> dict[nn.Module, dict[str, Any]]:
        """{unit: FSDP kwargs} for every unit; ValueError when a unit's own parameters mix dtypes."""
        units = [u for u in self.units(root_module) if u not in ignored_modules]
        if not self.trainable_only:  # the wrap policy: every flat parameter must have one dtype
            check_uniform_dtypes(root_module, units)
        return {unit: dict(root_kwargs) for unit in units}


def frozen_parts(root: nn.Module, blocks: tuple[type[nn.Module], ...] = ()) -> list[nn.Module]:
    """The largest entirely frozen modules with parameters inside `root` that trains, outside the `blocks`.

    Walks down from the root through the modules that hold both trainable and frozen parameters; a child with
    parameters, all frozen, is a frozen part (not entered further); a block and a wholly trainable child are
    not entered (a block is its own unit; LoRA's frozen base layers inside blocks stay in their block).
    """
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            params = list(child.parameters())
            if not params or isinstance(child, blocks):
                continue
            if not any(p.requires_grad for p in params):
                found.append(child)
            elif not all(p.requires_grad for p in params):
                visit(child)

    visit(root)
    return found


def unit_parameters(root: nn.Module, units: Sequence[nn.Module]) -> dict[str, dict[str, nn.Parameter]]:
    """{unit path ("" = root): {parameter name: parameter}} of the parameters each unit flattens itself.

    A parameter belongs to the innermost unit around it (nested units take theirs first), as FSDP assigns them.
    """
    unit_ids = {id(u) for u in units}
    owners: dict[str, dict[str, nn.Parameter]] = {}

    def visit(module: nn.Module, path: str, owner: str) -> None:
        if id(module) in unit_ids:
            owner = path
        for name, param in module.named_parameters(recurse=False):
            owners.setdefault(owner, {})[f"{path}.{name}" if path else name] = param
        for name, child in module.named_children():
            visit(child, f"{path}.{name}" if path else name, owner)

    visit(root, "", "")
    return owners


def check_uniform_dtypes(root: nn.Module, units: Sequence[nn.Module]) -> None:
    """ValueError naming the first unit whose own parameters have more than one dtype (FSDP cannot flatten it)."""
    for unit, params in unit_parameters(root, units).items():
        by_dtype: dict[torch.dtype, list[str]] = {}
        for name, param in params.items():
            by_dtype.setdefault(param.dtype, []).append(name)
        if len(by_dtype) > 1:
            detail = "; ".join(f"{dtype}: {names[:3]}" for dtype, names in by_dtype.items())
            raise ValueError(
                f"FSDP unit {unit or '<root>'!r} would flatten parameters of {len(by_dtype)} dtypes ({detail}). "
                "Load its parts in one dtype (e.g. the backbone's `load: {dtype: ...}`), or name the block family "
                "that holds the odd ones in the BlockPolicy's `blocks` so they become units of their own."
            )


def run_in_root(trainer: Any, module: nn.Module, method: str, *args: Any, **kwargs: Any) -> Any:
    """`getattr(module, method)(*args, **kwargs)`, run inside the strategy's wrapped model's forward under FSDP.

    FSDP gathers a unit's sharded weights only in that unit's forward. A LightningModule's training, validation
    and predict steps already run inside the root unit's forward (Lightning redirects them through it); a
    method a callback calls directly (a GRPO rollout, a held-out sample) would see the root's weights sharded.
    Under FSDP this redirects the call through the root's forward exactly as Lightning redirects a step, inside
    the precision plugin's forward context (so it computes in the precision the steps use); elsewhere it is a
    plain call.
    """
    strategy = getattr(trainer, "strategy", None)
    wrapped = getattr(strategy, "model", None)
    if wrapped is None or wrapped is module or not _is_fsdp(wrapped):
        return getattr(module, method)(*args, **kwargs)
    with strategy.precision_plugin.forward_context():
        return strategy._forward_redirection(wrapped, module, method, *args, **kwargs)


class FSDPNormClipping:
    """LightningModule mixin: norm clipping that also works under FSDP (through `clip_grad_norm` below)."""

    def configure_gradient_clipping(
        self,
        optimizer: Any,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping; norm clipping under FSDP through FSDP's own (Lightning's FSDP plugin refuses it)."""
        norm = gradient_clip_val and gradient_clip_algorithm in (None, "norm")
        if norm and clip_grad_norm(self.trainer, gradient_clip_val):
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


def clip_grad_norm(trainer: Any, max_norm: float) -> bool:
    """Clip the gradients' global norm to `max_norm` with FSDP's own `clip_grad_norm_` (over all shards).

    Lightning's FSDP precision plugin refuses norm clipping (`torch.nn.utils.clip_grad_norm_` on shards would
    take each rank's own norm); a module calls this from `configure_gradient_clipping`. Returns False when the
    model is not FSDP-wrapped (the caller clips as usual).
    """
    wrapped = getattr(getattr(trainer, "strategy", None), "model", None)
    if wrapped is None or not _is_fsdp(wrapped):
        return False
    wrapped.clip_grad_norm_(max_norm)
    return True


def _is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel)


def is_sharded_state(state: dict[str, Any]) -> bool:
    """Whether a state dict holds sharded tensors (an FSDP `state_dict_type: sharded` checkpoint)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    return any(isinstance(v, ShardedTensor | DTensor) for v in state.values())
