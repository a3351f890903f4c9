"""`omnilab data synth multiref`: generated edits and compositions whose targets are exact.

Writes the sample format of `datamodules/multiref.py` (the notes docs/methods/uniref.md), small
enough for the tiny UniRef / UniPic-3 runs, with every task the data kind knows:
- "edit" (1 ref, 35%): image 1 is a scene (a crop of a real photo from `photos.PHOTOS`, or a flat colour)
  with 1-3 procedural objects; one or two operations on named objects: recolor ("Make the red star
  blue"), resize ("Make the blue circle twice as big" / "half its size" / "1.5 times as big"), remove
  ("Remove the green triangle": the target shows the background where it was) or move ("Move the red
  star to the bottom right").
- "compose" (2-6 refs, 50%): image 1 is the background scene and images 2..N each show one object
  ("Put the object from image 2 at the top left and the object from image 3 at the bottom right of
  image 1"), sometimes recoloured ("..., in green, ..."); or (a quarter of them) every image is an object,
  placed on a named flat background.
- "t2i" (0 refs, 15%): "a red star at the top left and a blue circle at the center on a white background".

Objects are procedural shapes (circle, ellipse, square, rectangle, triangle, diamond, pentagon, hexagon,
star; flat, striped or checkered in two shades of one named colour) or, in compositions, crops of real
photos with an elliptical silhouette. An object image shows the object alone, centred on a plain light
background, 48-256 px a side at various aspect ratios; targets are 96-256 px a side. Positions are the
cells of a 3x3 grid ("top left" ... "center" ... "bottom right"); an object is drawn centred in its cell.

Exact targets: the target is rendered from the program, not edited from pixels: a shape's pixels are
those whose centre falls inside the analytic shape at the object's box, a photo object's are its crop
resized to the box inside the inscribed ellipse. The json's "program" lists the operations with their
arguments and results, "objects" the objects of the target, "background" the background, so rewards can
check colour, position and count. Boxes are [x0, y0, x1, y1) in target pixels, tight around the pixels
the object shows (after occlusion); "pixels" counts them.

The refs are as small as 48 px, so the data kind needs `min_side` <= 32 on these shards (tiny configs).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

import numpy as np
from PIL import Image

from datamodules.synth.photos import PHOTOS, photo
from omnilab.seeding import numpy_rng

DEFAULT_SAMPLES = {"train": 512, "val": 64, "test": 64}
TASK_WEIGHTS = {"edit": 0.35, "compose": 0.5, "t2i": 0.15}
POSITIONS = {  # name -> (row, col) of the 3x3 grid
    "top left": (0, 0),
    "top": (0, 1),
    "top right": (0, 2),
    "left": (1, 0),
    "center": (1, 1),
    "right": (1, 2),
    "bottom left": (2, 0),
    "bottom": (2, 1),
    "bottom right": (2, 2),
}
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "magenta": (210, 50, 200),
    "cyan": (40, 200, 210),
    "orange": (245, 130, 30),
    "purple": (120, 50, 170),
}
BACKGROUNDS = {
    "white": (245, 245, 245),
    "light grey": (200, 200, 200),
    "black": (20, 20, 20),
    "beige": (225, 210, 180),
}
REF_BACKGROUNDS = {"white": (245, 245, 245), "light grey": (215, 215, 215)}
SHAPES = ("circle", "ellipse", "square", "rectangle", "triangle", "diamond", "pentagon", "hexagon", "star")
POLYGON_SIDES = {"triangle": 3, "diamond": 4, "pentagon": 5, "hexagon": 6}
FILLS = ("flat", "stripes", "checker")
RESIZE_WORDS = {2.0: "twice as big", 1.5: "1.5 times as big", 0.5: "half its size"}
TARGET_SIDES = (96, 256)
REF_SIDES = (48, 256)
SHADE = 0.6  # the second shade of a pattern: the colour times this


# --------------------------------------------------------------------------- objects


@dataclass(frozen=True)
class Thing:
    """One object: a procedural shape in a named colour, or a crop of a real photo."""

    kind: str  # "shape" | "photo"
    shape: str = ""  # one of SHAPES (shapes only)
    colour: str = ""  # one of COLOURS (shapes only)
    fill: str = "flat"
    frequency: float = 6.0
    angle: float = 0.0
    aspect: float = 1.0  # box width / height
    photo: str = ""  # one of PHOTOS (photo objects only)
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)  # (x, y, w, h) in the photo

    @property
    def name(self) -> str:
        """How an instruction names it: "red star" (shapes) or "photo patch"."""
        return f"{self.colour} {self.shape}" if self.kind == "shape" else "photo patch"

    def inside(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Whether box coordinates (u, v) in [-1, 1]^2 lie inside the object's silhouette."""
        if self.kind == "photo" or self.shape in ("circle", "ellipse"):
            return u**2 + v**2 <= 1.0
        if self.shape in ("square", "rectangle"):
            return (np.abs(u) <= 0.9) & (np.abs(v) <= 0.9)
        r, theta = np.hypot(u, v), np.arctan2(-v, u)  # -v: the first vertex points up
        if self.shape == "star":
            sector = 2 * np.pi / 5
            t = np.abs((((theta - np.pi / 2) % sector) / sector) * 2 - 1)  # 1 at a point, 0 between
            return r <= 0.45 + 0.55 * t
        n = POLYGON_SIDES[self.shape]  # a regular polygon of circumradius 1, a vertex at the top
        sector = 2 * np.pi / n
        phi = ((theta - np.pi / 2) % sector) - sector / 2
        return r * np.cos(phi) <= np.cos(np.pi / n)

    def render(self, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """(HxWx3 uint8 pixels, HxW bool mask) of the object drawn in a width x height box."""
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
        u, v = xs / width * 2 - 1, ys / height * 2 - 1
        mask = self.inside(u, v)
        if self.kind == "photo":
            x, y, w, h = self.crop
            img = _photo_image(self.photo).resize(
                (width, height), Image.Resampling.BILINEAR, box=(x, y, x + w, y + h)
            )
            return np.asarray(img, dtype=np.uint8), mask
        base = np.array(COLOURS[self.colour], np.float64)
        along = u * np.cos(self.angle) + v * np.sin(self.angle)
        if self.fill == "stripes":
            dark = np.sin(self.frequency * along) > 0
        elif self.fill == "checker":
            dark = (np.floor(self.frequency * u / 2) + np.floor(self.frequency * v / 2)) % 2 == 1
        else:
            dark = np.zeros(u.shape, bool)
        rgb = np.where(dark[..., None], base * SHADE, base)
        return np.rint(rgb).astype(np.uint8), mask


@cache
def _photo_image(name: str) -> Image.Image:
    return Image.fromarray(photo(name))


def random_shape(
    rng: np.random.Generator, shape: str | None = None, colour: str | None = None, flat: bool = False
) -> Thing:
    """A procedural shape (random unless given), in a named colour, flat or patterned."""
    shape = shape or str(rng.choice(SHAPES))
    if shape in ("circle", "square"):
        aspect = 1.0
    elif shape in ("ellipse", "rectangle"):
        ratio = float(rng.uniform(1.4, 2.5))
        aspect = ratio if rng.random() < 0.5 else 1 / ratio  # wide or tall
    else:
        aspect = float(rng.uniform(0.85, 1.15))
    return Thing(
        kind="shape",
        shape=shape,
        colour=colour or str(rng.choice(list(COLOURS))),
        fill="flat" if flat else str(rng.choice(FILLS, p=[0.5, 0.25, 0.25])),
        frequency=float(rng.uniform(8, 16)),
        angle=float(rng.uniform(0, np.pi)),
        aspect=aspect,
    )


def random_photo_object(rng: np.random.Generator) -> Thing:
    """A crop of a real photo (64-200 px, aspect 0.6-1.6) used as an object."""
    name = str(rng.choice(PHOTOS))
    ph, pw = photo(name).shape[:2]
    aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
    side = float(rng.uniform(64, 200))
    w, h = min(pw, round(side * np.sqrt(aspect))), min(ph, round(side / np.sqrt(aspect)))
    x, y = int(rng.integers(0, pw - w + 1)), int(rng.integers(0, ph - h + 1))
    return Thing(kind="photo", photo=name, crop=(x, y, w, h), aspect=w / h)


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Placed:
    """An object on the canvas: its box (x, y, w, h) in pixels, the grid cell it is centred in, its id."""

    thing: Thing
    box: tuple[int, int, int, int]
    position: str
    ident: int
    source: str  # "image k", "scene" or "text"


def cell_box(position: str, width: int, height: int, thing: Thing, fill: float) -> tuple[int, int, int, int]:
    """The box (x, y, w, h) of `thing` (its aspect) centred in a grid cell, `fill` of the cell's size."""
    row, col = POSITIONS[position]
    cw, ch = width / 3, height / 3
    if thing.aspect >= cw / ch:
        w = fill * cw
        h = w / thing.aspect
    else:
        h = fill * ch
        w = h * thing.aspect
    w, h = max(4, round(w)), max(4, round(h))
    cx, cy = (col + 0.5) * cw, (row + 0.5) * ch
    return round(cx - w / 2), round(cy - h / 2), w, h


def background(spec: dict[str, Any], width: int, height: int) -> np.ndarray:
    """The HxWx3 uint8 background a spec describes: {"kind": "flat", "rgb"} or {"kind": "photo", "photo", "crop"}."""
    if spec["kind"] == "flat":
        return np.broadcast_to(np.array(spec["rgb"], np.uint8), (height, width, 3)).copy()
    x, y, w, h = spec["crop"]
    img = _photo_image(spec["photo"]).resize(
        (width, height), Image.Resampling.BICUBIC, box=(x, y, x + w, y + h)
    )
    return np.asarray(img, dtype=np.uint8).copy()


def random_background(
    rng: np.random.Generator, width: int, height: int, photo_share: float
) -> dict[str, Any]:
    """A background spec: a crop of a real photo (with probability photo_share) or a named flat colour."""
    if rng.random() < photo_share:
        name = str(rng.choice(PHOTOS))
        ph, pw = photo(name).shape[:2]
        most = min(ph / height, pw / width)  # the largest crop of the target's aspect
        scale = float(rng.uniform(min(1.0, most), most))
        w, h = round(width * scale), round(height * scale)
        x, y = int(rng.integers(0, pw - w + 1)), int(rng.integers(0, ph - h + 1))
        return {"kind": "photo", "photo": name, "crop": [x, y, w, h]}
    colour = str(rng.choice(list(BACKGROUNDS)))
    return {"kind": "flat", "colour": colour, "rgb": list(BACKGROUNDS[colour])}


def render(
    spec: dict[str, Any], width: int, height: int, placed: list[Placed]
) -> tuple[np.ndarray, np.ndarray]:
    """(HxWx3 uint8 image, HxW int32 owner map: -1 background, else the object's id), drawn in list order."""
    img = background(spec, width, height)
    owner = np.full((height, width), -1, np.int32)
    for p in placed:
        x, y, w, h = p.box
        pix, mask = p.thing.render(w, h)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        if x0 >= x1 or y0 >= y1:
            continue
        m = mask[y0 - y : y1 - y, x0 - x : x1 - x]
        img[y0:y1, x0:x1][m] = pix[y0 - y : y1 - y, x0 - x : x1 - x][m]
        owner[y0:y1, x0:x1][m] = p.ident
    return img, owner


def object_record(p: Placed, owner: np.ndarray, img: np.ndarray) -> dict[str, Any]:
    """The json record of a placed object in the target: name, colour, position, tight box, pixels."""
    ys, xs = np.nonzero(owner == p.ident)
    bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] if len(xs) else None
    if p.thing.kind == "shape":
        rgb: list[int] | None = list(COLOURS[p.thing.colour])
    else:  # a photo object: the mean colour it shows
        rgb = [int(c) for c in np.rint(img[ys, xs].mean(0))] if len(xs) else None
    return {
        "id": p.ident,
        "kind": p.thing.kind,
        "name": p.thing.name,
        "shape": p.thing.shape or None,
        "colour": p.thing.colour or None,
        "rgb": rgb,
        "fill": p.thing.fill if p.thing.kind == "shape" else None,
        "photo": p.thing.photo or None,
        "position": p.position,
        "box": list(p.box),
        "bbox": bbox,
        "pixels": len(xs),
        "source": p.source,
    }


def object_image(thing: Thing, rng: np.random.Generator) -> np.ndarray:
    """The reference image of one object: alone, centred on a plain light background, 48-256 px a side."""
    lo, hi = REF_SIDES
    aspect = float(np.clip(thing.aspect * np.exp(rng.uniform(-0.2, 0.2)), 0.5, 2.0))
    long = float(np.exp(rng.uniform(np.log(lo * max(aspect, 1 / aspect)), np.log(hi))))  # short side >= lo
    width, height = (long, long / aspect) if aspect >= 1 else (long * aspect, long)
    width, height = int(np.clip(round(width), lo, hi)), int(np.clip(round(height), lo, hi))
    fill = float(rng.uniform(0.6, 0.9))
    ow, oh = (
        (fill * width, fill * width / thing.aspect)
        if thing.aspect >= width / height
        else (fill * height * thing.aspect, fill * height)
    )
    ow, oh = max(4, round(ow)), max(4, round(oh))
    colour = str(rng.choice(list(REF_BACKGROUNDS)))
    spec = {"kind": "flat", "rgb": list(REF_BACKGROUNDS[colour])}
    box = ((width - ow) // 2, (height - oh) // 2, ow, oh)
    img, _ = render(spec, width, height, [Placed(thing, box, "center", 0, "ref")])
    return img


def target_size(rng: np.random.Generator) -> tuple[int, int]:
    """A random (width, height), sides 96-256 px in steps of 8, aspect between 1:2 and 2:1."""
    lo, hi = TARGET_SIDES
    while True:
        w, h = (8 * int(rng.integers(lo // 8, hi // 8 + 1)) for _ in range(2))
        if 0.5 <= w / h <= 2.0:
            return w, h


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _distinct_shapes(rng: np.random.Generator, count: int, flat: bool = False) -> list[Thing]:
    """`count` shapes with pairwise different names (colour + shape)."""
    things: list[Thing] = []
    while len(things) < count:
        t = random_shape(rng, flat=flat)
        if all(t.name != o.name for o in things):
            things.append(t)
    return things


# --------------------------------------------------------------------------- tasks


def make_edit(rng: np.random.Generator) -> tuple[str, list[np.ndarray], np.ndarray, dict[str, Any]]:
    """One single-image edit: (instruction, [scene], target, json fields)."""
    width, height = target_size(rng)
    spec = random_background(rng, width, height, photo_share=0.7)
    cells = [str(c) for c in rng.permutation(list(POSITIONS))]
    things = _distinct_shapes(rng, int(rng.integers(1, 4)))
    scene = [
        Placed(t, cell_box(cells[i], width, height, t, float(rng.uniform(0.6, 0.85))), cells[i], i, "scene")
        for i, t in enumerate(things)
    ]
    free = cells[len(things) :]
    n_ops = 2 if len(scene) >= 2 and rng.random() < 0.2 else 1
    targets = [int(i) for i in rng.permutation(len(scene))[:n_ops]]
    after = {p.ident: p for p in scene}
    ops, phrases = [], []
    for i in targets:
        p = after[i]
        op = str(rng.choice(["recolor", "resize", "remove", "move"]))
        if op == "recolor":
            taken = {q.thing.name for q in after.values()}
            choices = [c for c in COLOURS if c != p.thing.colour and f"{c} {p.thing.shape}" not in taken]
            new = str(rng.choice(choices))
            after[i] = replace(p, thing=replace(p.thing, colour=new))
            wording = (f"make the {p.thing.name} {new}", f"change the colour of the {p.thing.name} to {new}")
            phrases.append(wording[int(rng.integers(2))])
            box = list(p.box)
            ops.append(
                {
                    "op": "recolor",
                    "object": i,
                    "from": p.thing.colour,
                    "to": new,
                    "box_before": box,
                    "box": box,
                }
            )
        elif op == "resize":
            factor = float(rng.choice(list(RESIZE_WORDS)))
            x, y, w, h = p.box
            nw, nh = max(4, round(w * factor)), max(4, round(h * factor))
            box = (x + w // 2 - nw // 2, y + h // 2 - nh // 2, nw, nh)
            after[i] = replace(p, box=box)
            phrases.append(f"make the {p.thing.name} {RESIZE_WORDS[factor]}")
            ops.append(
                {"op": "resize", "object": i, "factor": factor, "box_before": list(p.box), "box": list(box)}
            )
        elif op == "remove":
            del after[i]
            phrases.append(f"remove the {p.thing.name}")
            ops.append({"op": "remove", "object": i, "box_before": list(p.box)})
        else:
            to = free.pop()
            w, h = p.box[2], p.box[3]
            row, col = POSITIONS[to]
            cx, cy = (col + 0.5) * width / 3, (row + 0.5) * height / 3
            box = (round(cx - w / 2), round(cy - h / 2), w, h)
            after[i] = replace(p, box=box, position=to)
            phrases.append(f"move the {p.thing.name} to the {to}")
            ops.append(
                {
                    "op": "move",
                    "object": i,
                    "from": p.position,
                    "to": to,
                    "box_before": list(p.box),
                    "box": list(box),
                }
            )
    source, _ = render(spec, width, height, scene)
    edited = [q for q in after.values() if q.ident not in targets] + [after[i] for i in targets if i in after]
    target, owner = render(spec, width, height, edited)
    instruction = " and ".join(phrases)
    instruction = instruction[0].upper() + instruction[1:] + "."
    if rng.random() < 0.3:
        instruction = f"In image 1, {instruction[0].lower()}{instruction[1:]}"
    return instruction, [source], target, _fields("edit", ["scene"], spec, ops, edited, owner, target)


def make_compose(
    rng: np.random.Generator, n_refs: int
) -> tuple[str, list[np.ndarray], np.ndarray, dict[str, Any]]:
    """One composition of `n_refs` images: (instruction, refs, target, json fields)."""
    on_scene = rng.random() >= 0.25  # image 1 is the background scene (else: objects on a named colour)
    width, height = target_size(rng)
    cells = [str(c) for c in rng.permutation(list(POSITIONS))]
    placed: list[Placed] = []
    ops: list[dict[str, Any]] = []
    refs: list[np.ndarray] = []
    if on_scene:
        spec = random_background(rng, width, height, photo_share=0.75)
        if rng.random() < 0.3:  # the scene already holds an object
            t = random_shape(rng)
            cell = cells.pop()
            placed.append(
                Placed(t, cell_box(cell, width, height, t, float(rng.uniform(0.6, 0.85))), cell, 0, "scene")
            )
        refs.append(render(spec, width, height, placed)[0])
    else:
        colour = str(rng.choice(list(BACKGROUNDS)))
        spec = {"kind": "flat", "colour": colour, "rgb": list(BACKGROUNDS[colour])}
    first = len(refs) + 1
    names: set[str] = {p.thing.name for p in placed}
    parts = []
    for k in range(first, n_refs + 1):
        if rng.random() < 0.3:
            thing = random_photo_object(rng)
        else:
            thing = random_shape(rng)
            while thing.name in names:
                thing = random_shape(rng)
        refs.append(object_image(thing, rng))
        recolour = None
        if thing.kind == "shape" and rng.random() < 0.25:
            recolour = str(rng.choice([c for c in COLOURS if c != thing.colour]))
        shown = replace(thing, colour=recolour) if recolour else thing
        names.add(shown.name)
        cell = cells.pop()
        ident = len(placed)
        placed.append(
            Placed(
                shown,
                cell_box(cell, width, height, shown, float(rng.uniform(0.6, 0.85))),
                cell,
                ident,
                f"image {k}",
            )
        )
        mention = str(rng.choice(["image", "image", "Picture"])) if k == first else "image"
        colour_words = f", in {recolour}," if recolour else ""
        parts.append(f"the object from {mention} {k}{colour_words} at the {cell}")
        ops.append(
            {
                "op": "place",
                "ref": k,
                "object": ident,
                "position": cell,
                "colour": recolour,
                "box": list(placed[-1].box),
            }
        )
    verb = str(rng.choice(["Put", "Place", "Add"]))
    where = "of image 1" if on_scene else f"on a {spec['colour']} background"
    instruction = f"{verb} {_join(parts)} {where}."
    target, owner = render(spec, width, height, placed)
    roles = ["scene"] * on_scene + ["object"] * (n_refs - on_scene)
    return instruction, refs, target, _fields("compose", roles, spec, ops, placed, owner, target)


def make_t2i(rng: np.random.Generator) -> tuple[str, list[np.ndarray], np.ndarray, dict[str, Any]]:
    """One text-to-image sample: 1-3 flat shapes at named positions on a named flat background."""
    width, height = target_size(rng)
    colour = str(rng.choice(list(BACKGROUNDS)))
    spec = {"kind": "flat", "colour": colour, "rgb": list(BACKGROUNDS[colour])}
    cells = [str(c) for c in rng.permutation(list(POSITIONS))]
    things = _distinct_shapes(rng, int(rng.integers(1, 4)), flat=True)
    placed = [
        Placed(t, cell_box(cells[i], width, height, t, float(rng.uniform(0.6, 0.85))), cells[i], i, "text")
        for i, t in enumerate(things)
    ]
    ops = [
        {
            "op": "draw",
            "object": p.ident,
            "shape": p.thing.shape,
            "colour": p.thing.colour,
            "position": p.position,
            "box": list(p.box),
        }
        for p in placed
    ]
    instruction = (
        _join([f"a {p.thing.name} at the {p.position}" for p in placed]) + f" on a {colour} background"
    )
    target, owner = render(spec, width, height, placed)
    return instruction, [], target, _fields("t2i", [], spec, ops, placed, owner, target)


def _fields(
    task: str,
    roles: list[str],
    spec: dict[str, Any],
    ops: list[dict[str, Any]],
    placed: list[Placed],
    owner: np.ndarray,
    target: np.ndarray,
) -> dict[str, Any]:
    """The json fields of the exact ground truth: task, ref roles, program (ops + result boxes), objects."""
    records = [object_record(p, owner, target) for p in sorted(placed, key=lambda p: p.ident)]
    boxes = {r["id"]: r["bbox"] for r in records}
    for op in ops:
        op["bbox"] = boxes.get(op["object"])  # None once removed
    return {"task": task, "ref_roles": roles, "program": ops, "objects": records, "background": spec}


# --------------------------------------------------------------------------- samples


def make_sample(split: str, index: int, seed: int) -> dict[str, Any]:
    """The sample `index` of `split`: deterministic in (seed, split, index)."""
    rng = numpy_rng(seed, "synth-multiref", split, index)
    task = str(rng.choice(list(TASK_WEIGHTS), p=list(TASK_WEIGHTS.values())))
    if task == "edit":
        instruction, refs, target, fields = make_edit(rng)
    elif task == "compose":
        instruction, refs, target, fields = make_compose(rng, int(rng.integers(2, 7)))
    else:
        instruction, refs, target, fields = make_t2i(rng)
    return sample_record(f"{split}_{index:06d}", {"instruction": instruction}, refs, target, fields)


def sample_record(
    key: str, text: dict[str, Any], refs: list[np.ndarray], target: np.ndarray, fields: dict[str, Any]
) -> dict[str, Any]:
    """A generated sample in the multiref layout: json (`text`, sizes, `fields`), target.png and ref<k>.png."""
    meta = {
        **text,
        "n_refs": len(refs),
        "source": "synth",
        "orig_id": key,
        "ref_sizes": [[r.shape[1], r.shape[0]] for r in refs],
        "target_size": [target.shape[1], target.shape[0]],
        **fields,
    }
    sample: dict[str, Any] = {"__key__": key, "json": meta, "target.png": png(target)}
    for k, ref in enumerate(refs):
        sample[f"ref{k}.png"] = png(ref)
    return sample


def png(img: np.ndarray) -> bytes:
    """PNG bytes of an HxWx3 uint8 image at zlib level 1 (the same pixels, several times faster than 6)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def samples(split: str, count: int, seed: int) -> Iterator[dict[str, Any]]:
    """`count` samples of `split`, each deterministic in (seed, split, index)."""
    for index in range(count):
        yield make_sample(split, index, seed)
