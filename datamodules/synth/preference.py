"""`omnilab data synth preference`: edits of real-photo scenes with candidates of known quality.

Writes the item format of `datamodules/preference.py`. One item: a scene (a crop of a real photo from
`photos.PHOTOS`, sometimes a flat colour, with 2-3 procedural shapes; the drawing code of
`datamodules/synth/multiref.py`), one instruction on one object ("Make the red star blue", "Remove the
green circle", "Move the blue square to the top left", "Make the yellow hexagon twice as big"), and 2-4
candidate edits, each rendered exactly from a program, of one of five kinds:

- `correct`: the instruction, done.
- `wrong_region`: the same operation on another object (a local error: the right kind of change, in
  the wrong place).
- `over_edit`: the instruction done, plus an unrequested change to another object (recoloured or removed).
- `artifacts`: the instruction done, with blocky colour noise and blur over the edited region (a local error).
- `no_edit`: the source unchanged (the edit failed).

Known quality: each candidate gets SpatialReward-style scores drawn in its kind's range (0-25; success
and overediting for the semantic-consistency verdict, naturalness and artifacts for the perceptual one):

| kind | success | overediting | naturalness | artifacts |
|---|---|---|---|---|
| correct | 22-25 | 22-25 | 21-25 | 21-25 |
| over_edit | 20-25 | 5-11 | 19-24 | 19-24 |
| artifacts | 16-21 | 18-23 | 5-10 | 1-6 |
| wrong_region | 0-4 | 7-13 | 19-24 | 19-24 |
| no_edit | 0-2 | 23-25 | 21-25 | 21-25 |

and the human ranking orders the candidates by the reward those scores give (R = SC^0.8 PQ^0.2 / 10,
`lightning_modules.reward_models.verdict_reward`); equal rewards are ties. A quarter of the 2-candidate
items show two renderings of the correct edit that differ by an imperceptible brightness offset (+-2)
with equal scores: a tie "A=B".

Each candidate also gets its ground-truth edit regions (boxes on the 0-1000 grid, where its pixels
differ from the source by program: the edited object before and after, the other object touched, the
artifact patch; `[]` for no_edit), a templated rationale (plain words) and the two target verdicts
(SC: regions, reasoning citing `<|bbox_i|>` and `<|global|>`, scores; PQ: reasoning, scores), and a
`local_error` flag (wrong_region, artifacts).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from datamodules.synth.multiref import (
    COLOURS,
    POSITIONS,
    RESIZE_WORDS,
    Placed,
    _distinct_shapes,
    cell_box,
    random_background,
    render,
)
from omnilab.seeding import numpy_rng

DEFAULT_SAMPLES = {"train": 512, "val": 64, "test": 64}
KINDS = ("correct", "over_edit", "artifacts", "wrong_region", "no_edit")
LOCAL_ERRORS = ("wrong_region", "artifacts")
OPS = ("recolor", "remove", "move", "resize")
SCORE_RANGES = {  # (success, overediting, naturalness, artifacts): inclusive integer ranges on 0..25
    "correct": ((22, 25), (22, 25), (21, 25), (21, 25)),
    "over_edit": ((20, 25), (5, 11), (19, 24), (19, 24)),
    "artifacts": ((16, 21), (18, 23), (5, 10), (1, 6)),
    "wrong_region": ((0, 4), (7, 13), (19, 24), (19, 24)),
    "no_edit": ((0, 2), (23, 25), (21, 25), (21, 25)),
}
SIDES = (96, 160)  # scene sides in pixels (steps of 8)
TIE_SHARE = 0.25  # of the 2-candidate items: two renderings of the correct edit, tied
# the mini-replications' narrower items (benchmarks/reward_replication.py): flat backgrounds, two objects,
# recolouring, two candidates; the kinds keep one semantic error (wrong region), one visual (artifacts)
EASY: dict[str, Any] = {
    "sides": (64, 64),
    "photo_share": 0.0,
    "objects": (2, 2),
    "ops": ("recolor",),
    "kinds": ("correct", "wrong_region", "artifacts", "no_edit"),
    "candidates": (2,),
    "tie_share": 0.0,
}


def grid_box(box: tuple[float, float, float, float], width: int, height: int) -> list[int]:
    """An (x, y, w, h) pixel box -> [x1, y1, x2, y2] on the 0-1000 grid (clipped to the image, x1 < x2)."""
    x, y, w, h = box
    x1, y1 = max(0.0, x) / width, max(0.0, y) / height
    x2, y2 = min(float(width), x + w) / width, min(float(height), y + h) / height
    out = [round(1000 * v) for v in (x1, y1, x2, y2)]
    out[2], out[3] = max(out[2], out[0] + 1), max(out[3], out[1] + 1)
    return [min(1000, v) for v in out]


def _union(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, int, int, int]:
    x0, y0 = min(a[0], b[0]), min(a[1], b[1])
    x1, y1 = max(a[0] + a[2], b[0] + b[2]), max(a[1] + a[3], b[1] + b[3])
    return x0, y0, x1 - x0, y1 - y0


def _apply(
    op: str, scene: list[Placed], ident: int, arg: Any, width: int, height: int
) -> tuple[list[Placed], list[tuple[str, tuple[int, ...]]]]:
    """The scene after `op` on object `ident`, and the changed regions [(label, (x, y, w, h))]."""
    out, regions = [], []
    for p in scene:
        if p.ident != ident:
            out.append(p)
            continue
        if op == "recolor":
            q = replace(p, thing=replace(p.thing, colour=arg))
            out.append(q)
            regions.append((f"{arg} {p.thing.shape}", p.box))
        elif op == "remove":
            regions.append((f"removed {p.thing.name}", p.box))
        elif op == "move":
            w, h = p.box[2], p.box[3]
            row, col = POSITIONS[arg]
            cx, cy = (col + 0.5) * width / 3, (row + 0.5) * height / 3
            q = replace(p, box=(round(cx - w / 2), round(cy - h / 2), w, h), position=arg)
            out.append(q)
            regions.append((f"{p.thing.name}, old place", p.box))
            regions.append((f"{p.thing.name}, new place", q.box))
        else:  # resize
            x, y, w, h = p.box
            nw, nh = max(4, round(w * arg)), max(4, round(h * arg))
            q = replace(p, box=(x + w // 2 - nw // 2, y + h // 2 - nh // 2, nw, nh))
            out.append(q)
            regions.append((f"resized {p.thing.name}", _union(p.box, q.box)))
    return out, regions


def _phrase(op: str, p: Placed, arg: Any) -> str:
    """The instruction for `op` on object p."""
    name = p.thing.name
    if op == "recolor":
        return f"Make the {name} {arg}."
    if op == "remove":
        return f"Remove the {name}."
    if op == "move":
        return f"Move the {name} to the {arg}."
    return f"Make the {name} {RESIZE_WORDS[arg]}."


def _draw_arg(op: str, p: Placed, scene: list[Placed], rng: np.random.Generator) -> Any:
    """The operation's argument: a new colour, a free cell, a resize factor (None for remove)."""
    if op == "recolor":
        taken = {q.thing.name for q in scene}
        return str(
            rng.choice([c for c in COLOURS if c != p.thing.colour and f"{c} {p.thing.shape}" not in taken])
        )
    if op == "move":
        used = {q.position for q in scene}
        return str(rng.choice([c for c in POSITIONS if c not in used]))
    if op == "resize":
        return float(rng.choice(list(RESIZE_WORDS)))
    return None


def _artifacts(img: np.ndarray, box: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Blocky colour noise (4-px blocks, 50-80% opacity) and a blur over a box (x, y, w, h) of the image."""
    height, width = img.shape[:2]
    x, y, w, h = box
    pad = 4
    x0, y0 = max(0, x - pad), max(0, y - pad)
    x1, y1 = min(width, x + w + pad), min(height, y + h + pad)
    out = img.copy()
    if x1 <= x0 or y1 <= y0:
        return out
    patch = out[y0:y1, x0:x1].astype(np.float32)
    bh, bw = -(-(y1 - y0) // 4), -(-(x1 - x0) // 4)
    blocks = rng.integers(0, 256, (bh, bw, 3)).astype(np.float32)
    noise = np.repeat(np.repeat(blocks, 4, 0), 4, 1)[: y1 - y0, : x1 - x0]
    alpha = float(rng.uniform(0.5, 0.8))
    patch = (1 - alpha) * patch + alpha * noise
    blurred = Image.fromarray(np.clip(patch, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.0))
    out[y0:y1, x0:x1] = np.asarray(blurred)
    return out


def _scores(kind: str, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """([success, overediting], [naturalness, artifacts]) drawn in the kind's ranges."""
    drawn = [int(rng.integers(lo, hi + 1)) for lo, hi in SCORE_RANGES[kind]]
    return drawn[:2], drawn[2:]


RATIONALES = {
    "correct": (
        "the {target} {done}, as the instruction asks",
        "nothing else changed and the result looks natural",
    ),
    "over_edit": (
        "the {target} {done}, as asked, but the {other} changed too",
        "the edit changes more than the instruction asks",
    ),
    "artifacts": (
        "the {target} {done}, but the region is covered by blocky noise and blur",
        "the instruction is followed but the result shows visible artifacts",
    ),
    "wrong_region": ("the {other} {done_other} instead of the {target}", "the instruction is not followed"),
    "no_edit": ("", "the edited image is the same as the source: the edit failed"),
}
PQ_REASONS = {
    "correct": "The image looks natural, with clean edges and no artifacts.",
    "over_edit": "The image looks natural and has no visible artifacts.",
    "artifacts": "Blocky colour noise and blur cover part of the image.",
    "wrong_region": "The image looks natural and has no visible artifacts.",
    "no_edit": "The image looks natural, with clean edges and no artifacts.",
}
DONE = {
    "recolor": "is now {arg}",
    "remove": "was removed",
    "move": "moved to the {arg}",
    "resize": "is {arg}",
}


def _done(op: str, arg: Any) -> str:
    return DONE[op].format(arg=RESIZE_WORDS.get(arg, arg) if op == "resize" else arg)


def make_item(
    rng: np.random.Generator,
    sides: tuple[int, int] = SIDES,
    photo_share: float = 0.8,
    objects: tuple[int, int] = (2, 3),
    ops: tuple[str, ...] = OPS,
    kinds: tuple[str, ...] = KINDS,
    candidates: tuple[int, ...] = (2, 3, 4),
    tie_share: float = TIE_SHARE,
) -> dict[str, Any]:
    """One preference item: instruction, source, candidates and their ground truth (see the module doc).

    The defaults are the embedded data's; the benchmarks narrow them (`EASY`): fewer operations, kinds,
    objects or candidates, flat backgrounds.
    """
    lo, hi = sides
    width, height = (8 * int(rng.integers(lo // 8, hi // 8 + 1)) for _ in range(2))
    spec = random_background(rng, width, height, photo_share=photo_share)
    cells = [str(c) for c in rng.permutation(list(POSITIONS))]
    things = _distinct_shapes(rng, int(rng.integers(objects[0], objects[1] + 1)), flat=rng.random() < 0.5)
    scene = [
        Placed(t, cell_box(cells[i], width, height, t, float(rng.uniform(0.6, 0.85))), cells[i], i, "scene")
        for i, t in enumerate(things)
    ]
    target, other = (int(i) for i in rng.permutation(len(scene))[:2])
    op = str(rng.choice(list(ops)))
    arg = _draw_arg(op, scene[target], scene, rng)
    arg_other = _draw_arg(op, scene[other], scene, rng)
    source, _ = render(spec, width, height, scene)

    weights = np.array([{2: 0.4, 3: 0.3, 4: 0.3}.get(c, 0.3) for c in candidates])
    k = int(rng.choice(list(candidates), p=weights / weights.sum()))
    tie = k == 2 and rng.random() < tie_share
    drawn = (
        ["correct", "correct"] if tie else [str(x) for x in rng.choice(list(kinds), size=k, replace=False)]
    )
    names = {"target": scene[target].thing.name, "other": scene[other].thing.name}
    candidates, records = [], []
    tie_scores = _scores("correct", rng) if tie else None
    for index, kind in enumerate(drawn):
        regions: list[tuple[str, tuple[int, ...]]] = []
        if kind == "no_edit":
            image = source.copy()
        elif kind == "wrong_region":
            edited, regions = _apply(op, scene, other, arg_other, width, height)
            image = render(spec, width, height, edited)[0]
        else:
            edited, regions = _apply(op, scene, target, arg, width, height)
            if kind == "over_edit":
                extra = "recolor" if rng.random() < 0.6 else "remove"
                extra_arg = _draw_arg(extra, scene[other], edited, rng)
                edited, more = _apply(extra, edited, other, extra_arg, width, height)
                regions += more
            image = render(spec, width, height, edited)[0]
            if kind == "artifacts":
                image = _artifacts(image, regions[-1][1], rng)
            if tie and index == 1:
                image = np.clip(image.astype(np.int16) + int(rng.choice([-2, 2])), 0, 255).astype(np.uint8)
        sc, pq = tie_scores if tie else _scores(kind, rng)
        boxes = [grid_box(box, width, height) for _, box in regions]
        first, overall = RATIONALES[kind]
        detail = first.format(
            target=names["target"],
            other=names["other"],
            done=_done(op, arg),
            done_other=_done(op, arg_other),
        )
        cites = " ".join(f"<|bbox_{i}|>" for i in range(len(regions)))
        sc_reason = (f"{cites} {detail}. " if detail and regions else "") + f"<|global|> {overall}."
        rationale = (
            f"{detail[0].upper()}{detail[1:]}; {overall}."
            if detail
            else f"{overall[0].upper()}{overall[1:]}."
        )
        verdict = {
            "sc": {
                "edit_region": [
                    {"id": i, "label": label, "bbox_2d": b}
                    for i, ((label, _), b) in enumerate(zip(regions, boxes))
                ],
                "reasoning": sc_reason,
                "score": sc,
            },
            "pq": {"reasoning": PQ_REASONS[kind], "score": pq},
        }
        candidates.append(image)
        records.append({"kind": kind, "boxes": boxes, "rationale": rationale, "verdict": verdict})
    return {
        "instruction": _phrase(op, scene[target], arg),
        "source": source,
        "candidates": candidates,
        "records": records,
        "op": op,
        "background": spec,
    }


def ranking(rewards: list[float], tol: float = 1e-9) -> str:
    """The ranking string of candidate rewards, best first, equal rewards tied: [0.9, 0.2, 0.9] -> "A=C>B"."""
    order = sorted(range(len(rewards)), key=lambda i: (-rewards[i], i))
    parts: list[list[int]] = []
    for i in order:
        if parts and abs(rewards[parts[-1][0]] - rewards[i]) <= tol:
            parts[-1].append(i)
        else:
            parts.append([i])
    return ">".join("=".join(chr(ord("A") + i) for i in tier) for tier in parts)


def png(img: np.ndarray) -> bytes:
    """PNG bytes of an HxWx3 uint8 image (zlib level 1)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def make_sample(split: str, index: int, seed: int, **options: Any) -> dict[str, Any]:
    """Item `index` of `split` as shard members: deterministic in (seed, split, index, options)."""
    from lightning_modules.reward_models import pq_score, sc_score, spatial_reward

    rng = numpy_rng(seed, "synth-preference", split, index, *(f"{k}={v}" for k, v in sorted(options.items())))
    item = make_item(rng, **options)
    records = item["records"]
    rewards = [
        spatial_reward(sc_score(*r["verdict"]["sc"]["score"]), pq_score(*r["verdict"]["pq"]["score"]))
        for r in records
    ]
    key = f"{split}_{index:06d}"
    meta = {
        "instruction": item["instruction"],
        "n_sources": 1,
        "n_candidates": len(records),
        "ranking": ranking(rewards),
        "source": "synth",
        "benchmark": "synth",
        "orig_id": key,
        "task_type": item["op"],
        "quality": [r["kind"] for r in records],
        "local_error": [r["kind"] in LOCAL_ERRORS for r in records],
        "boxes": [r["boxes"] for r in records],
        "rationales": [r["rationale"] for r in records],
        "verdicts": [r["verdict"] for r in records],
        "rewards": [round(x, 6) for x in rewards],
        "background": item["background"],
    }
    sample: dict[str, Any] = {"__key__": key, "json": meta, "src0.png": png(item["source"])}
    for k, image in enumerate(item["candidates"]):
        sample[f"cand{k}.png"] = png(image)
    return sample


def samples(split: str, count: int, seed: int, **options: Any) -> Iterator[dict[str, Any]]:
    """`count` items of `split`, each deterministic in (seed, split, index, options)."""
    for index in range(count):
        yield make_sample(split, index, seed, **options)
