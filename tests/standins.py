"""Tiny stand-ins of the released weights the paper configs load, written in each release's layout and dtypes.

A paper config names hub releases (`pretrained: Qwen/Qwen-Image-Edit-2511`, `subfolder: transformer`). The
paper-config tests replace only the hub id by a local folder that looks like the release: the same subfolders,
config files, safetensors and tokenizer/processor files, in the dtype of the release's files. Every part is a
tiny random-init model built from the `config:` that the method's tiny experiment gives the same argument, so
the config's own `from_pretrained` path runs unchanged.

`RELEASES` is the one table that knows the releases: their layout, the dtype of each part's files, and their
licence gate (README's table of paper configs says the same). A hub id it does not know fails with a message
that says what to add. Weights a user writes locally with a named conversion (a paper config's `pretrained:
checkpoints/...`, e.g. LlamaGen's VQ through `convert_llamagen_checkpoint`) are entries too, keyed by the path the
config names: the stand-in is written through the same conversion, so the folder is the one the user would have.

Where the tiny experiment's model belongs to another family than the release (editreward/tiny runs a tiny
Qwen3-VL, editreward/baseline loads Qwen2.5-VL), the stand-in is built in the release's family from
`TINY_VLM[family]` here, keeping the tiny spec's tokenizer, image processor and extra tokens.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32


@dataclass(frozen=True)
class Release:
    """How a hub release is laid out and stored.

    layout: "vlm" (a transformers VLM folder: config, safetensors, tokenizer and image processor files),
        "qwen_image_edit" (a diffusers QwenImageEditPlusPipeline folder: transformer/, vae/, text_encoder/,
        tokenizer/, processor/, scheduler/), "sd3" (a StableDiffusion3Pipeline folder: transformer/, vae/,
        text_encoder/ + _2 (CLIP-L, CLIP-G with projection), text_encoder_3 (T5), tokenizer/ + _2 + _3,
        scheduler/), "transformers" (one model folder: config.json + model.safetensors), "vlm" (one
        Qwen-VL folder: config.json + model.safetensors, tokenizer files, preprocessor_config.json, as
        `components.vlm.VisionLanguageModel.save_pretrained` writes it), "lumina_chameleon" (a Lumina-mGPT
        folder: a Chameleon config.json + safetensors without the VQGAN, and its Chameleon-style tokenizer) or
        "llamagen_vq" (the folder `components.vq.convert_llamagen_checkpoint` writes from LlamaGen's `.pt`).
    dtypes: The dtype of each part's weight files (by subfolder; "model" for a one-model folder).
    gate: The licence and whether the hub asks to accept it before download (for a converted local folder:
        the licence of what it was converted from).
    model_class: For "transformers": the class (module path) the folder holds.
    family: For "vlm": the release's `build_vlm` family ("qwen2_5_vl", "qwen3_vl").
    tokenizer: For "lumina_chameleon": the offline tokenizer spec standing in for the release's tokenizer.
    """

    layout: str
    dtypes: dict[str, torch.dtype]
    gate: str
    model_class: str | None = None
    family: str | None = None
    tokenizer: dict[str, Any] | None = None

    @property
    def one_folder(self) -> bool:
        """Whether the release is one model folder (its part is "model"), not a pipeline of subfolders."""
        return self.layout in ONE_FOLDER


QWEN_EDIT = Release(
    "qwen_image_edit",
    {"transformer": bf16, "vae": bf16, "text_encoder": bf16},  # Qwen-Image ships every part in bf16
    "Apache-2.0, not gated",
)
ONE_FOLDER = frozenset({"transformers", "vlm", "lumina_chameleon", "llamagen_vq"})
QWEN_VL = "Apache-2.0, not gated"
UNIPIC3 = Release(
    "qwen_image_edit",
    {
        "transformer": bf16,
        "vae": bf16,
        "text_encoder": bf16,
    },  # as the Qwen-Image-Edit base (assumed, not checked)
    "the licence on the Skywork model card (not checked here), not gated",
)
RELEASES: dict[str, Release] = {
    "Qwen/Qwen-Image-Edit-2511": QWEN_EDIT,
    "Qwen/Qwen-Image-Edit-2509": QWEN_EDIT,
    "Qwen/Qwen-Image-Edit": QWEN_EDIT,
    # UniPic 3.0's teacher and its two 8-step students: QwenImageEditPlusPipeline folders like their base
    "Skywork/Unipic3": UNIPIC3,
    "Skywork/Unipic3-Consistency-Model": UNIPIC3,
    "Skywork/Unipic3-DMD": UNIPIC3,
    "stabilityai/stable-diffusion-3.5-medium": Release(
        "sd3",
        # the MMDiT in bf16 (as its model card loads it); VAE, CLIP-L/G and T5-XXL files in fp16
        {
            "transformer": bf16,
            "vae": fp16,
            "text_encoder": fp16,
            "text_encoder_2": fp16,
            "text_encoder_3": fp16,
        },
        "Stability AI Community License, gated (accept on the hub, then `huggingface-cli login`)",
    ),
    "facebook/dinov3-vitl16-pretrain-lvd1689m": Release(
        "transformers",
        {"model": fp32},
        "DINOv3 License, gated (accept on the hub)",
        "transformers.DINOv3ViTModel",
    ),
    "facebook/dinov3-convnext-large-pretrain-lvd1689m": Release(
        "transformers",
        {"model": fp32},
        "DINOv3 License, gated (accept on the hub)",
        "transformers.DINOv3ConvNextModel",
    ),
    # the Qwen-VL instruct releases: bf16 safetensors shards, tokenizer (vocab/merges/tokenizer.json), and a
    # preprocessor_config.json (Qwen2-VL image processor) in one folder
    "Qwen/Qwen2.5-VL-7B-Instruct": Release("vlm", {"model": bf16}, QWEN_VL, family="qwen2_5_vl"),
    "Qwen/Qwen3-VL-8B-Instruct": Release("vlm", {"model": bf16}, QWEN_VL, family="qwen3_vl"),
    "Qwen/Qwen2.5-VL-3B-Instruct": Release(
        "vlm", {"model": bf16}, "Qwen Research License, not gated", family="qwen2_5_vl"
    ),
    # Assumed layout of nonwhy/PURE (read from github.com/nonwhy/PURE, not from the hub's file list): a Lumina-mGPT
    # folder that `ChameleonForConditionalGeneration.from_pretrained("nonwhy/PURE")` reads (inference_solver.py)
    # and that also holds the tokenizer (data/item_processor.py: `tokenizer="nonwhy/PURE"`); bf16 weights (a 7B
    # Lumina-mGPT checkpoint saved from bf16 FSDP training, loaded with precision="bf16"); no VQ of its own (the
    # README has the user download LlamaGen's vq_ds8_c2i.pt). Its tokenizer holds Chameleon's 8,192 image tokens
    # plus 8,192 more (inference_solver.py: ids 4-8195 and 65536-73727) for LlamaGen's 16,384 codes: the stand-in's
    # offline tokenizer has the same 16,384 image codes over a small text vocabulary.
    "nonwhy/PURE": Release(
        "lumina_chameleon",
        {"model": bf16},
        "MIT (github.com/nonwhy/PURE; the weights derive from Chameleon, Meta's Chameleon Research License), not gated",
        tokenizer={"kind": "chameleon", "vocab_size": 1024, "image_codes": 16384},
    ),
    # a local folder (pure/paper.yaml names it): LlamaGen's vq_ds8_c2i.pt (FoundationVision/LlamaGen, fp32
    # weights) converted with convert_llamagen_checkpoint, which writes the model's fp32 parameters
    "checkpoints/llamagen_vq_ds8": Release(
        "llamagen_vq", {"model": fp32}, "MIT (FoundationVision/LlamaGen vq_ds8_c2i.pt), not gated"
    ),
}

# A tiny config per VLM family, for a release whose family differs from the tiny experiment's (module doc).
TINY_VLM: dict[str, dict[str, Any]] = {
    "qwen2_5_vl": {
        "text_config": {
            "initializer_range": 0.5,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        },
        "vision_config": {
            "initializer_range": 0.5,
            "depth": 1,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 4,
        },
    },
    "qwen3_vl": {
        "text_config": {
            "initializer_range": 0.5,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        },
        "vision_config": {
            "initializer_range": 0.5,
            "depth": 1,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 4,
        },
    },
}


LAYOUTS = ("qwen_image_edit", "sd3", "transformers", "vlm", "lumina_chameleon", "llamagen_vq")


def release(hub_id: str) -> Release:
    """The table entry of `hub_id`; an unknown id fails with what to add."""
    if hub_id not in RELEASES:
        raise KeyError(
            f"no stand-in is known for the release {hub_id!r}: add it to RELEASES in tests/standins.py (its layout: "
            f"{', '.join(LAYOUTS)} (transformers with the model class, vlm with its family), the dtype of each part's files as the "
            f"hub stores them, and its licence gate), and give the argument that loads it a `config:` in the "
            f"method's tiny experiment"
        )
    return RELEASES[hub_id]


def _import(path: str) -> Any:
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _save(model: torch.nn.Module, folder: Path, dtype: torch.dtype) -> None:
    """save_pretrained in `dtype` as safetensors (diffusers and transformers both)."""
    model.to(dtype).save_pretrained(folder, safe_serialization=True)


def write_standin(hub_id: str, parts: dict[str, dict[str, Any]], root: Path) -> Path:
    """Write the stand-in of `hub_id` under `root` and return its folder (reused when already written).

    parts: {part: the tiny spec (`{config: ..., tokenizer: ..., family: ...}`) of the argument that loads it}:
    "transformer" (the DiT, with its `family`), "vae", "text" (the text encoders, tokenizers, processor) for a
    pipeline layout; "model" for a one-model folder.
    """
    entry = release(hub_id)
    key = hashlib.sha1(json.dumps([hub_id, parts], sort_keys=True, default=str).encode()).hexdigest()[:10]
    folder = root / f"{hub_id.replace('/', '--')}-{key}"
    if (folder / ".complete").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    if entry.layout == "transformers":
        cls = _import(entry.model_class)
        _save(cls(cls.config_class(**parts["model"]["config"])), folder, entry.dtypes["model"])
    elif entry.layout == "vlm":
        _write_vlm(entry, parts["model"], folder)
    elif entry.layout == "lumina_chameleon":
        _write_lumina(entry, parts["model"], folder)
    elif entry.layout == "llamagen_vq":
        _write_llamagen_vq(parts["model"], folder)
    else:
        _write_pipeline(entry, parts, folder)
    (folder / ".complete").write_text(hub_id)
    return folder


def _write_vlm(entry: Release, spec: dict[str, Any], folder: Path) -> None:
    """A Qwen-VL release: build_vlm from the tiny spec (in the release's family), saved as the hub holds it."""
    from lightning_modules.components.vlm import build_vlm

    family = entry.family
    config = spec["config"] if spec.get("family", "qwen2_5_vl") == family else TINY_VLM[family]
    vlm = build_vlm(
        family,
        config=config,
        tokenizer=spec.get("tokenizer"),
        image_processor=spec.get("image_processor"),
        extra_tokens=spec.get("extra_tokens"),
    )
    vlm.model.to(entry.dtypes["model"])
    vlm.save_pretrained(folder)


def _write_lumina(entry: Release, spec: dict[str, Any], folder: Path) -> None:
    """A Lumina-mGPT / PURE release: the Chameleon LM (no VQGAN) and its Chameleon-style tokenizer beside it."""
    from transformers import ChameleonConfig

    from lightning_modules.components.tokenizers import build_tokenizer
    from lightning_modules.pure import LuminaChameleon

    tokenizer = build_tokenizer(**entry.tokenizer)
    config = ChameleonConfig(**{"vocab_size": len(tokenizer), **spec["config"]})
    _save(LuminaChameleon(config), folder, entry.dtypes["model"])
    tokenizer.save_pretrained(folder)


def _write_llamagen_vq(spec: dict[str, Any], folder: Path) -> None:
    """LlamaGen's VQ as the user writes it: a `.pt` state dict in LlamaGen's format, through convert_llamagen_checkpoint."""
    from lightning_modules.components.vq import LLAMAGEN_VQ8, LlamaGenVQModel, convert_llamagen_checkpoint

    config = {**LLAMAGEN_VQ8, **spec["config"]}
    state = LlamaGenVQModel(**config).state_dict()
    state["quantize.codebook_used"] = torch.zeros(
        65536
    )  # the usage buffer LlamaGen saves (dropped on conversion)
    pt = folder.parent / f"{folder.name}.pt"
    torch.save({"model": state}, pt)
    convert_llamagen_checkpoint(pt, folder, **spec["config"])
    pt.unlink()


def _write_pipeline(entry: Release, parts: dict[str, dict[str, Any]], folder: Path) -> None:
    from diffusers import AutoencoderKL, AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler

    from lightning_modules.components.text import build_text_encoder
    from lightning_modules.flow_edit import BACKENDS

    qwen = entry.layout == "qwen_image_edit"
    index: dict[str, Any] = {
        "_class_name": "QwenImageEditPlusPipeline" if qwen else "StableDiffusion3Pipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    if "transformer" in parts:
        spec = parts["transformer"]
        cls = BACKENDS[spec["family"]].model_class
        _save(cls.from_config(spec["config"]), folder / "transformer", entry.dtypes["transformer"])
        index["transformer"] = ["diffusers", cls.__name__]
    if "vae" in parts:
        cls = AutoencoderKLQwenImage if qwen else AutoencoderKL
        _save(cls.from_config(parts["vae"]["config"]), folder / "vae", entry.dtypes["vae"])
        index["vae"] = ["diffusers", cls.__name__]
    if "text" in parts:
        spec = parts["text"]
        family = "qwen" if qwen else "sd3"
        encoder = build_text_encoder(family, config=spec["config"], tokenizer=spec.get("tokenizer"))
        if qwen:
            _save(encoder.model, folder / "text_encoder", entry.dtypes["text_encoder"])
            encoder.tokenizer.save_pretrained(folder / "tokenizer")
            encoder.image_processor.save_pretrained(folder / "processor")
            index |= {
                "text_encoder": ["transformers", type(encoder.model).__name__],
                "tokenizer": ["transformers", type(encoder.tokenizer).__name__],
                "processor": ["transformers", type(encoder.image_processor).__name__],
            }
        else:
            if len(encoder.clips) != 2 or encoder.t5 is None:
                raise ValueError(
                    f"the tiny `text` config has {len(encoder.clips)} CLIP(s) and "
                    f"{'a' if encoder.t5 is not None else 'no'} T5; the SD3 release has 2 CLIPs (text_encoder, "
                    "text_encoder_2) and a T5 (text_encoder_3): give the tiny config the same"
                )
            for suffix, clip, tok in zip(("", "_2"), encoder.clips, encoder.clip_tokenizers):
                _save(clip, folder / f"text_encoder{suffix}", entry.dtypes[f"text_encoder{suffix}"])
                tok.save_pretrained(folder / f"tokenizer{suffix}")
                index[f"text_encoder{suffix}"] = ["transformers", type(clip).__name__]
            _save(encoder.t5, folder / "text_encoder_3", entry.dtypes["text_encoder_3"])
            encoder.t5_tokenizer.save_pretrained(folder / "tokenizer_3")
            index["text_encoder_3"] = ["transformers", type(encoder.t5).__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def saved_dtypes(folder: Path) -> set[torch.dtype]:
    """The dtypes of the floating tensors in a folder's safetensors files (to check a stand-in's storage)."""
    from safetensors import safe_open

    dtypes = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            dtypes |= {f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    names = {"BF16": bf16, "F16": fp16, "F32": fp32}
    return {names[d] for d in dtypes if d in names}
