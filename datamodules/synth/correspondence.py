"""`omnilab data synth correspondence`: generated ego-exo correspondence pairs with exact masks.

Writes the pair format of `datamodules/correspondence.py` (CCMP, docs/methods/ccmp.md), small
enough for the tiny CCMP run. One sample: two views of one real photo (`photos.PHOTOS`), each a different
crop / zoom / rotation / perspective of it (a global homography per view), with 1-3 procedural objects
(an ellipse, a rounded polygon, a star; each with its own colour and fill: flat, stripes, checker or
radial) pasted into both views, each under its own random homography (scale, rotation, aspect,
perspective) per view. The target view gets a lighting change (brightness, contrast, colour gain).
One object is the query: its mask in the source view (pasted last there, never occluded) and in the
target view (other objects may occlude it partly). About 20% of the pairs do not show the query in the
target (it is not pasted there): `visible` false and an empty target mask.

Exact ground truth: a pixel belongs to an object when its centre, mapped back through the object's
homography, falls inside the analytic shape; the same test selects the pixels that receive the object's
texture, so a mask is exactly the pixels that show the object (the last object pasted wins a pixel).

Views: an "ego" view is 256x256 (Aria is square), an "exo" view 144x256 (16:9); settings are ego-exo and
exo-ego (40% each), ego-ego and exo-exo (10% each; same-camera pairs are two different frames).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
from PIL import Image

from datamodules.synth.photos import PHOTOS, photo
from omnilab.seeding import numpy_rng

DEFAULT_SAMPLES = {"train": 512, "val": 64, "test": 64}
EGO_SIZE = (256, 256)  # (H, W)
EXO_SIZE = (144, 256)  # 16:9; 144 and 256 keep the longest-side-480 ground truth at exactly 270x480
SETTING_WEIGHTS = {"ego-exo": 0.4, "exo-ego": 0.4, "ego-ego": 0.1, "exo-exo": 0.1}
INVISIBLE_FRACTION = 0.2
MIN_AREA = 48  # pixels: the smallest query mask a view may show
MIN_TARGET_SHARE = 0.4  # the query's target mask keeps at least this share of it when others occlude it
SHAPES = ("ellipse", "polygon", "star")
FILLS = ("flat", "stripes", "checker", "radial")
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "magenta": (210, 50, 200),
    "cyan": (40, 200, 210),
    "orange": (245, 130, 30),
    "white": (245, 245, 245),
}


# --------------------------------------------------------------------------- objects


@dataclass(frozen=True)
class SynthObject:
    """A procedural object on the canonical square [-1, 1]^2: an analytic shape and a texture."""

    shape: str
    sides: int  # polygon sides or star points
    aspect: float  # ellipse minor / major axis
    colour: str
    second: tuple[int, int, int]  # the fill's second colour
    fill: str
    frequency: float
    angle: float

    @property
    def name(self) -> str:
        """The object's name in the pair JSON, e.g. "red-star"."""
        return f"{self.colour}-{self.shape}"

    def inside(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Whether canonical points (u, v) lie inside the shape (all shapes fit in the unit disc)."""
        if self.shape == "ellipse":
            return u**2 + (v / self.aspect) ** 2 <= 1.0
        r, theta = np.hypot(u, v), np.arctan2(v, u)
        if self.shape == "star":
            sector = 2 * np.pi / self.sides
            t = np.abs(((theta % sector) / sector) * 2 - 1)  # 1 at a point, 0 between two points
            return r <= 0.45 + 0.55 * t
        # rounded polygon: within 0.2 of a regular polygon of circumradius 0.8
        return _distance_to_polygon(u, v, self.sides, 0.8) <= 0.2

    def texture(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """The RGB (float, 0..255) of canonical points (u, v): the fill, shaded towards the rim."""
        base, second = np.array(COLOURS[self.colour], np.float32), np.array(self.second, np.float32)
        along = u * np.cos(self.angle) + v * np.sin(self.angle)
        if self.fill == "stripes":
            pick = np.sin(self.frequency * along) > 0
        elif self.fill == "checker":
            pick = (np.floor(self.frequency * u / 2) + np.floor(self.frequency * v / 2)) % 2 == 1
        elif self.fill == "radial":
            pick = np.hypot(u, v) < 0.5
        else:
            pick = np.zeros(u.shape, bool)
        rgb = np.where(pick[:, None], second, base)
        shade = 1.0 - 0.25 * np.clip(u**2 + v**2, 0, 1)
        return rgb * shade[:, None]


def _distance_to_polygon(u: np.ndarray, v: np.ndarray, sides: int, radius: float) -> np.ndarray:
    """Euclidean distance of points to a regular polygon (0 inside) with a vertex at angle pi / 2."""
    angles = np.pi / 2 + 2 * np.pi * np.arange(sides + 1) / sides
    vx, vy = radius * np.cos(angles), radius * np.sin(angles)
    inside = np.ones(u.shape, bool)
    dist = np.full(u.shape, np.inf)
    for i in range(sides):
        ax, ay, bx, by = vx[i], vy[i], vx[i + 1], vy[i + 1]
        ex, ey = bx - ax, by - ay
        inside &= ex * (v - ay) - ey * (u - ax) >= 0  # counter-clockwise: inside is on the left
        t = np.clip(((u - ax) * ex + (v - ay) * ey) / (ex * ex + ey * ey), 0, 1)
        dist = np.minimum(dist, np.hypot(u - ax - t * ex, v - ay - t * ey))
    return np.where(inside, 0.0, dist)


def random_objects(count: int, rng: np.random.Generator) -> list[SynthObject]:
    """`count` (<= 3) objects of different shapes and colours."""
    shapes = rng.permutation(SHAPES)[:count]
    colours = rng.permutation(list(COLOURS))[: count * 2]
    objects = []
    for i, shape in enumerate(shapes):
        objects.append(
            SynthObject(
                shape=str(shape),
                sides=int(rng.integers(5, 8)) if shape == "star" else int(rng.integers(3, 7)),
                aspect=float(rng.uniform(0.55, 0.9)),
                colour=str(colours[i]),
                second=COLOURS[str(colours[count + i])],
                fill=str(rng.choice(FILLS)),
                frequency=float(rng.uniform(6, 12)),
                angle=float(rng.uniform(0, np.pi)),
            )
        )
    return objects


# --------------------------------------------------------------------------- homographies and rendering


def rotation(theta: float) -> np.ndarray:
    """The homography of a rotation by `theta` radians."""
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def translation(x: float, y: float) -> np.ndarray:
    """The homography of a translation by (x, y)."""
    return np.array([[1, 0, x], [0, 1, y], [0, 0, 1]], dtype=np.float64)


def scaling(sx: float, sy: float) -> np.ndarray:
    """The homography of an axis-aligned scaling."""
    return np.diag([sx, sy, 1.0])


def perspective(px: float, py: float) -> np.ndarray:
    """A pure perspective homography: (x, y) -> (x, y) / (1 + px x + py y)."""
    return np.array([[1, 0, 0], [0, 1, 0], [px, py, 1]], dtype=np.float64)


def apply_homography(h: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map the points (x, y) through the homography `h`."""
    w = h[2, 0] * x + h[2, 1] * y + h[2, 2]
    return (h[0, 0] * x + h[0, 1] * y + h[0, 2]) / w, (h[1, 0] * x + h[1, 1] * y + h[1, 2]) / w


def view_homography(
    photo_hw: tuple[int, int], view_hw: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """A random view inside the photo: view pixel coordinates -> photo pixel coordinates.

    Zoom, centre, rotation and perspective are drawn until the view's corners fall inside the photo.
    """
    (ph, pw), (h, w) = photo_hw, view_hw
    side = max(h, w)
    for _ in range(50):
        scale = rng.uniform(0.4, 0.8) * min(ph, pw) / side  # photo pixels per view pixel
        cx, cy = rng.uniform(0.3, 0.7) * pw, rng.uniform(0.3, 0.7) * ph
        view = (
            translation(cx, cy)
            @ rotation(rng.uniform(-0.25, 0.25))
            @ scaling(scale * side, scale * side)
            @ perspective(*rng.uniform(-0.25, 0.25, size=2))
            @ scaling(1 / side, 1 / side)
            @ translation(-w / 2, -h / 2)
        )
        x, y = apply_homography(view, np.array([0.0, w, w, 0.0]), np.array([0.0, 0.0, h, h]))
        if x.min() >= 0 and y.min() >= 0 and x.max() <= pw and y.max() <= ph:
            break
    return view


def object_homography(view_hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random pose of an object in a view: canonical [-1, 1]^2 -> view pixel coordinates."""
    h, w = view_hw
    radius = rng.uniform(0.12, 0.24) * min(h, w)
    aspect = rng.uniform(0.8, 1.25)
    return (
        translation(rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h)
        @ rotation(rng.uniform(-np.pi, np.pi))
        @ scaling(radius * aspect, radius / aspect)
        @ perspective(*rng.uniform(-0.25, 0.25, size=2))
    )


@cache
def _photo_image(name: str) -> Image.Image:
    return Image.fromarray(photo(name))


def render_background(name: str, view: np.ndarray, view_hw: tuple[int, int]) -> np.ndarray:
    """The view of photo `name` through the homography `view` (bilinear): HxWx3 float32."""
    h = view / view[2, 2]
    coeffs = (h[0, 0], h[0, 1], h[0, 2], h[1, 0], h[1, 1], h[1, 2], h[2, 0], h[2, 1])
    size = (view_hw[1], view_hw[0])
    out = _photo_image(name).transform(size, Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.float32)


def paste(canvas: np.ndarray, owner: np.ndarray, obj: SynthObject, pose: np.ndarray, label: int) -> None:
    """Paste `obj` under `pose` (in place): its texture into `canvas`, `label` into the `owner` map.

    Pixel centres inside the view are mapped back to the canonical square; those inside the shape take the
    texture and the label, so the label map is exactly the pasted pixels.
    """
    h, w = owner.shape
    cu, cv = apply_homography(pose, np.array([-1.0, 1.0, 1.0, -1.0]), np.array([-1.0, -1.0, 1.0, 1.0]))
    x0, x1 = max(int(np.floor(cu.min())), 0), min(int(np.ceil(cu.max())) + 1, w)
    y0, y1 = max(int(np.floor(cv.min())), 0), min(int(np.ceil(cv.max())) + 1, h)
    if x0 >= x1 or y0 >= y1:
        return
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5
    u, v = apply_homography(np.linalg.inv(pose), xs.ravel(), ys.ravel())
    hit = obj.inside(u, v)
    rows, cols = ys.ravel()[hit].astype(np.int64), xs.ravel()[hit].astype(np.int64)
    canvas[rows, cols] = obj.texture(u[hit], v[hit])
    owner[rows, cols] = label


def lighting(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A global lighting change: contrast about mid-grey, brightness gain, per-channel colour gain."""
    contrast, brightness = rng.uniform(0.8, 1.2), rng.uniform(0.75, 1.25)
    gain = rng.uniform(0.9, 1.1, size=3).astype(np.float32)
    return ((img - 127.5) * contrast + 127.5) * brightness * gain


def render_view(
    background: np.ndarray, objects: list[SynthObject], poses: list[np.ndarray | None], order: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """(float image, owner map: 0 = background, i + 1 = object i) of one view, pasting in `order`."""
    canvas, owner = background.copy(), np.zeros(background.shape[:2], np.int32)
    for i in order:
        if poses[i] is not None:
            paste(canvas, owner, objects[i], poses[i], i + 1)
    return canvas, owner


def _uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- samples


def _cameras(setting: str, rng: np.random.Generator) -> tuple[str, str]:
    exo = [f"cam0{i}" for i in rng.permutation(4)[:2] + 1]
    src, tgt = setting.split("-")
    return ("aria01" if src == "ego" else exo[0]), ("aria01" if tgt == "ego" else exo[-1])


def make_sample(split: str, index: int, seed: int) -> dict[str, Any]:
    """The pair `index` of `split`: deterministic in (seed, split, index)."""
    rng = numpy_rng(seed, "synth-correspondence", split, index)
    setting = str(rng.choice(list(SETTING_WEIGHTS), p=list(SETTING_WEIGHTS.values())))
    src_hw, tgt_hw = (EGO_SIZE if side == "ego" else EXO_SIZE for side in setting.split("-"))
    name = str(rng.choice(PHOTOS))
    img = photo(name)
    objects = random_objects(int(rng.integers(1, 4)), rng)
    query = int(rng.integers(len(objects)))
    visible = bool(rng.random() >= INVISIBLE_FRACTION)

    src_bg = render_background(name, view_homography(img.shape[:2], src_hw, rng), src_hw)
    tgt_bg = render_background(name, view_homography(img.shape[:2], tgt_hw, rng), tgt_hw)
    src_order = [i for i in range(len(objects)) if i != query] + [query]  # the query is never occluded
    for _ in range(100):
        src_poses: list[np.ndarray | None] = [object_homography(src_hw, rng) for _ in objects]
        src, src_owner = render_view(src_bg, objects, src_poses, src_order)
        if (src_owner == query + 1).sum() >= MIN_AREA:
            break
    else:
        raise RuntimeError(f"synth correspondence {split}/{index}: no pose shows the query")
    for _ in range(100):
        tgt_poses: list[np.ndarray | None] = [
            object_homography(tgt_hw, rng) if rng.random() < 0.85 or i == query else None
            for i in range(len(objects))
        ]
        if not visible:
            tgt_poses[query] = None
        tgt_order = [int(i) for i in rng.permutation(len(objects))]
        tgt, tgt_owner = render_view(tgt_bg, objects, tgt_poses, tgt_order)
        if not visible:
            break
        alone = render_view(tgt_bg, objects, tgt_poses, [query])[1] == query + 1
        shown = (tgt_owner == query + 1).sum()
        if shown >= MIN_AREA and shown >= MIN_TARGET_SHARE * alone.sum():
            break
    else:
        raise RuntimeError(f"synth correspondence {split}/{index}: no pose shows the query in the target")
    tgt = lighting(tgt, rng)

    src_cam, tgt_cam = _cameras(setting, rng)
    src_frame = 30 * int(rng.integers(0, 300))
    same_view = setting in ("ego-ego", "exo-exo")
    tgt_frame = src_frame + 30 * int(rng.integers(1, 20)) if same_view else src_frame
    meta = {
        "take": f"synth-{name}-{index}",
        "take_name": f"synth_{name}_{split}_{index}",
        "object": objects[query].name,
        "src_cam": src_cam,
        "tgt_cam": tgt_cam,
        "src_frame": src_frame,
        "tgt_frame": tgt_frame,
        "setting": setting,
        "visible": visible,
        "src_native": list(src_hw),
        "tgt_native": list(tgt_hw),
        "split": split,
    }
    return {
        "__key__": f"{split}_{index:06d}",
        "json": meta,
        "src.jpg": _uint8(src),
        "src_mask.png": np.where(src_owner == query + 1, 255, 0).astype(np.uint8),
        "tgt.jpg": _uint8(tgt),
        "tgt_mask.png": np.where(tgt_owner == query + 1, 255, 0).astype(np.uint8),
    }


def samples(split: str, count: int, seed: int) -> Iterator[dict[str, Any]]:
    """`count` pairs of `split`, each deterministic in (seed, split, index)."""
    for index in range(count):
        yield make_sample(split, index, seed)
