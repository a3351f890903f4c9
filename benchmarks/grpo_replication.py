"""Flow-GRPO / MSGRPO / PDTR mini-replication on CPU (docs/methods/flow_grpo.md; UniRef-Image-Edit and UniPic 2.0 papers).

Three claims tested in miniature, each with the suite's real loop (FlowGRPO + GRPORollouts [+ DualTaskSchedule]):
(a) Flow-GRPO raises the reward: the mean training reward and, on HELD-OUT prompts, the ODE-sampled reward
    (ColourCheck: "the image is red") and a different held-out metric (hue accuracy) over training steps.
(b) MSGRPO's multi-source rule: two references, one consistency score each (left half keeps image 1's colour,
    right half image 2's), the second on a compressed scale (a tight tau: small spread, as when two references
    are judged by differently scaled metrics). "sum_then_normalize" (mean of the raw per-reference scores, then
    the group z-score) vs "msgrpo" (each reference z-scored in the group, then averaged: the notes' proposal,
    §3 pattern 2); held-out per-reference consistency at one common tau.
(c) PDTR's stage order: text-to-image then editing vs editing only, with the same number of steps, scored on
    held-out editing prompts ("make image 1 red": the edited image must be red).
The model is a 2-layer random-init SD3 DiT at 16 x 16 px whose tiny VAE is first fitted (a few hundred steps)
to reconstruct flat colours: a random VAE decoder barely changes colour with its latents (GroupNorm), so no
colour reward could move. Whatever the numbers say goes to RESULTS.md and to the MLflow experiment
`grpo-replication` (one run per variant, with the reward curves).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from diffusers import AutoencoderKL
from lightning.pytorch.loggers import MLFlowLogger
from torch.utils.data import DataLoader, Dataset

from benchmarks.common import record
from callbacks.dual_task import DualTaskSchedule
from callbacks.grpo import GRPORollouts
from lightning_modules.flow_grpo import DEFAULT_LORA, FlowGRPO
from omnilab.tracking import tracking_uri
from rewards.base import Reward, to_rgb
from rewards.scene import ColourCheck

SIDE = 16
PALETTE = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 40)}
VAE = {
    "block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2, "latent_channels": 16, "norm_num_groups": 8, "layers_per_block": 1,
}  # fmt: skip
MODEL = {
    "backbone": {
        "family": "sd3_kontext",
        "config": {
            "sample_size": 32, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
            "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32,
            "caption_projection_dim": 16, "pooled_projection_dim": 32, "pos_embed_max_size": 32,
        },
    },
    "text": {
        "config": {
            "clip": [{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "projection_dim": 32, "max_position_embeddings": 77}],
            "t5": {"d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 1, "num_heads": 2},
        },
        "tokenizer": {"clip": {"model_max_length": 16}, "t5": {}},
        "max_sequence_length": 16,
    },
}  # fmt: skip
LORA = {**DEFAULT_LORA, "r": 8, "lora_alpha": 16}  # the Flow-GRPO targets, a smaller rank
T2I = ["a red image", "paint it red", "red", "everything in red"]
T2I_HELDOUT = ["the whole picture in red", "a canvas of red", "fill it with red", "red all over"]
EDIT = ["make image 1 red", "turn image 1 red", "recolour image 1 in red", "image 1, but red"]
EDIT_HELDOUT = [
    "change image 1 to red",
    "make the picture in image 1 red",
    "paint image 1 red",
    "red version of image 1",
]
COMPOSE = ["image 1 on the left, image 2 on the right", "left: image 1, right: image 2"]
COMPOSE_HELDOUT = ["put image 1 left and image 2 right", "image 1 then image 2, side by side"]


# --------------------------------------------------------------------------- the data and rewards


def flat(rgb: tuple[int, int, int]) -> torch.Tensor:
    """A SIDE x SIDE image of one colour, [3, H, W] in [-1, 1]."""
    return (torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1.0).view(3, 1, 1).expand(3, SIDE, SIDE).clone()


def red_meta() -> dict[str, Any]:
    """The json of a target that is red all over (what ColourCheck reads)."""
    box = [0, 0, SIDE, SIDE]
    obj = {"kind": "shape", "colour": "red", "rgb": list(PALETTE["red"]), "fill": "flat", "bbox": box, "pixels": SIDE * SIDE, "box": box}  # fmt: skip
    return {"objects": [obj], "target_size": [SIDE, SIDE]}


def _jitter(rgb: tuple[int, int, int], rng: torch.Generator) -> tuple[int, ...]:
    """The colour with each channel moved by up to +-30 (clipped to 0..255)."""
    return tuple(int(min(255, max(0, c + int(torch.randint(-30, 31, (1,), generator=rng))))) for c in rgb)


def sample(kind: str, prompt: str, rng: torch.Generator) -> dict[str, Any]:
    """One sample: t2i (no refs), edit (one flat ref of a random other colour), compose (two jittered refs)."""
    names = list(PALETTE)
    if kind == "t2i":
        refs = []
    elif kind == "edit":
        refs = [flat(PALETTE[names[1 + int(torch.randint(3, (1,), generator=rng))]])]
    else:
        refs = [flat(_jitter(PALETTE["red"], rng)), flat(_jitter(PALETTE["blue"], rng))]
    return {
        "refs": refs,
        "instruction": prompt,
        "task": kind,
        "meta": red_meta(),
        "target": torch.zeros(3, SIDE, SIDE),
    }


class Prompts(Dataset):
    """Batches of `per_batch` samples cycling over (kind, prompt) pairs; sample i is the same on every run."""

    def __init__(self, items: list[tuple[str, str]], per_batch: int, length: int, seed: int) -> None:
        self.items, self.per_batch, self.length, self.seed = items, per_batch, length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        rng = torch.Generator().manual_seed(self.seed * 100_003 + i)
        picks = [self.items[(i * self.per_batch + k) % len(self.items)] for k in range(self.per_batch)]
        samples = [sample(kind, prompt, rng) for kind, prompt in picks]
        batch = {key: [s[key] for s in samples] for key in samples[0]}
        batch["__key__"] = [f"{self.seed}-{i}-{k}" for k in range(len(samples))]
        return batch


def loader(items: list[tuple[str, str]], per_batch: int, length: int, seed: int) -> DataLoader:
    """A DataLoader of ready-made batches."""
    return DataLoader(Prompts(items, per_batch, length, seed), batch_size=None, collate_fn=lambda b: b)


def _match(region: torch.Tensor, rgb: Any, tau: float) -> float:
    """mean exp(-||pixel - rgb||^2 / (2 tau^2)) over a [3, h, w] region (0..255 RGB distances)."""
    pixels = torch.from_numpy(to_rgb(region)).reshape(-1, 3)
    d2 = ((pixels - torch.as_tensor(rgb, dtype=torch.float32)) ** 2).sum(1)
    return float(torch.exp(-d2 / (2 * tau**2)).mean())


class HalfConsistency(Reward):
    """Per-reference consistency: left half vs image 1's colour ("ref0"), right half vs image 2's ("ref1").

    Each score is mean exp(-d^2 / (2 tau_k^2)) of the half against the reference's mean colour; a tight tau_k
    compresses that reference's score (a small spread), as differently scaled judges would.
    """

    nan_ok = True

    def __init__(self, tau0: float = 80.0, tau1: float = 80.0, name: str = "consistency") -> None:
        self.tau, self.name = (tau0, tau1), name

    def __call__(self, images, prompts, references, meta):
        """{"ref0": [N], "ref1": [N]}: each half against its reference's mean colour (NaN without that reference)."""
        out = {"ref0": [], "ref1": []}
        for img, refs in zip(images, references):
            halves = (img[:, :, : SIDE // 2], img[:, :, SIDE // 2 :])
            for k in range(2):
                ref = refs[k] if k < len(refs) else None
                rgb = None if ref is None else to_rgb(ref).reshape(-1, 3).mean(0)
                out[f"ref{k}"].append(float("nan") if ref is None else _match(halves[k], rgb, self.tau[k]))
        return {k: torch.tensor(v) for k, v in out.items()}


class OneHalf(HalfConsistency):
    """One reference's consistency as a plain score (to log each reference of the held-out set on its own)."""

    def __init__(self, k: int, tau: float = 40.0) -> None:
        super().__init__(tau, tau, name=f"ref{k}")
        self.k = k

    def __call__(self, images, prompts, references, meta):
        """{"score": [N]}: reference k's consistency."""
        return {"score": super().__call__(images, prompts, references, meta)[f"ref{self.k}"]}


class HueAccuracy(Reward):
    """Share of pixels whose nearest palette colour is red (a held-out metric unlike ColourCheck's soft distance)."""

    name = "hue"

    def __call__(self, images, prompts, references, meta):
        """{"score": [N]}: the share of red pixels."""
        palette = torch.tensor(list(PALETTE.values()), dtype=torch.float32)
        scores = []
        for img in images:
            pixels = torch.from_numpy(to_rgb(img)).reshape(-1, 3)
            nearest = torch.cdist(pixels, palette).argmin(1)
            scores.append(float((nearest == 0).float().mean()))
        return {"score": torch.tensor(scores)}


# --------------------------------------------------------------------------- the runs


def fit_vae(out: Path, steps: int, seed: int = 0) -> Path:
    """Fit the tiny AutoencoderKL to reconstruct flat and two-colour images (MSE + 1e-6 KL); save it to `out`."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE)
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        n = 32
        a = (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1).expand(n, 3, SIDE, SIDE).clone()
        b = (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1).expand(n, 3, SIDE, SIDE)
        half = torch.rand(n, generator=g) < 0.5
        a[half, :, :, SIDE // 2 :] = b[half, :, :, SIDE // 2 :]
        posterior = vae.encode(a).latent_dist
        loss = (
            (vae.decode(posterior.sample(generator=g)).sample - a) ** 2
        ).mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.save_pretrained(out)
    return out


def build(vae_dir: Path, lr: float, seed: int) -> FlowGRPO:
    """The 2-layer SD3 FlowGRPO with the fitted VAE (no CFG, beta 0)."""
    torch.manual_seed(seed)
    spec = copy.deepcopy(MODEL)
    model = FlowGRPO(**spec, vae={"pretrained": str(vae_dir)}, lora=LORA, lr=lr, beta=0.0, sampler={"guidance": 1.0}, val_sample_steps=0, seed=seed)  # fmt: skip
    model.configure_model()
    return model


def run(
    name: str,
    model: FlowGRPO,
    grpo: GRPORollouts,
    train: DataLoader,
    heldout: DataLoader,
    steps: int,
    eval_every: int,
    extra: list[L.Callback] | None = None,
) -> GRPORollouts:
    """Fit with GRPO for `steps`, evaluating the held-out set every `eval_every` steps; log to MLflow."""
    logger = MLFlowLogger(experiment_name="grpo-replication", run_name=name, tracking_uri=tracking_uri())
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=[grpo, *(extra or [])],
        logger=logger,
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=eval_every,
        check_val_every_n_epoch=None,
        limit_val_batches=len(heldout),
    )
    trainer.validate(model, heldout, verbose=False)  # the step-0 evaluation
    trainer.fit(model, train, heldout)
    return grpo


def callback(reward: dict[str, Any], eval_reward: dict[str, Any], **kw: Any) -> GRPORollouts:
    """GRPORollouts with the replication's rollout settings (G 8, 4 steps, the first 3 trained, one update each).

    Flow-GRPO's timestep_fraction 0.99 leaves the last step out: on the SD3 pipeline's grid it runs sigma ~0.009
    -> 0, where the SDE's std is near 0 and the log-probability swings with every update."""
    args = dict(group_size=8, steps=4, eval_steps=8, train_steps="fraction", timestep_fraction=0.99, steps_per_rollout=1, std_scope="group", log_every_n_steps=5)  # fmt: skip
    return GRPORollouts(reward=reward, eval_reward=eval_reward, **{**args, **kw})


def mean(values: list[float]) -> float:
    """The plain mean (NaN for none)."""
    return sum(values) / len(values) if values else float("nan")


def main(argv: list[str] | None = None) -> None:
    """Run (a), (b), (c) and write the RESULTS.md section."""
    parser = argparse.ArgumentParser(prog="omnilab bench grpo_replication")
    parser.add_argument(
        "--steps", type=int, default=160, help="GRPO steps of (a) and of each run of (b), (c)"
    )
    parser.add_argument("--eval-every", type=int, default=40)
    parser.add_argument("--vae-steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: tiny models run best on one)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    metrics: dict[str, float] = {}
    steps, every, seed = args.steps, args.eval_every, args.seed
    with tempfile.TemporaryDirectory() as tmp:
        vae = fit_vae(Path(tmp) / "vae", args.vae_steps, seed)
        colour, hue = {"colour": ColourCheck(tau=80.0)}, {"hue": HueAccuracy()}

        # (a) the reward rises, on held-out prompts too
        t2i = [("t2i", p) for p in T2I]
        held = loader([("t2i", p) for p in T2I_HELDOUT], 4, 2, seed + 1)
        a = run("a-flow-grpo", build(vae, args.lr, seed), callback(colour, hue), loader(t2i, 2, 10**6, seed), held, steps, every)  # fmt: skip
        curve = [h["reward/total"] for h in a.history]
        k = max(1, len(curve) // 8)
        evals = a.evaluations
        rows.append({"run": "(a) Flow-GRPO", "quantity": "training reward (ColourCheck red, rollouts)", "start": mean(curve[:k]), "end": mean(curve[-k:])})  # fmt: skip
        rows.append({"run": "(a) Flow-GRPO", "quantity": "held-out prompts: ColourCheck (ODE)", "start": evals[0][0], "end": evals[-1][0]})  # fmt: skip
        rows.append({"run": "(a) Flow-GRPO", "quantity": "held-out prompts: hue accuracy (never trained)", "start": evals[0][1], "end": evals[-1][1]})  # fmt: skip
        metrics |= {"a_train_start": mean(curve[:k]), "a_train_end": mean(curve[-k:]), "a_heldout_start": evals[0][0], "a_heldout_end": evals[-1][0]}  # fmt: skip
        curve_a = " -> ".join(f"{tr:.3f}" for tr, _ in evals)

        # (b) normalize-then-sum (MSGRPO) vs sum-then-normalize on per-reference consistency
        compose = [("compose", p) for p in COMPOSE]
        held_b = loader([("compose", p) for p in COMPOSE_HELDOUT], 4, 2, seed + 2)
        per_ref = {"consistency": HalfConsistency(tau0=80.0, tau1=15.0)}
        eval_b = {"ref0": OneHalf(0), "ref1": OneHalf(1)}
        results_b = {}
        for rule in ("sum_then_normalize", "msgrpo"):
            weights = {"consistency": 1.0, "min": 0.0} if rule == "msgrpo" else None
            scope = "group" if rule == "sum_then_normalize" else None  # msgrpo normalises itself
            cb = callback(per_ref, eval_b, rule=rule, weights=weights, std_scope=scope)
            model = build(vae, args.lr, seed)
            probe = _EvalHistory()
            run(f"b-{rule}", model, cb, loader(compose, 2, 10**6, seed), held_b, steps, every, [probe])
            results_b[rule] = probe.history
        for rule, hist in results_b.items():
            first, last = hist[0], hist[-1]
            for ref in ("ref0", "ref1"):
                key = f"eval/heldout/{ref}"
                scale = "tau 80 in training" if ref == "ref0" else "tau 15 in training: compressed"
                rows.append({"run": f"(b) {rule}", "quantity": f"held-out {ref} consistency, tau 40 ({scale})", "start": first.get(key, float("nan")), "end": last.get(key, float("nan"))})  # fmt: skip
                metrics[f"b_{rule}_{ref}_gain"] = last.get(key, 0.0) - first.get(key, 0.0)

        # (c) PDTR stage order: T2I then edit vs edit only, same steps, held-out editing reward
        mixed = [("t2i", T2I[i % 4]) if i % 2 == 0 else ("edit", EDIT[i % 4]) for i in range(8)]
        held_c = loader([("edit", p) for p in EDIT_HELDOUT], 4, 2, seed + 3)
        half = steps // 2
        results_c = {}
        for label, stages in (
            (
                "t2i-then-edit",
                [{"name": "t2i", "steps": half, "tasks": ["t2i"]}, {"name": "edit", "tasks": ["edit"]}],
            ),
            ("edit-only", [{"name": "edit", "tasks": ["edit"]}]),
        ):
            cb = callback(colour, hue, prompts_per_rollout=2)
            dual = DualTaskSchedule(stages, stop_at_end=False)
            run(
                f"c-{label}",
                build(vae, args.lr, seed),
                cb,
                loader(mixed, 4, 10**6, seed),
                held_c,
                steps,
                every,
                [dual],
            )
            results_c[label] = cb.evaluations
        for label, evals in results_c.items():
            rows.append({"run": f"(c) PDTR {label}", "quantity": "held-out edit prompts: ColourCheck (ODE)", "start": evals[0][0], "end": evals[-1][0]})  # fmt: skip
            rows.append({"run": f"(c) PDTR {label}", "quantity": "held-out edit prompts: hue accuracy", "start": evals[0][1], "end": evals[-1][1]})  # fmt: skip
            metrics[f"c_{label}_edit_end"] = evals[-1][0]
    minutes = (time.perf_counter() - start) / 60
    notes = (
        f"2-layer SD3 DiT (random init, LoRA r8), fitted tiny VAE ({args.vae_steps} steps), {SIDE}x{SIDE} px, G = 8, "
        f"2 prompts per rollout (4 drawn for (c), 2 of the stage's task kept), 4 SDE steps (a = 0.7) on the SD3 pipeline's sigma grid, the first 3 trained (Flow-GRPO's fraction 0.99), one "
        f"update per rollout, lr {args.lr}, beta 0, {steps} steps per run, held-out evaluation (ODE, 8 steps, 8 "
        f"prompts never trained on) every {every} steps; seed {seed}; {minutes:.1f} min in all. 'start' / 'end': "
        f"the first / last eighth of the training-reward curve, or the first (before any update) / last held-out "
        f"evaluation. (a) "
        f"held-out ColourCheck at each evaluation: {curve_a}. (b) ref1's training score has tau 15 (its "
        "values and spread are compressed), ref0's tau 80; the held-out metric scores both at tau 40. "
        "(c) the T2I-then-edit run spends its first half on text-to-image prompts, the edit-only run all steps on "
        "edits; both are scored on the same held-out edit prompts. One seed each: differences of a few thousandths "
        "are within run-to-run noise."
    )
    record("grpo_replication", "Flow-GRPO / MSGRPO / PDTR mini-replication", rows, notes, None)
    _log_summary(metrics)


class _EvalHistory(L.Callback):
    """Keep the `eval/...` metrics of every validation."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Copy this validation's eval metrics."""
        metrics = trainer.callback_metrics
        self.history.append({k: float(v) for k, v in metrics.items() if k.startswith("eval/")})


def _log_summary(metrics: dict[str, float]) -> None:
    """One summary run in the MLflow experiment `grpo-replication`."""
    import mlflow

    from omnilab.tracking import git_sha

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment("grpo-replication")
    with mlflow.start_run(run_name="summary", tags={"git_sha": git_sha()}):
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v == v})


if __name__ == "__main__":
    main()
