"""UniMRG: post-training a unified model to generate its input's pixels, depth and segmentation, to understand better.

UniMRG (Unified Multi-Representation Generation; docs/methods/unimrg.md) is architecture-agnostic: besides the
usual image-to-text loss, the unified model learns to generate three intrinsic representations of the input image
as image-to-image tasks through its own generator, conditioned on the image as the model understands it plus a
short prompt:

    L = w_und · L_und + w_pixel · L_pixel + w_depth · L_depth + w_seg · L_seg,   every w = 1 by default,

(UniMRG code: four tasks each weighted 1.0, a fixed-size batch per source). Reconstruction drops its condition
for 10% of the samples (unconditional generation, as UniMRG's reconstruction does). The depth target is min-max
normalised to [-1, 1] and copied to 3 channels, the segmentation is a coloured mask scaled to [-1, 1]
(datamodules/scenes.py); both go through the same frozen VAE as RGB. The optimiser is UniMRG's: AdamW lr 1e-5,
betas (0.9, 0.95), weight decay 0.02, 1% warm-up then cosine, gradient clipping 1.0 (set on the trainer); the
gradient reaching the visual features that feed the LLM is scaled by 0.1 (the model's own switch, e.g.
MetaQuery's `visual_grad_scale`).

The model is any module implementing `UnifiedModel` (lightning_modules/metaquery.py's `MetaQuery` does); UniMRG
only calls its three methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from lightning_modules.flow_edit import Sampler, Timesteps
from lightning_modules.metaquery import Connector, MetaQuery, log_accuracy, log_task_losses
from omnilab.seeding import torch_generator

REPRESENTATIONS = ("pixel", "depth", "seg")
BATCH_KEY = {"pixel": "image", "depth": "depth", "seg": "seg"}
PROMPTS = {
    "pixel": "Reconstruct this image.",  # assumption: only the depth prompt is documented
    "depth": "Generate the depth map of this image.",  # UniMRG code
    "seg": "Generate the segmentation map of this image.",  # assumption, by analogy with depth
}
EQUAL_WEIGHTS = {"understanding": 1.0, "pixel": 1.0, "depth": 1.0, "seg": 1.0}  # UniMRG code: each task 1.0


@runtime_checkable
class UnifiedModel(Protocol):
    """What UniMRG asks of a unified understanding + generation model."""

    def understanding_loss(
        self, images: Sequence[Tensor], questions: Sequence[str], answers: Sequence[str]
    ) -> Tensor:
        """Next-token loss of the answers given each image and question."""
        ...

    def representation_loss(
        self,
        images: Sequence[Sequence[Tensor]],
        prompts: Sequence[str],
        targets: Sequence[Tensor],
        *stream: int | str,
    ) -> Tensor:
        """Generation loss of `targets` from the images as the model understands them ([] = unconditional) and prompts.

        `stream` seeds the loss's randomness (noise, timesteps).
        """
        ...

    def choose(
        self, images: Sequence[Tensor], questions: Sequence[str], options: Sequence[Sequence[str]]
    ) -> list[int]:
        """The index of the most likely option of each question."""
        ...


def unconditional_mask(n: int, probability: float, generator: torch.Generator) -> list[bool]:
    """Which of n reconstruction samples drop their condition: each with `probability` (UniMRG: 0.1)."""
    return (torch.rand(n, generator=generator) < probability).tolist()


class UniMRG:
    """UniMRG post-training as a mixin over any LightningModule that implements `UnifiedModel`.

    It supplies the training step (`task_losses`, `weighted_loss`) and the evaluation (understanding loss and
    option accuracy); the host module keeps its optimiser (set to UniMRG's); `init_unimrg` sets the options. `MetaQueryUniMRG` below is the
    combination with MetaQuery; another unified model joins the same way (`class X(UniMRG, ItsModule)`).
    """

    def init_unimrg(
        self,
        weights: dict[str, float] | None,
        prompts: dict[str, str] | None,
        uncond_prob: float,
    ) -> None:
        """Check and set the UniMRG options (see `MetaQueryUniMRG` for their meaning)."""
        if not isinstance(self, UnifiedModel):
            raise TypeError(
                f"{type(self).__name__} does not implement UnifiedModel (understanding_loss, representation_loss, choose)"
            )
        self.weights = {**EQUAL_WEIGHTS, **(weights or {})}
        unknown = set(self.weights) - set(EQUAL_WEIGHTS)
        if unknown:
            raise ValueError(f"weights has {sorted(unknown)}; tasks: {', '.join(EQUAL_WEIGHTS)}")
        if any(w < 0 for w in self.weights.values()) or not any(self.weights.values()):
            raise ValueError(f"weights={self.weights}: give non-negative weights, at least one positive")
        self.prompts = {**PROMPTS, **(prompts or {})}
        if set(self.prompts) - set(PROMPTS):
            raise ValueError(
                f"prompts has {sorted(set(self.prompts) - set(PROMPTS))}; choose from pixel, depth, seg"
            )
        if not 0.0 <= uncond_prob < 1.0:
            raise ValueError(f"uncond_prob={uncond_prob}: give a value in [0, 1)")
        self.uncond_prob = uncond_prob

    def task_losses(self, batch: dict[str, Any], *stream: int | str) -> dict[str, Tensor]:
        """Each task of weight > 0: understanding on the questions, generation of each representation."""
        images = list(batch["image"])
        losses: dict[str, Tensor] = {}
        if self.weights["understanding"] > 0:
            losses["understanding"] = self.understanding_loss(images, batch["question"], batch["answer"])
        for rep in REPRESENTATIONS:
            if self.weights[rep] <= 0:
                continue
            if BATCH_KEY[rep] not in batch:
                raise KeyError(
                    f"task {rep!r} needs batch[{BATCH_KEY[rep]!r}] (data.need: [{BATCH_KEY[rep]}])"
                )
            sources: list[list[Tensor]] = [[x] for x in images]
            prompts = [self.prompts[rep]] * len(images)
            if rep == "pixel" and self.uncond_prob > 0:
                drop = unconditional_mask(
                    len(images), self.uncond_prob, torch_generator(self.seed, "uncond", *stream)
                )
                sources = [[] if d else s for s, d in zip(sources, drop)]
                prompts = ["" if d else p for p, d in zip(prompts, drop)]
            targets = list(batch[BATCH_KEY[rep]])
            losses[rep] = self.representation_loss(sources, prompts, targets, rep, *stream)
        return losses

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """L = Σ_k w_k L_k over understanding and the pixel, depth and segmentation generation tasks."""
        micro = batch_idx % max(1, self.trainer.accumulate_grad_batches)
        losses = self.task_losses(batch, "train", self.global_step, micro, self.global_rank)
        return log_task_losses(self, losses, self.weights, len(batch["image"]))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """val/accuracy (and per question type) of the model's option choice; val/loss_understanding."""
        self.evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """test/accuracy (and per question type)."""
        self.evaluate(batch, "test")

    def evaluate(self, batch: dict[str, Any], split: str) -> None:
        """<split>/loss (the understanding loss) and <split>/accuracy (and per question type) of the option choice."""
        size = len(batch["image"])
        loss = self.understanding_loss(list(batch["image"]), batch["question"], batch["answer"])
        self.log(f"{split}/loss", loss, batch_size=size, sync_dist=True)  # type: ignore[attr-defined]
        log_accuracy(self, batch, split)


class MetaQueryUniMRG(UniMRG, MetaQuery):
    """UniMRG post-training of a MetaQuery model (VLM + queries + connector + SD3-Kontext DiT).

    Args:
        vlm, backbone, vae, num_queries, connector, trainable, timesteps, sampler, attention,
            gradient_checkpointing, seed: as MetaQuery's (default trainable: every part).
        visual_grad_scale: Gradient scale on the visual features entering the LLM (UniMRG: 0.1).
        weights: w of each task (understanding, pixel, depth, seg); 1.0 each by default (UniMRG). A task of
            weight 0 is not run (the ablations: understanding alone, or with one representation).
        prompts: The instruction of each representation (defaults: `PROMPTS`).
        uncond_prob: Share of reconstruction samples generated without their condition (UniMRG: 0.1).
        lr: AdamW learning rate (UniMRG: 1e-5).
        betas: AdamW betas (UniMRG: 0.9, 0.95).
        weight_decay: AdamW weight decay (UniMRG: 0.02).
        warmup_steps: Linear warm-up steps, then cosine to 0 (UniMRG: 1% of 10k steps = 100).
    """

    def __init__(
        self,
        vlm: dict[str, Any],
        backbone: dict[str, Any],
        vae: dict[str, Any],
        num_queries: int = 64,
        connector: Connector | None = None,
        trainable: list[str] | None = None,
        visual_grad_scale: float = 0.1,
        weights: dict[str, float] | None = None,
        prompts: dict[str, str] | None = None,
        uncond_prob: float = 0.1,
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.02,
        warmup_steps: int = 100,
        timesteps: Timesteps | None = None,
        sampler: Sampler | None = None,
        attention: str = "sdpa",
        gradient_checkpointing: bool = False,
        seed: int = 0,
    ) -> None:
        MetaQuery.__init__(
            self,
            vlm=vlm,
            backbone=backbone,
            vae=vae,
            num_queries=num_queries,
            connector=connector,
            trainable=trainable if trainable is not None else ["queries", "connector", "dit", "vlm"],
            task_weights={"t2i": 0.0, "edit": 0.0, "understanding": 1.0},
            visual_grad_scale=visual_grad_scale,
            timesteps=timesteps,
            lr=lr,
            weight_decay=weight_decay,
            betas=betas,
            warmup_steps=warmup_steps,
            lr_schedule="cosine",
            sampler=sampler,
            attention=attention,
            gradient_checkpointing=gradient_checkpointing,
            seed=seed,
        )
        self.init_unimrg(weights, prompts, uncond_prob)
