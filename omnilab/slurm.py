"""`make train EXP=... CLUSTER=slurm NODES=.. GPUS=..`: write an sbatch script running `srun omnilab fit ...`.

Lightning's SLURMEnvironment picks up the srun task layout, so the script only has to launch one task per GPU
with matching `trainer.num_nodes` / `trainer.devices`. Partition, account and memory per node come from the
Makefile (`PARTITION=`, `ACCOUNT=`, `MEM=`). The script prints the effective global batch (nodes x GPUs per
node x `data.init_args.batch_size` x `trainer.accumulate_grad_batches`); an experiment states the paper's as
the top-level `paper_global_batch`, and `omnilab slurm` (and `omnilab fit`) warn when the two differ.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class GlobalBatch:
    """The effective global batch of a launch and the paper's (None when the experiment states none)."""

    nodes: int
    devices: int
    batch_size: int
    accumulation: int
    paper: int | None

    @property
    def effective(self) -> int:
        """nodes x devices x batch per device x gradient accumulation."""
        return self.nodes * self.devices * self.batch_size * self.accumulation

    def describe(self) -> str:
        """`effective global batch: 4 nodes x 8 GPUs x 1 x 2 = 64 (paper: 64)`."""
        paper = (
            f" (paper: {self.paper})" if self.paper is not None else " (the experiment states no paper batch)"
        )
        return (
            f"effective global batch: {self.nodes} nodes x {self.devices} devices x batch {self.batch_size} x "
            f"accumulation {self.accumulation} = {self.effective}{paper}"
        )

    def warning(self) -> str | None:
        """A warning when the effective global batch differs from the paper's, else None."""
        if self.paper is None or self.paper == self.effective:
            return None
        return (
            f"WARNING: the {self.describe()}; the paper's global batch is {self.paper}. Change NODES/GPUS, "
            "data.init_args.batch_size or trainer.accumulate_grad_batches to match it."
        )


def global_batch(lightning_args: list[str], nodes: int, devices: int) -> GlobalBatch:
    """The global batch of `omnilab <lightning_args>` on nodes x devices: the configs (in order) and the
    `--data.init_args.batch_size=` / `--trainer.accumulate_grad_batches=` / `--paper_global_batch=` overrides."""
    from omnilab.cli import expand_defaults

    args = expand_defaults(list(lightning_args))
    found: dict[str, Any] = {"batch_size": 1, "accumulation": 1, "paper": None}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" and i + 1 < len(args):
            path = Path(
                args[i + 1]
            )  # (a path relative to another folder than this one is read by the job only)
            doc = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
            data = ((doc.get("data") or {}).get("init_args")) or {}
            found["batch_size"] = data.get("batch_size", found["batch_size"])
            found["accumulation"] = (doc.get("trainer") or {}).get(
                "accumulate_grad_batches", found["accumulation"]
            )
            found["paper"] = doc.get("paper_global_batch", found["paper"])
            i += 2
            continue
        key, _, value = arg.partition("=")
        name = {
            "--data.init_args.batch_size": "batch_size",
            "--data.batch_size": "batch_size",
            "--trainer.accumulate_grad_batches": "accumulation",
            "--paper_global_batch": "paper",
        }.get(key)
        if name is not None and value:
            found[name] = yaml.safe_load(value)
        i += 1
    return GlobalBatch(nodes, devices, int(found["batch_size"]), int(found["accumulation"]), found["paper"])


def sbatch_script(
    lightning_args: list[str],
    nodes: int,
    gpus: int,
    job_name: str,
    hours: float = 24.0,
    cpus_per_task: int = 8,
    partition: str | None = None,
    log_dir: str = "runs/slurm",
    account: str | None = None,
    mem: str | None = None,
    batch: GlobalBatch | None = None,
) -> str:
    """The text of an sbatch script that runs `srun omnilab <lightning_args>` on nodes x gpus tasks.

    `partition`, `account` and `mem` (memory per node, e.g. "480G"; "0" = all of it) become #SBATCH lines;
    `batch` adds a line that prints the effective global batch (and the paper's) to the job log.
    """
    if nodes < 1 or gpus < 1:
        raise ValueError(f"NODES={nodes} and GPUS={gpus} must both be at least 1")
    minutes = round(hours * 60)
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={gpus}",
        f"#SBATCH --gpus-per-node={gpus}",
        f"#SBATCH --cpus-per-task={cpus_per_task}",
        f"#SBATCH --time={minutes // 60:02d}:{minutes % 60:02d}:00",
        f"#SBATCH --output={log_dir}/%x-%j.out",
        "#SBATCH --signal=SIGUSR1@120",  # Lightning's SLURM requeue: checkpoint before the time limit
        "#SBATCH --requeue",
    ]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if account:
        lines.append(f"#SBATCH --account={account}")
    if mem:
        lines.append(f"#SBATCH --mem={mem}")
    command = [
        "srun",
        "omnilab",
        *lightning_args,
        f"--trainer.num_nodes={nodes}",
        f"--trainer.devices={gpus}",
    ]
    lines += [
        "",
        "set -euo pipefail",
        'cd "$SLURM_SUBMIT_DIR"',
        "source .venv/bin/activate",
        "export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK",
        *([shlex.join(["echo", batch.describe()])] if batch is not None else []),
        shlex.join(command),
        "",
    ]
    return "\n".join(lines)


def submit(script: str, job_name: str, dry_run: bool = False, log_dir: str = "runs/slurm") -> str:
    """Print the script (dry run) or write it under `log_dir` and submit it with sbatch; return what happened."""
    if dry_run:
        return script
    if shutil.which("sbatch") is None:
        raise SystemExit("sbatch not found on this machine; DRY=1 prints the script instead")
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    path = Path(log_dir) / f"{job_name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.write_text(script)
    result = subprocess.run(["sbatch", str(path)], capture_output=True, text=True, check=True)
    return f"{path}: {result.stdout.strip()}"
