"""MLflow tracking: run naming, tags, flattened config params, the config artifact, and `omnilab compare`.

README "Results and tracking": `sqlite:///mlruns/mlflow.db` unless MLFLOW_TRACKING_URI says otherwise;
experiment = method, run = config name; tags: git sha and config path; params: the flattened resolved
config; artifacts: the resolved YAML.

Reliability: a local store is created under a file lock (two fits started at once on a new store would
otherwise race to create its tables) and a store that cannot be opened is a plain error naming it
(`open_store`). A checkpoint carries its MLflow run id (`TrackConfig.on_save_checkpoint`), so a resumed fit
continues the same run (`checkpoint_run_id`); a run left RUNNING by a process that died (kill -9) on this
host is marked KILLED when the next fit of the same experiment and name starts (`settle_killed_runs`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
EXPERIMENTS_DIR = "experiments"
PROCESS_TAG, RESUMES_TAG = "omnilab.process", "omnilab.resumes"  # process: "<pid>@<host>" (never a number)
CHECKPOINT_KEY = "mlflow"  # checkpoint["mlflow"] = {"run_id", "tracking_uri"}
COMMAND_TAG = "omnilab.command"  # fit | validate | test | predict (compare shows fits only)
EVALUATES_TAG = "omnilab.evaluates"  # an eval / predict run: the run folder (id) of the fit it evaluates


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the suite's local SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` tracking URI (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :])


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """An exclusive file lock beside a local store's database (`<db>.lock`); a no-op for remote stores."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    import fcntl

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class StoreError(SystemExit):
    """The MLflow store cannot be opened (the message names it)."""


def open_store(uri: str) -> Any:
    """An MlflowClient on `uri`, the store created (under `store_lock`) if new; StoreError naming it if not."""
    from mlflow.tracking import MlflowClient

    try:
        with store_lock(uri):
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)  # creates a new local store's tables, or fails here
    except Exception as err:
        raise StoreError(f"cannot open the MLflow store at {uri}: {type(err).__name__}: {err}") from None
    return client


def checkpoint_run_id(ckpt_path: str | os.PathLike, uri: str) -> str | None:
    """The MLflow run id a checkpoint was written under, when it was tracked in the store at `uri`."""
    import torch

    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    saved = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(saved, dict) or saved.get("tracking_uri") != uri:
        return None
    return saved.get("run_id")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def settle_killed_runs(client: Any, experiment: str, run_name: str, keep: str | None = None) -> list[str]:
    """Mark KILLED the RUNNING runs of `experiment`/`run_name` started on this host by a process that is gone.

    `keep` (a run being resumed) is left running. Runs from other hosts cannot be judged and are left as they
    are. Returns the ids marked.
    """
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`mlflow.runName` = '{run_name}'",
    )
    killed = []
    for run in runs:
        pid, _, host = run.data.tags.get(PROCESS_TAG, "").partition("@")
        if run.info.run_id == keep or host != socket.gethostname() or not pid.isdigit():
            continue
        if not _alive(int(pid)):
            client.set_terminated(run.info.run_id, "KILLED")
            killed.append(run.info.run_id)
    return killed


def process_tags() -> dict[str, str]:
    """The tag that lets a later fit tell whether a RUNNING run's process is still alive."""
    return {PROCESS_TAG: f"{os.getpid()}@{socket.gethostname()}"}


def continue_run(client: Any, run_id: str) -> None:
    """Take over a run being resumed: RUNNING again, owned by this process, its resumes counted."""
    run = client.get_run(run_id)
    resumes = int(run.data.tags.get(RESUMES_TAG, "0") or 0) + 1
    client.update_run(run_id, status="RUNNING")
    for key, value in {**process_tags(), RESUMES_TAG: str(resumes)}.items():
        client.set_tag(run_id, key, value)


def start_run(
    client: Any, experiment: str, run_name: str, tags: Mapping[str, Any], artifact_location: str | None = None
) -> str:
    """Create the MLflow run of a fit now (the experiment too, if new) and return its id, which names the run
    folder; MLFlowLogger then logs to it (`run_id`) as to a run it had created itself."""
    from lightning.pytorch.loggers.mlflow import _get_resolve_tags
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    exp = client.get_experiment_by_name(experiment)
    if exp is not None and exp.lifecycle_stage != "deleted":
        experiment_id = exp.experiment_id
    else:
        experiment_id = client.create_experiment(experiment, artifact_location=artifact_location)
    tags = _get_resolve_tags()({**{k: str(v) for k, v in tags.items()}, MLFLOW_RUN_NAME: run_name})
    return client.create_run(experiment_id, tags=tags).info.run_id


def run_identity(config_paths: Iterable[str | os.PathLike]) -> tuple[str, str, str | None]:
    """(method, run name, config path) from the last config under experiments/<method>/ (not _base)."""
    for path in reversed([Path(str(p)) for p in config_paths]):
        parts = path.with_suffix("").parts
        if EXPERIMENTS_DIR in parts:
            rel = parts[len(parts) - 1 - parts[::-1].index(EXPERIMENTS_DIR) + 1 :]
            if len(rel) >= 2 and not rel[0].startswith("_"):
                return rel[0], "/".join(rel[1:]), str(path)
    return "default", "run", None


def git_sha() -> str:
    """The checkout's commit sha, with `-dirty` when it has uncommitted changes ('unknown' outside git)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "-uno"], capture_output=True, text=True
        ).stdout
        return sha + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested config to `a/b/c: value` strings, dropping the `init_args` level."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if key == "init_args":
            name = prefix.rstrip("/")
        else:
            name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_config(value, f"{name}/" if name else ""))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for i, item in enumerate(value):
                out.update(flatten_config(item, f"{name}/{i}/"))
        else:
            out[name] = str(value)
    return out


class TrackConfig(SaveConfigCallback):
    """Saves the resolved config beside the checkpoints and logs it (artifact + flattened params) to MLflow;
    writes the MLflow run id into every checkpoint, so that a resumed fit continues the run."""

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """checkpoint["mlflow"] = {run_id, tracking_uri} of the run this fit logs to."""
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger) and getattr(logger, "_run_id", None):
                checkpoint[CHECKPOINT_KEY] = {"run_id": logger._run_id, "tracking_uri": logger._tracking_uri}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Take rank 0's run folder on every process; write `<default_root_dir>/<config_filename>` and log it."""
        if self.already_saved:
            return
        # processes started by another launcher (srun, torchrun) could not know the folder rank 0 chose
        trainer._default_root_dir = trainer.strategy.broadcast(trainer.default_root_dir)
        if trainer.is_global_zero:
            root = Path(trainer.default_root_dir)
            root.mkdir(parents=True, exist_ok=True)
            path = root / self.config_filename
            self.parser.save(self.config, str(path), skip_none=False, overwrite=True, multifile=False)
            for logger in trainer.loggers:
                if isinstance(logger, MLFlowLogger):
                    config = json.loads(self.parser.dump(self.config, skip_none=False, format="json"))
                    params = flatten_config(config)
                    # a resumed run has its params already; MLflow refuses to change one, so new values
                    # (e.g. ckpt_path, a longer max_steps) are kept as `resumed/<key>` tags
                    logged = logger.experiment.get_run(logger.run_id).data.params
                    changed = {k: v for k, v in params.items() if k in logged and logged[k] != v[:250]}
                    logger.log_hyperparams({k: v for k, v in params.items() if k not in changed})
                    for key, value in changed.items():
                        logger.experiment.set_tag(logger.run_id, f"resumed/{key}", value[:5000])
                    logger.experiment.log_artifact(logger.run_id, str(path))
        self.already_saved = True


# --------------------------------------------------------------------------- omnilab compare


NOISE_PARAMS = re.compile(
    r"(^|/)(tags|run_id|ckpt_path|tracking_uri|default_root_dir|dirpath|save_dir|artifact_location|"
    r"data_dir|cache_dir|log_model)(/|$)"
)  # params that differ between runs without making them different experiments


def compared_runs(client: Any, experiment_id: str, max_runs: int = 20) -> list[Any]:
    """An experiment's fits, newest first: eval and predict runs (which evaluate a fit) are left out."""
    runs = client.search_runs(
        [experiment_id], order_by=["attributes.start_time DESC"], max_results=max_runs * 4
    )
    kept = [
        r
        for r in runs
        if EVALUATES_TAG not in r.data.tags and r.data.tags.get(COMMAND_TAG, "fit") in ("fit", "test")
    ]
    return kept[:max_runs]


def short_names(keys: list[str], among: Iterable[str] | None = None) -> dict[str, str]:
    """Each flattened param name (`model/backbone/config/num_layers`) by its shortest suffix that no other name
    of `among` (default: `keys`) ends with."""
    among = list(keys if among is None else among)
    out = {}
    for key in keys:
        parts = key.split("/")
        for n in range(1, len(parts) + 1):
            suffix = "/".join(parts[-n:])
            if sum(k == suffix or k.endswith("/" + suffix) for k in among) == 1:
                out[key] = suffix
                break
        else:
            out[key] = key
    return out


def run_label(run: Any, differing: list[str], names: Mapping[str, str], max_len: int = 60) -> str:
    """`name·abcd1234 (lr=0.1, steps=10)`: the run name, its short id and the params that tell it apart."""
    label = f"{run.info.run_name or 'run'}·{run.info.run_id[:8]}"
    params = ", ".join(f"{names[k]}={run.data.params.get(k, '-')}" for k in differing)
    if params:
        label += f" ({params[:max_len]}{'…' if len(params) > max_len else ''})"
    return label


def compare_runs(
    experiment: str,
    metric: str | None = None,
    out: str | Path | None = None,
    uri: str | None = None,
    max_runs: int = 20,
) -> str:
    """A text table of an experiment's fits (the params that differ, final metrics) and a PNG of the curves.

    Eval and predict runs and params that always differ (paths, run ids, tags: NOISE_PARAMS) are left out;
    a param is named by its shortest unique suffix; each run is `name·short id (differing params)`. The PNG
    has one panel per metric (x: optimizer step, y: the metric as logged), markers on every point (a run
    with one point shows), and one legend.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri or tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise SystemExit(f"no MLflow experiment named {experiment!r} (have: {names})")
    runs = compared_runs(client, exp.experiment_id, max_runs)
    if not runs:
        return f"experiment {experiment!r} has no fits"
    params = sorted({k for r in runs for k in r.data.params})
    differing = [
        k for k in params if len({r.data.params.get(k) for r in runs}) > 1 and not NOISE_PARAMS.search(k)
    ]
    names = short_names(differing, params)
    metrics = sorted({k for r in runs for k in r.data.metrics})
    if metric is not None and metric not in metrics:
        raise SystemExit(f"metric {metric!r} not logged in {experiment!r} (have: {', '.join(metrics)})")
    shown = [metric] if metric else metrics
    header = ["run", "id", "status", *[names[k] for k in differing], *shown]
    rows = [
        [
            r.info.run_name or "run",
            r.info.run_id[:8],
            r.info.status,
            *[r.data.params.get(k, "") for k in differing],
            *[f"{r.data.metrics[m]:.4g}" if m in r.data.metrics else "" for m in shown],
        ]
        for r in runs
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in [header, *rows]]
    table = "\n".join(lines)
    if out is not None and shown:
        plot_runs(client, runs, shown, [run_label(r, differing, names) for r in runs], experiment, out)
        table += f"\ncurves: {out}"
    return table


def plot_runs(
    client: Any, runs: list[Any], metrics: list[str], labels: list[str], title: str, out: str | Path
) -> Path:
    """A figure of each metric's history per run (markers, axis labels, one legend below), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cols = min(len(metrics), 2)
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False)
    handles: dict[str, Any] = {}
    for ax, m in zip(axes.flat, metrics):
        for i, (r, label) in enumerate(zip(runs, labels)):
            hist = sorted(client.get_metric_history(r.info.run_id, m), key=lambda h: h.step)
            if hist:
                (line,) = ax.plot(
                    [h.step for h in hist], [h.value for h in hist], marker="o", markersize=3.5,
                    linewidth=1.4, color=f"C{i % 10}", label=label,
                )  # fmt: skip
                handles.setdefault(label, line)
        ax.set_title(m, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"{m.rsplit('/', 1)[-1]} (as logged)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.set_visible(False)
    fig.suptitle(f"MLflow experiment {title}", fontsize=11)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=1, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.035 * len(handles), 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=200)
    plt.close(fig)
    return out
