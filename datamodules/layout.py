"""Dense caption-box data for SCoT (SCoT paper, arXiv 2602.11980): the multiref sample format plus the plan.

The layout data kind is `datamodules/multiref.py`'s format (0 refs for text-to-image, 1 for an edit) whose
instruction is written in SCoT's interleaved text-coordinate format (lightning_modules/components/layout.py:
each phrase followed by `[x0, y0, x1, y1]` on the 0-1000 grid). `omnilab data synth layout`, `omnilab data
convert layoutgpt` and `omnilab data convert gligen` write exactly this. One sample:
- `<key>.json`: the multiref fields ("instruction": the interleaved caption, "task": "t2i" | "edit",
  "n_refs", "source", "orig_id", "target_size") and
  - "caption": str, the caption without coordinates;
  - "layout": [{"phrase": str, "box": [x0, y0, x1, y1]}], the regions of the instruction, grid integers;
  - optional "prompt": str, the short request a planner gets at test time ("a photo of a red circle left of
    a blue star", "add a red circle right of the blue star"), and "geneval": GenEval metadata {"tag",
    "include": [{"class", "count", "position"?: [relation, index]}], "exclude": [...]};
  - edits: "edit": {"op": "add" | "remove" | "recolour", "phrase", "box", ...} (where the change goes) and
    "source_layout" / "target_layout" (the regions before and after).
- `<key>.target.png` (the image) and, for an edit, `<key>.ref0.png` (the source).

Decoding adds to the multiref checks (a failure is a counted BadSample naming it): the instruction's plan must
parse without repair (`parse_layout(..., repair=False)`: no box outside the grid, inverted, empty, duplicate
or unparsable) and "layout" must hold valid grid boxes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from datamodules.multiref import MultiRefDataModule, MultiRefTransform
from datamodules.webdataset import BadSample
from lightning_modules.components.layout import GRID, PlanError, has_boxes, parse_layout


def check_layout(meta: dict[str, Any]) -> None:
    """BadSample unless the instruction's boxes parse without repair and "layout" holds valid grid boxes."""
    if has_boxes(meta["instruction"]):
        try:
            parse_layout(meta["instruction"], repair=False)
        except PlanError as err:
            raise BadSample(f"bad plan in the instruction: {err}") from err
    regions = meta.get("layout")
    if not isinstance(regions, list):
        raise BadSample('.json field "layout" must be a list of {"phrase", "box"}')
    for r in regions:
        box = r.get("box") if isinstance(r, dict) else None
        if not (
            isinstance(r, dict)
            and isinstance(r.get("phrase"), str)
            and isinstance(box, list)
            and len(box) == 4
            and all(isinstance(v, int) and 0 <= v <= GRID for v in box)
            and box[0] < box[2]
            and box[1] < box[3]
        ):
            raise BadSample(
                f'.json "layout" region {r!r} is not {{"phrase": str, "box": [x0, y0, x1, y1] on 0-{GRID}}}'
            )


@dataclass(frozen=True, eq=False)
class LayoutTransform(MultiRefTransform):
    """The multiref transform with the plan checked first."""

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """Check the plan, then decode as multiref does."""
        meta = sample.get("json")
        if isinstance(meta, dict) and isinstance(meta.get("instruction"), str):
            check_layout(meta)
        return super().__call__(sample, rng)


class LayoutDataModule(MultiRefDataModule):
    """Dense caption-box samples (text-to-image and grounded edits) for SCoT; batches as `MultiRefDataModule`'s.

    `meta` in each batch holds the plan ("layout", "caption", "prompt", "geneval", "edit"). Arguments: those of
    `MultiRefDataModule` (budgets, sides, `task_mix`: e.g. {t2i: 1} for layout-aware generation only).
    """

    synth_kind = "layout"

    def transform(self, train: bool) -> LayoutTransform:
        """The multiref decode with the plan checked (a bad plan is a counted skip)."""
        base = super().transform(train)
        return LayoutTransform(**{f: getattr(base, f) for f in base.__dataclass_fields__ if f != "_mix"})
