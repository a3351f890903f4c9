"""Checkpoints that are always fresh and never corrupt (README "Security and reliability").

- `AtomicCheckpointIO` writes a checkpoint to a temp file beside its target (same folder, so the same
  filesystem whatever TMPDIR is), fsyncs it, `os.replace`s it over the target and fsyncs the folder: a
  kill -9 mid-write leaves the previous checkpoint whole, and at most a `.<name>.<pid>.tmp` file, which
  `clean_stale_temp_files` removes when the next run starts.
- `RunCheckpoint` is Lightning's ModelCheckpoint with `last.ckpt` written at every checkpoint interval
  (Lightning writes it only when the monitored metric improves) and at the end of training, and with a
  checkpoint taken inside an epoch's end hooks settled as the end of that epoch when it is loaded: a
  step-based (`max_steps`) resume would otherwise run that epoch's end a second time and count one
  epoch more than the uninterrupted run, so the two leave different final checkpoints and a later
  extension stops early (`settle_epoch_end`).
- `check_writable` finds a read-only checkpoint folder before any work.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")  # .<target>.<pid>.<random>.tmp


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)` through a temp file beside `path`, fsync and `os.replace` (never a partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files of checkpoint writes whose writer is gone (killed mid-write); return them."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = TEMP_NAME.match(path.name)
        if match and (int(match["pid"]) == os.getpid() or not _alive(int(match["pid"]))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def check_writable(folder: str | os.PathLike, what: str = "checkpoint folder") -> None:
    """Create `folder` if needed and write a probe file in it; PermissionError/OSError naming it if it cannot."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OSError(f"the {what} {str(folder)!r} is not writable: {err.strerror or err}") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch CheckpointIO, writing local checkpoints atomically (`atomic_torch_save`)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Write `checkpoint` to `path` atomically (remote URLs go through Lightning's own writer)."""
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


def _zero_current(state: Any) -> None:
    """Zero every `current` progress counter in a loop state (what Lightning does when an epoch starts)."""
    if not isinstance(state, dict):
        return
    current = state.get("current")
    if isinstance(current, dict) and all(isinstance(v, int) for v in current.values()):
        state["current"] = dict.fromkeys(current, 0)
    if "is_last_batch" in state:
        state["is_last_batch"] = False
    for value in state.values():
        _zero_current(value)


def settle_epoch_end(checkpoint: dict[str, Any]) -> bool:
    """Make a checkpoint taken inside an epoch's end hooks read as taken just after that epoch; True if it was.

    Such a checkpoint has the fit loop's epoch counted as processed but not completed. Lightning resumes it
    by finishing the epoch when training is epoch-based, but by running its end again when it is step-based
    (the epoch is then counted twice). Completing it here, and zeroing the epoch loop's per-epoch counters
    as a new epoch does, resumes both kinds as the uninterrupted run continued.
    """
    fit = (checkpoint.get("loops") or {}).get("fit_loop")
    if not isinstance(fit, dict) or "epoch_progress" not in fit:
        return False
    progress = fit["epoch_progress"]
    for part in ("total", "current"):
        p = progress.get(part) or {}
        if not (p.get("ready") == p.get("started") == p.get("processed") == p.get("completed", -2) + 1):
            return False
    for part in ("total", "current"):
        progress[part]["completed"] = progress[part]["processed"]
    for key, value in fit.items():
        if key.startswith("epoch_loop.") and not key.startswith("epoch_loop.val_loop"):
            _zero_current(value)
    return True


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint with `last.ckpt` at every interval and at the end, stale temp files cleaned at start."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Resolve the folder (Lightning), then remove temp files left by a writer killed mid-write."""
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.is_global_zero and self.dirpath:
            clean_stale_temp_files(self.dirpath)

    def _save_topk_checkpoint(self, trainer: Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        super()._save_topk_checkpoint(trainer, monitor_candidates)
        self._save_last_checkpoint(trainer, monitor_candidates)  # at every interval, improved or not

    def _save_last_checkpoint(self, trainer: Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        if getattr(self, "_last_step_written", None) == trainer.global_step:
            return  # written at this step already
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_step_written = trainer.global_step

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write `last.ckpt` for the final step, whatever the last interval was."""
        if self.save_last and not trainer.fast_dev_run:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: Mapping[str, Any]
    ) -> None:
        """Settle a checkpoint taken at an epoch's end (`settle_epoch_end`) before Lightning restores its loops."""
        settle_epoch_end(checkpoint)  # type: ignore[arg-type]
