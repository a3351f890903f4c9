"""Flow-GRPO rollouts as a Callback: sample groups with the SDE, score, compute advantages, hand them to the module.

Implements the loop side of docs/methods/flow_grpo.md (Flow-GRPO: G trajectories per prompt with the
ODE->SDE sampler, per-prompt advantages with the std over the group or the batch, advantage clipping, groups
without signal dropped, several optimizer steps per rollout, the trained-step subsets of Flow-GRPO and
Flow-GRPO-Fast), §2 (TRL's std scopes, DanceGRPO's random steps), §3 (combined rewards: sum-then-normalise,
normalise-then-sum, the notes' MSGRPO proposal for UniRef-Image-Edit, UniRef-Image-Edit paper) and §6.1-4; PDTR
(UniPic 2.0 paper) switches this callback's prompts and rewards per stage (callbacks/dual_task.py).
The math is `lightning_modules.components.grpo`; the rewards are `rewards/`.

The callback knows no method. Its contract with the module is `SupportsGRPO`:
- `sample_with_logprob(...) -> Rollout`: sample trajectories, keep the transitions x -> x' of the trained steps
  and their old log-probabilities (fp32), return the final images;
- `grpo_loss(rollout) -> (loss, stats)`: re-score the stored transitions with the current weights and return
  the clipped policy loss plus beta KL to the reference (fp32);
- its `training_step(batch)` trains on `batch[ROLLOUT_KEY]`: a `Rollout` with advantages, or None, which means
  "this rollout batch was skipped on every rank" (Lightning refuses a None loss under DDP: return a zero loss
  that reaches every trainable parameter and leave the optimizer step without gradients).

Loop (Lightning stays in charge of the optimizer, so checkpoints, accumulation, clipping and resume are its own):
at the training step where the previous rollout is used up, `on_train_batch_start` takes the data batch's
prompts (instruction, refs, meta; filtered by `tasks`), samples `group_size` trajectories per prompt in
`steps_per_rollout` chunks, scores them, computes advantages, drops groups whose rewards are all equal (and groups
of one), and splits the kept trajectories into `steps_per_rollout` slices, one per training step (the chunk size
equals the slice size: the notes' "keep rollout and training batch sizes equal"); the data batches of the
following steps of the cycle are not used. A reward failure (`RewardError`: a reward raised, returned NaN where
not allowed or the wrong shape, a reward server is down or slow) or a rollout where nothing is left to train is
a counted skip of one step, agreed on all ranks (one all-reduce per rollout); `max_consecutive_skips` failures
in a row stop the run with a clear message.

Under FSDP the rollouts and held-out samples run through the wrapped model's forward (`omnilab.fsdp.run_in_root`),
as the training step does, so sharded weights are gathered unit by unit.

Randomness: the initial noise and SDE noise of trajectory k of the rollout at global step s on rank r come
from `torch_generator(seed, "rollout", s, r, k)`, the window from `(seed, "steps", s)`, the held-out samples
from `(seed, "eval", key)`: a resumed run draws exactly what the uninterrupted one drew. The state_dict keeps
the counters and, on one process, the unused part of the current rollout (so a checkpoint written mid-cycle
resumes exactly; under DDP that part is dropped and a fresh rollout starts: callback states are saved from
rank 0 only).

Group grids (`grid_every_n_steps`): a rollout's groups drawn side by side with each sample's reward and advantage
(`log_group_grid`, drawn by callbacks/images.py), saved under `<run>/samples/` and logged.

Held-out evaluation (reward hacking made visible): on every validation (and test) batch the module samples
one image per held-out prompt with the ODE (noise 0) at `eval_steps`, and both the training reward and a
DIFFERENT held-out reward (`eval_reward`) score it; `eval/train_reward` and `eval/heldout_reward` are logged
side by side, and `stop_on_divergence` = K stops the run when the first rose and the second fell over K
evaluations in a row.
"""

from __future__ import annotations

import importlib
import itertools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from lightning_modules.components.grpo import (
    STD_SCOPES,
    STEP_MODES,
    gather_groups,
    trained_step_indices,
    zero_advantage_groups,
)
from omnilab.allowlist import check_import_path
from omnilab.fsdp import run_in_root
from omnilab.seeding import torch_generator
from rewards.base import REF_KEY, RULES, CombinedReward, RewardError, per_reference
from rewards.remote import check_reward_servers

ROLLOUT_KEY = "grpo_rollout"

# --------------------------------------------------------------------------- the protocol


def _to(value: Any, device: torch.device | str | None) -> Any:
    """`value` with every tensor inside (lists, tuples, dicts) detached and moved to `device` (None: the CPU)."""
    if isinstance(value, Tensor):
        return value.detach().to(device or "cpu")
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to(v, device) for v in value)
    return value


@dataclass
class Rollout:
    """n sampled trajectories and the transitions of their trained steps (T of them), as the module returns them.

    `latents[i][t]` is the x the SDE step t started from and `next_latents[i][t]` the x' it drew
    (each [T, C, h, w]; trajectories may differ in size); `log_probs` [n, T] are log pi_old(x'|x) in fp32;
    `sigmas` / `next_sigmas` [n, T] the step's sigma and sigma_next; `images` the n final images [3, H, W]
    in [-1, 1]; `prompts` the instructions; `conditioning` one entry per trajectory that the module re-uses
    when it re-scores (plain data: dicts / lists of tensors; e.g. its text embeddings and reference latents,
    as Flow-GRPO stores prompt_embeds); `guidance` the CFG scale of the rollout (re-scoring uses it too);
    `advantages` [n] fp32, set by the callback before training.
    """

    prompts: list[str]
    conditioning: list[Any]
    latents: list[Tensor]
    next_latents: list[Tensor]
    log_probs: Tensor
    sigmas: Tensor
    next_sigmas: Tensor
    images: list[Tensor]
    guidance: float
    advantages: Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index: Sequence[int]) -> Rollout:
        """The trajectories at `index`, in that order."""
        out: dict[str, Any] = {}
        for f in fields(Rollout):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value = value[torch.as_tensor(list(index), dtype=torch.long, device=value.device)]
            elif isinstance(value, list):
                value = [value[i] for i in index]
            out[f.name] = value
        return Rollout(**out)

    @staticmethod
    def cat(parts: Sequence[Rollout]) -> Rollout:
        """One rollout of several, in order (they must share the guidance)."""
        if len({p.guidance for p in parts}) != 1:
            raise ValueError("rollouts to concatenate must share one guidance scale")
        out: dict[str, Any] = {}
        for f in fields(Rollout):
            values = [getattr(p, f.name) for p in parts]
            if f.name == "guidance":
                out[f.name] = values[0]
            elif isinstance(values[0], Tensor):
                out[f.name] = torch.cat(values)
            elif values[0] is None:
                out[f.name] = None
            else:
                out[f.name] = [x for v in values for x in v]
        return Rollout(**out)

    def state(self) -> dict[str, Any]:
        """Plain data (CPU tensors, lists, dicts, floats) for a checkpoint loaded with weights_only=True."""
        return {f.name: _to(getattr(self, f.name), None) for f in fields(Rollout)}

    @staticmethod
    def from_state(state: Mapping[str, Any], device: torch.device | str = "cpu") -> Rollout:
        """The inverse of `state`, with the tensors moved to `device`."""
        return Rollout(**{f.name: _to(state[f.name], device) for f in fields(Rollout)})


@runtime_checkable
class SupportsGRPO(Protocol):
    """What the GRPO callback asks of a module (lightning_modules/flow_grpo.py implements it).

    Besides these two methods, the module's `training_step(batch, batch_idx)` trains on `batch[ROLLOUT_KEY]`:
    `loss, stats = self.grpo_loss(rollout)`; when it is None (a skip every rank agreed on) it returns a zero loss
    over its trainable parameters and makes that optimizer step a no-op.
    """

    def sample_with_logprob(
        self,
        refs: Sequence[Sequence[Tensor]],
        prompts: Sequence[str],
        size: Sequence[tuple[int, int]],
        steps: int,
        noise_level: float | None,
        train_steps: Sequence[int],
        generators: Sequence[torch.Generator],
        guidance: float | None = None,
        sde_steps: Sequence[int] | None = None,
    ) -> Rollout:
        """Sample one trajectory per prompt (no grad) and keep the transitions of `train_steps`.

        `size` (H, W) per prompt; `steps` sampling steps; `noise_level` the SDE's a (None: the module's; 0: the
        ODE, for evaluation); `train_steps` the 0-based steps (0 = noisiest) whose transitions are stored, in
        order; `sde_steps` the steps that are stochastic (None: all; the others run the ODE, Flow-GRPO-Fast);
        `generators` one per prompt: its initial noise then its SDE noise; `guidance` the CFG scale (None: the
        module's sampler default; <= 1: no CFG).
        """
        ...

    def grpo_loss(self, rollout: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, detached fp32 stats) on a rollout with advantages: clipped policy loss + beta KL to the reference."""
        ...


# --------------------------------------------------------------------------- rewards from a config


def build_reward(
    rewards: Mapping[str, Any],
    weights: Mapping[str, float] | None = None,
    rule: str = "sum_then_normalize",
    use_min: bool = False,
    name: str = "reward",
) -> CombinedReward:
    """A `CombinedReward` from {name: {class_path, init_args} | a reward}; class paths are allowlisted first.

    `weights` default to 1 for every reward. The dict key names the reward in logs and weights.
    """
    if not rewards:
        raise ValueError(
            "a GRPO reward needs at least one entry: {name: {class_path: ..., init_args: {...}}}"
        )
    built = {}
    for key, spec in rewards.items():
        if isinstance(spec, Mapping):
            path = spec.get("class_path")
            if not isinstance(path, str) or "." not in path:
                raise ValueError(
                    f"reward {key!r}: give {{class_path: module.Class, init_args: {{...}}}}, got {spec}"
                )
            check_import_path(path)
            module, _, attr = path.rpartition(".")
            built[key] = getattr(importlib.import_module(module), attr)(**dict(spec.get("init_args") or {}))
        elif callable(spec):
            built[key] = spec
        else:
            raise TypeError(f"reward {key!r} is {type(spec).__name__}: give a class_path spec or a callable")
    return CombinedReward(
        built, dict(weights) if weights is not None else dict.fromkeys(built, 1.0), rule, use_min, name=name
    )


def reward_components(reward: CombinedReward, scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """{reward name: [N]} raw per-sample values: the mean of its scores (per-reference scores first averaged
    over the sample's references); NaN where none applies."""
    out = {}
    for name in reward.rewards:
        keys = [k for k in scores if k.startswith(f"{name}/") and not REF_KEY.fullmatch(k[len(name) + 1 :])]
        columns = [scores[k].float() for k in keys]
        refs = per_reference(scores, f"{name}/")
        if refs is not None:
            columns.append(_nanmean(refs.float(), 1))
        out[name] = _nanmean(torch.stack(columns, 1), 1) if columns else torch.full((0,), math.nan)
    return out


def reward_level(reward: CombinedReward, scores: Mapping[str, Tensor]) -> Tensor:
    """Per-sample reward level [N]: the weighted mean of the applicable weighted rewards (NaN if none applies).

    The advantages use the configured rule; this raw level is what the logs and the divergence check follow
    (a normalised reward has mean 0 by construction).
    """
    parts = reward_components(reward, scores)
    total, weight = None, None
    for name, w in reward.weights.items():
        if name not in parts:
            continue
        value = parts[name]
        ok = ~torch.isnan(value)
        term, wt = torch.where(ok, w * value, 0.0), ok.float() * w
        total, weight = (term, wt) if total is None else (total + term, weight + wt)
    return torch.where(weight > 0, total / weight.clamp_min(1e-12), math.nan)


def _nanmean(values: Tensor, dim: int) -> Tensor:
    """Mean over `dim` of the non-NaN entries (NaN where there are none)."""
    ok = ~torch.isnan(values)
    count = ok.sum(dim)
    return torch.where(count > 0, torch.where(ok, values, 0.0).sum(dim) / count.clamp_min(1), math.nan)


def flat_groups(scores: Mapping[str, Tensor], keys: Sequence[str], group_ids: Tensor) -> Tensor:
    """bool [N]: the sample's group has the same value of every score in `keys` (NaN ignored): no signal.

    Exact equality of the raw scores (their advantages would be 0 up to rounding), so these groups are dropped
    whatever the aggregation rule.
    """
    flat = torch.ones(group_ids.shape[0], dtype=torch.bool)
    for g in torch.unique(group_ids).tolist():
        member = group_ids == g
        for key in keys:
            values = scores[key][member]
            values = values[~torch.isnan(values)]
            if values.numel() > 1 and bool(values.max() != values.min()):
                flat[member] = False
                break
    return flat


def check_std_scope(rule: str, std_scope: str | None) -> None:
    """Refuse a std_scope with a rule that normalises itself (it would be silently ignored)."""
    if std_scope is not None and rule != "sum_then_normalize":
        raise ValueError(
            f"std_scope={std_scope!r} applies to rule 'sum_then_normalize' only: rule {rule!r} ends with its own "
            "normalisation over the batch gathered from all processes (GDPO's), so leave std_scope unset"
        )


def group_label(reward: float, advantage: float, kept: bool) -> str:
    """The two lines printed under a rollout sample in the group grid: its reward and its advantage."""
    return f"r {reward:.4f}\n" + (f"A {advantage:+.4f}" if kept else "A 0 (dropped)")


class GRPOSkipError(RuntimeError):
    """Too many rollout batches in a row were skipped (a reward or reward server keeps failing)."""


# --------------------------------------------------------------------------- the callback


class GRPORollouts(Callback):
    """Flow-GRPO rollouts, rewards, advantages and the held-out evaluation, for a module with `SupportsGRPO`.

    Args:
        reward: The training reward: {name: {class_path: rewards.scene.ColourCheck, init_args: {...}}, ...}
            (class paths are allowlisted; a built reward is accepted too).
        weights: {reward name: weight} (default 1 each); with rule "msgrpo" the key "min" weights the
            min-over-references term.
        rule: How rewards combine (notes §3): "sum_then_normalize" (Flow-GRPO multi_score), "normalize_then_sum"
            (GDPO) or "msgrpo" (one consistency score per reference + the instruction reward, each z-scored
            in the group; `rewards.base.CombinedReward`).
        use_min: "msgrpo": add the min over references.
        eval_reward: The held-out reward, configured like `reward`; it should differ from the training reward
            (e.g. train colour + position, evaluate count + consistency). None: only the training reward is
            scored on the held-out prompts.
        eval_weights: Its weights (default 1 each).
        group_size: G, trajectories per prompt (Flow-GRPO SD3: 24).
        prompts_per_rollout: Prompts taken from each rollout's data batch (after the task filter); None: all.
        steps: Sampling steps of a rollout (Flow-GRPO: 10).
        eval_steps: Sampling steps of the held-out ODE samples (Flow-GRPO: 40).
        train_steps: Which steps are stored and trained (`grpo.trained_step_indices`): "all", "fraction"
            (Flow-GRPO: the first int(0.99 T)), "window" (Flow-GRPO-Fast: only a random window runs the SDE and
            is trained, the rest the ODE) or "random" (DanceGRPO's subset; here one draw per rollout, DanceGRPO
            draws one per sample).
        timestep_fraction: The fraction of "fraction" / "random".
        window: "window": the (lo, hi) range the window is drawn in (default (0, steps // 2)).
        window_size: "window": its length (2-4).
        steps_per_rollout: Training steps (batches) that consume one rollout, each on one slice of its kept
            trajectories; with the trainer's accumulate_grad_batches A that is steps_per_rollout / A optimizer
            steps per rollout (Flow-GRPO SD3: 2 optimizer steps).
        std_scope: The advantage std of rule "sum_then_normalize": "group", "batch" (the default: Flow-GRPO
            SD3's global_std, the std of the rewards gathered over all processes) or "none" (Dr. GRPO). The
            other rules end with their own normalisation over the gathered batch (GDPO's), so they refuse a
            std_scope: leave it unset.
        advantage_clip: Clip advantages to +-this (Flow-GRPO: 5); None: no clipping.
        guidance: Rollout CFG scale (None: the module's sampler default; 1: no-CFG rollouts and training).
        eval_guidance: CFG scale of the held-out samples (None: the module's sampler default).
        size: (H, W) of every rollout image; None: each sample's target size (its first reference's without one).
        tasks: Train only on data samples whose `task` is one of these (None: all); PDTR's stages set it.
        max_consecutive_skips: Stop after this many failed rollout batches in a row.
        stop_on_divergence: K: stop when the training reward on the held-out prompts rose while the held-out
            reward fell over K evaluations in a row; None: never.
        log_every_n_steps: Log the reward, advantage and skip statistics every this many steps.
        seed: Seed of the rollout, window and evaluation noise streams.
        grid_every_n_steps: Every this many steps (at the first rollout from each multiple on; 0: never), draw
            the rollout's groups as a grid (`callbacks.images`): one row per group, its references then its G
            samples, each sample's reward (the level the logs follow, `reward_level`) and advantage (the one
            trained on; 0 in a dropped group, marked "dropped") under it, the instruction under the row; saved
            as `<run>/samples/grpo_step_NNNNNN.png` and logged (MLflow artifact of the same name). Rank 0
            draws its own groups.
        grid_groups: Groups (rows) per grid, the first ones of the rollout.
        grid_cell: Side of one grid cell in pixels.
    """

    def __init__(
        self,
        reward: dict[str, Any],
        weights: dict[str, float] | None = None,
        rule: str = "sum_then_normalize",
        use_min: bool = False,
        eval_reward: dict[str, Any] | None = None,
        eval_weights: dict[str, float] | None = None,
        group_size: int = 24,
        prompts_per_rollout: int | None = None,
        steps: int = 10,
        eval_steps: int = 40,
        train_steps: str = "fraction",
        timestep_fraction: float = 0.99,
        window: tuple[int, int] | None = None,
        window_size: int = 2,
        steps_per_rollout: int = 2,
        std_scope: str | None = None,
        advantage_clip: float | None = 5.0,
        guidance: float | None = None,
        eval_guidance: float | None = None,
        size: tuple[int, int] | None = None,
        tasks: list[str] | None = None,
        max_consecutive_skips: int = 5,
        stop_on_divergence: int | None = None,
        log_every_n_steps: int = 10,
        seed: int = 0,
        grid_every_n_steps: int = 0,
        grid_groups: int = 2,
        grid_cell: int = 96,
    ) -> None:
        if rule not in RULES:
            raise ValueError(f"rule {rule!r} is not one of {', '.join(RULES)}")
        if std_scope is not None and std_scope not in STD_SCOPES:
            raise ValueError(f"std_scope {std_scope!r} is not one of {', '.join(STD_SCOPES)}")
        check_std_scope(rule, std_scope)
        if train_steps not in STEP_MODES:
            raise ValueError(f"train_steps {train_steps!r} is not one of {', '.join(STEP_MODES)}")
        if (
            group_size < 1
            or steps < 1
            or eval_steps < 1
            or steps_per_rollout < 1
            or max_consecutive_skips < 1
        ):
            raise ValueError(
                "group_size, steps, eval_steps, steps_per_rollout, max_consecutive_skips must be >= 1"
            )
        if grid_every_n_steps < 0 or grid_groups < 1 or grid_cell < 16:
            raise ValueError(
                f"grid_every_n_steps must be >= 0, grid_groups >= 1 and grid_cell >= 16, got "
                f"{grid_every_n_steps}, {grid_groups}, {grid_cell}"
            )
        if prompts_per_rollout is not None and prompts_per_rollout < 1:
            raise ValueError(f"prompts_per_rollout must be >= 1 or None, got {prompts_per_rollout}")
        self.reward = build_reward(reward, weights, rule, use_min, name="reward")
        self.eval_reward = build_reward(eval_reward, eval_weights, name="heldout") if eval_reward else None
        self.group_size, self.prompts_per_rollout = group_size, prompts_per_rollout
        self.steps, self.eval_steps = steps, eval_steps
        self.train_steps, self.timestep_fraction = train_steps, timestep_fraction
        self.window, self.window_size = (tuple(window) if window is not None else None), window_size
        trained_step_indices(
            steps, train_steps, timestep_fraction, self.window, window_size, torch.Generator()
        )
        self.steps_per_rollout, self.std_scope, self.advantage_clip = (
            steps_per_rollout,
            std_scope,
            advantage_clip,
        )
        self.guidance, self.eval_guidance = guidance, eval_guidance
        self.size = tuple(size) if size is not None else None
        self.tasks = list(tasks) if tasks is not None else None
        self.max_consecutive_skips, self.stop_on_divergence = max_consecutive_skips, stop_on_divergence
        self.log_every_n_steps, self.seed = max(1, log_every_n_steps), seed
        self.grid_every_n_steps, self.grid_groups, self.grid_cell = grid_every_n_steps, grid_groups, grid_cell
        self.next_grid = 0  # the step from which the next rollout is drawn (state_dict)
        # counters (state_dict)
        self.rollouts = self.skipped = self.consecutive = self.empty = self.no_prompts = 0
        self.dropped_groups = self.singleton_groups = self.trajectories = 0
        self.evaluations: list[tuple[float, float]] = []  # (train reward, held-out reward) per evaluation
        self.diverged = False
        # the current rollout: its kept trajectories and their slices, one per training step
        self._buffer: Rollout | None = None
        self._slices: list[list[int]] = []
        self._pos = 0
        # in-memory history (not checkpointed): one dict per rollout, for benchmarks and tests
        self.history: list[dict[str, float]] = []
        self._pending_log: dict[str, list[float]] = {}
        self._last_log = -1
        self._eval_sums: dict[str, list[float]] = {}
        self._t_update: float | None = None
        self._times = {"rollout": 0.0, "update": 0.0}

    # -- the stage switch (callbacks.dual_task.SupportsStageSwitch)
    def set_stage(
        self, tasks: list[str] | None, reward: Mapping[str, Any] | None = None, fresh_rollout: bool = True
    ) -> None:
        """Train on samples of `tasks` from now on, and with `reward` ({rewards, weights, rule, use_min}) if given.

        With `fresh_rollout` the unused part of the current rollout is dropped, so the next step samples under the
        new stage (a stage re-applied after a restore keeps the restored rollout).
        """
        self.tasks = list(tasks) if tasks is not None else None
        if reward is not None:
            spec = {"weights": None, "rule": "sum_then_normalize", "use_min": False, **dict(reward)}
            check_std_scope(spec["rule"], self.std_scope)
            self.reward = build_reward(
                spec["rewards"], spec["weights"], spec["rule"], bool(spec["use_min"]), name="reward"
            )
        if fresh_rollout:
            self._buffer, self._slices, self._pos = None, [], 0

    # -- hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check the module implements the protocol."""
        if not isinstance(pl_module, SupportsGRPO):
            raise TypeError(
                f"GRPORollouts needs a module with sample_with_logprob(...) and grpo_loss(rollout) "
                f"(callbacks.grpo.SupportsGRPO, e.g. lightning_modules.flow_grpo.FlowGRPO), got {type(pl_module).__name__}"
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Stop at once when a reward server does not answer; under DDP drop a restored mid-cycle rollout."""
        check_reward_servers(self.reward, self.eval_reward)
        if trainer.world_size > 1 and self._buffer is not None:
            self._buffer, self._slices, self._pos = None, [], 0

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Attach the next slice of the current rollout to the batch, rolling out first when it is used up."""
        if self._buffer is None or self._pos >= len(self._slices):
            start = time.perf_counter()
            self._buffer, self._slices, self._pos = None, [], 0
            self._rollout(trainer, pl_module, batch)
            self._times["rollout"] += time.perf_counter() - start
        if self._buffer is None:
            batch[ROLLOUT_KEY] = None
        else:
            batch[ROLLOUT_KEY] = self._buffer.select(self._slices[self._pos])
            self._pos += 1
        self._t_update = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log the statistics gathered since the last log, every `log_every_n_steps` steps."""
        if self._t_update is not None:
            self._times["update"] += time.perf_counter() - self._t_update
            self._t_update = None
        if isinstance(batch, dict):
            batch.pop(ROLLOUT_KEY, None)  # let the rollout's tensors go
        step = trainer.global_step
        if step - self._last_log < self.log_every_n_steps and self._last_log >= 0:
            return
        self._last_log = step
        logs = {k: sum(v) / len(v) for k, v in self._pending_log.items() if v}
        self._pending_log = {}
        total = self._times["rollout"] + self._times["update"]
        logs |= {
            "grpo/rollouts": float(self.rollouts),
            "grpo/skipped": float(self.skipped),
            "grpo/empty": float(self.empty),
            "grpo/no_prompts": float(self.no_prompts),
            "grpo/dropped_groups": float(self.dropped_groups),
            "grpo/singleton_groups": float(self.singleton_groups),
            "time/rollout_share": self._times["rollout"] / total if total > 0 else 0.0,
        }
        for key, value in logs.items():
            if math.isfinite(value):
                pl_module.log(key, value, on_step=True, on_epoch=False, batch_size=1)

    # -- the rollout
    def _prompts(self, batch: Mapping[str, Any]) -> list[int]:
        """Indices of the batch's samples this rollout uses: the stage's tasks, at most prompts_per_rollout."""
        tasks = batch.get("task") or [None] * len(batch["instruction"])
        index = [i for i, t in enumerate(tasks) if self.tasks is None or t in self.tasks]
        return index[: self.prompts_per_rollout] if self.prompts_per_rollout is not None else index

    def _sizes(self, batch: Mapping[str, Any], index: Sequence[int]) -> list[tuple[int, int]]:
        """(H, W) of each chosen sample: `size`, else its target's, else its first reference's."""
        if self.size is not None:
            return [self.size] * len(index)
        out = []
        for i in index:
            if "target" in batch:
                out.append(tuple(batch["target"][i].shape[-2:]))
            elif batch["refs"][i]:
                out.append(tuple(batch["refs"][i][0].shape[-2:]))
            else:
                raise ValueError("GRPORollouts: a sample without target or reference needs `size`")
        return out

    def _rollout(self, trainer: Trainer, pl_module: LightningModule, batch: Mapping[str, Any]) -> None:
        """Sample and score; gather the scores of all processes and compute the advantages; keep what trains."""
        step, rank = trainer.global_step, trainer.global_rank
        self.rollouts += 1
        index = self._prompts(batch)
        failed, reason = False, ""
        rollout, scores = None, None
        if not index:
            self.no_prompts += 1
            reason = "no prompt of the stage's tasks in the batch"
        else:
            try:
                rollout, scores = self._sample_and_score(trainer, pl_module, batch, index, step, rank)
            except RewardError as err:
                failed, reason = True, f"{type(err).__name__}: {err}"
        any_failed = self._any(trainer, pl_module, failed)
        keep = None
        if not any_failed:  # every process is here: gather, then the advantages of the whole batch
            all_scores, all_groups, mine = gather_groups(
                scores or {}, len(index) if scores else 0, self.group_size
            )
            try:
                advantages = self.reward.advantages(
                    all_scores, all_groups, self.std_scope, self.advantage_clip
                )
            except RewardError as err:  # the same data on every process: every process lands here
                any_failed, reason = True, f"{type(err).__name__}: {err}"
            else:
                if scores is not None:
                    local_groups = all_groups[mine] - all_groups[mine][0]
                    advantages, keep = self._keep(scores, advantages[mine], local_groups, step)
                    if self.grid_every_n_steps and step >= self.next_grid:
                        self.next_grid = (step // self.grid_every_n_steps + 1) * self.grid_every_n_steps
                        if trainer.is_global_zero:
                            self.log_group_grid(
                                trainer, rollout, batch, index, scores, advantages, keep, step
                            )
        if any_failed:
            self.skipped += 1
            self.consecutive += 1
            pl_module.print(
                f"step {step}: GRPO rollout batch skipped on all ranks ({reason or 'another rank failed'})"
            )
            if self.consecutive >= self.max_consecutive_skips:
                raise GRPOSkipError(
                    f"{self.consecutive} GRPO rollout batches in a row were skipped (last at step {step}: "
                    f"{reason or 'a reward failed on another rank'}); stopping. Check the reward functions and "
                    f"that the reward server answers within its timeout."
                )
            return
        if self._any(trainer, pl_module, keep is None or not bool(keep.any())):
            if index:  # (a batch without the stage's prompts is counted as no_prompts)
                self.empty += 1
            return
        self.consecutive = 0
        rollout.advantages = advantages.to(pl_module.device)
        kept = torch.nonzero(keep).flatten().tolist()
        self._buffer = rollout.select(kept)
        n, u = len(kept), self.steps_per_rollout
        if n >= u:
            bounds = [round(k * n / u) for k in range(u + 1)]
            self._slices = [list(range(bounds[k], bounds[k + 1])) for k in range(u)]
        else:  # fewer trajectories than steps: every step trains on one (reused) trajectory
            self._slices = [[k % n] for k in range(u)]
        self._pos = 0

    def log_group_grid(
        self,
        trainer: Trainer,
        rollout: Rollout,
        batch: Mapping[str, Any],
        index: Sequence[int],
        scores: Mapping[str, Tensor],
        advantages: Tensor,
        keep: Tensor,
        step: int,
    ) -> Path:
        """Draw the first `grid_groups` groups of a rollout with each sample's reward and advantage; save, log."""
        from callbacks.images import cell_grid, label_grid, log_image, to_pil

        g, groups = self.group_size, min(self.grid_groups, len(index))
        levels = reward_level(self.reward, scores)
        refs = [[r.detach().float().cpu() for r in batch["refs"][i]] for i in index[:groups]]
        n_refs = max(len(r) for r in refs)
        rows, labels, captions = [], [], []
        for k in range(groups):
            members = range(k * g, (k + 1) * g)
            images = [rollout.images[m].detach().float().cpu() for m in members]
            rows.append([*refs[k], *([None] * (n_refs - len(refs[k]))), *images])
            labels.append([""] * n_refs + [group_label(float(levels[m]), float(advantages[m]), bool(keep[m])) for m in members])  # fmt: skip
            captions.append(rollout.prompts[k * g])
        names = [f"reference {i + 1}" for i in range(n_refs)] + [f"sample {j + 1}" for j in range(g)]
        image = label_grid(
            to_pil(cell_grid(rows, self.grid_cell)),
            groups,
            n_refs,
            captions,
            self.grid_cell,
            names=names,
            labels=labels,
        )
        out_dir = Path(trainer.default_root_dir) / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"grpo_step_{step:06d}.png"
        image.save(path)
        for logger in trainer.loggers:
            log_image(logger, image, step, stem="grpo_step", tag="grpo_groups")
        return path

    @staticmethod
    def _any(trainer: Trainer, pl_module: LightningModule, flag: bool) -> bool:
        """Whether `flag` holds on any process (one all-reduce)."""
        total = trainer.strategy.reduce(torch.tensor(float(flag), device=pl_module.device), reduce_op="sum")
        return float(total) > 0

    def _sample_and_score(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        batch: Mapping[str, Any],
        index: list[int],
        step: int,
        rank: int,
    ) -> tuple[Rollout, dict[str, Tensor]]:
        """(rollout, checked reward scores) of G trajectories for each chosen prompt (this process's)."""
        g = self.group_size
        traj = [i for i in index for _ in range(g)]
        n = len(traj)
        prompts = [batch["instruction"][i] for i in traj]
        refs = [list(batch["refs"][i]) for i in traj]
        meta = [dict(batch["meta"][i]) if "meta" in batch else {} for i in traj]
        sizes = [s for s in self._sizes(batch, index) for _ in range(g)]
        device = pl_module.device
        gens = [torch_generator(self.seed, "rollout", step, rank, k, device=device) for k in range(n)]
        train_steps = trained_step_indices(
            self.steps,
            self.train_steps,
            self.timestep_fraction,
            self.window,
            self.window_size,
            torch_generator(self.seed, "steps", step),
        )
        sde_steps = train_steps if self.train_steps == "window" else None
        chunk = math.ceil(n / self.steps_per_rollout)
        parts = []
        with torch.no_grad(), trainer.precision_plugin.train_step_context():
            for lo in range(0, n, chunk):
                hi = min(n, lo + chunk)
                parts.append(
                    run_in_root(
                        trainer, pl_module, "sample_with_logprob",
                        refs[lo:hi], prompts[lo:hi], sizes[lo:hi], self.steps, None, train_steps, gens[lo:hi],
                        self.guidance, sde_steps,
                    )
                )  # fmt: skip
        rollout = Rollout.cat(parts)
        images = [img.detach().float().cpu() for img in rollout.images]
        scores = self.reward(images, prompts, [[r.cpu() for r in rs] for rs in refs], meta)
        return rollout, scores

    def _keep(
        self, scores: Mapping[str, Tensor], advantages: Tensor, group_ids: Tensor, step: int
    ) -> tuple[Tensor, Tensor]:
        """(advantages with dropped groups zeroed, keep [N] bool) of this process's groups; records the stats."""
        keys = [k for k in scores if k.split("/", 1)[0] in self.reward.weights]
        sizes = torch.bincount(group_ids)
        singleton = sizes[group_ids] < 2
        drop = zero_advantage_groups(advantages, group_ids) | flat_groups(scores, keys, group_ids) | singleton
        advantages = torch.where(drop, 0.0, advantages)
        groups, singles = len(sizes), int((sizes < 2).sum())
        dropped = len(torch.unique(group_ids[drop]))
        self.singleton_groups += singles
        self.dropped_groups += dropped - singles
        self.trajectories += len(group_ids)
        level = reward_level(self.reward, scores)
        record = {
            "step": float(step),
            "reward/total": float(torch.nanmean(level)) if bool((~torch.isnan(level)).any()) else math.nan,
            "grpo/advantage_std": float(advantages[~drop].std()) if int((~drop).sum()) > 1 else 0.0,
            "grpo/advantage_abs_mean": float(advantages[~drop].abs().mean()) if bool((~drop).any()) else 0.0,
            "grpo/kept_fraction": float((~drop).float().mean()),
            "grpo/dropped_group_fraction": dropped / groups,
        }
        for name, value in reward_components(self.reward, scores).items():
            ok = ~torch.isnan(value)
            if bool(ok.any()):
                record[f"reward/{name}"] = float(value[ok].mean())
        self.history.append(record)
        for key, value in record.items():
            if key != "step":
                self._pending_log.setdefault(key, []).append(value)
        return advantages, ~drop

    # -- held-out evaluation
    def _evaluate_batch(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        """Sample one ODE image per held-out prompt and add its training and held-out rewards to the sums."""
        n = len(batch["instruction"])
        keys = [k or str(i) for i, k in enumerate(batch.get("__key__") or [""] * n)]
        index = list(range(n))
        gens = [torch_generator(self.seed, "eval", k, device=pl_module.device) for k in keys]
        with torch.no_grad(), trainer.precision_plugin.val_step_context():
            out = run_in_root(
                trainer, pl_module, "sample_with_logprob",
                batch["refs"], list(batch["instruction"]), self._sizes(batch, index), self.eval_steps, 0.0, [],
                gens, self.eval_guidance, None,
            )  # fmt: skip
        images = [img.detach().float().cpu() for img in out.images]
        refs = [[r.cpu() for r in rs] for rs in batch["refs"]]
        meta = [dict(m) for m in batch.get("meta") or [{}] * n]
        prompts = list(batch["instruction"])
        try:
            levels = {"train_reward": reward_level(self.reward, self.reward(images, prompts, refs, meta))}
            if self.eval_reward is not None:
                scores = self.eval_reward(images, prompts, refs, meta)
                levels["heldout_reward"] = reward_level(self.eval_reward, scores)
                for name, value in reward_components(self.eval_reward, scores).items():
                    levels[f"heldout/{name}"] = value
        except RewardError as err:
            pl_module.print(f"held-out evaluation batch skipped: {err}")
            self._eval_sums.setdefault("skipped", [0.0, 0.0])[0] += 1.0
            return
        for key, value in levels.items():
            ok = ~torch.isnan(value)
            sums = self._eval_sums.setdefault(key, [0.0, 0.0])
            sums[0] += float(value[ok].sum())
            sums[1] += float(ok.sum())

    def _evaluation_end(self, trainer: Trainer, pl_module: LightningModule, prefix: str) -> dict[str, float]:
        """Reduce the sums over ranks, log `<prefix>/<name>`, and return the means."""
        names = sorted(self._eval_sums)
        if not names:
            return {}
        sums = torch.tensor([self._eval_sums[k] for k in names], dtype=torch.float64, device=pl_module.device)
        sums = trainer.strategy.reduce(sums, reduce_op="sum").cpu()
        self._eval_sums = {}
        means = {}
        for name, (total, count) in zip(names, sums.tolist()):
            value = total if name == "skipped" else (total / count if count > 0 else math.nan)
            means[name] = value
            if math.isfinite(value):
                pl_module.log(
                    f"{prefix}/{name}", value, on_step=False, on_epoch=True, batch_size=1, sync_dist=False
                )
        return means

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Score the held-out prompts of this validation batch (not during the sanity check)."""
        if not trainer.sanity_checking:
            self._evaluate_batch(trainer, pl_module, batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log eval/train_reward and eval/heldout_reward side by side; stop on a K-evaluation divergence."""
        if trainer.sanity_checking:
            self._eval_sums = {}
            return
        means = self._evaluation_end(trainer, pl_module, "eval")
        train, heldout = means.get("train_reward", math.nan), means.get("heldout_reward", math.nan)
        if not (math.isfinite(train) and math.isfinite(heldout)):
            return
        self.evaluations.append((train, heldout))
        k = self.stop_on_divergence
        if k and len(self.evaluations) > k:
            last = self.evaluations[-(k + 1) :]
            rising = all(b[0] > a[0] for a, b in itertools.pairwise(last))
            falling = all(b[1] < a[1] for a, b in itertools.pairwise(last))
            if rising and falling:
                self.diverged = True
                trainer.should_stop = True
                pl_module.print(
                    f"step {trainer.global_step}: the training reward rose ({last[0][0]:.4g} -> {last[-1][0]:.4g}) "
                    f"while the held-out reward fell ({last[0][1]:.4g} -> {last[-1][1]:.4g}) over {k} evaluations: "
                    "likely reward hacking; stopping (stop_on_divergence)."
                )

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Score the test prompts the same way."""
        self._evaluate_batch(trainer, pl_module, batch)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log test/train_reward and test/heldout_reward."""
        self._evaluation_end(trainer, pl_module, "test")

    # -- state
    def state_dict(self) -> dict[str, Any]:
        """Counters, evaluations, and (one process) the unused part of the current rollout."""
        state: dict[str, Any] = {
            "rollouts": self.rollouts,
            "skipped": self.skipped,
            "consecutive": self.consecutive,
            "empty": self.empty,
            "no_prompts": self.no_prompts,
            "dropped_groups": self.dropped_groups,
            "singleton_groups": self.singleton_groups,
            "trajectories": self.trajectories,
            "evaluations": [list(e) for e in self.evaluations],
            "diverged": self.diverged,
            "tasks": self.tasks,
            "next_grid": self.next_grid,
            "buffer": None,
        }
        if self._buffer is not None and self._pos < len(self._slices):
            state["buffer"] = {"rollout": self._buffer.state(), "slices": self._slices, "pos": self._pos}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the counters and the unused part of the rollout (moved to the module's device on use)."""
        for key in ("rollouts", "skipped", "consecutive", "empty", "no_prompts", "dropped_groups", "singleton_groups", "trajectories"):  # fmt: skip
            setattr(self, key, int(state_dict.get(key, 0)))
        self.evaluations = [tuple(e) for e in state_dict.get("evaluations", [])]
        self.diverged = bool(state_dict.get("diverged", False))
        self.next_grid = int(state_dict.get("next_grid", 0))
        if "tasks" in state_dict:
            self.tasks = state_dict["tasks"]
        buffer = state_dict.get("buffer")
        if buffer is None:
            self._buffer, self._slices, self._pos = None, [], 0
        else:
            self._buffer = Rollout.from_state(buffer["rollout"])
            self._slices, self._pos = [list(s) for s in buffer["slices"]], int(buffer["pos"])

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Move a restored rollout to the module's device."""
        if self._buffer is not None:
            self._buffer = Rollout.from_state(self._buffer.state(), pl_module.device)
