"""MetaQuery: a VLM joined to a Kontext DiT by learnable queries and a connector (UniPic2-Metaquery).

Skywork UniPic 2.0 (arXiv 2509.04548, §"UniPic2-Metaquery"), following MetaQuery (Pan et al., arXiv 2504.06256):
the VLM (Qwen2.5-VL-7B) reads the prompt (and, for editing, the source image); N learnable query embeddings are
appended after the prompt and the VLM's last hidden states at those N positions go through a connector (a small
transformer encoder) whose outputs replace the DiT's text conditioning (SD3.5M-Kontext: the context tokens
[B, N, joint_attention_dim] and the pooled vector [B, pooled_projection_dim], the mean of the connector's outputs
projected). The DiT is FlowEdit's `sd3_kontext` backend (lightning_modules/flow_edit.py): for editing the source is
VAE-encoded and packed before the target, clean, sharing its timestep. Understanding is the VLM's own LM head.

Training is the flow-matching loss of FlowEdit for text-to-image and editing plus the next-token loss of the
answers, L = Σ_k w_k L_k over the tasks of `task_weights` (`weighted_loss`). Stages are configuration
(`trainable`): the connector stage trains the queries and the connector with both ends frozen; the joint stage
adds the DiT (and optionally the VLM).

One model serves three uses: `sample(refs=[[]]*B, prompts)` (text-to-image), `sample(refs=[[source]], instructions)`
(editing), `answer(images, questions)` / `choose(images, questions, options)` (understanding). It implements the
`UnifiedModel` protocol of lightning_modules/unimrg.py (`understanding_loss`, `image_to_image_loss`,
`choose`), so UniMRG's post-training runs on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, TypedDict

import torch
from torch import Tensor, nn

from lightning_modules.components import flow
from lightning_modules.components.backbones import build_backbone
from lightning_modules.components.packed_dit import TextConditioning
from lightning_modules.components.text import TextEncoder
from lightning_modules.components.vlm import (
    IGNORE_INDEX,
    Conversation,
    VisionLanguageModel,
    build_vlm,
    lm_loss,
)
from lightning_modules.flow_edit import BACKENDS, FlowEdit, LatentCodec, Sampler, Timesteps, flow_loss
from omnilab.attention import apply_attention
from omnilab.seeding import torch_generator

QUERY_TOKEN = "<|meta_query|>"
PARTS = ("queries", "connector", "dit", "vlm")
TASKS = ("t2i", "edit", "understanding")

# --- losses and small pure pieces ----------------------------------------------------------------------


def weighted_loss(losses: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """L = Σ_k w_k L_k over the tasks present in `losses` (a task without a weight is an error)."""
    missing = set(losses) - set(weights)
    if missing:
        raise KeyError(f"no weight for the task(s) {sorted(missing)}; weights has {sorted(weights)}")
    if not losses:
        raise ValueError("weighted_loss: no task loss to sum")
    return sum(weights[k] * v for k, v in losses.items())  # type: ignore[return-value]


def log_task_losses(module: Any, losses: dict[str, Tensor], weights: dict[str, float], size: int) -> Tensor:
    """`weighted_loss` of a training step, logged as `train/loss` beside each task's `train/loss_<task>`."""
    loss = weighted_loss(losses, weights)
    for name, value in losses.items():
        module.log(f"train/loss_{name}", value, batch_size=size)
    module.log("train/loss", loss, batch_size=size)
    return loss


def option_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(answer | prompt) per row: Σ_{t ∈ A} log softmax(logits_{t−1})[x_t] over the labelled tokens A (fp32)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (picked * mask).sum(-1)


def scale_gradient(x: Tensor, scale: float) -> Tensor:
    """Identity forward, gradient times `scale` backward: x·s + stop_grad(x)·(1 − s)."""
    if scale == 1.0:
        return x
    return x * scale + x.detach() * (1.0 - scale)


class Connector(TypedDict, total=False):
    """The connector: a pre-norm transformer encoder over the query states."""

    layers: int  # default 2 (MetaQuery's released connector: 24)
    width: int  # default: the VLM's hidden size
    heads: int  # default 8
    mlp_ratio: float  # default 4.0


CONNECTOR_DEFAULTS: Connector = {"layers": 2, "width": 0, "heads": 8, "mlp_ratio": 4.0}


class QueryConnector(nn.Module):
    """Query states [B, N, D_vlm] -> (context [B, N, D_ctx], pooled [B, D_pool] or None)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        pooled_dim: int | None,
        layers: int,
        width: int,
        heads: int,
        mlp_ratio: float,
    ) -> None:
        super().__init__()
        width = width or in_dim
        if width % heads:
            raise ValueError(f"connector.width={width} is not a multiple of connector.heads={heads}")
        self.proj_in = nn.Linear(in_dim, width)
        layer = nn.TransformerEncoderLayer(
            width,
            heads,
            int(width * mlp_ratio),
            dropout=0.0,
            batch_first=True,
            norm_first=True,
            activation="gelu",
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, out_dim)
        self.pooled = nn.Linear(width, pooled_dim) if pooled_dim else None

    def forward(self, states: Tensor) -> tuple[Tensor, Tensor | None]:
        """The DiT's context tokens and pooled vector from the query states."""
        h = self.norm(self.encoder(self.proj_in(states)))
        pooled = self.pooled(h.mean(1)) if self.pooled is not None else None
        return self.proj_out(h), pooled


class MetaQueryEncoder(TextEncoder):
    """Prompts (+ images) -> the VLM with N learnable queries appended -> connector -> `TextConditioning`.

    The queries enter through a forward hook on the VLM's input embeddings: every `<|meta_query|>` position's
    embedding is replaced by the next learnable query, so the library's own forward (vision tokens, M-RoPE
    positions) runs unchanged. Prompts are left-padded, so the N queries are the last N positions of every row.
    """

    def __init__(
        self, vlm: VisionLanguageModel, num_queries: int, connector: QueryConnector, grad_scale: float = 1.0
    ) -> None:
        super().__init__()
        self.vlm, self.connector, self.num_queries = vlm, connector, num_queries
        hidden = vlm.model.config.get_text_config().hidden_size
        self.queries = nn.Parameter(torch.randn(num_queries, hidden) * hidden**-0.5)
        self.query_id = int(vlm.tokenizer.convert_tokens_to_ids(QUERY_TOKEN))
        self.grad_scale = grad_scale
        vlm.model.get_input_embeddings().register_forward_hook(self._insert_queries)
        visual = getattr(vlm.model.model, "visual", None)
        if visual is not None and grad_scale != 1.0:
            visual.register_forward_hook(self._scale_visual)

    def _insert_queries(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        ids = args[0]
        where = ids == self.query_id
        if not bool(where.any()):
            return output
        slot = (where.cumsum(1) - 1).clamp(min=0, max=self.num_queries - 1)
        return torch.where(where[..., None], self.queries.to(output.dtype)[slot], output)

    def _scale_visual(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if torch.is_grad_enabled() and getattr(output, "pooler_output", None) is not None:
            output.pooler_output = scale_gradient(output.pooler_output, self.grad_scale)
        return output

    def forward(self, prompts: list[str], images: list[list[Tensor]] | None = None) -> TextConditioning:
        """The DiT conditioning of a batch of prompts, each with its images (editing) or none (text-to-image)."""
        images = images or [[] for _ in prompts]
        convs = [Conversation(images=list(imgs), text=p) for p, imgs in zip(prompts, images)]
        inputs = self.vlm.inputs(convs, padding_side="left")
        b, n = inputs["input_ids"].shape[0], self.num_queries
        device = inputs["input_ids"].device
        queries = torch.full((b, n), self.query_id, dtype=inputs["input_ids"].dtype, device=device)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], queries], 1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(queries)], 1)
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(queries)], 1)
        states = self.vlm(inputs)[:, -n:]
        hidden, pooled = self.connector(states.to(self.connector.proj_in.weight.dtype))
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        return TextConditioning(hidden, mask, pooled)


# --- the module -----------------------------------------------------------------------------------------


class MetaQuery(FlowEdit):
    """UniPic2-Metaquery: VLM + learnable queries + connector + SD3-Kontext DiT; T2I, editing, understanding.

    Args:
        vlm: The VLM (`components.vlm.build_vlm` kwargs): `{family: qwen2_5_vl, pretrained: <hub id or dir>,
            load: {dtype}}` or `{family, config: {...}, tokenizer: {...}, image_processor: {...}}`.
        backbone: The Kontext DiT, as FlowEdit's (`{family: sd3_kontext, pretrained, subfolder: transformer}` or
            `{family, config}`).
        vae: The frozen VAE, as FlowEdit's.
        num_queries: N, the learnable queries (MetaQuery: 64 for its base models, 256 for the large ones).
        connector: `Connector` (layers, width, heads, mlp_ratio).
        trainable: The parts that train: any of queries, connector, dit, vlm. Connector stage: [queries,
            connector] (VLM and DiT frozen); joint stage: [queries, connector, dit] (+ vlm).
        task_weights: w_k of `weighted_loss` per task (t2i, edit, understanding); a task of weight 0 is not run.
        visual_grad_scale: Gradient scale on the visual features entering the LLM (UniMRG: 0.1; 1 = none).
        timesteps, lr, weight_decay, betas, warmup_steps, lr_schedule, sampler, drop_text, attention,
        gradient_checkpointing, seed, val_sigmas, val_sample_steps, predictions_dir: as FlowEdit's.
    """

    def __init__(
        self,
        vlm: dict[str, Any],
        backbone: dict[str, Any],
        vae: dict[str, Any],
        num_queries: int = 64,
        connector: Connector | None = None,
        trainable: list[str] | None = None,
        task_weights: dict[str, float] | None = None,
        visual_grad_scale: float = 1.0,
        timesteps: Timesteps | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        sampler: Sampler | None = None,
        drop_text: float = 0.0,
        attention: str = "sdpa",
        gradient_checkpointing: bool = False,
        seed: int = 0,
        val_sigmas: tuple[float, ...] = (0.25, 0.5, 0.75),
        val_sample_steps: int = 0,
        predictions_dir: str | None = None,
    ) -> None:
        super().__init__(
            backbone=backbone,
            vae=vae,
            text={},
            timesteps=timesteps,
            lr=lr,
            weight_decay=weight_decay,
            betas=betas,
            warmup_steps=warmup_steps,
            lr_schedule=lr_schedule,
            sampler=sampler,
            drop_text=drop_text,
            attention=attention,
            gradient_checkpointing=gradient_checkpointing,
            seed=seed,
            val_sigmas=val_sigmas,
            val_sample_steps=val_sample_steps,
            predictions_dir=predictions_dir,
        )
        if num_queries < 1:
            raise ValueError(f"num_queries={num_queries}: give at least 1")
        unknown = set(connector or {}) - set(CONNECTOR_DEFAULTS)
        if unknown:
            raise ValueError(
                f"unknown connector keys {sorted(unknown)}; choose from {', '.join(CONNECTOR_DEFAULTS)}"
            )
        self.trainable = list(trainable if trainable is not None else ["queries", "connector"])
        bad = set(self.trainable) - set(PARTS)
        if bad or not self.trainable:
            raise ValueError(f"trainable={self.trainable}: choose one or more of {', '.join(PARTS)}")
        self.task_weights = {**{t: 1.0 for t in TASKS}, **(task_weights or {})}
        if set(self.task_weights) - set(TASKS):
            raise ValueError(
                f"task_weights has {sorted(set(self.task_weights) - set(TASKS))}; tasks: {', '.join(TASKS)}"
            )
        if not 0.0 <= visual_grad_scale <= 1.0:
            raise ValueError(f"visual_grad_scale={visual_grad_scale}: give a value in [0, 1]")
        self.vlm_spec = dict(vlm)
        self.num_queries = num_queries
        self.connector_cfg: Connector = {**CONNECTOR_DEFAULTS, **(connector or {})}
        self.visual_grad_scale = visual_grad_scale

    # --- building ---------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Build the DiT, the frozen VAE, the VLM with its queries and the connector; freeze per `trainable`."""
        if self.backbone is not None:
            return
        from diffusers import AutoencoderKL

        spec = {k: v for k, v in self.backbone_spec.items() if k != "family"}
        self.backbone = BACKENDS[self.family].from_spec(**spec)
        self.codec = LatentCodec(build_backbone(AutoencoderKL, **self.vae_spec))
        if self.codec.channels != self.backbone.latent_channels:
            raise ValueError(
                f"the VAE has {self.codec.channels} latent channels, the backbone takes {self.backbone.latent_channels}"
            )
        vlm_spec = dict(self.vlm_spec)
        vlm_spec["added_tokens"] = [*vlm_spec.get("added_tokens", []), QUERY_TOKEN]
        vlm = build_vlm(**vlm_spec)
        cfg = self.backbone.model.config
        context = getattr(cfg, "joint_attention_dim", None)
        if context is None:
            raise ValueError(
                f"backbone family {self.family!r}: MetaQuery conditions an SD3-Kontext DiT (joint_attention_dim)"
            )
        c = self.connector_cfg
        connector = QueryConnector(
            vlm.model.config.get_text_config().hidden_size,
            context,
            getattr(cfg, "pooled_projection_dim", None),
            c["layers"],
            c["width"],
            c["heads"],
            c["mlp_ratio"],
        )
        self.text_encoder = MetaQueryEncoder(vlm, self.num_queries, connector, self.visual_grad_scale)
        self.codec.requires_grad_(False).eval()
        parts = {
            "queries": [self.text_encoder.queries],
            "connector": list(connector.parameters()),
            "dit": list(self.backbone.parameters()),
            "vlm": list(vlm.model.parameters()),
        }
        for name, params in parts.items():
            for p in params:
                p.requires_grad_(name in self.trainable)
        if self.gradient_checkpointing:
            if "dit" in self.trainable:
                self.backbone.model.enable_gradient_checkpointing()
            vlm.model.gradient_checkpointing_enable()
        self.attention_backend = apply_attention(self, self.attention)
        self._record_attention_backend()
        self._reloadable = {
            name for name, p in self.named_parameters() if not p.requires_grad and self._from_pretrained(name)
        }
        self.train(self.training)

    def _pretrained_parts(self) -> tuple[tuple[str, dict[str, Any]], ...]:
        """FlowEdit's parts with the VLM in the text encoder's place."""
        return (
            ("codec.", self.vae_spec),
            ("text_encoder.vlm.", self.vlm_spec),
            ("backbone.", self.backbone_spec),
        )

    def train(self, mode: bool = True) -> MetaQuery:
        """Train mode for the trainable parts; the VAE, and a frozen DiT or VLM, stay in eval mode."""
        super(FlowEdit, self).train(mode)
        if self.codec is not None:
            self.codec.eval()
            if "dit" not in self.trainable:
                self.backbone.eval()
            if "vlm" not in self.trainable:
                self.text_encoder.vlm.eval()
        return self

    @property
    def vlm(self) -> VisionLanguageModel:
        """The VLM (built in configure_model)."""
        return self.text_encoder.vlm

    # --- the UnifiedModel protocol (lightning_modules/unimrg.py) ----------------------------------------

    def image_to_image_loss(
        self,
        sources: Sequence[Sequence[Tensor]],
        prompts: Sequence[str],
        targets: Sequence[Tensor],
        *stream: int | str,
        sigma: float | None = None,
        kontext: bool = True,
    ) -> Tensor:
        """Flow loss of generating `targets` from `prompts` and the `sources` (Kontext references; [] = T2I).

        The VLM reads each prompt with its sources; with `kontext` the DiT also packs the sources' latents before
        the noisy target (editing), without it the sources reach the DiT only through the queries.
        Sigmas, prompt dropout and noise come from (seed, *stream) (FlowEdit.draw); `sigma` fixes the sigma
        (evaluation). Returns mean ||v̂ − (ε − x0)||² over the target latents.
        """
        refs = [self.codec(list(s)) if len(s) and kontext else [] for s in sources]
        x0 = self.codec(list(targets))
        tokens = [self.tokens(x) for x in x0]
        sig, keep, noise = self.draw([x.shape for x in x0], tokens, *stream)
        if sigma is not None:
            sig, keep = torch.full_like(sig, sigma), torch.ones_like(keep)
        prompts = [p if k else "" for p, k in zip(prompts, keep.tolist())]
        text = self.text_encoder(list(prompts), [list(s) for s in sources])
        eps = [n.to(x.device) for n, x in zip(noise, x0)]
        sig = sig.to(self.device)
        x_sigma = [flow.interpolate(x, e, s) for x, e, s in zip(x0, eps, sig)]
        v_pred = self.backbone(x_sigma, refs, sig, text)
        return flow_loss(v_pred, [flow.velocity(x, e) for x, e in zip(x0, eps)])

    def representation_loss(
        self,
        images: Sequence[Sequence[Tensor]],
        prompts: Sequence[str],
        targets: Sequence[Tensor],
        *stream: int | str,
    ) -> Tensor:
        """UniMRG's generation of a representation of the image (pixels, depth, segmentation).

        The image reaches the DiT only through the VLM and the queries (no Kontext reference): packed as a clean
        reference, the DiT could copy it and the task would teach the VLM nothing (UniMRG conditions its generator
        on the understanding encoder's features of the image).
        """
        return self.image_to_image_loss(images, prompts, targets, *stream, kontext=False)

    def understanding_loss(
        self, images: Sequence[Tensor], questions: Sequence[str], answers: Sequence[str]
    ) -> Tensor:
        """Next-token cross-entropy of the answers given each image and question (the VLM's LM head)."""
        convs = [Conversation(images=[x], text=q, answer=a) for x, q, a in zip(images, questions, answers)]
        inputs = self.vlm.inputs(convs, with_answer=True)
        return lm_loss(self.vlm(inputs, logits=True), inputs["labels"])

    @torch.no_grad()
    def choose(
        self, images: Sequence[Tensor], questions: Sequence[str], options: Sequence[Sequence[str]]
    ) -> list[int]:
        """For each question, the index of the option the VLM gives the highest log-probability."""
        convs, owner = [], []
        for i, (x, q, opts) in enumerate(zip(images, questions, options)):
            for o in opts:
                convs.append(Conversation(images=[x], text=q, answer=o))
                owner.append(i)
        if not convs:
            return []
        inputs = self.vlm.inputs(convs, with_answer=True)
        scores = option_logprobs(self.vlm(inputs, logits=True), inputs["labels"]).tolist()
        best: list[int] = []
        pos = 0
        for opts in options:
            chunk = scores[pos : pos + len(opts)]
            best.append(max(range(len(opts)), key=chunk.__getitem__) if opts else -1)
            pos += len(opts)
        return best

    @torch.no_grad()
    def answer(
        self, images: Sequence[Tensor], questions: Sequence[str], max_new_tokens: int = 32
    ) -> list[str]:
        """Free-form answers (greedy) of the VLM to each image's question."""
        return self.vlm.generate(
            [Conversation(images=[x], text=q) for x, q in zip(images, questions)], max_new_tokens
        )

    # --- training ---------------------------------------------------------------------------------------

    def task_losses(
        self, batch: dict[str, Any], *stream: int | str, sigma: float | None = None
    ) -> dict[str, Tensor]:
        """The loss of each task of weight > 0 on a scene batch (datamodules/scenes.py)."""
        images = list(batch["image"])
        w = self.task_weights
        losses: dict[str, Tensor] = {}
        if w["t2i"] > 0:
            losses["t2i"] = self.image_to_image_loss(
                [[] for _ in images], batch["caption"], images, "t2i", *stream, sigma=sigma
            )
        if w["edit"] > 0:
            losses["edit"] = self.image_to_image_loss(
                [[x] for x in images], batch["instruction"], list(batch["edit"]), "edit", *stream, sigma=sigma
            )
        if w["understanding"] > 0:
            losses["understanding"] = self.understanding_loss(images, batch["question"], batch["answer"])
        return losses

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """L = Σ_k w_k L_k over text-to-image, editing (flow matching) and understanding (next token)."""
        micro = batch_idx % max(1, self.trainer.accumulate_grad_batches)
        losses = self.task_losses(batch, "train", self.global_step, micro, self.global_rank)
        return log_task_losses(self, losses, self.task_weights, len(batch["image"]))

    def evaluate(self, batch: dict[str, Any], batch_idx: int, split: str) -> None:
        """<split>/loss_<task> at `val_sigmas` (noise by key), <split>/loss, and <split>/accuracy of the options."""
        keys = batch.get("__key__") or [str(i) for i in range(len(batch["image"]))]
        size = len(keys)
        totals: dict[str, list[Tensor]] = {}
        for s in self.val_sigmas:
            for name, value in self.task_losses(batch, "val", *keys, sigma=s).items():
                totals.setdefault(name, []).append(value)
        means = {k: torch.stack(v).mean() for k, v in totals.items()}
        for name, value in means.items():
            self.log(f"{split}/loss_{name}", value, batch_size=size, sync_dist=True)
        if means:
            self.log(
                f"{split}/loss", weighted_loss(means, self.task_weights), batch_size=size, sync_dist=True
            )
        log_accuracy(self, batch, split)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[Tensor]:
        """Edit each batch image by its instruction (noise by key) and write <key>.png (`predictions_dir`)."""
        from pathlib import Path

        from callbacks.images import to_pil

        keys = batch.get("__key__") or [str(i) for i in range(len(batch["image"]))]
        images = self.sample(
            [[x] for x in batch["image"]],
            batch["instruction"],
            generator=[torch_generator(self.seed, "predict", k) for k in keys],
        )
        out_dir = Path(self.predictions_dir or Path(self.trainer.default_root_dir) / "predictions")
        out_dir.mkdir(parents=True, exist_ok=True)
        for key, image in zip(keys, images):
            to_pil(image).save(out_dir / f"{key.replace('/', '_')}.png")
        return [image.cpu() for image in images]


def log_accuracy(module: Any, batch: dict[str, Any], split: str) -> None:
    """<split>/accuracy (and per question type) of `module.choose` over the batch's questions with options, and
    <split>/chance_accuracy (uniform guessing over the same options), the baseline it must beat."""
    rows = [i for i, o in enumerate(batch.get("options") or []) if o]
    if not rows:
        return
    picks = module.choose(
        [batch["image"][i] for i in rows],
        [batch["question"][i] for i in rows],
        [batch["options"][i] for i in rows],
    )
    right = [float(batch["options"][i][p] == batch["answer"][i]) for i, p in zip(rows, picks)]
    module.log(f"{split}/accuracy", sum(right) / len(right), batch_size=len(right), sync_dist=True)
    chance = chance_accuracy([batch["options"][i] for i in rows])
    module.log(f"{split}/chance_accuracy", chance, batch_size=len(right), sync_dist=True)
    types: dict[str, list[float]] = {}
    for i, r in zip(rows, right):
        types.setdefault(batch["qa_type"][i] or "other", []).append(r)
    for name, values in types.items():
        module.log(
            f"{split}/accuracy_{name}", sum(values) / len(values), batch_size=len(values), sync_dist=True
        )


def chance_accuracy(options: Sequence[Sequence[str]]) -> float:
    """The accuracy of guessing uniformly among each question's options: mean of 1 / |options|."""
    sizes = [len(o) for o in options if o]
    return sum(1 / n for n in sizes) / len(sizes) if sizes else math.nan
