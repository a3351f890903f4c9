"""Sampling an image token by token with transformers' `generate`: PURE's logits processors.

PURE (arXiv 2503.11073, §3.3 "Entropy-based Top-k sampling"; released `pure/inference_solver.py`) runs three
processors before transformers' temperature warper, in this order:

1. `ImageCFGLogitsProcessor`: classifier-free guidance on image tokens, `s (cond - uncond) + uncond` (PURE s = 0.8).
   Once an image has started and its two grid tokens are out, an unconditional branch sees only the tokens from
   that image's start on (no instruction, no low-quality image), with its own KV cache.
2. `ImageStructureLogitsProcessor`: inside an image only codes are allowed, except that the row-end token is forced
   after every `w` codes and the end token after the last row. This implementation also keeps the layout whole
   outside the codes (PURE leaves these to the model): the grid tokens are forced to the input's grid (or limited to
   grid tokens), text positions cannot emit codes or structure tokens, an image starts after `max_text_tokens`
   text tokens at the latest, and the turn ends (the eos) right after the generated image.
3. `EntropyTopKLogitsProcessor`: inside an image, k = round(k_min + (k_max - k_min) * sigmoid(H - 5)) with H the
   Shannon entropy (nats) of the current scores, clipped to [0, 10] and k to [k_min, k_max] (PURE 1 and 2000), then
   top-k. Because the structure processor has already set every non-code token to -inf, H is the entropy over the
   image codes, and because it runs before the temperature warper, before temperature. Text positions keep the
   `text_top_k` best (PURE 1: greedy text).

Every processor works out its state from `input_ids` at each step (where the current image starts, how many tokens it
has), so it needs no reset between calls and no bookkeeping across steps; only the CFG branch keeps a cache.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache, LogitsProcessor

from lightning_modules.components.image_tokens import ImageTokenLayout


def entropy_top_k(entropy: Tensor, k_min: int = 1, k_max: int = 2000) -> Tensor:
    """k = round(k_min + (k_max - k_min) sigmoid(clip(H, 0, 10) - 5)), clipped to [k_min, k_max] (PURE's rule).

    Rounding is half to even, as Python's round of the released code. H = 0 -> 14, 5 -> 1000, 9.70 -> 1982.
    """
    h = entropy.double().clamp(0.0, 10.0)
    k = torch.round(k_min + (k_max - k_min) * torch.sigmoid(h - 5.0))
    return k.clamp(k_min, k_max).long()


def shannon_entropy(scores: Tensor) -> Tensor:
    """H = -sum p log(p + 1e-10) in nats, p = softmax(scores) over the last axis (tokens at -inf have p = 0)."""
    p = torch.softmax(scores.float(), dim=-1)
    return -(p * torch.log(p + 1e-10)).sum(-1)


def keep_top_k(scores: Tensor, k: Tensor, filter_value: float = -math.inf) -> Tensor:
    """Set every score below each row's k-th largest to `filter_value` (ties with the k-th are kept, as HF's top-k)."""
    kmax = int(k.max())
    top = torch.topk(scores, min(kmax, scores.shape[-1]), dim=-1).values
    kth = top.gather(-1, (k.clamp(max=top.shape[-1]) - 1)[:, None])
    return scores.masked_fill(scores < kth, filter_value)


class ImageState:
    """Per row of `input_ids` [B, L]: inside an image or not, and tokens since that image's start token."""

    def __init__(self, input_ids: Tensor, layout: ImageTokenLayout) -> None:
        starts = (input_ids == layout.image_start).sum(-1)
        ends = (input_ids == layout.image_end).sum(-1)
        self.inside = starts > ends
        length = input_ids.shape[-1]
        is_start = (input_ids == layout.image_start).long()
        last_start = length - 1 - is_start.flip(-1).argmax(-1)
        self.last_start = torch.where(starts > 0, last_start, torch.full_like(last_start, -1))
        self.since_start = length - 1 - self.last_start  # tokens after the start, grid tokens included


class EntropyTopKLogitsProcessor(LogitsProcessor):
    """PURE's entropy-based top-k inside images (or a `fixed_k`, the baseline), `text_top_k` outside.

    Args:
        layout: The vocabulary's image layout (which token starts and ends an image).
        k_min, k_max: The bounds of k (PURE 1 and 2000).
        text_top_k: Candidates kept at text positions (PURE 1, greedy text).
        fixed_k: Use this k at every image position instead of the entropy rule (the fixed top-k baseline).
    """

    def __init__(
        self,
        layout: ImageTokenLayout,
        k_min: int = 1,
        k_max: int = 2000,
        text_top_k: int = 1,
        fixed_k: int | None = None,
    ) -> None:
        if not 1 <= k_min <= k_max:
            raise ValueError(f"need 1 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
        if text_top_k < 1 or (fixed_k is not None and fixed_k < 1):
            raise ValueError(f"text_top_k ({text_top_k}) and fixed_k ({fixed_k}) must be >= 1")
        self.layout, self.k_min, self.k_max = layout, k_min, k_max
        self.text_top_k, self.fixed_k = text_top_k, fixed_k
        self.last_k: Tensor | None = None  # the k of the last call, per row (for diagnostics)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        """Top-k with k per row: the entropy rule (or fixed_k) inside an image, text_top_k outside."""
        inside = ImageState(input_ids, self.layout).inside
        if self.fixed_k is not None:
            image_k = torch.full_like(inside, self.fixed_k, dtype=torch.long)
        else:
            image_k = entropy_top_k(shannon_entropy(scores), self.k_min, self.k_max)
        k = torch.where(inside, image_k, torch.full_like(image_k, self.text_top_k))
        self.last_k = k
        return keep_top_k(scores, k)


class ImageStructureLogitsProcessor(LogitsProcessor):
    """The image layout enforced while sampling (module docstring, item 2).

    Args:
        layout: The vocabulary's image layout.
        vocab_size: Size of the scores' last axis.
        prompt_length: Tokens of the prompt (the generated image is the first one after it).
        grid: (gh, gw) to force for the generated image's grid tokens; None allows any grid token >= 1.
        max_text_tokens: Generated text tokens after which the image start is forced.
        end_turn: Force the turn end (the eos) right after the generated image.
    """

    def __init__(
        self,
        layout: ImageTokenLayout,
        vocab_size: int,
        prompt_length: int,
        grid: tuple[int, int] | None = None,
        max_text_tokens: int | None = None,
        end_turn: bool = True,
    ) -> None:
        self.layout, self.prompt_length, self.grid = layout, prompt_length, grid
        self.max_text_tokens, self.end_turn = max_text_tokens, end_turn
        self.codes = layout.code_mask(vocab_size)
        self.grid_of = layout.grid_of_id(vocab_size)
        self.grid_tokens = self.grid_of >= 1
        structure = torch.zeros(vocab_size, dtype=torch.bool)
        structure[[layout.image_end, layout.row_end, layout.turn_end]] = True  # no turn end before the image
        self.not_text = self.codes | structure | (self.grid_of >= 0)

    def _only(self, scores: Tensor, row: int, allowed: Tensor | int) -> None:
        """Keep only `allowed` (a token id or a bool mask) in one row, in place."""
        if isinstance(allowed, int):
            kept = scores[row, allowed].clone()
            scores[row] = -math.inf
            scores[row, allowed] = kept if torch.isfinite(kept) else 0.0
        else:
            scores[row] = scores[row].masked_fill(~allowed, -math.inf)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        """Mask or force tokens so that every row keeps the image layout."""
        device = scores.device
        for mask in ("codes", "grid_of", "grid_tokens", "not_text"):
            if getattr(self, mask).device != device:
                setattr(self, mask, getattr(self, mask).to(device))
        state = ImageState(input_ids, self.layout)
        scores = scores.clone()
        generated = input_ids[:, self.prompt_length :]
        for b in range(input_ids.shape[0]):
            if not bool(state.inside[b]):
                if self.end_turn and bool((generated[b] == self.layout.image_end).any()):
                    self._only(scores, b, self.layout.turn_end)  # the generated image is complete
                elif self.max_text_tokens is not None and generated.shape[1] >= self.max_text_tokens:
                    self._only(scores, b, self.layout.image_start)
                else:
                    scores[b] = scores[b].masked_fill(self.not_text, -math.inf)
                continue
            t = int(state.since_start[b])  # tokens after the start already there
            if t < 2:  # the grid tokens
                if self.grid is not None:
                    self._only(scores, b, int(self.layout.grid_ids[self.grid[t]]))
                else:
                    self._only(scores, b, self.grid_tokens)
                continue
            start = int(state.last_start[b])
            gh, gw = (int(self.grid_of[input_ids[b, start + i]]) for i in (1, 2))
            width, height = gw * self.layout.codes_per_cell, gh * self.layout.codes_per_cell
            body = t - 2
            if body == height * (width + 1):
                self._only(scores, b, self.layout.image_end)
            elif (body + 1) % (width + 1) == 0:
                self._only(scores, b, self.layout.row_end)
            else:
                self._only(scores, b, self.codes)
        return scores


class ImageCFGLogitsProcessor(LogitsProcessor):
    """Classifier-free guidance on image tokens, s (cond - uncond) + uncond, batch size 1 (as PURE generates).

    The unconditional branch starts when the generated image's grid tokens are out: it is fed the tokens from the
    image start on (with `use_cache`, once, then one token a step into its own cache) and is dropped when the image
    ends. Scale 1 is plain conditional sampling (the branch is not run).
    """

    def __init__(
        self, model: nn.Module, layout: ImageTokenLayout, scale: float, use_cache: bool = True
    ) -> None:
        self.model, self.layout, self.scale, self.use_cache = model, layout, scale, use_cache
        self.cache: Any = None
        self.fed = 0  # tokens of the current image the unconditional branch has seen

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        """Guided scores inside an image (after its grid tokens); the scores unchanged elsewhere."""
        if input_ids.shape[0] != 1:
            raise ValueError(
                f"image CFG samples one sequence at a time (PURE's way), got a batch of {input_ids.shape[0]}"
            )
        state = ImageState(input_ids, self.layout)
        if not bool(state.inside[0]) or int(state.since_start[0]) < 2:
            self.cache, self.fed = None, 0
            return scores
        if self.scale == 1.0:
            return scores
        tokens = input_ids[:, int(state.last_start[0]) :]
        if self.use_cache:
            if self.cache is None:
                self.cache, self.fed = DynamicCache(), 0
            new = tokens[:, self.fed :]
            out = self.model(input_ids=new, cache=self.cache, use_cache=True)
        else:
            out = self.model(input_ids=tokens, use_cache=False)
        self.fed = tokens.shape[1]
        uncond = out.logits[:, -1].to(scores.dtype)
        return self.scale * (scores - uncond) + uncond
