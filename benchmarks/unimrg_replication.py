"""UniMRG and MetaQuery mini-replication on the generated scenes (docs/methods/unimrg.md, docs/methods/metaquery.md).

UniMRG's claim: post-training a unified model to also generate its input image's pixels, depth and segmentation
(as image-to-image tasks through its own generator) raises its understanding accuracy; each representation helps
alone, all three most. In miniature, on CPU: the tiny MetaQuery model (a tiny Qwen2.5-VL, learnable queries, a
connector, a tiny SD3-Kontext DiT and VAE; experiments/unimrg/tiny.yaml) trained from random init on the scenes of
`omnilab data synth scenes` (exact depth and segmentation), with the understanding loss alone, with all three
auxiliary tasks (UniMRG, every weight 1) and with each one alone, same steps, data and seed. Accuracy is the share
of held-out questions (every question of every held-out scene: count, colour, left/right, nearer/farther) whose
highest-scoring option is the answer, beside two baselines that see no image: uniform guessing among the options
(chance) and the training split's most frequent answer of each question type (majority).

MetaQuery's stages: the connector stage (queries and connector train, VLM and DiT frozen) against the joint
stage (the DiT trains too), both from the same random init and for the same steps, on text-to-image and editing
("remove the <object>", exact target). Generation metric: the pixel MSE in [-1, 1] of the edit sampled from each
held-out source and instruction against the exact edited scene, beside each target's mean-colour image (the
baseline a model that ignores its inputs reaches at best) and the unedited source (copying the input).

Three seeds (data, init and noise all follow the seed), mean and sample std; whatever the numbers say goes to
RESULTS.md. The figures first answer whether the tiny model uses its inputs at all (accuracy above the majority
baseline, MSE below the mean colour); where it does not, the comparison between conditions says nothing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from benchmarks.common import record
from benchmarks.reward_common import mean_spread
from datamodules.scenes import SceneDataModule, image_tensor
from datamodules.synth import synthesize
from datamodules.synth.scenes import samples
from lightning_modules.metaquery import MetaQuery
from lightning_modules.unimrg import MetaQueryUniMRG
from omnilab.seeding import torch_generator
from tests.configs import REPO, init_args

CONDITIONS = {  # name -> UniMRG task weights
    "understanding only": {"understanding": 1.0, "pixel": 0.0, "depth": 0.0, "seg": 0.0},
    "+ pixel, depth, seg (UniMRG)": {"understanding": 1.0, "pixel": 1.0, "depth": 1.0, "seg": 1.0},
    "+ pixel": {"understanding": 1.0, "pixel": 1.0, "depth": 0.0, "seg": 0.0},
    "+ depth": {"understanding": 1.0, "pixel": 0.0, "depth": 1.0, "seg": 0.0},
    "+ seg": {"understanding": 1.0, "pixel": 0.0, "depth": 0.0, "seg": 1.0},
}
STAGES = {"connector only": ["queries", "connector"], "joint": ["queries", "connector", "dit"]}


def tiny(path: str, args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    """The model init_args of a shipped tiny experiment, with the VLM's pixels, init scale and width from `args`."""
    model = {**init_args(REPO / "experiments" / path, "model"), **overrides}
    vlm = dict(model["vlm"])
    config = {k: dict(v) for k, v in vlm["config"].items()}
    for part in ("text_config", "vision_config"):
        config[part]["initializer_range"] = args.init_range
    if args.width:
        heads = args.width // 16  # head_dim 16: the M-RoPE sections [2, 3, 3] cover its half
        config["text_config"].update(
            hidden_size=args.width, intermediate_size=2 * args.width, num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
        )  # fmt: skip
        model["connector"] = {**model["connector"], "width": args.width}
    vlm["config"] = config
    vlm["image_processor"] = {"min_pixels": args.vlm_side**2, "max_pixels": args.vlm_side**2}
    model["vlm"] = vlm
    return model


def write_scenes(root: Path, seed: int, train: int, val: int) -> Path:
    """Generated scenes of one seed (train and val splits); their folder."""
    synthesize("scenes", root, samples={"train": train, "val": val, "test": 1}, seed=seed)
    return root


def datamodule(root: Path, need: list[str], size: int, batch_size: int, seed: int) -> SceneDataModule:
    """The scenes' training stream (resampled, seeded)."""
    return SceneDataModule(
        data_dir=str(root), synth=False, need=need, image_size=size, batch_size=batch_size, eval_batch_size=8,
        batches_per_epoch=10_000, num_workers=0, seed=seed,
    )  # fmt: skip


def fit(model: L.LightningModule, dm: SceneDataModule, steps: int) -> float:
    """Train for `steps` on CPU (no logger, checkpoint or validation); the seconds it took."""
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    return time.perf_counter() - start


def questions(seed: int, count: int, size: int) -> list[dict[str, Any]]:
    """Every question (with its options) of the first `count` scenes of a split, with the scene's image."""
    items = []
    for sample in samples("val", count, seed):
        image = image_tensor(sample["image.png"], size)
        for qa in sample["json"]["qa"]:
            items.append({**qa, "image": image})
    return items


def majority(seed: int, count: int) -> dict[str, str]:
    """The most frequent answer of each question type over the training scenes (every question of each)."""
    answers: dict[str, Counter] = {}
    for sample in samples("train", count, seed):
        for qa in sample["json"]["qa"]:
            answers.setdefault(qa["type"], Counter())[qa["answer"]] += 1
    return {t: c.most_common(1)[0][0] for t, c in answers.items()}


@torch.no_grad()
def accuracy(model: MetaQuery, items: list[dict[str, Any]], batch: int = 32) -> dict[str, float]:
    """Option accuracy over all items and per question type."""
    model.eval()
    right: dict[str, list[float]] = {}
    for i in range(0, len(items), batch):
        chunk = items[i : i + batch]
        picks = model.choose(
            [q["image"] for q in chunk], [q["question"] for q in chunk], [q["options"] for q in chunk]
        )
        for q, p in zip(chunk, picks):
            ok = float(q["options"][p] == q["answer"])
            right.setdefault("all", []).append(ok)
            right.setdefault(q["type"], []).append(ok)
    model.train()
    return {k: float(np.mean(v)) for k, v in right.items()}


def baselines(items: list[dict[str, Any]], common: dict[str, str]) -> dict[str, dict[str, float]]:
    """Chance (mean 1/|options|) and majority-answer accuracy over all items and per type."""
    out: dict[str, dict[str, list[float]]] = {"chance": {}, "majority": {}}
    for q in items:
        for key in ("all", q["type"]):
            out["chance"].setdefault(key, []).append(1 / len(q["options"]))
            out["majority"].setdefault(key, []).append(float(common.get(q["type"]) == q["answer"]))
    return {name: {k: float(np.mean(v)) for k, v in d.items()} for name, d in out.items()}


@torch.no_grad()
def edit_mse(model: MetaQuery, seed: int, count: int, size: int, steps: int) -> dict[str, float]:
    """Pixel MSE of sampled edits vs the exact edits, and of the mean-colour and copy-the-source baselines."""
    model.eval()
    errors: dict[str, list[float]] = {"model": [], "mean colour": [], "source": []}
    for i, sample in enumerate(samples("val", count, seed)):
        source, target = image_tensor(sample["image.png"], size), image_tensor(sample["edit.png"], size)
        (image,) = model.sample(
            [[source]], [sample["json"]["edit"]], size=[(size, size)], steps=steps,
            generator=[torch_generator(seed, "edit-mse", i)],
        )  # fmt: skip
        flat = target.mean((-2, -1), keepdim=True).expand_as(target)
        for name, pred in (("model", image.float().cpu()), ("mean colour", flat), ("source", source)):
            errors[name].append(float(((pred - target) ** 2).mean()))
    model.train()
    return {k: float(np.mean(v)) for k, v in errors.items()}


def unimrg_runs(args: argparse.Namespace, root: Path, seed: int) -> dict[str, dict[str, float]]:
    """Held-out accuracy of each UniMRG condition for one seed."""
    items = questions(seed, args.val_scenes, args.size)
    out = {}
    for name in args.conditions:
        torch.manual_seed(seed)
        model = MetaQueryUniMRG(
            **tiny(
                "unimrg/tiny.yaml",
                args,
                weights=CONDITIONS[name],
                lr=args.lr,
                visual_grad_scale=args.visual_grad_scale,
                warmup_steps=10,
                seed=seed,
            )
        )
        seconds = fit(
            model, datamodule(root, ["depth", "seg", "qa"], args.size, args.batch_size, seed), args.steps
        )
        out[name] = {**accuracy(model, items), "seconds": seconds}
        print(f"seed {seed} {name}: {out[name]}", flush=True)
    return out


def metaquery_runs(args: argparse.Namespace, root: Path, seed: int) -> dict[str, dict[str, float]]:
    """Edit MSE of each MetaQuery stage for one seed."""
    out = {}
    for name, trainable in STAGES.items():
        torch.manual_seed(seed)
        model = MetaQuery(**tiny("unipic2/metaquery_tiny.yaml", args, trainable=trainable, seed=seed,
                                 task_weights={"t2i": 1.0, "edit": 1.0, "understanding": 0.0}))  # fmt: skip
        seconds = fit(model, datamodule(root, ["edit"], args.size, args.batch_size, seed), args.mq_steps)
        out[name] = {
            **edit_mse(model, seed, args.mse_scenes, args.size, args.sample_steps),
            "seconds": seconds,
        }
        print(f"seed {seed} {name}: {out[name]}", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    """Each UniMRG condition and each MetaQuery stage for each seed; record mean ± std against the baselines."""
    parser = argparse.ArgumentParser(prog="omnilab bench unimrg_replication")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--mq-steps", type=int, default=80)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--vlm-side", type=int, default=56, help="the VLM sees S x S px (14 px patches)")
    parser.add_argument("--init-range", type=float, default=0.5, help="the VLM's initializer_range")
    parser.add_argument("--width", type=int, default=0, help="the VLM's width (0: the tiny experiment's)")
    parser.add_argument(
        "--visual-grad-scale", type=float, default=1.0, help="UniMRG's 0.1 is for a pretrained VLM"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-scenes", type=int, default=512)
    parser.add_argument("--val-scenes", type=int, default=64)
    parser.add_argument("--mse-scenes", type=int, default=8)
    parser.add_argument("--sample-steps", type=int, default=8)
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS))
    parser.add_argument("--skip-metaquery", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dry-run", action="store_true", help="print, do not write RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    acc: dict[str, list[dict[str, float]]] = {}
    mse: dict[str, list[dict[str, float]]] = {}
    base: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            root = write_scenes(
                Path(tmp) / f"seed{seed}", seed, args.train_scenes, max(args.val_scenes, args.mse_scenes)
            )
            base.append(
                baselines(questions(seed, args.val_scenes, args.size), majority(seed, args.train_scenes))
            )
            print(f"seed {seed} baselines: {base[-1]}", flush=True)
            for name, result in unimrg_runs(args, root, seed).items():
                acc.setdefault(name, []).append(result)
            if not args.skip_metaquery:
                for name, result in metaquery_runs(args, root, seed).items():
                    mse.setdefault(name, []).append(result)
    minutes = (time.perf_counter() - start) / 60
    print(f"{minutes:.1f} min", flush=True)
    if args.dry_run:
        return
    report(args, acc, mse, base, minutes)


def report(
    args: argparse.Namespace,
    acc: dict[str, list[dict[str, float]]],
    mse: dict[str, list[dict[str, float]]],
    base: list[dict[str, dict[str, float]]],
    minutes: float,
) -> None:
    """Write the RESULTS.md section: the UniMRG table (with the two no-image baselines), the MetaQuery table."""
    types = ("count", "colour", "left_right", "near_far")
    fmt = lambda values: "{:.3f} ± {:.3f}".format(*mean_spread(values))  # noqa: E731
    rows, metrics = [], {}
    for name in ("chance", "majority"):
        runs = [b[name] for b in base]
        label = {
            "chance": "chance (no image: uniform over the options)",
            "majority": "majority answer per type (no image)",
        }[name]
        rows.append({"condition": label, "accuracy": fmt([r["all"] for r in runs]),
                     **{t: fmt([r.get(t, float("nan")) for r in runs]) for t in types}, "per seed": "", "train s / run": ""})  # fmt: skip
        metrics[f"baseline_{name}"] = mean_spread([r["all"] for r in runs])[0]
    for name, runs in acc.items():
        rows.append({"condition": name, "accuracy": fmt([r["all"] for r in runs]),
                     **{t: fmt([r.get(t, float("nan")) for r in runs]) for t in types},
                     "per seed": ", ".join(f"{r['all']:.3f}" for r in runs),
                     "train s / run": f"{np.mean([r['seconds'] for r in runs]):.0f}"})  # fmt: skip
        metrics[f"accuracy_{name}"] = mean_spread([r["all"] for r in runs])[0]
    mq = ""
    if mse:
        lines = ["| MetaQuery stage | edit pixel MSE | mean-colour baseline | copy the source | per seed | train s / run |",
                 "|---|---|---|---|---|---|"]  # fmt: skip
        for name, runs in mse.items():
            seeds = ", ".join(f"{r['model']:.3f}" for r in runs)
            lines.append(
                f"| {name} | {fmt([r['model'] for r in runs])} | {fmt([r['mean colour'] for r in runs])} | "
                f"{fmt([r['source'] for r in runs])} | {seeds} | "
                f"{np.mean([r['seconds'] for r in runs]):.0f} |"
            )
            metrics[f"edit_mse_{name}"] = mean_spread([r["model"] for r in runs])[0]
        mq = "\n".join(lines)
    notes = (
        f"UniMRG: the tiny MetaQuery model (experiments/unimrg/tiny.yaml; VLM initializer_range {args.init_range}"
        f"{f', width {args.width}' if args.width else ''}, the VLM sees {args.vlm_side} x {args.vlm_side} px) trained from "
        f"random init for {args.steps} steps of {args.batch_size} scenes ({args.size} px, AdamW lr {args.lr}, UniMRG's "
        f"betas and weight decay, clip 1.0) on {args.train_scenes} generated training scenes per seed, one random "
        f"question per scene and step; accuracy over every question of {args.val_scenes} held-out scenes (all four "
        f"types), the option with the highest answer log-probability. The baselines see no image: 'chance' guesses "
        f"uniformly among each question's options, 'majority' answers each question type with its most frequent "
        f"answer among the training scenes' questions. ± is the sample std over seeds {args.seeds}.\n\n"
        + (
            f"MetaQuery (experiments/unipic2/metaquery_tiny.yaml, same VLM settings): text-to-image and editing "
            f"(understanding weight 0) for {args.mq_steps} steps from one random init per seed, the connector stage "
            f"(queries + connector train; VLM and DiT frozen at their random init) vs the joint stage (+ the DiT). "
            f"Edit pixel MSE in [-1, 1] of {args.mse_scenes} held-out scenes ({args.sample_steps} sampling steps, "
            f"guidance 3.5) against the exact edit, beside each target's mean-colour image and the unedited source.\n\n"
            + mq
            + "\n\n"
            if mq
            else ""
        )
        + f"{minutes:.1f} min in all."
    )
    record("unimrg_replication", "UniMRG and MetaQuery mini-replication: auxiliary representations, connector vs joint",
           rows, notes, metrics)  # fmt: skip


if __name__ == "__main__":
    main()
