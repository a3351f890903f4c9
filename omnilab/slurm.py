"""`make train EXP=... CLUSTER=slurm NODES=.. GPUS=..`: write an sbatch script running `srun omnilab fit ...`.

DESIGN.md "Running at scale": Lightning's SLURMEnvironment picks up the srun task layout, so the
script only has to launch one task per GPU with matching `trainer.num_nodes` / `trainer.devices`.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
from pathlib import Path


def sbatch_script(
    lightning_args: list[str],
    nodes: int,
    gpus: int,
    job_name: str,
    hours: float = 24.0,
    cpus_per_task: int = 8,
    partition: str | None = None,
    log_dir: str = "runs/slurm",
) -> str:
    """The text of an sbatch script that runs `srun omnilab <lightning_args>` on nodes x gpus tasks."""
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
