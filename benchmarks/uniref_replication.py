"""UniRef-Image-Edit mini-replication: the progressive pixel budget, and composition quality by reference count.

UniRef's claims (UniRef-Image-Edit paper; docs/methods/uniref.md): SELF packs 1-6 references under one
global pixel budget, and training with a budget that grows 1024² -> 1536² -> 2048² reaches the high-budget
model more cheaply than training at the highest budget throughout. In miniature, on CPU, with the tiny
Qwen-Image-Edit FlowEdit of experiments/uniref/tiny.yaml (budgets 64 -> 96 -> 128 px at 4 px per token stand
for 1024 -> 1536 -> 2048) on the generated multiref shards (`omnilab data synth multiref`):

(a) Two arms, each run with 3 seeds (model init, data order, noise), the same data and number of steps: the
    progressive schedule (`PixelBudgetSchedule`, milestones at 40% and 70% of the steps, as tiny.yaml's 40/70 of
    100) vs the highest budget throughout; mean and spread over the seeds, and the per-seed difference. Both are validated
    AT THE HIGHEST BUDGET (the validation switches the datamodule to it and back): the flow loss at fixed sigmas
    with noise seeded by sample key, against the wall-clock time spent training (validation excluded). Both
    curves go to MLflow (experiment `uniref-replication`) and to benchmarks/uniref_budget.png.
(b) Held-out generated samples with exactly 1, 3 and 6 references (edits for 1, compositions for 3 and 6),
    resized under the highest budget: each trained model of the first seed samples the target (the tiny YAML's sampler: 8
    Euler steps, true CFG 4 with the norm rescale; and without CFG), scored by PSNR against the exact rendered
    target in [-1, 1] (peak-to-peak 2). Trivial baselines on the same samples: image 1 resized to the target
    size, and the mean colour of the training targets.
Whatever the numbers say goes to RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import tempfile
import time
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch import Callback
from lightning.pytorch.loggers import MLFlowLogger
from torch.utils.data import DataLoader

from benchmarks.common import RESULTS, record, table
from callbacks.pixel_budget import PixelBudgetSchedule
from datamodules.multiref import MultiRefDataModule, MultiRefTransform, resize_image
from datamodules.synth import synthesize
from datamodules.synth.multiref import make_sample
from datamodules.webdataset import decode_image
from lightning_modules.flow_edit import FlowEdit
from omnilab.seeding import torch_generator
from omnilab.tracking import tracking_uri

ROOT = Path(__file__).resolve().parent.parent
TINY_YAML = ROOT / "experiments" / "_base" / "tiny_flow_qwen.yaml"
PLOT = RESULTS.parent / "uniref_budget.png"
EXPERIMENT = "uniref-replication"


class ValidateAtBudget(Callback):
    """Validation at one fixed reference budget, and the curve (step, training seconds, val/loss) it draws.

    Training seconds exclude validation: the clock starts with training, stops when validation starts and
    restarts when it ends; a validation before training is the point (0, 0 s). The process's CPU seconds are
    kept alike, and a cost that no other job can disturb: the image-token slots the backbone processed (B x
    padded length, summed over steps; `tokens_at`).
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.curve: list[tuple[int, float, float]] = []
        self.cpu_at: list[float] = []  # CPU seconds at each point of the curve
        self.tokens = 0.0  # image-token slots processed so far
        self.tokens_at: list[float] = []
        self.train_seconds = self.cpu_seconds = 0.0
        self._since: tuple[float, float] | None = None
        self._saved: int | None = None
        self.without_refs = math.nan  # the final val/loss with the references taken out (set by `fit`)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the training clock."""
        self._since = (time.perf_counter(), time.process_time())

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: FlowEdit, outputs: Any, batch: dict[str, Any], batch_idx: int
    ) -> None:
        """Count the step's image-token slots: real tokens / (1 - padding fraction) = B x padded length."""
        p = pl_module.pixels_per_token
        images = [x for sample in batch["refs"] for x in sample] + list(batch["target"])
        real = sum((x.shape[-2] // p) * (x.shape[-1] // p) for x in images)
        self.tokens += real / (1 - pl_module.backbone.last_padding_fraction)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Stop the clock; validate at the fixed budget."""
        if self._since is not None:
            self.train_seconds += time.perf_counter() - self._since[0]
            self.cpu_seconds += time.process_time() - self._since[1]
        self._saved = trainer.datamodule.pixel_budget
        trainer.datamodule.set_pixel_budget(self.budget)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Put the training budget back, record the point, restart the clock."""
        trainer.datamodule.set_pixel_budget(self._saved)
        loss = float(trainer.callback_metrics["val/loss"])
        step = trainer.global_step
        self.curve.append((step, self.train_seconds, loss))
        self.cpu_at.append(self.cpu_seconds)
        self.tokens_at.append(self.tokens)
        if trainer.logger is not None:
            trainer.logger.log_metrics(
                {
                    "curve/val_loss_at_max_budget": loss,
                    "curve/train_seconds": self.train_seconds,
                    "curve/train_cpu_seconds": self.cpu_seconds,
                    "curve/train_token_slots": self.tokens,
                },
                step=step,
            )
        self._since = (time.perf_counter(), time.process_time())


def tiny_init() -> dict[str, Any]:
    """FlowEdit's and the datamodule's init_args in experiments/_base/tiny_flow_qwen.yaml."""
    config = yaml.safe_load(TINY_YAML.read_text())
    return {"model": config["model"]["init_args"], "data": config["data"]["init_args"]}


def fit(
    name: str, data_dir: Path, root: Path, progressive: bool, args: argparse.Namespace, seed: int
) -> tuple[FlowEdit, ValidateAtBudget]:
    """Train one arm with one seed; returns the model and its validation curve."""
    init = tiny_init()
    low, mid, high = args.budgets
    L.seed_everything(seed)
    model = FlowEdit(
        **{
            **init["model"],
            "lr": args.lr,
            "drop_text": args.drop_text,
            "val_sample_steps": 0,
            "seed": seed,
        }
    )
    data = MultiRefDataModule(**{
        **init["data"], "data_dir": str(data_dir), "synth": False, "batch_size": args.batch_size,
        "eval_batch_size": args.batch_size, "batches_per_epoch": args.steps, "num_workers": 0,
        "budget": low if progressive else high, "seed": seed,
    })  # fmt: skip
    validate = ValidateAtBudget(high)
    callbacks: list[Callback] = [validate]
    if progressive:
        steps = [0, round(args.switch[0] * args.steps), round(args.switch[1] * args.steps)]
        callbacks.append(PixelBudgetSchedule(dict(zip(steps, (low, mid, high))), log_every_n_steps=10))
    logger = MLFlowLogger(EXPERIMENT, run_name=f"{name} seed {seed}", tracking_uri=tracking_uri())
    logger.log_hyperparams(
        {
            "arm": name,
            "seed": seed,
            "steps": args.steps,
            "budgets": str(args.budgets),
            "batch_size": args.batch_size,
        }
    )
    trainer = L.Trainer(
        max_steps=args.steps, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        val_check_interval=args.val_every, check_val_every_n_epoch=None, limit_val_batches=args.val_batches,
        log_every_n_steps=10, default_root_dir=str(root),
    )  # fmt: skip
    trainer.validate(model, datamodule=data, verbose=False)  # the point at step 0
    trainer.fit(model, datamodule=data)
    if validate.curve[-1][0] != args.steps:  # the final point
        trainer.validate(model, datamodule=data, verbose=False)
    data.set_pixel_budget(high)
    validate.without_refs = loss_without_refs(model, list(islice(data.val_dataloader(), args.val_batches)))
    return model, validate


def loss_without_refs(model: FlowEdit, batches: list[dict[str, Any]]) -> float:
    """FlowEdit's val/loss on these batches with every reference taken out: how much the model uses them."""
    bare = [{**b, "refs": [[] for _ in b["refs"]]} for b in batches]
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.validate(model, dataloaders=DataLoader(bare, batch_size=None, collate_fn=_same), verbose=False)
    return float(trainer.callback_metrics["val/loss"])


def _same(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def held_out(count: int, n: int, seed: int) -> list[dict[str, Any]]:
    """The first `n` generated held-out samples (split "heldout") with exactly `count` references, decoded."""
    out, index = [], 0
    while len(out) < n:
        raw = make_sample("heldout", index, seed)
        index += 1
        if raw["json"]["n_refs"] != count:
            continue
        out.append({k: v if k in ("__key__", "json") else decode_image(v) for k, v in raw.items()})
    return out


def mean_colour(seed: int, n: int = 64) -> torch.Tensor:
    """Per-channel mean [3, 1, 1] in [-1, 1] of the first `n` training targets."""
    total = torch.zeros(3)
    for i in range(n):
        target = decode_image(make_sample("train", i, seed)["target.png"])
        total += torch.from_numpy(target).float().mean((0, 1)) / 127.5 - 1
    return (total / n).view(3, 1, 1)


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1]: 10 log10(2² / MSE)."""
    mse = float(((pred.float().clamp(-1, 1) - target.float()) ** 2).mean())
    return 10 * math.log10(4 / max(mse, 1e-12))


def composition_scores(
    models: dict[str, FlowEdit], args: argparse.Namespace, synth_seed: int
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Mean PSNR per reference count of each model (with and without CFG) and of the two baselines."""
    init = tiny_init()["data"]
    high = args.budgets[2]
    transform = MultiRefTransform(
        budget=torch.tensor([high]), base_budget=high, target_budget=init["target_budget"], multiple=init["multiple"],
        min_side=init["min_side"], train=False,
    )  # fmt: skip
    colour = mean_colour(synth_seed)
    rows, metrics = [], {}
    scores: dict[str, dict[int, list[float]]] = {}
    for count in args.ref_counts:
        samples = [
            transform(s, np.random.default_rng(0)) for s in held_out(count, args.test_per_count, synth_seed)
        ]
        refs = [s["refs"] for s in samples]
        targets = [s["target"] for s in samples]
        keys = [f"{count}-{i}" for i in range(len(samples))]
        preds: dict[str, list[torch.Tensor]] = {
            "baseline: image 1 resized": [resize_image(r[0], (t.shape[-1], t.shape[-2])) for r, t in zip(refs, targets)],
            "baseline: mean training colour": [colour.expand_as(t) for t in targets],
        }  # fmt: skip
        for name, model in models.items():
            model.eval()
            for guidance in args.guidance:
                preds[f"{name}, CFG {guidance:g}"] = model.sample(
                    refs, [s["instruction"] for s in samples], size=[tuple(t.shape[-2:]) for t in targets],
                    steps=args.sample_steps, guidance=guidance,
                    generator=[torch_generator(args.seed, "heldout", k) for k in keys],
                )  # fmt: skip
        for label, images in preds.items():
            scores.setdefault(label, {})[count] = [psnr(p, t) for p, t in zip(images, targets)]
    for label, by_count in scores.items():
        row: dict[str, Any] = {"predictor": label}
        for count, values in by_count.items():
            row[f"PSNR dB, {count} ref{'s' if count > 1 else ''}"] = float(np.mean(values))
            metrics[f"psnr_{count}refs_{label}"] = float(np.mean(values))
        rows.append(row)
    return rows, metrics


def reading(without_refs: list[float], finals: list[float]) -> str:
    """What (b) can say: nothing about reference counts when the models barely use their references."""
    rises = [w / f - 1 for w, f in zip(without_refs, finals)]
    if max(rises) >= 0.02:
        return ""
    return (
        "Reading: taking the references out raises the final val loss by only "
        + " / ".join(f"{x:.1%}" for x in rises)
        + " (the arms in order, first seed): at this size and length the models learn the targets' colour "
        "statistics, not to copy from the references, so their PSNRs sit near the mean-colour baseline, do not move "
        "with CFG and do not separate the arms. (b) is a working harness here, not evidence about reference counts; "
        "it needs a model that uses its references (more steps, a wider DiT, a GPU).\n\n"
    )


def spread(values: list[float]) -> str:
    """'mean ± sample std (min..max)' of a few values."""
    m, sd = float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{m:.4f} ± {sd:.4f} ({min(values):.4f}..{max(values):.4f})"


def plot(curves: dict[str, ValidateAtBudget], switch_seconds: list[float], path: Path) -> None:
    """val/loss at the highest budget against training seconds, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, cb in curves.items():
        _, seconds, losses = zip(*cb.curve)
        axes[0].plot(seconds, losses, marker="o", ms=3, label=name)
        axes[1].plot([t / 1e6 for t in cb.tokens_at], losses, marker="o", ms=3, label=name)
    for s in switch_seconds:
        axes[0].axvline(s, color="grey", lw=0.5, ls="--")
    axes[0].set_xlabel("training wall-clock (s, validation excluded; dashes: budget switches)")
    axes[1].set_xlabel("image-token slots processed (millions; B x padded length per step)")
    axes[0].set_ylabel("val flow loss at the highest budget")
    axes[0].legend()
    fig.suptitle("UniRef mini-replication: progressive vs highest pixel budget")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Train both arms with each seed, compare them, score composition by reference count, write the tables."""
    parser = argparse.ArgumentParser(prog="omnilab bench uniref_replication")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--drop-text", type=float, default=0.1, help="text dropout, so that CFG has a null branch"
    )
    parser.add_argument("--budgets", type=int, nargs=3, default=[64, 96, 128], help="low, mid, high (px)")
    parser.add_argument(
        "--switch", type=float, nargs=2, default=[0.4, 0.7], help="milestones, fractions of steps"
    )
    parser.add_argument("--val-every", type=int, default=50)
    parser.add_argument("--val-batches", type=int, default=2)
    parser.add_argument("--train-samples", type=int, default=512)
    parser.add_argument("--val-samples", type=int, default=16)
    parser.add_argument("--ref-counts", type=int, nargs="+", default=[1, 3, 6])
    parser.add_argument("--test-per-count", type=int, default=10)
    parser.add_argument("--sample-steps", type=int, default=8)
    parser.add_argument("--guidance", type=float, nargs="+", default=[4.0, 1.0])
    parser.add_argument("--plot", type=Path, default=PLOT)
    args = parser.parse_args(argv)
    args.seed = args.seeds[0]  # (b) samples with the first seed's models and noise
    load = os.getloadavg()
    synth_seed = 1
    started = time.perf_counter()
    low, mid, high = args.budgets
    arms = {f"progressive {low}->{mid}->{high}": True, f"highest budget {high} throughout": False}
    runs: dict[str, list[ValidateAtBudget]] = {name: [] for name in arms}
    models: dict[str, FlowEdit] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data_dir = root / "multiref"
        synthesize("multiref", data_dir, samples={"train": args.train_samples, "val": args.val_samples, "test": 0}, seed=synth_seed)  # fmt: skip
        for seed in args.seeds:
            for name, progressive in arms.items():
                model, curve = fit(
                    name, data_dir, root / f"{name.split()[0]}-{seed}", progressive, args, seed
                )
                runs[name].append(curve)
                if seed == args.seed:
                    models[name] = model
    train_rows, metrics = [], {}
    for name, cbs in runs.items():
        finals = [cb.curve[-1][2] for cb in cbs]
        key = name.split()[0]
        train_rows.append(
            {
                "arm": name,
                "seeds": len(cbs),
                "final val loss @ max budget, mean ± std (min..max)": spread(finals),
                "refs taken out, mean": float(np.mean([cb.without_refs for cb in cbs])),
                "train wall s, mean": float(np.mean([cb.curve[-1][1] for cb in cbs])),
                "train CPU s, mean": float(np.mean([cb.cpu_seconds for cb in cbs])),
                "token slots (M)": float(np.mean([cb.tokens for cb in cbs])) / 1e6,
            }
        )
        metrics.update(
            {f"{key}_final_val_loss_mean": float(np.mean(finals)), f"{key}_token_slots": cbs[0].tokens}
        )
        for seed, final in zip(args.seeds, finals):
            metrics[f"{key}_final_val_loss_seed{seed}"] = final
    prog_runs, full_runs = runs.values()
    diffs = [p.curve[-1][2] - f.curve[-1][2] for p, f in zip(prog_runs, full_runs)]
    d_mean, d_sd = float(np.mean(diffs)), float(np.std(diffs, ddof=1)) if len(diffs) > 1 else 0.0
    metrics["final_val_loss_difference_mean"] = d_mean
    within = abs(d_mean) <= 2 * d_sd / math.sqrt(len(diffs)) if len(diffs) > 1 else True
    verdict = (
        "within seed noise: at this size the two arms end at the same loss, so the miniature shows the progressive "
        "schedule's lower cost, not a difference in the result"
        if within
        else ("lower" if d_mean < 0 else "higher") + " for the progressive arm beyond seed noise"
    )
    time_ratio = float(np.mean([p.curve[-1][1] / f.curve[-1][1] for p, f in zip(prog_runs, full_runs)]))
    cpu_ratio = float(np.mean([p.cpu_seconds / f.cpu_seconds for p, f in zip(prog_runs, full_runs)]))
    token_ratio = prog_runs[0].tokens / full_runs[0].tokens
    curves = {name: cbs[0] for name, cbs in runs.items()}
    prog_cb = curves[next(iter(curves))]
    switch_steps = [round(f * args.steps) for f in args.switch]
    steps_at, seconds_at, _ = zip(*prog_cb.curve)
    switch_seconds = list(np.interp(switch_steps, steps_at, seconds_at))  # between validation points
    plot(curves, switch_seconds, args.plot)
    quality_rows, quality = composition_scores(models, args, synth_seed)
    metrics.update({re.sub(r"[^A-Za-z0-9_.-]+", "_", k)[:240]: v for k, v in quality.items()})
    total = time.perf_counter() - started
    end_load = os.getloadavg()
    curve_text = "; ".join(
        f"{name.split()[0]}: " + ", ".join(f"{st}:{v:.3f}@{s:.0f}s" for st, s, v in cb.curve)
        for name, cb in curves.items()
    )
    shown = args.plot.resolve().relative_to(ROOT) if args.plot.resolve().is_relative_to(ROOT) else args.plot
    first = [cbs[0] for cbs in runs.values()]
    notes = (
        f"(a) FlowEdit with the tiny Qwen-Image-Edit backbone of experiments/_base/tiny_flow_qwen.yaml (SELF: "
        f"`max_ref_tokens: budget`, refs padded to (B/4)² tokens), {args.steps} steps of batch {args.batch_size}, "
        f"lr {args.lr} (warm-up 10, cosine), text dropout {args.drop_text}, seeds {args.seeds} (init, data order, "
        f"noise; the same {args.train_samples} generated multiref samples, 0-6 refs); progressive milestones at steps "
        f"{switch_steps} (budgets {low}/{mid}/{high} px = {(low // 4) ** 2}/{(mid // 4) ** 2}/{(high // 4) ** 2} ref "
        f"tokens, standing for 1024/1536/2048). Validation every {args.val_every} steps at budget {high} on "
        f"{args.val_batches} batches of {args.val_samples} held-out samples (flow loss at sigmas 0.25/0.5/0.75, noise "
        f"seeded by key). Final val loss, progressive minus highest, per seed: "
        + ", ".join(f"{d:+.4f}" for d in diffs)
        + f" (mean {d_mean:+.4f}, std {d_sd:.4f}): {verdict}. Training cost progressive / highest (mean over seeds): "
        f"{time_ratio:.3f} wall-clock, {cpu_ratio:.3f} CPU, {token_ratio:.3f} image-token slots (the token count does "
        f"not depend on the load). Shortened from 300 to {args.steps} steps so that 3 seeds per arm fit the shared "
        f"CPU. First seed's curves (step:loss@seconds) — {curve_text}. Plot (first seed): {shown}; MLflow experiment "
        f"`{EXPERIMENT}`.\n\n"
        f"(b) Held-out generated samples ({args.test_per_count} per reference count; 1 ref = edits, 3 and 6 = "
        f"compositions), refs resized under budget {high}, targets at the {tiny_init()['data']['target_budget']} px "
        f"target budget; each model of the first seed samples with {args.sample_steps} Euler steps, true CFG with "
        "the norm rescale (CFG 1 = the conditional branch only); PSNR (dB) against the exact rendered target in "
        "[-1, 1], mean over samples, higher is better. The paper-side reference: composition quality falls as "
        "references are added (UniPic-3 0.82 at 2-3 inputs, 0.63 at 4-6 on MultiCom-Bench); at this scale the "
        f"trivial baselines say how far the tiny model is from doing nothing useful.\n\n{table(quality_rows)}\n\n"
        f"{reading([cb.without_refs for cb in first], [cb.curve[-1][2] for cb in first])}"
        f"Whole run {total / 60:.1f} min; load average {load[0]:.2f} / {load[1]:.2f} (1 / 5 min) at the start, "
        f"{end_load[0]:.2f} / {end_load[1]:.2f} at the end, on a machine shared with other jobs: the wall-clock "
        "figures carry that noise (the runs went one after the other)."
    )
    title = "UniRef mini-replication: progressive pixel budget (3 seeds); composition by reference count"
    record("uniref_replication", title, train_rows, notes, metrics)


if __name__ == "__main__":
    main()
