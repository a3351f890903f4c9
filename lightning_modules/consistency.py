"""UniPic 3.0's trajectory mapping: consistency distillation of the CFG teacher onto a fixed few-step student grid.

UniPic 3.0 (arXiv 2601.15664, post-training; docs/methods/unipic3.md) first maps its 50-step CFG teacher's ODE
trajectories onto 8 student steps ("trajectory mapping", consistency stage: 10k steps, batch 256, lr 1e-6),
then sharpens the student with distribution matching (`lightning_modules/dmd.py`). Its released students
sample with the teacher's own Euler sampler at 8 steps without CFG (12.5x = 50 steps x 2 passes / 8).

`FewStepDistill` is what both stages share, on top of FlowEdit (the packed DiT, the SELF sequence and pixel
budget of multi-reference composition, the sampler): the student is FlowEdit's `backbone`; the frozen teacher
is a second copy built from `teacher` (default: the student's own spec, so the student starts as the teacher)
with its weights from `init_checkpoint` (a FlowEdit run: the teacher's EMA weights by default), checked to
be the student's architecture; `teacher_velocity` is the teacher's CFG velocity (true CFG with the norm
rescale as the teacher samples). The student samples with FlowEdit's `sample` at `steps` of 8, 4, 2 or 1 and
guidance 1 (`sampler` of the experiment), on exactly the sigma grid it was trained on (`student_grid`).
At validation (and test) both stages log `val/fid` and `val/kid` of the student's samples against the batches'
target images (`metrics.distribution.DistributionScores`, the feature extractor that `val_fid` names) beside
FlowEdit's `val/pixel_mse` against the same exact targets.

`TrajectoryMapping` (the consistency stage): for each sample a student step count K (`student_steps`), a
point t of the teacher's `teacher_steps` grid and x_t = (1 - t) x0 + t eps (the forward-noised data point,
standing for the trajectory point at t); s = the end of t's student segment; the teacher takes one CFG ODE
step t -> t' = max(next teacher sigma, s); the target is x_t' when t' = s, else the EMA student's jump
x_t' + (s - t') v_ema(x_t'); the student's jump x_t + (s - t) v_theta(x_t) is pulled to it
(`components.distill.consistency_loss`). The EMA is the `callbacks.ema.EMA` of the run (`EMA.applied`); under FSDP the
target is the stop-gradient student instead (`target: student`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from callbacks.ema import EMA
from lightning_modules.components import flow
from lightning_modules.components.distill import consistency_loss, jump, segment_end
from lightning_modules.components.packed_dit import PackedDiT, TextConditioning
from lightning_modules.flow_edit import BACKENDS, FlowEdit
from lightning_modules.flow_grpo import ensure_init_checkpoint
from metrics.distribution import DistributionScores, fit_tiny_encoder
from omnilab.attention import apply_attention
from omnilab.runs import resolve_latest
from omnilab.seeding import torch_generator

STUDENT_SAMPLER = {"steps": 8, "guidance": 1.0}  # UniPic-3's students: 8 Euler steps, no CFG
VAL_FID_DEFAULTS: dict[str, Any] = {
    "kind": "tiny",  # metrics.distribution.build_feature_extractor: tiny | clip | inception
    "weights_path": None,  # tiny: a safetensors file (None: seeded random init); clip: a folder; inception: .pth
    "kid_subset_size": 50,
    "seed": 0,
    "batches": None,  # the evaluation batches whose samples enter (None: all; 0: off)
    # tiny without its weights file: trained in the run on the training targets first (metrics.distribution.
    # fit_tiny_encoder) for this many steps (0: a seeded random init), then written to weights_path if one is given
    "fit_steps": 100,
    "fit_images": 256,
}
_CONFIG_NOISE = {"_name_or_path", "_diffusers_version", "_class_name", "_use_default_values"}


def load_backbone_weights(module: nn.Module, path: str | Path, what: str, ema: bool = True) -> None:
    """Load a Lightning checkpoint's `backbone.*` weights (its EMA's when `ema` and present) into a PackedDiT.

    ValueError naming the file and the keys when the checkpoint's backbone is not this architecture (missing,
    unexpected or differently shaped weights) or holds non-finite weights (a diverged run); sharded (folder)
    checkpoints are refused with a message.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a sharded checkpoint folder: consolidate it into one file first")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = dict(ckpt.get("state_dict") or {})
    if ema:
        for key, value in (ckpt.get("callbacks") or {}).items():
            if str(key).startswith("EMA") and isinstance(value, dict) and value.get("ema"):
                state.update(value["ema"])
                break
    weights = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    if not weights:
        raise ValueError(
            f"{what} {path} holds no `backbone.*` weights (a FlowEdit or distillation checkpoint is needed)"
        )
    own = module.state_dict()
    shapes = [
        f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in weights.items()
        if k in own and v.shape != own[k].shape
    ]
    missing = sorted(own.keys() - weights.keys())
    unexpected = sorted(weights.keys() - own.keys())
    if shapes or missing or unexpected:
        raise ValueError(
            f"{what} {path} does not match the student's backbone config (the teacher, the student and the critic "
            f"must share one architecture): shapes {shapes[:3]}, missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    broken = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise ValueError(
            f"{what} {path} has non-finite (NaN/inf) weights in {len(broken)} tensors, e.g. {broken[:3]}: the run "
            f"that wrote it diverged; take an earlier checkpoint"
        )
    module.load_state_dict(weights)
    print(f"loaded the {what} weights{' (EMA)' if ema else ''} from {path}", flush=True)


def load_codec_weights(codec: nn.Module, path: str | Path) -> bool:
    """Load a checkpoint's `codec.*` weights (a config-built VAE fitted by the teacher's run) into `codec`.

    The student must decode in the latent space its teacher was trained in; a checkpoint without codec weights
    (a pretrained VAE, left out of checkpoints) loads nothing and returns False.
    """
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    weights = {
        k[len("codec.") :]: v for k, v in (ckpt.get("state_dict") or {}).items() if k.startswith("codec.")
    }
    if not weights:
        return False
    codec.load_state_dict(weights)
    return True


def same_architecture(a: nn.Module, b: nn.Module) -> list[str]:
    """The config keys on which two diffusers transformers differ (empty when they are the same model)."""
    ca = {k: v for k, v in dict(getattr(a, "config", {})).items() if k not in _CONFIG_NOISE}
    cb = {k: v for k, v in dict(getattr(b, "config", {})).items() if k not in _CONFIG_NOISE}
    return sorted(k for k in ca.keys() | cb.keys() if ca.get(k) != cb.get(k))


class FewStepDistill(FlowEdit):
    """FlowEdit's student plus a frozen CFG teacher: what trajectory mapping and DMD share.

    Args:
        teacher: The teacher DiT's spec (`{family, pretrained, subfolder}` or `{config}`); None: the student's
            spec (the student starts as the teacher). Its architecture must equal the student's.
        init_checkpoint: A FlowEdit (teacher) Lightning checkpoint: its backbone weights go into the teacher
            and, unless `init_student` is set, into the student.
        init_experiment: When `init_checkpoint` is missing: the experiment ("unipic3/tiny") that trains it.
        init_experiment_args: Extra `omnilab fit` arguments for that run.
        init_ema: Take the EMA weights from `init_checkpoint` (and `init_student`) when it has them.
        init_student: An earlier distillation stage's checkpoint whose `backbone.*` (the student) starts this one
            (DMD after trajectory mapping).
        teacher_guidance: The teacher's CFG scale in the targets (UniPic-3 DMD: 6; its teacher samples at 4).
        teacher_steps: The teacher's sampling steps (the grid of trajectory points; UniPic-3: 50).
        student_steps: The student step counts trained (each sample draws one); the student samples at any.
        val_fid: FID/KID at validation and test (`VAL_FID_DEFAULTS`: `kind` and `weights_path` of the feature
            extractor, `kid_subset_size`, `seed`, `batches`, and `fit_steps` / `fit_images` of the tiny encoder's
            training in the run when it has no weights file); None: those defaults; `{batches: 0}`: off.
        **kwargs: FlowEdit's arguments; `sampler` defaults to 8 steps without CFG (the student's), its
            true_cfg / cfg_norm_rescale / negative_prompt / shift settings are the teacher's too.
    """

    def __init__(
        self,
        teacher: dict[str, Any] | None = None,
        init_checkpoint: str | None = None,
        init_experiment: str | None = None,
        init_experiment_args: list[str] | None = None,
        init_ema: bool = True,
        init_student: str | None = None,
        teacher_guidance: float = 4.0,
        teacher_steps: int = 50,
        student_steps: Sequence[int] = (8,),
        val_fid: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs["sampler"] = {**STUDENT_SAMPLER, **(kwargs.get("sampler") or {})}
        super().__init__(**kwargs)
        if unknown := set(val_fid or {}) - set(VAL_FID_DEFAULTS):
            raise ValueError(f"val_fid: unknown keys {sorted(unknown)}; known {list(VAL_FID_DEFAULTS)}")
        self.val_fid = {**VAL_FID_DEFAULTS, **(val_fid or {})}
        self._scores: DistributionScores | None = None  # built on first use (not a submodule: no state)
        if teacher is not None and teacher.get("family", self.family) != self.family:
            raise ValueError(
                f"teacher.family {teacher.get('family')!r} differs from the student's {self.family!r}"
            )
        steps = [int(k) for k in student_steps]
        if not steps or min(steps) < 1 or teacher_steps < 1:
            raise ValueError(
                f"student_steps {list(student_steps)} and teacher_steps {teacher_steps} must be >= 1"
            )
        self.teacher_spec = dict(teacher) if teacher is not None else None
        self.init_checkpoint, self.init_experiment = init_checkpoint, init_experiment
        self.init_experiment_args, self.init_ema = list(init_experiment_args or []), init_ema
        self.init_student = init_student
        self.teacher_guidance, self.teacher_steps = float(teacher_guidance), int(teacher_steps)
        self.student_steps = steps
        self.teacher: PackedDiT | None = None
        self.skips = 0  # counted skipped updates (non-finite values)

    # --- building -----------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Build the student (FlowEdit), the frozen teacher and the stage's extra networks; load the weights."""
        if self.backbone is not None:
            return
        super().configure_model()
        if self.teacher_spec is not None:
            spec = {k: v for k, v in self.teacher_spec.items() if k != "family"}
            self.teacher = BACKENDS[self.family].from_spec(**spec)
            if diff := same_architecture(self.teacher.model, self.backbone.model):
                raise ValueError(f"the teacher's config differs from the student's (backbone) on {diff}")
        else:
            self.teacher = copy.deepcopy(self.backbone)
        if self.init_checkpoint is not None:
            path = self._teacher_path()
            load_backbone_weights(self.teacher, path, "init_checkpoint", self.init_ema)
            if self.vae_spec.get("pretrained") is None and not Path(path).is_dir():
                load_codec_weights(self.codec, path)  # the teacher's (fitted) VAE: the same latent space
            if self.init_student is None:
                self.backbone.model.load_state_dict(self.teacher.model.state_dict())
        if self.init_student is not None:
            load_backbone_weights(self.backbone, self.init_student, "init_student", self.init_ema)
        self.teacher.requires_grad_(False).eval()
        self.build_extra()
        self.attention_backend = apply_attention(self, self.attention)
        reload = self.init_checkpoint is not None or (self.teacher_spec or self.backbone_spec).get(
            "pretrained"
        )
        self._reloadable |= {
            n
            for n, p in self.named_parameters()
            if n.startswith("teacher.") and not p.requires_grad and reload
        }

    def build_extra(self) -> None:
        """The stage's own networks (DMD: the critic); none here."""

    def _teacher_path(self) -> Path:
        """`init_checkpoint`, trained first by `init_experiment` (rank 0, the others wait) when missing."""
        trainer = self._trainer
        args = list(self.init_experiment_args)
        data_dir = getattr(getattr(trainer, "datamodule", None), "data_dir", None)
        if data_dir is not None and not any(a.startswith("--data.init_args.data_dir") for a in args):
            args.append(f"--data.init_args.data_dir={data_dir}")
        if trainer is None or trainer.is_global_zero:
            ensure_init_checkpoint(self.init_checkpoint, self.init_experiment, args)
        if trainer is not None:
            trainer.strategy.barrier("distill_init_checkpoint")
        return resolve_latest(
            self.init_checkpoint
        )  # runs/.../latest/...: the newest run, link or pointer file

    def train(self, mode: bool = True) -> FewStepDistill:
        """FlowEdit's train mode; the teacher always stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # --- shared pieces ------------------------------------------------------------------------------------

    def condition(
        self, batch: dict[str, Any]
    ) -> tuple[list[list[Tensor]], list[Tensor], TextConditioning, TextConditioning | None]:
        """(reference latents, target latents, text, negative text for the teacher's CFG or None)."""
        refs, x0 = self.encode_batch(batch)
        with torch.no_grad():
            text = self.text_encoder(list(batch["instruction"]), batch["refs"])
            neg = None
            if self.teacher_guidance > 1:
                neg = self.text_encoder([self.sampler["negative_prompt"]] * len(x0), batch["refs"])
        return refs, x0, text, neg

    @contextlib.contextmanager
    def real_score(self) -> Iterator[PackedDiT]:
        """The teacher network for a no-grad forward (DMD with a LoRA critic disables the adapter here)."""
        yield self.teacher

    @torch.no_grad()
    def teacher_velocity(
        self,
        x: list[Tensor],
        refs: list[list[Tensor]],
        sigma: Tensor,
        text: TextConditioning,
        neg: TextConditioning | None,
        max_tokens: int | None = None,
    ) -> list[Tensor]:
        """The teacher's velocity with CFG at `teacher_guidance` (true CFG and norm rescale as its sampler)."""
        with self.real_score() as teacher:
            v = teacher(x, refs, sigma, text, max_tokens=max_tokens)
            if neg is None:
                return [vi.float() for vi in v]
            v_neg = teacher(x, refs, sigma, neg, max_tokens=max_tokens)
        scale, s = self.teacher_guidance, self.sampler
        if s["true_cfg"]:
            p = self.backbone.patch_size
            return [flow.true_cfg(a, b, scale, s["cfg_norm_rescale"], patch=p) for a, b in zip(v_neg, v)]
        return [flow.cfg(a, b, scale) for a, b in zip(v_neg, v)]

    # --- evaluation: FID/KID of the student's samples ----------------------------------------------------

    def scores(self) -> DistributionScores | None:
        """The FID/KID accumulator (built on first use from `val_fid`), None when switched off."""
        if self.val_fid["batches"] == 0 or self.val_sample_steps <= 0:
            return None
        if self._scores is None:
            cfg = self.val_fid
            self._scores = DistributionScores(
                cfg["kind"], cfg["weights_path"], cfg["kid_subset_size"], cfg["seed"]
            )
        return self._scores

    def on_fit_start(self) -> None:
        """FlowEdit's (the VAE fit), then the tiny FID encoder's training on the training targets when due."""
        super().on_fit_start()
        datamodule = self.trainer.datamodule
        if datamodule is not None and self.trainer.limit_val_batches != 0:  # no validation: no FID to measure
            self.fit_fid_encoder(datamodule.train_dataloader())

    def fit_fid_encoder(self, loader: Any) -> float | None:
        """Train the tiny FID encoder (`val_fid.fit_steps`) on up to `fit_images` targets of `loader`'s batches, when
        the tiny extractor has no weights file; every rank then uses rank 0's. Returns the last loss (None: not due).
        """
        cfg, path = self.val_fid, self.val_fid["weights_path"]
        if (
            cfg["kind"] != "tiny"
            or cfg["fit_steps"] <= 0
            or cfg["batches"] == 0
            or self.val_sample_steps <= 0
        ):
            return None
        if path is not None and Path(path).is_file():
            return None
        images: list[Tensor] = []
        for batch in loader:
            images += [((t.float() + 1) / 2).clamp(0, 1) for t in batch["target"]]
            if len(images) >= cfg["fit_images"]:
                break
        encoder, loss = fit_tiny_encoder(images[: cfg["fit_images"]], cfg["fit_steps"], seed=cfg["seed"])
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:  # ranks saw different data: all take rank 0's
            import torch.distributed as dist

            for tensor in encoder.state_dict().values():
                buffer = tensor.to(self.device)
                dist.broadcast(buffer, src=0)
                tensor.copy_(buffer.cpu())
        if path is not None and (trainer is None or trainer.is_global_zero):
            from safetensors.torch import save_file

            Path(path).parent.mkdir(parents=True, exist_ok=True)
            save_file(encoder.state_dict(), str(path))
        if trainer is not None and self.logger is not None:
            self.logger.log_metrics({"fid_encoder/loss": loss}, step=0)
        self._scores = DistributionScores(kid_subset_size=cfg["kid_subset_size"], extractor=encoder)
        return loss

    def evaluate(self, batch: dict[str, Any], batch_idx: int, split: str) -> list[Tensor] | None:
        """FlowEdit's metrics; the student's samples (batch 0's, else drawn here) and the targets enter the FID/KID."""
        images = super().evaluate(batch, batch_idx, split)
        scores, limit = self.scores(), self.val_fid["batches"]
        if scores is None or (limit is not None and batch_idx >= limit):
            return images
        if images is None:
            images = self.val_samples(batch)
        scores.update(images, real=False)
        scores.update([t.to(self.device) for t in batch["target"]], real=True)
        return images

    def on_validation_epoch_start(self) -> None:
        """Start the FID/KID sets afresh."""
        if (scores := self.scores()) is not None:
            scores.reset()

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        """Log val/fid, val/kid (and kid_std) of the epoch's samples vs their targets."""
        self._log_scores("val")

    def on_test_epoch_end(self) -> None:
        """Log test/fid, test/kid (and kid_std)."""
        self._log_scores("test")

    def _log_scores(self, split: str) -> None:
        if (scores := self.scores()) is None or min(scores.counts.values()) == 0:
            return
        for name, value in scores.compute().items():
            self.log(f"{split}/{name}", value)  # torchmetrics already gathered every rank's features
        scores.reset()

    def student_grid(self, steps: int, target_tokens: Sequence[int]) -> Tensor:
        """The student's sigmas [B, steps + 1]: exactly the grid `sample(steps=steps)` walks."""
        return self.sigmas(steps, target_tokens)

    def ema_callback(self) -> EMA | None:
        """The run's EMA callback (the consistency target's weights), if any."""
        if self._trainer is None:
            return None
        return next((c for c in self.trainer.callbacks if isinstance(c, EMA)), None)


class TrajectoryMapping(FewStepDistill):
    """UniPic 3.0's consistency stage: the student's jumps to its grid points match the teacher's CFG trajectory.

    Args:
        target: The network of the targets' jumps: "ema" (the run's `callbacks.ema.EMA` weights, swapped in for
            a no-grad pass; not under FSDP, whose root parameters are gathered inside the step) or "student"
            (the student itself under stop-gradient, improved consistency training's EMA-free target).
        **kwargs: `FewStepDistill`'s (teacher, init_checkpoint, teacher_guidance, teacher_steps,
            student_steps, ...) and FlowEdit's arguments.
    """

    def __init__(self, target: Literal["ema", "student"] = "ema", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if target not in ("ema", "student"):
            raise ValueError(f"target {target!r}: choose ema or student")
        self.target = target

    def on_fit_start(self) -> None:
        """Refuse the EMA target where it cannot be swapped in (FSDP) or is missing; then FewStepDistill's."""
        if self.target == "ema":
            if self.ema_callback() is None:
                raise ValueError(
                    "target: ema needs a callbacks.ema.EMA callback in trainer.callbacks (or target: student)"
                )
            from torch.distributed.fsdp import FullyShardedDataParallel

            if isinstance(getattr(self.trainer.strategy, "model", None), FullyShardedDataParallel):
                raise ValueError(
                    "target: ema cannot swap the EMA weights in inside an FSDP step (the root's parameters are "
                    "gathered there): use target: student under FSDP"
                )
        super().on_fit_start()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """One consistency update (module doc): L = ||f_θ(x_t) − sg(f_ema(x_t'))||² / (t − s)²."""
        refs, x0, text, neg = self.condition(batch)
        tokens = [self.tokens(x) for x in x0]
        n = len(x0)
        micro = batch_idx % max(1, self.trainer.accumulate_grad_batches)
        gen = torch_generator(self.seed, "consistency", self.global_step, micro, self.global_rank)
        k = torch.tensor(self.student_steps)[torch.randint(len(self.student_steps), (n,), generator=gen)]
        index = torch.randint(self.teacher_steps, (n,), generator=gen)
        eps = [torch.randn(tuple(x.shape), generator=gen).to(x.device) for x in x0]
        teacher_grid = self.sigmas(self.teacher_steps, tokens)
        rows = torch.arange(n, device=teacher_grid.device)
        t, t_next = teacher_grid[rows, index.to(rows.device)], teacher_grid[rows, index.to(rows.device) + 1]
        end = torch.stack(
            [
                segment_end(self.student_grid(int(ki), tokens[i : i + 1]), t[i : i + 1])[0]
                for i, ki in enumerate(k.tolist())
            ]
        )
        t_prime = torch.maximum(t_next, end)
        max_tokens = self.max_tokens(tokens, batch)
        x_t = [flow.interpolate(x, e, ti) for x, e, ti in zip(x0, eps, t)]
        v_teacher = self.teacher_velocity(x_t, refs, t, text, neg, max_tokens)
        x_prime = [flow.euler_step(x, v, a, b) for x, v, a, b in zip(x_t, v_teacher, t, t_prime)]
        reached = t_prime <= end
        # the target network runs on every step (also when all samples reached their end: every rank must run
        # the same passes under FSDP); a sample at its segment end keeps x_t'
        ema = self.ema_callback() if self.target == "ema" else None
        with torch.no_grad(), ema.applied(self) if ema is not None else contextlib.nullcontext():
            v_ema = self.backbone(x_prime, refs, t_prime, text, max_tokens=max_tokens)
        target = [
            xp if done else jump(xp, v, a, b)
            for xp, v, a, b, done in zip(x_prime, v_ema, t_prime, end, reached.tolist())
        ]
        v = self.backbone(x_t, refs, t, text, max_tokens=max_tokens)
        pred = [jump(x, vi, a, b) for x, vi, a, b in zip(x_t, v, t, end)]
        loss = consistency_loss(pred, target, t, end)
        self.log("train/loss", loss, batch_size=n)
        self.log("train/target_reached", reached.float().mean(), batch_size=n)
        return loss
