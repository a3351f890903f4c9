"""CCMP: cycle-consistent mask prediction for ego-exo object correspondence (CVPR 2026, arXiv 2602.18996).

Given an object mask in a query view (ego or exo), CCMP segments the same object in the other view.
This file implements:

- §1 architecture: a DINOv3 ConvNeXt source encoder whose stride-16 features are masked-average-pooled
  under the query mask and projected to one condition token (CDT); a DINOv3 ViT target encoder that
  takes the CDT as an extra, position-free prefix token; a mask head and a visibility (CLS) head shared
  by the outputs of the last two ViT blocks.
- §2 losses: L_l = BCE + 5·Dice + 1·BCE(cls, visible) per output layer l, and
  L = L_last + 1·L_aux + 10·L_cycle, where the cycle feeds the soft (not detached) predicted mask
  back with source and target swapped and compares the reverse prediction with the query mask.
- §4 recipe: stage 1 linear probing (backbones frozen) then stage 2 full fine-tuning, each a cosine
  lr with squared warm-up, expressed as the `stages` configuration.
- §5 evaluation: IoU/CA/LE/VA per direction (Ego→Exo, Exo→Ego) on the official GT shapes, mIoU.

§3 test-time training lives in `callbacks/ttt.py`; this module implements its protocol
(`ttt_parameters`, `ttt_loss`, `ttt_group`). EMA evaluation lives in `callbacks/ema.py`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple, NotRequired, TypedDict

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DINOv3ConvNextModel, DINOv3ViTModel

from datamodules.correspondence import prediction_to_gt
from lightning_modules.components.backbones import BackboneSpec, build_backbone, check_backbone
from metrics.correspondence import CorrespondenceMetrics, HandalInstanceIoU, SubmissionWriter
from omnilab.attention import apply_attention
from omnilab.runs import resolve_latest

EVAL_DIRECTIONS = ("ego-exo", "exo-ego")  # the benchmark's two directions; same-view pairs are not scored
EVAL_PROTOCOLS = ("egoexo4d", "handalx")


# --- losses (§2) --------------------------------------------------------------------------------------


def dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """Dice = mean_b [1 − (2Σ p·g + s) / (Σ p + Σ g + s)], p = sigmoid(logits), soft targets g, s = smooth."""
    p, g = torch.sigmoid(logits).flatten(1), target.float().flatten(1)
    return (1 - (2 * (p * g).sum(-1) + smooth) / (p.sum(-1) + g.sum(-1) + smooth)).mean()


def segmentation_loss(
    mask_logits: Tensor,
    cls_logits: Tensor,
    target_mask: Tensor,
    visible: Tensor,
    dice_weight: float = 5.0,
    cls_weight: float = 1.0,
) -> Tensor:
    """L_l = BCEWithLogits(mask, M_t) (pixel mean) + λ_dice·Dice(mask, M_t) + λ_cls·BCE(cls, visible)."""
    bce = F.binary_cross_entropy_with_logits(mask_logits, target_mask)
    cls = F.binary_cross_entropy_with_logits(cls_logits, visible.to(cls_logits.dtype))
    return bce + dice_weight * dice_loss(mask_logits, target_mask) + cls_weight * cls


def cycle_loss(reverse_logits: Tensor, source_mask: Tensor) -> Tensor:
    """L_cycle = BCEWithLogits(reverse mask logits, M_s): BCE only, no Dice and no CLS term (§2)."""
    return F.binary_cross_entropy_with_logits(reverse_logits, source_mask)


def masked_average_pool(features: Tensor, mask: Tensor, eps: float = 1e-6) -> Tensor:
    """z = Σ(F·m) / (Σm + eps) over the grid; m = `mask` [B,1,H,W] resized (bilinear) to F [B,C,h,w]."""
    m = F.interpolate(mask.to(features.dtype), size=features.shape[-2:], mode="bilinear", align_corners=False)
    return (features * m).sum((2, 3)) / (m.sum((2, 3)) + eps)


# --- lr schedule (§4) ---------------------------------------------------------------------------------


class Stage(TypedDict):
    """One stage of the recipe: `steps` optimizer steps, cosine `lr` → `lr_end` after a squared warm-up."""

    steps: int
    lr: float
    lr_end: NotRequired[float]  # defaults to lr (constant)
    warmup_steps: NotRequired[int]  # defaults to 0
    train_backbones: NotRequired[bool]  # defaults to True; False = linear probing (encoders frozen)


def stage_at(stages: list[Stage], step: int) -> tuple[int, int]:
    """(stage index, step within it) of a global optimizer step; past the end, the last stage."""
    start = 0
    for i, stage in enumerate(stages):
        if step < start + stage["steps"] or i == len(stages) - 1:
            return i, step - start
        start += stage["steps"]
    raise ValueError("`stages` is empty")


def stage_lr(stage: Stage, t: int) -> float:
    """lr·((t+1)/w)² for t < w, then lr_end + ½(lr − lr_end)(1 + cos(π·min(1, (t−w)/(steps−w))))."""
    lr, w = stage["lr"], stage.get("warmup_steps", 0)
    lr_end = stage.get("lr_end", lr)
    if t < w:
        return lr * ((t + 1) / w) ** 2
    progress = min(1.0, (t - w) / max(1, stage["steps"] - w))
    return lr_end + 0.5 * (lr - lr_end) * (1 + math.cos(math.pi * progress))


def check_stages(stages: list[Stage]) -> None:
    """ValueError naming the stage and key of any value that would not train as meant (negative lr, ...)."""
    known = set(Stage.__annotations__)
    for i, stage in enumerate(stages):
        where = f"stages[{i}]"
        unknown = set(stage) - known
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; a stage has {sorted(known)}")
        for key in ("steps", "lr"):
            if key not in stage:
                raise ValueError(f"{where}: `{key}` is required")
        steps, warmup = stage["steps"], stage.get("warmup_steps", 0)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"{where}.steps={steps!r}: give a whole number of optimizer steps >= 1")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup <= steps:
            raise ValueError(f"{where}.warmup_steps={warmup!r}: give a whole number in [0, steps={steps}]")
        lr, lr_end = stage["lr"], stage.get("lr_end", stage["lr"])
        if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"{where}.lr={lr!r}: the learning rate must be a finite number > 0")
        if not (isinstance(lr_end, int | float) and math.isfinite(lr_end) and lr_end >= 0):
            raise ValueError(f"{where}.lr_end={lr_end!r}: must be a finite number >= 0")
        if not isinstance(stage.get("train_backbones", True), bool):
            raise ValueError(f"{where}.train_backbones={stage['train_backbones']!r}: give true or false")


def lr_at(stages: list[Stage], step: int) -> float:
    """The learning rate of a global optimizer step under the staged recipe."""
    index, t = stage_at(stages, step)
    return stage_lr(stages[index], t)


# --- the model (§1) -----------------------------------------------------------------------------------


class Prediction(NamedTuple):
    """One output layer: mask logits [B,1,S,S] and visibility logits [B]."""

    mask: Tensor
    cls: Tensor


class CCMP(L.LightningModule):
    """CCMP: condition-token mask prediction with a cycle-consistency loss (CVPR 2026).

    Args:
        source_encoder: The DINOv3 ConvNeXt that encodes the query view: `{pretrained: <hub id or dir>}`
            (paper: facebook/dinov3-convnext-large-pretrain-lvd1689m) or `{config: {...}}`
            (`DINOv3ConvNextConfig` kwargs, random init).
        target_encoder: The DINOv3 ViT that segments the target view: `{pretrained: ...}`
            (paper: facebook/dinov3-vitl16-pretrain-lvd1689m, 4 register tokens) or `{config: {...}}`
            (`DINOv3ViTConfig` kwargs).
        image_size: Side S of the square inputs (paper 512); a multiple of 16 and of the ViT patch size.
        dice_weight: λ_dice in L_l (paper 5).
        cls_weight: Weight of the visibility BCE in L_l (paper 1).
        aux_weight: λ_aux, weight of the second-to-last block's loss (paper 1).
        cycle_weight: λ_cycle, weight of the cycle-consistency loss (paper 10; 0 disables the reverse pass).
        lr: AdamW learning rate when `stages` is not given (constant, everything trains).
        weight_decay: AdamW weight decay (paper 1e-3).
        betas: AdamW betas.
        stages: The training recipe as consecutive stages, each `{steps, lr, lr_end, warmup_steps,
            train_backbones}` counted in optimizer steps: cosine lr from `lr` to `lr_end` after a squared
            warm-up of `warmup_steps`; `train_backbones: false` freezes both encoders (linear probing).
            Entering a stage starts fresh AdamW moments, as CCMP builds a new optimizer per stage. After
            the last stage the lr stays at its `lr_end`. Freezing changes which parameters get gradients,
            so under DDP use `strategy: ddp_find_unused_parameters_true` (as CCMP does).
        attention: Attention backend, `sdpa` (default), `xformers` or `auto` (docs/architecture.md).
        threshold: Probability above which a pixel is predicted as the object.
        eval_protocol: `egoexo4d` (IoU/CA/LE/VA per direction, micro-averaged; `<split>/iou` = mIoU) or
            `handalx` (mean per-instance IoU over every pair, instance = take + object).
        submission: Where `predict` writes the official submission JSON (relative paths go under the
            trainer's default_root_dir).
        init_checkpoint: Start from the weights of this checkpoint (e.g. the Ego-Exo4D model before the
            HANDAL-X fine-tune); optimizer and loop state are not taken (that is `--ckpt_path`).
    """

    def __init__(
        self,
        source_encoder: BackboneSpec,
        target_encoder: BackboneSpec,
        image_size: int = 512,
        dice_weight: float = 5.0,
        cls_weight: float = 1.0,
        aux_weight: float = 1.0,
        cycle_weight: float = 10.0,
        lr: float = 1e-5,
        weight_decay: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        stages: list[Stage] | None = None,
        attention: str = "sdpa",
        threshold: float = 0.5,
        eval_protocol: str = "egoexo4d",
        submission: str = "predictions/submission.json",
        init_checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        check_stages(list(stages or []))
        if not (math.isfinite(lr) and lr > 0) or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(
                f"lr={lr} must be > 0, weight_decay={weight_decay} >= 0, betas={betas} in [0, 1)"
            )
        check_backbone(DINOv3ConvNextModel, source_encoder)  # misspelt keys fail here, before any work
        check_backbone(DINOv3ViTModel, target_encoder)
        self.save_hyperparameters()
        self.source_spec, self.target_spec = dict(source_encoder), dict(target_encoder)
        self.image_size, self.threshold, self.attention = image_size, threshold, attention
        self.dice_weight, self.cls_weight = dice_weight, cls_weight
        self.aux_weight, self.cycle_weight = aux_weight, cycle_weight
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.stages: list[Stage] = list(stages or [])
        self.submission, self.init_checkpoint = submission, init_checkpoint
        self.attention_backend: str | None = None
        # built in configure_model()
        self.source_encoder: nn.Module | None = None
        self.projector: nn.Module | None = None
        self.target_encoder: DINOv3ViTModel | None = None
        self.mask_head: nn.Module | None = None
        self.cls_head: nn.Module | None = None
        self.set_eval_protocol(eval_protocol)
        self._submission: list[tuple] = []  # SubmissionWriter.add arguments of this rank's predicted pairs

    def set_eval_protocol(self, eval_protocol: str) -> None:
        """Evaluate with "egoexo4d" (metrics per direction) or "handalx" (per-instance IoU) from now on."""
        if eval_protocol not in EVAL_PROTOCOLS:
            raise ValueError(f"eval_protocol={eval_protocol!r}: choose one of {', '.join(EVAL_PROTOCOLS)}")
        self.eval_protocol = eval_protocol
        # {"val"|"test": {direction: CorrespondenceMetrics} or {"instances": HandalInstanceIoU}}
        groups = EVAL_DIRECTIONS if eval_protocol == "egoexo4d" else ("instances",)
        make = CorrespondenceMetrics if eval_protocol == "egoexo4d" else HandalInstanceIoU
        metrics = {s: nn.ModuleDict({g: make() for g in groups}) for s in ("val", "test")}
        self.metrics = nn.ModuleDict(metrics).to(self.device)
        self._seen = {s: dict.fromkeys(groups, 0) for s in ("val", "test")}

    def configure_model(self) -> None:
        """Build (or load) the encoders and the heads; idempotent."""
        if self.target_encoder is not None:
            return
        convnext = build_backbone(DINOv3ConvNextModel, **self.source_spec)
        # DINOv3ConvNextModel(..., output_hidden_states=True).hidden_states is (input, stride 4, 8, 16, 32):
        # index 3 is the stride-16 stage, CCMP's "stage index 2" (768 channels for ConvNeXt-L). Keep the
        # stem and the first three stages only; the last stage and the final norm would get no gradient.
        self.source_encoder = nn.Sequential(*convnext.model.stages[:3])
        vit = build_backbone(DINOv3ViTModel, **self.target_spec)
        # the mask token serves masked-image-modelling only: drop it so every parameter gets a gradient (DDP)
        vit.embeddings.mask_token = None
        # transformers' DINOv3 randomly rescales the RoPE coordinates in train mode (pos_embed_rescale=2);
        # CCMP's DINOv3 builder sets no such augmentation, so training sees the positions evaluation sees
        vit.config.pos_embed_shift = vit.config.pos_embed_jitter = vit.config.pos_embed_rescale = None
        self.target_encoder = vit
        width, patch = vit.config.hidden_size, vit.config.patch_size
        if self.image_size % 16 or self.image_size % patch:
            raise ValueError(
                f"image_size={self.image_size} must be a multiple of 16 and of the patch size {patch}"
            )
        self.projector = nn.Conv2d(convnext.config.hidden_sizes[2], width, kernel_size=1)
        self.mask_head = nn.Sequential(
            nn.Conv2d(width, width // 2, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width // 2, 1, kernel_size=1),
        )
        self.cls_head = nn.Sequential(
            nn.Linear(width, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 1)
        )
        self.attention_backend = apply_attention(self, self.attention)
        if self.init_checkpoint:
            path = resolve_latest(self.init_checkpoint)  # runs/<method>/<name>/latest/... : the newest run
            print(f"CCMP: init_checkpoint {path}", flush=True)
            state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
            self.load_state_dict(state)

    def setup(self, stage: str) -> None:
        """Record the attention backend actually used with the run."""
        if self.logger is not None and self.attention_backend is not None:
            self.logger.log_hyperparams({"attention/backend": self.attention_backend})

    @property
    def num_prefix_tokens(self) -> int:
        """CLS + register tokens of the ViT (the CDT goes right after them)."""
        return 1 + self.target_encoder.config.num_register_tokens

    def condition_token(self, query: Tensor, query_mask: Tensor) -> Tensor:
        """CDT [B, D]: the masked average of the stride-16 source features, projected by a 1x1 conv."""
        features = self.source_encoder(query)
        z = masked_average_pool(features, query_mask)
        return self.projector(z[:, :, None, None]).flatten(1)

    def encode_target(self, target: Tensor, cdt: Tensor) -> tuple[Tensor, Tensor]:
        """Run the ViT on `target` with the CDT as an extra prefix token; final-normed last and aux tokens.

        The sequence is [CLS, 4×register, CDT, patches]. `DINOv3ViTModel.forward` computes RoPE for the
        patch grid only and applies it to the last (tokens − prefix) tokens, where prefix = tokens −
        patches, so the CDT stays position-free. CCMP orders the prefix [CLS, CDT, registers]; position-free
        prefix tokens are permutation-equivariant under self-attention, so both orders compute the same.
        """
        vit = self.target_encoder
        target = target.to(vit.embeddings.patch_embeddings.weight.dtype)
        tokens = vit.embeddings(target)  # [B, 1 + R + P, D]
        n = self.num_prefix_tokens
        hidden = torch.cat([tokens[:, :n], cdt[:, None].to(tokens.dtype), tokens[:, n:]], dim=1)
        # (cos, sin) for the P patches only, computed as DINOv3ViTModel.forward does
        position_embeddings = vit.rope_embeddings(target)
        outputs = []
        for layer in vit.model.layer:
            hidden = layer(hidden, position_embeddings=position_embeddings)
            outputs.append(hidden)
        return vit.norm(outputs[-1]), vit.norm(outputs[-2])

    def heads(self, tokens: Tensor, size: tuple[int, int]) -> Prediction:
        """Mask head on the patch grid, bilinearly upsampled ×patch to `size`; CLS head on the CLS token."""
        patch = self.target_encoder.config.patch_size
        patches = tokens[:, self.num_prefix_tokens + 1 :]  # skip CLS, registers and the CDT
        grid = patches.transpose(1, 2).unflatten(2, (size[0] // patch, size[1] // patch))
        mask = F.interpolate(self.mask_head(grid), size=size, mode="bilinear", align_corners=False)
        return Prediction(mask, self.cls_head(tokens[:, 0]).squeeze(-1))

    def forward(self, query: Tensor, query_mask: Tensor, target: Tensor) -> tuple[Prediction, Prediction]:
        """Segment in `target` the object that `query_mask` marks in `query`: (last, aux) predictions."""
        last, aux = self.encode_target(target, self.condition_token(query, query_mask))
        size = tuple(target.shape[-2:])
        return self.heads(last, size), self.heads(aux, size)

    # --- training (§2, §4) ---------------------------------------------------------------------------

    def cycle_term(self, batch: dict[str, Any], mask_logits: Tensor) -> Tensor:
        """L_cycle: the soft prediction sigmoid(mask_logits) (not detached) queries back into the source."""
        reverse, _ = self(batch["tgt"], torch.sigmoid(mask_logits), batch["src"])
        return cycle_loss(reverse.mask, batch["src_mask"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """L = L_last + λ_aux·L_aux + λ_cycle·L_cycle (§2)."""
        last, aux = self(batch["src"], batch["src_mask"], batch["tgt"])
        target, visible = batch["tgt_mask"], batch["visible"]
        seg = segmentation_loss(last.mask, last.cls, target, visible, self.dice_weight, self.cls_weight)
        seg_aux = segmentation_loss(aux.mask, aux.cls, target, visible, self.dice_weight, self.cls_weight)
        cycle = self.cycle_term(batch, last.mask) if self.cycle_weight else torch.zeros_like(seg)
        loss = seg + self.aux_weight * seg_aux + self.cycle_weight * cycle
        size = len(batch["src"])
        self.log_dict({"train/loss": loss, "train/seg": seg, "train/cycle": cycle}, batch_size=size)
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """At a stage's first step: freeze or unfreeze the encoders and start fresh AdamW moments."""
        if not self.stages:
            return
        index, t = stage_at(self.stages, self.global_step)
        train = self.stages[index].get("train_backbones", True)
        for p in self.backbone_parameters():
            p.requires_grad_(train)
        if index > 0 and t == 0:
            for optimizer in self.trainer.optimizers:
                optimizer.state.clear()

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The parameters of both pretrained encoders (frozen in linear probing)."""
        return [*self.source_encoder.parameters(), *self.target_encoder.parameters()]

    def configure_optimizers(self) -> Any:
        """AdamW over every parameter; with `stages`, a per-step LambdaLR that returns the absolute lr."""
        base_lr = 1.0 if self.stages else self.lr  # LambdaLR scales base_lr by the lambda: 1.0 → absolute lr
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=base_lr, betas=self.betas, weight_decay=self.weight_decay
        )
        if not self.stages:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(self.stages, step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- evaluation (§5) -----------------------------------------------------------------------------

    def predict_pairs(self, batch: dict[str, Any]) -> tuple[list[Tensor], Tensor]:
        """Binary masks (in the official GT shape when the batch has `gt_crop`, else S×S) and confidences."""
        last, _ = self(batch["src"], batch["src_mask"], batch["tgt"])
        # thresholding first is exact for any threshold: nearest resizing commutes with it
        binary = (torch.sigmoid(last.mask[:, 0].float()) > self.threshold).float()
        if "gt_crop" in batch:
            shapes = (
                [tuple(gt.shape) for gt in batch["tgt_gt"]] if "tgt_gt" in batch else [None] * len(binary)
            )
            masks = [
                prediction_to_gt(b, crop, shape) for b, crop, shape in zip(binary, batch["gt_crop"], shapes)
            ]
        else:
            masks = list(binary.bool())
        return masks, torch.sigmoid(last.cls.float())

    def _eval_step(self, batch: dict[str, Any], split: str) -> None:
        """Predict, map to the GT shape and update the metrics of each group with the batch's scored pairs."""
        metrics = self.metrics[split]
        masks, confidence = self.predict_pairs(batch)
        gt = [g.bool() for g in batch["tgt_gt"]]
        scored = batch["scored"].tolist() if "scored" in batch else [True] * len(masks)
        if self.eval_protocol == "handalx":
            idx = [i for i, ok in enumerate(scored) if ok]
            instances = [f"{batch['take'][i]}/{batch['object'][i]}" for i in idx]
            metrics["instances"].update([masks[i] for i in idx], [gt[i] for i in idx], instances)
            self._seen[split]["instances"] += len(idx)
            return
        visible = batch["visible"] > 0.5
        for direction in EVAL_DIRECTIONS:
            idx = [i for i, s in enumerate(batch["setting"]) if s == direction and scored[i]]
            if idx:
                metrics[direction].update(
                    [masks[i] for i in idx], [gt[i] for i in idx], confidence[idx], visible[idx]
                )
                self._seen[split][direction] += len(idx)

    def _log_eval(self, split: str) -> None:
        """Log `<split>/<group>/<metric>` and `<split>/iou` (mIoU over directions, or instance mIoU); reset."""
        groups = list(self._seen[split])
        counts = torch.tensor([self._seen[split][g] for g in groups], device=self.device)
        # one sync per epoch, so that every rank computes (and syncs) the same groups' metrics
        counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        ious = []
        for group, count in zip(groups, counts.tolist()):
            metric = self.metrics[split][group]
            if count > 0:
                results = metric.compute()
                if not isinstance(results, dict):
                    results = {"iou": results}
                for name, value in results.items():
                    self.log(f"{split}/{group}/{name}", float(value))
                if math.isfinite(float(results["iou"])):  # nan: the group had no visible instance
                    ious.append(float(results["iou"]))
            metric.reset()
            self._seen[split][group] = 0
        if ious:
            self.log(f"{split}/iou", sum(ious) / len(ious))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Update the validation metrics (no per-step sync)."""
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        """Log val/<direction>/{iou,ca,le,va,...} and val/iou (mIoU)."""
        self._log_eval("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Update the test metrics (no per-step sync)."""
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        """Log test/<direction>/{iou,ca,le,va,...} and test/iou (mIoU)."""
        self._log_eval("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """One record per pair (identifiers, binary mask in the GT shape, confidence); also fills the submission."""
        masks, confidence = self.predict_pairs(batch)
        ids = ("__key__", "setting", "take", "object", "src_cam", "tgt_cam", "frame", "visible")
        keys = [k for k in ids if k in batch]
        records = [
            {**{k: batch[k][i] for k in keys}, "mask": mask.cpu(), "confidence": conf}
            for i, (mask, conf) in enumerate(zip(masks, confidence.tolist()))
        ]
        planned = batch["planned"].tolist() if "planned" in batch else [True] * len(records)
        for r, plan in zip(records, planned):
            if r.get("setting") in EVAL_DIRECTIONS and plan:
                ids = (r["setting"], r["take"], r["object"], r["src_cam"], r["tgt_cam"], int(r["frame"]))
                self._submission.append((*ids, r["mask"].numpy(), r["confidence"]))
        return records

    def on_predict_epoch_end(self) -> None:
        """Write the official submission JSON (both directions) once, on rank 0, from every rank's pairs.

        When the datamodule has a submission plan (`submission_plan()`, the converter's `<split>-plan.json`),
        the JSON follows it: every take, object, camera pair and frame the official validation asks for.
        """
        pairs, self._submission = self._submission, []
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, pairs)
            pairs = [pair for part in parts for pair in part]
        if self.trainer.is_global_zero:
            datamodule = getattr(self.trainer, "datamodule", None)
            plan = datamodule.submission_plan() if hasattr(datamodule, "submission_plan") else None
            writer = SubmissionWriter(plan)
            for pair in pairs:
                writer.add(*pair)
            path = Path(self.trainer.default_root_dir) / self.submission
            path.parent.mkdir(parents=True, exist_ok=True)
            writer.write(path)
            if writer.filled or writer.unplanned:
                self.print(
                    f"submission {path}: {writer.filled} planned frames had no prediction (written empty, "
                    f"confidence 0); {writer.unplanned} predictions outside the plan left out"
                )

    # --- test-time training protocol (§3, callbacks/ttt.py) ------------------------------------------

    def ttt_parameters(self, blocks: int) -> list[nn.Parameter]:
        """The parameters of the last `blocks` ViT blocks."""
        layers = self.target_encoder.model.layer
        if not 1 <= blocks <= len(layers):
            raise ValueError(f"TTT blocks={blocks}, but the target ViT has {len(layers)} blocks")
        return [p for layer in layers[-blocks:] for p in layer.parameters()]

    def ttt_loss(self, batch: dict[str, Any]) -> Tensor:
        """The cycle loss alone: forward, soft mask, reverse pass, BCE against the query mask."""
        last, _ = self(batch["src"], batch["src_mask"], batch["tgt"])
        return self.cycle_term(batch, last.mask)

    def ttt_group(self, batch: dict[str, Any]) -> str:
        """The pair's setting ("ego-exo", "exo-ego", ...), which picks the TTT blocks and steps."""
        return batch["setting"][0]
