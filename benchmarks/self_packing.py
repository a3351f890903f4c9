"""Training throughput of SELF packing vs the peers' naive padding, on mixes of 1-6 references of varied sizes.

Every arm trains the same tiny Qwen-Image-Edit packed backend (`QwenImageEdit.from_spec(config=...)`, the
backbone of experiments/_base/tiny_flow_qwen.yaml) with the same optimizer step: forward of the flow loss
through the packed backend, backward, AdamW. The inputs are random latents of the sizes the resize rules give
for one seeded mix of reference sets (no VAE or text encoder, so they do not dominate the time). An arm is a
resize rule, a padding rule and a batch size:

- resize "joint" (SELF, UniRef): a sample's references resized together under the global budget
  (`fit_to_budget` mode "joint", floor rounding); "independent" (Qwen-Image-Edit-Plus, FLUX.2): each on its own.
- padding "fixed" (SELF): every sequence padded to max_ref_tokens + the batch's largest target (FlowEdit's
  `max_ref_tokens: budget`, the budget's (B / pixels per token)² tokens); "longest": the batch padded to its
  longest sequence (at batch 1: no padding at all).

Three comparisons, each changing one thing: SELF's fixed length against padding to the longest under the same
joint resize (the packing's own effect); joint against independent resizing, both padded to the longest (the
resize rule's effect; the two together were the old single ratio); and the shipped `uniref/sft` settings (no
upscaling, batch 1, `max_ref_tokens: budget`) against batch 1 without padding. The batch-4 arms enlarge small
images to the budget (UniPic-3's joint rule does; Qwen-Image-Edit-Plus resizes every reference to the full
budget); `--no-upscale` turns that off for them too.

The geometry is the real one (B = 1024 px, sides multiples of 32, min side 128, 16 px per token, originals
512-2048 px) scaled by 1/8 in pixels onto the tiny VAE's 4 px per token, so a side snaps at the same
fraction of the budget (1/32) as on the real models. Runs alternate between the arms; medians. Reported:
the padding fraction of each, real (non-padding) image tokens per second, samples per second, and the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from benchmarks.common import interleaved, record
from datamodules.budget import fit_to_budget
from lightning_modules.components import flow
from lightning_modules.components.packed_dit import QwenImageEdit, TextConditioning, resolve_attention_path
from lightning_modules.flow_edit import flow_loss

ROOT = Path(__file__).resolve().parent.parent
TINY_YAML = ROOT / "experiments" / "_base" / "tiny_flow_qwen.yaml"
LATENT_FACTOR = 2  # the tiny Qwen VAE downsamples by 2; the DiT patch is 2: 4 px per token


@dataclass
class Batch:
    """One training batch of an arm: latents of the resized images and the padded length."""

    targets: list[torch.Tensor]
    refs: list[list[torch.Tensor]]
    max_tokens: int | None
    real_tokens: int  # image tokens of every sample (refs + target)
    slots: int  # B x the padded length


def tiny_backbone_config() -> dict:
    """The DiT config of experiments/_base/tiny_flow_qwen.yaml."""
    spec = yaml.safe_load(TINY_YAML.read_text())["model"]["init_args"]["backbone"]
    return spec["config"]


def draw_mix(
    n_batches: int, batch: int, seed: int, lo: int, hi: int
) -> list[list[tuple[list[tuple[int, int]], tuple[int, int]]]]:
    """Seeded (reference sizes, target size) per sample: 1-6 refs, sides log-uniform in [lo, hi] px."""
    gen = torch.Generator().manual_seed(seed)

    def side() -> int:
        u = torch.rand(1, generator=gen).item()
        return round(lo * (hi / lo) ** u)

    mix = []
    for _ in range(n_batches):
        samples = []
        for _ in range(batch):
            n = int(torch.randint(1, 7, (1,), generator=gen))
            samples.append(([(side(), side()) for _ in range(n)], (side(), side())))
        mix.append(samples)
    return mix


def latent(size: tuple[int, int], channels: int, gen: torch.Generator) -> torch.Tensor:
    """A random latent [C, h/f, w/f] for an image of (w, h) px."""
    w, h = size
    return torch.randn(channels, h // LATENT_FACTOR, w // LATENT_FACTOR, generator=gen)


def make_batches(
    mix: list, mode: str, args: argparse.Namespace, channels: int, upscale: bool, padding: str
) -> list[Batch]:
    """Resize every sample's refs under `mode`, the target under its own budget; latents; the padded length."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    fit = dict(multiple=args.multiple, min_side=args.min_side, upscale=upscale, rounding="floor")
    ppt = LATENT_FACTOR * 2
    batches = []
    for samples in mix:
        targets, refs, lengths, target_tokens = [], [], [], []
        for ref_sizes, target_size in samples:
            sizes = fit_to_budget(ref_sizes, args.budget, mode, **fit)
            (tsize,) = fit_to_budget([target_size], args.target_budget, "joint", **fit)
            refs.append([latent(s, channels, gen) for s in sizes])
            targets.append(latent(tsize, channels, gen))
            target_tokens.append((tsize[0] // ppt) * (tsize[1] // ppt))
            lengths.append(target_tokens[-1] + sum((w // ppt) * (h // ppt) for w, h in sizes))
        if padding == "fixed":  # SELF: fixed length max_ref_tokens + the batch's largest target
            max_tokens = (args.budget // ppt) ** 2 + max(target_tokens)
        else:  # the batch's longest sequence
            max_tokens = None
        length = max(lengths) if max_tokens is None else max_tokens
        batches.append(Batch(targets, refs, max_tokens, sum(lengths), len(lengths) * length))
    return batches


class Arm:
    """A backend, its optimizer and fixed noise/sigmas/text for each batch: one optimizer step per batch."""

    def __init__(self, batches: list[Batch], config: dict, seed: int, text_len: int) -> None:
        torch.manual_seed(seed)
        self.backend = QwenImageEdit.from_spec(config=config)
        self.opt = torch.optim.AdamW(self.backend.parameters(), lr=1e-4)
        self.batches = batches
        gen = torch.Generator().manual_seed(seed + 2)
        width = config["joint_attention_dim"]
        self.extras = [
            (
                [torch.randn(t.shape, generator=gen) for t in b.targets],
                torch.rand(len(b.targets), generator=gen),
                TextConditioning(
                    torch.randn(len(b.targets), text_len, width, generator=gen),
                    torch.ones(len(b.targets), text_len, dtype=torch.bool),
                ),
            )
            for b in batches
        ]

    def step(self, i: int) -> None:
        """Forward + backward of the flow loss through the packed backend, then AdamW."""
        b = self.batches[i]
        eps, sigma, text = self.extras[i]
        x = [flow.interpolate(x0, e, s) for x0, e, s in zip(b.targets, eps, sigma)]
        self.opt.zero_grad(set_to_none=True)
        v = self.backend(x, b.refs, sigma, text, max_tokens=b.max_tokens)
        flow_loss(v, [flow.velocity(x0, e) for x0, e in zip(b.targets, eps)]).backward()
        self.opt.step()
        if abs(self.backend.last_padding_fraction - (1 - b.real_tokens / b.slots)) > 1e-9:
            raise RuntimeError("the backend padded differently from the plan")  # the table's padding is real

    def run(self) -> float:
        """Time one pass over the batches."""
        start = time.perf_counter()
        for i in range(len(self.batches)):
            self.step(i)
        return time.perf_counter() - start


ARMS = {  # name: (resize mode, padding, batch 1 with the shipped uniref/sft settings)
    "SELF: joint, fixed length": ("joint", "fixed", False),
    "joint, padded to longest": ("joint", "longest", False),
    "naive: independent, padded to longest": ("independent", "longest", False),
    "uniref/sft: joint, no upscale, batch 1, fixed length": ("joint", "fixed", True),
    "joint, no upscale, batch 1, no padding": ("joint", "longest", True),
}
RATIOS = {  # what each comparison changes: (numerator arm, denominator arm)
    "fixed length / padded to longest (joint): the packing's own effect": (
        "SELF: joint, fixed length", "joint, padded to longest"),
    "joint / independent (both padded to longest): the resize rule's effect": (
        "joint, padded to longest", "naive: independent, padded to longest"),
    "SELF / naive (both changes, the old single ratio)": (
        "SELF: joint, fixed length", "naive: independent, padded to longest"),
    "uniref/sft fixed length / no padding (batch 1)": (
        "uniref/sft: joint, no upscale, batch 1, fixed length", "joint, no upscale, batch 1, no padding"),
}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Build the arms on one seeded mix, alternate their passes, write the table."""
    parser = argparse.ArgumentParser(prog="omnilab bench self_packing")
    parser.add_argument(
        "--batches", type=int, default=8, help="batches per pass (the same mix for every arm)"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="alternating passes per arm")
    parser.add_argument("--budget", type=int, default=128, help="reference budget B in px (real 1024 / 8)")
    parser.add_argument("--target-budget", type=int, default=128, help="the target's budget in px")
    parser.add_argument("--multiple", type=int, default=4, help="side multiple in px (real 32 / 8)")
    parser.add_argument("--min-side", type=int, default=16, help="min side in px (real 128 / 8)")
    parser.add_argument("--sides", type=int, nargs=2, default=[64, 256], help="original sides, px (real / 8)")
    parser.add_argument(
        "--no-upscale", dest="upscale", action="store_false", help="never enlarge in the batch-4 arms too"
    )
    parser.add_argument("--text-len", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    load = os.getloadavg()
    config = tiny_backbone_config()
    channels = config["in_channels"] // 4
    mix = draw_mix(args.batches, args.batch_size, args.seed, *args.sides)
    singles = [[sample] for batch in mix for sample in batch]  # the same samples at batch 1
    arms = {}
    for name, (mode, padding, sft) in ARMS.items():
        batches = make_batches(
            singles if sft else mix, mode, args, channels, args.upscale and not sft, padding
        )
        arms[name] = Arm(batches, config, args.seed, args.text_len)
    for arm in arms.values():  # warm-up pass
        arm.run()
    times = interleaved({name: arm.run for name, arm in arms.items()}, args.repeats)
    rows, by_name = [], {}
    n_samples = args.batches * args.batch_size
    for name, arm in arms.items():
        med = statistics.median(times[name])
        real = sum(b.real_tokens for b in arm.batches)
        slots = sum(b.slots for b in arm.batches)
        row = {
            "arm": name,
            "padding fraction %": 100 * (1 - real / slots),
            "real image tokens / sample": real / n_samples,
            "padded length (mean)": slots / n_samples,
            "batch slots max / min": max(b.slots for b in arm.batches) / min(b.slots for b in arm.batches),
            "step s (median)": med / len(arm.batches),
            "real tokens/s": real / med,
            "samples/s": n_samples / med,
        }
        rows.append(row)
        by_name[name] = row
    figures = {f"padding_pct/{name}": row["padding fraction %"] for name, row in by_name.items()}
    for label, (num, den) in RATIOS.items():
        a, b = by_name[num], by_name[den]
        rows.append(
            {
                "arm": f"ratio {label}",
                "padding fraction %": "",
                "real image tokens / sample": a["real image tokens / sample"]
                / b["real image tokens / sample"],
                "padded length (mean)": a["padded length (mean)"] / b["padded length (mean)"],
                "batch slots max / min": "",
                "step s (median)": "",
                "real tokens/s": a["real tokens/s"] / b["real tokens/s"],
                "samples/s": a["samples/s"] / b["samples/s"],
            }
        )
        figures[f"samples_per_s_ratio/{label.split(':')[0]}"] = a["samples/s"] / b["samples/s"]
    path = resolve_attention_path(arms[next(iter(arms))].backend.attention_path, "cpu")
    upscale = (
        "the batch-4 arms enlarge small images to the budget (UniPic-3's rule; Qwen-Image-Edit-Plus resizes "
        "every reference to the full budget)"
        if args.upscale
        else "no arm enlarges"
    )
    notes = (
        f"Tiny Qwen-Image-Edit packed backend (experiments/_base/tiny_flow_qwen.yaml: {config['num_layers']} layers, "
        f"width {config['num_attention_heads'] * config['attention_head_dim']}), called directly "
        f"(`QwenImageEdit.from_spec(config=...)`), attention path `{path}` (SDPA with the padding mask: on CPU the "
        f"padding is computed, then masked). One mix of {n_samples} samples, 1-6 references each (uniform), original "
        f"sides log-uniform in {args.sides[0]}-{args.sides[1]} px, seed {args.seed}: {args.batches} batches of "
        f"{args.batch_size} for the first three arms, the same samples one by one for the two batch-1 arms. Budget "
        f"{args.budget} px refs / {args.target_budget} px target, multiple {args.multiple}, min side {args.min_side}, "
        f"{upscale}; the batch-1 arms never enlarge (the shipped uniref/sft: the datamodule's default); floor "
        f"rounding (the real geometry / 8 at 4 px per token: {(args.budget // 4) ** 2} reference tokens). One step "
        f"= forward + backward of the flow loss + AdamW on random latents of the resized sizes and random text "
        f"states ({args.text_len} tokens); timed passes alternate between the arms after a warm-up pass, median of "
        f"{args.repeats} passes. Padding fraction = padded image-token slots / all slots (B x padded length). Each "
        "ratio row changes one thing (its label says which), except the one that repeats the old SELF / naive "
        "figure; the resize rules do different work by design (independent keeps every reference near the budget, "
        "so its samples are longer): `real tokens/s` is the per-token efficiency, `samples/s` the training speed on "
        "the same data. `batch slots max / min`: the costliest batch's B x padded length over the cheapest's, the "
        "step-time spread between DDP ranks that draw different batches. At batch 1 without upscaling, SELF's fixed "
        "length pads every sample's references up to the whole budget: the padding the shipped config pays. "
        f"Load average at start {load[0]:.2f} / {load[1]:.2f} (1 / 5 min) on a machine shared with other jobs."
    )
    record(
        "self_packing",
        "SELF packing vs padding: the packing and the resize rule, separated",
        rows,
        notes,
        figures,
    )


if __name__ == "__main__":
    main()
