"""FlowEdit: flow-matching single-image editing and 0-6-reference composition over packed DiT backends.

One module carries four methods whose difference is data (the backbone, its VAE and text encoder,
the budgets), not code:

- UniRef-Image-Edit SFT (UniRef-Image-Edit paper): SELF, every reference serialised into one latent sequence
  under a global pixel budget and padded to a fixed length (`max_ref_tokens` = B²/256 for budget B at 16 px per token),
  joint SFT on editing (N = 1) and composition (N = 2..6); the progressive budget schedule is a
  callback driving the datamodule's `set_pixel_budget`.
- UniPic2-SD3.5M-Kontext (UniPic 2.0 paper; docs/methods/unipic2.md): the `sd3_kontext` backend,
  clean references sharing the target's timestep, text-only CFG (the references go into both
  branches), guidance 3.5 and 50 steps by default.
- UniPic 3.0's composition teacher (UniPic 3.0 paper; docs/methods/unipic3.md): the
  `qwen_image_edit` backend; training sigma = shift(sigmoid(N(0, 1))) with shift exp(mu), mu linear
  in the target's tokens (256 -> 0.5, 8192 -> 0.9); MSE on eps - x0 over the target tokens;
  inference true CFG 4 (8 steps for the distilled students).
- Qwen-MICo (MICo paper): the same backbone fine-tuned on MICo-150K compositions.

The flow math lives in `components/flow.py`, the backends in `components/packed_dit.py`, the text and
VLM conditioning in `components/text.py`. This file adds the frozen VAE (`LatentCodec`), the loss
`flow_loss`, the lr schedule `lr_factor` and the Lightning loop. Randomness never touches global state:
training sigmas, text dropout and noise come from a generator seeded by (seed, step, micro-batch, rank),
validation noise from (seed, sample key), so a resumed run draws what the uninterrupted one drew.
`sample(..., step_fn=...)` takes the per-step update as an argument, so an RL sampler (an SDE step with
log-probabilities) plugs in without copying the loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypedDict

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from callbacks.images import to_pil
from lightning_modules.components import flow
from lightning_modules.components.backbones import build_backbone
from lightning_modules.components.packed_dit import (
    FluxKontext,
    PackedDiT,
    QwenImageEdit,
    SD3Kontext,
    TextConditioning,
)
from lightning_modules.components.text import TextEncoder, build_text_encoder
from omnilab.attention import apply_attention
from omnilab.fsdp import FSDPNormClipping, is_sharded_state
from omnilab.seeding import torch_generator

Family = Literal["sd3_kontext", "qwen_image_edit", "flux_kontext"]
BACKENDS: dict[str, type[PackedDiT]] = {
    "sd3_kontext": SD3Kontext,
    "qwen_image_edit": QwenImageEdit,
    "flux_kontext": FluxKontext,
}
TEXT_FAMILY = {"sd3_kontext": "sd3", "qwen_image_edit": "qwen", "flux_kontext": "flux"}
SIGMA_GRID = {"sd3_kontext": "sd3", "qwen_image_edit": "flux", "flux_kontext": "flux"}  # as their pipelines
StepFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (x, v, sigma, sigma_next) -> x_next, per sample


# --- loss and schedule ----------------------------------------------------------------------------------


VAE_FIT_WARN = 0.2  # reconstruction MSE above which a fitted VAE hides what the DiT learns


def flow_loss(pred: Sequence[Tensor], target: Sequence[Tensor]) -> Tensor:
    """L = Σ_i ||v̂_i − v_i||² / Σ_i numel(v_i): the MSE over every target element of the batch (fp32).

    Samples of different sizes are weighted by their element counts (a 64x64 target counts four times a
    32x32 one), which is the per-token mean of the packed sequence's target tokens.
    """
    if len(pred) != len(target) or not pred:
        raise ValueError(f"flow_loss: {len(pred)} predictions for {len(target)} targets")
    squared = sum(((p.float() - t.float()) ** 2).sum() for p, t in zip(pred, target))
    return squared / sum(t.numel() for t in target)


def autoencoder_loss(recon: Sequence[Tensor], images: Sequence[Tensor], latents: Sequence[Tensor]) -> Tensor:
    """Fitting a random-init VAE: pixel MSE + mean(z)² + (std(z) − 1)² over all normalised latents.

    The moment term keeps the latents the DiT sees near zero mean and unit variance (what the pretrained
    VAEs' normalisation constants do), so the flow's noise scale fits them.
    """
    mse = sum(((r.float() - x.float()) ** 2).sum() for r, x in zip(recon, images)) / sum(
        x.numel() for x in images
    )
    z = torch.cat([t.float().flatten() for t in latents])
    return mse + z.mean() ** 2 + (z.std() - 1) ** 2


def lr_factor(step: int, warmup_steps: int, total_steps: int | None, schedule: str = "constant") -> float:
    """lr multiplier: (step + 1) / warmup during warm-up, then 1 (constant) or ½(1 + cos(π·progress)) (cosine).

    progress = (step − warmup) / (total − warmup), clipped to [0, 1]; without a known total the cosine
    stays at 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or not total_steps or total_steps <= warmup_steps:
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"lr_schedule {schedule!r}: choose constant or cosine")
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return 0.5 * (1 + math.cos(math.pi * progress))


# --- the frozen VAE -------------------------------------------------------------------------------------


class LatentCodec(nn.Module):
    """A frozen VAE between images in [-1, 1] and normalised latents, grouping equal shapes into one call.

    SD3 / FLUX (`AutoencoderKL`): z = (mode − shift_factor) · scaling_factor. Qwen-Image
    (`AutoencoderKLQwenImage`, a video VAE run on one frame): z = (mode − latents_mean) / latents_std.
    The posterior mode is used (deterministic; the Qwen edit pipelines encode conditions the same way).
    """

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        cfg = vae.config
        self.video = hasattr(cfg, "latents_mean") and hasattr(vae, "temperal_downsample")
        if self.video:
            self.factor = 2 ** len(vae.temperal_downsample)
            self.channels = cfg.z_dim
            self.register_buffer("mean", torch.tensor(cfg.latents_mean).view(-1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(cfg.latents_std).view(-1, 1, 1), persistent=False)
        else:
            self.factor = 2 ** (len(cfg.block_out_channels) - 1)
            self.channels = cfg.latent_channels
            self.shift, self.scale = cfg.shift_factor or 0.0, cfg.scaling_factor

    def forward(self, tensors: Sequence[Tensor], decode: bool = False) -> list[Tensor]:
        """`encode(tensors)`, or `decode(tensors)` with `decode=True`.

        The module's users call it as `codec(images)` / `codec(latents, decode=True)`: under FSDP the codec is
        a unit of its own (omnilab.fsdp.BlockPolicy) whose weights are gathered only in its forward.
        """
        return self.decode(tensors) if decode else self.encode(tensors)

    @torch.no_grad()
    def encode(self, images: Sequence[Tensor]) -> list[Tensor]:
        """[3, H, W] images -> [C, H/f, W/f] latents; one VAE call per distinct shape."""
        out: list[Tensor | None] = [None] * len(images)
        dtype = next(self.vae.parameters()).dtype
        for idx in _group_by_shape(images).values():
            x = torch.stack([images[i] for i in idx]).to(self._device(), dtype)
            if self.video:
                z = self.vae.encode(x[:, :, None]).latent_dist.mode()[:, :, 0].float()
                z = (z - self.mean) / self.std
            else:
                z = (self.vae.encode(x).latent_dist.mode().float() - self.shift) * self.scale
            for i, zi in zip(idx, z):
                out[i] = zi
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def decode(self, latents: Sequence[Tensor]) -> list[Tensor]:
        """[C, h, w] latents -> [3, h·f, w·f] images in [-1, 1] (fp32); one VAE call per distinct shape."""
        out: list[Tensor | None] = [None] * len(latents)
        dtype = next(self.vae.parameters()).dtype
        for idx in _group_by_shape(latents).values():
            z = torch.stack([latents[i] for i in idx]).float()
            if self.video:
                z = z * self.std + self.mean
                x = self.vae.decode(z[:, :, None].to(dtype)).sample[:, :, 0]
            else:
                x = self.vae.decode((z / self.scale + self.shift).to(dtype)).sample
            for i, xi in zip(idx, x.float().clamp(-1, 1)):
                out[i] = xi
        return out  # type: ignore[return-value]

    def round_trip(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(decode(encode(x)) unclamped, the normalised latents) of a [B, 3, H, W] batch, with gradients."""
        if self.video:
            z = (self.vae.encode(x[:, :, None]).latent_dist.mode()[:, :, 0] - self.mean) / self.std
            return self.vae.decode((z * self.std + self.mean)[:, :, None]).sample[:, :, 0], z
        z = (self.vae.encode(x).latent_dist.mode() - self.shift) * self.scale
        return self.vae.decode(z / self.scale + self.shift).sample, z

    def _device(self) -> torch.device:
        return next(self.vae.parameters()).device


def _group_by_shape(tensors: Sequence[Tensor]) -> dict[tuple[int, ...], list[int]]:
    """Indices of `tensors` grouped by shape, in first-seen order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(tuple(t.shape), []).append(i)
    return groups


# --- the module -----------------------------------------------------------------------------------------


class Timesteps(TypedDict, total=False):
    """Training sigmas: shift(sigmoid(N(mean, std²))); `shift` a float or "resolution" (the line below)."""

    mean: float  # default 0.0
    std: float  # default 1.0
    shift: float | Literal["resolution"]  # a float, or exp(mu(target tokens)); default "resolution"
    base_tokens: int  # the resolution line (also used by the sampler's "resolution" shift): default 256
    max_tokens: int  # default 8192
    base_mu: float  # default 0.5
    max_mu: float  # default 0.9


class Sampler(TypedDict, total=False):
    """Sampling: Euler on the flow ODE over `steps` with CFG (text-only: the refs go into both branches)."""

    steps: int  # default 50
    guidance: float  # CFG scale; <= 1 runs the conditional branch only (default 3.5)
    true_cfg: bool  # Qwen-Image's true CFG (with optional norm rescale) instead of plain CFG
    cfg_norm_rescale: bool  # rescale the combined velocity to the conditional one's norm per token
    shift: float | Literal["resolution"]  # a float (SD3.5-M: 3.0) or the timesteps' line (default)
    grid: Literal["flux", "sd3"] | None  # the pipeline's sigma grid (flow.sigma_schedule); None: family's
    shift_terminal: float | None  # the scheduler's shift_terminal (Qwen-Image: 0.02); default None
    negative_prompt: str  # the unconditional prompt (default "", Qwen pipelines use " ")
    size: list[int]  # [H, W] when neither the call nor the batch gives one (default [512, 512])


TIMESTEP_DEFAULTS: Timesteps = {
    "mean": 0.0,
    "std": 1.0,
    "shift": "resolution",
    "base_tokens": 256,
    "max_tokens": 8192,
    "base_mu": 0.5,
    "max_mu": 0.9,
}
SAMPLER_DEFAULTS: Sampler = {
    "steps": 50,
    "guidance": 3.5,
    "true_cfg": False,
    "cfg_norm_rescale": False,
    "shift": "resolution",
    "grid": None,  # SIGMA_GRID[family]
    "shift_terminal": None,
    "negative_prompt": "",
    "size": [512, 512],
}


class FlowEdit(FSDPNormClipping, L.LightningModule):
    """Flow-matching editing/composition (UniRef SFT, UniPic2-SD3.5M-Kontext, UniPic 3.0, Qwen-MICo).

    Args:
        backbone: The packed DiT: `{family: sd3_kontext | qwen_image_edit | flux_kontext, pretrained:
            <hub id or dir>, subfolder: transformer}` or `{family, config: {...}}` (the diffusers
            transformer's config, random init); other keys go to the backend (e.g. FLUX `guidance`,
            `attention_path: auto | mask | flex`, how attention leaves the padding out).
        vae: `{pretrained, subfolder: vae}` or `{config: {...}}`; `AutoencoderKL` for SD3/FLUX (16 latent
            channels, scaling/shift factors from its config), `AutoencoderKLQwenImage` for Qwen-Image.
            Its downsampling factor times the DiT patch (2) is the pixels per token.
        text: The text/VLM encoder: `{family: sd3 | flux | qwen (default: the backbone's), pretrained |
            config, tokenizer: {...}, load: {...}, max_sequence_length, ...}`
            (`components.text.build_text_encoder`).
        max_ref_tokens: SELF's fixed reference length in DiT tokens: budget B -> (B / pixels_per_token)²
            (B²/256 at the real models' 16 px per token; the tiny VAE /2 with patch 2 gives 4 px per token);
            every packed sequence of a batch > 1 is padded to max_ref_tokens + the batch's largest target (a
            batch of one is not padded). "budget": the length follows the data's resize rule at the batch's
            budget (`ref_pixel_cap`, raised by the progressive schedule; `max_tokens`). None: pad to the
            batch's longest sequence.
        timesteps: Training sigma distribution (`Timesteps`; defaults: logit-normal(0, 1), resolution
            shift on UniPic-3's line 256 -> 0.5, 8192 -> 0.9).
        lr: AdamW learning rate (UniPic-3 base stage 1e-4).
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_steps: Linear warm-up steps.
        lr_schedule: After warm-up, "constant" or "cosine" (to 0 at the trainer's last step).
        lora: peft `LoraConfig` kwargs (r, lora_alpha, target_modules, ...): when set, only the LoRA
            parameters of the backbone train.
        sampler: Sampling defaults (`Sampler`; default 50 steps, text-only CFG 3.5, resolution shift, the
            sigma grid of the family's diffusers pipeline).
        drop_text: Training probability of an empty instruction per sample (CFG training; the
            datamodule's `drop_text` does the same on the data side: use one of them).
        attention: Attention backend, `sdpa` | `xformers` | `auto` (`omnilab.attention`).
        gradient_checkpointing: Recompute the DiT blocks in the backward pass.
        seed: Seed of the noise, sigma and text-dropout streams.
        val_sigmas: The fixed sigmas of `val/loss` (noise seeded by sample key).
        val_sample_steps: Sampling steps of `val/pixel_mse` (first validation batch only).
        predictions_dir: Where `predict` writes `<key>.png` (default `<default_root_dir>/predictions`).
        vae_fit_steps: A random-init VAE (`vae: {config: ...}`) decodes anything to static, so nothing the DiT
            learns would show in pixels: with N > 0 a fresh fit first trains it for N Adam steps as an
            autoencoder on the training targets (`autoencoder_loss`), then freezes it (the tiny runs; the
            fitted weights go into the checkpoints). Ignored for a pretrained VAE and on resume.
        vae_fit_lr: The learning rate of that fit (5e-4; measured at 2e-3 on the generated multi-reference
            stream, the fit collapses: reconstruction MSE stuck at 0.58, worse than a flat grey image).
    """

    def __init__(
        self,
        backbone: dict[str, Any],
        vae: dict[str, Any],
        text: dict[str, Any],
        max_ref_tokens: int | Literal["budget"] | None = None,
        timesteps: Timesteps | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        lora: dict[str, Any] | None = None,
        sampler: Sampler | None = None,
        drop_text: float = 0.0,
        attention: str = "sdpa",
        gradient_checkpointing: bool = False,
        seed: int = 0,
        val_sigmas: tuple[float, ...] = (0.25, 0.5, 0.75),
        val_sample_steps: int = 4,
        predictions_dir: str | None = None,
        vae_fit_steps: int = 0,
        vae_fit_lr: float = 5e-4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        family = backbone.get("family")
        if family not in BACKENDS:
            raise ValueError(f"backbone.family {family!r}: choose one of {', '.join(BACKENDS)}")
        unknown = set(timesteps or {}) - set(TIMESTEP_DEFAULTS)
        unknown |= set(sampler or {}) - set(SAMPLER_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown timesteps/sampler keys: {sorted(unknown)}")
        for name, shift in (
            ("timesteps", (timesteps or {}).get("shift")),
            ("sampler", (sampler or {}).get("shift")),
        ):
            if shift is not None and shift != "resolution" and not isinstance(shift, int | float):
                raise ValueError(f"{name}.shift={shift!r}: give a float or 'resolution'")
        if not 0.0 <= drop_text < 1.0:
            raise ValueError(f"drop_text must be in [0, 1), got {drop_text}")
        self.family: str = family
        self.backbone_spec, self.vae_spec = dict(backbone), dict(vae)
        self.text_spec = {"family": TEXT_FAMILY[family], **text}
        self.max_ref_tokens = max_ref_tokens
        self.timesteps: Timesteps = {**TIMESTEP_DEFAULTS, **(timesteps or {})}
        self.sampler: Sampler = {**SAMPLER_DEFAULTS, **(sampler or {})}
        self.sampler["grid"] = self.sampler["grid"] or SIGMA_GRID[family]
        if self.sampler["grid"] not in flow.SIGMA_GRIDS:
            raise ValueError(
                f"sampler.grid={self.sampler['grid']!r}: choose one of {', '.join(flow.SIGMA_GRIDS)}"
            )
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.lr_schedule = warmup_steps, lr_schedule
        self.lora, self.drop_text, self.attention = lora, drop_text, attention
        self.gradient_checkpointing, self.seed = gradient_checkpointing, seed
        self.val_sigmas, self.val_sample_steps = tuple(val_sigmas), val_sample_steps
        self.predictions_dir = predictions_dir
        self.vae_fit_steps, self.vae_fit_lr = vae_fit_steps, vae_fit_lr
        # built in configure_model()
        self.backbone: PackedDiT | None = None
        self.codec: LatentCodec | None = None
        self.text_encoder: TextEncoder | None = None
        self.attention_backend: str | None = None
        self._reloadable: set[str] = set()  # state-dict keys of frozen pretrained weights (not checkpointed)

    # --- building ---------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Build the backbone, the frozen VAE and text encoder, and LoRA if configured; idempotent."""
        if self.backbone is not None:
            return
        from diffusers import AutoencoderKL, AutoencoderKLQwenImage

        spec = {k: v for k, v in self.backbone_spec.items() if k != "family"}
        self.backbone = BACKENDS[self.family].from_spec(**spec)
        vae_cls = AutoencoderKLQwenImage if self.family == "qwen_image_edit" else AutoencoderKL
        self.codec = LatentCodec(build_backbone(vae_cls, **self.vae_spec))
        if self.codec.channels != self.backbone.latent_channels:
            raise ValueError(
                f"the VAE has {self.codec.channels} latent channels, the backbone takes {self.backbone.latent_channels}"
            )
        self.text_encoder = build_text_encoder(**self.text_spec)
        for frozen in (self.codec, self.text_encoder):
            frozen.requires_grad_(False).eval()
        if self.lora:
            from peft import LoraConfig, inject_adapter_in_model

            inject_adapter_in_model(LoraConfig(**self.lora), self.backbone.model)
            for name, p in self.backbone.named_parameters():
                p.requires_grad_("lora_" in name)
        if self.gradient_checkpointing:
            self.backbone.model.enable_gradient_checkpointing()
        self.attention_backend = apply_attention(self, self.attention)
        self._record_attention_backend()
        self._reloadable = {
            name for name, p in self.named_parameters() if not p.requires_grad and self._from_pretrained(name)
        }

    def on_fit_start(self) -> None:
        """Fit a random-init VAE first (`vae_fit_steps`), on a fresh run only (a resumed one has it in its checkpoint)."""
        if self.vae_fit_steps <= 0 or self.vae_spec.get("pretrained") is not None:
            return
        if self.global_step > 0 or self.trainer.ckpt_path is not None or self.trainer.datamodule is None:
            return
        if self.trainer.world_size > 1:  # each rank would fit a different VAE on its own data
            raise ValueError(
                f"model.vae_fit_steps={self.vae_fit_steps} fits the VAE in one process, this run has "
                f"{self.trainer.world_size}: fit it in a single-process run, or give a pretrained VAE"
            )
        mse = self.fit_vae(self.trainer.datamodule.train_dataloader(), self.vae_fit_steps, self.vae_fit_lr)
        if self.logger is not None:
            self.logger.log_metrics({"vae/recon_mse": mse}, step=0)
        if not mse < VAE_FIT_WARN:
            rank_zero_warn(
                f"the VAE fit ended at reconstruction MSE {mse:.3f} (images in [-1, 1]; a flat grey image is about "
                f"0.3): samples will not show what the DiT learns; lower model.vae_fit_lr or raise vae_fit_steps"
            )

    def fit_vae(self, loader: Any, steps: int, lr: float) -> float:
        """Train the VAE as an autoencoder on the batches' targets for `steps` Adam steps, then freeze it.

        Returns the last step's pixel MSE (images in [-1, 1]).
        """
        from rich.progress import track

        vae = self.codec.vae
        vae.requires_grad_(True)
        optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
        batches, mse = iter(loader), float("nan")
        with torch.enable_grad():
            for _ in track(range(steps), description="fitting the tiny VAE", transient=True):
                batch = next(batches, None)
                if batch is None:
                    batches = iter(loader)
                    batch = next(batches)
                images = list(batch["target"])  # the references come from the same images: targets suffice
                recon, inputs, latents = [], [], []
                for idx in _group_by_shape(images).values():
                    x = torch.stack([images[i] for i in idx]).to(self.device)
                    y, z = self.codec.round_trip(x)
                    recon.append(y)
                    inputs.append(x)
                    latents.append(z)
                loss = autoencoder_loss(recon, inputs, latents)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                mse = float(flow_loss([r.detach() for r in recon], inputs))
        vae.requires_grad_(False).eval()
        return mse

    def setup(self, stage: str) -> None:
        """Record the attention backend with the run (when the model was built before the trainer)."""
        self._record_attention_backend()

    def _record_attention_backend(self) -> None:
        """Log `attention/backend` (the backend actually used) as a hyperparameter, when a logger is there."""
        if self.attention_backend is not None and self._trainer is not None and self.logger is not None:
            self.logger.log_hyperparams({"attention/backend": self.attention_backend})

    def _pretrained_parts(self) -> tuple[tuple[str, dict[str, Any]], ...]:
        """(parameter-name prefix, its spec) of each part that may come from a `pretrained` source."""
        return (
            ("codec.", self.vae_spec),
            ("text_encoder.", self.text_spec),
            ("backbone.", self.backbone_spec),
        )

    def _from_pretrained(self, name: str) -> bool:
        """Whether parameter `name` was loaded from a `pretrained` source (so a checkpoint can omit it)."""
        for prefix, spec in self._pretrained_parts():
            if name.startswith(prefix):
                return spec.get("pretrained") is not None
        return False

    def train(self, mode: bool = True) -> FlowEdit:
        """Train mode for the trainable parts; the VAE and the text encoder always stay in eval mode."""
        super().train(mode)
        for frozen in (self.codec, self.text_encoder):
            if frozen is not None:
                frozen.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave out the frozen weights loaded from `pretrained` (they reload in configure_model).

        Not from a sharded FSDP checkpoint: its loader reads every key the model has (torch.distributed
        .checkpoint), so there the frozen weights stay in (one copy, written as shards like the rest).
        """
        state = checkpoint.get("state_dict", {})
        if is_sharded_state(state):
            return
        for key in self._reloadable & state.keys():
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Fill the omitted frozen pretrained weights from the freshly loaded ones."""
        state = checkpoint.setdefault("state_dict", {})
        current = self.state_dict()
        for key in self._reloadable - state.keys():
            state[key] = current[key]

    # --- geometry and random streams ------------------------------------------------------------------

    @property
    def pixels_per_token(self) -> int:
        """Image pixels per DiT token side: the VAE's downsampling factor times the DiT patch."""
        return self.codec.factor * self.backbone.patch_size

    def tokens(self, latent: Tensor) -> int:
        """DiT tokens of one [C, h, w] latent."""
        p = self.backbone.patch_size
        return (latent.shape[-2] // p) * (latent.shape[-1] // p)

    def max_tokens(self, target_tokens: Sequence[int], batch: dict[str, Any] | None = None) -> int | None:
        """The packed length: max_ref_tokens + the largest target (SELF's fixed length), or None (no padding).

        The reference part agrees with the data's resize rule by construction: with max_ref_tokens "budget" it
        is the most reference tokens the rule can give at the batch's budget (`ref_pixel_cap` // pixels per
        token², `datamodules.budget.reference_capacity`: (B / pixels per token)² for the joint rule, following
        the progressive schedule); an integer below that is refused with both numbers. A batch of one sample
        has nothing to be aligned with and is not padded at all.
        """
        refs = self.max_ref_tokens
        if refs is None:
            return None
        area = self.pixels_per_token**2
        cap = None
        if batch is not None and "ref_pixel_cap" in batch:
            cap = int(max(batch["ref_pixel_cap"])) // area
        elif batch is not None and "ref_budget" in batch:
            cap = int(max(batch["ref_budget"])) ** 2 // area
        if refs == "budget":
            if cap is None:
                raise ValueError(
                    "max_ref_tokens='budget' needs batches with `ref_pixel_cap` or `ref_budget` (datamodules.multiref)"
                )
            refs = cap
        elif cap is not None and int(refs) < cap:
            raise ValueError(
                f"model.max_ref_tokens={refs} is below the {cap} reference tokens the data's resize rule can give at "
                f"this batch's budget ({int(max(batch['ref_budget']))} px): set max_ref_tokens: budget (or >= {cap})"
            )
        if len(target_tokens) == 1:
            return None
        return int(refs) + max(target_tokens)

    def sigmas(self, steps: int, target_tokens: Sequence[int]) -> Tensor:
        """The sampler's sigmas [B, steps + 1] on this device: its shift, grid and terminal per target size."""
        shift = self.shift_for(target_tokens, self.sampler["shift"])
        grid, terminal = self.sampler["grid"], self.sampler["shift_terminal"]
        return flow.sigma_schedule(steps, shift, grid, terminal).to(self.device)

    def shift_for(self, target_tokens: Sequence[int], shift: float | str) -> Tensor:
        """Per-sample time shift: the fixed float, or exp(mu(tokens)) on the timesteps' resolution line."""
        if shift != "resolution":
            return torch.full((len(target_tokens),), float(shift))
        t = self.timesteps
        return flow.resolution_shift(
            torch.tensor(target_tokens, dtype=torch.float32),
            t["base_tokens"],
            t["max_tokens"],
            t["base_mu"],
            t["max_mu"],
        )

    def draw(
        self, shapes: Sequence[Sequence[int]], target_tokens: Sequence[int], *stream: int | str
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """(sigma [B], keep-text [B] bool, noise per target) from a CPU generator seeded by (seed, *stream).

        The draws happen in this order on one generator, so the same (seed, stream) always gives the same
        values, whatever ran before (no global RNG).
        """
        gen = torch_generator(self.seed, *stream)
        t = self.timesteps
        shift = self.shift_for(target_tokens, t["shift"])
        sigma = flow.sample_sigmas(len(shapes), gen, t["mean"], t["std"], shift)
        keep = torch.rand(len(shapes), generator=gen) >= self.drop_text
        noise = [torch.randn(tuple(s), generator=gen) for s in shapes]
        return sigma, keep, noise

    # --- training ---------------------------------------------------------------------------------------

    def encode_batch(self, batch: dict[str, Any]) -> tuple[list[list[Tensor]], list[Tensor]]:
        """VAE latents of the references (per sample) and the targets; equal shapes share one VAE call."""
        refs, targets = batch["refs"], batch["target"]
        flat = [r for sample in refs for r in sample] + list(targets)
        latents = self.codec(flat)
        out, i = [], 0
        for sample in refs:
            out.append(latents[i : i + len(sample)])
            i += len(sample)
        return out, latents[i:]

    def batch_latents(self, batch: dict[str, Any]) -> tuple[list[list[Tensor]], list[Tensor]]:
        """(reference latents per sample, target latents): the cache's when the batch carries them, else the VAE's.

        A batch read from a latent cache (`data.cache_dir`, datamodules/cache.py) has `batch["cached"]` with the
        latents the frozen VAE made of these samples, so the VAE is not run.
        """
        cached = batch.get("cached")
        if cached is None:
            return self.encode_batch(batch)
        refs = [[r.to(self.device) for r in sample] for sample in cached["refs"]]
        return refs, [t.to(self.device) for t in cached["target"]]

    def batch_text(self, batch: dict[str, Any], prompts: list[str], keep: Tensor) -> TextConditioning:
        """The text conditioning of `prompts`: the cache's states when the batch carries them, else the encoder's.

        With a cache, only the dropped prompts (keep False, CFG training) are encoded, as the empty prompt; that
        needs no references for SD3 and FLUX, while the Qwen VLM reads the references' pixels, which a cached
        batch does not carry (use drop_text 0 with a Qwen cache).
        """
        cached = batch.get("cached")
        if cached is None:
            return self.text_encoder(prompts, batch["refs"])
        text = cached["text"]
        text = TextConditioning(
            text.hidden.to(self.device),
            text.mask.to(self.device),
            None if text.pooled is None else text.pooled.to(self.device),
        )
        dropped = [i for i, k in enumerate(keep.tolist()) if not k]
        if not dropped:
            return text
        if self.family == "qwen_image_edit":
            raise ValueError(
                "drop_text with cached Qwen text states: the empty prompt's states depend on the references' "
                "pixels, which a cached batch lacks; set drop_text: 0 or train on the images"
            )
        empty = self.text_encoder([""] * len(dropped))
        length = max(text.hidden.shape[1], empty.hidden.shape[1])
        hidden = torch.nn.functional.pad(text.hidden, (0, 0, 0, length - text.hidden.shape[1]))
        mask = torch.nn.functional.pad(text.mask, (0, length - text.mask.shape[1]))
        pooled = None if text.pooled is None else text.pooled.clone()
        for j, i in enumerate(dropped):
            n = empty.hidden.shape[1]
            hidden[i] = 0
            hidden[i, :n] = empty.hidden[j].to(hidden.dtype)
            mask[i] = False
            mask[i, :n] = empty.mask[j]
            if pooled is not None:
                pooled[i] = empty.pooled[j].to(pooled.dtype)
        return TextConditioning(hidden, mask, pooled)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """L = mean ||v_θ(x_σ, refs, σ, text) − (ε − x0)||² over the target latents (UniPic-3 / SELF SFT).

        A batch from a latent cache (`batch["cached"]`) skips the VAE and the text encoder (`batch_latents`,
        `batch_text`): the same loss as on the images, at the cost of reading the cache.
        """
        refs, x0 = self.batch_latents(batch)
        target_tokens = [self.tokens(x) for x in x0]
        micro = batch_idx % max(1, self.trainer.accumulate_grad_batches)
        sigma, keep, noise = self.draw(
            [x.shape for x in x0], target_tokens, "train", self.global_step, micro, self.global_rank
        )
        prompts = [p if k else "" for p, k in zip(batch["instruction"], keep.tolist())]
        with torch.no_grad():
            text = self.batch_text(batch, prompts, keep)
        eps = [n.to(x.device) for n, x in zip(noise, x0)]
        sigma = sigma.to(self.device)
        x_sigma = [flow.interpolate(x, e, s) for x, e, s in zip(x0, eps, sigma)]
        v_pred = self.backbone(x_sigma, refs, sigma, text, max_tokens=self.max_tokens(target_tokens, batch))
        loss = flow_loss(v_pred, [flow.velocity(x, e) for x, e in zip(x0, eps)])
        size = len(x0)
        ref_tokens = sum(self.tokens(r) for sample in refs for r in sample)
        self.log("train/loss", loss, batch_size=size)
        self.log("train/padding_fraction", float(self.backbone.last_padding_fraction), batch_size=size)
        self.log("train/tokens", float(sum(target_tokens) + ref_tokens), batch_size=size)
        return loss

    # --- evaluation -------------------------------------------------------------------------------------

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """val/loss and val/pixel_mse (see `evaluate`)."""
        self.evaluate(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """test/loss and test/pixel_mse (see `evaluate`)."""
        self.evaluate(batch, batch_idx, "test")

    def evaluate(self, batch: dict[str, Any], batch_idx: int, split: str) -> list[Tensor] | None:
        """<split>/loss: the flow loss at `val_sigmas`, noise seeded by sample key; on batch 0 <split>/pixel_mse.

        Beside it <split>/pixel_mse_mean_colour: the MSE of a flat image of each target's own mean colour, the
        trivial baseline a model that ignores its inputs' content reaches at best; a model that uses its
        references and instruction is below it. Returns the samples it drew (batch 0), else None.
        """
        refs, x0 = self.encode_batch(batch)
        keys = _keys(batch)
        text = self.text_encoder(batch["instruction"], batch["refs"])
        eps = [
            torch.randn(tuple(x.shape), generator=torch_generator(self.seed, "val", k)).to(x.device)
            for x, k in zip(x0, keys)
        ]
        target = [flow.velocity(x, e) for x, e in zip(x0, eps)]
        max_tokens = self.max_tokens([self.tokens(x) for x in x0], batch)
        losses = []
        for s in self.val_sigmas:
            x_sigma = [flow.interpolate(x, e, s) for x, e in zip(x0, eps)]
            sigma = torch.full((len(x0),), s, device=self.device)
            losses.append(flow_loss(self.backbone(x_sigma, refs, sigma, text, max_tokens=max_tokens), target))
        size = len(x0)
        self.log(f"{split}/loss", torch.stack(losses).mean(), batch_size=size, sync_dist=True)
        if batch_idx == 0 and self.val_sample_steps > 0:  # the baseline: each target's own mean colour, flat
            targets = [t.to(self.device) for t in batch["target"]]
            flat = [t.mean((-2, -1), keepdim=True).expand_as(t) for t in targets]
            self.log(
                f"{split}/pixel_mse_mean_colour", flow_loss(flat, targets), batch_size=size, sync_dist=True
            )
            images = self.val_samples(batch)
            mse = flow_loss(images, targets)
            self.log(f"{split}/pixel_mse", mse, batch_size=size, sync_dist=True)
            return images
        return None

    def val_samples(self, batch: dict[str, Any]) -> list[Tensor]:
        """Samples of an evaluation batch at its targets' sizes, `val_sample_steps` steps, noise seeded by sample key."""
        return self.sample(
            batch["refs"],
            batch["instruction"],
            size=[tuple(t.shape[-2:]) for t in batch["target"]],
            steps=self.val_sample_steps,
            generator=[torch_generator(self.seed, "val-sample", k) for k in _keys(batch)],
        )

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[Tensor]:
        """Sample each batch entry (at its target's size, else its first reference's) and write <key>.png."""
        keys = _keys(batch)
        size = [tuple(t.shape[-2:]) for t in batch["target"]] if "target" in batch else None
        images = self.sample(
            batch["refs"],
            batch["instruction"],
            size=size,
            generator=[torch_generator(self.seed, "predict", k) for k in keys],
        )
        out_dir = Path(self.predictions_dir or Path(self.trainer.default_root_dir) / "predictions")
        out_dir.mkdir(parents=True, exist_ok=True)
        for key, image in zip(keys, images):
            to_pil(image).save(out_dir / f"{key.replace('/', '_')}.png")
        return [image.cpu() for image in images]

    def sample_grid(self, batch: dict[str, Any], k: int) -> list[tuple[list[Tensor], Tensor, Tensor]]:
        """(references, target, prediction) for the first k samples (callbacks.images.SampleGrid protocol)."""
        k = min(k, len(batch["target"]))
        keys = _keys(batch)[:k]
        refs, targets = batch["refs"][:k], batch["target"][:k]
        images = self.sample(
            refs,
            batch["instruction"][:k],
            size=[tuple(t.shape[-2:]) for t in targets],
            generator=[torch_generator(self.seed, "grid", key) for key in keys],
        )
        return [(list(r), t, p) for r, t, p in zip(refs, targets, images)]

    # --- sampling ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        refs: Sequence[Sequence[Tensor]],
        instruction: Sequence[str],
        size: tuple[int, int] | Sequence[tuple[int, int]] | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        true_cfg: bool | None = None,
        step_fn: StepFn = flow.euler_step,
    ) -> list[Tensor]:
        """Images [3, H, W] in [-1, 1]: `steps` updates of the flow ODE from noise, with CFG.

        size: (H, W) for all samples, one per sample, or None: each sample's first reference's size
        (UniPic-3's default), else `sampler.size`. generator: one for all (drawn in sample order) or one
        per sample. CFG is text-only: the unconditional branch gets `sampler.negative_prompt` and the same
        references. `step_fn(x, v, sigma, sigma_next)` updates one sample (default: the Euler step); an RL
        sampler passes its own (e.g. an SDE step that records log-probabilities).
        """
        cfg_ = self.sampler
        steps = steps or cfg_["steps"]
        guidance = cfg_["guidance"] if guidance is None else guidance
        true_cfg = cfg_["true_cfg"] if true_cfg is None else true_cfg
        n = len(instruction)
        sizes = self._sizes(refs, size, n)
        generators = list(generator) if isinstance(generator, Sequence) else [generator] * n
        f, c = self.codec.factor, self.codec.channels
        x = [
            torch.randn(c, h // f, w // f, generator=g, device=getattr(g, "device", "cpu")).to(self.device)
            for (h, w), g in zip(sizes, generators)
        ]
        ref_latents = [self.codec(list(r)) if len(r) else [] for r in refs]
        ref_pixels = [list(r) for r in refs]
        text = self.text_encoder(list(instruction), ref_pixels)
        uncond = self.text_encoder([cfg_["negative_prompt"]] * n, ref_pixels) if guidance > 1 else None
        target_tokens = [self.tokens(xi) for xi in x]
        sigmas = self.sigmas(steps, target_tokens)
        max_tokens = None  # sampling pads to the longest sequence: masked padding changes nothing, only costs
        with self.backbone.reuse_condition():  # the text's projection once per sample call, not per step
            for i in range(steps):
                sigma, sigma_next = sigmas[:, i], sigmas[:, i + 1]
                v = self.backbone(x, ref_latents, sigma, text, max_tokens=max_tokens)
                if uncond is not None:
                    v_u = self.backbone(x, ref_latents, sigma, uncond, max_tokens=max_tokens)
                    if true_cfg:
                        p = self.backbone.patch_size
                        rescale = cfg_["cfg_norm_rescale"]
                        v = [flow.true_cfg(a, b, guidance, rescale, patch=p) for a, b in zip(v_u, v)]
                    else:
                        v = [flow.cfg(a, b, guidance) for a, b in zip(v_u, v)]
                x = [step_fn(xi, vi.float(), s, s_next) for xi, vi, s, s_next in zip(x, v, sigma, sigma_next)]
        return self.codec(x, decode=True)

    def _sizes(self, refs: Sequence[Sequence[Tensor]], size: Any, n: int) -> list[tuple[int, int]]:
        """One (H, W) per sample, checked to be a multiple of the pixels per token."""
        if size is None:
            default = tuple(self.sampler["size"])
            sizes = [tuple(r[0].shape[-2:]) if len(r) else default for r in refs]
        elif len(size) == 2 and all(isinstance(s, int) for s in size):
            sizes = [tuple(size)] * n
        else:
            sizes = [tuple(s) for s in size]
        m = self.pixels_per_token
        for h, w in sizes:
            if h % m or w % m:
                raise ValueError(
                    f"sample size {h}x{w} must be a multiple of {m} px (VAE /{self.codec.factor} x patch)"
                )
        return sizes  # type: ignore[return-value]

    # --- optimisation -----------------------------------------------------------------------------------

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: one group of every trainable parameter (a distillation adds its critic)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def configure_optimizers(self) -> Any:
        """AdamW over the trainable parameters; linear warm-up, then constant or cosine, stepped per step.

        The cosine's total (`trainer.estimated_stepping_batches`) is read when the schedule first needs it, after
        warm-up, not here: reading it builds the train loader, and under FSDP Lightning calls this hook before
        it restores a checkpoint, so the data stream would restart its epoch (Lightning issue 20550).
        """
        optimizer = torch.optim.AdamW(
            self.param_groups(), lr=self.lr, betas=self.betas, weight_decay=self.weight_decay
        )
        total: list[int | None] = []

        def factor(step: int) -> float:
            if step < max(self.warmup_steps, 1) or self.lr_schedule == "constant":
                return lr_factor(step, self.warmup_steps, None, self.lr_schedule)  # needs no total
            if not total:
                steps = self.trainer.estimated_stepping_batches if self._trainer is not None else None
                total.append(int(steps) if steps is not None and math.isfinite(steps) else None)
            return lr_factor(step, self.warmup_steps, total[0], self.lr_schedule)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _keys(batch: dict[str, Any]) -> list[str]:
    """The batch's sample keys (`__key__`), or their positions when a batch has none."""
    keys = batch.get("__key__") or [""] * len(batch["instruction"])
    return [k or str(i) for i, k in enumerate(keys)]
