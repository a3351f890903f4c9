"""Rectified-flow math shared by the flow-matching editors, their samplers and RL (pure functions).

The convention of SD3 / FLUX / Qwen-Image (docs/methods/flow_grpo.md, notation): data x0 at sigma = 0,
noise eps at sigma = 1, x_sigma = (1 - sigma) x0 + sigma eps, velocity v = eps - x0; sampling runs
sigma 1 -> 0 with Euler steps x' = x + (sigma' - sigma) v.

- Training timesteps (UniPic 3.0 training, docs/methods/uniref.md; SD3's logit-normal sampling):
  sigma = shift(sigmoid(mean + std n)), n ~ N(0, 1), with the FLUX/SD3 shift
  sigma' = s sigma / (1 + (s - 1) sigma), and s = exp(mu), mu linear in the target's token count
  (diffusers `calculate_shift`; UniPic-3: 256 tokens -> 0.5, 8192 -> 0.9).
- Sampling: the diffusers `FlowMatchEulerDiscreteScheduler` schedule (sigmas linspace(1, 1/N, N),
  shifted, then a final 0), Euler steps, classifier-free guidance, and Qwen-Image's true CFG with its
  norm rescale.

Every function computes in fp32 (whatever its inputs' dtype) so that the GRPO log-probabilities built
on `euler_step` stay fp32 (docs/architecture.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def per_sample(value: Tensor | float, like: Tensor) -> Tensor:
    """`value` as fp32 broadcastable against `like`: a scalar, or one value per leading (batch) entry."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    return value.reshape(*value.shape, *(1,) * (like.ndim - value.ndim)) if value.ndim else value


def interpolate(x0: Tensor, eps: Tensor, sigma: Tensor | float) -> Tensor:
    """x_sigma = (1 - sigma) x0 + sigma eps (sigma a scalar or one per sample), in fp32."""
    s = per_sample(sigma, x0)
    return (1 - s) * x0.float() + s * eps.float()


def velocity(x0: Tensor, eps: Tensor) -> Tensor:
    """The flow-matching target v = d x_sigma / d sigma = eps - x0, in fp32."""
    return eps.float() - x0.float()


def time_shift(sigma: Tensor | float, shift: Tensor | float) -> Tensor:
    """sigma' = shift sigma / (1 + (shift - 1) sigma) (SD3's resolution shift; FLUX with shift = exp(mu)), in fp32."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    shift = torch.as_tensor(shift, dtype=torch.float32, device=sigma.device)
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(
    n: int,
    generator: torch.Generator,
    mean: float = 0.0,
    std: float = 1.0,
    shift: Tensor | float = 1.0,
) -> Tensor:
    """n training sigmas: sigma = time_shift(sigmoid(mean + std z), shift), z ~ N(0, 1) from `generator`.

    `shift` is one float or one value per sample (e.g. `resolution_shift` of each target). The draw
    lives on the generator's device; the result is fp32 there.
    """
    z = torch.randn(n, generator=generator, device=generator.device)
    shift = torch.as_tensor(shift, dtype=torch.float32, device=z.device)
    return time_shift(torch.sigmoid(mean + std * z), shift)


def resolution_shift(
    tokens: Tensor | float,
    base_tokens: int = 256,
    max_tokens: int = 8192,
    base_mu: float = 0.5,
    max_mu: float = 0.9,
) -> Tensor:
    """shift = exp(mu), mu = base_mu + (tokens - base_tokens) (max_mu - base_mu) / (max_tokens - base_tokens).

    diffusers `calculate_shift`, with UniPic-3's training values (256 -> 0.5, 8192 -> 0.9) as defaults;
    the line extrapolates outside [base_tokens, max_tokens], as there.
    """
    tokens = torch.as_tensor(tokens, dtype=torch.float32)
    slope = (max_mu - base_mu) / (max_tokens - base_tokens)
    return torch.exp(base_mu + slope * (tokens - base_tokens))


SIGMA_GRIDS = ("flux", "sd3")
SD3_TRAIN_STEPS = 1000  # the scheduler's training table: sigmas t / 1000, t = 1000 .. 1


def sigma_schedule(
    steps: int, shift: Tensor | float = 1.0, grid: str = "flux", terminal: float | None = None
) -> Tensor:
    """The sampling sigmas [steps + 1] of a diffusers flow-matching pipeline: shift(grid), stretched, then 0.

    grid "flux": linspace(1, 1/N, N), what the FLUX and Qwen-Image pipelines pass to
    `FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=..., mu=log(shift))`. grid "sd3": the scheduler's
    own grid, which the SD3 pipeline uses: linspace(1, sigma_min, N) with sigma_min = shift(1/1000), the
    smallest sigma of its (already shifted) training table, shifted again with the rest. `terminal`: the
    scheduler's `shift_terminal` (Qwen-Image: 0.02), 1 - sigma scaled so the last nonzero sigma equals it.
    A shift per sample ([B]) gives [B, steps + 1].
    """
    if steps < 1:
        raise ValueError(f"steps={steps}: need at least one sampling step")
    if grid not in SIGMA_GRIDS:
        raise ValueError(f"sampler grid={grid!r}: choose one of {', '.join(SIGMA_GRIDS)}")
    shift = torch.as_tensor(shift, dtype=torch.float32)
    shift = shift[..., None] if shift.ndim else shift
    if grid == "flux":
        base = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float32)
    else:
        low = time_shift(torch.tensor(1.0 / SD3_TRAIN_STEPS), shift)
        base = 1.0 + (low - 1.0) * torch.linspace(0.0, 1.0, steps, dtype=torch.float32)
    sigmas = time_shift(base, shift)
    if terminal is not None and steps > 1:  # one step is sigma 1 alone: nothing to stretch
        one_minus = 1.0 - sigmas
        sigmas = 1.0 - one_minus / (one_minus[..., -1:] / (1.0 - terminal))
    return torch.cat([sigmas, sigmas.new_zeros((*sigmas.shape[:-1], 1))], dim=-1)


def euler_step(x: Tensor, v: Tensor, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
    """One Euler step of the flow ODE: x' = x + (sigma_next - sigma) v, in fp32 (as the diffusers scheduler)."""
    dt = per_sample(sigma_next, x) - per_sample(sigma, x)
    return x.float() + dt * v.float()


def predicted_x0(x: Tensor, v: Tensor, sigma: Tensor | float) -> Tensor:
    """The clean estimate x0 = x_sigma - sigma v (the endpoint of the straight path), in fp32."""
    return x.float() - per_sample(sigma, x) * v.float()


def cfg(v_uncond: Tensor, v_cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: v = v_uncond + scale (v_cond - v_uncond), in fp32."""
    v_uncond = v_uncond.float()
    return v_uncond + scale * (v_cond.float() - v_uncond)


def true_cfg(
    v_neg: Tensor, v_pos: Tensor, scale: float, norm_rescale: bool = False, patch: int = 1
) -> Tensor:
    """Qwen-Image true CFG: v = v_neg + scale (v_pos - v_neg), optionally rescaled to ||v_pos|| per token.

    With `norm_rescale`, v <- v ||v_pos|| / ||v||, the norms taken per DiT token: over the channels
    (dim -3) of each `patch` x `patch` block of a [..., C, h, w] latent (Qwen-Image packs 2x2 x 16
    channels into one 64-wide token and takes the norm over that last dimension).
    """
    combined = cfg(v_neg, v_pos, scale)
    if not norm_rescale:
        return combined
    # a token whose combined prediction is exactly zero stays zero (Qwen's code would give 0/0)
    return combined * (_token_norm(v_pos.float(), patch) / _token_norm(combined, patch).clamp_min(1e-20))


def _token_norm(x: Tensor, patch: int) -> Tensor:
    """The L2 norm of each patch x patch x C token of a [..., C, h, w] tensor, broadcast back to its pixels."""
    squares = (x * x).sum(dim=-3, keepdim=True)
    if patch > 1:
        flat = squares.reshape(-1, 1, *squares.shape[-2:])
        pooled = F.avg_pool2d(flat, patch) * patch * patch
        squares = pooled.repeat_interleave(patch, -2).repeat_interleave(patch, -1).reshape(squares.shape)
    return squares.sqrt()
