"""Reward models as RL rewards: GRPO on the tiny editing policy with each trained reward model vs a plain BT reward.

The RL claim of both papers (SpatialReward and JRM papers; docs/methods/spatialreward.md, docs/methods/jrm.md): a better
reward model is a better online-RL signal for an editing model (SpatialReward: +0.90 on GEdit-Bench for OmniGen2,
twice GPT-4.1's gain; JRM: more stable and better RL). In miniature, on CPU:

1. Reward models are trained on tint-edit items at 16 px (benchmarks/reward_common.py, whole-image instructions
   in 4 colours: "Make image 1 red.", two candidates of known quality): a plain BT discriminative model
   (`PreferenceRewardModel`, loss "bt"), JRM (`JointRewardModel`, λ = 0.5) and SpatialReward (`SpatialRewardModel`,
   SFT on the verdicts with boxes). Each one's held-out pairwise accuracy is recorded first (chance 0.5).
2. Each becomes a batch reward (`rewards.reward_model.RewardModelReward`) for Flow-GRPO (`callbacks.grpo.GRPORollouts`)
   on benchmarks/grpo_replication.py's tiny editing policy (a 2-layer SD3 Kontext DiT with a fitted 16 px VAE,
   LoRA): the prompt "Make image 1 red." with a flat reference of another colour.
3. The policy is scored on held-out references by a metric no reward model saw: the share of pixels whose
   nearest palette colour is red (the generated images' exact ground truth), before and after RL.
Three seeds (data, reward model and policy); mean and sample std. Whatever the numbers say goes to RESULTS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import record
from benchmarks.grpo_replication import HueAccuracy, build, callback, fit_vae, loader, run
from benchmarks.reward_common import backbone, datamodule, fit, mean_spread, pair_accuracy, write_items
from callbacks.grpo import GRPOSkipError
from lightning_modules.reward_models import JointRewardModel, PreferenceRewardModel, SpatialRewardModel
from rewards.reward_model import RewardModelReward

PROMPT = "Make image 1 red."
KINDS = ("bt", "jrm", "spatialreward")


def reward_model(kind: str, lr: float, seed: int) -> Any:
    """A tiny reward model of one kind (16 px items are read at 64 px by the image processor)."""
    torch.manual_seed(seed)
    common = {"backbone": backbone(16), "lr": lr, "seed": seed}
    if kind == "spatialreward":
        model = SpatialRewardModel(**common, boxes=True, sc_prompt="{instruction} Judge the edit.", pq_prompt="Judge the quality.", max_new_tokens=96, lr_schedule="constant")  # fmt: skip
    else:
        head = {
            "rubrics": {"a": "{instruction}"},
            "loss": "bt",
            "head_widths": (64, 16),
            "head_dropout": 0.0,
            "special_token_lr": lr,
        }
        if kind == "bt":
            model = PreferenceRewardModel(**common, **head)
        else:
            model = JointRewardModel(
                **common, **head, lm_weight=0.5, rationale_prompt="{instruction} Explain."
            )
    model.configure_model()
    return model


def main(argv: list[str] | None = None) -> None:
    """Train the reward models, run GRPO with each, record held-out redness before and after."""
    parser = argparse.ArgumentParser(prog="omnilab bench reward_rl_replication")
    parser.add_argument("--rm-steps", type=int, default=600)
    parser.add_argument("--grpo-steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rm-lr", type=float, default=3e-3)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--vae-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results: dict[str, list[dict[str, float]]] = {k: [] for k in KINDS}
    with tempfile.TemporaryDirectory() as tmp:
        vae = fit_vae(Path(tmp) / "vae", args.vae_steps, 0)
        for seed in args.seeds:
            root = Path(tmp) / f"items{seed}"
            write_items(root, {"train": 800, "val": 128}, seed, 16, half_share=0.0)
            held = loader([("edit", PROMPT)], 4, 2, seed + 100)
            for kind in KINDS:
                model = reward_model(kind, args.rm_lr, seed)
                fit(
                    model,
                    datamodule(root, batch_size=4 if kind == "spatialreward" else 8, seed=seed),
                    args.rm_steps,
                )
                acc = pair_accuracy(model, datamodule(root, seed=seed))
                reward = RewardModelReward.from_module(model, device="cpu", batch_size=16, name=kind)
                cb = callback({kind: reward}, {"hue": HueAccuracy()})
                policy = build(vae, args.lr, seed)
                stopped = 0.0
                try:
                    train = loader([("edit", PROMPT)], 2, 10**6, seed)
                    run(f"rm-{kind}-seed{seed}", policy, cb, train, held, args.grpo_steps, args.eval_every)
                except GRPOSkipError as err:  # the reward failed batch after batch: recorded, not hidden
                    print(f"seed {seed} {kind}: GRPO stopped: {err}", flush=True)
                    stopped = 1.0
                evals = cb.evaluations
                curve = [h["reward/total"] for h in cb.history]
                k = max(1, len(curve) // 8)
                nan = float("nan")
                results[kind].append(
                    {
                        "pair_acc": acc["all"], "unscored": acc["unscored"],
                        "hue_start": evals[0][1] if evals else nan, "hue_end": evals[-1][1] if len(evals) > 1 else nan,
                        "rm_start": sum(curve[:k]) / k if curve else nan, "rm_end": sum(curve[-k:]) / k if curve else nan,
                        "skipped": float(cb.skipped), "stopped": stopped,
                    }
                )  # fmt: skip
                print(f"seed {seed} {kind}: {results[kind][-1]}", flush=True)
    rows, metrics = [], {}
    names = {"bt": "plain BT (baseline)", "jrm": "JRM (λ 0.5)", "spatialreward": "SpatialReward (boxes)"}
    for kind, runs in results.items():
        row = {"reward model": names[kind]}
        for key, label in (("pair_acc", "RM held-out pair acc."), ("rm_start", "RM reward, first 1/8"), ("rm_end", "RM reward, last 1/8"),
                           ("hue_start", "held-out red share, before"), ("hue_end", "held-out red share, after")):  # fmt: skip
            m, s = mean_spread([r[key] for r in runs])
            row[label] = f"{m:.3f} ± {s:.3f}"
            metrics[f"{kind}_{key}"] = m
        gain = [r["hue_end"] - r["hue_start"] for r in runs]
        m, s = mean_spread(gain)
        row["red share gain"] = f"{m:+.3f} ± {s:.3f}"
        row["skipped rollouts"] = f"{sum(r['skipped'] for r in runs):.0f}"
        row["runs stopped"] = f"{sum(r['stopped'] for r in runs):.0f}"
        metrics[f"{kind}_gain"] = m
        rows.append(row)
    minutes = (time.perf_counter() - start) / 60
    notes = (
        f"Reward models: 1-layer Qwen3-VL (width 64, initializer_range 0.5) trained {args.rm_steps} steps (lr {args.rm_lr}) "
        f"on 800 tint-edit items at 16 px per seed (whole-image instructions, 4 colours, 2 candidates); 'RM held-out "
        f"pair acc.' on 128 held-out items (chance 0.5). Policy: benchmarks/grpo_replication.py's 2-layer SD3 DiT, "
        f"LoRA r8, fitted VAE ({args.vae_steps} steps), 16 px, G = 8, 2 prompts per rollout, 4 SDE steps (first 3 "
        f"trained), lr {args.lr}, beta 0, {args.grpo_steps} GRPO steps, the reward model as the only training reward "
        f"(SpatialReward: NaN for an unparsable verdict, neutral in its group). Held-out metric (never a reward): the "
        f"share of red pixels (nearest of the 4 palette colours) of ODE samples (8 steps) for 8 held-out references, "
        f"before RL and after the last step. 'RM reward': the training reward on the rollouts. ± is the sample std "
        f"over seeds {args.seeds}. {minutes:.1f} min in all."
    )
    record(
        "reward_rl_replication",
        "Reward models as RL rewards: GRPO with BT, JRM and SpatialReward",
        rows,
        notes,
        metrics,
    )


if __name__ == "__main__":
    main()
