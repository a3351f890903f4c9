"""Real photos for the embedded default: the images scikit-image ships (no download needed).

docs/architecture.md: generated shards compose these photos with procedural objects whose ground truth
is known exactly. The Middlebury motorcycle stereo pair comes with its ground-truth disparity.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import skimage.data

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "hubble_deep_field")


@cache
def photo(name: str) -> np.ndarray:
    """One of `PHOTOS` as an HxWx3 uint8 array (read-only, cached)."""
    if name not in PHOTOS:
        raise KeyError(f"unknown photo {name!r}; choose from {', '.join(PHOTOS)}")
    img = np.ascontiguousarray(getattr(skimage.data, name)()[..., :3])
    img.setflags(write=False)
    return img


@cache
def stereo_motorcycle() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Middlebury motorcycle pair: (left HxWx3, right HxWx3, disparity HxW float32, NaN = unknown).

    A left pixel (y, x) shows the same point as the right pixel (y, x - disparity[y, x]).
    """
    left, right, disp = skimage.data.stereo_motorcycle()
    disp = disp.astype(np.float32)
    disp[~np.isfinite(disp)] = np.nan
    return left, right, disp


def random_crop(img: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random (h, w) crop of `img` (which must be at least that large)."""
    h, w = size
    y = int(rng.integers(0, img.shape[0] - h + 1))
    x = int(rng.integers(0, img.shape[1] - w + 1))
    return img[y : y + h, x : x + w].copy()
