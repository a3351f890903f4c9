"""Run folders: one folder per fit, a `latest` link per experiment, and checkpoint paths that name them.

Each fit of `experiments/<method>/<name>.yaml` writes `runs/<method>/<name>/<run id>/` (README "Running an
experiment"): the MLflow run id when a logger is on, else a timestamp (`20260101-120000`, `-2`, `-3`, ... when
two start in the same second). `runs/<method>/<name>/latest` names the newest fit: a relative symlink to its
folder, replaced atomically (a temp link beside it, then `os.replace`), or, where symlinks cannot be made, a
plain file holding the folder's name. `resolve_latest` reads either kind, so a path such as
`runs/uniref/tiny/latest/checkpoints/last.ckpt` works in configs and on the command line wherever it is used.

`--ckpt_path` takes a checkpoint file, a run folder, an experiment folder (its latest run) or the word `latest`
(the latest run of the experiment being run); `checkpoint_in` picks the file: `last.ckpt` to resume a fit,
`best.ckpt` (else `last.ckpt`) to evaluate.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

RUNS_DIR = "runs"
LATEST = "latest"
CHECKPOINTS = "checkpoints"
RUN_DIR_ENV = "OMNILAB_RUN_DIR"  # the run folder rank 0 chose, inherited by the processes it launches


def experiment_dir(method: str, name: str, root: str | os.PathLike = RUNS_DIR) -> Path:
    """`runs/<method>/<name>`: the folder holding an experiment's run folders and its `latest` link."""
    return Path(root) / method / name


def timestamp_id(parent: str | os.PathLike) -> str:
    """A run id from the clock (`YYYYmmdd-HHMMSS`), suffixed `-2`, `-3`, ... if `parent` has it already."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_id, n = stamp, 1
    while (Path(parent) / run_id).exists():
        n += 1
        run_id = f"{stamp}-{n}"
    return run_id


def set_latest(run_dir: str | os.PathLike) -> Path:
    """Point `<experiment folder>/latest` at `run_dir` atomically (symlink, else a pointer file); returns it."""
    run_dir = Path(run_dir)
    link = run_dir.parent / LATEST
    tmp = run_dir.parent / f".{LATEST}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.symlink(run_dir.name, tmp, target_is_directory=True)
    except (OSError, NotImplementedError):  # no symlinks here: a file naming the folder
        tmp.write_text(run_dir.name + "\n")
    os.replace(tmp, link)
    return link


def latest_run(exp_dir: str | os.PathLike) -> Path | None:
    """The run folder `<exp_dir>/latest` names (symlink or pointer file), or None when there is none."""
    link = Path(exp_dir) / LATEST
    if link.is_symlink():
        target = Path(exp_dir) / os.readlink(link)
    elif link.is_file():
        target = Path(exp_dir) / link.read_text().strip()
    else:
        return None
    return target if target.is_dir() else None


def resolve_latest(path: str | os.PathLike) -> Path:
    """`path` with each `latest` component that is a pointer file replaced by the run folder it names."""
    parts = Path(path).parts
    out, parts = (Path(parts[0]), parts[1:]) if Path(path).is_absolute() else (Path(), parts)
    for part in parts:
        if part == LATEST and (out / part).is_file() and not (out / part).is_symlink():
            run = latest_run(out)
            out = run if run is not None else out / part
        else:
            out = out / part
    return out


def checkpoint_in(run_dir: str | os.PathLike, resume: bool) -> Path | None:
    """The checkpoint of a run folder to use: `last.ckpt` to resume, else `best.ckpt` (then `last.ckpt`)."""
    folder = Path(run_dir) / CHECKPOINTS
    names = ("last.ckpt",) if resume else ("best.ckpt", "last.ckpt")
    return next((folder / n for n in names if (folder / n).exists()), None)


def run_of_checkpoint(ckpt_path: str | os.PathLike) -> Path | None:
    """The run folder a checkpoint lies in (`<run>/checkpoints/<file>` beside a `config.yaml`), else None."""
    path = Path(os.path.realpath(resolve_latest(ckpt_path)))
    run = path.parent.parent
    return run if path.parent.name == CHECKPOINTS and (run / "config.yaml").is_file() else None


class NoCheckpoint(FileNotFoundError):
    """A `--ckpt_path` that names no checkpoint (the message says what was looked for)."""


def find_checkpoint(spec: str, exp_dir: str | os.PathLike, resume: bool) -> tuple[Path, str]:
    """(checkpoint file, how it was found) for a `--ckpt_path` value; NoCheckpoint naming what is missing.

    `spec` is `latest` (the latest run of `exp_dir`), a run folder, an experiment folder (its latest run) or a
    checkpoint path (which may go through a `latest` link).
    """
    exp_dir = Path(exp_dir)
    if spec == LATEST:
        run = latest_run(exp_dir)
        if run is None:
            raise NoCheckpoint(
                f"--ckpt_path latest: {exp_dir} has no run yet ({exp_dir / LATEST} does not exist); "
                "train it first (make train EXP=...)"
            )
        how = f"the latest run of {exp_dir}"
    else:
        path = resolve_latest(spec)
        if not path.is_dir() or path.suffix == ".ckpt":
            return path, "as given"  # a file, or a sharded (FSDP) checkpoint folder
        run = path if (path / CHECKPOINTS).is_dir() else latest_run(path)
        if run is None:
            raise NoCheckpoint(
                f"--ckpt_path {spec}: neither a checkpoint, a run folder nor an experiment folder"
            )
        how = f"run folder {run}" if run == path else f"the latest run of {path}"
    ckpt = checkpoint_in(run, resume)
    if ckpt is None:
        wanted = "last.ckpt" if resume else "best.ckpt or last.ckpt"
        raise NoCheckpoint(f"--ckpt_path {spec}: {run / CHECKPOINTS} holds no {wanted}")
    return ckpt, how
