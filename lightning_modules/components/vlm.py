"""Vision-language models as chat models: Qwen2.5-VL and Qwen3-VL from `pretrained` or a tiny `config`.

The reward models of docs/methods/jrm.md and docs/methods/spatialreward.md (and later the MetaQuery-style
connectors) read images and text through a VLM and either take hidden states (a reward head) or generate
text (a verdict). This file is the one place that builds such a VLM and turns conversations into its
inputs:

- `build_vlm(family, pretrained=... | config=..., tokenizer=..., image_processor=..., load=..., added_tokens=...)`
  returns a `VisionLanguageModel`: the transformers model (`Qwen2_5_VLForConditionalGeneration` or
  `Qwen3VLForConditionalGeneration`, through `components.backbones.build_backbone`), its tokenizer and
  its image processor. From `pretrained` (a hub id or a local folder in the hub's layout) all three load
  with `from_pretrained`. From `config`, the tokenizer is built offline (`components.tokenizers`, the
  Qwen kind with the Qwen2.5-VL specials), the image processor is the library's Qwen2-VL processor
  (`Qwen2VLImageProcessorPil`, no torchvision) with explicit sizes, and both are saved to a folder and
  loaded back with `from_pretrained`, as a hub processor folder is; the model is random-init with a tiny
  vision tower unless the config gives one. The library's combined `Qwen*VLProcessor` classes need a
  video processor (torchvision), so the image placeholders are expanded here, exactly as they expand
  them: one `<|image_pad|>` per merged patch, and `mm_token_type_ids` (1 on image tokens) for M-RoPE.
- A `Conversation` is (system prompt, images with an optional label before each, user text, optional
  assistant answer). `VisionLanguageModel.inputs(conversations, with_answer)` renders the Qwen chat
  format (`<|im_start|>role\\n...<|im_end|>`, identical for both families when the system prompt is
  explicit), tokenizes it, and with `with_answer` returns `labels` that are -100 everywhere except the
  answer's tokens and its closing `<|im_end|>` (the language-modelling targets of JRM's rationale and
  SpatialReward's verdict). `generate(conversations)` decodes greedily (left padding) and returns the
  answers as text.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lightning_modules.components.backbones import build_backbone
from lightning_modules.components.text import TINY_QWEN_VISION, _with_token_ids
from lightning_modules.components.tokenizers import IMAGE_PAD, load_tokenizer, tokenizer_cache_dir

VLMFamily = Literal["qwen2_5_vl", "qwen3_vl"]
VISION_START, VISION_END, IM_START, IM_END = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|im_start|>",
    "<|im_end|>",
)
IGNORE_INDEX = -100
TINY_VISION: dict[str, dict[str, Any]] = {
    "qwen2_5_vl": TINY_QWEN_VISION,
    "qwen3_vl": {
        "depth": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "deepstack_visual_indexes": [0],
        "num_position_embeddings": 64,
    },
}
PROCESSOR_VERSION = 1  # bump when the offline processor recipe changes (cached folders are rebuilt)


def model_class(family: str) -> type:
    """The transformers model class of a VLM family."""
    import transformers

    names = {
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
        "qwen3_vl": "Qwen3VLForConditionalGeneration",
    }
    if family not in names:
        raise ValueError(f"VLM family {family!r}: choose one of {', '.join(names)}")
    return getattr(transformers, names[family])


@dataclass
class Conversation:
    """One chat turn: the user's images (each [3, H, W] in [-1, 1], `labels[i]` written before image i) and
    text, a system prompt, and optionally the assistant's answer (trained on, or compared with)."""

    images: list[Tensor]
    text: str
    system: str = "You are a helpful assistant."
    labels: list[str] | None = None
    answer: str | None = None

    def prompt(self, image_tokens: list[int]) -> str:
        """The chat text up to the assistant's turn, `image_tokens[i]` `<|image_pad|>` for image i."""
        labels = self.labels or [""] * len(self.images)
        if len(labels) != len(self.images) or len(image_tokens) != len(self.images):
            raise ValueError(
                f"a conversation with {len(self.images)} images got {len(labels)} labels and "
                f"{len(image_tokens)} token counts"
            )
        pictures = "".join(
            f"{lab}{VISION_START}{IMAGE_PAD * n}{VISION_END}" for lab, n in zip(labels, image_tokens)
        )
        return (
            f"{IM_START}system\n{self.system}{IM_END}\n{IM_START}user\n{pictures}{self.text}{IM_END}\n"
            f"{IM_START}assistant\n"
        )


def to_uint8(image: Tensor) -> np.ndarray:
    """A [3, H, W] image in [-1, 1] -> H x W x 3 uint8 (what the image processors read, like a PIL image)."""
    return (
        ((image.detach().float().clamp(-1, 1) + 1) * 127.5)
        .round()
        .to(torch.uint8)
        .permute(1, 2, 0)
        .cpu()
        .numpy()
    )


class VisionLanguageModel(nn.Module):
    """A VLM with its tokenizer and image processor; `inputs` makes model inputs, `generate` answers.

    Args:
        model: The transformers `...ForConditionalGeneration` (its `.model` gives hidden states, `.lm_head` logits).
        tokenizer: Its tokenizer (with `<|image_pad|>`, `<|im_start|>`, `<|im_end|>`).
        image_processor: A Qwen2-VL-style image processor (`merge_size`, `patch_size`, min/max pixels).
        family: "qwen2_5_vl" or "qwen3_vl".
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: Any,
        family: str = "qwen2_5_vl",
    ) -> None:
        super().__init__()
        self.model, self.tokenizer, self.image_processor, self.family = (
            model,
            tokenizer,
            image_processor,
            family,
        )
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(IMAGE_PAD))
        self.merge = int(getattr(image_processor, "merge_size", 2))

    @property
    def device(self) -> torch.device:
        """The device of the model's weights."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's weights."""
        return next(self.model.parameters()).dtype

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the model, tokenizer and image processor in the hub's layout (`build_vlm(pretrained=folder)` reads it)."""
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)

    def vision(self, images: list[Tensor]) -> tuple[dict[str, Tensor], list[int]]:
        """(pixel_values + image_grid_thw, placeholder tokens per image) of a flat list of images."""
        if not images:
            return {}, []
        out = self.image_processor(images=[to_uint8(x) for x in images], return_tensors="pt")
        grid = out["image_grid_thw"]
        counts = (grid.prod(-1) // self.merge**2).tolist()
        return {"pixel_values": out["pixel_values"], "image_grid_thw": grid}, [int(c) for c in counts]

    def inputs(
        self, conversations: list[Conversation], with_answer: bool = False, padding_side: str = "right"
    ) -> dict[str, Tensor]:
        """Model inputs of a batch: input_ids, attention_mask, mm_token_type_ids, pixels; `labels` with answers.

        With `with_answer` each conversation's answer (required) follows its prompt, closed by `<|im_end|>`,
        and `labels` hold those tokens only (everything else -100).
        """
        flat = [image for conv in conversations for image in conv.images]
        vision, counts = self.vision(flat)
        texts, starts, pos = [], [], 0
        for conv in conversations:
            prompt = conv.prompt(counts[pos : pos + len(conv.images)])
            pos += len(conv.images)
            if with_answer:
                if conv.answer is None:
                    raise ValueError("with_answer=True needs every conversation's `answer`")
                texts.append(prompt + conv.answer + IM_END)
            else:
                texts.append(prompt)
            starts.append(len(prompt))
        self.tokenizer.padding_side = padding_side
        enc = self.tokenizer(
            texts,
            padding=True,
            return_tensors="pt",
            return_offsets_mapping=with_answer,
            add_special_tokens=False,
        )
        out = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
        out["mm_token_type_ids"] = (enc.input_ids == self.image_token_id).long()
        if with_answer:
            begin = enc.offset_mapping[..., 0]
            answer = (begin >= torch.tensor(starts)[:, None]) & enc.attention_mask.bool()
            out["labels"] = torch.where(answer, enc.input_ids, IGNORE_INDEX)
        out.update(vision)
        device = self.device
        moved = {k: v.to(device) for k, v in out.items()}
        if "pixel_values" in moved:
            moved["pixel_values"] = moved["pixel_values"].to(self.dtype)
        return moved

    def forward(self, inputs: dict[str, Tensor], logits: bool = False) -> Tensor:
        """The last hidden states [B, T, D] of a batch of `inputs` (with `logits`: the LM head's logits [B, T, V]).

        The call to use where the VLM may be an FSDP unit of its own (a frozen VLM: omnilab/fsdp.py): FSDP gathers
        a unit's weights in its forward, not in `hidden_states` / `logits` called on the wrapped module.
        """
        hidden = self.hidden_states(inputs)
        return self.logits(hidden) if logits else hidden

    def hidden_states(self, inputs: dict[str, Tensor]) -> Tensor:
        """The last hidden states [B, T, D] of the language model (the LM head is not run)."""
        args = {k: v for k, v in inputs.items() if k != "labels"}
        return self.model.model(**args).last_hidden_state

    def logits(self, hidden: Tensor) -> Tensor:
        """The LM head on hidden states."""
        return self.model.lm_head(hidden)

    @torch.no_grad()
    def generate(self, conversations: list[Conversation], max_new_tokens: int = 512) -> list[str]:
        """Greedy answers (text, special tokens removed) of a batch of conversations."""
        inputs = self.inputs(conversations, padding_side="left")
        length = inputs["input_ids"].shape[1]
        eos = [self.tokenizer.convert_tokens_to_ids(IM_END)]
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        out = self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(set(eos)),
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return self.tokenizer.batch_decode(out[:, length:], skip_special_tokens=True)


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy over the labelled tokens only (labels -100 elsewhere), in fp32.

    L = -(1 / |A|) Σ_{t ∈ A} log p(x_t | x_<t), A = the positions whose label is not -100; the logits at
    t - 1 predict the token at t.
    """
    shifted, targets = logits[:, :-1].float(), labels[:, 1:]
    if not bool((targets != IGNORE_INDEX).any()):
        raise ValueError("lm_loss: no labelled token in the batch (every label is -100)")
    return F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


# --- building --------------------------------------------------------------------------------------------


def processor_options(options: dict[str, Any], size: Any) -> dict[str, Any]:
    """Image-processor kwargs with `min_pixels` / `max_pixels` folded into `size` (the library's supported form).

    A Qwen2-VL-style processor bounds an image's pixel count by `size = {shortest_edge: min pixels, longest_edge:
    max pixels}`; setting `min_pixels` / `max_pixels` as attributes (or passing them per call) is deprecated in
    transformers v5. The bound not given keeps `size`'s (the loaded processor's, or the class default).
    ValueError when the bounds cross.
    """
    out = dict(options)
    lo, hi = out.pop("min_pixels", None), out.pop("max_pixels", None)
    if lo is None and hi is None:
        return out
    current = dict(out.pop("size", None) or {})
    for key in ("shortest_edge", "longest_edge"):
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        current.setdefault(key, value)
    current = {k: v for k, v in current.items() if k in ("shortest_edge", "longest_edge")}
    if lo is not None:
        current["shortest_edge"] = int(lo)
    if hi is not None:
        current["longest_edge"] = int(hi)
    if lo is not None and hi is None and current.get("longest_edge") is not None:
        current["longest_edge"] = max(current["longest_edge"], int(lo))
    if hi is not None and lo is None and current.get("shortest_edge") is not None:
        current["shortest_edge"] = min(current["shortest_edge"], int(hi))
    if current["shortest_edge"] > current["longest_edge"]:
        raise ValueError(
            f"image_processor: min_pixels={current['shortest_edge']} exceeds max_pixels={current['longest_edge']}"
        )
    out["size"] = current
    return out


def _offline_processor(
    family: str,
    tokenizer_spec: dict[str, Any] | None,
    processor_kwargs: dict[str, Any],
    added: list[str],
    extra: list[str],
) -> Path:
    """A folder holding the offline tokenizer (+ added tokens) and image processor, saved like a hub folder."""
    from transformers import Qwen2VLImageProcessorPil

    tokenizer = load_tokenizer(tokenizer_spec, "qwen")
    stamp = {
        "family": family,
        "version": PROCESSOR_VERSION,
        "tokenizer": {k: v for k, v in (tokenizer_spec or {}).items() if k != "out_dir"},
        "vocab": len(tokenizer),
        "processor": processor_kwargs,
        "added": added,
        "extra": extra,
    }
    digest = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]
    out = tokenizer_cache_dir().parent / "processors" / f"{family}-{digest}"
    marker = out / "omnilab_processor.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out
    if added:
        tokenizer.add_special_tokens({"additional_special_tokens": added}, replace_extra_special_tokens=False)
    if extra:
        tokenizer.add_tokens(extra)
    processor = Qwen2VLImageProcessorPil(**processor_options(processor_kwargs, Qwen2VLImageProcessorPil.size))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tokenizer.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "omnilab_processor.json").write_text(json.dumps(stamp))
    if out.exists():
        shutil.rmtree(out, ignore_errors=True)
    try:
        tmp.rename(out)
    except OSError:  # another process moved its identical build in first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_vlm(
    family: VLMFamily = "qwen2_5_vl",
    pretrained: str | None = None,
    config: dict[str, Any] | None = None,
    tokenizer: dict[str, Any] | None = None,
    image_processor: dict[str, Any] | None = None,
    load: dict[str, Any] | None = None,
    added_tokens: list[str] | None = None,
    extra_tokens: list[str] | None = None,
    adapter: str | None = None,
) -> VisionLanguageModel:
    """A `VisionLanguageModel` of `family` from `pretrained` (hub id / hub-layout folder) or a random-init `config`.

    `config`: the library config's kwargs (`text_config`, `vision_config`, ...); the vocabulary size and
    the special-token ids come from the tokenizer; a tiny vision tower (`TINY_VISION[family]`) is filled in
    under the given `vision_config` keys. `tokenizer`: a `load_tokenizer` spec for the offline tokenizer
    (ignored with `pretrained`). `image_processor`: kwargs of the image processor (`min_pixels`,
    `max_pixels`, and for `config` also `patch_size`, `merge_size`, ... defaulting to the vision tower's);
    with `pretrained` they override the loaded processor's settings (min/max pixels through its `size`,
    `processor_options`). `load`: extra `from_pretrained`
    kwargs (e.g. `dtype`). `added_tokens`: special tokens added to the tokenizer (e.g. `<|Reward|>`);
    `extra_tokens`: ordinary (decoded) tokens added to an offline tokenizer, e.g. the JSON scaffolding of a
    verdict, which a 512-token vocabulary would otherwise spell out byte by byte (`config` only). The
    model's embeddings grow to hold the added tokens. `adapter`: a peft LoRA adapter folder merged into
    the weights after loading (e.g. a judge released as an adapter over its base model).
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    model_cls = model_class(family)
    if (pretrained is None) == (config is None):
        raise ValueError(
            f"VLM {family!r}: give exactly one of `pretrained` (hub id or dir) and `config` (dict)"
        )
    added, extra = list(added_tokens or []), list(extra_tokens or [])
    if extra and pretrained is not None:
        raise ValueError(
            "extra_tokens extend an offline tokenizer (`config`); a pretrained one keeps its vocabulary"
        )
    processor_kwargs = dict(image_processor or {})
    if pretrained is not None:
        tok = AutoTokenizer.from_pretrained(pretrained)
        if added:
            tok.add_special_tokens({"additional_special_tokens": added}, replace_extra_special_tokens=False)
        processor = AutoImageProcessor.from_pretrained(pretrained)
        if processor_kwargs:  # loaded again with the overrides, min/max pixels folded into its `size`
            options = processor_options(processor_kwargs, processor.size)
            processor = AutoImageProcessor.from_pretrained(pretrained, **options)
        model = build_backbone(model_cls, pretrained=pretrained, **dict(load or {}))
    else:
        cfg = dict(config)
        vision = {**TINY_VISION[family], **cfg.pop("vision_config", {})}
        defaults = {
            "patch_size": vision["patch_size"],
            "merge_size": vision["spatial_merge_size"],
            "temporal_patch_size": vision["temporal_patch_size"],
        }
        folder = _offline_processor(family, tokenizer, {**defaults, **processor_kwargs}, added, extra)
        tok = AutoTokenizer.from_pretrained(folder)
        processor = AutoImageProcessor.from_pretrained(folder)
        text_config = _with_token_ids(dict(cfg.pop("text_config", {})), tok)
        text_config.setdefault("bos_token_id", None)
        vision.setdefault("out_hidden_size", text_config.get("hidden_size", 32))
        ids = {
            f"{name}_token_id": tok.convert_tokens_to_ids(f"<|{token}|>")
            for name, token in (
                ("image", "image_pad"),
                ("video", "video_pad"),
                ("vision_start", "vision_start"),
                ("vision_end", "vision_end"),
            )
        }
        model = build_backbone(
            model_cls, config={"text_config": text_config, "vision_config": vision, **ids, **cfg}
        )
    embeddings = model.get_input_embeddings().weight.shape[0]
    if len(tok) > embeddings:
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return VisionLanguageModel(model, tok, processor, family)
