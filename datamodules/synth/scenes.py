"""`omnilab data synth scenes`: generated scenes with exact depth, segmentation, edits and questions.

The embedded default of the unified models (docs/methods/metaquery.md, docs/methods/unimrg.md), in the
`datamodules/scenes.py` format. A scene is a floor below a wall, both textured with a dimmed crop of a real photo,
and 1-3 flat objects (distinct shapes and colours) standing on the floor. The geometry is a pinhole camera over
a ground plane, so everything is known exactly:

- the wall is at distance `WALL` (1.0); a floor row y below the horizon y_h is at distance
  d(y) = 1 / (1 / WALL + (NEAR_DISPARITY − 1 / WALL) · (y − y_h) / (S − 1 − y_h)), i.e. disparity 1/d grows
  linearly down the image, as it does on a real ground plane;
- an object standing with its base on row y_b is a billboard at distance d(y_b) (constant over its pixels), and
  its size is proportional to 1/d(y_b); objects are drawn far to near (painter's order), so occlusion is exact;
- depth (`depth.npy`) is the disparity 1/d per pixel (larger = nearer), the relative inverse depth Depth-Anything-V2
  predicts for a real image; segmentation (`seg.png`) paints object i (1-based, in drawing order) with
  `PALETTE[i]` and the background with `PALETTE[0]`, as SAM's automatic masks are saved as a coloured mask;
- the edit removes one object (`edit.png`: the same scene drawn without it);
- the questions have exact answers: how many objects, the colour of a shape, whether one object is left or right
  of another (by centre), nearer or farther (by distance).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from datamodules.synth.photos import photo, random_crop
from omnilab.seeding import numpy_rng

DEFAULT_SAMPLES = {"train": 512, "val": 32, "test": 64}
SIZE = 64
WALL = 1.0  # distance of the wall (and of the horizon)
NEAR_DISPARITY = 2.5  # disparity 1/d of the bottom image row (distance 0.4)
HORIZON = 0.35  # horizon row as a fraction of the height
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")
PALETTE = np.array(
    [(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)], dtype=np.uint8
)  # background, object 1, 2, 3 (drawing order)
BACKGROUNDS = ("astronaut", "coffee", "chelsea", "rocket")
COUNT_OPTIONS = ["1", "2", "3"]
COLOUR_OPTIONS = list(COLOURS)


def horizon_row(size: int) -> int:
    """The horizon's row y_h of a `size`-px scene."""
    return round(HORIZON * size)


def floor_disparity(y: np.ndarray | float, size: int) -> np.ndarray | float:
    """Disparity 1/d of floor row y (linear from 1/WALL at the horizon to NEAR_DISPARITY at the last row)."""
    y_h = horizon_row(size)
    t = (np.asarray(y, dtype=np.float64) - y_h) / (size - 1 - y_h)
    return 1.0 / WALL + (NEAR_DISPARITY - 1.0 / WALL) * t


def shape_mask(shape: str, cx: float, base: float, half: float, size: int) -> np.ndarray:
    """Boolean mask of a shape of half-width `half` centred at column cx with its bottom edge on row `base`."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cy = base - half
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= half**2
    if shape == "square":
        return (np.abs(yy - cy) <= half) & (np.abs(xx - cx) <= half)
    if shape == "triangle":  # apex up, base on row `base`
        top = base - 2 * half
        inside = (yy >= top) & (yy <= base)
        width = half * (yy - top) / max(2 * half, 1e-9)
        return inside & (np.abs(xx - cx) <= width)
    raise KeyError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")


def render(
    background: np.ndarray, objects: list[dict[str, Any]], size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image HxWx3 uint8, disparity HxW float32, segmentation ids HxW int) of a scene, objects drawn far to near.

    Each object: {shape, colour, cx, base, half, disparity, id}; `id` is its segmentation index (1-based).
    """
    image = background.copy()
    rows = np.arange(size, dtype=np.float64)[:, None].repeat(size, 1)
    y_h = horizon_row(size)
    disparity = np.where(rows < y_h, 1.0 / WALL, floor_disparity(rows, size)).astype(np.float32)
    seg = np.zeros((size, size), dtype=np.int64)
    for obj in sorted(objects, key=lambda o: o["disparity"]):  # far (small disparity) first
        mask = shape_mask(obj["shape"], obj["cx"], obj["base"], obj["half"], size)
        image[mask] = COLOURS[obj["colour"]]
        disparity[mask] = obj["disparity"]
        seg[mask] = obj["id"]
    return image, disparity, seg


def name(obj: dict[str, Any]) -> str:
    """ "red circle"."""
    return f"{obj['colour']} {obj['shape']}"


def questions(objects: list[dict[str, Any]], rng: np.random.Generator) -> list[dict[str, Any]]:
    """The scene's questions with exact answers and their closed option sets (count, colour, left/right, nearer/farther)."""
    qa = [
        {
            "type": "count",
            "question": "How many objects are there?",
            "answer": str(len(objects)),
            "options": COUNT_OPTIONS,
        }
    ]
    obj = objects[int(rng.integers(len(objects)))]
    qa.append(
        {
            "type": "colour",
            "question": f"What colour is the {obj['shape']}?",
            "answer": obj["colour"],
            "options": COLOUR_OPTIONS,
        }
    )
    if len(objects) >= 2:
        a, b = (objects[i] for i in rng.permutation(len(objects))[:2])
        side = "left" if a["cx"] < b["cx"] else "right"
        qa.append(
            {
                "type": "left_right",
                "question": f"Is the {name(a)} left or right of the {name(b)}?",
                "answer": side,
                "options": ["left", "right"],
            }
        )
        near = "nearer" if a["disparity"] > b["disparity"] else "farther"
        qa.append(
            {
                "type": "near_far",
                "question": f"Is the {name(a)} nearer or farther than the {name(b)}?",
                "answer": near,
                "options": ["nearer", "farther"],
            }
        )
    return qa


def place(rng: np.random.Generator, size: int) -> list[dict[str, Any]]:
    """1-3 objects with distinct shapes and colours, centres >= size/5 apart, disparities >= 0.15 apart."""
    count = int(rng.integers(1, 4))
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:count]]
    colours = [COLOUR_OPTIONS[i] for i in rng.permutation(len(COLOUR_OPTIONS))[:count]]
    y_h = horizon_row(size)
    while True:
        bases = rng.uniform(y_h + 4, size - 1, count)
        xs = rng.uniform(0.15 * size, 0.85 * size, count)
        disp = floor_disparity(bases, size)
        far_enough = all(
            abs(xs[i] - xs[j]) >= size / 5 and abs(disp[i] - disp[j]) >= 0.15
            for i in range(count)
            for j in range(i)
        )
        if far_enough:
            break
    return [
        {
            "shape": s,
            "colour": c,
            "cx": float(x),
            "base": float(b),
            "half": float(0.05 * size * d),  # size proportional to 1 / distance
            "disparity": float(d),
            "id": i + 1,
        }
        for i, (s, c, x, b, d) in enumerate(zip(shapes, colours, xs, bases, disp))
    ]


def caption(objects: list[dict[str, Any]]) -> str:
    """The text-to-image prompt: the objects from left to right."""
    names = [f"a {name(o)}" for o in sorted(objects, key=lambda o: o["cx"])]
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1] + ", from left to right"


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dimmed, desaturated crop of a real photo: the wall above the horizon, a darker floor below."""
    crop = random_crop(photo(BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]), (size, size), rng).astype(
        np.float64
    )
    grey = crop.mean(-1, keepdims=True)
    soft = 0.3 * crop + 0.7 * grey
    out = 70 + 0.35 * soft
    out[horizon_row(size) :] *= 0.7
    return np.clip(out, 0, 255).astype(np.uint8)


def scene(rng: np.random.Generator, size: int = SIZE) -> dict[str, Any]:
    """One scene's members (image, disparity, segmentation, edit) and its json."""
    bg = background(rng, size)
    objects = place(rng, size)
    image, disparity, seg = render(bg, objects, size)
    removed = objects[int(rng.integers(len(objects)))]
    edited, _, _ = render(bg, [o for o in objects if o is not removed], size)
    return {
        "image.png": image,
        "depth.npy": disparity,
        "seg.png": PALETTE[seg],
        "edit.png": edited,
        "json": {
            "caption": caption(objects),
            "edit": f"remove the {name(removed)}",
            "objects": objects,
            "qa": questions(objects, rng),
            "source": "synth:scenes",
        },
    }


def samples(split: str, count: int, seed: int, size: int = SIZE) -> Iterator[dict[str, Any]]:
    """`count` scenes of a split, each from a generator seeded by (seed, split, index)."""
    for i in range(count):
        yield {"__key__": f"{split}{i:06d}", **scene(numpy_rng(seed, "scenes", split, i), size)}
