"""Distribution matching distillation (DMD2) of UniPic 3.0's CFG teacher into a few-step student.

UniPic 3.0 (arXiv 2601.15664, post-training; docs/methods/unipic3.md) finishes its 8-step student with
distribution matching after trajectory mapping (`lightning_modules/consistency.py`): DMD 10k steps, batch 64,
lr 2e-6, teacher CFG 6. The loss is DMD2's (`components.distill.dmd_gradient` / `dmd_loss`):

- the student (generator, FlowEdit's `backbone`) makes its sample by **backward simulation**: from noise it
  runs j of its own K Euler steps without gradient (K from `student_steps`, j uniform in 0..K-1), then its
  clean estimate x = x_s - s v_theta(x_s) at the grid point s = s_j carries the gradient, so it trains on the
  inputs its own sampler visits;
- x is noised to sigma ~ U[`dmd_sigma_range`] (DMD2: [0.02, 0.98]); the frozen teacher with CFG (the "real"
  score) and the critic (the "fake" score, no guidance) give x0_real, x0_fake; g = (x0_fake - x0_real) /
  mean|x - x0_real|; L_G = 1/2 mean (x - sg(x - g))²;
- the critic is initialised from the teacher and trained on the student's (detached) samples with the
  ordinary flow-matching loss ||v_phi(x_sigma) - (eps - x)||², sigmas from the training distribution;
- two time-scale: the critic updates every step, the student every `critic_updates`-th step (DMD2: 5 for
  SDXL, 10 for SD1.5). A step that updates both computes the student's gradient with the critic's weights
  before the step, then the critic's on the same detached samples, and one optimizer step applies both
  (AdamW leaves a parameter without gradient untouched): exactly DMD2's order, one `global_step` per iteration.
  The two losses are summed into one backward: their gradients do not mix (the critic sees detached samples,
  the DMD gradient uses no-grad teacher and critic passes), and one backward after the step's forward is what
  FSDP supports (a manual backward inside the wrapped forward is refused by FSDP's handle states);
- `critic_lora`: the critic is a LoRA on the teacher's own frozen weights, the teacher being that network
  with its adapter disabled, so two full DiTs fit instead of three (the student and the shared base);
- a non-finite DMD gradient or critic loss (on any rank) skips that part's update, its gradients dropped before
  the optimizer step, and is counted (`train/skips`);
  `max_consecutive_skips` in a row stop the run with an error (a diverged critic);
- `gan` (off by default): DMD2's optional GAN head. A small classifier (`GANHead`) reads the critic's hidden
  states at one transformer block (`layer`, default the middle one: DMD2 reads its UNet's bottleneck), the
  target tokens of each image, and gives one realism logit per image. Reals are the batch's target latents,
  fakes the student's samples, both noised to the critic's training sigma (DMD2's "diffusion GAN"). The critic
  and the head take L_D = softplus(l_fake) + softplus(-l_real) (weight `critic_weight`, DMD2 1e-2), the student
  L_G = softplus(-l_fake) (`generator_weight`, DMD2 5e-3; `components.distill.gan_*`). The reals, the detached
  fakes and (on student steps) the fakes with the student's gradient go through ONE critic forward (a batch of
  2 or 3 x B): the critic's flow loss reads the first B. DMD2 zeroes the critic's gradients of L_G before the
  critic's own update; in one backward the same is done by subtracting L_G of the detached fakes (equal
  values, so the critic's and the head's gradients of the two cancel and only the student's remains).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_modules.components import flow
from lightning_modules.components.distill import (
    dmd_gradient,
    dmd_loss,
    gan_discriminator_loss,
    gan_generator_loss,
)
from lightning_modules.components.packed_dit import PackedDiT, TextConditioning
from lightning_modules.consistency import FewStepDistill
from lightning_modules.flow_edit import flow_loss
from lightning_modules.flow_grpo import adapters_disabled
from omnilab.fsdp import clip_grad_norm
from omnilab.seeding import torch_generator

GAN_DEFAULTS: dict[str, Any] = {
    "generator_weight": 5e-3,  # DMD2
    "critic_weight": 1e-2,  # DMD2
    "layer": None,  # the transformer block whose hidden states the head reads; None: the middle one
    "hidden": None,  # the head's MLP width; None: the DiT's width
}


class GANHead(nn.Module):
    """DMD2's realism classifier on the critic's features: a per-token LayerNorm-MLP logit, averaged per image."""

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or dim
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, tokens: list[Tensor]) -> Tensor:
        """[N] logits (fp32), one per image from its target tokens [L_i, D]."""
        dtype = self.net[1].weight.dtype
        return torch.stack([self.net(t.to(dtype)).float().mean() for t in tokens])


def repeat_text(text: TextConditioning, k: int) -> TextConditioning:
    """The conditioning of a batch repeated k times along the batch (sample i of copy j at j·B + i)."""
    return TextConditioning(
        text.hidden.repeat(k, 1, 1),
        None if text.mask is None else text.mask.repeat(k, 1),
        None if text.pooled is None else text.pooled.repeat(k, 1),
    )


class DMD(FewStepDistill):
    """DMD2 for a FlowEdit student: generator, frozen CFG teacher (real score), trainable critic (fake score).

    The manual two-optimizer loop of DMD2 is expressed as one optimizer with a student and a critic parameter
    group, stepped once per iteration (module doc).

    Args:
        critic_updates: Critic updates per student update (DMD2: 5 SDXL, 10 SD1.5).
        critic_lr: The critic's lr (default: `lr`).
        critic_lora: peft `LoraConfig` kwargs: the critic is a LoRA on the teacher's frozen weights (shared base);
            None: a full trainable copy of the teacher.
        dmd_sigma_range: The DMD noising range of sigma (DMD2: [0.02, 0.98] of T).
        backward_simulation: Train on the student's own rollouts (j of K steps); False: always from pure noise.
        grad_clip: Gradient-norm clip of the student and of the critic, each on its own (DMD2: 10); under FSDP
            one global clip.
        max_consecutive_skips: Non-finite updates in a row before the run stops with an error.
        gan: DMD2's optional GAN head on the critic (module doc): None (off), or a dict of `generator_weight`
            (DMD2 5e-3), `critic_weight` (1e-2), `layer` (block index; None: the middle block), `hidden` (the
            head's width; None: the DiT's); `{}` takes DMD2's weights.
        **kwargs: `FewStepDistill`'s and FlowEdit's arguments.
    """

    def __init__(
        self,
        critic_updates: int = 5,
        critic_lr: float | None = None,
        critic_lora: dict[str, Any] | None = None,
        dmd_sigma_range: tuple[float, float] = (0.02, 0.98),
        backward_simulation: bool = True,
        grad_clip: float | None = 10.0,
        max_consecutive_skips: int = 10,
        gan: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if gan is not None and set(gan) - set(GAN_DEFAULTS):
            raise ValueError(
                f"DMD.gan: unknown keys {sorted(set(gan) - set(GAN_DEFAULTS))}; known {list(GAN_DEFAULTS)}"
            )
        self.gan = None if gan is None else {**GAN_DEFAULTS, **gan}
        if self.gan is not None and (self.gan["generator_weight"] < 0 or self.gan["critic_weight"] <= 0):
            raise ValueError(f"DMD.gan weights must be >= 0 (generator) and > 0 (critic), got {self.gan}")
        self.gan_head: GANHead | None = None
        if critic_updates < 1:
            raise ValueError(f"critic_updates must be >= 1, got {critic_updates}")
        low, high = dmd_sigma_range
        if not 0 < low < high <= 1:
            raise ValueError(f"dmd_sigma_range {dmd_sigma_range}: need 0 < low < high <= 1")
        self.critic_updates, self.critic_lr, self.critic_lora = critic_updates, critic_lr, critic_lora
        self.dmd_sigma_range = (float(low), float(high))
        self.backward_simulation, self.grad_clip = backward_simulation, grad_clip
        self.max_consecutive_skips = max_consecutive_skips
        self.critic: PackedDiT | None = None
        self._consecutive_skips = 0

    def build_extra(self) -> None:
        """The critic: a trainable copy of the teacher, or a LoRA on the teacher's frozen weights; the GAN head."""
        if self.gan is not None:
            model = self.teacher.model
            blocks = len(model.transformer_blocks)
            layer = (blocks - 1) // 2 if self.gan["layer"] is None else int(self.gan["layer"])
            if not 0 <= layer < blocks:
                raise ValueError(f"DMD.gan.layer={layer}: the DiT has {blocks} transformer blocks")
            self.gan["layer"] = layer
            dim = (
                getattr(model, "inner_dim", None)
                or model.config.num_attention_heads * model.config.attention_head_dim
            )
            self.gan_head = GANHead(dim, self.gan["hidden"])
        if self.critic_lora:
            from peft import LoraConfig, inject_adapter_in_model

            inject_adapter_in_model(LoraConfig(**self.critic_lora), self.teacher.model)
            for name, p in self.teacher.named_parameters():
                p.requires_grad_("lora_" in name)
            return
        self.critic = copy.deepcopy(self.teacher).requires_grad_(True).train()

    @property
    def fake_score(self) -> PackedDiT:
        """The critic network (with a LoRA critic: the teacher's network with its adapter on)."""
        return self.critic if self.critic is not None else self.teacher

    @contextlib.contextmanager
    def real_score(self) -> Iterator[PackedDiT]:
        """The teacher: the network with the critic's adapter disabled when the critic is a LoRA on it."""
        if self.critic is None and self.critic_lora:
            with adapters_disabled(self.teacher.model):
                yield self.teacher
        else:
            yield self.teacher

    def critic_parameters(self) -> list[torch.nn.Parameter]:
        """The critic's trainable parameters (with the GAN head's)."""
        head = list(self.gan_head.parameters()) if self.gan_head is not None else []
        if self.critic is not None:
            return [p for p in self.critic.parameters() if p.requires_grad] + head
        return [p for p in self.teacher.parameters() if p.requires_grad] + head

    def param_groups(self) -> list[dict[str, Any]]:
        """Two groups: the student at `lr`, the critic at `critic_lr`."""
        critic = {id(p) for p in self.critic_parameters()}
        student = [p for p in self.parameters() if p.requires_grad and id(p) not in critic]
        return [
            {"params": student, "name": "student"},
            {"params": self.critic_parameters(), "lr": self.critic_lr or self.lr, "name": "critic"},
        ]

    def train(self, mode: bool = True) -> DMD:
        """FewStepDistill's; the critic trains (it is not the frozen teacher)."""
        super().train(mode)
        if self.critic is None and self.critic_lora and self.teacher is not None:
            self.teacher.train(mode)  # the LoRA critic lives in the teacher's network (no dropout/norm stats)
        return self

    # --- the generator's sample ------------------------------------------------------------------------------

    def generate(
        self,
        refs: list[list[Tensor]],
        text: Any,
        shapes: list[tuple[int, ...]],
        gen: torch.Generator,
        grad: bool,
    ) -> tuple[list[Tensor], Tensor]:
        """The student's clean samples by backward simulation: j no-grad steps of K, then x = x_s − s v_θ(x_s)."""
        # K and j from a stream shared by all ranks: every rank runs the same number of DiT passes (FSDP gathers)
        shared = torch_generator(self.seed, "dmd-rollout", self.global_step)
        k = int(self.student_steps[int(torch.randint(len(self.student_steps), (1,), generator=shared))])
        j = int(torch.randint(k, (1,), generator=shared)) if self.backward_simulation else 0
        x = [torch.randn(s, generator=gen).to(self.device) for s in shapes]
        tokens = [self.tokens(xi) for xi in x]
        grid = self.student_grid(k, tokens)
        with torch.no_grad():
            for i in range(j):
                v = self.backbone(x, refs, grid[:, i], text)
                x = [flow.euler_step(a, b, s, s2) for a, b, s, s2 in zip(x, v, grid[:, i], grid[:, i + 1])]
        s = grid[:, j]
        with torch.set_grad_enabled(grad):
            v = self.backbone(x, refs, s, text)
            x0 = [flow.predicted_x0(a, b, si) for a, b, si in zip(x, v, s)]
        return x0, s

    # --- training ----------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """One DMD iteration: the student's DMD update every `critic_updates`-th step, a critic update every step."""
        refs, x0_data, text, neg = self.condition(batch)
        shapes = [tuple(x.shape) for x in x0_data]
        n = len(shapes)
        gen = torch_generator(self.seed, "dmd", self.global_step, self.global_rank)
        update_student = self.global_step % self.critic_updates == 0
        x, _ = self.generate(refs, text, shapes, gen, grad=update_student)
        skipped, self._drop = 0, []
        loss = x[0].new_zeros(())
        if update_student:
            low, high = self.dmd_sigma_range
            sigma = (low + (high - low) * torch.rand(n, generator=gen)).to(self.device)
            eps = [torch.randn(s, generator=gen).to(self.device) for s in shapes]
            x_sigma = [flow.interpolate(xi.detach(), e, si) for xi, e, si in zip(x, eps, sigma)]
            v_real = self.teacher_velocity(x_sigma, refs, sigma, text, neg)
            with torch.no_grad():
                v_fake = self.fake_score(x_sigma, refs, sigma, text)
            total = sum(xi.numel() for xi in x)
            loss_g, finite = x[0].new_zeros(()), True
            for xi, xs, vr, vf, si in zip(x, x_sigma, v_real, v_fake, sigma):
                g = dmd_gradient(
                    xi[None], flow.predicted_x0(xs, vr, si)[None], flow.predicted_x0(xs, vf, si)[None]
                )
                finite &= bool(torch.isfinite(g).all())
                loss_g = loss_g + dmd_loss(xi[None], torch.nan_to_num(g, 0.0, 0.0, 0.0)) * (
                    xi.numel() / total
                )
            # every rank runs the backward (FSDP reduces in it); a non-finite gradient anywhere drops the update
            loss = loss + loss_g
            if self._all(finite):
                self.log("train/dmd_loss", loss_g.detach(), batch_size=n)
            else:
                self._drop.append("student")
                skipped += 1
        # the critic: flow matching on the student's detached samples (with the GAN head: reals and fakes too)
        samples = [xi.detach().float() for xi in x]
        sigma_c, _, eps_c = self.draw(
            shapes, [self.tokens(xi) for xi in samples], "critic", self.global_step, self.global_rank
        )
        sigma_c = sigma_c.to(self.device)
        eps_c = [e.to(self.device) for e in eps_c]
        x_c = [flow.interpolate(xi, e, si) for xi, e, si in zip(samples, eps_c, sigma_c)]
        target_c = [flow.velocity(xi, e) for xi, e in zip(samples, eps_c)]
        if self.gan is None:
            loss_c = flow_loss(self.fake_score(x_c, refs, sigma_c, text), target_c)
            critic_finite = bool(torch.isfinite(loss_c))
        else:
            fakes = [flow.interpolate(xi.float(), e, si) for xi, e, si in zip(x, eps_c, sigma_c)]
            v_c, logits = self.critic_pass(
                x_c, x0_data, fakes if update_student else None, refs, sigma_c, text
            )
            loss_c = flow_loss(v_c, target_c)
            loss_d = self.gan["critic_weight"] * gan_discriminator_loss(logits[:n], logits[n : 2 * n])
            critic_finite = bool(torch.isfinite(loss_c) & torch.isfinite(loss_d))
            loss = loss + loss_d
            self.log("train/gan_critic_loss", loss_d.detach(), batch_size=n)
            if update_student:
                loss_gen = gan_generator_loss(logits[2 * n :])
                # minus the same loss of the detached fakes: the critic's and the head's gradients cancel
                loss = loss + self.gan["generator_weight"] * (loss_gen - gan_generator_loss(logits[:n]))
                self.log("train/gan_generator_loss", loss_gen.detach(), batch_size=n)
                if not self._all(bool(torch.isfinite(loss_gen))):  # its NaN reaches both parts' gradients
                    critic_finite = False
                    if "student" not in self._drop:
                        self._drop.append("student")
                        skipped += 1
        loss = loss + loss_c
        if not self._all(critic_finite):
            self._drop.append("critic")
            skipped += 1
        self.skips += skipped
        self._consecutive_skips = self._consecutive_skips + 1 if skipped else 0
        if self._consecutive_skips >= self.max_consecutive_skips:
            raise RuntimeError(
                f"DMD: {self._consecutive_skips} updates in a row had a non-finite DMD gradient or critic loss "
                f"(the critic diverged): lower critic_lr / lr or raise grad_clip"
            )
        self.log(
            "train/critic_loss",
            loss_c.detach() if torch.isfinite(loss_c) else torch.tensor(math.nan),
            batch_size=n,
        )
        self.log("train/loss", loss.detach(), batch_size=n)
        self.log("train/skips", float(self.skips), batch_size=n)
        self.log("train/student_update", float(update_student), batch_size=n)
        return loss

    def critic_pass(
        self,
        fakes: list[Tensor],
        reals: list[Tensor],
        student_fakes: list[Tensor] | None,
        refs: list[list[Tensor]],
        sigma: Tensor,
        text: TextConditioning,
    ) -> tuple[list[Tensor], Tensor]:
        """One critic forward over [noised detached fakes, noised reals (, `student_fakes`)]: (the fakes' velocity,
        the GAN head's logits [2B or 3B]).

        The reals are the batch's target latents noised to the fakes' sigmas (noise from the "gan-real" stream);
        `student_fakes` are the fakes' same values with the student's gradient (student steps). The head reads
        the hidden states of block `gan.layer` at each image's target tokens.
        """
        n = len(fakes)
        gen = torch_generator(self.seed, "gan-real", self.global_step, self.global_rank)
        noised = [
            flow.interpolate(r.float(), torch.randn(tuple(r.shape), generator=gen).to(r.device), si)
            for r, si in zip(reals, sigma)
        ]
        inputs = [*fakes, *noised, *(student_fakes or [])]
        k = len(inputs) // n
        net = self.fake_score
        captured: list[Tensor] = []
        block = net.model.transformer_blocks[self.gan["layer"]]
        handle = block.register_forward_hook(lambda module, args, out: captured.append(out[-1]))
        try:
            v = net(inputs, refs * k, sigma.repeat(k), repeat_text(text, k))
        finally:
            handle.remove()
        hidden, tokens = captured[0], []
        for i, (x, r) in enumerate(zip(inputs, refs * k)):
            start = 0 if net.target_first else sum(self.tokens(ri) for ri in r)
            tokens.append(hidden[i, start : start + self.tokens(x)])
        return v[:n], self.gan_head(tokens)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the gradients of a skipped (non-finite) part, then clip the student's and the critic's."""
        for part in getattr(self, "_drop", []):
            self._drop_grads(self.student_parameters() if part == "student" else self.critic_parameters())
        self._clip()

    def _all(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank (one decision for all, so all ranks skip together)."""
        if self._trainer is None:
            return flag
        return bool(self.trainer.strategy.reduce_boolean_decision(flag, all=True))

    @staticmethod
    def _drop_grads(params: list[torch.nn.Parameter]) -> None:
        """Forget these gradients: AdamW leaves a parameter without one untouched (moments included)."""
        for p in params:
            p.grad = None

    def student_parameters(self) -> list[torch.nn.Parameter]:
        """The student's trainable parameters."""
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def _clip(self) -> None:
        """Clip the student's and the critic's gradient norms, each on its own (one global clip under FSDP)."""
        if not self.grad_clip:
            return
        if clip_grad_norm(self.trainer, self.grad_clip):
            return
        for group in self.param_groups():
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
