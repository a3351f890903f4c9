"""Fit N reference images into one pixel budget: UniRef's SELF global budget and the peers' rules.

The ways open multi-reference models split a pixel budget B² across N images (UniPic 3.0 and MICo's joint
scale with its worked example, OmniGen2's count table, FLUX.2 / Qwen-Image-Edit-Plus's independent cap,
UniPic 2.0's longer edge), with sides snapped to a multiple, a minimum side and optional upscaling.
A budget B means B² pixels.

- joint (UniPic-3, MICo, UniRef SELF; the default): one scale r = B / sqrt(sum_i w_i h_i) for every
  image, so each image keeps its share of the total area. `rounding="floor"` snaps each side down;
  `"round"` is UniPic-3's rounding, which alone can overshoot B² (the paper notes' example: 4120 tokens
  at B = 1024). UniPic-3 also enlarges small input sets up to the budget: `upscale=True, rounding="round"`.
- equal: every image gets the same area, B² / N.
- independent (FLUX.2, Qwen-Image-Edit-Plus): each image on its own, min(area, B²) (exactly B² with
  upscale); the sequence grows with N.
- table (OmniGen2): per-image area P(N)² with P = [1024, 1024, 768, 512] for N = 1, 2, 3, >= 4 and a
  longest side of at most 2048, both scaled by B / 1024 (at B = 1024 it is OmniGen2's rule).
- edge (UniPic 2.0's Kontext data): each image on its own, its longer edge resized to B (the shorter in
  proportion; never enlarged without upscale), as UniPic2-SD3.5M-Kontext resizes its reference to 512.

The cap holds by construction (`hold=True`, what the data uses): after snapping, a total above B² (joint,
equal) or an image above its own cap (independent, table, edge) is shrunk by one `multiple` at a time on the
largest image's longer side, so the references never need more than `reference_capacity(B, mode, N)`
pixels, which is what a packed model pads the references to (SELF's fixed length). With `"round"` that
changes about half of UniPic-3's random sets by one multiple on one side (the worked example: 704² becomes
672 x 704, 4032 tokens); `hold=False` gives the unheld rule.

The minimum side (decisions where the notes leave it open):
- Images keep their aspect ratio: an image whose short side would fall below `min_side` is held at
  short side = `min_side` (its long side scaled alike). In joint and equal mode the other images share
  what is left of the budget (water-filling), so the budget still holds; when even every image at its
  minimum does not fit, `BudgetError` says so with the numbers.
- Likewise with `upscale=False` an image is never enlarged (scale <= 1); in equal mode the area a small
  image cannot use goes to the others.
- An image whose original short side is already below `min_side` cannot be brought to it without
  enlarging: with `upscale=False` that is a `ValueError` (the multiref data kind checks it first and
  skips such a sample as a counted BadSample); with `upscale=True` it is enlarged to `min_side`.
- Sides snap to `multiple` (floor or round); `min_side` must itself be a multiple of it. With
  `rounding="round"` a side may round up past its original by less than multiple / 2, as UniPic-3's does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

MODES = ("joint", "equal", "independent", "table", "edge")
ROUNDINGS = ("floor", "round")
OMNIGEN2_SIDES = (1024, 1024, 768, 512)  # sqrt(max_input_pixels) per image for N = 1, 2, 3, >= 4
OMNIGEN2_MAX_SIDE = 2048
REFERENCE_BUDGET = 1024  # the budget at which the table mode is OmniGen2's exactly
PIXELS_PER_TOKEN = 16  # a DiT token: VAE /8, then a 2x2 patch
_EPS = 1e-6  # tolerance of the floor snap: 511.9999999 px is 512 px


class BudgetError(ValueError):
    """The budget cannot hold the images at the minimum side (the message gives the numbers)."""


def tokens(sizes: Sequence[tuple[int, int]], pixels_per_token: int = PIXELS_PER_TOKEN) -> int:
    """DiT tokens of images (w, h): sum of (w // p) * (h // p), p = 16 px per token (VAE /8, 2x2 patch)."""
    return sum((w // pixels_per_token) * (h // pixels_per_token) for w, h in sizes)


def _snap(x: float, multiple: int, rounding: str) -> int:
    if rounding == "floor":
        return math.floor(x / multiple + _EPS) * multiple
    return round(x / multiple) * multiple


def _fill(weights: list[float], lo: list[float], hi: list[float], total: float) -> float:
    """The level s at which sum_i weights_i * clip(s, lo_i, hi_i) reaches `total` (water-filling).

    The caller has checked that sum_i weights_i * lo_i <= total. When every image is held at hi below
    `total`, the level is max(hi).
    """

    def filled(s: float) -> float:
        return sum(w * min(max(s, a), b) for w, a, b in zip(weights, lo, hi))

    free = total / sum(weights)  # the closed form when no bound binds (the common case, exact)
    if all(a <= free <= b for a, b in zip(lo, hi)):
        return free
    prev = min(lo)
    for p in sorted({*lo, *(b for b in hi if math.isfinite(b))}):
        if p <= prev:
            continue
        if filled(p) >= total:
            slope = sum(w for w, a, b in zip(weights, lo, hi) if a <= prev and b >= p)
            return prev + (total - filled(prev)) / slope if slope else prev
        prev = p
    slope = sum(w for w, b in zip(weights, hi) if not math.isfinite(b))
    return prev + (total - filled(prev)) / slope if slope else prev


def _shared_scales(
    sizes: Sequence[tuple[int, int]], budget: int, mode: str, min_side: int, upscale: bool
) -> list[float]:
    """Per-image scales of the joint or equal rule (water-filled under the minimum side and the cap)."""
    areas = [float(w * h) for w, h in sizes]
    least = [(min_side / min(w, h)) ** 2 for w, h in sizes]  # the squared scale of short side = min_side
    cap = math.inf if upscale else 1.0
    if mode == "joint":  # level = r², image area a_i r²
        weights, lo, hi = areas, least, [cap] * len(sizes)
    else:  # equal: level = the area every image gets
        weights, lo, hi = [1.0] * len(sizes), [a * m for a, m in zip(areas, least)], [a * cap for a in areas]
    need = sum(w * a for w, a in zip(weights, lo))
    if need > budget**2:
        raise BudgetError(
            f"the budget {budget} ({budget**2} pixels) cannot hold {len(sizes)} images at min_side "
            f"{min_side}: at their minimum size they need {need:.0f} pixels (sizes {list(sizes)})"
        )
    level = _fill(weights, lo, hi, float(budget**2))
    if mode == "joint":
        if not any(a > level or b < level for a, b in zip(lo, hi)):
            return [min(budget / math.sqrt(sum(areas)), cap)] * len(sizes)  # UniPic-3's formula, exactly
        return [math.sqrt(min(max(level, a), b)) for a, b in zip(lo, hi)]
    return [math.sqrt(min(max(level, a), b) / s) for a, b, s in zip(lo, hi, areas)]


def _own_caps(n: int, budget: int, mode: str) -> tuple[float, float]:
    """(side, max_side) of each image under an own-cap rule: its area is at most side², its longer side max_side."""
    if mode == "table":
        side = OMNIGEN2_SIDES[min(n, len(OMNIGEN2_SIDES)) - 1] * budget / REFERENCE_BUDGET
        return side, OMNIGEN2_MAX_SIDE * budget / REFERENCE_BUDGET
    if mode == "edge":
        return math.inf, float(budget)
    return float(budget), math.inf


def reference_capacity(budget: int, mode: str, max_refs: int) -> int:
    """The most pixels `fit_to_budget(hold=True)` gives any set of at most `max_refs` images under budget B.

    joint, equal: B²; independent and edge: max_refs · B² (each image at most B², the sequence grows with N);
    table: max over N of N · P(N)² (scaled by B / 1024). A packed model pads the references to this (in
    tokens: capacity // pixels_per_token², since every side is a multiple of the token size or floors to it).
    """
    if mode not in MODES:
        raise ValueError(f"budget mode {mode!r} is not one of {', '.join(MODES)}")
    if max_refs < 1:
        return 0
    if mode in ("joint", "equal"):
        return budget**2
    if mode == "table":
        return max(math.floor(n * _own_caps(n, budget, mode)[0] ** 2) for n in range(1, max_refs + 1))
    return max_refs * budget**2


def _own_scales(
    sizes: Sequence[tuple[int, int]], budget: int, mode: str, min_side: int, upscale: bool
) -> list[float]:
    """Per-image scales of the independent, table or edge rule, each image under its own cap."""
    side, max_side = _own_caps(len(sizes), budget, mode)
    scales = []
    for i, (w, h) in enumerate(sizes):
        scale = min(side / math.sqrt(w * h), max_side / max(w, h))
        if not upscale:
            scale = min(scale, 1.0)
        least = min_side / min(w, h)
        if least > scale * (1 + _EPS):
            raise BudgetError(
                f"image {i} ({w}x{h}) at min_side {min_side} is {w * least:.0f}x{h * least:.0f}, more than "
                f"its {mode} budget of "
                + " or ".join(
                    text
                    for text, bound in (
                        (f"{side:.0f}^2 pixels", side),
                        (f"longest side {max_side:.0f}", max_side),
                    )
                    if math.isfinite(bound)
                )
                + f" (budget {budget})"
            )
        scales.append(max(scale, least))
    return scales


def fit_to_budget(
    sizes: Sequence[tuple[int, int]],
    budget: int,
    mode: str = "joint",
    multiple: int = 32,
    min_side: int = 128,
    upscale: bool = False,
    rounding: str = "floor",
    hold: bool = True,
) -> list[tuple[int, int]]:
    """The (w, h) each image (w, h) is resized to under budget B (B² pixels) and `mode` (module doc).

    With `hold` the snapped sizes never exceed the rule's cap (`reference_capacity`); without it `"round"`
    may (UniPic-3's unheld rounding).
    """
    if mode not in MODES:
        raise ValueError(f"budget mode {mode!r} is not one of {', '.join(MODES)}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding {rounding!r} is not one of {', '.join(ROUNDINGS)}")
    if budget < 1 or multiple < 1:
        raise ValueError(f"budget ({budget}) and multiple ({multiple}) must be positive")
    if min_side < multiple or min_side % multiple:
        raise ValueError(f"min_side ({min_side}) must be a positive multiple of multiple ({multiple})")
    sizes = [(int(w), int(h)) for w, h in sizes]
    for i, (w, h) in enumerate(sizes):
        if w < 1 or h < 1:
            raise ValueError(f"image {i} has size {w}x{h}")
        if min(w, h) < min_side and not upscale:
            raise ValueError(
                f"image {i} is {w}x{h}: its short side is below min_side {min_side} and upscale is off"
            )
    if not sizes:
        return []
    if mode in ("joint", "equal"):
        scales = _shared_scales(sizes, budget, mode, min_side, upscale)
    else:
        scales = _own_scales(sizes, budget, mode, min_side, upscale)
    out = [
        (max(_snap(w * s, multiple, rounding), min_side), max(_snap(h * s, multiple, rounding), min_side))
        for (w, h), s in zip(sizes, scales)
    ]
    if not hold:
        return out
    if mode in ("joint", "equal"):
        return _hold(out, lambda sizes: sum(w * h for w, h in sizes) <= budget**2, budget, multiple, min_side)
    side, max_side = _own_caps(len(out), budget, mode)
    return [
        _hold(
            [size],
            lambda s: s[0][0] * s[0][1] <= side**2 and max(s[0]) <= max_side,
            budget,
            multiple,
            min_side,
        )[0]
        for size in out
    ]


def _hold(
    out: list[tuple[int, int]],
    fits: Callable[[list[tuple[int, int]]], bool],
    budget: int,
    multiple: int,
    min_side: int,
) -> list[tuple[int, int]]:
    """Shrink the largest image's longer side by `multiple` until `fits(sizes)` (the rounding's overshoot, or
    float ties of the floor rule); BudgetError when min_side stops it."""
    out = list(out)
    while not fits(out):
        shrinkable = [i for i, (w, h) in enumerate(out) if max(w, h) - multiple >= min_side]
        if not shrinkable:
            raise BudgetError(f"the budget {budget} cannot hold sizes {out} at min_side {min_side}")
        i = max(shrinkable, key=lambda j: out[j][0] * out[j][1])
        w, h = out[i]
        out[i] = (w - multiple, h) if w >= h else (w, h - multiple)
    return out
