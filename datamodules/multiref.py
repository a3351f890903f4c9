"""Multi-reference editing and composition samples (UniRef SELF, UniPic-3, MICo), budgeted per sample.

Implements the data side of docs/methods/uniref.md: §1 (every reference resized under one
global pixel budget B, the target under its own; `datamodules.budget.fit_to_budget`), §4 (the proposed
WebDataset sample; originals stored, resized at decode time so B can change per stage) and §6.1; and of
the UniRef abstract (UniRef-Image-Edit paper): joint SFT on single-image editing (N = 1) and multi-image
composition (N = 2..6) with a task-mixing ratio, text-to-image (N = 0) for dual-task RL, and the
progressive budget 1024² -> 1536² -> 2048² that `callbacks.pixel_budget.PixelBudgetSchedule` drives
through `MultiRefDataModule.set_pixel_budget`.

The data format: one sample is one edit or composition (`omnilab data synth multiref`, `omnilab data
convert edit_jsonl` and `omnilab data convert mico150k` write exactly this):
- `<key>.json`: {"instruction": str, "task": str ("edit" | "compose" | "t2i" | ...), "n_refs": int,
  "source": str (e.g. "synth", "mico150k", "unipic3"), "orig_id": str}, optionally "ref_roles": [str]
  ("human", "object", "clothes", "scene", ...), "editing_type": str, "refined_instruction": str,
  "human_indices": [int], "ref_sizes": [[w, h], ...], "target_size": [w, h], and the generator's
  "program" / "objects" (the exact ground truth of a generated edit, see datamodules/synth/multiref.py).
- `<key>.ref0.png` ... `<key>.ref5.png` (or .jpg / .webp): the n_refs reference images at their original
  size, in prompt order: "image k" (also "Picture k", "<image k>") in the instruction is ref k-1.
- `<key>.target.png` (or .target.jpg / .webp): the result, at its original size.

Decoding (a sample that breaks a rule is a counted BadSample with the reason, never trained on):
json fields typed; exactly refs 0..n_refs-1 present (numeric order) and a target; at most `max_refs`
refs; no image name in the instruction beyond n_refs; every image at least `min_side` on its short side;
the refs must fit the budget at `min_side` (`BudgetError`'s text is the reason). Then the refs are
resized with `fit_to_budget(mode=budget_mode)` under the current reference budget, the target under
`target_budget` (joint mode on [target]; edge mode with `budget_mode: edge`), or to the first reference's
size with `target_like_ref` (UniPic 2.0: reference and target the same size), bicubic with antialias, to
floats in [-1, 1]. Every sample carries `ref_pixel_cap`, the most reference pixels its rule can give at its
budget (`budget.reference_capacity`): the packed length of a SELF model follows it, so no sample overflows.

The live budget: the transform reads the reference budget from a one-element shared-memory tensor per
sample, so `set_pixel_budget` in the main process reaches running DataLoader workers at once. With
`num_workers=0` a batch is made when Lightning fetches it, so it has exactly the budget set before that
(the schedule sets step S's budget before batch S is fetched, and a resumed run replays the same
budgets); with workers, batches already made keep the old budget (at most num_workers x prefetch_factor
of them), so the switch lands a few batches after the milestone. Every batch says the budget its refs
were resized under (`ref_budget`). So that a resumed run replays its epoch's samples exactly, whether a
sample is skipped for not fitting does not depend on raising the budget: it is judged at
min(live budget, configured `budget`).

The live task mix: the training task mix lives the same way in shared memory (`SharedTaskMix`, a small
JSON buffer with a version counter), so `set_task_mix` (PDTR's stages through
`callbacks.dual_task.SupportsTaskMix`) changes which tasks running workers keep, with the same lag of
the batches they had made.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.budget import MODES, ROUNDINGS, BudgetError, fit_to_budget, reference_capacity, tokens
from datamodules.webdataset import IMAGE_EXTS, BadSample, SkipSample, WebDataModule

MAX_REFS = 6  # UniPic-3: 1-6 input images
REF_MEMBER = re.compile(r"ref(\d+)\.([a-z]+)")
TARGET_MEMBER = re.compile(r"target\.([a-z]+)")
# "image 3", "Image3", "picture 3", "Picture #3", "img 3", "<image3>", "<image 3>" (1-based)
IMAGE_MENTION = re.compile(r"<\s*image\s*(\d+)\s*>|\b(?:image|picture|img)\s*#?\s*(\d+)\b", re.IGNORECASE)


# --------------------------------------------------------------------------- decoding


def image_tensor(arr: np.ndarray, name: str) -> Tensor:
    """An HxWx3 (or grey HxW) uint8 image -> [3, H, W] float in [-1, 1]."""
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise BadSample(f".{name} is not an 8-bit RGB or grey image (dtype {arr.dtype}, shape {arr.shape})")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 127.5 - 1.0


def resize_image(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a [3, H, W] image in [-1, 1] to (w, h) = `size`: bicubic with antialias, clamped to [-1, 1]."""
    w, h = size
    if tuple(x.shape[-2:]) == (h, w):
        return x
    out = F.interpolate(x[None], size=(h, w), mode="bicubic", antialias=True, align_corners=False)[0]
    return out.clamp(-1.0, 1.0)


def mentioned_images(instruction: str) -> list[int]:
    """The 1-based image numbers the instruction names ("image 2", "Picture 3", "<image1>"), sorted."""
    return sorted({int(a or b) for a, b in IMAGE_MENTION.findall(instruction)})


def sample_meta(meta: Any) -> dict[str, Any]:
    """The `.json` fields the transform uses, checked; raises BadSample on a missing or mistyped one."""
    if not isinstance(meta, dict):
        raise BadSample(".json is not an object")
    for name, kind in (("instruction", str), ("task", str), ("n_refs", int)):
        value = meta.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise BadSample(f".json field {name!r} must be {kind.__name__}, got {value!r}")
    if meta["n_refs"] < 0:
        raise BadSample(f".json n_refs is negative ({meta['n_refs']})")
    return meta


def gather_images(sample: dict[str, Any], n_refs: int, max_refs: int) -> tuple[list[np.ndarray], np.ndarray]:
    """(refs in numeric order, target) of a decoded sample; raises BadSample unless they match n_refs."""
    refs: dict[int, np.ndarray] = {}
    targets = []
    for ext, value in sample.items():
        if (m := REF_MEMBER.fullmatch(ext)) and m.group(2) in IMAGE_EXTS:
            k = int(m.group(1))
            if k in refs or m.group(1) != str(k):
                raise BadSample(f"reference {k} appears twice or is misnamed (.{ext})")
            refs[k] = value
        elif (m := TARGET_MEMBER.fullmatch(ext)) and m.group(1) in IMAGE_EXTS:
            targets.append(value)
    if len(targets) != 1:
        raise BadSample("missing target image (.target.png / .target.jpg)" if not targets else "two targets")
    if n_refs > max_refs or len(refs) > max_refs:
        raise BadSample(f"{max(n_refs, len(refs))} references, more than max_refs={max_refs}")
    if sorted(refs) != list(range(n_refs)):
        raise BadSample(f"n_refs is {n_refs} but the sample holds references {sorted(refs)} (.refK members)")
    return [refs[k] for k in range(n_refs)], targets[0]


# --------------------------------------------------------------------------- the live task mix


def check_task_mix(mix: dict[str, float] | None, where: str = "data.task_mix") -> dict[str, float] | None:
    """The mix as {task: float}, checked: non-empty, non-negative, one weight positive (None: keep all)."""
    if mix is None:
        return None
    if not mix or any(not isinstance(t, str) or w < 0 for t, w in mix.items()) or max(mix.values()) <= 0:
        raise ValueError(f"{where} {mix} must map tasks to non-negative weights, one of them positive")
    return {str(t): float(w) for t, w in sorted(mix.items())}


class SharedTaskMix:
    """A task mix in shared memory: written in the main process, read by running DataLoader workers.

    The mix is JSON in a uint8 buffer; an int64 version counter is odd while a write is in progress
    (a seqlock), so a reader never parses half a write. Readers cache the parsed mix per version.
    """

    def __init__(self, mix: dict[str, float] | None = None, capacity: int = 4096) -> None:
        self.buffer = torch.zeros(capacity, dtype=torch.uint8).share_memory_()
        self.version = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._cache: tuple[int, dict[str, float] | None] = (-1, None)
        self.write(mix)

    def write(self, mix: dict[str, float] | None) -> None:
        """Publish `mix` ({task: weight}, or None for every task) to every reader."""
        data = json.dumps(check_task_mix(mix, "task mix")).encode()
        if len(data) + 1 > len(self.buffer):
            raise ValueError(f"task mix {mix} is too long ({len(data)} bytes) for the shared buffer")
        self.version += 1  # odd: writing
        self.buffer[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self.buffer[len(data)] = 0
        self.version += 1  # even: done

    def read(self) -> dict[str, float] | None:
        """The current mix (the last complete write)."""
        while True:
            before = int(self.version[0])
            if before == self._cache[0]:
                return self._cache[1]
            if before % 2:
                continue
            raw = self.buffer.numpy().tobytes()
            if int(self.version[0]) == before:
                self._cache = (before, json.loads(raw[: raw.index(0)]))
                return self._cache[1]

    def __getstate__(self) -> dict[str, Any]:
        return {"buffer": self.buffer, "version": self.version}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.buffer, self.version, self._cache = state["buffer"], state["version"], (-1, None)


# --------------------------------------------------------------------------- the transform


@dataclass(frozen=True, eq=False)
class MultiRefTransform:
    """Decoded sample -> budgeted tensors; picklable, and reads the live budget from a shared tensor."""

    budget: Tensor  # int64 [1] in shared memory: the current reference budget B
    base_budget: int  # the configured budget: the fit check for skipping runs at min(live, this)
    target_budget: int
    budget_mode: str = "joint"
    multiple: int = 32
    min_side: int = 128
    max_refs: int = MAX_REFS
    rounding: str = "floor"
    upscale: bool = False
    target_like_ref: bool = False
    train: bool = True
    task_mix: SharedTaskMix | tuple[tuple[str, float], ...] | None = None  # live (shared) or fixed
    drop_text: float = 0.0
    _mix: SharedTaskMix = field(init=False, repr=False)

    def __post_init__(self) -> None:
        mix = self.task_mix
        if not isinstance(mix, SharedTaskMix):
            mix = SharedTaskMix(dict(mix) if mix is not None else None)
        object.__setattr__(self, "_mix", mix)

    def keep_probability(self, task: str) -> float:
        """The share of training samples of `task` kept under the current mix: w_task / max(w) (1 without a mix)."""
        mix = self._mix.read()
        if mix is None:
            return 1.0
        return mix.get(task, 0.0) / max(mix.values())

    def fit(self, sizes: list[tuple[int, int]], budget: int, mode: str) -> list[tuple[int, int]]:
        """`fit_to_budget` with this transform's settings; a budget that cannot hold them is a BadSample."""
        try:
            return fit_to_budget(
                sizes, budget, mode, self.multiple, self.min_side, self.upscale, self.rounding
            )
        except BudgetError as err:
            raise BadSample(f"budget: {err}") from err

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """Transform one decoded sample; raises BadSample when it cannot be used, SkipSample to leave it out."""
        meta = sample_meta(sample["json"])
        task, n = meta["task"], meta["n_refs"]
        if self.train and rng.random() >= self.keep_probability(task):
            raise SkipSample(f"task {task!r} thinned by the task mix")
        refs, target = gather_images(sample, n, self.max_refs)
        instruction = meta["instruction"]
        beyond = [k for k in mentioned_images(instruction) if not 1 <= k <= n]
        if beyond:
            raise BadSample(f"the instruction names image {beyond[0]} but the sample has {n} reference(s)")
        images = [image_tensor(r, f"ref{k}") for k, r in enumerate(refs)]
        target_img = image_tensor(target, "target")
        for name, img in [*((f"ref{k}", x) for k, x in enumerate(images)), ("target", target_img)]:
            h, w = img.shape[-2:]
            if min(h, w) < self.min_side and not self.upscale:
                raise BadSample(f"{name} is {w}x{h}, smaller than min_side={self.min_side}")
        sizes = [(x.shape[-1], x.shape[-2]) for x in images]
        budget = int(self.budget[0])
        if budget > self.base_budget:  # the skip decision must not depend on a raised budget
            self.fit(sizes, self.base_budget, self.budget_mode)
        ref_sizes = self.fit(sizes, budget, self.budget_mode)
        if self.target_like_ref and ref_sizes:
            target_size = ref_sizes[0]
        else:
            target_mode = "edge" if self.budget_mode == "edge" else "joint"
            (target_size,) = self.fit(
                [(target_img.shape[-1], target_img.shape[-2])], self.target_budget, target_mode
            )
        if self.train and self.drop_text > 0 and rng.random() < self.drop_text:
            instruction = ""
        return {
            "refs": [resize_image(x, s) for x, s in zip(images, ref_sizes)],
            "target": resize_image(target_img, target_size),
            "instruction": instruction,
            "task": task,
            "n_refs": n,
            "ref_budget": budget,
            "ref_pixel_cap": reference_capacity(budget, self.budget_mode, self.max_refs),
            "meta": meta,
        }


def collate_multiref(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Examples -> a batch: images stay lists (their sizes differ), counts become tensors."""
    refs = [e["refs"] for e in examples]
    targets = [e["target"] for e in examples]
    return {
        "refs": refs,
        "target": targets,
        "instruction": [e["instruction"] for e in examples],
        "task": [e["task"] for e in examples],
        "n_refs": torch.tensor([e["n_refs"] for e in examples], dtype=torch.int64),
        "ref_tokens": torch.tensor([tokens([(x.shape[-1], x.shape[-2]) for x in r]) for r in refs]),
        "target_tokens": torch.tensor([tokens([(t.shape[-1], t.shape[-2])]) for t in targets]),
        "ref_budget": torch.tensor([e["ref_budget"] for e in examples], dtype=torch.int64),
        "ref_pixel_cap": torch.tensor([e["ref_pixel_cap"] for e in examples], dtype=torch.int64),
        "meta": [e["meta"] for e in examples],
        "__key__": [e.get("__key__", "") for e in examples],
    }


# --------------------------------------------------------------------------- the DataModule


class MultiRefDataModule(WebDataModule):
    """Multi-reference edits and compositions (N = 0..6 refs + instruction -> target), under a pixel budget.

    Batches (B samples) hold `refs`: list of B lists of [3, h, w] tensors in [-1, 1] (0..6 per sample,
    sizes differ), `target`: list of B [3, H, W] tensors, `instruction`, `task`: lists of B str,
    `n_refs`, `ref_tokens`, `target_tokens` (16 px per token), `ref_budget`, `ref_pixel_cap`: int64 [B], `meta`: the B
    json dicts, `__key__`: B keys.

    Args:
        budget: Reference budget B (B² pixels for all refs together); the start of a PixelBudgetSchedule
            (UniRef: 1024, then 1536, 2048).
        target_budget: The target's own budget (UniPic-3: 1024).
        budget_mode: How refs share the budget: "joint" (UniPic-3 / MICo / SELF), "edge" (UniPic 2.0: each
            image's longer edge resized to B), "equal", "independent"
            (FLUX.2, Qwen-Plus) or "table" (OmniGen2); see datamodules/budget.py.
        multiple: Every side is a multiple of this (32: VAE /8 x 2x2 patch x 2 for the VLM copy).
        min_side: Shortest side of any resized image; smaller originals are skipped (counted). The generated
            shards (`omnilab data synth multiref`) have 48 px refs: use 32 with them (tiny configs).
        max_refs: Samples with more references are skipped (UniPic-3: 6).
        rounding: "floor" (the total never exceeds B², SELF's fixed length) or "round" (UniPic-3).
        upscale: Enlarge images to fill the budget (UniPic-3 does); off: never enlarge.
        target_like_ref: Resize the target to its first reference's resized size (UniPic2-SD3.5M-Kontext needs
            reference and target the same size); samples without a reference use `target_budget`.
        task_mix: Task-mixing ratio for joint SFT, e.g. {edit: 0.5, compose: 0.5}: training keeps a sample
            of task t with probability w_t / max(w), so the ratio reweights the stream's natural mix
            (kept share of t proportional to w_t times its frequency); a task not named is left out.
            None: keep all. Evaluation is never thinned.
        drop_text: Training probability of an empty instruction (for classifier-free guidance).
        **kwargs: The `WebDataModule` arguments (data_dir, shards, batch sizes, workers, seed, ...).
    """

    required = ("json",)
    synth_kind = "multiref"

    def __init__(
        self,
        budget: int = 1024,
        target_budget: int = 1024,
        budget_mode: str = "joint",
        multiple: int = 32,
        min_side: int = 128,
        max_refs: int = MAX_REFS,
        rounding: str = "floor",
        upscale: bool = False,
        target_like_ref: bool = False,
        task_mix: dict[str, float] | None = None,
        drop_text: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if budget_mode not in MODES:
            raise ValueError(f"data.budget_mode {budget_mode!r} is not one of {', '.join(MODES)}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"data.rounding {rounding!r} is not one of {', '.join(ROUNDINGS)}")
        if min(budget, target_budget) < min_side:
            raise ValueError(
                f"data.budget ({budget}) and target_budget ({target_budget}) must be >= min_side"
            )
        if min_side < multiple or min_side % multiple:
            raise ValueError(
                f"data.min_side ({min_side}) must be a positive multiple of data.multiple ({multiple})"
            )
        if not 0 <= max_refs <= MAX_REFS:
            raise ValueError(f"data.max_refs must be in 0..{MAX_REFS}, got {max_refs}")
        check_task_mix(task_mix)
        if not 0.0 <= drop_text < 1.0:
            raise ValueError(f"data.drop_text must be in [0, 1), got {drop_text}")
        self.budget, self.target_budget, self.budget_mode = budget, target_budget, budget_mode
        self.multiple, self.min_side, self.max_refs = multiple, min_side, max_refs
        self.rounding, self.upscale, self.target_like_ref = rounding, upscale, target_like_ref
        self.drop_text = drop_text
        self._live_budget = torch.full((1,), budget, dtype=torch.int64).share_memory_()
        self._live_mix = SharedTaskMix(task_mix)

    # -- the PixelBudgetSchedule protocol
    def set_pixel_budget(self, budget: int) -> None:
        """Resize the references under budget B (B² pixels) from now on, in running workers too."""
        if int(budget) < self.min_side:
            raise ValueError(f"pixel budget {budget} is below data.min_side={self.min_side}")
        self._live_budget[0] = int(budget)

    @property
    def pixel_budget(self) -> int:
        """The reference budget the transform uses now."""
        return int(self._live_budget[0])

    # -- the DualTaskSchedule protocol (callbacks.dual_task.SupportsTaskMix)
    def set_task_mix(self, mix: dict[str, float] | None) -> None:
        """Keep a training sample of task t with probability mix[t] / max(mix) from now on, in running workers too."""
        self._live_mix.write(mix)

    @property
    def task_mix(self) -> dict[str, float] | None:
        """The training task mix the transform uses now (None: every task)."""
        return self._live_mix.read()

    def transform(self, train: bool) -> MultiRefTransform:
        """The budgeted decode (train: with task mixing and text dropout), as a picklable callable."""
        return MultiRefTransform(
            budget=self._live_budget,
            base_budget=self.budget,
            target_budget=self.target_budget,
            budget_mode=self.budget_mode,
            multiple=self.multiple,
            min_side=self.min_side,
            max_refs=self.max_refs,
            rounding=self.rounding,
            upscale=self.upscale,
            target_like_ref=self.target_like_ref,
            train=train,
            task_mix=self._live_mix,
            drop_text=self.drop_text,
        )

    def collate(self) -> Any:
        """Keeps the variable-size images as lists (`collate_multiref`)."""
        return collate_multiref
