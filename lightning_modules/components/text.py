"""Text and VLM conditioning for the flow-matching editors, and tokenizers built offline.

Three families, each from `pretrained` (a diffusers pipeline folder or hub id; the encoders and
tokenizers sit in its `text_encoder*`/`tokenizer*` subfolders) or from a random-init `config`:

- `sd3` (UniPic 2.0 §Model, UniPic2-SD3.5M-Kontext; diffusers `StableDiffusion3Pipeline.encode_prompt`):
  each CLIP (with projection) gives its penultimate hidden states and its projected pooled output;
  the CLIP hidden states are concatenated on features, zero-padded to the T5 width and concatenated
  on the sequence with the T5 states; pooled = concat of the CLIP pooled outputs. Every token is
  attended (SD3 uses no text mask). The tiny variant may have one CLIP and one T5.
- `flux` (FLUX.1 Kontext; `FluxPipeline.encode_prompt`): pooled = the CLIP pooler output,
  hidden = the T5 states; no text mask.
- `qwen` (Qwen-Image-Edit / UniPic 3.0 §Method / Qwen-MICo, docs/methods/uniref.md;
  `QwenImageEditPlusPipeline._get_qwen_prompt_embeds`): Qwen2.5-VL reads the chat template with one
  `Picture k: <|vision_start|><|image_pad|><|vision_end|>` per reference before the instruction; the
  last hidden states of the valid tokens, less the first `drop_tokens` (64 for the real template,
  i.e. the system prompt), are the text; the mask marks the valid ones. With a vision tower the
  processor expands `<|image_pad|>` to the reference's patches (the references scaled by 28/32, the
  UniPic-3 rule); without one the template stays text only. The pipeline cuts nothing: the picture
  tokens (thousands at a 2048² budget, and they come before the instruction) are always kept, and
  `max_sequence_length` bounds only the other tokens, so the instruction is never dropped.

Each encoder is frozen by its user and returns `TextConditioning(hidden [B,T,D], mask [B,T] bool,
pooled [B,P] | None)`.

Random-init encoders get tokenizers built offline (`lightning_modules/components/tokenizers.py`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lightning_modules.components.backbones import build_backbone
from lightning_modules.components.packed_dit import TextConditioning
from lightning_modules.components.tokenizers import (
    IMAGE_PAD,
    PICTURE_TEMPLATE,
    QWEN_EDIT_TEMPLATE,
    load_tokenizer,
)

# --- text encoders -------------------------------------------------------------------------------------


class TextEncoder(nn.Module):
    """Prompts (and, for a VLM, each prompt's reference images) -> `TextConditioning`."""

    def forward(self, prompts: list[str], images: list[list[Tensor]] | None = None) -> TextConditioning:
        """Encode a batch of prompts; `images[i]` are prompt i's references in [-1, 1] (a VLM reads them)."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """The device of the encoder's weights."""
        return next(self.parameters()).device


def _tokenize(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], length: int, device: torch.device
) -> Tensor:
    """Ids padded (and truncated) to `length`, as the diffusers pipelines tokenize ("max_length")."""
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return ids.input_ids.to(device)


class SD3TextEncoder(TextEncoder):
    """SD3 conditioning: [CLIP penultimate states (features concatenated, padded to T5 width) ; T5 states].

    Args:
        clips: The CLIP text encoders with projection (SD3: CLIP-L, CLIP-G).
        clip_tokenizers: Their tokenizers (padded to `model_max_length`, 77).
        t5: The T5 encoder, or None (then zeros of width `t5_width`, as the pipeline does without T5).
        t5_tokenizer: Its tokenizer.
        max_sequence_length: T5 tokens (SD3 default 256).
        clip_skip: Take CLIP hidden state -(clip_skip + 2) (None: the penultimate).
        t5_width: Width of the zero T5 states when `t5` is None (SD3's joint_attention_dim, 4096).
    """

    def __init__(
        self,
        clips: list[nn.Module],
        clip_tokenizers: list[PreTrainedTokenizerBase],
        t5: nn.Module | None,
        t5_tokenizer: PreTrainedTokenizerBase | None,
        max_sequence_length: int = 256,
        clip_skip: int | None = None,
        t5_width: int = 4096,
    ) -> None:
        super().__init__()
        self.clips, self.clip_tokenizers = nn.ModuleList(clips), list(clip_tokenizers)
        self.t5, self.t5_tokenizer = t5, t5_tokenizer
        self.max_sequence_length, self.clip_skip, self.t5_width = max_sequence_length, clip_skip, t5_width

    def forward(self, prompts: list[str], images: list[list[Tensor]] | None = None) -> TextConditioning:
        """`StableDiffusion3Pipeline.encode_prompt` for one prompt per sample (prompt_2 = prompt_3 = prompt)."""
        device, hidden, pooled = self.device, [], []
        for clip, tokenizer in zip(self.clips, self.clip_tokenizers):
            out = clip(
                _tokenize(tokenizer, prompts, tokenizer.model_max_length, device), output_hidden_states=True
            )
            pooled.append(out[0])  # text_embeds: the projected pooled output
            hidden.append(out.hidden_states[-((self.clip_skip or 0) + 2)])
        clip_hidden = torch.cat(hidden, dim=-1)
        if self.t5 is None:
            t5 = clip_hidden.new_zeros(len(prompts), self.max_sequence_length, self.t5_width)
        else:
            t5 = self.t5(_tokenize(self.t5_tokenizer, prompts, self.max_sequence_length, device))[0]
        clip_hidden = F.pad(clip_hidden, (0, t5.shape[-1] - clip_hidden.shape[-1])).to(t5.dtype)
        states = torch.cat([clip_hidden, t5], dim=-2)
        mask = torch.ones(states.shape[:2], dtype=torch.bool, device=device)  # SD3 attends every token
        return TextConditioning(hidden=states, mask=mask, pooled=torch.cat(pooled, dim=-1))


class FluxTextEncoder(TextEncoder):
    """FLUX conditioning: pooled = the CLIP pooler output, hidden = the T5 states (`FluxPipeline.encode_prompt`).

    Args:
        clip: The CLIP text encoder (no projection: FLUX uses `pooler_output`).
        clip_tokenizer: Its tokenizer (padded to `model_max_length`, 77).
        t5: The T5 encoder.
        t5_tokenizer: Its tokenizer.
        max_sequence_length: T5 tokens (FLUX default 512).
    """

    def __init__(
        self,
        clip: nn.Module,
        clip_tokenizer: PreTrainedTokenizerBase,
        t5: nn.Module,
        t5_tokenizer: PreTrainedTokenizerBase,
        max_sequence_length: int = 512,
    ) -> None:
        super().__init__()
        self.clip, self.clip_tokenizer, self.t5, self.t5_tokenizer = clip, clip_tokenizer, t5, t5_tokenizer
        self.max_sequence_length = max_sequence_length

    def forward(self, prompts: list[str], images: list[list[Tensor]] | None = None) -> TextConditioning:
        """Pooled CLIP, T5 hidden states; every token attended (FLUX passes no text mask)."""
        device = self.device
        clip_ids = _tokenize(self.clip_tokenizer, prompts, self.clip_tokenizer.model_max_length, device)
        pooled = self.clip(clip_ids, output_hidden_states=False).pooler_output
        states = self.t5(_tokenize(self.t5_tokenizer, prompts, self.max_sequence_length, device))[0]
        mask = torch.ones(states.shape[:2], dtype=torch.bool, device=device)
        return TextConditioning(hidden=states, mask=mask, pooled=pooled.to(states.dtype))


class QwenVLTextEncoder(TextEncoder):
    """Qwen-Image-Edit conditioning: Qwen2.5-VL's last hidden states over the edit template, prefix dropped.

    Args:
        model: A `Qwen2_5_VLForConditionalGeneration` (its inner `.model` runs; the LM head is unused).
        tokenizer: Its tokenizer (the specials `<|vision_start|>`, `<|image_pad|>`, `<|vision_end|>`).
        image_processor: A Qwen2-VL image processor, or None to feed the template as text only.
        template: The chat template with one `{}` for the pictures and the instruction.
        picture_template: One reference's text, `{}` = its 1-based index.
        drop_tokens: Hidden states dropped from the start (the template's prefix); None: count the
            tokens of the template before `{}` (64 for Qwen-Image-Edit's template and tokenizer).
        vlm_scale: The references' side scale for the VLM (UniPic-3: 28/32, one VL token per 2x2 DiT tokens).
        max_sequence_length: Text tokens kept after the drop, not counting the pictures' `<|image_pad|>`
            tokens, which are all kept (the Edit-Plus pipeline keeps every token and allows at most 1024).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: Any | None = None,
        template: str = QWEN_EDIT_TEMPLATE,
        picture_template: str = PICTURE_TEMPLATE,
        drop_tokens: int | None = None,
        vlm_scale: float = 28 / 32,
        max_sequence_length: int = 1024,
    ) -> None:
        super().__init__()
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.template, self.picture_template, self.vlm_scale = template, picture_template, vlm_scale
        prefix = template.split("{}")[0]
        self.drop_tokens = len(tokenizer(prefix).input_ids) if drop_tokens is None else drop_tokens
        self.max_sequence_length = max_sequence_length

    def prompt_text(self, prompt: str, n_images: int) -> str:
        """The template filled with `Picture k: <|vision_start|><|image_pad|><|vision_end|>` per reference."""
        pictures = "".join(self.picture_template.format(k + 1) for k in range(n_images))
        return self.template.format(pictures + prompt)

    def _vision_inputs(self, images: list[Tensor]) -> dict[str, Tensor]:
        """Pixel patches and grids of the references, each scaled by `vlm_scale` (as uint8, like PIL input)."""
        pixels = []
        for image in images:
            h, w = (max(1, round(s * self.vlm_scale)) for s in image.shape[-2:])
            resized = F.interpolate(image[None].float(), size=(h, w), mode="bilinear", antialias=True)[0]
            pixels.append(((resized.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
        return self.image_processor(images=pixels, return_tensors="pt")

    def _kept(self, ids: Tensor, pad_id: int) -> Tensor:
        """bool [T]: every picture token, and the first `max_sequence_length` of the others (text, template)."""
        text = ids != pad_id
        return ~text | (text & (text.cumsum(0) <= self.max_sequence_length))

    def forward(self, prompts: list[str], images: list[list[Tensor]] | None = None) -> TextConditioning:
        """`QwenImageEditPlusPipeline._get_qwen_prompt_embeds` for a batch (any number of references each)."""
        device = self.device
        images = images if images is not None else [[] for _ in prompts]
        texts = [self.prompt_text(p, len(refs)) for p, refs in zip(prompts, images)]
        vision: dict[str, Tensor] = {}
        flat = [image for refs in images for image in refs]
        if self.image_processor is not None and flat:
            vision = dict(self._vision_inputs(flat))
            merge = self.image_processor.merge_size**2
            counts = iter((vision["image_grid_thw"].prod(-1) // merge).tolist())
            # as Qwen2VLProcessor: each <|image_pad|> becomes one pad per merged patch of its image
            texts = [re.sub(re.escape(IMAGE_PAD), lambda _: IMAGE_PAD * next(counts), t) for t in texts]
            vision = {
                "pixel_values": vision["pixel_values"].to(device, self.model.dtype),
                "image_grid_thw": vision["image_grid_thw"].to(device),
            }
        inputs = self.tokenizer(texts, padding=True, return_tensors="pt").to(device)
        out = self.model.model(
            input_ids=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            output_hidden_states=True,
            **vision,
        )
        states, valid = out.hidden_states[-1], inputs.attention_mask.bool()
        pad_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        kept = [
            s[m][self.drop_tokens :][self._kept(ids[m][self.drop_tokens :], pad_id)]
            for s, m, ids in zip(states, valid, inputs.input_ids)
        ]
        length = max(1, max(len(k) for k in kept))
        hidden = states.new_zeros(len(kept), length, states.shape[-1])
        mask = torch.zeros(len(kept), length, dtype=torch.bool, device=device)
        for i, k in enumerate(kept):
            hidden[i, : len(k)], mask[i, : len(k)] = k, True
        return TextConditioning(hidden=hidden, mask=mask, pooled=None)


# --- building them from a spec -------------------------------------------------------------------------

TextFamily = Literal["sd3", "flux", "qwen"]


def _with_token_ids(config: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """A text config with vocab_size and pad/bos/eos ids taken from `tokenizer` where the config leaves them out."""
    filled = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if tokenizer.bos_token_id is not None:
        filled["bos_token_id"] = tokenizer.bos_token_id
    if "decoder_start_token_id" in config or "d_model" in config:  # T5
        filled["decoder_start_token_id"] = tokenizer.pad_token_id
    return {**filled, **config}


def _sub(spec: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    """The tokenizer spec of one kind: `spec[kind]` when given per kind (`{clip: ..., t5: ...}`), else `spec`."""
    if spec and spec.keys() & {"clip", "t5", "qwen"}:
        return spec.get(kind)
    return spec


def build_text_encoder(
    family: TextFamily,
    pretrained: str | None = None,
    config: dict[str, Any] | None = None,
    tokenizer: dict[str, Any] | None = None,
    load: dict[str, Any] | None = None,
    **options: Any,
) -> TextEncoder:
    """The text encoder of a family, from a pipeline folder (`pretrained`) or random-init `config`.

    `config` per family: sd3 `{clip: [CLIPTextConfig kwargs, ...], t5: T5Config kwargs | None}`;
    flux `{clip: CLIPTextConfig kwargs, t5: T5Config kwargs}`; qwen `Qwen2_5_VLConfig` kwargs
    (`text_config`, `vision_config`; a tiny vision tower is filled in when absent) plus optional
    `image_processor` kwargs. Vocabulary sizes and special-token ids come from the tokenizers
    (`tokenizer`: a `load_tokenizer` spec, shared or per kind `{clip: ..., t5: ..., qwen: ...}`).
    `load`: extra `from_pretrained` kwargs (e.g. `dtype`). `options` go to the encoder class
    (`max_sequence_length`, `clip_skip`, `drop_tokens`, `template`, `vlm_scale`, `vision`).
    The encoder is returned in eval mode (T5's dropout off), as its users keep it frozen.
    """
    from transformers import (
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5EncoderModel,
    )

    if (pretrained is None) == (config is None):
        raise ValueError(f"text encoder {family!r}: give exactly one of `pretrained` and `config`")
    load = dict(load or {})
    config = dict(config or {})

    def model(cls: type, folder: str, cfg: dict[str, Any] | None, tok: PreTrainedTokenizerBase) -> nn.Module:
        if pretrained is not None:
            return build_backbone(cls, pretrained=pretrained, subfolder=folder, **load)
        return build_backbone(cls, config=_with_token_ids(cfg, tok))  # keys checked against the config class

    if family == "sd3":
        n_clips = 2 if pretrained is not None else len(config.get("clip") or [])
        folders = ["", "_2"][:n_clips]
        clip_toks = [
            load_tokenizer(_sub(tokenizer, "clip"), "clip", pretrained, f"tokenizer{f}") for f in folders
        ]
        clip_cfgs = config.get("clip") or [None] * n_clips
        clips = [
            model(CLIPTextModelWithProjection, f"text_encoder{f}", c, t)
            for f, c, t in zip(folders, clip_cfgs, clip_toks)
        ]
        t5, t5_tok = None, None
        if pretrained is not None or config.get("t5") is not None:
            t5_tok = load_tokenizer(_sub(tokenizer, "t5"), "t5", pretrained, "tokenizer_3")
            t5 = model(T5EncoderModel, "text_encoder_3", config.get("t5"), t5_tok)
        return SD3TextEncoder(clips, clip_toks, t5, t5_tok, **options).eval()
    if family == "flux":
        clip_tok = load_tokenizer(_sub(tokenizer, "clip"), "clip", pretrained, "tokenizer")
        t5_tok = load_tokenizer(_sub(tokenizer, "t5"), "t5", pretrained, "tokenizer_2")
        clip = model(CLIPTextModel, "text_encoder", config.get("clip"), clip_tok)
        t5 = model(T5EncoderModel, "text_encoder_2", config.get("t5"), t5_tok)
        return FluxTextEncoder(clip, clip_tok, t5, t5_tok, **options).eval()
    if family == "qwen":
        return _build_qwen(pretrained, config, tokenizer, load, options).eval()
    raise ValueError(f"text family {family!r}: choose sd3, flux or qwen")


TINY_QWEN_VISION = {
    "depth": 1,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 56,
    "fullatt_block_indexes": [0],
}


def _build_qwen(
    pretrained: str | None,
    config: dict[str, Any],
    tokenizer: dict[str, Any] | None,
    load: dict[str, Any],
    options: dict[str, Any],
) -> QwenVLTextEncoder:
    """Qwen2.5-VL, its tokenizer and (unless `vision: false`) its image processor."""
    from transformers import (
        AutoImageProcessor,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    options = dict(options)
    vision = options.pop("vision", True)
    tok = load_tokenizer(_sub(tokenizer, "qwen"), "qwen", pretrained, "tokenizer")
    if pretrained is not None:
        model = build_backbone(
            Qwen2_5_VLForConditionalGeneration, pretrained=pretrained, subfolder="text_encoder", **load
        )
        processor = AutoImageProcessor.from_pretrained(pretrained, subfolder="processor") if vision else None
    else:
        cfg = dict(config)
        processor_kwargs = cfg.pop("image_processor", {})
        text_config = _with_token_ids(dict(cfg.pop("text_config", {})), tok)
        text_config.setdefault("bos_token_id", None)
        vision_config = {
            **TINY_QWEN_VISION,
            "out_hidden_size": text_config.get("hidden_size", 32),
            **cfg.pop("vision_config", {}),
        }
        specials = {
            "image": "image_pad",
            "video": "video_pad",
            "vision_start": "vision_start",
            "vision_end": "vision_end",
        }
        ids = {
            f"{name}_token_id": tok.convert_tokens_to_ids(f"<|{token}|>") for name, token in specials.items()
        }
        model = build_backbone(  # keys checked against Qwen2_5_VLConfig and its text/vision configs
            Qwen2_5_VLForConditionalGeneration,
            config={"text_config": text_config, "vision_config": vision_config, **ids, **cfg},
        )
        defaults = {
            "patch_size": vision_config["patch_size"],
            "merge_size": vision_config["spatial_merge_size"],
            "temporal_patch_size": vision_config["temporal_patch_size"],
        }
        processor = Qwen2VLImageProcessorPil(**{**defaults, **processor_kwargs}) if vision else None
    return QwenVLTextEncoder(model, tok, processor, **options)
