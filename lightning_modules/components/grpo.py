"""Flow-GRPO math as small pure functions: the SDE step and its log-probability, advantages, the loss.

Implements docs/methods/flow_grpo.md (Flow-GRPO: the ODE->SDE Euler-Maruyama step
`sde_step_with_logprob`, its CPS variant, per-prompt advantages, the clipped loss and the KL to the
reference, the trained timesteps of Flow-GRPO and Flow-GRPO-Fast), §2 (DanceGRPO's step and timestep
subsampling; TRL's advantage scopes "group" / "batch" / "none"), §3 (combining rewards: sum then
normalise, normalise then sum (GDPO); the notes' [inference] proposal for MSGRPO) and §6.1-2. MSGRPO is
UniRef-Image-Edit's RL stage (UniRef-Image-Edit paper); PDTR (UniPic 2.0 paper) is two sequential runs
of this same loop with different prompts and rewards (§3 [inference]), so it needs nothing here.

Notation (rectified flow): x_sigma = (1 - sigma) x0 + sigma eps, v = eps - x0, sampling runs sigma 1 -> 0,
Delta = sigma_next - sigma < 0. Log-probabilities, ratios, KL and advantages are fp32 whatever the input
dtype (docs/architecture.md); a log-probability is the MEAN over a sample's latent elements (as
the released code), so a ratio is a geometric mean over elements and the PPO clip range is tiny (1e-4).
Nothing here forces a device sync: checks that would read a GPU tensor are left out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_modules.components.flow import per_sample

SDE_KINDS = ("flow_grpo", "cps", "dance")
STD_SCOPES = ("group", "batch", "none")
AGGREGATION_RULES = ("sum_then_normalize", "normalize_then_sum")
STEP_MODES = ("all", "fraction", "window", "random")
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


# --------------------------------------------------------------------------- the SDE step


def sde_step_with_logprob(
    x: Tensor,
    v: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    noise_level: float,
    kind: str = "flow_grpo",
    generator: torch.Generator | None = None,
    prev_sample: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One stochastic sampling step and log pi(x'|x): returns (x' [B,...], log_prob [B], mean [B,...], std [B]).

    Delta = sigma_next - sigma, a = `noise_level`; everything in fp32 (x, v cast inside).

    - "flow_grpo" (Flow-GRPO `sde_step_with_logprob`, notes §1):
      std_t = a sqrt(sigma / (1 - sigma)), where sigma = 1 puts sigma_next in the denominator (the code
      uses sigmas[1], which is sigma_next of the step that starts at sigma = 1);
      mu = x (1 + std_t² Delta / (2 sigma)) + v (1 + std_t² (1 - sigma) / (2 sigma)) Delta;
      x' = mu + std_t sqrt(-Delta) eps;
      log pi = -(x' - mu)² / (2 std_t² |Delta|) - log(std_t sqrt|Delta|) - ½ log 2pi.
      The returned `std` is the code's std_t (WITHOUT sqrt|Delta|), which `kl_to_reference` takes.
    - "cps" (notes §1, sde_type="cps"): x0^ = x - sigma v, x1^ = x + (1 - sigma) v,
      std = sigma_next sin(a pi / 2), mu = (1 - sigma_next) x0^ + sqrt(sigma_next² - std²) x1^,
      x' = mu + std eps, log pi = -(x' - mu)² (no 1/(2 std²), no constants; defined even for std = 0).
    - "dance" (DanceGRPO `flux_step`, notes §2): x0^ = x - sigma v, s^ = -(x - (1 - sigma) x0^) / sigma²,
      mu = x + Delta (v - ½ eta² s^), std = eta sqrt|Delta| with eta = a, x' = mu + std eps, and the
      Gaussian log pi with that std.

    The element log-probabilities are averaged over all non-batch dims (x is [B, ...], at least 2-D).
    With `prev_sample` given, nothing is drawn: its log-probability under this step is returned (the
    training step re-scores the stored trajectory; on-policy the ratio is exactly 1). Otherwise eps is
    drawn from `generator` (fp32, on x's device). With a = 0 the step is the Euler ODE step
    x + Delta v (`flow.euler_step`); the Gaussian log-density of such a point mass is undefined, so
    "flow_grpo" and "dance" return NaN log-probs then, and re-scoring a `prev_sample` with a = 0 is an
    error. Sigma and sigma_next are scalars or one value per sample ([B]).
    """
    if kind not in SDE_KINDS:
        raise ValueError(f"sde kind {kind!r} is not one of {', '.join(SDE_KINDS)}")
    if x.ndim < 2 or x.shape != v.shape:
        raise ValueError(
            f"x {tuple(x.shape)} and v {tuple(v.shape)} must share one [B, ...] shape (2-D or more)"
        )
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    if prev_sample is not None and noise_level == 0 and kind != "cps":
        raise ValueError(f"{kind}: a step with noise_level 0 is deterministic; its log-prob is undefined")
    x, v = x.float(), v.float()
    s, s_next = per_sample(sigma, x), per_sample(sigma_next, x)
    if s.device.type == "cpu" and bool(((s_next >= s) | (s <= 0)).any()):
        raise ValueError("a sampling step needs 0 < sigma and sigma_next < sigma")
    dt = s_next - s
    a = float(noise_level)

    if kind == "flow_grpo":
        std = a * torch.sqrt(s / (1 - torch.where(s == 1, s_next, s)))
        mean = x * (1 + std**2 / (2 * s) * dt) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
        scale = std * torch.sqrt(-dt)  # the transition std
    elif kind == "cps":
        std = s_next * math.sin(a * math.pi / 2)
        x0_hat, x1_hat = x - s * v, x + (1 - s) * v
        mean = (1 - s_next) * x0_hat + torch.sqrt((s_next**2 - std**2).clamp_min(0)) * x1_hat
        scale = std
    else:
        x0_hat = x - s * v
        score = -(x - (1 - s) * x0_hat) / s**2
        mean = x + dt * (v - 0.5 * a**2 * score)
        std = a * torch.sqrt(-dt)
        scale = std

    if prev_sample is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        prev_sample = mean + scale * noise
    else:
        prev_sample = prev_sample.float()
    diff = prev_sample.detach() - mean
    if kind == "cps":
        log_prob = -(diff**2)
    else:
        log_prob = -(diff**2) / (2 * scale**2) - torch.log(scale) - _HALF_LOG_2PI
        log_prob = torch.where(scale > 0, log_prob, torch.full_like(log_prob, math.nan))
    log_prob = log_prob.mean(dim=tuple(range(1, x.ndim)))
    batch = x.shape[0]
    std = torch.broadcast_to(torch.as_tensor(std, dtype=torch.float32), (batch,) + (1,) * (x.ndim - 1))
    return prev_sample, log_prob, mean, std.reshape(batch)


def kl_to_reference(
    mean: Tensor, ref_mean: Tensor, std: Tensor | float, dt: Tensor | float | None = None
) -> Tensor:
    """Per-sample KL penalty [B]: mean over elements of (mu_theta - mu_ref)² / (2 std²), as Flow-GRPO's code.

    `std` is the step's returned std (a scalar or [B]). For "flow_grpo" that is std_t, and the code's
    penalty leaves out |Delta|: the exact Gaussian KL between the two steps divides by 2 std_t² |Delta|
    (notes §1 caveat); pass `dt` = Delta to get it. For "cps" / "dance" the std already is the transition
    std, so leave `dt` out. The reference is the same network with the LoRA adapter disabled.
    """
    sq = ((mean.float() - ref_mean.float()) ** 2).mean(dim=tuple(range(1, mean.ndim)))
    var = torch.as_tensor(std, dtype=torch.float32, device=sq.device) ** 2
    if dt is not None:
        var = var * torch.as_tensor(dt, dtype=torch.float32, device=sq.device).abs()
    return sq / (2 * var.reshape(-1) if var.ndim else 2 * var)


# --------------------------------------------------------------------------- advantages


def _group_index(group_ids: Tensor, n: int) -> tuple[Tensor, int]:
    """(index 0..G-1 of each sample's group [N], G) for arbitrary group ids [N]."""
    if group_ids.shape != (n,):
        raise ValueError(f"group_ids has shape {tuple(group_ids.shape)}, expected ({n},)")
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, (int(inverse.max()) + 1 if n else 0)


def _group_stats(
    values: Tensor, inverse: Tensor, groups: int, unbiased: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, std, count) [G] of each group over its non-NaN members (fp32; std of <= 1 member is 0)."""
    valid = ~torch.isnan(values)
    zeros = values.new_zeros(groups)
    count = zeros.index_add(0, inverse, valid.float())
    mean = zeros.index_add(0, inverse, torch.where(valid, values, 0.0)) / count.clamp_min(1)
    dev = torch.where(valid, values - mean[inverse], 0.0)
    dof = count - 1 if unbiased else count
    std = (zeros.index_add(0, inverse, dev**2) / dof.clamp_min(1)).sqrt()
    return mean, torch.where(count > 1, std, 0.0), count


def _batch_std(values: Tensor, unbiased: bool) -> Tensor:
    """The std of all values [N] (0 for fewer than two)."""
    if values.numel() < 2:
        return values.new_zeros(())
    return values.std(correction=1 if unbiased else 0)


def group_z(values: Tensor, group_ids: Tensor, eps: float = 1e-4) -> Tensor:
    """z_group(r) = (r - mean_group) / (std_group + eps) [N]; NaN ("not applicable") and groups of one give 0.

    The std is the population std over the group's non-NaN members (Flow-GRPO's np.std).
    """
    values = values.float()
    inverse, groups = _group_index(group_ids, values.shape[0])
    mean, std, count = _group_stats(values, inverse, groups, unbiased=False)
    z = (values - mean[inverse]) / (std[inverse] + eps)
    return torch.where(torch.isnan(values) | (count[inverse] < 2), 0.0, z)


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    std_scope: str = "group",
    eps: float = 1e-4,
    clip: float | None = 5.0,
    unbiased: bool = False,
) -> Tensor:
    """A_i = (r_i - mean_group(r)) / (std + eps), clipped to ±clip [N] (Flow-GRPO PerPromptStatTracker, TRL).

    `std_scope`: "group" (std per group; Flow-GRPO `global_std=False`, TRL's default, DanceGRPO),
    "batch" (one std over all N rewards; Flow-GRPO's SD3 default `global_std=True`, so call it on the
    batch gathered over ranks) or "none" (divide by 1, no eps: Dr. GRPO). The std is the population
    std (np.std, Flow-GRPO); `unbiased=True` gives TRL's / DanceGRPO's torch.std (DanceGRPO adds 1e-8).
    A group of one sample has A = 0 (its own mean; nothing to compare with): the loop drops it with
    `zero_advantage_groups`. Rewards must be finite (combine NaN "not applicable" scores first).
    """
    if std_scope not in STD_SCOPES:
        raise ValueError(f"std_scope {std_scope!r} is not one of {', '.join(STD_SCOPES)}")
    rewards = rewards.float()
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards must be finite to compute advantages (a reward returned NaN or inf)")
    inverse, groups = _group_index(group_ids, rewards.shape[0])
    mean, std, count = _group_stats(rewards, inverse, groups, unbiased)
    centred = rewards - mean[inverse]
    if std_scope == "group":
        adv = centred / (std[inverse] + eps)
    elif std_scope == "batch":
        adv = centred / (_batch_std(rewards, unbiased) + eps)
    else:
        adv = centred
    adv = torch.where(count[inverse] > 1, adv, 0.0)
    return adv.clamp(-clip, clip) if clip is not None else adv


def gather_groups(
    scores: Mapping[str, Tensor], prompts: int, group_size: int
) -> tuple[dict[str, Tensor], Tensor, slice]:
    """Every process's scores [N] and group ids, in rank order, and this process's slice of them.

    Flow-GRPO gathers the rewards and the prompt ids over all processes before it normalises
    (`accelerator.gather`, then `PerPromptStatTracker.update`), and keeps its own part of the advantages.
    Here each process rolls out G trajectories for each of its `prompts` prompts; group ids number the
    prompts globally in rank order (rank r's first prompt follows all of rank r - 1's), so the gathered batch
    is the batch one process would hold. One `all_gather_object` of CPU tensors; on one process nothing moves.
    """
    n = prompts * group_size
    group_ids = torch.arange(prompts).repeat_interleave(group_size)
    local = {k: v.detach().float().cpu() for k, v in scores.items()}
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return local, group_ids, slice(0, n)
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    parts: list[Any] = [None] * world
    torch.distributed.all_gather_object(parts, (local, prompts))
    keys = sorted({k for part_scores, _ in parts for k in part_scores})
    gathered, ids, offset, start = {k: [] for k in keys}, [], 0, 0
    for r, (part_scores, part_prompts) in enumerate(parts):
        size = part_prompts * group_size
        for k in keys:
            gathered[k].append(part_scores.get(k, torch.full((size,), math.nan)))
        ids.append(offset + torch.arange(part_prompts).repeat_interleave(group_size))
        if r == rank:
            start = sum(p * group_size for _, p in parts[:r])
        offset += part_prompts
    return {k: torch.cat(v) for k, v in gathered.items()}, torch.cat(ids), slice(start, start + n)


def zero_advantage_groups(advantages: Tensor, group_ids: Tensor) -> Tensor:
    """bool [N]: True where every advantage of the sample's group is 0 (equal rewards, a group of one): drop them.

    Flow-GRPO drops the samples whose advantage is 0 at every timestep; with one A broadcast to all
    timesteps a group of equal rewards is exactly such a set (its samples carry no policy gradient).
    """
    inverse, groups = _group_index(group_ids, advantages.shape[0])
    nonzero = advantages.new_zeros(groups, dtype=torch.float32).index_add(
        0, inverse, (advantages != 0).float()
    )
    return nonzero[inverse] == 0


# --------------------------------------------------------------------------- combining rewards


def _renormalize(values: Tensor, eps: float) -> Tensor:
    """(s - mean(s)) / (std(s) + eps) over the whole batch (population std)."""
    return (values - values.mean()) / (_batch_std(values, unbiased=False) + eps)


def _fill_group_mean(values: Tensor, group_ids: Tensor) -> Tensor:
    """NaN entries replaced by the mean of their group's non-NaN entries (0 when the group has none)."""
    inverse, groups = _group_index(group_ids, values.shape[0])
    mean, _, _ = _group_stats(values, inverse, groups, unbiased=False)
    return torch.where(torch.isnan(values), mean[inverse], values)


def aggregate_rewards(
    components: Mapping[str, Tensor],
    weights: Mapping[str, float],
    group_ids: Tensor,
    rule: str = "sum_then_normalize",
    eps: float = 1e-4,
) -> Tensor:
    """Combine named rewards [N] into one [N] (notes §3): r = sum_k w_k r_k, or GDPO's normalise-then-sum.

    - "sum_then_normalize" (Flow-GRPO `multi_score`, TRL's default): r = sum_k w_k r_k on the raw
      rewards; the group normalisation is then `group_advantages`.
    - "normalize_then_sum" (DanceGRPO's per-reward z-scores, TRL / GDPO arXiv 2601.05242):
      s = sum_k w_k z_group(r_k), then renormalised over the batch, r = (s - mean s) / (std s + eps).
      That already is an advantage up to clipping: follow it with `group_advantages(std_scope="none")`.

    Only the components named in `weights` enter (the others are for logging). A NaN entry means "not
    applicable" and is neutral: it counts as its group's mean of that component (z = 0); TRL's nansum
    counts it as 0 instead, which differs only when a group mixes applicable and inapplicable samples.
    """
    if rule not in AGGREGATION_RULES:
        raise ValueError(f"rule {rule!r} is not one of {', '.join(AGGREGATION_RULES)}")
    if not weights:
        raise ValueError("aggregate_rewards needs at least one weighted component")
    missing = sorted(set(weights) - set(components))
    if missing:
        raise KeyError(f"weights name components that are absent: {missing} (have {sorted(components)})")
    n = group_ids.shape[0]
    total = torch.zeros(n, dtype=torch.float32, device=group_ids.device)
    for name, w in weights.items():
        values = components[name].float()
        if values.shape != (n,):
            raise ValueError(f"component {name!r} has shape {tuple(values.shape)}, expected ({n},)")
        if rule == "sum_then_normalize":
            total = total + w * _fill_group_mean(values, group_ids)
        else:
            total = total + w * group_z(values, group_ids, eps)
    return total if rule == "sum_then_normalize" else _renormalize(total, eps)


def msgrpo_reward(
    instruction: Mapping[str, Tensor] | Tensor,
    per_reference: Tensor,
    group_ids: Tensor,
    weights: Mapping[str, float] | None = None,
    use_min: bool = False,
    eps: float = 1e-4,
) -> Tensor:
    """Multi-source reward [N] for multi-reference generation: the notes' PROPOSAL for MSGRPO (§3 [inference]).

    MSGRPO's exact formula is NOT public (UniRef-Image-Edit, arXiv 2602.14186: abstract only, no code).
    This implements the notes' suggestion: every reference k gets its own consistency reward c_k,
    z-scored within the group, as is each instruction reward r_j; they are combined by pattern 2
    (normalise then sum):
        s = sum_j w_j z(r_j) + w_consistency mean_k z(c_k) + [use_min] w_min min_k z(c_k),
    then renormalised over the batch, r = (s - mean s) / (std s + eps) (follow it with
    `group_advantages(std_scope="none")`). `instruction` holds the RAW instruction rewards {name: [N]}
    (one tensor stands for {"instruction": it}); each is z-scored once, here, so its weight w_j weighs
    it against the consistency terms (a second z-score of an already weighted sum would cancel w_j).
    The mean and min run over the references a sample has (NaN columns of `per_reference` [N, R] are
    absent references); a sample without references gets 0 for both. Averaging over references keeps the
    consistency-instruction balance independent of R; the min term rewards the worst-kept reference, so no
    reference is traded away for the others. `weights` keys: the instruction names, "consistency" and
    "min" (each defaults to 1).
    """
    if isinstance(instruction, Tensor):
        instruction = {"instruction": instruction}
    if {"consistency", "min"} & set(instruction):
        raise ValueError("the instruction rewards may not be named 'consistency' or 'min' (reserved weights)")
    w = {**dict.fromkeys(instruction, 1.0), "consistency": 1.0, "min": 1.0}
    unknown = sorted(set(weights or {}) - set(w))
    if unknown:
        raise KeyError(f"msgrpo weights {unknown} are not among {', '.join(w)}")
    w.update(weights or {})
    n = group_ids.shape[0]
    if per_reference.ndim != 2 or per_reference.shape[0] != n:
        raise ValueError(f"per_reference must be [N={n}, R], got {tuple(per_reference.shape)}")
    per_reference = per_reference.float()
    present = ~torch.isnan(per_reference)
    columns = [group_z(per_reference[:, k], group_ids, eps) for k in range(per_reference.shape[1])]
    z = torch.stack(columns, 1) if columns else per_reference.new_zeros(n, 0)
    refs = present.sum(1)
    consistency = torch.where(present, z, 0.0).sum(1) / refs.clamp_min(1)
    total = w["consistency"] * consistency
    for name, values in instruction.items():
        if values.shape != (n,):
            raise ValueError(f"instruction reward {name!r} has shape {tuple(values.shape)}, expected ({n},)")
        total = total + w[name] * group_z(values, group_ids, eps)
    if use_min:
        worst = torch.where(present, z, math.inf).amin(1) if z.shape[1] else z.new_zeros(n)
        total = total + w["min"] * torch.where(refs > 0, worst, 0.0)
    return _renormalize(total, eps)


# --------------------------------------------------------------------------- the loss


def clipped_policy_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    clip_range: float | tuple[float, float],
    max_log_ratio: float = 20.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip loss L = mean max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high)), rho = exp(logp - logp_old).

    Flow-GRPO's per-step loss (notes §1; TRL's eps_low / eps_high when `clip_range` is a pair). The
    log-ratio is clamped to ±`max_log_ratio` before exp, so one bad log-prob cannot make inf; all in
    fp32. `advantages` is [N] (broadcast over trailing dims of log_prob, e.g. [N, T] steps) or
    log_prob's shape. Stats (detached, no device sync): ratio_mean / ratio_min / ratio_max,
    clip_fraction (share of rho outside [1 - eps_low, 1 + eps_high]), approx_kl = mean((rho - 1) -
    log rho) (k3, >= 0) and approx_kl_k2 = mean(½ log² rho) (what Flow-GRPO logs).
    """
    low, high = (clip_range, clip_range) if isinstance(clip_range, int | float) else clip_range
    log_prob, old_log_prob = log_prob.float(), old_log_prob.float()
    adv = advantages.float()
    if adv.ndim < log_prob.ndim:
        adv = adv.reshape(*adv.shape, *(1,) * (log_prob.ndim - adv.ndim))
    log_ratio = (log_prob - old_log_prob).clamp(-max_log_ratio, max_log_ratio)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - low, 1.0 + high)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        r, lr = ratio.detach(), log_ratio.detach()
        stats = {
            "ratio_mean": r.mean(),
            "ratio_min": r.min(),
            "ratio_max": r.max(),
            "clip_fraction": ((r < 1.0 - low) | (r > 1.0 + high)).float().mean(),
            "approx_kl": ((r - 1) - lr).mean(),
            "approx_kl_k2": (0.5 * lr**2).mean(),
        }
    return loss, stats


# --------------------------------------------------------------------------- which steps are trained


def trained_step_indices(
    num_steps: int,
    mode: str = "all",
    fraction: float = 0.99,
    window: tuple[int, int] | None = None,
    window_size: int = 2,
    generator: torch.Generator | None = None,
) -> list[int]:
    """The denoising steps (0-based, 0 = the noisiest) whose transitions are stored and trained.

    - "all": 0..T-1.
    - "fraction" (Flow-GRPO `timestep_fraction`): the first int(fraction T) steps, in order; 0.99 of
      10 gives int(9.9) = 9, skipping the last, near-deterministic step.
    - "window" (Flow-GRPO-Fast): `window_size` consecutive steps starting at a start drawn uniformly
      from lo..hi - window_size (both inclusive, Python's randint) with (lo, hi) = `window`, default
      (0, T // 2): high-noise-only training; the other steps run the ODE.
    - "random" (DanceGRPO): int(fraction T) steps drawn without replacement, in the drawn order
      (DanceGRPO draws one permutation per sample: call once per sample).
    The random modes need `generator` (no global random state; docs/architecture.md).
    """
    if mode not in STEP_MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(STEP_MODES)}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if mode == "all":
        return list(range(num_steps))
    if mode in ("fraction", "random"):
        count = int(fraction * num_steps)
        if not 1 <= count <= num_steps:
            raise ValueError(f"fraction {fraction} of {num_steps} steps selects {count} steps")
        if mode == "fraction":
            return list(range(count))
    if generator is None:
        raise ValueError(f"mode {mode!r} draws steps at random: pass a seeded torch.Generator")
    if mode == "random":
        return torch.randperm(num_steps, generator=generator, device=generator.device)[:count].tolist()
    lo, hi = window if window is not None else (0, num_steps // 2)
    if not (lo >= 0 and hi <= num_steps and lo <= hi - window_size and window_size >= 1):
        raise ValueError(f"a window of {window_size} steps does not fit in {(lo, hi)} of {num_steps} steps")
    start = int(torch.randint(lo, hi - window_size + 1, (1,), generator=generator, device=generator.device))
    return list(range(start, start + window_size))
