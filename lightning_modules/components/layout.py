"""SCoT's interleaved text-coordinate format: each phrase followed by its box, integers on a 0-1000 grid.

SCoT (SCoT paper, arXiv 2602.11980) trains the diffusion model on captions in which every grounded phrase is followed
by its box and lets an MLLM planner write such a caption for a new prompt. The paper does not print its
token format; we use the one Qwen2-VL and Qwen3-VL planners emit without conversion (docs/methods/scot.md):

    a red circle [120, 40, 380, 300] to the left of a blue square [600, 420, 900, 760]

`[x0, y0, x1, y1]`: top-left and bottom-right corners as integers on a 0-1000 grid over the image (x to the
right, y down), written right after the phrase it grounds. The phrase is the text between the previous box
(or a clause break: "," ";" "." " and ") and the box, less a leading relation ("to the left of", "above",
...); several boxes may follow one phrase (one per instance: "two cats [..] [..]").

`parse_layout` also reads the planners' other spellings and turns them into the same `Layout`:
- Qwen2-VL special tokens: `<|object_ref_start|>phrase<|object_ref_end|><|box_start|>(x0,y0),(x1,y1)<|box_end|>`;
- Qwen-VL v1: `<ref>phrase</ref><box>(x0,y0),(x1,y1)</box>`;
- Qwen3-VL JSON on the 0-1000 grid: `[{"bbox_2d": [x0, y0, x1, y1], "label": "phrase"}, ...]` (a ```json fence
  is fine); Qwen2.5-VL's JSON is in absolute pixels: pass `pixels=(width, height)` to rescale it;
- LayoutGPT's CSS lines on a 64 x 64 canvas: `phrase {height: Hpx; width: Wpx; top: Ypx; left: Xpx; }`.

Bad plans (docs/methods/scot.md "Bad plans"): with `repair=True` a box outside the grid is clipped to it, an
inverted box (x1 < x0 or y1 < y0) has its corners swapped, a box with no area after that and an exact
duplicate (same phrase, same box) are dropped, and a bracket that is not four integers is dropped; each
repair is logged as a warning and counted in `PlanStats` under its reason. With `repair=False` the first
such problem raises `PlanError` naming it. Text with no box at all is refused (`PlanError`) either way.
`write_layout` is the inverse: `parse_layout(write_layout(x)) == x` for every valid layout whose caption holds
its phrases in order.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

GRID = 1000  # the coordinate grid: integers 0..1000 over the image's width and height
Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) on the grid
REASONS = ("out_of_grid", "inverted", "empty", "duplicate", "unparsable")

BRACKET = re.compile(r"\[([^\[\]]*)\]")
NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
FOUR = re.compile(r"^" + ",".join([NUMBER] * 4) + r"$")
QWEN2 = re.compile(
    r"<\|object_ref_start\|>(.*?)<\|object_ref_end\|>((?:\s*<\|box_start\|>.*?<\|box_end\|>)+)", re.S
)
QWEN2_BOX = re.compile(r"<\|box_start\|>(.*?)<\|box_end\|>", re.S)
QWEN1 = re.compile(r"<ref>(.*?)</ref>((?:\s*<box>.*?</box>)+)", re.S)
QWEN1_BOX = re.compile(r"<box>(.*?)</box>", re.S)
PAIRS = re.compile(r"^\s*\(" + NUMBER + "," + NUMBER + r"\)\s*,\s*\(" + NUMBER + "," + NUMBER + r"\)\s*$")
CSS = re.compile(r"([^{}\n]+?)\s*\{([^{}]*)\}")
CSS_PROPS = re.compile(r"(height|width|top|left)\s*:\s*(-?\d+(?:\.\d+)?)\s*(?:px)?", re.I)
CSS_CANVAS = 64  # LayoutGPT's canvas side
# an edit verb, relation or joining word in front of a phrase: "... [box] to the left of a dog [box]" -> "a dog",
# "add a red circle [box]" -> "a red circle"
LEAD = re.compile(
    r"^(?:(?:add|remove|erase|delete|make|put|place|move|insert|change|turn|replace|draw|paint|and|with|plus|then|while|next to|beside|near|behind|in front of|on top of|under(?:neath)?|"
    r"below|above|over|inside|on|in|at|(?:to the )?(?:left|right) of|on the (?:left|right) of|at the (?:top|bottom)"
    r"(?: (?:left|right))? of|and a|,|;|:)\s+)+",
    re.I,
)
CLAUSE = re.compile(r"[,;.:!?]\s*|\s+and\s+|\s+with\s+|\n")


class PlanError(ValueError):
    """A plan that cannot be used (no box, or, without repair, a bad box); the message names the problem."""


@dataclass(frozen=True)
class Region:
    """One grounded phrase: its text and its box (x0, y0, x1, y1) on the 0-1000 grid."""

    phrase: str
    box: Box

    def scaled(self, width: float, height: float) -> tuple[float, float, float, float]:
        """The box in pixels of a width x height image."""
        x0, y0, x1, y1 = self.box
        return x0 * width / GRID, y0 * height / GRID, x1 * width / GRID, y1 * height / GRID


@dataclass(frozen=True)
class Layout:
    """A plan: the caption without coordinates and its grounded regions, in reading order."""

    caption: str
    regions: tuple[Region, ...]

    @property
    def phrases(self) -> list[str]:
        """The phrase of each region."""
        return [r.phrase for r in self.regions]

    @property
    def boxes(self) -> list[Box]:
        """The box of each region."""
        return [r.box for r in self.regions]

    def to_json(self) -> list[dict[str, object]]:
        """The regions as the data kind stores them: [{"phrase", "box": [x0, y0, x1, y1]}]."""
        return [{"phrase": r.phrase, "box": list(r.box)} for r in self.regions]


@dataclass
class PlanStats:
    """Counts of parsed plans and of every repair or refusal, by reason (logged as `plan/<reason>`)."""

    plans: int = 0
    refused: int = 0
    repairs: Counter = field(default_factory=Counter)

    def add(self, other: PlanStats) -> None:
        """Add another tally into this one."""
        self.plans += other.plans
        self.refused += other.refused
        self.repairs.update(other.repairs)

    def as_dict(self) -> dict[str, int]:
        """{"plans", "refused", <each reason>} with zeros for reasons not seen."""
        return {"plans": self.plans, "refused": self.refused, **{r: self.repairs[r] for r in REASONS}}


# --------------------------------------------------------------------------- writing


def format_box(box: Sequence[int]) -> str:
    """`[x0, y0, x1, y1]` as the format writes it."""
    return "[" + ", ".join(str(int(v)) for v in box) + "]"


def write_layout(layout: Layout | Iterable[Region], joiner: str = ", ") -> str:
    """The interleaved text of a layout: its caption with each phrase followed by its box.

    A `Layout` whose caption contains every phrase in order is written as that caption with the boxes put
    after their phrases (so relation words survive: "a cat [..] left of a dog [..]"; the further instances of
    a phrase follow its first box: "two cats [..] [..]"); bare regions (or a caption that does not contain
    them) are written as "phrase [box]" items joined by `joiner`.
    """
    regions = layout.regions if isinstance(layout, Layout) else tuple(layout)
    caption = layout.caption if isinstance(layout, Layout) else ""
    out, pos, previous = [], 0, None
    for region in regions:
        at = caption.find(region.phrase, pos) if region.phrase else -1
        if at < 0 and out and region.phrase == previous:  # another instance: "two cats [..] [..]"
            out[-1] += " " + format_box(region.box)
            continue
        previous = region.phrase
        if at < 0:
            return joiner.join(f"{r.phrase} {format_box(r.box)}".strip() for r in regions)
        end = at + len(region.phrase)
        out.append(caption[pos:end] + " " + format_box(region.box))
        pos = end
    return "".join(out) + caption[pos:]


def to_grid(box: Sequence[float], width: float, height: float) -> Box:
    """A pixel box (x0, y0, x1, y1) of a width x height image on the 0-1000 grid (rounded)."""
    x0, y0, x1, y1 = box
    return (
        round(x0 * GRID / width),
        round(y0 * GRID / height),
        round(x1 * GRID / width),
        round(y1 * GRID / height),
    )


def qwen2_tokens(layout: Layout) -> str:
    """The layout in Qwen2-VL's grounding tokens (what Qwen2-VL emits when asked to ground phrases)."""
    return "".join(
        f"<|object_ref_start|>{r.phrase}<|object_ref_end|><|box_start|>({r.box[0]},{r.box[1]}),"
        f"({r.box[2]},{r.box[3]})<|box_end|>"
        for r in layout.regions
    )


# --------------------------------------------------------------------------- reading


def _phrase(text: str) -> str:
    """The phrase a box grounds: the last clause of the text before it, less leading relation words."""
    clause = CLAUSE.split(text.strip())[-1] if text.strip() else ""
    previous = None
    while previous != clause:
        previous, clause = clause, LEAD.sub("", clause).strip()
    return clause.strip(" ,;:.")


def _number_box(values: Sequence[str]) -> tuple[float, ...]:
    """Four numbers as floats (integral ones print as ints in messages)."""
    return tuple(int(float(v)) if float(v) == int(float(v)) else float(v) for v in values)


def _check(
    phrase: str, raw: tuple[float, ...] | None, source: str, repair: bool, stats: PlanStats
) -> Box | None:
    """One box checked against the grid: repaired (counted, warned) or PlanError; None when dropped."""

    def problem(reason: str, message: str) -> None:
        if not repair:
            raise PlanError(f"{message} in plan {source[:120]!r}")
        stats.repairs[reason] += 1
        log.warning("plan repaired (%s): %s", reason, message)

    if raw is None:
        problem("unparsable", f"box of {phrase!r} is not four integers")
        return None
    x0, y0, x1, y1 = raw
    if any(v != round(v) for v in raw):
        problem("unparsable", f"box {list(raw)} of {phrase!r} has non-integer coordinates")
        x0, y0, x1, y1 = (round(v) for v in raw)
    if x1 < x0 or y1 < y0:
        problem("inverted", f"box {[x0, y0, x1, y1]} of {phrase!r} is inverted")
        x0, x1 = sorted((x0, x1))
        y0, y1 = sorted((y0, y1))
    if min(x0, y0, x1, y1) < 0 or max(x0, y0, x1, y1) > GRID:
        problem("out_of_grid", f"box {[x0, y0, x1, y1]} of {phrase!r} leaves the 0-{GRID} grid")
        x0, y0, x1, y1 = (min(GRID, max(0, v)) for v in (x0, y0, x1, y1))
    if x1 <= x0 or y1 <= y0:
        problem("empty", f"box {[x0, y0, x1, y1]} of {phrase!r} has no area")
        return None
    return int(x0), int(y0), int(x1), int(y1)


def _collect(
    items: list[tuple[str, tuple[float, ...] | None]],
    caption: str,
    source: str,
    repair: bool,
    stats: PlanStats,
) -> Layout:
    """Check (phrase, raw box) items, drop duplicates, refuse an empty plan."""
    regions: list[Region] = []
    seen: set[Region] = set()
    for phrase, raw in items:
        box = _check(phrase, raw, source, repair, stats)
        if box is None:
            continue
        region = Region(phrase, box)
        if region in seen:
            if not repair:
                raise PlanError(f"{phrase!r} {list(box)} appears twice in plan {source[:120]!r}")
            stats.repairs["duplicate"] += 1
            log.warning("plan repaired (duplicate): dropped the second %r %s", phrase, list(box))
            continue
        seen.add(region)
        regions.append(region)
    if not regions:
        raise PlanError(f"no usable box in plan {source[:120]!r}")
    return Layout(re.sub(r"\s+", " ", caption).strip(), tuple(regions))


def _inline(text: str) -> tuple[list[tuple[str, tuple[float, ...] | None]], str]:
    """(phrase, raw box) items and the caption of the canonical inline format."""
    items, caption, pos, phrase = [], [], 0, ""
    for m in BRACKET.finditer(text):
        before = text[pos : m.start()]
        caption.append(before)
        if before.strip():
            phrase = _phrase(before)
        numbers = FOUR.match(m.group(1))
        items.append((phrase, _number_box(numbers.groups()) if numbers else None))
        pos = m.end()
    caption.append(text[pos:])
    return items, re.sub(r"\s+([,.;:])", r"\1", "".join(caption))


def _tagged(text: str, pattern: re.Pattern, box_pattern: re.Pattern) -> tuple[list, str]:
    """Items and caption of the Qwen-VL tag spellings (one phrase, then one or more boxes)."""
    items = []
    for m in pattern.finditer(text):
        phrase = m.group(1).strip()
        for b in box_pattern.findall(m.group(2)):
            pairs = PAIRS.match(b)
            items.append((phrase, _number_box(pairs.groups()) if pairs else None))
    caption = pattern.sub(lambda m: m.group(1), text)
    return items, caption


def _json_items(text: str, pixels: tuple[float, float] | None) -> tuple[list, str] | None:
    """Items of a Qwen2.5/3-VL JSON answer (a list of {"bbox_2d", "label"}), or None when it is not one."""
    body = re.sub(r"^\s*```(?:json)?\s*|\s*```\s*$", "", text.strip())
    if not body.startswith(("[", "{")):
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    data = [data] if isinstance(data, dict) else data
    if not isinstance(data, list) or not all(isinstance(d, dict) and "bbox_2d" in d for d in data):
        return None
    items = []
    for d in data:
        phrase = str(d.get("label") or d.get("phrase") or "").strip()
        box = d.get("bbox_2d")
        ok = isinstance(box, list) and len(box) == 4 and all(isinstance(v, int | float) for v in box)
        raw = tuple(float(v) for v in box) if ok else None
        if raw is not None and pixels is not None:
            w, h = pixels
            raw = (raw[0] * GRID / w, raw[1] * GRID / h, raw[2] * GRID / w, raw[3] * GRID / h)
            raw = tuple(float(round(v)) for v in raw)
        items.append((phrase, raw))
    return items, ", ".join(phrase for phrase, _ in items)


def _css_items(text: str) -> tuple[list, str] | None:
    """Items of LayoutGPT's CSS lines on its 64 x 64 canvas, or None when the text has none."""
    items = []
    for m in CSS.finditer(text):
        props = {k.lower(): float(v) for k, v in CSS_PROPS.findall(m.group(2))}
        if not props:
            continue
        phrase = m.group(1).strip()
        if set(props) != {"height", "width", "top", "left"}:
            items.append((phrase, None))
            continue
        s = GRID / CSS_CANVAS
        x0, y0 = props["left"] * s, props["top"] * s
        raw = (x0, y0, x0 + props["width"] * s, y0 + props["height"] * s)
        items.append((phrase, tuple(float(round(v)) for v in raw)))
    if not items:
        return None
    return items, ", ".join(phrase for phrase, _ in items)


def parse_layout(
    text: str,
    repair: bool = True,
    stats: PlanStats | None = None,
    pixels: tuple[float, float] | None = None,
) -> Layout:
    """The `Layout` of a plan in any spelling the module docstring lists; bad boxes repaired or refused.

    `stats` accumulates the count of plans, refusals and repairs by reason. `pixels=(width, height)`:
    a JSON plan's boxes are absolute pixels of that image (Qwen2.5-VL), rescaled to the grid.
    """
    stats = stats if stats is not None else PlanStats()
    try:
        if not isinstance(text, str) or not text.strip():
            raise PlanError("empty plan")
        for found in (
            _json_items(text, pixels),
            _tagged(text, QWEN2, QWEN2_BOX) if "<|object_ref_start|>" in text else None,
            _tagged(text, QWEN1, QWEN1_BOX) if "<ref>" in text else None,
            _css_items(text) if "{" in text else None,
        ):
            if found is not None and found[0]:
                layout = _collect(*found, text, repair, stats)
                break
        else:
            layout = _collect(*_inline(text), text, repair, stats)
    except PlanError:
        stats.refused += 1
        raise
    stats.plans += 1
    return layout


def strip_boxes(text: str) -> str:
    """The caption of an interleaved text (boxes removed); text without boxes is returned unchanged."""
    return re.sub(r"\s+([,.;:])", r"\1", re.sub(r"\s*\[[^\[\]]*\]", "", text)).strip()


def has_boxes(text: str) -> bool:
    """Whether the text holds at least one four-number bracket of the inline format."""
    return any(FOUR.match(m.group(1)) for m in BRACKET.finditer(text))
