"""Sampling time per image: FlowEdit.sample vs the denoising loop of diffusers' QwenImageEditPlusPipeline.

Like with like: one image with 3 references, the same transformer weights, the same prompt embeddings (with
and without the prompt), initial noise and reference latents, the same steps and true CFG (with the norm
rescale), the same sigma schedule. Both sides skip the VAE and the text encoder:

- ours: `FlowEdit.sample` itself (noise draw, schedule, per step two packed-backbone calls on [target | refs],
  true CFG, Euler step), with its VAE and text encoder answered from a cache of their outputs.
- diffusers: steps 5 and 6 of `QwenImageEditPlusPipeline.__call__` (timesteps from `calculate_shift` and
  `retrieve_timesteps`, then the loop body: cat([latents, image_latents]), the cond and uncond transformer calls
  in `cache_context`, true CFG with the norm rescale, `scheduler.step`), copied from diffusers' source and run on
  a stock `QwenImageTransformer2DModel` (stock attention processors) holding the same weights, with the prompt
  embeddings precomputed as the pipeline's `encode_prompt` returns them (an all-ones mask becomes None).

The scheduler is Qwen-Image's `FlowMatchEulerDiscreteScheduler` config (dynamic exponential shift, 256 -> 0.5,
8192 -> 0.9, `shift_terminal` 0.02), and FlowEdit's sampler is given the same terminal (`sampler.shift_terminal`,
as the real Qwen experiments set it). The final latents of the two are compared as a check that the loops
compute the same thing. Runs interleave; medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift, retrieve_timesteps
from torch import Tensor, nn

from benchmarks.common import interleaved, record
from datamodules.budget import fit_to_budget
from lightning_modules.components.packed_dit import TextConditioning, patchify_2x2, resolve_attention_path
from lightning_modules.flow_edit import FlowEdit

ROOT = Path(__file__).resolve().parent.parent
TINY_YAML = ROOT / "experiments" / "_base" / "tiny_flow_qwen.yaml"
QWEN_SCHEDULER = {  # Qwen/Qwen-Image scheduler_config.json
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}
PROMPT = "Put the object from image 2 at the top left and the object from image 3 at the center of image 1."


class CachedCodec(nn.Module):
    """Stands in for FlowEdit's VAE: encode returns the cached reference latents, decode returns the latents."""

    def __init__(self, codec: nn.Module, ref_latents: list[Tensor]) -> None:
        super().__init__()
        self.factor, self.channels, self.ref_latents = codec.factor, codec.channels, ref_latents

    def forward(self, tensors: list[Tensor], decode: bool = False) -> list[Tensor]:
        """FlowEdit calls its codec through forward (as LatentCodec: encode, or decode with decode=True)."""
        return self.decode(tensors) if decode else self.encode(tensors)

    def encode(self, images: list[Tensor]) -> list[Tensor]:
        """The cached latents of the references."""
        return self.ref_latents

    def decode(self, latents: list[Tensor]) -> list[Tensor]:
        """The latents themselves (the pipeline loop stops at latents too)."""
        return list(latents)


class CachedText(nn.Module):
    """Stands in for FlowEdit's text encoder: the cached conditioning of each prompt (batch 1)."""

    def __init__(self, table: dict[str, TextConditioning]) -> None:
        super().__init__()
        self.table = table

    def forward(self, prompts: list[str], images: Any = None) -> TextConditioning:
        """The cached conditioning of the (single) prompt."""
        return self.table[prompts[0]]


def build(layers: int, heads: int, head_dim: int) -> FlowEdit:
    """FlowEdit of experiments/_base/tiny_flow_qwen.yaml (head_dim 16) with the DiT's depth and width set."""
    init = yaml.safe_load(TINY_YAML.read_text())["model"]["init_args"]
    backbone = dict(init["backbone"])
    backbone["config"] = {
        **backbone["config"],
        "num_layers": layers,
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "axes_dims_rope": [
            d * head_dim // 16 for d in backbone["config"]["axes_dims_rope"]
        ],  # sums to head_dim
    }
    torch.manual_seed(0)
    sampler = {**init["sampler"], "shift_terminal": QWEN_SCHEDULER["shift_terminal"]}
    model = FlowEdit(**{**init, "backbone": backbone, "sampler": sampler}).eval()
    model.configure_model()
    return model


def pipeline_loop(
    transformer: QwenImageTransformer2DModel,
    scheduler: FlowMatchEulerDiscreteScheduler,
    latents: Tensor,
    image_latents: Tensor,
    prompt: tuple[Tensor, Tensor | None],
    negative: tuple[Tensor, Tensor | None],
    img_shapes: list,
    num_inference_steps: int,
    true_cfg_scale: float,
) -> Tensor:
    """Steps 5-6 of QwenImageEditPlusPipeline.__call__ (diffusers 0.42), lines as in its source, batch 1."""
    device = latents.device
    prompt_embeds, prompt_embeds_mask = prompt
    negative_prompt_embeds, negative_prompt_embeds_mask = negative
    guidance, attention_kwargs = None, {}  # Qwen-Image-Edit is not guidance-distilled
    # 5. Prepare timesteps
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    image_seq_len = latents.shape[1]
    mu = calculate_shift(
        image_seq_len,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    timesteps, num_inference_steps = retrieve_timesteps(
        scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu
    )
    # 6. Denoising loop
    scheduler.set_begin_index(0)
    for t in timesteps:
        latent_model_input = latents
        if image_latents is not None:
            latent_model_input = torch.cat([latents, image_latents], dim=1)
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        with transformer.cache_context("cond"):
            noise_pred = transformer(
                hidden_states=latent_model_input,
                timestep=timestep / 1000,
                guidance=guidance,
                encoder_hidden_states_mask=prompt_embeds_mask,
                encoder_hidden_states=prompt_embeds,
                img_shapes=img_shapes,
                attention_kwargs=attention_kwargs,
                return_dict=False,
            )[0]
            noise_pred = noise_pred[:, : latents.size(1)]
        with transformer.cache_context("uncond"):
            neg_noise_pred = transformer(
                hidden_states=latent_model_input,
                timestep=timestep / 1000,
                guidance=guidance,
                encoder_hidden_states_mask=negative_prompt_embeds_mask,
                encoder_hidden_states=negative_prompt_embeds,
                img_shapes=img_shapes,
                attention_kwargs=attention_kwargs,
                return_dict=False,
            )[0]
        neg_noise_pred = neg_noise_pred[:, : latents.size(1)]
        comb_pred = neg_noise_pred + true_cfg_scale * (noise_pred - neg_noise_pred)
        cond_norm = torch.norm(noise_pred, dim=-1, keepdim=True)
        noise_norm = torch.norm(comb_pred, dim=-1, keepdim=True)
        noise_pred = comb_pred * (cond_norm / noise_norm)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    return latents


def discard(_: Any) -> None:
    """Drop a result, so `interleaved` times the call itself."""


def as_pipeline_prompt(text: TextConditioning) -> tuple[Tensor, Tensor | None]:
    """(prompt_embeds, prompt_embeds_mask) as `encode_prompt` returns them: an all-ones mask becomes None."""
    return text.hidden, None if bool(text.mask.all()) else text.mask


def compare(name: str, model: FlowEdit, size: int, budget: int, args: argparse.Namespace) -> dict[str, Any]:
    """Time one image of FlowEdit.sample and of the pipeline loop, interleaved; check they agree."""
    gen = torch.Generator().manual_seed(args.seed)
    # three references of different shapes, resized jointly under the budget (the multiref data's rule)
    ref_sizes = fit_to_budget(
        [(3 * size, 2 * size), (size, size), (size, 2 * size)], budget, multiple=16, min_side=16
    )
    refs = [torch.rand(3, h, w, generator=gen) * 2 - 1 for w, h in ref_sizes]
    negative = model.sampler["negative_prompt"]
    with torch.no_grad():
        ref_latents = model.codec.encode(refs)
        texts = {p: model.text_encoder([p], [refs]) for p in (PROMPT, negative)}
    model.codec = CachedCodec(model.codec, ref_latents)
    model.text_encoder = CachedText(texts)
    steps, cfg = model.sampler["steps"], model.sampler["guidance"]
    seed = args.seed + 1

    def ours() -> Tensor:
        (x,) = model.sample(
            [refs], [PROMPT], size=(size, size), generator=torch.Generator().manual_seed(seed)
        )
        return x

    stock = QwenImageTransformer2DModel.from_config(model.backbone.model.config).eval()
    stock.load_state_dict(model.backbone.model.state_dict())
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER)
    f, c = model.codec.factor, model.codec.channels
    image_latents = torch.cat([patchify_2x2(z) for z in ref_latents])[None]
    token_grid = [(1, z.shape[1] // 2, z.shape[2] // 2) for z in ref_latents]
    img_shapes = [[(1, size // f // 2, size // f // 2), *token_grid]]
    prompt, uncond = as_pipeline_prompt(texts[PROMPT]), as_pipeline_prompt(texts[negative])

    @torch.no_grad()
    def diffusers_loop() -> Tensor:
        noise = torch.randn(c, size // f, size // f, generator=torch.Generator().manual_seed(seed))
        latents = patchify_2x2(noise)[None]  # the pipeline's _pack_latents layout
        return pipeline_loop(stock, scheduler, latents, image_latents, prompt, uncond, img_shapes, steps, cfg)

    ours_latent, pipe_latent = ours(), diffusers_loop()  # warm-up, and the agreement check
    diff = (patchify_2x2(ours_latent)[None] - pipe_latent).abs().max().item()
    times = interleaved(
        {"ours": lambda: discard(ours()), "diffusers": lambda: discard(diffusers_loop())}, args.repeats
    )
    ours_s, pipe_s = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    cfg_ = model.backbone.model.config
    tokens = (size // f // 2) ** 2 + sum(h * w for _, h, w in token_grid)
    return {
        "config": name,
        "DiT": f"{cfg_.num_layers} layers, width {cfg_.num_attention_heads * cfg_.attention_head_dim}",
        "image tokens": tokens,
        "text tokens": texts[PROMPT].hidden.shape[1],
        "FlowEdit.sample s/img": ours_s,
        "diffusers loop s/img": pipe_s,
        "ratio ours / diffusers": ours_s / pipe_s,
        "median of paired ratios": statistics.median(
            a / b for a, b in zip(times["ours"], times["diffusers"])
        ),
        "max |Δ latent|": diff,
    }


def main(argv: list[str] | None = None) -> None:
    """Time both samplers on the tiny config and a wider one; write the table."""
    parser = argparse.ArgumentParser(prog="omnilab bench sampler_vs_pipeline")
    parser.add_argument("--repeats", type=int, default=11, help="interleaved runs of each (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--small", action=argparse.BooleanOptionalAction, default=True, help="also a wider DiT"
    )
    args = parser.parse_args(argv)
    load = os.getloadavg()
    rows = [compare("tiny (tiny_flow_qwen.yaml)", build(2, 2, 16), 64, 64, args)]
    if args.small:
        rows.append(compare("small", build(4, 4, 32), 128, 128, args))
    model = build(2, 2, 16)
    notes = (
        "One image with 3 references (resized jointly under the budget: 64 px for tiny, 128 px for small, target the "
        f"same size), {model.sampler['steps']} steps, true CFG {model.sampler['guidance']} with the norm rescale "
        "(the tiny YAML's sampler), the same weights, noise, reference latents and prompt embeddings on both sides; "
        "neither side runs the VAE or the text encoder (FlowEdit's are answered from a cache). diffusers = steps 5-6 "
        "of QwenImageEditPlusPipeline.__call__ copied from its source onto a stock QwenImageTransformer2DModel "
        "(stock processors; the pipeline drops an all-ones prompt mask, so its attention runs unmasked); ours = "
        "FlowEdit.sample over the packed backend (attention path "
        f"`{resolve_attention_path(model.backbone.attention_path, 'cpu')}`: SDPA, with a mask only where something is "
        "padded or masked; at batch 1 nothing is). max |Δ latent| = largest difference of the final latents (the two loops compute "
        f"the same thing). Median of {args.repeats} interleaved runs after a warm-up; the paired ratio compares the two "
        "runs of each round (robust to load drifting between rounds). Target: ratio <= 1.1. Both sides use Qwen-Image's "
        "scheduler config, shift_terminal 0.02 included (FlowEdit: `sampler.shift_terminal`). Load average "
        f"at start {load[0]:.2f} / {load[1]:.2f} (1 / 5 min) on a machine shared with other jobs."
    )
    metrics = {f"ratio_{r['config'].split()[0]}": r["ratio ours / diffusers"] for r in rows}
    record(
        "sampler_vs_pipeline",
        "FlowEdit sampler vs the diffusers Qwen-Image-Edit-Plus loop",
        rows,
        notes,
        metrics,
    )


if __name__ == "__main__":
    main()
