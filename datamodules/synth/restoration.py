"""`omnilab data synth restoration`: high-quality crops of the real photos scikit-image ships, with captions.

The embedded default for PURE (`datamodules/restoration.py` format): each sample is a `crop` x `crop` crop of one of
the photos below, with a hand-written description of the whole photo (PURE's descriptions come from LLaVA on the
ground truth; a crop shows only part of what the caption says). The low-quality inputs are made on the fly by the
datamodule. Held-out by place: per photo the columns are split into a training region, a validation band and a
test band (each band `crop` wide, on the right), so no test pixel is ever trained on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from datamodules.synth.photos import photo, stereo_motorcycle
from omnilab.seeding import numpy_rng

DEFAULT_SAMPLES = {"train": 512, "val": 16, "test": 32}
CROP = 128
CAPTIONS = {
    "astronaut": "The image features an astronaut in a white spacesuit smiling in front of an American flag.",
    "coffee": "The image features a cup of coffee with latte art on a saucer on a wooden table.",
    "chelsea": "The image features a tabby cat with long white whiskers looking at the camera.",
    "rocket": "The image features a rocket on a launch pad beside a tall tower under a blue sky.",
    "immunohistochemistry": "The image features stained tissue cells under a microscope, brown and blue on white.",
    "hubble_deep_field": "The image features many small galaxies and stars on the black background of deep space.",
    "motorcycle": "The image features a motorcycle parked indoors in front of a wall with objects on shelves.",
}


def source(name: str) -> np.ndarray:
    """The photo `name` (the motorcycle is the left view of the Middlebury pair)."""
    return stereo_motorcycle()[0] if name == "motorcycle" else photo(name)


def region(width: int, split: str, crop: int) -> tuple[int, int]:
    """[x0, x1) of the columns a split's crops come from: train left, then a val band, then a test band."""
    if width < 3 * crop:
        raise ValueError(f"a photo {width} px wide cannot hold train, val and test bands of {crop} px")
    bands = {
        "train": (0, width - 2 * crop),
        "val": (width - 2 * crop, width - crop),
        "test": (width - crop, width),
    }
    if split not in bands:
        raise KeyError(f"unknown split {split!r}; choose from {', '.join(bands)}")
    return bands[split]


def samples(split: str, count: int, seed: int, crop: int = CROP) -> Iterator[dict[str, Any]]:
    """`count` crops of the split's region, the photos taken in turn, positions from (seed, split, index)."""
    names = sorted(CAPTIONS)
    for i in range(count):
        name = names[i % len(names)]
        img = source(name)
        h, w = img.shape[:2]
        x0, x1 = region(w, split, crop)
        rng = numpy_rng(seed, "restoration", split, i)
        top = int(rng.integers(h - crop + 1))
        left = int(rng.integers(x0, x1 - crop + 1))
        yield {
            "__key__": f"{split}{i:06d}",
            "hq.png": np.ascontiguousarray(img[top : top + crop, left : left + crop]),
            "json": {
                "description": CAPTIONS[name],
                "source": f"skimage:{name}",
                "box": [top, left, crop, crop],
            },
        }
