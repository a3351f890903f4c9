"""SCoT's planners (SCoT paper, arXiv 2602.11980): a request in, a plan in the interleaved text-coordinate format out.

One interface, `Planner.plan(prompts, meta) -> list[str]` (one plan text per prompt; `meta` is the sample's
json, e.g. the source layout of an edit). The SCoT module parses each plan with
`components.layout.parse_layout` (bad boxes repaired with a warning and counted, an unusable plan refused and
counted: the sample then falls back to its request without a plan). Three planners:
- `ChatPlanner`: an MLLM behind an OpenAI-compatible endpoint through `omnilab.chat.ChatClient` (timeouts,
  retries, bounded concurrency, an on-disk cache); a failed request is counted and gives an empty plan.
  An edit's source image goes with the request.
- `LocalVLMPlanner`: a local Qwen2.5-VL / Qwen3-VL Instruct through `components.vlm.build_vlm` (the suite's
  one VLM builder) from a weights path, the same planning prompt (and an edit's source image), greedy
  decoding; a tiny random-init one from `config` for tests.
- `RulePlanner`: exact plans for the generated scenes' requests (`omnilab data synth layout`): "a photo of a
  red circle left of a blue star", "a photo of three green stars", "add a red circle right of the blue star",
  "remove the blue star", "make the green square yellow".
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from lightning_modules.components.layout import GRID, format_box

log = logging.getLogger(__name__)

PLANNING_PROMPT = (
    "You are a layout planner for an image generator. Rewrite the request as one sentence that describes the "
    "image, in which every object is followed by its bounding box [x0, y0, x1, y1]: integer coordinates on a "
    "0-1000 grid over the image, x to the right, y down, one box per object instance. Keep the relations and "
    "counts of the request true in the boxes. Example: a red circle [100, 350, 400, 650] left of a blue "
    "square [600, 350, 900, 650] on a white background.\nRequest: {prompt}\nAnswer with the sentence only."
)
EDIT_PROMPT = (
    "You are a layout planner for an image editor. The image shows: {layout}. Rewrite the edit request with "
    "the bounding box [x0, y0, x1, y1] (integers on a 0-1000 grid, x to the right, y down) where the change "
    "goes, right after the object it concerns. Example: add a red circle [600, 100, 800, 300].\n"
    "Request: {prompt}\nAnswer with the instruction only."
)


class Planner:
    """Base of the planners: requests -> plan texts in the interleaved format (one per request; "" for none)."""

    def plan(self, prompts: Sequence[str], meta: Sequence[dict[str, Any]] | None = None) -> list[str]:
        """One plan per prompt; `meta[i]` is sample i's json (the source layout of an edit)."""
        raise NotImplementedError


def planning_request(prompt: str, meta: dict[str, Any] | None) -> str:
    """The planning prompt of one request (the edit prompt, with the source layout, for an edit)."""
    source = (meta or {}).get("source_layout")
    if source is not None:
        layout = ", ".join(f"{r['phrase']} {format_box(r['box'])}" for r in source) or "nothing"
        return EDIT_PROMPT.format(layout=layout, prompt=prompt)
    return PLANNING_PROMPT.format(prompt=prompt)


class ChatPlanner(Planner):
    """An MLLM planner behind an OpenAI-compatible endpoint (`omnilab.chat.ChatClient`).

    Args:
        client: The chat client (base_url, model, timeout, retries, cache_dir, ...).
        max_side: Longest side of an edit's source image sent with the request.
    """

    def __init__(self, client: Any, max_side: int = 512) -> None:
        self.client, self.max_side = client, max_side
        self.failures = 0

    def plan(self, prompts: Sequence[str], meta: Sequence[dict[str, Any]] | None = None) -> list[str]:
        """One request per prompt, sent concurrently; a failed one is counted, logged and gives ""."""
        from omnilab.chat import ChatError, user_message

        metas = list(meta) if meta is not None else [{} for _ in prompts]
        requests = []
        for prompt, m in zip(prompts, metas):
            images = [m["source_image"]] if m.get("source_image") is not None else []
            requests.append([user_message(planning_request(prompt, m), images, max_side=self.max_side)])
        out = []
        for prompt, answer in zip(prompts, self.client.complete_many(requests)):
            if isinstance(answer, ChatError):
                self.failures += 1
                log.warning(
                    "planner request failed (%s): %s; %r goes without a plan", answer.kind, answer, prompt
                )
                out.append("")
            else:
                out.append(answer.text)
        return out


class LocalVLMPlanner(Planner):
    """A local VLM as the planner (`components.vlm.build_vlm`: Qwen2.5-VL / Qwen3-VL), greedy answers to the prompt.

    An edit's source image goes with its request, as with `ChatPlanner`.

    Args:
        family: "qwen2_5_vl" or "qwen3_vl".
        pretrained: Weights (hub id or a folder in the hub's layout), e.g. Qwen/Qwen3-VL-8B-Instruct.
        config: Or a random-init config dict (tests), with `tokenizer` (an offline tokenizer spec).
        image_processor: Image processor kwargs (`min_pixels`, `max_pixels`, ...).
        load: Extra `from_pretrained` kwargs (e.g. `dtype`).
        max_new_tokens: Longest plan.
        batch_size: Requests per `generate` call.
        device: "cpu", "cuda", ...
    """

    def __init__(
        self,
        family: str = "qwen3_vl",
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        image_processor: dict[str, Any] | None = None,
        load: dict[str, Any] | None = None,
        max_new_tokens: int = 256,
        batch_size: int = 8,
        device: str = "cpu",
    ) -> None:
        if (pretrained is None) == (config is None):
            raise ValueError("LocalVLMPlanner: give exactly one of `pretrained` and `config`")
        self.family, self.pretrained, self.config = family, pretrained, dict(config or {})
        self.image_processor, self.load_kwargs = dict(image_processor or {}), dict(load or {})
        self.max_new_tokens, self.batch_size, self.device = max_new_tokens, batch_size, device
        self.vlm: Any = None

    def load(self) -> None:
        """Build the VLM (first use)."""
        if self.vlm is not None:
            return
        from lightning_modules.components.vlm import build_vlm

        config = dict(self.config)
        tokenizer = config.pop("tokenizer", None)
        self.vlm = build_vlm(
            self.family,
            pretrained=self.pretrained,
            config=config if self.pretrained is None else None,
            tokenizer=tokenizer,
            image_processor=self.image_processor,
            load=self.load_kwargs,
        )
        self.vlm.model.eval().to(self.device)

    def plan(self, prompts: Sequence[str], meta: Sequence[dict[str, Any]] | None = None) -> list[str]:
        """Greedy answers to the planning prompt (with an edit's source image), `batch_size` at a time."""
        from lightning_modules.components.vlm import Conversation

        self.load()
        metas = list(meta) if meta is not None else [{} for _ in prompts]
        conversations = [
            Conversation(
                images=[m["source_image"]] if m.get("source_image") is not None else [],
                text=planning_request(prompt, m),
            )
            for prompt, m in zip(prompts, metas)
        ]
        out: list[str] = []
        for i in range(0, len(conversations), self.batch_size):
            out += self.vlm.generate(conversations[i : i + self.batch_size], self.max_new_tokens)
        return [text.strip() for text in out]


# --------------------------------------------------------------------------- the rule-based planner

NUMBER_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
POSITION = re.compile(r"^(?:a photo of )?(an? .+?) (left of|right of|above|below) (an? .+?)\.?$")
COUNT = re.compile(r"^(?:a photo of )?(a|an|one|two|three|four|five|six) (.+?)\.?$")
ADD = re.compile(r"^add (an? .+?) (left of|right of|above|below) the (.+?)\.?$")
REMOVE = re.compile(r"^remove the (.+?)\.?$")
RECOLOUR = re.compile(r"^make the (.+?) (\w+)\.?$")


def _grid_box(cx: float, cy: float, side: float) -> tuple[int, int, int, int]:
    """A square box around a centre, all in image fractions, on the grid (kept inside it)."""
    half = side / 2
    cx, cy = min(max(cx, half), 1 - half), min(max(cy, half), 1 - half)
    return tuple(round(v * GRID) for v in (cx - half, cy - half, cx + half, cy + half))  # type: ignore[return-value]


def _singular(noun: str) -> str:
    return noun[:-1] if noun.endswith("s") and not noun.endswith("ss") else noun


class RulePlanner(Planner):
    """Exact plans for the requests of the generated scenes (module docstring); "" for anything else.

    Args:
        side: Object box side, as a share of the image.
        background: Words appended to a text-to-image plan (the generated captions end with one).
    """

    def __init__(self, side: float = 0.3, background: str = "on a white background") -> None:
        self.side, self.background = side, background

    def plan(self, prompts: Sequence[str], meta: Sequence[dict[str, Any]] | None = None) -> list[str]:
        """One plan per prompt."""
        metas = list(meta) if meta is not None else [{} for _ in prompts]
        return [self.plan_one(p.strip(), m or {}) for p, m in zip(prompts, metas)]

    def plan_one(self, prompt: str, meta: dict[str, Any]) -> str:
        """The plan of one request, or "" when no rule reads it."""
        text = prompt.lower()
        suffix = f" {self.background}" if self.background else ""
        if m := ADD.match(text):
            return self._add(m.group(1), m.group(2), m.group(3), meta)
        if m := REMOVE.match(text):
            box = self._find(m.group(1), meta)
            return f"remove the {m.group(1)} {format_box(box)}" if box else ""
        if m := RECOLOUR.match(text):
            box = self._find(m.group(1), meta)
            return f"make the {m.group(1)} {format_box(box)} {m.group(2)}" if box else ""
        if m := POSITION.match(text):
            a, relation, b = m.groups()
            offsets = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}
            dx, dy = offsets[relation]
            gap = 0.23
            box_a = _grid_box(0.5 + dx * gap, 0.5 + dy * gap, self.side)
            box_b = _grid_box(0.5 - dx * gap, 0.5 - dy * gap, self.side)
            return f"{a} {format_box(box_a)} {relation} {b} {format_box(box_b)}{suffix}"
        if m := COUNT.match(text):
            n = NUMBER_WORDS[m.group(1)]
            noun = m.group(2)
            cols = min(n, 2) if n <= 4 else 3
            rows = -(-n // cols)
            side = min(self.side, 0.8 / max(rows, cols))
            boxes = [
                _grid_box((c + 0.5) / cols, (r + 0.5) / rows, side) for r in range(rows) for c in range(cols)
            ][:n]
            phrase = f"{m.group(1)} {noun}"
            return f"{phrase} {' '.join(format_box(b) for b in boxes)}{suffix}"
        return ""

    def _find(self, name: str, meta: dict[str, Any]) -> tuple[int, int, int, int] | None:
        """The box of the object called `name` in the edit's source layout."""
        for region in meta.get("source_layout") or []:
            if region["phrase"].split(" ", 1)[-1] == name:
                return tuple(region["box"])  # type: ignore[return-value]
        return None

    def _add(self, phrase: str, relation: str, anchor: str, meta: dict[str, Any]) -> str:
        """A box beside the anchor object, on the side the relation names."""
        box = self._find(anchor, meta)
        if box is None:
            return ""
        x0, y0, x1, y1 = (v / GRID for v in box)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        side = min(self.side, 0.25)
        step = (max(x1 - x0, y1 - y0) + side) / 2 + 0.02
        offsets = {"left of": (-step, 0), "right of": (step, 0), "above": (0, -step), "below": (0, step)}
        dx, dy = offsets[relation]
        return f"add {phrase} {format_box(_grid_box(cx + dx, cy + dy, side))}"
