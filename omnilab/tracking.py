"""MLflow tracking: run naming, tags, flattened config params, the config artifact, and `omnilab compare`.

DESIGN.md "Tracking": `sqlite:///mlruns/mlflow.db` unless MLFLOW_TRACKING_URI says otherwise;
experiment = method, run = config name; tags: git sha and config path; params: the flattened resolved
config; artifacts: the resolved YAML.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
EXPERIMENTS_DIR = "experiments"


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the suite's local SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


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
    """Saves the resolved config beside the checkpoints and logs it (artifact + flattened params) to MLflow."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Write `<default_root_dir>/config.yaml` (overwriting) and log it once per run."""
        if self.already_saved:
            return
        if trainer.is_global_zero:
            root = Path(trainer.default_root_dir)
            root.mkdir(parents=True, exist_ok=True)
            path = root / self.config_filename
            self.parser.save(self.config, str(path), skip_none=False, overwrite=True, multifile=False)
            for logger in trainer.loggers:
                if isinstance(logger, MLFlowLogger):
                    config = json.loads(self.parser.dump(self.config, skip_none=False, format="json"))
                    logger.log_hyperparams(flatten_config(config))
                    logger.experiment.log_artifact(logger.run_id, str(path))
        self.already_saved = True


# --------------------------------------------------------------------------- omnilab compare


def compare_runs(
    experiment: str,
    metric: str | None = None,
    out: str | Path | None = None,
    uri: str | None = None,
    max_runs: int = 20,
) -> str:
    """A text table of an experiment's runs (params that differ, final metrics); writes a PNG of curves."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri or tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise SystemExit(f"no MLflow experiment named {experiment!r} (have: {names})")
    runs = client.search_runs(
        [exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=max_runs
    )
    if not runs:
        return f"experiment {experiment!r} has no runs"
    params = sorted({k for r in runs for k in r.data.params})
    differing = [k for k in params if len({r.data.params.get(k) for r in runs}) > 1 and "tags" not in k]
    metrics = sorted({k for r in runs for k in r.data.metrics})
    if metric is not None and metric not in metrics:
        raise SystemExit(f"metric {metric!r} not logged in {experiment!r} (have: {', '.join(metrics)})")
    shown = [metric] if metric else metrics
    header = ["run", "status", *differing, *shown]
    rows = [
        [
            r.info.run_name or r.info.run_id[:8],
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
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(shown), 1, figsize=(7, 2.6 * len(shown)), squeeze=False)
        for ax, m in zip(axes[:, 0], shown):
            for r in runs:
                hist = client.get_metric_history(r.info.run_id, m)
                if hist:
                    ax.plot(
                        [h.step for h in hist],
                        [h.value for h in hist],
                        label=r.info.run_name or r.info.run_id[:8],
                    )
            ax.set_title(m)
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        fig.tight_layout()
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
        plt.close(fig)
        table += f"\ncurves: {out}"
    return table
