"""`omnilab export`: a trained run's weights in the formats other tools load (docs/export.md).

- `diffusers`: a FlowEdit (or FlowGRPO) model as a diffusers pipeline folder — the trained transformer (any
  LoRA merged in) plus the rest of the pipeline it came from (VAE, text encoders, tokenizers, scheduler,
  `model_index.json`) — that the family's pipeline class loads with `from_pretrained`:
  `sd3_kontext` -> `StableDiffusion3Pipeline`, `flux_kontext` -> `FluxKontextPipeline`, `qwen_image_edit` ->
  `QwenImageEditPlusPipeline`. The Qwen folder is written part by part (`save_pipeline_folder`: each part's
  `save_pretrained` and a `model_index.json` naming the classes), without building the pipeline: its
  `Qwen2VLProcessor` holds a video processor that needs torchvision, which the suite does not depend on; the
  `processor/` folder holds the image processor and tokenizer configs the processor loads from (its video
  processor inferred from the image processor's, as in Qwen's own releases). The packed backends (lightning_modules/components/packed_dit.py) reuse the stock
  transformer's weights unchanged, so the exported transformer is the stock class with the trained weights.
  The scheduler is the source pipeline's when the model was built from a `pretrained` pipeline folder, else a
  `FlowMatchEulerDiscreteScheduler` with the run's sampler shift (a fixed shift, or dynamic shifting on the
  run's resolution line).
- `lora`: the LoRA adapter of the backbone (FlowGRPO's policy, or a FlowEdit trained with `lora:`) as
  `pytorch_lora_weights.safetensors` with its `LoraConfig` as metadata, which the pipeline's
  `load_lora_weights` loads onto the base model (the pipeline of `init_checkpoint`/`pretrained`).
- `ccmp`: a CCMP model as `model.safetensors` (its plain state dict) and `config.json` (its init arguments).

Checkpoints are read with `torch.load(weights_only=True)`. A sharded FSDP checkpoint (a folder written by
torch.distributed.checkpoint, `experiments/_base/fsdp.yaml`) is consolidated in memory on one process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMATS = ("diffusers", "lora", "ccmp")
PIPELINES = {
    "sd3_kontext": "StableDiffusion3Pipeline",
    "flux_kontext": "FluxKontextPipeline",
    "qwen_image_edit": "QwenImageEditPlusPipeline",
}


# --- reading a checkpoint -----------------------------------------------------------------------------


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint as a dict (weights_only); a sharded FSDP folder is consolidated on this process."""
    path = Path(path)
    if path.is_dir():
        if not (path / ".metadata").is_file():
            raise ValueError(
                f"{path} is a folder but not a sharded checkpoint (no .metadata): give a .ckpt file or "
                "the folder torch.distributed.checkpoint wrote"
            )
        try:
            from torch.distributed.checkpoint import FileSystemReader
            from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
            from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

            state: dict[str, Any] = {}
            _load_state_dict(
                state,
                storage_reader=FileSystemReader(path),
                planner=_EmptyStateDictLoadPlanner(),
                no_dist=True,
            )
            meta = (
                path / "meta.pt"
            )  # Lightning's FSDP strategy: everything but the weights and optimizer states
            extra = torch.load(meta, map_location="cpu", weights_only=True) if meta.is_file() else {}
        except Exception as err:  # any failure: say what to do instead
            raise ValueError(
                f"could not consolidate the sharded FSDP checkpoint {path} ({type(err).__name__}: {err}); "
                "consolidate it on the training machine (`python -m lightning.fabric.utilities.consolidate_checkpoint`) "
                "and export the resulting file"
            ) from err
        if "model" in state and "state_dict" not in state:  # Lightning stores the weights under "model"
            state["state_dict"] = state.pop("model")
        for key in [k for k in state if k.startswith("optimizer_")]:
            del state[key]
        return {**state, **extra}
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


def model_class_path(ckpt_path: str | Path, config: str | Path | None = None) -> str:
    """The model's class path from `config` or the run's config.yaml found beside or above the checkpoint."""
    candidates = (
        [Path(config)] if config else [p / "config.yaml" for p in Path(ckpt_path).resolve().parents[:3]]
    )
    for candidate in candidates:
        if candidate.is_file():
            import yaml

            data = yaml.safe_load(candidate.read_text()) or {}
            class_path = (data.get("model") or {}).get("class_path")
            if class_path:
                return class_path
            raise ValueError(f"{candidate} has no model.class_path")
    raise FileNotFoundError(
        f"no config.yaml beside or above {ckpt_path}: give the run's config with --config"
    )


def load_module(
    ckpt_path: str | Path, config: str | Path | None = None, class_path: str | None = None
) -> nn.Module:
    """The trained LightningModule of a checkpoint: built from its hyperparameters, weights loaded, in eval mode.

    The class: `class_path`, else the one the Lightning CLI saved with the hyperparameters, else the run's config.
    """
    import importlib

    from omnilab.allowlist import check_import_path

    ckpt = read_checkpoint(ckpt_path)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    saved = hparams.pop("_class_path", None)  # the Lightning CLI records the class with the hyperparameters
    class_path = class_path or saved or model_class_path(ckpt_path, config)
    check_import_path(class_path)
    module_name, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), name)
    model = cls(**hparams)
    if hasattr(model, "configure_model"):
        model.configure_model()
    model.on_load_checkpoint(ckpt)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


# --- diffusers pipeline folder ------------------------------------------------------------------------


def merged_transformer(module: nn.Module, merge_lora: bool = True) -> nn.Module:
    """A fresh copy of the backbone's diffusers transformer with its trained weights and any LoRA merged in.

    merge_lora False: the base weights only (the model `load_lora_weights` then adds the adapter to).
    """
    model = module.backbone.model
    state = {}
    from peft.tuners.lora import LoraLayer

    lora_layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    for key, value in model.state_dict().items():
        if "lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value.detach().clone()
    if merge_lora:
        for name, layer in lora_layers.items():
            delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters)
            key = f"{name}.weight"
            state[key] = state[key] + delta.to(state[key].dtype)
    fresh = type(model).from_config(model.config)
    fresh.load_state_dict(state)
    return fresh.to(next(model.parameters()).dtype).eval()


def _source_pipeline(module: nn.Module) -> str | None:
    """The pipeline folder / hub id the model's parts came from (`pretrained` of backbone, VAE or text)."""
    for spec in (module.backbone_spec, module.vae_spec, module.text_spec):
        if spec.get("pretrained"):
            return str(spec["pretrained"])
    return None


def build_scheduler(module: nn.Module) -> Any:
    """The source pipeline's scheduler, else FlowMatchEuler with the run's sampler shift (dynamic on its line)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    source = _source_pipeline(module)
    if source is not None:
        try:
            return FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler")
        except (OSError, ValueError):
            pass  # a bare transformer folder: fall through to the run's own settings
    shift, t = module.sampler["shift"], module.timesteps
    terminal = (
        {"shift_terminal": module.sampler["shift_terminal"]} if module.sampler["shift_terminal"] else {}
    )
    if (
        shift == "resolution"
    ):  # mu linear in the target's tokens, shift exp(mu): the pipelines' dynamic shifting
        return FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True,
            base_image_seq_len=t["base_tokens"],
            max_image_seq_len=t["max_tokens"],
            base_shift=t["base_mu"],
            max_shift=t["max_mu"],
            time_shift_type="exponential",
            **terminal,
        )
    return FlowMatchEulerDiscreteScheduler(shift=float(shift), **terminal)


def pipeline_components(module: nn.Module, merge_lora: bool = True) -> dict[str, Any]:
    """The keyword arguments of the family's pipeline class, from the module's parts."""
    family, text, vae = module.family, module.text_encoder, module.codec.vae
    if not module.codec.video and vae.config.shift_factor is None:
        vae.register_to_config(
            shift_factor=0.0
        )  # LatentCodec reads None as 0; the pipelines add it as a number
    parts: dict[str, Any] = {
        "transformer": merged_transformer(module, merge_lora),
        "vae": vae,
        "scheduler": build_scheduler(module),
    }
    if family == "sd3_kontext":
        clips, toks = list(text.clips), list(text.clip_tokenizers)
        if len(clips) != 2 or text.t5 is None:
            raise ValueError(
                f"StableDiffusion3Pipeline needs two CLIP encoders and a T5; this model has {len(clips)} CLIP(s) "
                f"and {'a' if text.t5 is not None else 'no'} T5"
            )
        parts.update(text_encoder=clips[0], tokenizer=toks[0], text_encoder_2=clips[1], tokenizer_2=toks[1])
        parts.update(text_encoder_3=text.t5, tokenizer_3=text.t5_tokenizer)
    elif family == "flux_kontext":
        parts.update(text_encoder=text.clip, tokenizer=text.clip_tokenizer)
        parts.update(text_encoder_2=text.t5, tokenizer_2=text.t5_tokenizer)
    elif family == "qwen_image_edit":
        if text.image_processor is None:
            raise ValueError("QwenImageEditPlusPipeline needs the VLM's image processor (text.vision: true)")
        parts.update(text_encoder=text.model, tokenizer=text.tokenizer)
        parts["processor"] = QwenProcessorParts(text.image_processor, text.tokenizer)
    else:
        raise ValueError(f"no diffusers pipeline for family {family!r}")
    return parts


class QwenProcessorParts:
    """What `Qwen2VLProcessor.from_pretrained` reads from `processor/`, saved without building the processor.

    The image processor's config (its type without the PIL-backend suffix, so that the processor's video
    processor is inferred from it, as Qwen's releases are read) and the tokenizer's files.
    """

    library, class_name = "transformers", "Qwen2VLProcessor"

    def __init__(self, image_processor: Any, tokenizer: Any) -> None:
        self.image_processor, self.tokenizer = image_processor, tokenizer

    def save_pretrained(self, folder: str | Path, **_: Any) -> None:
        """Write preprocessor_config.json and the tokenizer files into `folder`."""
        folder = Path(folder)
        self.image_processor.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        config_path = folder / "preprocessor_config.json"
        config = json.loads(config_path.read_text())
        kind = str(config.get("image_processor_type", type(self.image_processor).__name__))
        config["image_processor_type"] = kind.removesuffix("Pil")
        config["processor_class"] = self.class_name
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _library_class(part: Any) -> tuple[str, str]:
    """(library, class name) of a pipeline part, as model_index.json records it."""
    if isinstance(part, QwenProcessorParts):
        return part.library, part.class_name
    library = type(part).__module__.split(".")[0]
    name = type(part).__name__
    if library == "transformers":
        name = TOKENIZERS.get(name, name)
    return library, name


TOKENIZERS = {
    "TokenizersBackend": "Qwen2Tokenizer"
}  # transformers 5's generic fast tokenizer -> Qwen's class


def save_pipeline_folder(parts: dict[str, Any], out: str | Path, pipeline: str) -> Path:
    """Write a diffusers pipeline folder part by part: `<out>/<name>/` by each part's save_pretrained (safetensors)
    and `model_index.json` {"_class_name": pipeline, name: [library, class]}, as `DiffusionPipeline.save_pretrained`
    lays it out, without building the pipeline."""
    import diffusers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__}
    for name, part in sorted(parts.items()):
        if hasattr(part, "config") and hasattr(part, "save_config") and not hasattr(part, "state_dict"):
            part.save_pretrained(out / name)  # a scheduler
        elif isinstance(part, nn.Module):
            part.save_pretrained(out / name, safe_serialization=True)
        else:
            part.save_pretrained(out / name)
        index[name] = list(_library_class(part))
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out


def export_diffusers(module: nn.Module, out: str | Path, merge_lora: bool = True) -> Path:
    """Write the module as the family's diffusers pipeline folder (`model_index.json` + one folder per part)."""
    import diffusers

    if getattr(module, "family", None) not in PIPELINES:
        raise ValueError(f"--format diffusers exports FlowEdit models; got {type(module).__name__}")
    if getattr(module, "merged_adapters", 0) and not merge_lora:
        raise ValueError("the base weights were changed by merged adapters: export with the LoRA merged")
    if module.family == "qwen_image_edit":  # its processor cannot be built without torchvision: part by part
        return save_pipeline_folder(pipeline_components(module, merge_lora), out, PIPELINES[module.family])
    pipeline_cls = getattr(diffusers, PIPELINES[module.family])
    pipe = pipeline_cls(**pipeline_components(module, merge_lora))
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


# --- LoRA -----------------------------------------------------------------------------------------------


def export_lora(module: nn.Module, out: str | Path) -> Path:
    """Write the backbone's LoRA as diffusers/peft LoRA weights (`pipe.load_lora_weights(out)` loads it)."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    if not getattr(module, "lora", None):
        raise ValueError(
            f"{type(module).__name__} has no LoRA adapter (model.lora is not set): use --format diffusers"
        )
    if getattr(module, "merged_adapters", 0):
        raise ValueError(
            f"{module.merged_adapters} adapter(s) were merged into the base weights during training, so the LoRA "
            "alone does not reproduce the model: export it with --format diffusers"
        )
    model = module.backbone.model
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    if not state:
        raise ValueError("the backbone holds no LoRA weights")
    metadata = {k: v for k, v in module.lora.items() if k != "init_lora_weights"}
    metadata["r"] = int(metadata.get("r", 8))
    metadata.setdefault("lora_alpha", metadata["r"])
    metadata["target_modules"] = sorted(_lora_targets(model))
    pipeline_cls = getattr(diffusers, PIPELINES[module.family])
    out = Path(out)
    pipeline_cls.save_lora_weights(
        out, transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata
    )
    return out


def _lora_targets(model: nn.Module) -> set[str]:
    """The module names (relative to the transformer) that carry a LoRA."""
    from peft.tuners.lora import LoraLayer

    return {name for name, m in model.named_modules() if isinstance(m, LoraLayer)}


# --- CCMP -----------------------------------------------------------------------------------------------


def export_ccmp(module: nn.Module, out: str | Path, hparams: dict[str, Any] | None = None) -> Path:
    """Write `model.safetensors` (the plain state dict) and `config.json` (the init arguments) of a CCMP."""
    from safetensors.torch import save_file

    from lightning_modules.ccmp import CCMP

    if not isinstance(module, CCMP):
        raise ValueError(f"--format ccmp exports CCMP models; got {type(module).__name__}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    init_args = {**dict(hparams or module.hparams), "init_checkpoint": None}  # its weights are in the export
    config = {"class_path": "lightning_modules.ccmp.CCMP", "init_args": init_args}
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    return out


def load_ccmp(folder: str | Path) -> nn.Module:
    """A CCMP from an export folder (config.json + model.safetensors), in eval mode."""
    from safetensors.torch import load_file

    from lightning_modules.ccmp import CCMP

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    model = CCMP(**config["init_args"])
    model.configure_model()
    model.load_state_dict(load_file(folder / "model.safetensors"))
    return model.eval()


# --- the command ----------------------------------------------------------------------------------------


def export(
    ckpt: str | Path, out: str | Path, fmt: str | None = None, config: str | Path | None = None
) -> Path:
    """Export checkpoint `ckpt` to `out` in `fmt` (default: ccmp for CCMP, lora for FlowGRPO, else diffusers)."""
    module = load_module(ckpt, config)
    if fmt is None:
        name = type(module).__name__
        fmt = "ccmp" if name == "CCMP" else "lora" if name == "FlowGRPO" else "diffusers"
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return {"diffusers": export_diffusers, "lora": export_lora, "ccmp": export_ccmp}[fmt](module, out)


def main(argv: list[str] | None = None) -> None:
    """`omnilab export CKPT --out DIR [--format diffusers|lora|ccmp] [--config RUN/config.yaml]`."""
    parser = argparse.ArgumentParser(
        prog="omnilab export",
        description="Export a checkpoint: a diffusers pipeline folder, diffusers LoRA weights, or CCMP safetensors.",
    )
    parser.add_argument("checkpoint", help="a .ckpt file, or the folder of a sharded FSDP checkpoint")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--format", choices=FORMATS, help="default: ccmp for CCMP, lora for FlowGRPO, else diffusers"
    )
    parser.add_argument(
        "--config", help="the run's config.yaml (default: found beside or above the checkpoint)"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    print(f"wrote {export(args.checkpoint, args.out, args.format, args.config)}")
