"""Training the VQ image tokenizer (LlamaGen's VQ-8 of PURE) as a LightningModule.

PURE (arXiv 2503.11073) does not train its tokenizer: it loads LlamaGen's released `vq_ds8_c2i.pt`
(`lightning_modules/components/vq.py`, `convert_llamagen_checkpoint`). The tiny experiments need a tokenizer of the
same architecture at a size a CPU trains in a minute, so this module trains one with LlamaGen's VQ objective
(`tokenizer/tokenizer_image/vq_loss.py`): an L2 reconstruction loss plus the codebook and commitment terms
(`quantizer_losses`, beta 0.25). LlamaGen also adds LPIPS and a PatchGAN discriminator; both need pretrained VGG
weights that an offline CPU run does not have, so they are not here. A tiny codebook trained for a minute collapses
onto a few entries; `restart_dead_codes_every` (off by default, not in LlamaGen) re-seeds the entries unused since
the last restart with encoder outputs of the current batch (the worst-coded ones most likely, k-means++ style), as
VQ trainers commonly do (Dhariwal et al., Jukebox).

After fitting, the tokenizer is also written in the hub layout to `export_dir` (`save_pretrained`), which
`LlamaGenVQModel.from_pretrained` and PURE's `vq: {pretrained: <dir>}` read; PURE's `init_vq_checkpoint` reads the
Lightning checkpoint (`weights_only=True`) instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.components.backbones import build_backbone
from lightning_modules.components.vq import LlamaGenVQModel, quantizer_losses


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Mean over the batch of 10 log10(1 / MSE) for images in [0, 1] (RGB, per image)."""
    mse = ((a - b) ** 2).flatten(1).mean(-1).clamp_min(1e-10)
    return (10 * torch.log10(1.0 / mse)).mean()


class VQTokenizer(L.LightningModule):
    """A LlamaGen-style VQ tokenizer trained on the `hq` images of a batch (reconstruction + VQ losses).

    Args:
        vq: The tokenizer: `{pretrained: <dir in the hub layout>}` or `{config: {...}}` (`LlamaGenVQModel` kwargs;
            the released VQ-8 is the default config).
        lr: AdamW learning rate (LlamaGen 1e-4).
        betas: AdamW betas (LlamaGen (0.9, 0.95)).
        weight_decay: AdamW weight decay (LlamaGen 0.05).
        commit_beta: Weight of the commitment loss (LlamaGen 0.25).
        codebook_weight: Weight of the codebook loss (LlamaGen 1.0).
        warmup_steps: Linear learning-rate warm-up (then constant).
        restart_dead_codes_every: Every this many steps, entries unused since the last restart take the value of
            random encoder outputs of the batch (0: never; LlamaGen does not).
        export_dir: Where to `save_pretrained` the tokenizer after fitting (relative paths go under the trainer's
            default_root_dir); None: no export.
    """

    def __init__(
        self,
        vq: dict[str, Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.05,
        commit_beta: float = 0.25,
        codebook_weight: float = 1.0,
        warmup_steps: int = 0,
        restart_dead_codes_every: int = 0,
        export_dir: str | None = "vq",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.vq_spec = dict(vq)
        self.vq: LlamaGenVQModel | None = None
        self.usage: Tensor | None = None  # per-code use count since the last restart
        self._batch_codes: tuple[Tensor, Tensor] | None = None

    def configure_model(self) -> None:
        """Build the tokenizer (idempotent)."""
        if self.vq is None:
            self.vq = build_backbone(LlamaGenVQModel, **self.vq_spec)

    @torch.no_grad()
    def restart_dead_codes(self, z: Tensor, codes: Tensor) -> int:
        """Count this batch's codes; every `restart_dead_codes_every` steps re-seed the unused entries from `z`.

        z [B, D, h, w] are the (normalised) encoder outputs, drawn with probability proportional to their squared
        distance from the entry that codes them (k-means++ seeding); the new entries are chosen on rank 0 and broadcast, so
        every rank keeps the same codebook. Returns the number of entries re-seeded.
        """
        every, n = self.hparams.restart_dead_codes_every, self.vq.config.codebook_size
        if not every:
            return 0
        if self.usage is None or self.usage.device != codes.device:
            self.usage = torch.zeros(n, device=codes.device)
        self.usage += torch.bincount(codes.flatten(), minlength=n)
        if self.global_step % every:  # called after the step: global_step counts it
            return 0
        usage = self.trainer.strategy.reduce(self.usage.clone(), reduce_op="sum")
        dead = (usage == 0).nonzero().flatten()
        self.usage.zero_()
        if not len(dead):
            return 0
        pool = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        # k-means++-style: outputs drawn in proportion to their squared distance from the entry that codes them
        error = ((pool - self.vq.quantize.codebook()[codes.flatten()]) ** 2).sum(-1).float().cpu() + 1e-12
        gen = torch.Generator(device="cpu").manual_seed(int(self.global_step))
        pick = torch.multinomial(error, len(dead), replacement=True, generator=gen).to(pool.device)
        rows = self.trainer.strategy.broadcast(pool[pick].clone(), src=0)
        self.vq.quantize.embedding.weight[dead] = rows.to(self.vq.quantize.embedding.weight)
        return len(dead)

    def losses(self, hq: Tensor) -> dict[str, Tensor]:
        """Reconstruction MSE (images in [-1, 1]), codebook and commitment losses, and their weighted sum."""
        x = hq * 2 - 1
        rec, q = self.vq(x)
        mse = F.mse_loss(rec, x)
        codebook, commit = quantizer_losses(q.e, q.z, self.hparams.commit_beta)
        loss = mse + self.hparams.codebook_weight * codebook + commit
        return {"loss": loss, "rec": mse, "codebook": codebook, "commit": commit, "codes": q.codes, "z": q.z}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """One step of the VQ objective."""
        out = self.losses(batch["hq"])
        batch_size = len(batch["hq"])
        self.log_dict(
            {f"train/{k}": out[k] for k in ("loss", "rec", "codebook", "commit")}, batch_size=batch_size
        )
        self.log(
            "train/codes_used",
            out["codes"].unique().numel() / self.vq.config.codebook_size,
            batch_size=batch_size,
        )
        self._batch_codes = (out["z"].detach(), out["codes"])
        return out["loss"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Dead-code restarts happen after the optimizer step (the codebook must not change under autograd)."""
        if self._batch_codes is not None:
            restarted = self.restart_dead_codes(*self._batch_codes)
            self._batch_codes = None
            if restarted:
                self.log("train/codes_restarted", float(restarted))

    def _evaluate(self, batch: dict[str, Any], split: str) -> None:
        hq = batch["hq"]
        codes = self.vq.encode(hq * 2 - 1)
        rec = (self.vq.decode_codes(codes) + 1) / 2
        self.log(f"{split}/psnr", psnr(rec, hq), batch_size=len(hq), sync_dist=True)
        self.log(f"{split}/rec", F.mse_loss(rec * 2 - 1, hq * 2 - 1), batch_size=len(hq), sync_dist=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Reconstruction PSNR through the discrete codes."""
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Reconstruction PSNR through the discrete codes."""
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> Any:
        """AdamW with a linear warm-up."""
        h = self.hparams
        opt = torch.optim.AdamW(self.parameters(), lr=h.lr, betas=tuple(h.betas), weight_decay=h.weight_decay)
        warm = max(1, h.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_end(self) -> None:
        """Write the tokenizer in the hub layout to `export_dir` (rank 0)."""
        if self.hparams.export_dir is None or not self.trainer.is_global_zero:
            return
        out = Path(self.hparams.export_dir)
        if not out.is_absolute():
            out = Path(self.trainer.default_root_dir) / out
        self.vq.save_pretrained(out)
