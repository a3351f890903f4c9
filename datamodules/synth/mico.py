"""`omnilab data synth mico`: generated compositions of MICo's seven categories and De&Re, with exact targets.

Writes the MICo data kind (datamodules/mico.py; the multiref format with "category", "ref_roles",
"human_indices") from the real photos of `photos.PHOTOS` and the procedural objects of
datamodules/synth/multiref.py. The sources, one per reference image:
- object: a procedural shape or a photo patch, alone on a light background (`multiref.object_image`);
- scene: a crop of a real photo (`multiref.random_background`);
- human: a figure whose face is a crop of a real face (the astronaut, the two cats: `FACES`, elliptical)
  on a body in a shirt and trousers of named colours, alone on a light background;
- clothes: a garment (a T-shirt) of a named colour, flat or striped, alone on a light background.
The target is rendered from the program (as multiref's): scene or named flat background, people standing in
grid cells (about two cells tall, kept on the canvas; a try-on redraws the person's shirt as the garment),
objects in the other cells. Per category (cases in the order of `CATEGORY_WEIGHTS`): multi_object (2-4
objects), object_scene (scene + 1-2 objects), multi_person (2-3 people), person_scene (scene + 1-2 people),
human_object (1-2 people + 1-2 objects), human_clothes (a person + a garment), human_clothes_object
(a person + a garment + 1-2 objects), dere (a composition of 2-4 objects on a scene, decomposed:
`datamodules.curate.dere.decompose` cuts each object out with its exact mask; the sources are the clean
scene and the components, the target the original). Masks of De&Re components are the members
`mask{k}.png` (k = the reference index; 255 inside).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

import numpy as np
from PIL import Image

from datamodules.mico import category_from_kinds
from datamodules.synth.multiref import (
    COLOURS,
    POSITIONS,
    REF_BACKGROUNDS,
    SHADE,
    Placed,
    Thing,
    _join,
    cell_box,
    object_image,
    object_record,
    png,
    random_background,
    random_photo_object,
    random_shape,
    render,
    target_size,
)
from datamodules.synth.photos import photo
from omnilab.seeding import numpy_rng

DEFAULT_SAMPLES = {"train": 512, "val": 64, "test": 64}
CATEGORY_WEIGHTS = {
    "multi_object": 0.14, "object_scene": 0.12, "multi_person": 0.12, "person_scene": 0.12,
    "human_object": 0.14, "human_clothes": 0.12, "human_clothes_object": 0.12, "dere": 0.12,
}  # fmt: skip
FACES = {  # (photo, (x, y, w, h)) of a face in the photo
    "astronaut": ("astronaut", (160, 30, 130, 160)),
    "chelsea": ("chelsea", (60, 0, 320, 300)),
    "cat": ("cat", (100, 0, 260, 300)),
}


@cache
def _face(name: str) -> Image.Image:
    source, (x, y, w, h) = FACES[name]
    return Image.fromarray(photo(source)).crop((x, y, x + w, y + h))


@dataclass(frozen=True)
class Figure:
    """A person (face crop, shirt, trousers) or a garment, drawn like multiref's `Thing`."""

    kind: str  # "human" | "clothes"
    face: str = ""  # one of FACES (people)
    shirt: str = "blue"
    trousers: str = "black"
    fill: str = "flat"  # the shirt's: "flat" | "stripes"
    aspect: float = 0.5

    @property
    def name(self) -> str:
        """How the program names it."""
        return f"person {self.face}" if self.kind == "human" else f"{self.shirt} t-shirt"

    shape, colour, photo = "", "", ""

    def _shirt(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        base = np.array(COLOURS[self.shirt], np.float64)
        dark = (np.sin(14 * v) > 0) if self.fill == "stripes" else np.zeros(u.shape, bool)
        return np.where(dark[..., None], base * SHADE, base)

    def render(self, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """(HxWx3 uint8, HxW bool mask) in a width x height box."""
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
        u, v = xs / width, ys / height
        rgb = np.zeros((height, width, 3))
        if self.kind == "clothes":  # a T-shirt: body and two sleeves
            body = (np.abs(u - 0.5) < 0.3) & (v > 0.15) & (v < 0.95)
            sleeves = (np.abs(u - 0.5) < 0.48) & (v > 0.15) & (v < 0.42)
            mask = body | sleeves
            rgb[:] = self._shirt(u, v)
            return np.rint(rgb).astype(np.uint8), mask
        head = ((u - 0.5) / 0.3) ** 2 + ((v - 0.17) / 0.16) ** 2 <= 1
        torso = (np.abs(u - 0.5) < 0.36) & (v >= 0.33) & (v < 0.66)
        legs = ((np.abs(u - 0.36) < 0.11) | (np.abs(u - 0.64) < 0.11)) & (v >= 0.66)
        face = np.asarray(_face(self.face).resize((width, max(1, round(0.34 * height))), Image.BILINEAR))
        rgb[: face.shape[0]] = face[:height]
        rgb = np.where(torso[..., None], self._shirt(u, v), rgb)
        rgb = np.where(legs[..., None], np.array(COLOURS[self.trousers], np.float64), rgb)
        return np.rint(rgb).astype(np.uint8), head | torso | legs


def random_person(rng: np.random.Generator) -> Figure:
    """A person with a random face, a plain shirt and trousers."""
    colours = list(COLOURS)
    return Figure("human", face=str(rng.choice(list(FACES))), shirt=str(rng.choice(colours)),
                  trousers=str(rng.choice(colours)), aspect=float(rng.uniform(0.42, 0.55)))  # fmt: skip


def figure_image(figure: Figure, rng: np.random.Generator) -> np.ndarray:
    """A person or a garment alone, centred on a light background (the source image)."""
    height = int(rng.integers(96, 193))
    width = max(48, round(height * max(figure.aspect, 0.8)))
    spec = {"kind": "flat", "rgb": list(REF_BACKGROUNDS[str(rng.choice(list(REF_BACKGROUNDS)))])}
    fh = round(height * 0.85)
    fw = max(4, round(fh * figure.aspect))
    box = ((width - fw) // 2, (height - fh) // 2, fw, fh)
    return render(spec, width, height, [Placed(figure, box, "center", 0, "ref")])[0]  # type: ignore[arg-type]


# --------------------------------------------------------------------------- categories


def make_category(rng: np.random.Generator, category: str) -> tuple[str, list[np.ndarray], np.ndarray, dict]:
    """(instruction, sources, target, json fields) of one composition of `category` (not dere)."""
    width, height = target_size(rng)
    cells = [str(c) for c in rng.permutation(list(POSITIONS))]
    sources: list[np.ndarray] = []
    roles: list[str] = []
    placed: list[Placed] = []
    parts: list[str] = []
    scene = category in ("object_scene", "person_scene") or (
        category.startswith("human") and rng.random() < 0.5
    )
    if scene:
        spec = random_background(rng, width, height, photo_share=1.0)
        sources.append(np.asarray(Image.fromarray(render(spec, width, height, [])[0])))
        roles.append("scene")
    else:
        spec = {"kind": "flat", "colour": "white", "rgb": [245, 245, 245]}
    n_people = {"multi_person": int(rng.integers(2, 4)), "person_scene": int(rng.integers(1, 3)),
                "human_object": int(rng.integers(1, 3)), "human_clothes": 1,
                "human_clothes_object": 1}.get(category, 0)  # fmt: skip
    n_objects = {"multi_object": int(rng.integers(2, 5)), "object_scene": int(rng.integers(1, 3)),
                 "human_object": int(rng.integers(1, 3)),
                 "human_clothes_object": int(rng.integers(1, 3))}.get(category, 0)  # fmt: skip
    people = [random_person(rng) for _ in range(n_people)]
    garment = None
    if category.startswith("human_clothes"):
        garment = Figure("clothes", shirt=str(rng.choice(list(COLOURS))), fill=str(rng.choice(["flat", "stripes"])),
                         aspect=1.0)  # fmt: skip
    for person in people:
        k = len(sources) + 1
        sources.append(figure_image(person, rng))
        roles.append("human")
        shown = replace(person, shirt=garment.shirt, fill=garment.fill) if garment is not None else person
        cell = cells.pop()
        row, col = POSITIONS[cell]
        ch = height / 3 * float(rng.uniform(1.6, 2.0))
        w = max(4, round(ch * shown.aspect))
        cx, cy = (col + 0.5) * width / 3, (row + 0.5) * height / 3
        x0 = int(np.clip(round(cx - w / 2), 0, max(0, width - w)))  # the whole figure stays on the canvas
        y0 = int(np.clip(round(cy - ch / 2), 0, max(0, height - round(ch))))
        box = (x0, y0, w, round(ch))
        placed.append(Placed(shown, box, cell, len(placed), f"image {k}"))  # type: ignore[arg-type]
        parts.append(f"the person from image {k} at the {cell}")
    if garment is not None:
        k = len(sources) + 1
        sources.append(figure_image(garment, rng))
        roles.append("clothes")
        parts.append(f"wearing the t-shirt from image {k}")
    for _ in range(n_objects):
        thing: Thing = random_photo_object(rng) if rng.random() < 0.3 else random_shape(rng)
        k = len(sources) + 1
        sources.append(object_image(thing, rng))
        roles.append("object")
        cell = cells.pop()
        placed.append(Placed(thing, cell_box(cell, width, height, thing, float(rng.uniform(0.6, 0.85))), cell,
                             len(placed), f"image {k}"))  # fmt: skip
        parts.append(f"the object from image {k} at the {cell}")
    target, owner = render(spec, width, height, placed)
    where = "in the scene of image 1" if scene else "on a white background"
    instruction = f"Show {_join(parts)} {where}."
    records = [object_record(p, owner, target) for p in placed]
    kinds = category_from_kinds("human" in roles, "object" in roles, "clothes" in roles, "scene" in roles)
    assert kinds == category, (kinds, category)
    fields = {"task": "compose", "category": category, "ref_roles": roles,
              "human_indices": [i for i, r in enumerate(roles) if r == "human"], "objects": records,
              "background": spec}  # fmt: skip
    return instruction, sources, target, {**fields, "_owner": owner, "_spec": spec, "_placed": placed}


def make_dere(rng: np.random.Generator) -> tuple[str, list[np.ndarray], np.ndarray, dict, list[np.ndarray]]:
    """A De&Re sample: a generated scene with 2-4 objects, decomposed with its exact masks and clean scene."""
    from datamodules.curate.dere import decompose, dere_instruction

    width, height = target_size(rng)
    spec = random_background(rng, width, height, photo_share=1.0)
    cells = [str(c) for c in rng.permutation(list(POSITIONS))]
    placed = []
    for i in range(int(rng.integers(2, 5))):
        thing = random_photo_object(rng) if rng.random() < 0.3 else random_shape(rng)
        cell = cells.pop()
        placed.append(
            Placed(
                thing, cell_box(cell, width, height, thing, float(rng.uniform(0.6, 0.85))), cell, i, "scene"
            )
        )
    image, owner = render(spec, width, height, placed)
    clean = render(spec, width, height, [])[0]
    components, masks = decompose(image, owner + 1, clean)
    kept = [p for p in placed if (owner == p.ident).sum() >= 16]  # the components decompose keeps, in order
    instruction = dere_instruction([p.thing.name for p in kept])
    roles = ["scene"] + ["component"] * (len(components) - 1)
    fields = {"task": "compose", "category": "dere", "ref_roles": roles, "human_indices": [],
              "objects": [object_record(p, owner, image) for p in placed], "background": spec}  # fmt: skip
    return instruction, components, image, fields, masks


def make_sample(split: str, index: int, seed: int) -> dict[str, Any]:
    """The sample `index` of `split`: deterministic in (seed, split, index)."""
    rng = numpy_rng(seed, "synth-mico", split, index)
    category = (
        list(CATEGORY_WEIGHTS)[index % len(CATEGORY_WEIGHTS)]
        if split != "train"
        else str(rng.choice(list(CATEGORY_WEIGHTS), p=list(CATEGORY_WEIGHTS.values())))
    )
    masks: list[np.ndarray] = []
    if category == "dere":
        instruction, sources, target, fields, masks = make_dere(rng)
    else:
        instruction, sources, target, fields = make_category(rng, category)
    fields = {k: v for k, v in fields.items() if not k.startswith("_")}
    key = f"{split}_{index:06d}"
    meta = {"instruction": instruction, "n_refs": len(sources), "source": "synth", "orig_id": key,
            "ref_sizes": [[s.shape[1], s.shape[0]] for s in sources],
            "target_size": [target.shape[1], target.shape[0]], **fields}  # fmt: skip
    sample: dict[str, Any] = {"__key__": key, "json": meta, "target.png": png(target)}
    for k, source in enumerate(sources):
        sample[f"ref{k}.png"] = png(source)
    for k, mask in enumerate(masks):
        if mask is not None:
            sample[f"mask{k}.png"] = png(np.repeat(mask[..., None], 3, 2))
    return sample


def samples(split: str, count: int, seed: int) -> Iterator[dict[str, Any]]:
    """`count` samples of `split` (evaluation splits cycle through the categories)."""
    for index in range(count):
        yield make_sample(split, index, seed)
