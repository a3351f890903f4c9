"""Judges behind one interface: the HTTP chat client, and a VLM judge run in-process through transformers.

Every judge answers `complete_many(conversations) -> [ChatResult | ChatError]` (`rewards.viescore.Judge`),
so the VIEScore / MICo prompting (rewards/viescore.py) runs unchanged on any of them:
- `omnilab.chat.ChatClient`: any OpenAI-compatible server (a hosted model such as GPT-4.1 / gpt-5.4, or an
  open VLM served by vLLM / SGLang). This is also where a served VLM plugs in: a judge too large for the
  benchmark's GPU runs as its own server (the reward server of `omnilab serve reward`, once it speaks the
  chat-completions route, or any OpenAI-compatible one) and the benchmark points `base_url` at it.
- `LocalVLMJudge`: a Qwen2.5-VL checkpoint (`pretrained`: hub id or folder, e.g. Qwen/Qwen2.5-VL-7B-Instruct)
  or a random-init one (`config`: tiny, for tests; its tokenizer is built offline by
  lightning_modules/components/tokenizers.py and the model by `components.text.build_text_encoder`). The
  conversation goes through the tokenizer's chat template (one `<|vision_start|><|image_pad|><|vision_end|>`
  per image, in the order of the message's parts), each image pad is expanded to the image's merged
  patches as `Qwen2VLProcessor` does, and the answer is decoded greedily (temperature 0). Answers are cached
  on disk like the HTTP client's, keyed by the judge's identity and the full request.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from omnilab.chat import (
    ChatError,
    ChatResult,
    Message,
    ResponseCache,
    decode_image,
    message_parts,
    request_key,
)

IMAGE_PAD = "<|image_pad|>"


class LocalVLMJudge:
    """A Qwen2.5-VL judge in this process, answering chat conversations greedily.

    Args:
        pretrained: Hub id or folder of a Qwen2.5-VL model (with its tokenizer and processor), or None.
        config: Random-init `Qwen2_5_VLConfig` kwargs (`text_config`, `vision_config`, `image_processor`), or None.
        tokenizer: The offline tokenizer spec for `config` (`components.tokenizers.load_tokenizer`).
        max_new_tokens: The answer's token limit.
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
        dtype: The weights' dtype for `pretrained` ("bfloat16", "float32", ...).
        max_pixels: Largest image area the processor keeps (Qwen's `max_pixels`; None: the processor's).
        cache_dir: Folder of the answer cache (None: no cache).
        revision: A tag added to the cache key (change it when the weights change under the same name).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        tokenizer: dict[str, Any] | None = None,
        max_new_tokens: int = 128,
        device: str = "auto",
        dtype: str = "bfloat16",
        max_pixels: int | None = None,
        cache_dir: str | Path | None = None,
        revision: str = "",
    ) -> None:
        if (pretrained is None) == (config is None):
            raise ValueError("LocalVLMJudge: give exactly one of `pretrained` and `config`")
        self.pretrained, self.config, self.tokenizer_spec = pretrained, config, tokenizer
        self.max_new_tokens, self.max_pixels, self.dtype = int(max_new_tokens), max_pixels, dtype
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(auto if device == "auto" else device)
        self.cache = ResponseCache(cache_dir) if cache_dir is not None else None
        spec = pretrained if pretrained is not None else json.dumps(config, sort_keys=True)
        self.model_name = pretrained or "qwen2.5-vl-config-" + hashlib.sha256(spec.encode()).hexdigest()[:12]
        self.identity = f"local:{self.model_name}:{revision}"
        self.model: Any = None
        self.tokenizer: Any = None
        self.processor: Any = None
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "calls": 0, "cache_hits": 0, "failures": 0, "retries": 0}

    @property
    def model_id(self) -> str:
        """The model name recorded with results."""
        return self.model_name

    def load(self) -> LocalVLMJudge:
        """Build (or load) the model, tokenizer and image processor once; returns self."""
        if self.model is not None:
            return self
        if self.pretrained is not None:
            from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

            from lightning_modules.components.backbones import build_backbone

            model = build_backbone(
                Qwen2_5_VLForConditionalGeneration,
                pretrained=self.pretrained,
                dtype=getattr(torch, self.dtype),
            )
            self.tokenizer = AutoTokenizer.from_pretrained(self.pretrained)
            self.processor = AutoImageProcessor.from_pretrained(self.pretrained)
        else:
            from lightning_modules.components.text import build_text_encoder

            encoder = build_text_encoder("qwen", config=self.config, tokenizer=self.tokenizer_spec)
            model, self.tokenizer, self.processor = encoder.model, encoder.tokenizer, encoder.image_processor
        if self.max_pixels is not None:  # Qwen2-VL's processors keep max_pixels as size["longest_edge"]
            self.processor.size = {**dict(self.processor.size or {}), "longest_edge": self.max_pixels}
        self.model = model.to(self.device).eval()
        return self

    # --- encoding ---------------------------------------------------------------------------------------

    def encode(self, messages: list[Message], answer: str | None = None) -> dict[str, Tensor]:
        """Model inputs of a conversation (chat template, expanded image pads, pixel patches), on the device.

        With `answer`, its tokens (and the end-of-turn token) are appended and `labels` marks them (the
        prompt is -100): the teacher-forced input of training a judge on answers.
        """
        self.load()
        chat, images = [], []
        for message in messages:
            _, urls = message_parts(message)
            parts: list[dict[str, Any]] = []
            content = message.get("content")
            for part in content if isinstance(content, list) else [{"type": "text", "text": content}]:
                if part.get("type") == "image_url":
                    parts.append({"type": "image"})
                else:
                    parts.append({"type": "text", "text": part.get("text", "")})
            chat.append({"role": message.get("role", "user"), "content": parts})
            images.extend(decode_image(u) for u in urls)
        text = self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        vision: dict[str, Tensor] = {}
        if images:
            pixels = [torch.from_numpy(np.array(img)).permute(2, 0, 1) for img in images]
            vision = dict(self.processor(images=pixels, return_tensors="pt"))
            merge = self.processor.merge_size**2
            counts = iter((vision["image_grid_thw"].prod(-1) // merge).tolist())
            text = re.sub(re.escape(IMAGE_PAD), lambda _: IMAGE_PAD * next(counts), text)
            vision = {
                "pixel_values": vision["pixel_values"].to(self.device, self.model.dtype),
                "image_grid_thw": vision["image_grid_thw"].to(self.device),
            }
        ids = self.tokenizer(text, return_tensors="pt").input_ids
        inputs = {"input_ids": ids}
        if answer is not None:
            tail = self.tokenizer(answer + self.tokenizer.eos_token, return_tensors="pt").input_ids
            inputs["labels"] = torch.cat([torch.full_like(ids, -100), tail], 1)
            inputs["input_ids"] = torch.cat([ids, tail], 1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        return {**{k: v.to(self.device) for k, v in inputs.items()}, **vision}

    @torch.no_grad()
    def generate(self, messages: list[Message]) -> str:
        """The greedy answer to one conversation (no cache)."""
        inputs = self.encode(messages)
        out = self.model.generate(
            **inputs,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    # --- the judge interface ----------------------------------------------------------------------------

    def complete(self, messages: list[Message]) -> ChatResult:
        """The answer to one conversation, from the cache or the model; ChatError("judge_error") if generation fails."""
        key = request_key(self.identity, {"messages": messages, "max_new_tokens": self.max_new_tokens})
        with self._lock:
            self.stats["requests"] += 1
        if self.cache is not None and (text := self.cache.get(key)) is not None:
            with self._lock:
                self.stats["cache_hits"] += 1
            return ChatResult(text, cached=True, attempts=0)
        with self._lock:  # one generation at a time on this model
            self.stats["calls"] += 1
            try:
                text = self.generate(messages)
            except (RuntimeError, ValueError) as err:
                self.stats["failures"] += 1
                raise ChatError(f"{self.model_name}: generation failed: {type(err).__name__}: {err}") from err
        if self.cache is not None:
            self.cache.put(key, text, self.model_name)
        return ChatResult(text, cached=False, attempts=1)

    def complete_many(self, requests: Sequence[list[Message]]) -> list[ChatResult | ChatError]:
        """Answers to many conversations, in order; a failure is returned, not raised."""
        out: list[ChatResult | ChatError] = []
        for messages in requests:
            try:
                out.append(self.complete(messages))
            except ChatError as err:
                out.append(err)
        return out
