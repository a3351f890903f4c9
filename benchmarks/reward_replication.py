"""JRM mini-replication: held-out pairwise accuracy of the BT-only discriminative model vs JRM at several λ.

JRM's claim (JRM paper; docs/methods/jrm.md): training the same VL backbone jointly on preference and on
language modelling of rationales (L = L_pref + λ L_LM) gives a more accurate reward model than the preference
loss alone. In miniature, on CPU: the tint-edit items of benchmarks/reward_common.py (whole- and half-image
recolouring, two candidates of known quality, templated rationales; 64 px), a 1-layer Qwen3-VL, the same
steps, data, seed and optimizer for each variant, λ = 0 (BT only: `PreferenceRewardModel`) and λ in --lambdas
(`JointRewardModel`), plain BT as the preference loss. Scored on held-out items: pairwise accuracy over strict
pairs (chance 0.5), and separately over pairs with a local error (wrong region, artifacts). Three seeds: mean
and spread (sample std). Whatever the numbers say goes to RESULTS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import record
from benchmarks.reward_common import backbone, datamodule, fit, mean_spread, pair_accuracy, write_items
from lightning_modules.reward_models import JointRewardModel


def build(lm_weight: float, lr: float, seed: int) -> JointRewardModel:
    """The tiny reward model: JRM with λ = lm_weight (λ = 0 is the BT-only model: no LM term at all)."""
    torch.manual_seed(seed)
    model = JointRewardModel(
        backbone=backbone(64), rubrics={"a": "{instruction}"}, loss="bt", head_widths=(64, 16), head_dropout=0.0,
        lr=lr, special_token_lr=lr, lm_weight=lm_weight, rationale_prompt="{instruction} Explain.", seed=seed,
    )  # fmt: skip
    model.configure_model()
    return model


def main(argv: list[str] | None = None) -> None:
    """Train BT-only and JRM at each λ for each seed; record held-out pairwise accuracy."""
    parser = argparse.ArgumentParser(prog="omnilab bench reward_replication")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--train-items", type=int, default=800)
    parser.add_argument("--val-items", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results: dict[float, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            root = Path(tmp) / f"seed{seed}"
            write_items(root, {"train": args.train_items, "val": args.val_items}, seed, 64)
            for lam in [0.0, *args.lambdas]:
                model = build(lam, args.lr, seed)
                seconds = fit(model, datamodule(root, seed=seed), args.steps)
                acc = pair_accuracy(model, datamodule(root, seed=seed))
                results.setdefault(lam, []).append({**acc, "seconds": seconds})
                print(f"seed {seed} lambda {lam}: {acc}", flush=True)
    rows, metrics = [], {}
    for lam, runs in results.items():
        row = {"model": "BT only" if lam == 0 else f"JRM λ={lam:g}"}
        for key, label in (
            ("all", "held-out pair acc."),
            ("local", "pairs with a local error"),
            ("global", "other pairs"),
        ):
            m, s = mean_spread([r[key] for r in runs])
            row[label] = f"{m:.3f} ± {s:.3f}"
            metrics[f"lambda_{lam:g}_{key}"] = m
        row["per seed (all)"] = ", ".join(f"{r['all']:.3f}" for r in runs)
        row["train s / run"] = f"{sum(r['seconds'] for r in runs) / len(runs):.0f}"
        rows.append(row)
    minutes = (time.perf_counter() - start) / 60
    notes = (
        f"Tint-edit items (benchmarks/reward_common.py): {args.train_items} training and {args.val_items} held-out items "
        f"per seed (each seed draws its own data and init), 64 px, 2 candidates, whole- and half-image instructions "
        f"in 4 colours; a 1-layer Qwen3-VL (width 64, initializer_range 0.5), one rubric, the EditReward head (64, 16), "
        f"plain BT; {args.steps} steps of 8 items' pairs, AdamW lr {args.lr}; the JRM rows add λ × the rationale "
        f"cross-entropy (answer tokens only) on the same backbone. Accuracy: strict pairs, chance 0.5; ± is the "
        f"sample std over seeds {args.seeds}. {minutes:.1f} min in all."
    )
    record(
        "reward_replication",
        "JRM mini-replication: BT only vs joint preference + language modelling",
        rows,
        notes,
        metrics,
    )


if __name__ == "__main__":
    main()
