"""SCoT mini-replication: position and counting on held-out spatial prompts, text-only vs planner + layout-aware.

SCoT's claim (SCoT paper, arXiv 2602.11980; docs/methods/scot.md): a diffusion model trained on captions in the interleaved
text-coordinate format, given an MLLM planner's layout, follows spatial requests that a text-only model misses.
In miniature, on `omnilab data synth layout` scenes at `--side` px (by default only the test's kind: two flat
shapes in a GenEval relation, or one shape 2-4 times, on flat backgrounds, with dense captions; `--all-scenes`
adds the dense scenes with real-photo objects; text-to-image only), a tiny SD3-Kontext-style SCoT (4 layers,
width 64) is trained from scratch for `--steps` steps in each arm, with 3 seeds (init, data order, noise):

- text: the caption without coordinates ("a red circle left of a blue star on a white background"), no
  planner at test: the held-out caption itself (it names the relation or the count);
- inline (SCoT): the interleaved caption; at test the rule-based planner writes the plan of the held-out
  request ("a photo of a red circle left of a blue star", "a photo of three green stars");
- boxes (GLIGEN-style gated box tokens): the caption without coordinates plus the boxes; the same planner.

Held-out test: `--test` generated position and counting prompts (GenEval wording and metadata). Scored with the
exact colour detector (metrics/layout.py): GenEval's position rule and counting (exact count), and layout
fidelity against the plan (mIoU, share of planned boxes with IoU > 0.5). Controls, so the comparison means
something: (i) a trivial baseline that draws the requested objects exactly but at random places (a perfect
renderer that ignores the layout: chance level for position and mIoU; counting 1 by construction), and the
mean training image (what a model that ignores its input drifts towards); (ii) each layout-aware model with
the coordinates taken out of its plan at test ("plan removed"): if its scores fall, it uses the layout.

The tiny VAE is first fitted to the scenes (a random VAE decoder barely changes colour with its latents).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from benchmarks.common import record
from callbacks.images import make_grid, to_pil
from datamodules.multiref import image_tensor, resize_image
from datamodules.synth import layout as synth
from lightning_modules.components.layout import parse_layout
from lightning_modules.components.planners import RulePlanner
from lightning_modules.scot import SCoT
from metrics.layout import ColourDetector, layout_scores
from omnilab.seeding import numpy_rng

VAE = {
    "block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2, "latent_channels": 16, "norm_num_groups": 1, "layers_per_block": 1,
}  # fmt: skip
BACKBONE = {
    "family": "sd3_kontext",
    "config": {
        "sample_size": 32, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 4,
        "attention_head_dim": 16, "num_attention_heads": 4, "joint_attention_dim": 32,
        "caption_projection_dim": 64, "pooled_projection_dim": 32, "pos_embed_max_size": 32,
    },
}  # fmt: skip
TEXT = {
    "config": {
        "clip": [{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "projection_dim": 32, "max_position_embeddings": 16}],
        "t5": {"d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 1, "num_heads": 2},
    },
    "tokenizer": {"clip": {"model_max_length": 16}, "t5": {}},  # CLIP sees the caption's start only (as SD3's 77)
    "max_sequence_length": 96,  # the longest plan (four boxes) is 90 T5 tokens
}  # fmt: skip
ARMS = ("text", "inline", "boxes")
METRICS = ("position_acc", "counting_acc", "miou", "box_hit")


def items(split: str, count: int, seed: int, side: int, probes_only: bool = False) -> list[dict[str, Any]]:
    """Text-to-image samples of the layout generator, images resized to side x side in [-1, 1].

    `probes_only`: only the position / counting scenes of flat shapes on flat backgrounds (the test's kind).
    """
    out, index = [], 0
    while len(out) < count:
        sample = synth.make_sample(split, index, seed)
        index += 1
        meta = sample["json"]
        if meta["task"] != "t2i":
            continue
        if probes_only and ("geneval" not in meta or meta["background"]["kind"] != "flat"):
            continue
        image = image_tensor(
            np.asarray(Image.open(io.BytesIO(sample["target.png"])).convert("RGB")), "target"
        )
        out.append({"target": resize_image(image, (side, side)), "instruction": meta["instruction"], "meta": meta, "__key__": sample["__key__"]})  # fmt: skip
    return out


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Items -> a FlowEdit batch (no references)."""
    return {
        "refs": [[] for _ in batch],
        "target": [b["target"] for b in batch],
        "instruction": [b["instruction"] for b in batch],
        "meta": [b["meta"] for b in batch],
        "__key__": [b["__key__"] for b in batch],
    }


def fit_vae(images: list[torch.Tensor], out: Path, steps: int, seed: int) -> Path:
    """Fit the tiny AutoencoderKL to reconstruct the training scenes (MSE + 1e-6 KL); save it to `out`.

    Its shift and scaling factors are then set so that the training latents have mean 0 and std 1.
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE)
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    stack = torch.stack(images)
    for step in range(steps):
        if step % 100 == 0:
            print(f"VAE fit step {step}/{steps}", flush=True)
        x = stack[torch.randint(len(stack), (16,), generator=g)]
        posterior = vae.encode(x).latent_dist
        loss = (
            (vae.decode(posterior.sample(generator=g)).sample - x) ** 2
        ).mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():  # latents at unit scale, as the real VAEs' scaling/shift factors make them
        z = torch.cat([vae.encode(stack[i : i + 64]).latent_dist.mode() for i in range(0, len(stack), 64)])
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1 / z.std()))
    vae.save_pretrained(out)
    return out


def build(arm: str, vae: Path, args: argparse.Namespace, seed: int) -> SCoT:
    """The tiny SCoT of one arm (the planner is set at test)."""
    torch.manual_seed(seed)
    model = SCoT(
        backbone=BACKBONE, vae={"pretrained": str(vae)}, text=TEXT, conditioning=arm, max_ref_tokens=None,
        timesteps={"shift": args.shift}, lr=args.lr, warmup_steps=10, lr_schedule="cosine", drop_text=0.1,
        sampler={"steps": args.sample_steps, "guidance": args.guidance, "shift": args.shift}, val_sample_steps=0, seed=seed,
    )  # fmt: skip
    model.configure_model()
    return model


def train(model: SCoT, data: list[dict[str, Any]], args: argparse.Namespace, seed: int, root: Path) -> float:
    """`args.steps` steps of batch `args.batch_size`; returns the training seconds."""
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, generator=g, collate_fn=collate, drop_last=True)  # fmt: skip
    trainer = L.Trainer(
        max_steps=args.steps, max_epochs=-1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root), num_sanity_val_steps=0,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, loader)
    return time.perf_counter() - start


def evaluate(
    model: SCoT, test: list[dict[str, Any]], planner: RulePlanner | None, batch: int
) -> dict[str, float]:
    """Mean scores of the model on the held-out items (the planner's plans, or the items' own captions)."""
    model.planner = planner
    model.eval()
    for metric in model.scores.values():
        metric.reset()
    for i in range(0, len(test), batch):
        model.score_batch(collate(test[i : i + batch]), "bench")
    out = {}
    for name in METRICS:
        metric = model.scores[name]
        out[name] = float(metric.compute()) if metric.update_count else math.nan
        metric.reset()
    return out


def save_grid(model: SCoT, test: list[dict[str, Any]], path: Path, k: int = 8) -> None:
    """The first k held-out requests: target with its layout, sample with its plan drawn (PNG)."""
    model.eval()
    rows = model.sample_grid(collate(test[:k]), k)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(make_grid(rows, cell=96)).save(path)


def random_layout_baseline(test: list[dict[str, Any]], side: int, seed: int) -> dict[str, float]:
    """The requested objects drawn exactly at random non-overlapping boxes, scored against the planner's plans."""
    detector, planner = ColourDetector(), RulePlanner()
    scores: dict[str, list[float]] = {k: [] for k in METRICS}
    for k, item in enumerate(test):
        meta = item["meta"]
        rng = numpy_rng(seed, "random-layout", k)
        names = [(r["class"], int(r.get("count", 1))) for r in meta["geneval"]["include"]]
        placed = synth.lay_out(rng, names)
        while placed is None:
            placed = synth.lay_out(rng, names)
        image, _ = synth.draw(meta["background"], placed)
        tensor = resize_image(image_tensor(image, "baseline"), (side, side))
        plan = parse_layout(planner.plan_one(meta["prompt"], meta))
        s = layout_scores(tensor, [(r.phrase, r.box) for r in plan.regions], detector, meta["geneval"])
        scores[f"{meta['geneval']['tag']}_acc"].append(s["correct"])
        scores["miou"].append(s["miou"])
        scores["box_hit"].append(s["hit"])
    return {k: float(np.nanmean(v)) if v else math.nan for k, v in scores.items()}


def mean_image_baseline(train_items: list[dict[str, Any]], test: list[dict[str, Any]]) -> dict[str, float]:
    """The mean training image as every output."""
    mean = torch.stack([t["target"] for t in train_items]).mean(0)
    detector, planner = ColourDetector(), RulePlanner()
    scores: dict[str, list[float]] = {k: [] for k in METRICS}
    for item in test:
        meta = item["meta"]
        plan = parse_layout(planner.plan_one(meta["prompt"], meta))
        s = layout_scores(mean, [(r.phrase, r.box) for r in plan.regions], detector, meta["geneval"])
        scores[f"{meta['geneval']['tag']}_acc"].append(s["correct"])
        scores["miou"].append(s["miou"])
        scores["box_hit"].append(s["hit"])
    return {k: float(np.nanmean(v)) if v else math.nan for k, v in scores.items()}


def spread(values: list[float]) -> str:
    """'mean ± sample std' of a few values."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):.3f} ± {sd:.3f}"


def main(argv: list[str] | None = None) -> None:
    """Train each arm with each seed, score the held-out prompts, write the table."""
    parser = argparse.ArgumentParser(prog="omnilab bench scot_replication")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train", type=int, default=1024)
    parser.add_argument("--test", type=int, default=48)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--vae", type=Path, default=None, help="a VAE folder fitted before (skips the fit)")
    parser.add_argument("--sample-steps", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--shift", type=float, default=3.0, help="timestep shift, training and sampling")
    parser.add_argument(
        "--all-scenes", action="store_true", help="train on every kind of scene, not only the test's"
    )
    parser.add_argument(
        "--grid", type=Path, default=None, help="save a PNG sample grid per run in this folder"
    )
    parser.add_argument("--save-vae", type=Path, default=None, help="keep the fitted VAE in this folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-record", action="store_true", help="print the table, leave RESULTS.md alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # one by default: two threads spin on a busy shared CPU
    started, load = time.perf_counter(), os.getloadavg()
    train_items = items("train", args.train, 0, args.side, probes_only=not args.all_scenes)
    test = items("test", args.test, 0, args.side)
    results: dict[str, dict[str, list[float]]] = {}
    seconds: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        vae = args.vae or fit_vae(
            [t["target"] for t in train_items], args.save_vae or root / "vae", args.vae_steps, 0
        )
        for seed in args.seeds:
            for arm in args.arms:
                model = build(arm, vae, args, seed)
                seconds.setdefault(arm, []).append(
                    train(model, train_items, args, seed, root / f"{arm}-{seed}")
                )
                model.predictions_dir = str(root / f"{arm}-{seed}" / "predictions")
                planner = None if arm == "text" else RulePlanner()
                row = evaluate(model, test, planner, args.batch_size)
                for name, value in row.items():
                    results.setdefault(arm, {}).setdefault(name, []).append(value)
                if arm != "text":
                    model.text_encoder.conditioning = "text"  # the plan's coordinates taken out at test
                    removed = evaluate(model, test, planner, args.batch_size)
                    for name, value in removed.items():
                        results.setdefault(f"{arm}, plan removed", {}).setdefault(name, []).append(value)
                if args.grid:
                    model.text_encoder.conditioning = arm
                    save_grid(model, test, args.grid / f"{arm}-{seed}.png")
                print(arm, seed, row, flush=True)
    baselines = {
        "trivial: requested objects at random places (exact)": random_layout_baseline(test, args.side, 0),
        "trivial: the mean training image": mean_image_baseline(train_items, test),
    }
    labels = {"text": "text-only (caption, no planner)", "inline": "planner + inline coordinates (SCoT)", "boxes": "planner + gated box tokens (GLIGEN-style)"}  # fmt: skip
    rows, metrics = [], {}
    for arm, scores in results.items():
        name = labels.get(arm, arm.replace("inline", labels["inline"]).replace("boxes", labels["boxes"]))
        rows.append({"arm": name, "seeds": len(scores["miou"]), **{m: spread(scores[m]) for m in METRICS}})
        for m in METRICS:
            metrics[f"{arm.replace(', ', '_').replace(' ', '_')}_{m}"] = float(np.nanmean(scores[m]))
    for name, scores in baselines.items():
        rows.append({"arm": name, "seeds": "-", **{m: f"{scores[m]:.3f}" for m in METRICS}})
    total, end_load = time.perf_counter() - started, os.getloadavg()
    notes = (
        f"SD3-Kontext-style DiT (4 layers, width 64, random init), tiny CLIP + T5 (frozen, random init, CLIP reads "
        f"{TEXT['tokenizer']['clip']['model_max_length']} tokens, T5 {TEXT['max_sequence_length']}), a tiny VAE "
        + (f"fitted before ({args.vae})" if args.vae else f"fitted to the scenes ({args.vae_steps} steps)")
        + f"; {args.steps} steps of batch "
        f"{args.batch_size}, lr {args.lr} (warm-up 10, cosine), timestep shift {args.shift}, text dropout 0.1, on {args.train} generated "
        f"text-to-image scenes at {args.side} x {args.side} px; seeds {args.seeds}. Test: {args.test} held-out "
        f"generated prompts (position and counting, GenEval wording and metadata), {args.sample_steps} Euler steps, "
        f"CFG {args.guidance}; the exact colour detector; mean ± std over seeds. position_acc / counting_acc: "
        "GenEval's rules; miou / box_hit: layout fidelity against the rule planner's plan (for the text-only arm, "
        "against the same plan: the layout a planner would have asked for, which the text-only model never sees). "
        f"Training seconds per run (mean): "
        + ", ".join(f"{arm} {np.mean(s):.0f}" for arm, s in seconds.items())
        + f". Whole run {total / 60:.1f} min; load average {load[0]:.1f} at the start, {end_load[0]:.1f} at the "
        "end, on a shared 2-core machine (one torch thread)."
    )
    title = (
        "SCoT mini-replication: text-only vs planner + layout-aware (inline coordinates, box tokens), 3 seeds"
    )
    if args.no_record:
        from benchmarks.common import table

        print(table(rows), "\n", notes)
    else:
        record("scot_replication", title, rows, notes, metrics)
