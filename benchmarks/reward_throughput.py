"""Reward-model speed, as ratios measured in one run on the same tiny backbone.

- Scoring throughput (JRM's efficiency argument, JRM paper): pairs per second of the discriminative head
  (`JointRewardModel.score_edits`: one forward pass per candidate, the head at the reward token) vs the generative
  verdict (`SpatialRewardModel.score_edits`: greedy SC and PQ verdicts per candidate, here --verdict-tokens each,
  the length of the tint items' verdicts), same Qwen3-VL backbone, same images and instructions.
- Training step: the uncertainty-aware BT loss (EditReward's default, 1000 Monte Carlo draws) vs plain BT, a
  full step (forward, backward, AdamW) of `PreferenceRewardModel` on the same batch; and the two loss functions
  alone on a batch of 64 pairs.
- Served vs in-process: `RewardModelReward` called in this process vs the same reward served by `omnilab serve
  reward` on localhost (`RemoteReward`: PNG encoding, HTTP, decoding) at equal batch.
Medians of interleaved repeats (benchmarks.common.interleaved).
"""

from __future__ import annotations

import argparse
import os
import selectors
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

import lightning as L
import torch
import yaml

from benchmarks.common import interleaved, record
from benchmarks.reward_common import backbone
from lightning_modules.reward_models import (
    JointRewardModel,
    PreferenceRewardModel,
    SpatialRewardModel,
    bt_loss,
    uncertainty_bt_loss,
)
from rewards.remote import RemoteReward
from rewards.reward_model import RewardModelReward

ROOT = Path(__file__).resolve().parent.parent


def _images(n: int, side: int, seed: int) -> tuple[list, list, list]:
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, side, side, generator=g) * 2 - 1 for _ in range(n)]
    sources = [[torch.rand(3, side, side, generator=g) * 2 - 1] for _ in range(n)]
    return (
        images,
        sources,
        [f"Make image 1 {c}." for c in ("red", "green", "blue", "yellow") * (n // 4 + 1)][:n],
    )


def _quiet(module: L.LightningModule) -> None:
    module.log = lambda *a, **k: None  # training steps outside a Trainer


def main(argv: list[str] | None = None) -> None:
    """Measure the three ratios and write the RESULTS.md section."""
    parser = argparse.ArgumentParser(prog="omnilab bench reward_throughput")
    parser.add_argument("--pairs", type=int, default=8, help="pairs scored per repeat")
    parser.add_argument("--verdict-tokens", type=int, default=60, help="tokens of each generated verdict")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = backbone(64)
    head = JointRewardModel(
        backbone=spec, rubrics={"a": "{instruction}"}, head_widths=(64, 16), lm_weight=0.5
    )
    judge = SpatialRewardModel(backbone=spec, sc_prompt="{instruction} Judge the edit.", pq_prompt="Judge the quality.", max_new_tokens=args.verdict_tokens)  # fmt: skip
    for m in (head, judge):
        m.configure_model()
        m.eval()
    judge.vlm.model.generation_config.min_new_tokens = (
        args.verdict_tokens
    )  # equal-length verdicts, every repeat
    images, sources, prompts = _images(2 * args.pairs, 64, 0)

    def score(model):
        def go() -> None:
            with torch.no_grad():
                model.score_edits(sources, prompts, images)

        return go

    t = interleaved({"head": score(head), "verdict": score(judge)}, args.repeats)
    head_pps, verdict_pps = args.pairs / median(t["head"]), args.pairs / median(t["verdict"])
    rows = [
        {"quantity": "pairs/s, discriminative head (JRM inference)", "value": head_pps},
        {
            "quantity": f"pairs/s, generative verdicts (SpatialReward, SC + PQ of {args.verdict_tokens} tokens)",
            "value": verdict_pps,
        },
        {"quantity": "head / verdict throughput", "value": head_pps / verdict_pps},
    ]

    # -- MC uncertainty BT vs plain BT
    models = {}
    for loss in ("uncertainty", "bt"):
        torch.manual_seed(0)
        m = PreferenceRewardModel(backbone=spec, rubrics={"a": "{instruction}", "b": "Quality: {instruction}"}, loss=loss, head_widths=(64, 16), mc_samples=1000)  # fmt: skip
        m.configure_model()
        _quiet(m)
        models[loss] = (m, torch.optim.AdamW(m.parameters(), lr=1e-4))
    batch = {
        "sources": sources[: args.pairs], "instruction": prompts[: args.pairs], "chosen": images[: args.pairs],
        "rejected": images[args.pairs :], "tie": torch.zeros(args.pairs, dtype=torch.bool),
    }  # fmt: skip

    def step(loss: str):
        model, optimizer = models[loss]

        def go() -> None:
            out = model.training_step(batch, 0)
            optimizer.zero_grad()
            out.backward()
            optimizer.step()

        return go

    t = interleaved({"uncertainty": step("uncertainty"), "bt": step("bt")}, args.repeats)
    mu = torch.randn(64, requires_grad=True)
    ls = torch.zeros(64, requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    t_loss = interleaved(
        {
            "uncertainty": lambda: uncertainty_bt_loss(
                mu, ls, mu.detach() * 0, ls.detach(), 1000, gen
            ).backward(),
            "bt": lambda: bt_loss(mu).backward(),
        },
        max(args.repeats, 20),
    )
    rows += [
        {
            "quantity": "training step, uncertainty BT (1000 MC draws) / plain BT",
            "value": median(t["uncertainty"]) / median(t["bt"]),
        },
        {
            "quantity": "loss alone, 64 pairs: uncertainty BT / plain BT",
            "value": median(t_loss["uncertainty"]) / median(t_loss["bt"]),
        },
        {"quantity": "training step, plain BT (s)", "value": median(t["bt"])},
    ]

    # -- served vs in-process
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "jrm.ckpt"
        trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
        trainer.strategy.connect(head)
        trainer.save_checkpoint(ckpt)
        spec_yaml = {"reward": {"class_path": "rewards.reward_model.RewardModelReward", "init_args": {"class_path": "lightning_modules.reward_models.JointRewardModel", "checkpoint": str(ckpt), "device": "cpu", "batch_size": 16}}}  # fmt: skip
        config = Path(tmp) / "serve.yaml"
        config.write_text(yaml.safe_dump(spec_yaml))
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads))
        proc = subprocess.Popen([sys.executable, "-m", "omnilab", "serve", "reward", "--config", str(config), "--port", "0"], cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            sel = selectors.DefaultSelector()
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout=300):
                raise RuntimeError("the reward server did not start")
            url = proc.stdout.readline().split(" on ")[1].strip()
            local = RewardModelReward(class_path="lightning_modules.reward_models.JointRewardModel", checkpoint=str(ckpt), device="cpu", batch_size=16)  # fmt: skip
            remote = RemoteReward(url, timeout=120)
            n = 2 * args.pairs
            meta = [{}] * n

            def call(reward):
                def go() -> None:
                    reward(images, prompts, sources, meta)

                return go

            t = interleaved({"in-process": call(local), "served": call(remote)}, args.repeats)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    rows += [
        {"quantity": f"latency, {2 * args.pairs} images, in-process (s)", "value": median(t["in-process"])},
        {
            "quantity": f"latency, {2 * args.pairs} images, served on localhost (s)",
            "value": median(t["served"]),
        },
        {"quantity": "served / in-process latency", "value": median(t["served"]) / median(t["in-process"])},
    ]
    notes = (
        f"A 1-layer Qwen3-VL (width 64) with 64 px images (4 tokens each) on CPU, {args.threads} thread(s); {args.pairs} pairs "
        f"({2 * args.pairs} candidates) per repeat; medians of {args.repeats} interleaved repeats. The verdict path generates "
        f"exactly {args.verdict_tokens} tokens per SC and per PQ answer (the length of the tint items' verdicts with the "
        "tiny tokenizer; a real Qwen tokenizer spends ~70-150 tokens on a verdict). On a GPU with a 7-8B backbone the "
        "head's pass is one prefill per candidate while the verdict adds two decodes of that length: the ratio grows "
        "with the verdict length. Served latency adds PNG encoding, HTTP and decoding on one machine."
    )
    record(
        "reward_throughput",
        "Reward models: head vs verdict throughput, MC-BT step, served latency (CPU)",
        rows,
        notes,
        None,
    )


if __name__ == "__main__":
    main()
