"""MICo's multi-image composition data: the seven task categories and De&Re, as a multiref data kind.

MICo (docs/methods/mico.md) sorts multi-image composition into seven tasks, 100 benchmark cases each before
filtering, plus Decomposition-and-Recomposition (De&Re). Their names are not in the released files; they
follow from the `editing_type` counts of MICo-Bench's JSONL (docs/methods/mico.md):

| category | MICo-Bench `editing_type` | sources |
|---|---|---|
| multi_object | "2 Objects" ... "5 Objects" | objects |
| object_scene | "Object + Scene", "1 Object + Scene", "2 Object + Scene" | objects, a scene |
| multi_person | "2 Persons", "3 female characters", ... | people |
| person_scene | "1 Human + Scene", "2 Human + Scene" | people, a scene |
| human_object | "1 Human + 1 Object", "2 Human + 2 Object", ... | people, objects |
| human_clothes | "Human + 1 Clothes" ... "Human + 4 Clothes" (try-on) | a person, garments |
| human_clothes_object | "Human + 2 Clothes + 2 Object", ... | a person, garments, objects |
| dere | (the De&Re task) | the components of one real image |

The data format is `datamodules/multiref.py`'s (task "compose"), with the json field "category" (one of
`CATEGORIES`) and "ref_roles" (per reference: "human", "object", "clothes", "scene", "component"), and
"human_indices" (the references that are people). A sample without "category" gets one at decode time
from its "editing_type" or, failing that, its "ref_roles" (`category_of`), so converted MICo-150K shards
work as they are. `omnilab data synth mico` writes generated samples of every category from the real
photos (datamodules/synth/mico.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from datamodules.multiref import MultiRefDataModule, MultiRefTransform
from datamodules.webdataset import SkipSample

CATEGORIES = (
    "multi_object",
    "object_scene",
    "multi_person",
    "person_scene",
    "human_object",
    "human_clothes",
    "human_clothes_object",
    "dere",
)
HUMAN_WORDS = ("human", "person", "character", "male", "female", "man", "woman")


def category_from_kinds(human: bool, obj: bool, clothes: bool, scene: bool) -> str:
    """The category of a composition from which kinds of sources it has (the table in the module docstring)."""
    if human:
        if clothes:
            return "human_clothes_object" if obj else "human_clothes"
        if obj:
            return "human_object"
        return "person_scene" if scene else "multi_person"
    return "object_scene" if scene else "multi_object"


def category_of(meta: dict[str, Any]) -> str:
    """A sample's category: its "category", else from "task" / "editing_type", else (a composition of two or
    more sources) from "ref_roles"; "unknown" for anything else (a single-image edit, text-to-image)."""
    category = meta.get("category")
    if isinstance(category, str) and category in CATEGORIES:
        return category
    task = str(meta.get("task") or meta.get("Task") or "").lower()
    if task in ("dere", "de&re"):
        return "dere"
    kind = meta.get("editing_type")
    if isinstance(kind, str) and kind:
        words = kind.lower()
        return category_from_kinds(
            any(w in words for w in HUMAN_WORDS), "object" in words, "cloth" in words, "scene" in words
        )
    roles = meta.get("ref_roles")
    if isinstance(roles, list) and len(roles) >= 2 and task in ("", "compose"):
        if "component" in roles:
            return "dere"
        counts = Counter(roles)
        return category_from_kinds(
            counts["human"] > 0, counts["object"] > 0, counts["clothes"] > 0, counts["scene"] > 0
        )
    return "unknown"


@dataclass(frozen=True, eq=False)
class MICoTransform(MultiRefTransform):
    """MultiRefTransform that fills in the category and thins training samples by `category_mix`."""

    category_mix: tuple[tuple[str, float], ...] | None = None
    _categories: dict[str, float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        mix = dict(self.category_mix or ())
        top = max(mix.values(), default=0.0)
        object.__setattr__(self, "_categories", {c: w / top for c, w in mix.items()} if top > 0 else {})

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """The multiref example with `meta["category"]` set; a thinned category raises SkipSample."""
        meta = sample.get("json")
        category = category_of(meta) if isinstance(meta, dict) else "unknown"
        if self.train and self._categories and rng.random() >= self._categories.get(category, 0.0):
            raise SkipSample(f"category {category!r} thinned by data.category_mix")
        example = super().__call__(sample, rng)
        example["meta"] = {**example["meta"], "category": category}
        return example


class MICoDataModule(MultiRefDataModule):
    """MICo compositions (2-10 sources + prompt -> composite), with the category of each sample.

    Batches are `MultiRefDataModule`'s; each `meta` has "category" (one of `CATEGORIES`, or "unknown").

    Args:
        category_mix: Training weight per category, e.g. {multi_object: 1, human_clothes: 2}: a sample of
            category c is kept with probability w_c / max(w) (a category not named is left out); None:
            keep all. Evaluation is never thinned.
        **kwargs: `MultiRefDataModule`'s arguments (budgets, task_mix, shards, batch sizes, ...).
    """

    synth_kind = "mico"

    def __init__(self, category_mix: dict[str, float] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if category_mix is not None:
            unknown = sorted(set(category_mix) - set(CATEGORIES))
            if unknown or not category_mix or max(category_mix.values()) <= 0:
                raise ValueError(
                    f"data.category_mix {category_mix} must weight some of {', '.join(CATEGORIES)} "
                    f"(unknown: {unknown})"
                )
        self.category_mix = tuple(sorted(category_mix.items())) if category_mix is not None else None

    def transform(self, train: bool) -> MICoTransform:
        """The multiref transform with the category filled in and `category_mix` applied in training."""
        base = super().transform(train)
        fields = {name: getattr(base, name) for name in base.__dataclass_fields__ if not name.startswith("_")}
        return MICoTransform(**fields, category_mix=self.category_mix)
