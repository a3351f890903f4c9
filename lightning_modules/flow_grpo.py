"""FlowGRPO: online RL of a flow-matching DiT with Flow-GRPO (LoRA policy, the same network without it as reference).

Implements the module side of docs/methods/flow_grpo.md (Flow-GRPO: the ODE->SDE sampler with log-probs,
the clipped policy loss over the trained steps, beta KL to the reference = the network with its LoRA adapter
disabled, fp32 log-probs; CPS and DanceGRPO steps through `sde_kind`), §6.1-4, and the starting points of
MSGRPO (UniRef-Image-Edit RL after its SFT, UniRef-Image-Edit paper) and PDTR (UniPic 2.0's staged T2I then editing
RL, UniPic 2.0 paper). The rollouts, rewards and advantages are the callback's (callbacks/grpo.py); this module
implements its `SupportsGRPO` protocol:

- `sample_with_logprob`: FlowEdit's sampler with the SDE step on the chosen steps, keeping the transitions
  x -> x' of the trained steps and log pi_old(x'|x) (averaged over latent elements, fp32);
- `grpo_loss`: for each trained step t, re-run the velocity on the stored x_t with the current weights (CFG as
  in the rollout; the unconditional branch detached, as Flow-GRPO's `train.cfg`), re-score the stored x' with
  `sde_step_with_logprob(prev_sample=...)`, and return
      L = mean_{i,t} max(-A_i rho_it, -A_i clip(rho_it, 1 - eps, 1 + eps)) + beta mean_{i,t} KL_it,
      rho = exp(clamp(log pi_theta - log pi_old)), KL = mean ||mu_theta - mu_ref||² / (2 std_t²)
  (the code's KL, notes §1), mu_ref from the same network with the adapter disabled (peft: every LoRA layer's
  `enable_adapters(False)`, which is what `PeftModel.disable_adapter()` does; FlowEdit injects LoRA without a
  PeftModel wrapper). Everything after the DiT runs in fp32 whatever the autocast.
- `training_step` trains on the rollout slice the callback attached to the batch (`batch[ROLLOUT_KEY]`); a skipped
  rollout (None there) gives a zero loss over the trainable parameters (DDP sees a backward on every rank) and
  an optimizer step without gradients (nothing moves, AdamW moments included).

The rollout and the re-scoring run the very same velocity code (`_velocity`), so fully on-policy the first
ratio is exactly 1 when a training slice equals a rollout chunk (the notes' debug rule).

Starting point: `init_checkpoint` (an SFT run's Lightning checkpoint, e.g. runs/uniref/tiny/latest/checkpoints/last.ckpt)
is loaded into the base model BEFORE the LoRA adapter is added (its optimizer and loop state are not taken);
when that file is missing and `init_experiment` names an experiment (e.g. "uniref/tiny"), `omnilab fit` of that
experiment runs first in a subprocess (logged), in this working directory, with this run's data folder.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from callbacks.grpo import ROLLOUT_KEY, Rollout
from lightning_modules.components import flow
from lightning_modules.components.grpo import (
    SDE_KINDS,
    clipped_policy_loss,
    kl_to_reference,
    sde_step_with_logprob,
)
from lightning_modules.components.packed_dit import TextConditioning
from lightning_modules.flow_edit import FlowEdit
from omnilab.runs import resolve_latest
from omnilab.seeding import derive_seed

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
# Flow-GRPO SD3 LoRA (notes §1): r 32, alpha 64, gaussian init, on the joint-attention projections. The same
# module names exist in the diffusers SD3, Qwen-Image and FLUX transformers.
DEFAULT_LORA = {
    "r": 32,
    "lora_alpha": 64,
    "init_lora_weights": "gaussian",
    "target_modules": [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
    ],
}
_MISSING = object()


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run `model` without its LoRA adapters (the reference policy); requires_grad flags are restored exactly."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise RuntimeError("adapters_disabled: the model has no LoRA adapter (the reference needs one)")
    flags = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


def ensure_init_checkpoint(
    path: str | Path, experiment: str | None, args: Sequence[str] = (), cwd: str | Path | None = None
) -> Path:
    """`path` if it exists; else run `omnilab fit` of `experiment` (experiments/<experiment>.yaml) to make it.

    A `latest` component in `path` (`runs/uniref/tiny/latest/checkpoints/last.ckpt`) is the experiment's newest
    run, whether `latest` is a link or a pointer file (omnilab/runs.py); the checkpoint used is printed. The
    subprocess runs in `cwd` (default: this process's), so the experiment's runs/<method>/<name>/ lands where a
    relative `path` points. RuntimeError if the fit fails or does not write `path`.
    """
    if resolve_latest(path).is_file():
        path = resolve_latest(path)
        print(f"init_checkpoint: using {path}", flush=True)
        return path
    path = Path(path)
    if experiment is None:
        raise FileNotFoundError(
            f"init_checkpoint {path} does not exist (set init_experiment to train it first)"
        )
    config = EXPERIMENTS / f"{experiment}.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"init_experiment {experiment!r}: {config} does not exist")
    command = [
        sys.executable, "-m", "omnilab.cli", "fit",
        "--config", str(EXPERIMENTS / "_base" / "default.yaml"), "--config", str(config),
        "--test_after_fit=false", "--trainer.enable_progress_bar=false", *args,
    ]  # fmt: skip
    print(
        f"init_checkpoint {path} is missing: training init_experiment {experiment} first: {' '.join(command)}",
        flush=True,
    )
    done = subprocess.run(command, cwd=cwd, env=dict(os.environ))
    if done.returncode != 0:
        raise RuntimeError(f"the init_experiment fit ({experiment}) failed with exit code {done.returncode}")
    if not resolve_latest(path).is_file():
        raise RuntimeError(f"the init_experiment fit ({experiment}) finished but did not write {path}")
    print(f"init_checkpoint: using {resolve_latest(path)}", flush=True)
    return resolve_latest(path)


class FlowGRPO(FlowEdit):
    """FlowEdit trained online with Flow-GRPO through LoRA; implements `callbacks.grpo.SupportsGRPO`.

    Args:
        beta: KL weight to the reference (Flow-GRPO SD3 GenEval/OCR 0.04; PickScore 0.01; 0 for FLUX / Qwen).
        clip_range: PPO clip eps (Flow-GRPO 1e-4), or (eps_low, eps_high).
        noise_level: The SDE's a (Flow-GRPO SD3 0.7, FLUX 0.9, Qwen-Image 1.2, Qwen-Image-Edit 1.0-1.5; CPS 0.8).
        sde_kind: "flow_grpo", "cps" or "dance" (`components.grpo.sde_step_with_logprob`).
        max_log_ratio: |log rho| is clamped to this before exp.
        lora: peft `LoraConfig` kwargs; required (the reference is the adapter-disabled network). None: the
            notes' Flow-GRPO SD3 LoRA (r 32, alpha 64, gaussian init, attention projections).
        lr: AdamW learning rate (Flow-GRPO 3e-4).
        weight_decay: AdamW weight decay (Flow-GRPO 1e-4).
        init_checkpoint: A Lightning checkpoint of a FlowEdit run with the same backbone (the SFT weights), loaded
            into the base model before LoRA is added; None: the backbone's own weights.
        init_experiment: When `init_checkpoint` is missing: the experiment ("uniref/tiny") whose fit writes it.
        init_experiment_args: Extra `omnilab fit` arguments for that fit.
        init_ema: Load the EMA weights the checkpoint's EMA callback kept instead of the raw ones.
        **kwargs: FlowEdit's arguments (backbone, vae, text, sampler, ...).
    """

    def __init__(
        self,
        beta: float = 0.04,
        clip_range: float | tuple[float, float] = 1e-4,
        noise_level: float = 0.7,
        sde_kind: Literal["flow_grpo", "cps", "dance"] = "flow_grpo",
        max_log_ratio: float = 20.0,
        lora: dict[str, Any] | None = None,
        lr: float = 3e-4,
        weight_decay: float = 1e-4,
        init_checkpoint: str | None = None,
        init_experiment: str | None = None,
        init_experiment_args: list[str] | None = None,
        init_ema: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            lora=dict(lora) if lora else dict(DEFAULT_LORA), lr=lr, weight_decay=weight_decay, **kwargs
        )
        if sde_kind not in SDE_KINDS:
            raise ValueError(f"sde_kind {sde_kind!r} is not one of {', '.join(SDE_KINDS)}")
        if beta < 0 or noise_level <= 0:
            raise ValueError(f"beta must be >= 0 and noise_level > 0, got {beta}, {noise_level}")
        self.beta, self.noise_level, self.sde_kind = float(beta), float(noise_level), sde_kind
        self.clip_range = tuple(clip_range) if isinstance(clip_range, Sequence) else float(clip_range)
        self.max_log_ratio = max_log_ratio
        self.init_checkpoint, self.init_experiment = init_checkpoint, init_experiment
        self.init_experiment_args, self.init_ema = list(init_experiment_args or []), init_ema
        self.merged_adapters = 0  # adapters merged into the base (PDTR's fresh-adapter option); checkpointed
        self._trained_since_step = False  # a rollout slice was trained since the last optimizer step

    # --- building -----------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Build FlowEdit without LoRA, load `init_checkpoint` into it, then add the LoRA adapter; idempotent."""
        if self.backbone is not None:
            return
        lora, self.lora = self.lora, None
        try:
            super().configure_model()
        finally:
            self.lora = lora
        if self.init_checkpoint is not None:
            self._load_init(self._init_path())
        from peft import LoraConfig, inject_adapter_in_model

        inject_adapter_in_model(LoraConfig(**self.lora), self.backbone.model)
        for name, p in self.backbone.named_parameters():
            p.requires_grad_("lora_" in name)
        self._reloadable = {
            name
            for name, p in self.named_parameters()
            if not p.requires_grad and (self._from_pretrained(name) or self._from_init(name))
        }

    def _from_init(self, name: str) -> bool:
        """Whether a frozen parameter reloads from `init_checkpoint` (not after an adapter was merged into it)."""
        if self.init_checkpoint is None:
            return False
        return not (name.startswith("backbone.") and self.merged_adapters)

    def _init_path(self) -> Path:
        """The init checkpoint, trained first (rank 0, the others wait) when missing and init_experiment is set."""
        trainer = self._trainer
        args = list(self.init_experiment_args)
        data_dir = getattr(getattr(trainer, "datamodule", None), "data_dir", None)
        if data_dir is not None and not any(a.startswith("--data.init_args.data_dir") for a in args):
            args.append(f"--data.init_args.data_dir={data_dir}")
        if trainer is not None and trainer.logger is None:
            args.append("--trainer.logger=false")
        if trainer is None or trainer.is_global_zero:
            ensure_init_checkpoint(self.init_checkpoint, self.init_experiment, args)
        if trainer is not None:
            trainer.strategy.barrier("flow_grpo_init_checkpoint")
        path = resolve_latest(self.init_checkpoint)
        if not path.is_file():  # another rank's view of a checkpoint rank 0 could not write
            raise FileNotFoundError(f"init_checkpoint {path} does not exist")
        return path

    def _load_init(self, path: Path) -> None:
        """Load an SFT checkpoint's weights (not its optimizer or loop state) into the LoRA-free model."""
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state = dict(ckpt.get("state_dict") or {})
        if self.init_ema:
            emas = [
                v["ema"]
                for k, v in (ckpt.get("callbacks") or {}).items()
                if str(k).startswith("EMA") and "ema" in v
            ]
            if not emas:
                raise KeyError(f"init_ema: {path} holds no EMA callback state")
            state.update(emas[0])
        if any("lora_" in k for k in state):
            raise ValueError(
                f"init_checkpoint {path} holds LoRA weights: merge them into the base model first"
            )
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise ValueError(f"init_checkpoint {path} does not match this model: {err}") from err
        missing = [k for k in missing if not self._from_pretrained(k)]
        if missing or unexpected:
            raise ValueError(
                f"init_checkpoint {path} does not match this model (same backbone, VAE and text configs are "
                f"needed): missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        print(f"FlowGRPO: loaded the initial weights from {path}", flush=True)

    def restart_adapter(self) -> None:
        """Merge the LoRA into the base weights and start a fresh adapter (B = 0); reset its optimizer state.

        The reference (adapter disabled) becomes the merged model. The merged base weights no longer reload
        from `init_checkpoint`/`pretrained`, so checkpoints keep them from now on. PDTR's "merge" option.
        """
        from peft.tuners.lora import LoraLayer

        init = self.lora.get("init_lora_weights", True)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, "adapter", self.merged_adapters + 1))
            for m in self.backbone.modules():
                if isinstance(m, LoraLayer):
                    base = m.get_base_layer()
                    for name in m.active_adapters:
                        base.weight += m.get_delta_weight(name).to(base.weight.dtype)
                        m.reset_lora_parameters(name, init)
        self.merged_adapters += 1
        self._reloadable = {k for k in self._reloadable if not k.startswith("backbone.")}
        if self._trainer is not None:
            for optimizer in self.trainer.optimizers:
                optimizer.state.clear()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """FlowEdit's (frozen reloadable weights left out), plus how many adapters were merged."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["flow_grpo"] = {"merged_adapters": self.merged_adapters}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the merge count first (merged base weights are in the checkpoint), then FlowEdit's fill-in."""
        self.merged_adapters = int((checkpoint.get("flow_grpo") or {}).get("merged_adapters", 0))
        if self.merged_adapters:
            self._reloadable = {k for k in self._reloadable if not k.startswith("backbone.")}
        super().on_load_checkpoint(checkpoint)

    # --- the protocol -------------------------------------------------------------------------------------

    def _conditioning(
        self, refs: Sequence[Sequence[Tensor]], prompts: Sequence[str], guidance: float
    ) -> list[dict[str, Any]]:
        """Per sample: its reference latents and its (and, with CFG, the unconditional) text embeddings; no grad.

        The members of a group (same prompt, same reference tensors) are encoded once and share the result.
        """
        keys = [(p, tuple(id(x) for x in r)) for p, r in zip(prompts, refs)]
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        unique = sorted(set(first.values()))
        slot = {i: k for k, i in enumerate(unique)}
        with torch.no_grad():
            ref_pixels = [list(refs[i]) for i in unique]
            texts = {"": self.text_encoder([prompts[i] for i in unique], ref_pixels)}
            if guidance > 1:
                texts["uncond_"] = self.text_encoder(
                    [self.sampler["negative_prompt"]] * len(unique), ref_pixels
                )
            encoded = []
            for k, r in enumerate(ref_pixels):
                cond: dict[str, Any] = {"refs": self.codec(r) if r else []}
                for prefix, text in texts.items():
                    cond[f"{prefix}hidden"], cond[f"{prefix}mask"] = text.hidden[k], text.mask[k]
                    if text.pooled is not None:
                        cond[f"{prefix}pooled"] = text.pooled[k]
                encoded.append(cond)
        return [encoded[slot[first[key]]] for key in keys]

    @staticmethod
    def _batch_conditioning(conds: Sequence[dict[str, Any]]) -> tuple[list[list[Tensor]], Any, Any]:
        """(reference latents per sample, text, unconditional text or None) of per-sample conditionings."""

        def text(prefix: str) -> TextConditioning | None:
            if f"{prefix}hidden" not in conds[0]:
                return None
            length = max(c[f"{prefix}hidden"].shape[0] for c in conds)
            hidden = torch.stack([F.pad(c[f"{prefix}hidden"], (0, 0, 0, length - c[f"{prefix}hidden"].shape[0])) for c in conds])  # fmt: skip
            mask = torch.stack(
                [F.pad(c[f"{prefix}mask"], (0, length - c[f"{prefix}mask"].shape[0])) for c in conds]
            )
            pooled = (
                torch.stack([c[f"{prefix}pooled"] for c in conds]) if f"{prefix}pooled" in conds[0] else None
            )
            return TextConditioning(hidden, mask, pooled)

        return [list(c["refs"]) for c in conds], text(""), text("uncond_")

    def _velocity(
        self, x: list[Tensor], cond: tuple[Any, Any, Any], sigma: Tensor, guidance: float
    ) -> list[Tensor]:
        """fp32 velocity per sample with CFG (text-only; the unconditional branch without grad), as in sampling."""
        ref_latents, text, uncond = cond
        v = self.backbone(x, ref_latents, sigma, text, max_tokens=None)
        if uncond is None:
            return [vi.float() for vi in v]
        with torch.no_grad():
            v_u = self.backbone(x, ref_latents, sigma, uncond, max_tokens=None)
        if self.sampler["true_cfg"]:
            p, rescale = self.backbone.patch_size, self.sampler["cfg_norm_rescale"]
            return [flow.true_cfg(a, b, guidance, rescale, patch=p) for a, b in zip(v_u, v)]
        return [flow.cfg(a, b, guidance) for a, b in zip(v_u, v)]

    @torch.no_grad()
    def sample_with_logprob(
        self,
        refs: Sequence[Sequence[Tensor]],
        prompts: Sequence[str],
        size: Sequence[tuple[int, int]] | tuple[int, int] | None,
        steps: int,
        noise_level: float | None,
        train_steps: Sequence[int],
        generators: Sequence[torch.Generator],
        guidance: float | None = None,
        sde_steps: Sequence[int] | None = None,
    ) -> Rollout:
        """Sample one trajectory per prompt; SDE on `sde_steps` (all by default), ODE elsewhere (see SupportsGRPO)."""
        a = self.noise_level if noise_level is None else float(noise_level)
        guidance = float(self.sampler["guidance"] if guidance is None else guidance)
        n = len(prompts)
        if len(generators) != n or len(refs) != n:
            raise ValueError(
                f"{n} prompts need {n} reference lists and generators, got {len(refs)}, {len(generators)}"
            )
        stochastic = set(range(steps) if sde_steps is None else sde_steps) if a > 0 else set()
        position = {s: k for k, s in enumerate(train_steps)}
        if not set(position) <= stochastic or not all(0 <= s < steps for s in position):
            raise ValueError(
                f"trained steps {list(train_steps)} must be SDE steps in 0..{steps - 1} with noise > 0"
            )
        sizes = self._sizes(refs, size, n)
        f, c = self.codec.factor, self.codec.channels
        x = [
            torch.randn(c, h // f, w // f, generator=g, device=g.device).to(self.device)
            for (h, w), g in zip(sizes, generators)
        ]
        conds = self._conditioning(refs, prompts, guidance)
        cond = self._batch_conditioning(conds)
        sigmas = self.sigmas(steps, [self.tokens(xi) for xi in x])  # [n, steps + 1]
        t_count = len(position)
        latents: list[list[Tensor]] = [[] for _ in range(n)]
        nexts: list[list[Tensor]] = [[] for _ in range(n)]
        log_probs = torch.zeros(n, t_count, dtype=torch.float32, device=self.device)
        for i in range(steps):
            sigma, sigma_next = sigmas[:, i], sigmas[:, i + 1]
            v = self._velocity(x, cond, sigma, guidance)
            new = []
            for j in range(n):
                if i in stochastic:
                    out, logp, _, _ = sde_step_with_logprob(
                        x[j][None],
                        v[j][None],
                        sigma[j],
                        sigma_next[j],
                        a,
                        self.sde_kind,
                        generator=generators[j],
                    )
                    out = out[0]
                else:
                    out = flow.euler_step(x[j], v[j], sigma[j], sigma_next[j])
                if i in position:
                    latents[j].append(x[j])
                    nexts[j].append(out)
                    log_probs[j, position[i]] = logp[0]
                new.append(out)
            x = new
        steps_idx = torch.tensor(list(train_steps), dtype=torch.long, device=self.device)
        empty = lambda xi: xi.new_zeros((0, *xi.shape))  # noqa: E731
        return Rollout(
            prompts=list(prompts),
            conditioning=conds,
            latents=[torch.stack(lat) if lat else empty(xi) for lat, xi in zip(latents, x)],
            next_latents=[torch.stack(nx) if nx else empty(xi) for nx, xi in zip(nexts, x)],
            log_probs=log_probs,
            sigmas=sigmas[:, steps_idx],
            next_sigmas=sigmas[:, steps_idx + 1],
            images=self.codec(x, decode=True),
            guidance=guidance,
        )

    def grpo_loss(self, rollout: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped policy loss over the stored transitions + beta KL to the adapter-disabled reference (fp32)."""
        if rollout.advantages is None:
            raise ValueError("grpo_loss needs a rollout with advantages (set by the GRPO callback)")
        n, t_count = rollout.log_probs.shape
        cond = self._batch_conditioning(rollout.conditioning)
        log_probs, kls = [], []
        for t in range(t_count):
            x = [lat[t] for lat in rollout.latents]
            sigma, sigma_next = rollout.sigmas[:, t], rollout.next_sigmas[:, t]
            v_ref = None
            if self.beta > 0:
                with torch.no_grad(), adapters_disabled(self.backbone):
                    v_ref = self._velocity(x, cond, sigma, rollout.guidance)
            v = self._velocity(x, cond, sigma, rollout.guidance)
            step_lp, step_kl = [], []
            with torch.autocast(self.device.type, enabled=False):
                for j in range(n):
                    prev = rollout.next_latents[j][t][None]
                    args = (sigma[j], sigma_next[j], self.noise_level, self.sde_kind)
                    _, lp, mean, std = sde_step_with_logprob(x[j][None], v[j][None], *args, prev_sample=prev)
                    step_lp.append(lp)
                    if v_ref is not None:
                        _, _, ref_mean, _ = sde_step_with_logprob(
                            x[j][None], v_ref[j][None], *args, prev_sample=prev
                        )
                        step_kl.append(kl_to_reference(mean, ref_mean, std))
            log_probs.append(torch.cat(step_lp))
            if step_kl:
                kls.append(torch.cat(step_kl))
        with torch.autocast(self.device.type, enabled=False):
            log_prob = torch.stack(log_probs, 1)  # [n, T]
            policy, stats = clipped_policy_loss(
                log_prob, rollout.log_probs, rollout.advantages, self.clip_range, self.max_log_ratio
            )
            kl = torch.stack(kls, 1).mean() if kls else log_prob.new_zeros(())
            loss = policy + self.beta * kl
        stats = {**stats, "policy_loss": policy.detach(), "kl": kl.detach()}
        return loss, stats

    # --- training -----------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Flow-GRPO update on the rollout slice the GRPO callback attached (None there: a skip all ranks agreed on)."""
        rollout = batch.get(ROLLOUT_KEY, _MISSING)
        if rollout is _MISSING:
            raise RuntimeError(
                "FlowGRPO trains on rollouts: add callbacks.grpo.GRPORollouts to trainer.callbacks"
            )
        if rollout is None:
            return self._no_update_loss()
        self._trained_since_step = True
        loss, stats = self.grpo_loss(rollout)
        size = len(rollout)
        self.log("train/loss", loss, batch_size=size, prog_bar=True)
        for key, value in stats.items():
            self.log(f"grpo/{key}", value, batch_size=size)
        return loss

    def _no_update_loss(self) -> Tensor:
        """0 x the trainable parameters' sum: a backward that every rank's DDP hooks see and that changes nothing.

        Lightning refuses a None loss under DDP; the optimizer step of a step without any trained slice is then
        made a no-op by `on_before_optimizer_step` (no .grad, so torch.optim leaves the parameters and their
        moments alone, as callbacks/health.py does).
        """
        return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the (zero) gradients of an optimizer step whose micro-batches were all skipped rollouts."""
        if not self._trained_since_step:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
        self._trained_since_step = False
