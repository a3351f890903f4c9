"""Cached VAE latents and text states for the flow methods: `omnilab data cache` and the cached training path.

A FlowEdit model's VAE and text encoder are frozen, so what they make of a training sample never changes:
`write_cache` runs them once over a multiref shard set and writes shards of their outputs; the datamodule's
`cache_dir` (datamodules/multiref.py) then streams those instead of images, and `FlowEdit.training_step` skips
both encoders for a batch that carries them (docs/data.md "Cached latents and text states").

The cached shard set mirrors the raw one: one output shard per input shard, with the same name
(`train-000003.tar`) and the samples in the same order, so the training stream (shard permutation, shuffle,
resume) visits the same keys in the same order as on the raw shards. Members of one cached sample:
- `<key>.json`: the raw `.json` plus `{"cached": {"ref_budget": int, "ref_pixel_cap": int, "family": str}}`
  (the references were resized under `ref_budget` when the cache was written: a cache has one budget).
- `<key>.target.npy`: the target's latent, float32 [C, h, w] (the codec's normalised latents).
- `<key>.ref0.npy` ... `<key>.ref5.npy`: the references' latents, float32 [C, h_k, w_k], `n_refs` of them.
- `<key>.text.npy`: the text states of the instruction, float32 [T, D] (T: the encoder's real tokens).
- `<key>.pooled.npy`: the pooled text vector, float32 [P] (SD3 and FLUX; absent for Qwen).
Only `.json` and `.npy` (allow_pickle=False) members: nothing is unpickled.

Writing is resumable per shard: a shard is written to `<name>.tmp` and renamed when complete, and a shard
already present is skipped; index.json (counts per shard, as the synth and convert steps write it) comes last.
Evaluation keeps reading the raw images (sampling needs pixels); only training reads the cache.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from torch import Tensor

from datamodules.webdataset import (
    BadSample,
    SkipSample,
    decode_sample,
    encode_member,
    expand_shards,
    iter_raw_samples,
    write_index,
)


def cached_members(
    example: dict[str, Any], refs: Sequence[Tensor], target: Tensor, text: Any, row: int
) -> dict:
    """The members of one cached sample: latents, the text states of batch row `row` (real tokens only), json."""
    mask = text.mask[row].bool()
    members: dict[str, Any] = {
        "__key__": example["__key__"],
        "json": {
            **example["meta"],
            "cached": {
                "ref_budget": int(example["ref_budget"]),
                "ref_pixel_cap": int(example["ref_pixel_cap"]),
            },
        },
        "target.npy": target.float().cpu().numpy(),
        "text.npy": text.hidden[row][mask].float().cpu().numpy(),
    }
    for k, ref in enumerate(refs):
        members[f"ref{k}.npy"] = ref.float().cpu().numpy()
    if text.pooled is not None:
        members["pooled.npy"] = text.pooled[row].float().cpu().numpy()
    return members


def _write_tar(path: Path, samples: list[dict[str, Any]]) -> None:
    """Write samples to a tar at `path` (through `<path>.tmp`, renamed when complete)."""
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for ext in sorted(k for k in sample if not k.startswith("__")):
                data = encode_member(ext, sample[ext])
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


@torch.no_grad()
def encode_examples(model: Any, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run the model's frozen VAE and text encoder over a list of transformed examples -> cached members."""
    flat = [r.to(model.device) for e in examples for r in e["refs"]] + [
        e["target"].to(model.device) for e in examples
    ]
    latents = model.codec(flat)
    text = model.text_encoder([e["instruction"] for e in examples], [list(e["refs"]) for e in examples])
    members, i = [], 0
    for row, e in enumerate(examples):
        refs = latents[i : i + len(e["refs"])]
        i += len(e["refs"])
        members.append(cached_members(e, refs, latents[len(flat) - len(examples) + row], text, row))
    return members


def cache_split(
    model: Any, datamodule: Any, split: str, out_dir: str | Path, batch_size: int = 8
) -> dict[str, Any]:
    """Cache every shard of one split (skipping shards already written); -> the split's index entry."""
    spec = datamodule.shard_spec(split)
    if spec is None:
        raise FileNotFoundError(f"no {split} shards in {datamodule.data_dir} to cache")
    shards = expand_shards(spec)
    transform = datamodule.transform(False)  # no task thinning, no text dropout: every sample, once
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names, counts, skipped = [], [], 0
    with Progress(transient=True) as progress:
        task = progress.add_task(f"cache {split}", total=len(shards))
        for url in shards:
            name = Path(url).name
            target = out_dir / name
            names.append(name)
            if target.is_file():  # resumable: written completely by an earlier run
                counts.append(sum(1 for _ in iter_raw_samples(str(target))))
                progress.advance(task)
                continue
            examples, samples = [], []
            for raw in iter_raw_samples(url):
                try:
                    example = transform(decode_sample(raw, datamodule.required), np.random.default_rng(0))
                except (BadSample, SkipSample):
                    skipped += 1
                    continue
                example["__key__"] = raw["__key__"]
                examples.append(example)
            for start in range(0, len(examples), batch_size):
                samples += encode_examples(model, examples[start : start + batch_size])
            _write_tar(target, samples)
            counts.append(len(samples))
            progress.advance(task)
    return {"shards": names, "counts": counts, "samples": sum(counts), "skipped": skipped}


class FrozenEncoders(torch.nn.Module):
    """A FlowEdit model's frozen VAE (`LatentCodec`) and text encoder, built from its `vae` and `text` specs alone."""

    def __init__(self, family: str, vae: dict[str, Any], text: dict[str, Any]) -> None:
        super().__init__()
        from diffusers import AutoencoderKL, AutoencoderKLQwenImage

        from lightning_modules.components.backbones import build_backbone
        from lightning_modules.components.text import build_text_encoder
        from lightning_modules.flow_edit import BACKENDS, TEXT_FAMILY, LatentCodec

        if family not in BACKENDS:
            raise ValueError(f"model.backbone.family {family!r}: choose one of {', '.join(BACKENDS)}")
        self.family = family
        vae_cls = AutoencoderKLQwenImage if family == "qwen_image_edit" else AutoencoderKL
        self.codec = LatentCodec(build_backbone(vae_cls, **vae))
        self.text_encoder = build_text_encoder(**{"family": TEXT_FAMILY[family], **text})
        self.requires_grad_(False).eval()

    @property
    def device(self) -> torch.device:
        """The device of the encoders' weights."""
        return next(self.parameters()).device


def write_cache(
    encoders: Any,
    datamodule: Any,
    out_dir: str | Path,
    splits: Sequence[str] = ("train",),
    batch_size: int = 8,
) -> Path:
    """Cache the given splits of a multiref shard set with frozen encoders (`FrozenEncoders` or a FlowEdit)."""
    if hasattr(encoders, "configure_model"):
        encoders.configure_model()
    encoders.eval()
    index = {split: cache_split(encoders, datamodule, split, out_dir, batch_size) for split in splits}
    return write_index(
        out_dir,
        kind="multiref-cache",
        family=encoders.family,
        budget=datamodule.pixel_budget,
        source=str(datamodule.data_dir),
        splits=index,
    )


def load_experiment(configs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{"model": {class_path, init_args}, "data": {...}} of experiment YAMLs (with their `defaults`), merged."""
    import yaml

    from omnilab.cli import expand_defaults

    merged: dict[str, dict[str, Any]] = {"model": {"init_args": {}}, "data": {"init_args": {}}}
    argv = expand_defaults([a for c in configs for a in ("--config", c)])
    for path in argv[1::2]:
        doc = yaml.safe_load(Path(path).read_text()) or {}
        for section in ("model", "data"):
            part = doc.get(section) or {}
            if "class_path" in part:
                merged[section]["class_path"] = part["class_path"]
            merged[section]["init_args"].update(part.get("init_args") or {})
    return merged


def main(argv: Sequence[str]) -> Path:
    """`omnilab data cache --config EXP.yaml --out DIR [--split train] [--data-dir DIR] [--batch-size N]`."""
    import argparse

    from omnilab.allowlist import check_import_path

    parser = argparse.ArgumentParser(
        prog="omnilab data cache",
        description="Write VAE latents and text states of a multiref shard set with an experiment's frozen encoders.",
    )
    parser.add_argument("--config", action="append", required=True, help="the experiment YAML (repeatable)")
    parser.add_argument("--out", required=True, help="the cache folder (then data.cache_dir)")
    parser.add_argument("--split", action="append", help="splits to cache (default: train)")
    parser.add_argument("--data-dir", help="the raw shard set (default: the experiment's data.data_dir)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per encoder call")
    parser.add_argument(
        "--ckpt",
        help="take the encoders from this checkpoint (needed when they are random-init, as in tiny runs)",
    )
    args = parser.parse_args(list(argv))
    exp = load_experiment(args.config)
    model_args, data = exp["model"]["init_args"], exp["data"]
    for section in (exp["model"], data):
        check_import_path(section.get("class_path", ""))
    import importlib

    module, _, name = data["class_path"].rpartition(".")
    data_cls = getattr(importlib.import_module(module), name)
    data_args = {**data["init_args"], **({"data_dir": args.data_dir} if args.data_dir else {})}
    data_args.pop("cache_dir", None)
    datamodule = data_cls(**data_args)
    datamodule.prepare_data()
    if args.ckpt:
        from omnilab.export import load_module

        encoders = load_module(args.ckpt, class_path=exp["model"].get("class_path"))
    else:
        random_init = [k for k in ("vae", "text") if not (model_args.get(k) or {}).get("pretrained")]
        if random_init:
            parser.error(
                f"model.{random_init[0]} is random-init (a `config`, no `pretrained`): its weights exist only in a "
                "run, so give that run's checkpoint with --ckpt (a cache from fresh random weights would not match)"
            )
        backbone = model_args.get("backbone") or {}
        encoders = FrozenEncoders(backbone.get("family"), model_args["vae"], model_args["text"])
    index = write_cache(encoders, datamodule, args.out, args.split or ["train"], args.batch_size)
    print(f"wrote {index}")
    return index


# --- reading ----------------------------------------------------------------------------------------------


def cached_example(sample: dict[str, Any]) -> dict[str, Any]:
    """A decoded cached sample -> the example the cached collate expects; BadSample when a member is missing."""
    meta = sample.get("json")
    if not isinstance(meta, dict) or "cached" not in meta:
        raise BadSample(".json has no `cached` block: not a sample written by `omnilab data cache`")
    n = int(meta.get("n_refs", 0))
    missing = [m for m in ("target.npy", "text.npy", *(f"ref{k}.npy" for k in range(n))) if m not in sample]
    if missing:
        raise BadSample(f"cached sample lacks {', '.join('.' + m for m in missing)}")
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return {
        "cached": True,
        "ref_latents": [as_tensor(sample[f"ref{k}.npy"]) for k in range(n)],
        "target_latent": as_tensor(sample["target.npy"]),
        "text": as_tensor(sample["text.npy"]),
        "pooled": as_tensor(sample["pooled.npy"]) if "pooled.npy" in sample else None,
        "instruction": meta.get("instruction", ""),
        "task": meta.get("task", ""),
        "n_refs": n,
        "ref_budget": int(meta["cached"]["ref_budget"]),
        "ref_pixel_cap": int(meta["cached"]["ref_pixel_cap"]),
        "meta": {k: v for k, v in meta.items() if k != "cached"},
    }


def cached_transform(sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """The training transform of a cached shard set (`MultiRefDataModule(cache_dir=...)`); `rng` is unused."""
    return cached_example(sample)


def collate_cached(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Cached examples -> a batch: `cached` = {refs, target (latents), text: [B, T, D], mask [B, T], pooled}."""
    from lightning_modules.components.packed_dit import TextConditioning

    length = max(1, max(e["text"].shape[0] for e in examples))
    width = examples[0]["text"].shape[-1]
    hidden = torch.zeros(len(examples), length, width)
    mask = torch.zeros(len(examples), length, dtype=torch.bool)
    for i, e in enumerate(examples):
        hidden[i, : len(e["text"])], mask[i, : len(e["text"])] = e["text"], True
    pooled = None if examples[0]["pooled"] is None else torch.stack([e["pooled"] for e in examples])
    return {
        "cached": {
            "refs": [e["ref_latents"] for e in examples],
            "target": [e["target_latent"] for e in examples],
            "text": TextConditioning(hidden=hidden, mask=mask, pooled=pooled),
        },
        "instruction": [e["instruction"] for e in examples],
        "task": [e["task"] for e in examples],
        "n_refs": torch.tensor([e["n_refs"] for e in examples], dtype=torch.int64),
        "ref_budget": torch.tensor([e["ref_budget"] for e in examples], dtype=torch.int64),
        "ref_pixel_cap": torch.tensor([e["ref_pixel_cap"] for e in examples], dtype=torch.int64),
        "meta": [e["meta"] for e in examples],
        "__key__": [e.get("__key__", "") for e in examples],
    }


def iter_cached(path: str | Path) -> Iterator[dict[str, Any]]:
    """The cached examples of one shard, in order (for inspection and tests)."""
    for raw in iter_raw_samples(str(path)):
        example = cached_example(decode_sample(raw, ("json",)))
        example["__key__"] = raw["__key__"]
        yield example
