"""Shared benchmark plumbing: interleaved timing, the RESULTS.md section writer, MLflow logging."""

from __future__ import annotations

import datetime
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# Benchmark results\n\nEvery figure below was measured by the command shown, on the date shown.\n"


def command_line() -> str:
    """The command that is running, as a user would type it."""
    args = sys.argv[1:]
    return "omnilab " + shlex.join(args) if args else "omnilab bench"


def interleaved(fns: dict[str, Callable[[], float | None]], repeats: int) -> dict[str, list[float]]:
    """Run each fn `repeats` times, alternating between them; a fn returns its own time or None (timed here)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            result = fn()
            times[name].append(result if result is not None else time.perf_counter() - start)
    return times


def machine() -> str:
    """A one-line description of where the numbers come from."""
    import os

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of dict rows (floats to 4 significant digits)."""
    cols = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def code_sha() -> str:
    """The commit the benchmark code ran at: HEAD, with `-dirty` when tracked files other than the results
    (RESULTS.md and its plots, which the benchmarks themselves write) differ from it; 'unknown' outside git."""
    root = RESULTS.parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "-uno", "--", ".", ":(exclude)benchmarks/RESULTS.md", ":(exclude)benchmarks/*.png"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty.strip() else "")


def record(
    name: str,
    title: str,
    rows: list[dict[str, Any]],
    notes: str = "",
    metrics: dict[str, float] | None = None,
) -> str:
    """Replace the `name` section of RESULTS.md with these rows (and log the metrics to MLflow).

    The section marker carries the commit it ran at (`code_sha`): tests/test_benchmarks.py checks that it is not
    older than the last commit that touched the benchmark's module.
    """
    sha = code_sha()
    body = (
        f"<!-- bench:{name} sha={sha} -->\n## {title}\n\n"
        f"Measured {datetime.date.today().isoformat()} at commit {sha[:12]} on {machine()} "
        f"with `{command_line()}`.\n\n"
        f"{table(rows)}\n\n{notes.strip()}\n<!-- /bench:{name} -->\n"
    )
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    pattern = re.compile(
        rf"<!-- bench:{re.escape(name)}( sha=\S+)? -->.*?<!-- /bench:{re.escape(name)} -->\n", re.S
    )
    text = pattern.sub(lambda _: body, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + body
    RESULTS.write_text(text)
    if metrics:
        log_mlflow(name, metrics)
    print(body)
    return body


def log_mlflow(name: str, metrics: dict[str, float]) -> None:
    """Log a benchmark's figures as one run of the MLflow experiment `benchmarks`."""
    import mlflow

    from omnilab.tracking import git_sha, tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name=name, tags={"git_sha": git_sha(), "command": command_line()}):
        # MLflow names: alphanumerics, _ - . space : / only
        names = {k: re.sub(r"[^A-Za-z0-9_\-. :/]", "_", k.replace("%", "pct")) for k in metrics}
        mlflow.log_metrics({names[k]: float(v) for k, v in metrics.items()})
