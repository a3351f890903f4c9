"""PURE: Perceive, Understand and REstore — real-world super-resolution with an autoregressive multimodal model.

Wei et al., ICCV 2025 (arXiv 2503.11073); code github.com/nonwhy/PURE. PURE instruction-tunes Lumina-mGPT (a
Chameleon-architecture 7B LM over text and VQ image tokens) to answer one instruction about a low-quality image
with (1) the degradation level, (2) a description of the content and (3) the high-quality image, token by token.
This file implements:

- §3.1-3.2 the instruction exchange (released `data/convertsation.py`, `data/item_processor.py`): the user turn
  "Perceive the degradation level, understand the image content, and restore the high-quality image. <|image|>"
  with the bicubic-upsampled LQ image, the assistant turn "<degradation>. <description> <|image|>" with the HQ
  image; each turn closed by <reserved08706>, <s> first, no role strings; the loss covers the assistant turn only
  (`answer_loss`). Images are VQ-8 codes in Lumina-mGPT's layout (`components/image_tokens.py`).
- the backbone: transformers' Chameleon without its image-logit mask and without its own VQGAN, as Lumina-mGPT /
  PURE train it (`--unmask_image_logits`; the image tokenizer is LlamaGen's VQ-8, `components/vq.py`).
- §3.3 inference through `model.generate` with PURE's processors (`components/ar_sampling.py`): image CFG (0.8),
  the layout constraints, entropy-based top-k (k from 1 to 2000) then temperature 0.9; greedy text; KV cache on;
  a broken layout repaired with a warning (`ImageTokenLayout.read`); StableSR's wavelet colour fix against the input
  (`wavelet_color_fix`, released `utils/wavelet_color_fix.py`).
- §4 training settings of the released `scripts/train.sh`: AdamW (0.9, 0.95), lr 4e-4, weight decay 0.1, warm-up
  then half-cycle cosine to 0, gradient clip 4, optional z-loss.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import ChameleonForConditionalGeneration, GenerationConfig, LogitsProcessorList
from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping

from datamodules.restoration import bicubic
from lightning_modules.components.ar_sampling import (
    EntropyTopKLogitsProcessor,
    ImageCFGLogitsProcessor,
    ImageStructureLogitsProcessor,
)
from lightning_modules.components.backbones import build_backbone
from lightning_modules.components.image_tokens import CELL_PIXELS, ImageTokenLayout, LayoutError
from lightning_modules.components.tokenizers import IMAGE_PLACEHOLDER, RESTORATION_INSTRUCTION, load_tokenizer
from lightning_modules.components.vq import LlamaGenVQModel
from metrics.restoration import RestorationMetrics
from omnilab.fsdp import FSDPNormClipping
from omnilab.seeding import derive_seed

INSTRUCTION = f"{RESTORATION_INSTRUCTION} {IMAGE_PLACEHOLDER}"
ANSWER_PARTS = ("perceive", "understand")


# --- the exchange and its loss (§3.1-3.2) ---------------------------------------------------------------


def answer_text(label: str, description: str, parts: tuple[str, ...] = ANSWER_PARTS) -> str:
    """The assistant turn before the image: "<label>. <description> <|image|>" (only the parts asked for).

    "perceive" gives the degradation label, "understand" the description; with neither it is just "<|image|>"
    (the restore-only ablation).
    """
    pieces = []
    if "perceive" in parts and label:
        pieces.append(label.rstrip(".") + ".")
    if "understand" in parts and description:
        pieces.append(description.strip())
    return " ".join([*pieces, IMAGE_PLACEHOLDER])


def answer_loss(logits: Tensor, labels: Tensor, z_loss_weight: float = 0.0) -> dict[str, Tensor]:
    """Next-token cross-entropy averaged over the positions whose label is not -100 (the answer).

    Position t predicts labels[t + 1]. Returns {"loss", "ce", "z_loss"}; z_loss = mean logsumexp(logits)^2 over the
    same positions (Lumina-mGPT's, weight `z_loss_weight`; PURE 0).
    """
    shift_logits = logits[:, :-1].float()
    target = labels[:, 1:]
    valid = target != -100
    if not bool(valid.any()):
        raise ValueError("no answer tokens in the batch: every label is -100")
    ce = F.cross_entropy(shift_logits[valid], target[valid])
    z = torch.logsumexp(shift_logits[valid], dim=-1).pow(2).mean() if z_loss_weight else ce.new_zeros(())
    return {"loss": ce + z_loss_weight * z, "ce": ce, "z_loss": z}


# --- the wavelet colour fix (StableSR, used by PURE on its outputs) ----------------------------------------


def wavelet_blur(img: Tensor, radius: int) -> Tensor:
    """A 3x3 binomial blur ([1 2 1]^T [1 2 1] / 16) with dilation `radius`, replicate padding; [B, C, H, W]."""
    k = (
        torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=img.dtype, device=img.device)
        / 16
    )
    c = img.shape[1]
    padded = F.pad(img, (radius,) * 4, mode="replicate")
    return F.conv2d(padded, k.expand(c, 1, 3, 3), groups=c, dilation=radius)


def wavelet_decomposition(img: Tensor, levels: int = 5) -> tuple[Tensor, Tensor]:
    """(high, low): low = the image blurred at radii 1, 2, 4, ..., 2^(levels-1) in turn, high = img - low."""
    low = img
    for i in range(levels):
        low = wavelet_blur(low, 2**i)
    return img - low, low


def wavelet_color_fix(target: Tensor, source: Tensor, levels: int = 5) -> Tensor:
    """The target's high frequencies on the source's low frequencies (colour), clamped to [0, 1]; [B, 3, H, W]."""
    if target.shape != source.shape:
        raise ValueError(
            f"colour fix needs images of one shape, got {tuple(target.shape)} and {tuple(source.shape)}"
        )
    return (wavelet_decomposition(target, levels)[0] + wavelet_decomposition(source, levels)[1]).clamp(0, 1)


# --- the backbone ---------------------------------------------------------------------------------------


class LuminaChameleon(ChameleonForConditionalGeneration):
    """transformers' Chameleon as Lumina-mGPT / PURE run it: image-token logits not masked, no built-in VQGAN.

    transformers' class sets every "IMGIMG" token's logit to the dtype's minimum (Chameleon's released chat model
    must not draw images); Lumina-mGPT's `mask_image_logits=False` (PURE `--unmask_image_logits`) lifts that, and
    its VQGAN is unused because the image tokenizer is separate (PURE deletes `model.vqmodel`).
    """

    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [r"model\.vqmodel\."]

    def __init__(self, config: Any) -> None:
        if getattr(config, "vocabulary_map", None) is None:
            config.vocabulary_map = {}
        super().__init__(config)
        del self.model.vqmodel
        self.model.vocabulary_mapping = ChameleonImageVocabularyMapping({})  # nothing left to mask


# --- sampling settings and results ----------------------------------------------------------------------


@dataclass
class Sampling:
    """How `restore` samples (PURE's README and `inference_solver.py` defaults).

    Args:
        cfg: Image classifier-free guidance scale s in s (cond - uncond) + uncond (PURE 0.8; 1 = off).
        temperature: Sampling temperature, applied after the top-k (PURE 0.9).
        k_min, k_max: Bounds of the entropy-based top-k (PURE 1, 2000).
        fixed_k: A fixed image top-k instead of the entropy rule (the baseline of the ablation).
        greedy: Argmax everywhere (no sampling).
        text_top_k: Text candidates kept (PURE 1: greedy text).
        max_text_tokens: Answer text tokens before the image start is forced.
        force_grid: Force the output grid to the input's (PURE leaves the grid tokens to the model).
        use_cache: KV cache for the model and the CFG branch.
        color_fix: StableSR's wavelet colour fix of the output against the input (PURE: on).
    """

    cfg: float = 0.8
    temperature: float = 0.9
    k_min: int = 1
    k_max: int = 2000
    fixed_k: int | None = None
    greedy: bool = False
    text_top_k: int = 1
    max_text_tokens: int = 64
    force_grid: bool = True
    use_cache: bool = True
    color_fix: bool = True


@dataclass
class Restoration:
    """One restored image [3, H, W] in [0, 1], the answer text, the output codes and the layout repairs made."""

    image: Tensor
    text: str
    codes: Tensor
    problems: list[str] = field(default_factory=list)
    tokens: int = 0


# --- the module -----------------------------------------------------------------------------------------


class PURE(FSDPNormClipping, L.LightningModule):
    """PURE: instruction-tuned autoregressive SR (perceive the degradation, describe, restore the image tokens).

    Args:
        backbone: The LM: `{pretrained: <hub id or dir>}` (paper: nonwhy/PURE, or Lumina-mGPT-7B-512 to fine-tune
            from) or `{config: {...}}` (`ChameleonConfig` kwargs, random init; `vocab_size` defaults to the
            tokenizer's length).
        vq: The image tokenizer: `{pretrained: <dir>}` (LlamaGen's vq_ds8_c2i.pt converted with
            `convert_llamagen_checkpoint`) or `{config: {...}}` (`LlamaGenVQModel` kwargs).
        tokenizer: A `load_tokenizer` spec; default: the backbone's own (pretrained) or the offline Chameleon-style
            tokenizer with the VQ's codebook as image tokens.
        init_vq_checkpoint: A Lightning checkpoint of `lightning_modules.vq.VQTokenizer` whose `vq.*` weights are
            loaded into the tokenizer (the tiny run's; read with weights_only=True); None: as built.
        init_vq_experiment: The experiment ("pure/vq_tiny") trained first when `init_vq_checkpoint` is missing.
        image_size: Side of the square HQ image and of the upsampled LQ input (PURE 512).
        answer: The answer parts before the image: "perceive" (degradation), "understand" (description); [] is the
            restore-only ablation.
        max_seq_len: Longest training sequence (PURE 11776; longer ones are an error, not truncated).
        lr, weight_decay, betas: AdamW (PURE 4e-4, 0.1, (0.9, 0.95)).
        warmup_fraction: Linear warm-up as a fraction of the training steps (PURE 0.5 of 2 epochs = 0.25), then a
            half-cycle cosine to `min_lr`.
        min_lr: The cosine's floor (PURE 0).
        z_loss_weight: Weight of the z-loss (PURE 0).
        gradient_checkpointing: Recompute each decoder layer's activations in the backward (PURE: on).
        sampling: `Sampling` fields for validation, test and predict.
        val_restore: Images restored (generated) per validation for the PSNR/SSIM of `val/`; 0: loss only.
        seed: Seed of the sampling (each image's from (seed, its key)).
        predict_dir: Where `predict` writes restored PNGs (relative: under the trainer's default_root_dir).
    """

    def __init__(
        self,
        backbone: dict[str, Any],
        vq: dict[str, Any],
        tokenizer: dict[str, Any] | None = None,
        init_vq_checkpoint: str | None = None,
        init_vq_experiment: str | None = None,
        image_size: int = 512,
        answer: list[str] | None = None,
        max_seq_len: int = 11776,
        lr: float = 4e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_fraction: float = 0.25,
        min_lr: float = 0.0,
        z_loss_weight: float = 0.0,
        gradient_checkpointing: bool = False,
        sampling: dict[str, Any] | None = None,
        val_restore: int = 2,
        seed: int = 0,
        predict_dir: str = "predictions",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.answer = tuple(ANSWER_PARTS if answer is None else answer)
        unknown = sorted(set(self.answer) - set(ANSWER_PARTS))
        if unknown:
            raise ValueError(f"answer parts {unknown} unknown; choose from {list(ANSWER_PARTS)}")
        if image_size % CELL_PIXELS:
            raise ValueError(f"image_size {image_size} must be a multiple of the {CELL_PIXELS} px grid cell")
        unknown = sorted(set(sampling or {}) - set(Sampling.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"unknown sampling setting(s) {unknown}; choose from {sorted(Sampling.__dataclass_fields__)}"
            )
        self.sampling = Sampling(**(sampling or {}))
        self.backbone_spec, self.vq_spec, self.tokenizer_spec = dict(backbone), dict(vq), tokenizer
        self.lm: LuminaChameleon | None = None
        self.vq: LlamaGenVQModel | None = None
        self.tokenizer: Any = None
        self.layout: ImageTokenLayout | None = None
        self.val_metrics = RestorationMetrics()
        self.val_bicubic = RestorationMetrics()
        self.test_metrics = RestorationMetrics()
        self.test_bicubic = RestorationMetrics()
        self.test_vq = RestorationMetrics()
        self.repairs = 0  # generated images whose layout needed repair
        self._val_restored = 0
        self._test_rows: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []

    # --- building -------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Build the VQ tokenizer (loading `init_vq_checkpoint`), the tokenizer, the layout and the LM; idempotent."""
        if self.lm is not None:
            return
        self.vq = build_backbone(LlamaGenVQModel, **self.vq_spec)
        if self.hparams.init_vq_checkpoint is not None:
            self._load_vq(self._vq_checkpoint())
        self.vq.requires_grad_(False).eval()
        if CELL_PIXELS % self.vq.downsample:
            raise ValueError(
                f"the VQ's {self.vq.downsample}x downsampling does not divide the {CELL_PIXELS} px cell"
            )
        codebook = self.vq.config.codebook_size
        pretrained = self.backbone_spec.get("pretrained")
        default = {"kind": "chameleon", "vocab_size": 1024, "image_codes": codebook}
        if pretrained and Path(pretrained).is_dir() and not any(Path(pretrained).glob("tokenizer*.json")):
            warnings.warn(
                f"{pretrained} holds no tokenizer: using the offline Chameleon-style one ({codebook} image codes)",
                stacklevel=2,
            )
            pretrained = None
        self.tokenizer = load_tokenizer(
            self.tokenizer_spec or (None if pretrained else default), "chameleon", pretrained, subfolder=""
        )
        self.layout = ImageTokenLayout.from_tokenizer(
            self.tokenizer, codebook, CELL_PIXELS // self.vq.downsample
        )
        spec = dict(self.backbone_spec)
        if "config" in spec:
            spec["config"] = {"vocab_size": len(self.tokenizer), **spec["config"]}
        overrides = {"vocabulary_map": {}, "max_position_embeddings": self.hparams.max_seq_len}
        if "pretrained" in spec:
            spec["dtype"] = torch.float32  # fp32 master weights; bf16 comes from the precision plugin
        self.lm = build_backbone(LuminaChameleon, **spec, overrides=overrides)
        if self.hparams.gradient_checkpointing:
            self.lm.gradient_checkpointing_enable()
        vocab = self.lm.config.vocab_size
        if vocab <= max(self.layout.max_id(), len(self.tokenizer) - 1):
            raise ValueError(
                f"the LM's vocabulary ({vocab}) is smaller than the tokenizer's ids (up to "
                f"{max(self.layout.max_id(), len(self.tokenizer) - 1)}): extend it to the image codes"
            )

    def _vq_checkpoint(self) -> Path:
        """`init_vq_checkpoint`, trained first (rank 0) from `init_vq_experiment` when missing."""
        from omnilab.runs import resolve_latest

        path = Path(self.hparams.init_vq_checkpoint)
        trainer = self._trainer
        if not resolve_latest(path).is_file() and (trainer is None or trainer.is_global_zero):
            from lightning_modules.flow_grpo import ensure_init_checkpoint

            args = []
            data_dir = getattr(getattr(trainer, "datamodule", None), "data_dir", None)
            if data_dir is not None:
                args.append(f"--data.init_args.data_dir={data_dir}")
            if trainer is not None and trainer.logger is None:
                args.append("--trainer.logger=false")
            ensure_init_checkpoint(path, self.hparams.init_vq_experiment, args)
        if trainer is not None:
            trainer.strategy.barrier("pure_init_vq_checkpoint")
        path = resolve_latest(path)  # runs/pure/vq_tiny/latest/...: the newest run of the VQ experiment
        if not path.is_file():
            raise FileNotFoundError(f"init_vq_checkpoint {path} does not exist")
        print(f"PURE: init_vq_checkpoint {path}", flush=True)
        return path

    def _load_vq(self, path: Path) -> None:
        """The `vq.*` weights of a VQTokenizer checkpoint; a ValueError when they do not fit this tokenizer."""
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state = {k[3:]: v for k, v in (ckpt.get("state_dict") or {}).items() if k.startswith("vq.")}
        if not state:
            raise ValueError(
                f"init_vq_checkpoint {path} holds no vq.* weights (is it a VQTokenizer checkpoint?)"
            )
        try:
            self.vq.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"init_vq_checkpoint {path} does not fit the vq config: {err}") from err

    # --- sequences ------------------------------------------------------------------------------------

    def image_tokens(self, images: Tensor) -> tuple[list[Tensor], Tensor]:
        """Images [B, 3, S, S] in [0, 1] -> (token ids of each image in the layout, codes [B, h, w])."""
        codes = self.vq.encode(images.to(self.device) * 2 - 1)
        return [self.layout.encode(c) for c in codes], codes

    def _text(self, text: str, images: list[Tensor]) -> list[Tensor]:
        """Token pieces of a turn: the text around each <|image|> tokenized, the images' tokens in their places."""
        parts = text.split(IMAGE_PLACEHOLDER)
        if len(parts) - 1 != len(images):
            raise ValueError(f"{len(parts) - 1} {IMAGE_PLACEHOLDER} in {text!r} for {len(images)} image(s)")
        pieces: list[Tensor] = []
        for i, part in enumerate(parts):
            if part:
                ids = self.tokenizer.encode(part, add_special_tokens=False)
                pieces.append(torch.tensor(ids, dtype=torch.long, device=self.device))
            if i < len(images):
                pieces.append(images[i].to(self.device))
        return pieces

    def prompt(self, lq_tokens: Tensor) -> Tensor:
        """<s> + the user turn with the LQ image + <reserved08706>: what `generate` continues."""
        bos = torch.tensor([self.tokenizer.bos_token_id], device=self.device)
        turn_end = torch.tensor([self.layout.turn_end], device=self.device)
        return torch.cat([bos, *self._text(INSTRUCTION, [lq_tokens]), turn_end])

    def sequences(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """(input_ids, attention_mask, labels) [B, L] of the exchanges, right-padded; labels -100 outside the answer."""
        lq_tokens, _ = self.image_tokens(batch["lq"])
        hq_tokens, _ = self.image_tokens(batch["hq"])
        rows, labels = [], []
        turn_end = torch.tensor([self.layout.turn_end], device=self.device)
        for i in range(len(lq_tokens)):
            prompt = self.prompt(lq_tokens[i])
            text = answer_text(batch["label"][i], batch["description"][i], self.answer)
            answer = torch.cat([*self._text(text, [hq_tokens[i]]), turn_end])
            rows.append(torch.cat([prompt, answer]))
            labels.append(torch.cat([torch.full_like(prompt, -100), answer]))
        longest = max(len(r) for r in rows)
        if longest > self.hparams.max_seq_len:
            raise ValueError(f"a sequence of {longest} tokens exceeds max_seq_len={self.hparams.max_seq_len}")
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), longest), pad, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(input_ids)
        target = torch.full_like(input_ids, -100)
        for i, (row, label) in enumerate(zip(rows, labels)):
            input_ids[i, : len(row)], mask[i, : len(row)], target[i, : len(row)] = row, 1, label
        return input_ids, mask, target

    # --- training -------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Teacher-forced cross-entropy on the answer (degradation, description, HQ image tokens)."""
        out = self._loss(batch)
        self.log_dict({f"train/{k}": v for k, v in out.items()}, batch_size=len(batch["hq"]))
        return out["loss"]

    def _loss(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        input_ids, mask, labels = self.sequences(batch)
        logits = self.lm(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        out = answer_loss(logits, labels, self.hparams.z_loss_weight)
        with torch.no_grad():  # the answer's image tokens alone
            code = self.layout.code_mask(logits.shape[-1], labels.device)[labels[:, 1:].clamp(min=0)]
            valid = (labels[:, 1:] != -100) & code
            if bool(valid.any()):
                out["image_ce"] = F.cross_entropy(logits[:, :-1][valid].float(), labels[:, 1:][valid])
        return out

    def configure_optimizers(self) -> Any:
        """AdamW, linear warm-up over `warmup_fraction` of the steps, then a half-cycle cosine to `min_lr`."""
        h = self.hparams
        opt = torch.optim.AdamW(
            self.lm.parameters(), lr=h.lr, betas=tuple(h.betas), weight_decay=h.weight_decay
        )
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        warm = int(h.warmup_fraction * total)
        floor = h.min_lr / h.lr if h.lr else 0.0

        def scale(step: int) -> float:
            if step < warm:
                return step / warm
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, scale)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- restoration (§3.3) ---------------------------------------------------------------------------

    @torch.no_grad()
    def restore(
        self, lq: Tensor, keys: list[str] | None = None, sampling: Sampling | None = None
    ) -> list[Restoration]:
        """Restore upsampled LQ images [B, 3, S, S] in [0, 1] one by one (as PURE generates): text, then image tokens.

        Each image samples from a generator seeded by (seed, its key). A generation that breaks the layout is
        repaired (`ImageTokenLayout.read`, the input's codes filling what is missing) with a warning.
        """
        s = sampling or self.sampling
        if lq.ndim != 4 or lq.shape[1] != 3:
            raise ValueError(f"restore expects RGB images [B, 3, H, W], got shape {tuple(lq.shape)}")
        if min(lq.shape[-2:]) < CELL_PIXELS:
            raise ValueError(
                f"images of {tuple(lq.shape[-2:])} px are smaller than one {CELL_PIXELS} px grid cell"
            )
        lq_tokens, lq_codes = self.image_tokens(lq)
        keys = keys or [str(i) for i in range(len(lq))]
        out = []
        was_training = self.lm.training
        self.lm.eval()
        try:
            for i in range(len(lq)):
                out.append(self._restore_one(lq[i], lq_tokens[i], lq_codes[i], keys[i], s))
        finally:
            self.lm.train(was_training)
        return out

    def restore_image(self, image: Any, sampling: Sampling | None = None, key: str = "image") -> Restoration:
        """Restore one image (PIL or HxW[xC] array, 8- or 16-bit, grey, RGB or RGBA) as PURE's README does.

        The input is made 8-bit RGB (`datamodules.restoration.rgb8`), bicubic-resized to `image_size` (128 -> 512 px
        is x4) and restored. A ValueError names an input that cannot be read or is under 8 px a side (less than a
        32 px grid cell at x4).
        """
        import numpy as np

        from datamodules.restoration import rgb8
        from datamodules.webdataset import BadSample

        try:
            array = rgb8(np.asarray(image), "input")
        except BadSample as err:
            raise ValueError(f"restore_image: {err}") from err
        if min(array.shape[:2]) < CELL_PIXELS // 4:
            raise ValueError(
                f"restore_image: a {array.shape[0]}x{array.shape[1]} image is under {CELL_PIXELS // 4} px a side, "
                f"less than one {CELL_PIXELS} px grid cell at x4"
            )
        size = self.hparams.image_size
        lq = bicubic(torch.from_numpy(array).permute(2, 0, 1).float() / 255.0, (size, size))
        return self.restore(lq[None].to(self.device), [key], sampling)[0]

    def _processors(self, prompt_length: int, grid: tuple[int, int], s: Sampling) -> LogitsProcessorList:
        """CFG -> structure -> entropy (or fixed) top-k, in PURE's order (temperature comes after, from HF)."""
        vocab = self.lm.config.vocab_size
        processors = (
            [] if s.cfg == 1.0 else [ImageCFGLogitsProcessor(self.lm, self.layout, s.cfg, s.use_cache)]
        )
        processors.append(
            ImageStructureLogitsProcessor(
                self.layout, vocab, prompt_length, grid if s.force_grid else None, s.max_text_tokens
            )
        )
        if not s.greedy:
            processors.append(
                EntropyTopKLogitsProcessor(self.layout, s.k_min, s.k_max, s.text_top_k, s.fixed_k)
            )
        return LogitsProcessorList(processors)

    def _restore_one(
        self, lq: Tensor, lq_tokens: Tensor, lq_codes: Tensor, key: str, s: Sampling
    ) -> Restoration:
        prompt = self.prompt(lq_tokens)
        h, w = lq_codes.shape
        grid = self.layout.grid(h, w)
        config = GenerationConfig(
            do_sample=not s.greedy,
            temperature=None if s.greedy else s.temperature,
            top_k=None,
            top_p=None,
            max_new_tokens=s.max_text_tokens + self.layout.length(h, w) + 1,
            eos_token_id=self.layout.turn_end,
            pad_token_id=self.tokenizer.pad_token_id,
            use_cache=s.use_cache,
        )
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(derive_seed(self.hparams.seed, "restore", key))
            generated = self.lm.generate(
                input_ids=prompt[None],
                attention_mask=torch.ones_like(prompt)[None],
                generation_config=config,
                logits_processor=self._processors(len(prompt), grid, s),
            )[0, len(prompt) :]
        ids = generated.tolist()
        start = ids.index(self.layout.image_start) if self.layout.image_start in ids else len(ids)
        text = self.tokenizer.decode(ids[:start], skip_special_tokens=True).strip()
        try:
            read = self.layout.read(ids, grid=grid, fallback=lq_codes.cpu())
        except LayoutError as err:  # unreachable with a fallback; kept for a clear message
            raise LayoutError(f"restoring {key!r}: {err}") from err
        if read.problems:
            self.repairs += 1
            warnings.warn(
                f"PURE: the generated image of {key!r} broke the token layout: {'; '.join(read.problems)}",
                stacklevel=2,
            )
        image = (self.vq.decode_codes(read.codes[None].to(self.device))[0] + 1) / 2
        if image.shape[-2:] != lq.shape[-2:]:
            image = bicubic(image, tuple(lq.shape[-2:]))
        if s.color_fix:
            image = wavelet_color_fix(image[None], lq[None].to(image))[0]
        return Restoration(image.clamp(0, 1), text, read.codes, read.problems, len(ids))

    # --- evaluation -----------------------------------------------------------------------------------

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Teacher-forced loss; restores the first `val_restore` images of the validation for PSNR/SSIM."""
        out = self._loss(batch)
        size = len(batch["hq"])
        self.log_dict({f"val/{k}": v for k, v in out.items()}, batch_size=size, sync_dist=True)
        n = min(size, self.hparams.val_restore - self._val_restored)
        if n > 0:
            restored = self.restore(batch["lq"][:n], batch.get("__key__"))
            self.val_metrics.update(torch.stack([r.image for r in restored]), batch["hq"][:n])
            self.val_bicubic.update(batch["lq"][:n], batch["hq"][:n])
            self._val_restored += n

    def on_validation_epoch_end(self) -> None:
        """Log the restoration metrics of this validation (restored and the bicubic input)."""
        self._val_restored = 0
        for name, metric in (("", self.val_metrics), ("bicubic_", self.val_bicubic)):
            if int(metric.count) == 0:
                continue
            values = metric.compute()
            self.log_dict({f"val/{name}{k}": values[k].float() for k in ("psnr", "ssim", "vif")})
            metric.reset()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Restore every test image; PSNR/SSIM/VIF (Y) of the output, of the bicubic input and of the VQ's own HQ."""
        restored = self.restore(batch["lq"], batch.get("__key__"))
        images = torch.stack([r.image for r in restored])
        hq = batch["hq"]
        self.test_metrics.update(images, hq)
        self.test_bicubic.update(batch["lq"], hq)
        vq_hq = (self.vq.decode_codes(self.vq.encode(hq * 2 - 1)) + 1) / 2
        self.test_vq.update(vq_hq, hq)
        for i in range(len(hq)):
            if len(self._test_rows) < 8:
                self._test_rows.append((batch["lq"][i].cpu(), images[i].cpu(), vq_hq[i].cpu(), hq[i].cpu()))

    def on_test_epoch_end(self) -> None:
        """Log test metrics (`test/psnr`, `test/bicubic_psnr`, `test/vq_psnr`, ...) and write the sample sheet."""
        for name, metric in (("", self.test_metrics), ("bicubic_", self.test_bicubic), ("vq_", self.test_vq)):
            if int(metric.count):
                values = metric.compute()
                self.log_dict({f"test/{name}{k}": values[k].float() for k in ("psnr", "ssim", "vif")})
                metric.reset()
        self.log("test/layout_repairs", float(self.repairs))
        if self._test_rows and self._trainer is not None and self.trainer.is_global_zero:
            path = Path(self.trainer.default_root_dir) / "samples" / "test_restorations.png"
            save_sheet(self._test_rows, path)
        self._test_rows = []

    def sample_grid(self, batch: dict[str, Any], k: int) -> list[tuple[list[Tensor], Tensor, Tensor]]:
        """(LQ input, HQ target, restored) of the first k samples, in [-1, 1] (callbacks.images protocol)."""
        restored = self.restore(batch["lq"][:k], batch.get("__key__"))
        return [
            ([batch["lq"][i] * 2 - 1], batch["hq"][i] * 2 - 1, r.image * 2 - 1)
            for i, r in enumerate(restored)
        ]

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Restore a batch and write each output as `<predict_dir>/<key>.png`; returns (key, text, path)."""
        from PIL import Image

        keys = batch.get("__key__") or [f"{batch_idx}_{i}" for i in range(len(batch["lq"]))]
        out_dir = Path(self.hparams.predict_dir)
        if not out_dir.is_absolute() and self._trainer is not None:
            out_dir = Path(self.trainer.default_root_dir) / out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        for key, r in zip(keys, self.restore(batch["lq"], keys)):
            array = (r.image * 255).round().byte().permute(1, 2, 0).cpu().numpy()
            path = out_dir / f"{key}.png"
            Image.fromarray(array).save(path)
            rows.append({"key": key, "text": r.text, "path": str(path), "repairs": r.problems})
        return rows


def save_sheet(rows: list[tuple[Tensor, ...]], path: Path, gap: int = 2) -> Path:
    """A PNG with one row per sample of images [3, H, W] in [0, 1] side by side (LQ | restored | VQ(HQ) | HQ)."""
    from PIL import Image

    h, w = rows[0][0].shape[-2:]
    cols = len(rows[0])
    sheet = torch.ones(3, len(rows) * (h + gap) - gap, cols * (w + gap) - gap)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            sheet[:, r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = img.clamp(0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((sheet * 255).round().byte().permute(1, 2, 0).numpy()).save(path)
    return path
