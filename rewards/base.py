"""One interface for rewards, and `CombinedReward`, which calls several, checks them and combines them.

A reward is a callable `(images, prompts, references, meta) -> {score name: Tensor[N]}`:
- `images`: N generated images, each [3, H, W] in [-1, 1] (sizes may differ);
- `prompts`: N instructions; `references`: N lists of reference images ([3, h, w] in [-1, 1], the
  sample's refs in prompt order, "image k" = references[i][k - 1]); `meta`: N json dicts (the data's
  `.json`, e.g. the generator's `program` / `objects`, datamodules/multiref.py);
- the result: named scores, each a float Tensor [N]. NaN means "not applicable" to that sample (e.g. a
  colour check on a sample that names no colour) and only a reward with `nan_ok = True` may return it;
  inf never. Per-reference scores are named "ref0", "ref1", ... (reference k, 0-based), NaN beyond a
  sample's references: `per_reference` stacks them into [N, R].

`CombinedReward` implements the combination patterns of docs/methods/flow_grpo.md (Flow-GRPO's
`multi_score` weighted sum, GDPO / TRL normalise-then-sum, and the notes' MSGRPO proposal for
UniRef-Image-Edit, UniRef-Image-Edit paper) on top of `lightning_modules.components.grpo`. A reward that fails
(raises, returns the wrong shape, NaN where not allowed, inf) raises `RewardError` naming it: the GRPO
loop counts the batch as skipped (docs/architecture.md).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_modules.components.grpo import (
    AGGREGATION_RULES,
    aggregate_rewards,
    group_advantages,
    msgrpo_reward,
)

RewardFn = Callable[[list[Tensor], list[str], list[list[Tensor]], list[dict[str, Any]]], Mapping[str, Tensor]]
REF_KEY = re.compile(r"ref(\d+)")
RULES = (*AGGREGATION_RULES, "msgrpo")


def to_rgb(image: Tensor) -> np.ndarray:
    """A [3, H, W] image in [-1, 1] -> H x W x 3 float32 RGB in 0..255."""
    rgb = (image.detach().float().clamp(-1, 1) + 1) * 127.5
    return rgb.permute(1, 2, 0).cpu().numpy()


def to_uint8(image: Tensor) -> np.ndarray:
    """A [3, H, W] image in [-1, 1] -> H x W x 3 uint8 (rounded, as Flow-GRPO's reward code)."""
    return np.rint(to_rgb(image)).astype(np.uint8)


def from_uint8(image: np.ndarray) -> Tensor:
    """An H x W x 3 uint8 image -> [3, H, W] float32 in [-1, 1] (the data kinds' decoding)."""
    image = np.ascontiguousarray(image)
    if not image.flags.writeable:
        image = image.copy()
    return torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1.0


def reward_name(reward: Any) -> str:
    """How a reward calls itself: its `name`, else its function or class name."""
    return str(getattr(reward, "name", None) or getattr(reward, "__name__", None) or type(reward).__name__)


class RewardError(RuntimeError):
    """A reward could not score a batch (it failed, returned bad scores, its server is down or slow)."""


class Reward:
    """Base class of a reward: a named callable (images, prompts, references, meta) -> {score: Tensor[N]}.

    Subclasses set `name` (how logs and weights call it) and `nan_ok` (whether a NaN score, meaning
    "not applicable", is allowed) and implement `__call__`. A plain function with the same signature
    is a reward too (`nan_ok` then defaults to False).
    """

    name: str = "reward"
    nan_ok: bool = False

    def __call__(
        self,
        images: list[Tensor],
        prompts: list[str],
        references: list[list[Tensor]],
        meta: list[dict[str, Any]],
    ) -> dict[str, Tensor]:
        """Score N images: {score name: float Tensor [N]}."""
        raise NotImplementedError


def check_batch(
    images: list[Tensor], prompts: list[str], references: list[list[Tensor]], meta: list[dict[str, Any]]
) -> int:
    """N, after checking the four lists have one entry per image and the images are [3, H, W]; ValueError if not."""
    n = len(images)
    if not (len(prompts) == len(references) == len(meta) == n):
        raise ValueError(
            f"a reward batch needs one prompt, reference list and meta per image: got {n} images, "
            f"{len(prompts)} prompts, {len(references)} reference lists, {len(meta)} metas"
        )
    for i, img in enumerate(images):
        if img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(f"image {i} has shape {tuple(img.shape)}, expected [3, H, W]")
    return n


def check_scores(scores: Any, n: int, name: str, nan_ok: bool) -> dict[str, Tensor]:
    """The scores as fp32 [N] tensors, or RewardError naming the reward and the broken score."""
    if not isinstance(scores, Mapping) or not scores:
        raise RewardError(
            f"reward {name!r} returned {type(scores).__name__}, expected a non-empty dict of scores"
        )
    out = {}
    for key, value in scores.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise RewardError(f"reward {name!r}: score {key!r} is {type(value).__name__}, expected a Tensor")
        if value.shape != (n,):
            raise RewardError(
                f"reward {name!r}: score {key!r} has shape {tuple(value.shape)}, expected ({n},)"
            )
        value = value.detach().float()
        if bool(torch.isinf(value).any()):
            raise RewardError(f"reward {name!r}: score {key!r} holds inf")
        if not nan_ok and bool(torch.isnan(value).any()):
            raise RewardError(f"reward {name!r}: score {key!r} holds NaN, and this reward may not return NaN")
        out[key] = value
    refs = sorted(int(m.group(1)) for key in out if (m := REF_KEY.fullmatch(key)))
    if refs != list(range(len(refs))):
        raise RewardError(f"reward {name!r}: per-reference scores must be ref0..refR-1, got ref{refs}")
    return out


def per_reference(scores: Mapping[str, Tensor], prefix: str = "") -> Tensor | None:
    """Stack the scores `<prefix>ref0`, `<prefix>ref1`, ... into [N, R] (None if there are none)."""
    columns = []
    while f"{prefix}ref{len(columns)}" in scores:
        columns.append(scores[f"{prefix}ref{len(columns)}"])
    return torch.stack(columns, 1) if columns else None


def _nanmean_rows(values: Tensor) -> Tensor:
    """Row means [N] of [N, R] over the non-NaN entries; NaN for a row without any."""
    present = ~torch.isnan(values)
    total = torch.where(present, values, 0.0).sum(1)
    count = present.sum(1)
    return torch.where(count > 0, total / count.clamp_min(1), math.nan)


class CombinedReward(Reward):
    """Several rewards as one: calls each, checks its scores, and combines them with one of the notes' rules.

    Args:
        rewards: {name: reward}; the name prefixes its scores ("colour/score", "consistency/ref0").
        weights: {reward name: weight}; a reward without a weight is scored and logged but not
            combined. With rule "msgrpo" the key "min" weights the min-over-references term.
        rule: "sum_then_normalize" (Flow-GRPO `multi_score`, TRL's default), "normalize_then_sum"
            (GDPO / TRL) or "msgrpo" (the notes' MSGRPO proposal, `grpo.msgrpo_reward`). For the first
            two, each score of a weighted reward is one component with that reward's weight, except
            per-reference scores, which count as one component: their mean over the sample's refs.
            For "msgrpo", exactly one weighted reward has per-reference scores (the consistency);
            each score of the others is an instruction term w_k z_group(r_k), z-scored once (in
            `grpo.msgrpo_reward`); the consistency reward's weight and "min" weigh the reference
            terms against them.
        use_min: "msgrpo" only: add the min over references.
        eps: The eps of every z-score and renormalisation.
        name: This reward's name.
    """

    def __init__(
        self,
        rewards: Mapping[str, RewardFn],
        weights: Mapping[str, float],
        rule: str = "sum_then_normalize",
        use_min: bool = False,
        eps: float = 1e-4,
        name: str = "combined",
    ) -> None:
        if rule not in RULES:
            raise ValueError(f"rule {rule!r} is not one of {', '.join(RULES)}")
        if not rewards:
            raise ValueError("CombinedReward needs at least one reward")
        allowed = set(rewards) | ({"min"} if rule == "msgrpo" else set())
        unknown = sorted(set(weights) - allowed)
        if unknown or not set(weights) & set(rewards):
            raise ValueError(f"weights {sorted(weights)} must name some of the rewards {sorted(allowed)}")
        bad = [n for n in rewards if "/" in n or n == "min"]
        if bad:
            raise ValueError(f"reward names may not contain '/' or be 'min': {bad}")
        self.rewards, self.weights, self.rule = dict(rewards), dict(weights), rule
        self.use_min, self.eps, self.name = use_min, eps, name
        self.nan_ok = any(getattr(r, "nan_ok", False) for r in rewards.values())

    def __call__(
        self,
        images: list[Tensor],
        prompts: list[str],
        references: list[list[Tensor]],
        meta: list[dict[str, Any]],
    ) -> dict[str, Tensor]:
        """Every reward's checked scores, flattened as {"<reward>/<score>": Tensor [N]}; RewardError on a bad one."""
        n = check_batch(images, prompts, references, meta)
        out: dict[str, Tensor] = {}
        for name, reward in self.rewards.items():
            try:
                scores = reward(images, prompts, references, meta)
            except RewardError as err:
                raise RewardError(f"reward {name!r}: {err}") from err
            except Exception as err:
                raise RewardError(f"reward {name!r} failed: {type(err).__name__}: {err}") from err
            for key, value in check_scores(scores, n, name, getattr(reward, "nan_ok", False)).items():
                out[f"{name}/{key}"] = value
        return out

    def aggregate(self, scores: Mapping[str, Tensor], group_ids: Tensor) -> Tensor:
        """The combined reward [N] of `__call__`'s scores, by this reward's rule, with groups `group_ids` [N]."""
        instruction: dict[str, Tensor] = {}
        weights: dict[str, float] = {}
        references: list[tuple[str, Tensor]] = []
        for name in self.rewards:
            if name not in self.weights:
                continue
            keys = [k for k in scores if k.startswith(f"{name}/")]
            refs = per_reference(scores, f"{name}/")
            if refs is not None:
                references.append((name, refs.to(group_ids.device)))
            for key in keys:
                if not REF_KEY.fullmatch(key[len(name) + 1 :]):
                    instruction[key], weights[key] = scores[key].to(group_ids.device), self.weights[name]
        if self.rule != "msgrpo":
            for name, refs in references:
                instruction[f"{name}/refs"], weights[f"{name}/refs"] = _nanmean_rows(refs), self.weights[name]
            return aggregate_rewards(instruction, weights, group_ids, self.rule, self.eps)
        if len(references) != 1:
            raise ValueError(
                f"rule 'msgrpo' needs exactly one weighted reward with per-reference scores, got "
                f"{[name for name, _ in references]}"
            )
        (consistency_name, refs) = references[0]
        msgrpo_weights = {
            **weights,
            "consistency": self.weights[consistency_name],
            "min": self.weights.get("min", 1.0),
        }
        return msgrpo_reward(instruction, refs, group_ids, msgrpo_weights, self.use_min, self.eps)

    def advantages(
        self,
        scores: Mapping[str, Tensor],
        group_ids: Tensor,
        std_scope: str | None = None,
        clip: float | None = 5.0,
    ) -> Tensor:
        """GRPO advantages [N] of (gathered) scores: this reward's rule, then the group normalisation.

        Rule "sum_then_normalize": A = (r - group mean) / (std + eps), the std of `std_scope` (default "batch":
        over every reward given, Flow-GRPO's global_std). The other rules normalise over the batch themselves
        (A = their result, centred per group: scope "none"). A failure to combine is a RewardError.
        """
        try:
            combined = self.aggregate(scores, group_ids)
            scope = (std_scope or "batch") if self.rule == "sum_then_normalize" else "none"
            return group_advantages(combined, group_ids, scope, clip=clip)
        except ValueError as err:  # e.g. a non-finite combined reward
            raise RewardError(f"the rewards could not be combined into advantages: {err}") from err
