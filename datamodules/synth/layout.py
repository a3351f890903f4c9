"""`omnilab data synth layout`: real-photo objects and coloured shapes at known boxes, with dense captions.

Writes the layout data kind (datamodules/layout.py: the multiref sample format plus the plan): SCoT's dense
caption-box data (SCoT paper, arXiv 2602.11980) in miniature. A scene is a square canvas (`CANVAS` px) with a flat named
background (sometimes a crop of a real photo) and 1-4 objects that do not overlap, each at a known box:
- real-photo objects: crops of the scikit-image photos (`photos.PHOTOS`: the astronaut, the cat Chelsea, the
  coffee cup, the rocket), drawn in an elliptical silhouette;
- coloured shapes (circle, square, triangle, star, diamond, hexagon) in one flat colour of the generator's
  palette (datamodules/synth/multiref.py), so `metrics.layout.ColourDetector` finds them exactly.
Some scenes repeat one shape 2-4 times (counting). The caption names every object, each phrase followed by its
box on the 0-1000 grid (lightning_modules/components/layout.py); two single objects are joined by their
GenEval relation when they have one ("a red circle [..] left of a blue star [..] on a white background").

Tasks:
- "t2i" (0 refs): the scene from its caption. Scenes of two shapes in a GenEval relation, or of one repeated
  shape, also carry a short GenEval-style `prompt` ("a photo of a red circle left of a blue star", "a photo of
  three green stars") and its GenEval metadata `geneval` ({"tag": "position" | "counting", "include",
  "exclude"}): what a planner sees at test time. The test split holds only such scenes, on flat backgrounds:
  the held-out spatial prompts.
- "edit" (1 ref, the source scene): add, remove or recolour one object; the instruction grounds the change
  ("add a red circle [..]", "remove the blue star [..]", "make the green square [..] yellow"); `prompt` is the
  same edit without coordinates ("add a red circle right of the blue star"), `edit` = {"op", "phrase",
  "box", "colour"?} says where the change goes, `source_layout` the source's regions.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from typing import Any

import numpy as np

from datamodules.synth.multiref import (
    BACKGROUNDS,
    COLOURS,
    Placed,
    Thing,
    random_background,
    render,
    sample_record,
)
from lightning_modules.components.layout import Layout, Region, format_box, parse_layout, to_grid
from metrics.layout import RELATIONS, relative_position
from omnilab.seeding import numpy_rng

DEFAULT_SAMPLES = {"train": 1024, "val": 64, "test": 64}
TASK_WEIGHTS = {"t2i": 0.75, "edit": 0.25}
CANVAS = 128
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
PHOTO_OBJECTS = {  # phrase -> (photo, crop (x, y, w, h)) of the object in the photo
    "astronaut": ("astronaut", (130, 0, 250, 300)),
    "cat": ("chelsea", (60, 0, 320, 300)),
    "coffee cup": ("coffee", (150, 20, 300, 300)),
    "rocket": ("rocket", (250, 20, 130, 400)),
}
NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four"}
SIDE = (0.2, 0.42)  # object box side, share of the canvas
PHOTO_BACKGROUND = 0.15
PHOTO_OBJECT = 0.25


@cache
def _thing(name: str) -> Thing:
    """The object a phrase stands for: "red circle" (a flat shape) or a photo object."""
    if name in PHOTO_OBJECTS:
        source, crop = PHOTO_OBJECTS[name]
        return Thing(kind="photo", photo=source, crop=crop, aspect=crop[2] / crop[3])
    colour, shape = name.split(" ", 1)
    return Thing(kind="shape", shape=shape, colour=colour, fill="flat", aspect=1.0)


def article(name: str) -> str:
    """'a red circle', 'an astronaut'."""
    return ("an " if name[0] in "aeiou" else "a ") + name


def plural(name: str, count: int) -> str:
    """'a red circle', 'three red circles'."""
    return article(name) if count == 1 else f"{NUMBERS[count]} {name}s"


def place(
    rng: np.random.Generator, boxes: list[tuple[int, int, int, int]], canvas: int = CANVAS
) -> tuple[int, int, int, int] | None:
    """A random square box (x0, y0, x1, y1) in pixels that overlaps none of `boxes`; None after 100 tries."""
    for _ in range(100):
        side = int(rng.uniform(*SIDE) * canvas)
        x0, y0 = (int(rng.integers(0, canvas - side + 1)) for _ in range(2))
        box = (x0, y0, x0 + side, y0 + side)
        if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in boxes):
            return box
    return None


def _shape_names(rng: np.random.Generator, n: int) -> list[str]:
    """`n` shape names with pairwise different colours (so each colour names one phrase)."""
    colours = rng.choice(list(COLOURS), size=n, replace=False)
    return [f"{c} {rng.choice(SHAPES)}" for c in colours]


def scene_groups(rng: np.random.Generator, kind: str) -> list[tuple[str, int]]:
    """(name, count) groups of a scene: "position" (two shapes), "counting" (one shape 2-4 times), or "dense"."""
    if kind == "position":
        return [(name, 1) for name in _shape_names(rng, 2)]
    if kind == "counting":
        return [(_shape_names(rng, 1)[0], int(rng.integers(2, 5)))]
    groups: list[tuple[str, int]] = []
    for name in _shape_names(rng, int(rng.integers(1, 4))):
        if rng.random() < PHOTO_OBJECT:
            name = str(rng.choice([p for p in PHOTO_OBJECTS if p not in {g for g, _ in groups}]))
        groups.append((name, 1))
    if rng.random() < 0.25:
        groups[0] = (groups[0][0], int(rng.integers(2, 4)) if groups[0][0] not in PHOTO_OBJECTS else 1)
    return groups


def lay_out(
    rng: np.random.Generator, groups: list[tuple[str, int]], canvas: int = CANVAS
) -> list[tuple[str, tuple[int, int, int, int]]] | None:
    """(name, pixel box) per instance, none overlapping; None when they do not fit."""
    placed: list[tuple[str, tuple[int, int, int, int]]] = []
    for name, count in groups:
        for _ in range(count):
            box = place(rng, [b for _, b in placed], canvas)
            if box is None:
                return None
            placed.append((name, box))
    return placed


def caption(
    groups: list[tuple[str, int]],
    placed: list[tuple[str, tuple[int, int, int, int]]],
    background: str,
    canvas: int,
) -> tuple[str, str | None]:
    """(the interleaved dense caption, the relation word used or None)."""
    boxes = {name: [to_grid(b, canvas, canvas) for n, b in placed if n == name] for name, _ in groups}
    parts = [
        plural(name, count) + " " + " ".join(format_box(b) for b in boxes[name]) for name, count in groups
    ]
    relation = None
    if len(groups) == 2 and all(c == 1 for _, c in groups):
        rel = relative_position(boxes[groups[0][0]][0], boxes[groups[1][0]][0])
        relation = next((r for r in RELATIONS if r in rel), None)
    text = f"{parts[0]} {relation} {parts[1]}" if relation else _join(parts)
    return f"{text} {background}", relation


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def geneval_meta(groups: list[tuple[str, int]], relation: str | None) -> tuple[str, dict[str, Any]] | None:
    """(GenEval-style prompt, metadata) of a position or counting scene of shapes; None for other scenes."""
    if any(name in PHOTO_OBJECTS for name, _ in groups):
        return None
    if len(groups) == 2 and relation:
        (a, _), (b, _) = groups
        meta = {"tag": "position", "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}]}  # fmt: skip
        return f"a photo of {article(a)} {relation} {article(b)}", meta
    if len(groups) == 1 and groups[0][1] > 1:
        name, count = groups[0]
        meta = {"tag": "counting", "include": [{"class": name, "count": count}], "exclude": [{"class": name, "count": count + 1}]}  # fmt: skip
        return f"a photo of {plural(name, count)}", meta
    return None


def draw(
    spec: dict[str, Any], placed: list[tuple[str, tuple[int, int, int, int]]], canvas: int = CANVAS
) -> tuple[np.ndarray, list[tuple[str, tuple[int, int, int, int]]]]:
    """(the HxWx3 uint8 scene, each instance with the tight box of the pixels it shows) of placed boxes."""
    things = [
        Placed(_thing(name), (x0, y0, x1 - x0, y1 - y0), "", i, "text")
        for i, (name, (x0, y0, x1, y1)) in enumerate(placed)
    ]
    image, owner = render(spec, canvas, canvas, things)
    tight = []
    for i, (name, _) in enumerate(placed):
        ys, xs = np.nonzero(owner == i)
        tight.append((name, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)))
    return image, tight


def background_words(spec: dict[str, Any]) -> str:
    """How the caption names the background."""
    return f"on a {spec['colour']} background" if spec["kind"] == "flat" else "in front of a photo"


def make_scene(
    rng: np.random.Generator, kind: str, photo_share: float
) -> tuple[list[tuple[str, int]], list[tuple[str, tuple[int, int, int, int]]], dict[str, Any]]:
    """(groups, placed instances, background spec) of one scene (retried until it fits)."""
    while True:
        groups = scene_groups(rng, kind)
        placed = lay_out(rng, groups)
        if placed is not None:
            return groups, placed, random_background(rng, CANVAS, CANVAS, photo_share)


def make_t2i(
    rng: np.random.Generator, split: str
) -> tuple[str, list[np.ndarray], np.ndarray, dict[str, Any]]:
    """A text-to-image sample: the interleaved caption -> the scene."""
    held_out = split == "test"
    while True:
        kind = str(rng.choice(["position", "counting"])) if held_out else str(rng.choice(["position", "counting", "dense"], p=[0.3, 0.2, 0.5]))  # fmt: skip
        groups, placed, spec = make_scene(rng, kind, 0.0 if held_out else PHOTO_BACKGROUND)
        image, placed = draw(spec, placed)
        text, relation = caption(groups, placed, background_words(spec), CANVAS)
        probe = geneval_meta(groups, relation)
        if probe is not None or not held_out:
            break
    fields: dict[str, Any] = {"task": "t2i", "background": spec}
    if probe is not None:
        fields["prompt"], fields["geneval"] = probe
    return text, [], image, fields


def make_edit(rng: np.random.Generator) -> tuple[str, list[np.ndarray], np.ndarray, dict[str, Any]]:
    """An edit of a scene: add, remove or recolour one object; the instruction grounds where."""
    while True:
        _, placed, spec = make_scene(rng, "dense", 0.0)
        source, tight = draw(spec, placed)  # `placed` draws the objects, `tight` says where they show
        shapes = [(i, n) for i, (n, _) in enumerate(placed) if n not in PHOTO_OBJECTS]
        counts = {n: sum(1 for m, _ in placed if m == n) for n, _ in placed}
        op = str(rng.choice(["add", "remove", "recolour"]))
        if op != "add" and not [s for s in shapes if counts[s[1]] == 1]:
            continue
        if op == "add":
            used = {n.split(" ")[0] for n, _ in placed}
            free = [c for c in COLOURS if c not in used]
            name = f"{rng.choice(free)} {rng.choice(SHAPES)}"
            box = place(rng, [b for _, b in placed])
            if box is None:
                continue
            target, after = draw(spec, [*placed, (name, box)])
            box = after[-1][1]
            anchor_name, anchor_box = tight[int(rng.integers(len(tight)))]
            rel = next((r for r in RELATIONS if r in relative_position(box, anchor_box)), None)
            if rel is None:
                continue
            grid = to_grid(box, CANVAS, CANVAS)
            instruction = f"add {article(name)} {format_box(grid)}"
            prompt = f"add {article(name)} {rel} the {anchor_name}"
            edit = {
                "op": op,
                "phrase": article(name),
                "box": list(grid),
                "relation": rel,
                "anchor": anchor_name,
            }
        else:
            i, name = [s for s in shapes if counts[s[1]] == 1][
                int(rng.integers(len([s for s in shapes if counts[s[1]] == 1])))
            ]
            grid = to_grid(tight[i][1], CANVAS, CANVAS)
            if op == "remove":
                target, after = draw(spec, placed[:i] + placed[i + 1 :])
                instruction, prompt = f"remove the {name} {format_box(grid)}", f"remove the {name}"
                edit = {"op": op, "phrase": f"the {name}", "box": list(grid)}
            else:
                used = {n.split(" ")[0] for n, _ in placed}
                colour = str(rng.choice([c for c in COLOURS if c not in used]))
                new = f"{colour} {name.split(' ', 1)[1]}"
                target, after = draw(spec, [*placed[:i], (new, placed[i][1]), *placed[i + 1 :]])
                instruction = f"make the {name} {format_box(grid)} {colour}"
                prompt = f"make the {name} {colour}"
                edit = {"op": op, "phrase": f"the {name}", "box": list(grid), "colour": colour}
        source_layout = [{"phrase": article(n), "box": list(to_grid(b, CANVAS, CANVAS))} for n, b in tight]
        target_layout = [{"phrase": article(n), "box": list(to_grid(b, CANVAS, CANVAS))} for n, b in after]
        fields = {"task": "edit", "background": spec, "prompt": prompt, "edit": edit, "source_layout": source_layout, "target_layout": target_layout}  # fmt: skip
        return instruction, [source], target, fields


def make_sample(split: str, index: int, seed: int) -> dict[str, Any]:
    """The sample `index` of `split`: deterministic in (seed, split, index)."""
    rng = numpy_rng(seed, "synth-layout", split, index)
    task = str(rng.choice(list(TASK_WEIGHTS), p=list(TASK_WEIGHTS.values())))
    instruction, refs, target, fields = make_edit(rng) if task == "edit" else make_t2i(rng, split)
    key = f"{split}_{index:06d}"
    layout: Layout = parse_layout(instruction, repair=False)
    text = {"instruction": instruction, "caption": layout.caption, "layout": layout.to_json()}
    return sample_record(key, text, refs, target, fields)


def samples(split: str, count: int, seed: int) -> Iterator[dict[str, Any]]:
    """`count` samples of `split`, each deterministic in (seed, split, index)."""
    for index in range(count):
        yield make_sample(split, index, seed)


__all__ = ["BACKGROUNDS", "Region", "make_sample", "samples"]
