"""Few-step distillation math of UniPic 3.0's post-training (pure functions, fp32).

UniPic 3.0 (arXiv 2601.15664) turns its 50-step CFG teacher into an 8-step student in two stages, trajectory
mapping then distribution matching (docs/methods/unipic3.md). The rectified-flow convention of
`components/flow.py`: x_sigma = (1 - sigma) x0 + sigma eps, v = eps - x0, sampling runs sigma 1 -> 0.

- Trajectory mapping (consistency distillation onto a fixed student grid 1 = s_0 > s_1 > ... > s_K = 0): for a
  point x_t of segment k (s_{k+1} <= t <= s_k) the student's jump to the segment's end is the Euler move
  f_theta(x_t, t) = x_t + (s_{k+1} - t) v_theta(x_t, t). The target takes one teacher ODE step with CFG
  t -> t' (t' >= s_{k+1}) and jumps from there with the EMA student: f_ema(x_t', t'); at t' = s_{k+1} the
  target is x_t' itself. Loss: ||f_theta - sg(target)||² / (t - s_{k+1})², i.e. the mean squared error of the
  implied velocities (`jump`, `consistency_loss`).
- Distribution matching (DMD2's `compute_distribution_matching_loss`): the generator output x is noised to
  sigma, the teacher with CFG ("real") and the critic ("fake") predict x0_real and x0_fake; then
  g = (x0_fake - x0_real) / mean|x - x0_real| (per sample), L = 1/2 mean (x - sg(x - g))², whose gradient in x
  is g / numel: it moves x toward the real score and away from the fake one (`dmd_gradient`, `dmd_loss`).
- DMD2's optional GAN head (its `compute_generator_clean_cls_loss` / `compute_guidance_clean_cls_loss`): a
  classifier on the critic's intermediate features gives a realism logit per (noised) image; the non-saturating
  losses are L_G = mean softplus(-l_fake) for the generator and L_D = mean softplus(l_fake) +
  mean softplus(-l_real) for the critic and its head (`gan_generator_loss`, `gan_discriminator_loss`); DMD2
  weighs them 5e-3 (generator) and 1e-2 (critic).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.functional import softplus

from lightning_modules.components.flow import per_sample


def jump(x: Tensor, v: Tensor, sigma: Tensor | float, sigma_end: Tensor | float) -> Tensor:
    """The straight-line move of x_sigma along velocity v to sigma_end: x + (sigma_end - sigma) v, in fp32."""
    return x.float() + (per_sample(sigma_end, x) - per_sample(sigma, x)) * v.float()


def consistency_loss(
    pred_end: Sequence[Tensor],
    target_end: Sequence[Tensor],
    sigma: Tensor,
    sigma_end: Tensor,
) -> Tensor:
    """Σ_i ||pred_i − target_i||² / (sigma_i − sigma_end_i)² / Σ_i numel_i: the implied-velocity MSE (fp32).

    Dividing each sample's endpoint error by its jump length squared weights short and long jumps alike (the
    error of the velocity the jump implies). The target is detached here (stop-gradient).
    """
    if len(pred_end) != len(target_end) or not pred_end:
        raise ValueError(f"consistency_loss: {len(pred_end)} predictions for {len(target_end)} targets")
    gap = (sigma.float() - sigma_end.float()).abs()
    if (gap <= 0).any():
        raise ValueError(
            f"consistency_loss: a jump of zero length (sigma {sigma.tolist()} -> {sigma_end.tolist()})"
        )
    total = sum(
        ((p.float() - t.detach().float()) ** 2).sum() / g**2 for p, t, g in zip(pred_end, target_end, gap)
    )
    return total / sum(t.numel() for t in target_end)


def segment_end(grid: Tensor, sigma: Tensor) -> Tensor:
    """The end s_{k+1} of the student segment that holds each sigma: the largest grid value strictly below it.

    grid: [B, K + 1] decreasing from 1 to 0 (one student schedule per sample); sigma: [B] in (0, 1].
    """
    below = torch.where(grid < sigma[:, None], grid, torch.full_like(grid, -1.0))
    return below.max(dim=1).values


def dmd_gradient(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """g = (x0_fake − x0_real) / mean|x − x0_real|, the mean over each sample's elements (leading dim = batch).

    x: the generator's clean output [B, ...]; x0_real / x0_fake: the teacher's (with CFG) and the critic's clean
    estimates from the same noised x. fp32, no gradient.
    """
    x, real, fake = x.detach().float(), x0_real.detach().float(), x0_fake.detach().float()
    dims = tuple(range(1, x.ndim))
    normaliser = (x - real).abs().mean(dim=dims, keepdim=True)
    return (fake - real) / normaliser


def dmd_loss(x: Tensor, grad: Tensor) -> Tensor:
    """L = ½ mean (x − sg(x − g))²: its value is ½ mean g², its gradient in x is g / numel (DMD2)."""
    x = x.float()
    return 0.5 * ((x - (x - grad.float()).detach()) ** 2).mean()


def gan_generator_loss(logits_fake: Tensor) -> Tensor:
    """L_G = mean softplus(−l_fake) = mean −log σ(l_fake): the non-saturating generator loss (fp32)."""
    return softplus(-logits_fake.float()).mean()


def gan_discriminator_loss(logits_fake: Tensor, logits_real: Tensor) -> Tensor:
    """L_D = mean softplus(l_fake) + mean softplus(−l_real): fakes toward logit −inf, reals toward +inf (fp32)."""
    return softplus(logits_fake.float()).mean() + softplus(-logits_real.float()).mean()
