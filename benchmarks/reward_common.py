"""What the reward-model benchmarks share: the tint-edit items, the tiny reward models, training and scoring.

The mini-replications (benchmarks/reward_replication.py, benchmarks/reward_rl_replication.py) need preference
data a random-init tiny VLM learns within a few hundred CPU steps. The object-level edits of `omnilab data synth
preference` are not (a 64 px scene gives each object part of one VLM token; measured: held-out pairwise
accuracy stays at chance after 500 steps), so the benchmarks use whole- and half-image tint edits whose
quality is known exactly: a source of one flat colour (with pixel noise), the instruction "Make image 1 red" or
"Make the left half of image 1 red", and two candidates of these kinds (the scores of
datamodules/synth/preference.py's table; wrong_colour scores as wrong_region):

- correct: the asked region in the asked colour; wrong_colour: another colour there;
- wrong_region (local): the other half (a half instruction) or only a half (a whole-image instruction);
- over_edit: the whole image (a half instruction) or an extra quadrant in another colour (a whole-image one);
- artifacts (local): the correct edit with blocky colour noise over one quadrant of the edited region;
- no_edit: the source.

Items are written as shards of `datamodules/preference.py` (boxes, rationales, verdicts included) and read
back through `PreferenceDataModule`, so the benchmarks train through the real data path.

The tiny backbone: a 1-layer Qwen3-VL (width 64) with `initializer_range` 0.5: at the library's 0.02 the
reward token's last hidden state hardly depends on the images (its spread across inputs is ~1% of its norm),
the heads' ReLUs die and BT stays at log 2 (measured); at 0.5 the same model learns a colour instruction in
~250 steps.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from datamodules.preference import PreferenceDataModule
from datamodules.synth.preference import SCORE_RANGES, png, ranking
from datamodules.webdataset import ShardWriter, write_index
from lightning_modules.reward_models import pq_score, sc_score, spatial_reward
from omnilab.seeding import numpy_rng

PALETTE = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 40)}
HALVES = {
    "left": (0.0, 0.0, 0.5, 1.0),
    "right": (0.5, 0.0, 1.0, 1.0),
    "top": (0.0, 0.0, 1.0, 0.5),
    "bottom": (0.0, 0.5, 1.0, 1.0),
}
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
FULL = (0.0, 0.0, 1.0, 1.0)
TINT_KINDS = ("correct", "wrong_colour", "wrong_region", "over_edit", "artifacts", "no_edit")
LOCAL = ("wrong_region", "artifacts")
TEXT = {"initializer_range": 0.5, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}  # fmt: skip
VERDICT_TOKENS = ['{"edit_region": [', '{"id": ', ', "label": "', '", "bbox_2d": [', ']}', '], "reasoning": "',
                  '{"reasoning": "', '", "score": [', '<|global|>', '<|bbox_0|>', '<|bbox_1|>', ' half', ' left',
                  ' right', ' top', ' bottom', ' red', ' green', ' blue', ' yellow', ' the', ' image', ' asked',
                  ' instead', ' unchanged', ' noise', ' quadrant', ' whole', ' natural', ' edit', ' not']  # fmt: skip


def backbone(size: int) -> dict[str, Any]:
    """The tiny Qwen3-VL spec (images at size x size: (size / 32)^2 merged tokens each)."""
    return {
        "family": "qwen3_vl",
        "config": {"text_config": TEXT, "vision_config": {"initializer_range": 0.5, "depth": 1, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4}},
        "tokenizer": {"vocab_size": 512},
        "image_processor": {"min_pixels": 64 * 64 - 1000, "max_pixels": 64 * 64},
        "extra_tokens": VERDICT_TOKENS,
    }  # fmt: skip


def _grid(box: tuple[float, ...]) -> list[int]:
    return [round(1000 * v) for v in box]


def _paint(img: np.ndarray, box: tuple[float, ...], rgb: tuple[int, ...], rng: np.random.Generator) -> None:
    """Fill a box (fractions x0, y0, x1, y1) with a colour plus pixel noise (+-12)."""
    h, w = img.shape[:2]
    x0, y0, x1, y1 = round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)
    noise = rng.integers(-12, 13, (y1 - y0, x1 - x0, 3))
    img[y0:y1, x0:x1] = np.clip(np.asarray(rgb)[None, None] + noise, 0, 255)


def _blocks(img: np.ndarray, box: tuple[float, ...], rng: np.random.Generator) -> None:
    """Blocky colour noise (blocks of 1/8 of the side) over a box."""
    h, w = img.shape[:2]
    x0, y0, x1, y1 = round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)
    b = max(1, w // 8)
    for y in range(y0, y1, b):
        for x in range(x0, x1, b):
            img[y : min(y + b, y1), x : min(x + b, x1)] = rng.integers(0, 256, 3)


def _quadrant_in(box: tuple[float, ...], rng: np.random.Generator) -> tuple[float, ...]:
    """A random quadrant of a box."""
    x0, y0, x1, y1 = box
    mx, my = (x0 + x1) / 2, (y0 + y1) / 2
    quads = [(x0, y0, mx, my), (mx, y0, x1, my), (x0, my, mx, y1), (mx, my, x1, y1)]
    return quads[int(rng.integers(4))]


def tint_item(
    rng: np.random.Generator, size: int, half_share: float = 0.5, whole_colour: str | None = None
) -> dict[str, Any]:
    """One item as shard members minus the key (see the module doc): json, src0.png, cand0.png, cand1.png."""
    names = list(PALETTE)
    colour = whole_colour or str(rng.choice(names))
    source_colour = str(rng.choice([c for c in names if c != colour]))
    other = str(rng.choice([c for c in names if c not in (colour, source_colour)]))
    half = str(rng.choice(list(HALVES))) if whole_colour is None and rng.random() < half_share else None
    target = HALVES[half] if half else FULL
    where = f"the {half} half of image 1" if half else "image 1"
    instruction = f"Make {where} {colour}."
    source = np.zeros((size, size, 3), np.int64)
    _paint(source, FULL, PALETTE[source_colour], rng)
    kinds = [str(k) for k in rng.choice(TINT_KINDS, size=2, replace=False)]
    images, records = [], []
    for kind in kinds:
        img = source.copy()
        regions: list[tuple[str, tuple[float, ...]]] = []
        if kind == "correct":
            _paint(img, target, PALETTE[colour], rng)
            regions = [(f"{colour} {half or 'image'}", target)]
            detail = f"the {half + ' half' if half else 'image'} is now {colour}, as asked"
        elif kind == "wrong_colour":
            _paint(img, target, PALETTE[other], rng)
            regions = [(f"{other} {half or 'image'}", target)]
            detail = f"the {half + ' half' if half else 'image'} turned {other}, not {colour}"
        elif kind == "wrong_region":
            wrong = OPPOSITE[half] if half else str(rng.choice(list(HALVES)))
            _paint(img, HALVES[wrong], PALETTE[colour], rng)
            regions = [(f"{colour} {wrong} half", HALVES[wrong])]
            detail = (
                f"the {wrong} half turned {colour} instead of the {half + ' half' if half else 'whole image'}"
            )
        elif kind == "over_edit":
            _paint(img, FULL, PALETTE[colour], rng)
            regions = [(f"{colour} image", FULL)]
            if not half:
                quad = _quadrant_in(FULL, rng)
                _paint(img, quad, PALETTE[other], rng)
                regions.append((f"{other} quadrant", quad))
            detail = f"the image is {colour}, but more than asked changed"
        elif kind == "artifacts":
            _paint(img, target, PALETTE[colour], rng)
            quad = _quadrant_in(target, rng)
            _blocks(img, quad, rng)
            regions = [(f"{colour} {half or 'image'}", target), ("noisy quadrant", quad)]
            detail = (
                f"the {half + ' half' if half else 'image'} is {colour}, but a quadrant is covered by noise"
            )
        else:
            detail = ""
        drawn = [
            int(rng.integers(lo, hi + 1))
            for lo, hi in SCORE_RANGES["wrong_region" if kind == "wrong_colour" else kind]
        ]
        sc, pq = drawn[:2], drawn[2:]
        cites = " ".join(f"<|bbox_{i}|>" for i in range(len(regions)))
        overall = (
            "the edit is unchanged from the source"
            if kind == "no_edit"
            else ("the instruction is followed" if kind == "correct" else "the edit is not what was asked")
        )
        reasoning = (f"{cites} {detail}. " if regions else "") + f"<|global|> {overall}."
        images.append(img.astype(np.uint8))
        records.append(
            {
                "kind": kind,
                "boxes": [_grid(b) for _, b in regions],
                "rationale": f"{detail[:1].upper()}{detail[1:]}; {overall}."
                if detail
                else f"{overall[:1].upper()}{overall[1:]}.",
                "verdict": {
                    "sc": {
                        "edit_region": [
                            {"id": i, "label": lab, "bbox_2d": _grid(b)} for i, (lab, b) in enumerate(regions)
                        ],
                        "reasoning": reasoning,
                        "score": sc,
                    },
                    "pq": {
                        "reasoning": "Blocky noise covers part of the image."
                        if kind == "artifacts"
                        else "The image looks natural.",
                        "score": pq,
                    },
                },
            }
        )
    rewards = [
        spatial_reward(sc_score(*r["verdict"]["sc"]["score"]), pq_score(*r["verdict"]["pq"]["score"]))
        for r in records
    ]
    meta = {
        "instruction": instruction, "n_sources": 1, "n_candidates": 2, "ranking": ranking(rewards), "source": "tint",
        "benchmark": "synth", "orig_id": "", "task_type": "half" if half else "whole",
        "quality": [r["kind"] for r in records], "local_error": [r["kind"] in LOCAL for r in records],
        "boxes": [r["boxes"] for r in records], "rationales": [r["rationale"] for r in records],
        "verdicts": [r["verdict"] for r in records], "rewards": rewards,
    }  # fmt: skip
    return {
        "json": meta,
        "src0.png": png(source.astype(np.uint8)),
        "cand0.png": png(images[0]),
        "cand1.png": png(images[1]),
    }


def write_items(root: Path, counts: dict[str, int], seed: int, size: int, **options: Any) -> Path:
    """Tint items for each split under `root` (shards + index.json)."""
    splits = {}
    for split, count in counts.items():
        with ShardWriter(root, split, max_count=256) as writer:
            for index in range(count):
                writer.write(
                    {
                        "__key__": f"{split}_{index:06d}",
                        **tint_item(numpy_rng(seed, "tint", split, index), size, **options),
                    }
                )
        splits[split] = {"samples": count}
    return write_index(root, kind="preference", seed=seed, splits=splits)


def datamodule(root: Path, batch_size: int = 8, seed: int = 0) -> PreferenceDataModule:
    """The preference data module over tint shards (pairs for training, items for evaluation)."""
    return PreferenceDataModule(
        data_dir=str(root),
        batch_size=batch_size,
        eval_batch_size=32,
        batches_per_epoch=100_000,
        synth=False,
        seed=seed,
    )


def fit(model: L.LightningModule, dm: PreferenceDataModule, steps: int) -> float:
    """Train with Lightning for `steps` on CPU (no logger, no checkpoint); return the seconds it took."""
    import time

    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    return time.perf_counter() - start


@torch.no_grad()
def pair_accuracy(model: Any, dm: PreferenceDataModule) -> dict[str, float]:
    """Held-out pairwise accuracy over strict pairs: all, pairs with a local error, pairs without; unscored counts.

    An unscored candidate (NaN: a verdict that did not parse) ranks below a scored one; two unscored tie (wrong).
    """
    model.eval()
    stats: dict[str, list[int]] = {"all": [0, 0], "local": [0, 0], "global": [0, 0]}
    unscored = candidates = 0
    for batch in dm.val_dataloader():
        for scores, tiers, meta in zip(model.score_items(batch), batch["tiers"], batch["meta"]):
            s = torch.where(torch.isnan(scores), -torch.inf, scores)
            unscored += int(torch.isnan(scores).sum())
            candidates += len(scores)
            for i, j in itertools.combinations(range(len(tiers)), 2):
                if tiers[i] == tiers[j]:
                    continue
                ok = bool((s[i] - s[j]) * (tiers[j] - tiers[i]) > 0)
                group = "local" if any(meta["local_error"][k] for k in (i, j)) else "global"
                for key in ("all", group):
                    stats[key][0] += ok
                    stats[key][1] += 1
    model.train()
    out = {k: (c / n if n else float("nan")) for k, (c, n) in stats.items()}
    out["unscored"] = unscored / max(candidates, 1)
    return out


def mean_spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of a few seeds' values."""
    arr = np.asarray(
        [v for v in values if v == v], dtype=np.float64
    )  # NaN (a run without the value) left out
    if not len(arr):
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
