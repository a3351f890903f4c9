"""UniPic 3.0 few-step sampling speed: the 8-step student without CFG vs the 50-step teacher with true CFG, same run.

The student and the teacher have one architecture (docs/methods/unipic3.md), so the sampling cost compares
`FlowEdit.sample` at the teacher's settings (50 steps, true CFG 4 with the norm rescale: 100 DiT passes) with the
student's (8 steps, guidance 1: 8 passes) on the same module, weights, references and prompt. The DiT passes
(NFE) are counted by a forward hook. The paper's 12.5x is the NFE ratio 100 / 8; the wall-clock ratio is lower by
what does not scale with steps (text encoder, VAE encode/decode of the references and the output). Those parts
are timed on their own in the same run (interleaved with one DiT pass), so the table shows where the rest goes:
with a fixed cost F and a DiT pass P the ratio is (F_teacher + 100 P) / (F_student + 8 P), and >= 12x needs
the student's fixed cost below about a third of one DiT pass.

DMD's step-time ratio: a critic-only iteration (the student's no-grad rollout, one critic forward/backward) vs an
iteration that also updates the student (teacher with CFG, critic, the DMD gradient through the student), from
one fit with `critic_updates: 2` so the two kinds alternate, without backward simulation (j = 0: the rollout
draws j per step, which would make the two kinds' costs differ by the rollout's length, not by the update).
Runs interleave; the fastest of each (a shared machine: the minimum is the least disturbed run).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from torch.utils.data import DataLoader

from benchmarks.common import interleaved, record
from lightning_modules.dmd import DMD

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "experiments" / "_base" / "tiny_flow_qwen.yaml"
TINY = ROOT / "experiments" / "unipic3" / "tiny.yaml"


def model_args(width: int) -> dict[str, Any]:
    """The tiny UniPic-3 model arguments (backbone heads scaled to `width` / the config's head dim)."""
    args = yaml.safe_load(BASE.read_text())["model"]["init_args"]
    args["backbone"] = yaml.safe_load(TINY.read_text())["model"]["init_args"]["backbone"]
    config = args["backbone"]["config"]
    if width % config["attention_head_dim"]:
        raise SystemExit(f"--width {width}: give a multiple of the head dim {config['attention_head_dim']}")
    args["backbone"]["config"] = {**config, "num_attention_heads": width // config["attention_head_dim"]}
    for key in ("lr_schedule", "warmup_steps", "sampler", "val_sample_steps"):
        args.pop(key, None)
    return args


def batch(n: int, side: int, refs: int, seed: int = 0) -> dict[str, Any]:
    """n compositions with `refs` references of side/2 px and a side x side target (random pixels)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "refs": [
            [torch.rand(3, side // 2, side // 2, generator=g) * 2 - 1 for _ in range(refs)] for _ in range(n)
        ],
        "target": [torch.rand(3, side, side, generator=g) * 2 - 1 for _ in range(n)],
        "instruction": [f"put the objects of the {refs} pictures together, {i}" for i in range(n)],
        "__key__": [f"b{i}" for i in range(n)],
    }


class StepTimer(L.Callback):
    """Wall-clock of each training iteration, with whether it updated the student."""

    def __init__(self) -> None:
        self.times: list[tuple[bool, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        """Start the clock."""
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        """Record the iteration's time and kind (the student updates at steps 0, k, 2k, ...)."""
        student = (trainer.global_step - 1) % pl_module.critic_updates == 0
        self.times.append((student, time.perf_counter() - self.start))


def fixed_costs(model: DMD, data: dict[str, Any], side: int, repeats: int) -> dict[str, float]:
    """Seconds (fastest run) of each part of `sample` that does not scale with the steps, and of one DiT pass."""
    refs = [list(r) for r in data["refs"]]
    with torch.no_grad():
        ref_latents = [model.codec(r) for r in refs]
        text = model.text_encoder(list(data["instruction"]), refs)
        f, c = model.codec.factor, model.codec.channels
        x = [torch.randn(c, side // f, side // f, generator=torch.Generator().manual_seed(0))]
        sigma = torch.tensor([0.5])
        fns = {
            "text": lambda: model.text_encoder(list(data["instruction"]), refs),
            "text_negative": lambda: model.text_encoder([model.sampler["negative_prompt"]], refs),
            "vae_encode": lambda: [model.codec(r) for r in refs],
            "vae_decode": lambda: model.codec(x, decode=True),
            "dit": lambda: model.backbone(x, ref_latents, sigma, text),
        }
        fns = {k: (lambda fn=fn: (fn(), None)[1]) for k, fn in fns.items()}
        return {k: min(v) for k, v in interleaved(fns, max(3, repeats)).items()}


def main(argv: list[str] | None = None) -> None:
    """Measure the sampling ratio and DMD's step-time ratio; write the RESULTS.md section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=128, help="DiT width (heads x head dim)")
    parser.add_argument("--side", type=int, default=64, help="target side in px (4 px per token)")
    parser.add_argument("--refs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="DMD iterations timed (the first two warm up)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = DMD(
        **model_args(args.width),
        critic_updates=2,
        student_steps=[8],
        backward_simulation=False,
        sampler={
            "steps": 8,
            "guidance": 1.0,
            "true_cfg": True,
            "cfg_norm_rescale": True,
            "negative_prompt": " ",
        },
    )
    model.configure_model()
    model.eval()
    data = batch(1, args.side, args.refs)
    calls = [0]
    model.backbone.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    nfe: dict[str, int] = {}

    def sampler(name: str, steps: int, guidance: float):
        def run() -> None:
            calls[0] = 0
            gen = torch.Generator().manual_seed(0)
            model.sample(
                data["refs"],
                data["instruction"],
                size=(args.side, args.side),
                steps=steps,
                guidance=guidance,
                generator=gen,
            )
            nfe[name] = calls[0]

        return run

    times = interleaved(
        {
            "teacher 50 steps, true CFG 4": sampler("teacher", 50, 4.0),
            "student 8 steps": sampler("student", 8, 1.0),
        },
        args.repeats,
    )
    teacher, student = (min(t) for t in times.values())
    parts = fixed_costs(model, data, args.side, args.repeats)
    fixed_student = parts["text"] + parts["vae_encode"] + parts["vae_decode"]
    fixed_teacher = fixed_student + parts["text_negative"]
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[timer],
    )  # fmt: skip
    trainer.fit(
        model,
        DataLoader(
            [batch(2, args.side, args.refs, s) for s in range(args.steps)],
            batch_size=None,
            collate_fn=lambda b: b,
        ),
    )
    kinds = timer.times[2:]  # the first two iterations warm up
    with_student = min(t for s, t in kinds if s)
    critic_only = min(t for s, t in kinds if not s)
    rows = [
        {"sampler": "teacher: 50 steps, true CFG 4", "DiT passes": nfe["teacher"], "s / image": f"{teacher:.3f}", "speed-up": "1.0x"},
        {"sampler": "student: 8 steps, no CFG", "DiT passes": nfe["student"], "s / image": f"{student:.3f}", "speed-up": f"{teacher / student:.1f}x"},
        {"sampler": "  of which: text encoder, instruction (VLM over the references)", "DiT passes": "", "s / image": f"{parts['text']:.3f}", "speed-up": ""},
        {"sampler": "  of which: text encoder, negative prompt (teacher's CFG only)", "DiT passes": "", "s / image": f"{parts['text_negative']:.3f}", "speed-up": ""},
        {"sampler": f"  of which: VAE encode of the {args.refs} references", "DiT passes": "", "s / image": f"{parts['vae_encode']:.3f}", "speed-up": ""},
        {"sampler": "  of which: VAE decode of the output", "DiT passes": "", "s / image": f"{parts['vae_decode']:.3f}", "speed-up": ""},
        {"sampler": "  of which: one DiT pass", "DiT passes": 1, "s / image": f"{parts['dit']:.3f}", "speed-up": ""},
        {"sampler": "denoising loops only (total minus the fixed parts)", "DiT passes": "", "s / image": f"{teacher - fixed_teacher:.3f} / {student - fixed_student:.3f}", "speed-up": f"{(teacher - fixed_teacher) / (student - fixed_student):.1f}x"},
        {"sampler": "DMD iteration with the student update (batch 2)", "DiT passes": "", "s / image": f"{with_student:.3f} s / step", "speed-up": ""},
        {"sampler": "DMD critic-only iteration (batch 2)", "DiT passes": "", "s / image": f"{critic_only:.3f} s / step", "speed-up": f"critic / student step {critic_only / with_student:.2f}"},
    ]  # fmt: skip
    notes = (
        f"Tiny UniPic-3 DiT (2 layers, width {args.width}), {args.side}x{args.side} target, {args.refs} references "
        f"of {args.side // 2} px, CPU. NFE ratio {nfe['teacher'] / nfe['student']:.1f} (the paper's 12.5x is this "
        f"ratio at full size); the wall-clock ratio {teacher / student:.1f}x includes the text encoder and VAE passes, "
        f"which do not shrink with the steps: the student's fixed parts (text, VAE encode, VAE decode) take "
        f"{fixed_student:.2f} s = {fixed_student / parts['dit']:.1f} DiT passes here (the teacher's add the negative "
        f"prompt's encoding), against the <= 0.36 passes that >= 12x needs. At this size the VLM text encoder and the "
        f"Qwen video VAE (3D convolutions over one frame) cost as much as several DiT passes; at 20B one DiT pass "
        f"dominates them. Profiled (cProfile): the only per-step work of ours that did not depend on the step was the "
        f"text stream's input projection (and the conditioning's device copy), about 10% of a tiny DiT pass; it now "
        f"runs once per sampling call (`PackedDiT.reuse_condition`, bit-identical images). That makes every pass "
        f"cheaper for both samplers, so it lowers this ratio slightly rather than raising it. "
        f"The fastest of interleaved runs (a shared, loaded machine); untrained weights (speed does not depend on them). DMD steps without backward simulation (the same rollout cost for both kinds)."
    )
    print(
        record(
            "distill_speed",
            "UniPic 3.0: 8-step student vs 50-step CFG teacher sampling; DMD step times",
            rows,
            notes,
        )
    )
