"""SCoT: layout-aware flow-matching generation and editing on an interleaved text-coordinate format.

SCoT (Spatial Chain-of-Thought, arXiv 2602.11980; docs/methods/scot.md) makes a diffusion model layout-aware by
training it on captions in which every phrase is followed by its box (SCoT-DenseBox; our format:
lightning_modules/components/layout.py), then lets an off-the-shelf MLLM write such a plan for a new request
(lightning_modules/components/planners.py): the planner's spatial reasoning reaches the generator as text.

`SCoT` is FlowEdit (lightning_modules/flow_edit.py: the same packed DiT backends, VAE, loss and sampler) with
its text encoder wrapped in `LayoutTextEncoder`, which reads the plan in each instruction. `conditioning`
chooses what the model sees of it, so the choices train and compare under one loop:
- "inline" (SCoT): the interleaved caption as it is, coordinates and all, through the text encoder;
- "boxes" (GLIGEN-style, Li et al. 2023 §3.2): the caption without coordinates, plus one grounding token per
  box, h = MLP([phrase embedding, Fourier(box)]) (8 frequencies, as GLIGEN), and in every DiT block a gated
  attention of the image tokens over those tokens: v <- v + tanh(gamma_l) · Attn(LN(v) + P(pos(v)), [null, h]),
  gamma_l = 0 at the start (the pretrained model is unchanged until it learns to use them). Our DiT variant
  differs from GLIGEN's in two places: the image tokens attend to the grounding tokens (and a learned null
  token) rather than to the concatenation of both (O(L·N) instead of O(L²)), and each image token's own canvas
  position (P: Fourier features of its cell centre) is added to its query, since RoPE backbones carry no
  position in the hidden states;
- "inline+boxes": both; "text": the caption without coordinates and no boxes (the text-only baseline).

Evaluation (`test_step`; metrics/layout.py): each test sample's request (its `prompt`) goes through the
`planner` when one is set (plans repaired or refused and counted, `plan/*`), else the sample's own instruction
is used; the model samples; the `detector` finds the plan's phrases. Logged: `test/position_acc` and
`test/counting_acc` (GenEval's rules on samples with GenEval metadata), `test/miou` and `test/box_hit` (layout
fidelity against the plan), and for edits `test/edit_inside_psnr` (inside the edit box, against the exact
target) and `test/edit_outside_psnr` (outside it, against the source: what must not change). Every sample's
plan is written beside its image (`predictions_dir`/<key>.png, .plan.txt) and drawn on the sample grid.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from callbacks.images import draw_boxes, to_pil
from lightning_modules.components.layout import (
    GRID,
    Layout,
    PlanError,
    PlanStats,
    has_boxes,
    parse_layout,
    strip_boxes,
    write_layout,
)
from lightning_modules.components.packed_dit import TextConditioning
from lightning_modules.components.planners import Planner
from lightning_modules.components.text import TextEncoder
from lightning_modules.flow_edit import FlowEdit, _keys
from metrics.layout import ColourDetector, Detector, layout_scores
from omnilab.seeding import torch_generator

Conditioning = Literal["inline", "boxes", "inline+boxes", "text"]
FOURIER_FREQS = 8  # GLIGEN's fourier_freqs


def fourier(x: Tensor, freqs: int = FOURIER_FREQS) -> Tensor:
    """GLIGEN's Fourier embedding: [..., k] in [0, 1] -> [..., k·2·freqs] = (sin(2^f π x), cos(2^f π x)) per f."""
    scales = (2.0 ** torch.arange(freqs, device=x.device, dtype=torch.float32)) * math.pi
    angles = x.float()[..., None] * scales  # [..., k, F]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


@dataclass
class GroundedConditioning(TextConditioning):
    """Text conditioning plus the plan's boxes: phrase embeddings [N, D_text], boxes [N, 4] in [0, 1], per-sample counts."""

    phrases: Tensor | None = None
    boxes: Tensor | None = None
    counts: list[int] = field(default_factory=list)


class LayoutTextEncoder(TextEncoder):
    """Wraps a text encoder: reads the plan in each prompt and encodes what `conditioning` asks for.

    Args:
        encoder: The backbone family's text encoder.
        conditioning: "inline" | "boxes" | "inline+boxes" | "text" (module docstring).
        stats: Where plan repairs and refusals are counted.
    """

    def __init__(self, encoder: TextEncoder, conditioning: Conditioning, stats: PlanStats) -> None:
        super().__init__()
        self.encoder, self.conditioning, self.stats = encoder, conditioning, stats

    @property
    def boxes(self) -> bool:
        """Whether grounding tokens are produced."""
        return "boxes" in self.conditioning

    def layout(self, prompt: str) -> Layout | None:
        """The plan of a prompt (repaired and counted), None when it has no box or is refused."""
        if not has_boxes(prompt):
            return None
        try:
            return parse_layout(prompt, repair=True, stats=self.stats)
        except PlanError:
            return None

    def forward(self, prompts: list[str], images: list[list[Tensor]] | None = None) -> TextConditioning:
        """The encoder's conditioning of the prompts (coordinates kept or stripped), with the boxes if asked."""
        texts = list(prompts) if self.conditioning.startswith("inline") else [strip_boxes(p) for p in prompts]
        cond = self.encoder(texts, images)
        if not self.boxes:
            return cond
        layouts = [self.layout(p) for p in prompts]
        phrases = [r.phrase for lay in layouts if lay for r in lay.regions]
        boxes = [r.box for lay in layouts if lay for r in lay.regions]
        counts = [len(lay.regions) if lay else 0 for lay in layouts]
        emb = self.phrase_embeddings(phrases) if phrases else None
        box = torch.tensor(boxes, dtype=torch.float32, device=cond.hidden.device).reshape(-1, 4) / GRID
        return GroundedConditioning(cond.hidden, cond.mask, cond.pooled, emb, box, counts)

    def phrase_embeddings(self, phrases: list[str]) -> Tensor:
        """[N, D]: the masked mean of the encoder's hidden states over each phrase's tokens (fp32)."""
        cond = self.encoder(phrases, None)
        mask = (
            cond.mask.float()
            if cond.mask is not None
            else torch.ones(cond.hidden.shape[:2], device=cond.hidden.device)
        )
        return (cond.hidden.float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)


class GroundingTokens(nn.Module):
    """GLIGEN-style grounding tokens and the gated attention of a DiT's image tokens over them (one per block).

    Args:
        text_dim: Width of the phrase embeddings (the text encoder's hidden size).
        dim: The DiT's hidden width.
        blocks: Number of DiT blocks (one gated attention and one gate each).
        heads: Attention heads.
    """

    def __init__(self, text_dim: int, dim: int, blocks: int, heads: int) -> None:
        super().__init__()
        box_dim, pos_dim = 4 * 2 * FOURIER_FREQS, 2 * 2 * FOURIER_FREQS
        self.mlp = nn.Sequential(
            nn.Linear(text_dim + box_dim, dim), nn.SiLU(), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim)
        )
        self.null = nn.Parameter(torch.zeros(dim))
        self.position = nn.Linear(pos_dim, dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(blocks))
        self.attn = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(blocks))
        self.gates = nn.Parameter(torch.zeros(blocks))  # tanh(0) = 0: the backbone is unchanged at the start

    def tokens(self, cond: GroundedConditioning, batch: int) -> tuple[Tensor, Tensor]:
        """([B, 1 + max N, dim] tokens with the null token first, [B, 1 + max N] key padding mask, True = ignore)."""
        counts = cond.counts or [0] * batch
        width = 1 + max(counts, default=0)
        dtype, device = self.null.dtype, self.null.device
        out = self.null.expand(batch, width, -1).clone()
        ignore = torch.ones(batch, width, dtype=torch.bool, device=device)
        ignore[:, 0] = False
        if cond.phrases is not None and sum(counts):
            feats = torch.cat([cond.phrases.to(device, torch.float32), fourier(cond.boxes.to(device))], -1)
            h = self.mlp(feats.to(dtype))
            start = 0
            for i, n in enumerate(counts):
                out[i, 1 : 1 + n] = h[start : start + n]
                ignore[i, 1 : 1 + n] = False
                start += n
        return out, ignore

    def attend(self, block: int, hidden: Tensor, positions: Tensor, tokens: Tensor, ignore: Tensor) -> Tensor:
        """hidden + tanh(gamma_block) · Attn(LN(hidden) + P(positions), grounding tokens)."""
        query = self.norms[block](hidden) + self.position(fourier(positions).to(hidden.dtype))
        out, _ = self.attn[block](
            query,
            tokens.to(hidden.dtype),
            tokens.to(hidden.dtype),
            key_padding_mask=ignore,
            need_weights=False,
        )
        return hidden + torch.tanh(self.gates[block]).to(hidden.dtype) * out


def token_positions(images: Sequence[Tensor], patch: int) -> Tensor:
    """[sum of tokens, 2]: each DiT token's cell centre (x, y) in [0, 1] of its own image, images in sequence order."""
    out = []
    for latent in images:
        h, w = latent.shape[-2] // patch, latent.shape[-1] // patch
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        out.append(torch.stack([xs, ys], -1).reshape(-1, 2))
    return torch.cat(out)


class SCoT(FlowEdit):
    """FlowEdit trained and sampled on plans in the interleaved format, with planners and layout evaluation.

    Args:
        conditioning: What the model sees of a plan: "inline" (SCoT), "boxes" (GLIGEN-style gated box tokens),
            "inline+boxes", or "text" (coordinates stripped: the text-only baseline).
        planner: Writes the plan of each test request (`components.planners`: ChatPlanner, LocalVLMPlanner,
            RulePlanner); None: each test sample is generated from its own instruction.
        detector: Finds the plan's phrases in the samples (`metrics.layout`: ColourDetector (default), the exact
            one of the generated scenes, or OpenVocabDetector at scale).
        eval_steps: Sampling steps at test time (None: the sampler's).
        **kwargs: FlowEdit's arguments (backbone, vae, text, sampler, ...).
    """

    def __init__(
        self,
        *args: Any,
        conditioning: Conditioning = "inline",
        planner: Planner | None = None,
        detector: Detector | None = None,
        eval_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        for name in ("planner", "detector"):  # objects, not hyperparameters: checkpoints hold plain data only
            self._hparams.pop(name, None)
            self._hparams_initial.pop(name, None)
        if conditioning not in ("inline", "boxes", "inline+boxes", "text"):
            raise ValueError(f"conditioning {conditioning!r}: choose inline, boxes, inline+boxes or text")
        self.conditioning, self.planner, self.eval_steps = conditioning, planner, eval_steps
        self.detector = detector if detector is not None else ColourDetector()
        self.plan_stats = PlanStats()
        self.grounding: GroundingTokens | None = None
        self._grounded: tuple[Tensor, Tensor, Tensor] | None = None
        self.scores = nn.ModuleDict(
            {
                name: MeanMetric(nan_strategy="ignore")
                for name in (
                    "position_acc",
                    "counting_acc",
                    "miou",
                    "box_hit",
                    "edit_inside_psnr",
                    "edit_outside_psnr",
                )
            }
        )

    def configure_model(self) -> None:
        """FlowEdit's parts, the text encoder wrapped in `LayoutTextEncoder`, and the grounding tokens if asked."""
        if self.backbone is not None:
            return
        super().configure_model()
        self.text_encoder = LayoutTextEncoder(self.text_encoder, self.conditioning, self.plan_stats)
        if "boxes" in self.conditioning:
            cfg = self.backbone.model.config
            blocks = [
                *self.backbone.model.transformer_blocks,
                *getattr(self.backbone.model, "single_transformer_blocks", []),
            ]
            self.grounding = GroundingTokens(
                cfg.joint_attention_dim,
                cfg.num_attention_heads * cfg.attention_head_dim,
                len(blocks),
                cfg.num_attention_heads,
            )
            self.backbone.register_forward_pre_hook(self._bind_grounding, with_kwargs=True)
            self.backbone.register_forward_hook(self._release_grounding)
            for i, block in enumerate(blocks):
                block.register_forward_pre_hook(self._ground_block(i))
        self._reloadable = {
            name for name, p in self.named_parameters() if not p.requires_grad and self._from_pretrained(name)
        }

    # --- the grounding hooks ----------------------------------------------------------------------------

    def _bind_grounding(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Before the backbone runs: the grounding tokens of this call's conditioning and each token's position."""
        target, refs, _, text = args[:4]
        if not isinstance(text, GroundedConditioning):
            self._grounded = None
            return
        first = self.backbone.target_first
        order = [[t, *r] if first else [*r, t] for t, r in zip(target, refs)]
        positions = [token_positions(images, self.backbone.patch_size) for images in order]
        padded = nn.utils.rnn.pad_sequence(positions, batch_first=True).to(self.device)
        tokens, ignore = self.grounding.tokens(text, len(target))
        self._grounded = (tokens, ignore, padded)

    def _release_grounding(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._grounded = None

    def _ground_block(self, index: int) -> Any:
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if self._grounded is None:
                return None
            tokens, ignore, positions = self._grounded
            hidden = args[0]
            pos = torch.nn.functional.pad(positions, (0, 0, 0, hidden.shape[1] - positions.shape[1]))
            return (self.grounding.attend(index, hidden, pos, tokens, ignore), *args[1:])

        return hook

    # --- planning and evaluation ------------------------------------------------------------------------

    def plans(self, batch: dict[str, Any]) -> list[str]:
        """The text each sample is generated from: the planner's plan of its request, else its instruction.

        A plan that cannot be used is refused (counted in `plan_stats`) and the request goes without one.
        """
        if self.planner is None:
            return list(batch["instruction"])
        metas = [dict(m) for m in batch["meta"]]
        for m, refs in zip(metas, batch["refs"]):
            if len(refs):
                m["source_image"] = refs[0]
        requests = [m.get("prompt") or strip_boxes(i) for m, i in zip(metas, batch["instruction"])]
        out = []
        for request, text in zip(requests, self.planner.plan(requests, metas)):
            try:
                out.append(write_layout(parse_layout(text, repair=True, stats=self.plan_stats)))
            except PlanError:
                out.append(request)
        return out

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """test/loss as FlowEdit; then plan, sample and score every sample (module docstring)."""
        super().test_step(batch, batch_idx)
        self.score_batch(batch, "test")

    @torch.no_grad()
    def score_batch(self, batch: dict[str, Any], split: str) -> list[dict[str, Any]]:
        """Plan, sample and score a batch; returns one record per sample (plan, scores) and updates the means."""
        keys = _keys(batch)
        plans = self.plans(batch)
        images = self.sample(
            batch["refs"],
            plans,
            size=[tuple(t.shape[-2:]) for t in batch["target"]],
            steps=self.eval_steps,
            generator=[torch_generator(self.seed, "scot-eval", k) for k in keys],
        )
        records = []
        for key, plan, image, meta, refs, target in zip(
            keys, plans, images, batch["meta"], batch["refs"], batch["target"]
        ):
            layout = self.text_encoder.layout(plan) if has_boxes(plan) else None
            regions = (
                [(r.phrase, r.box) for r in layout.regions]
                if layout
                else [(r["phrase"], r["box"]) for r in meta.get("layout", [])]
            )
            record: dict[str, Any] = {"key": key, "plan": plan}
            if meta.get("task") == "edit" and meta.get("edit") and len(refs):
                record.update(edit_scores(image, refs[0], target, meta["edit"]["box"]))
            else:
                scores = layout_scores(image, regions, self.detector, meta.get("geneval"))
                tag = (meta.get("geneval") or {}).get("tag")
                record.update({"miou": scores["miou"], "box_hit": scores["hit"]})
                if tag in ("position", "counting"):
                    record[f"{tag}_acc"] = scores["correct"]
            for name, metric in self.scores.items():
                if name in record:
                    metric.update(torch.tensor(float(record[name])))
            records.append(record)
        self._write(records, images, split)
        return records

    def on_test_epoch_end(self) -> None:
        """Log the epoch's means and the plan counts."""
        for name, metric in self.scores.items():
            if metric.update_count:
                value = metric.compute()
                if not torch.isnan(value):
                    self.log(f"test/{name}", value)
            metric.reset()
        for name, value in self.plan_stats.as_dict().items():
            self.log(f"plan/{name}", float(value))

    def _write(self, records: list[dict[str, Any]], images: list[Tensor], split: str) -> None:
        """Each sample's image and plan, and a JSONL of the records, under `predictions_dir` (rank 0's share)."""
        if self._trainer is None:
            return
        out = Path(self.predictions_dir or Path(self.trainer.default_root_dir) / "predictions") / split
        out.mkdir(parents=True, exist_ok=True)
        with (out / f"records-rank{self.global_rank}.jsonl").open("a") as f:
            for record, image in zip(records, images):
                name = record["key"].replace("/", "_")
                to_pil(image).save(out / f"{name}.png")
                (out / f"{name}.plan.txt").write_text(record["plan"] + "\n")
                f.write(json.dumps(record) + "\n")

    def sample_grid(self, batch: dict[str, Any], k: int) -> list[tuple[list[Tensor], Tensor, Tensor]]:
        """(references, target with its layout drawn, prediction with its plan drawn) for the first k samples."""
        k = min(k, len(batch["target"]))
        first = {key: (v[:k] if isinstance(v, list | tuple) else v) for key, v in batch.items()}
        plans = self.plans(first)
        keys = _keys(first)
        images = self.sample(
            first["refs"],
            plans,
            size=[tuple(t.shape[-2:]) for t in first["target"]],
            generator=[torch_generator(self.seed, "grid", key) for key in keys],
        )
        rows = []
        for plan, image, meta, refs, target in zip(
            plans, images, first["meta"], first["refs"], first["target"]
        ):
            layout = self.text_encoder.layout(plan)
            planned = [tuple(v / GRID for v in r.box) for r in layout.regions] if layout else []
            truth = [tuple(v / GRID for v in r["box"]) for r in meta.get("layout", [])]
            rows.append((list(refs), draw_boxes(target, truth), draw_boxes(image, planned)))
        return rows


def psnr(a: Tensor, b: Tensor) -> float:
    """PSNR (dB) of two images in [-1, 1] (peak-to-peak 2); inf when equal."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return 10 * math.log10(4.0 / mse) if mse > 0 else float("inf")


def edit_scores(output: Tensor, source: Tensor, target: Tensor, box: Sequence[int]) -> dict[str, float]:
    """Region-specific edit scores: PSNR inside the edit box against the exact target, outside it against the source.

    `box` is on the 0-1000 grid; the source is resized to the output's size. A region with no pixel is NaN.
    """
    h, w = output.shape[-2:]
    src = torch.nn.functional.interpolate(source[None].float(), size=(h, w), mode="bilinear", antialias=True)[
        0
    ]
    tgt = torch.nn.functional.interpolate(target[None].float(), size=(h, w), mode="bilinear", antialias=True)[
        0
    ]
    x0, y0, x1, y1 = (round(v * s / GRID) for v, s in zip(box, (w, h, w, h)))
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    out = output.float().cpu()
    scores = {}
    for name, mask, ref in (("edit_inside_psnr", inside, tgt), ("edit_outside_psnr", ~inside, src)):
        scores[name] = psnr(out[:, mask], ref.cpu()[:, mask]) if mask.any() else float("nan")
        scores[name] = min(scores[name], 100.0)
    return scores
