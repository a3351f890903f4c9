"""The `omnilab` command: the Lightning CLI (fit | validate | test | predict) and the suite's own commands.

- `omnilab fit --config experiments/_base/default.yaml --config experiments/ccmp/tiny.yaml` trains,
  then tests the best checkpoint (`--test_after_fit false` to skip), logging both to one MLflow run.
- `omnilab data synth <kind>` / `omnilab data convert <dataset>`: write shards.
- `omnilab compare --experiment <method>`: a table of runs and a PNG of their curves.
- `omnilab bench [name ...]`: the benchmark scripts under benchmarks/.
- `omnilab slurm --nodes N --gpus G [--dry-run] -- fit --config ...`: an sbatch script running srun.
- `omnilab serve reward --config ... [--reward NAME]`: a reward served over HTTP (rewards/serving.py).

DESIGN.md "Configs": subclass mode for model and data, omegaconf parser mode, allowlisted class paths,
the resolved config saved (overwriting) and logged, seed 0 unless set, the run named from the
experiment path (experiments/<method>/<name>.yaml -> MLflow experiment <method>, run <name>).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.callbacks import (
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
    RichProgressBar,
)
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks.health import RunHealth
from omnilab.allowlist import guard_imports
from omnilab.tracking import compare_runs, git_sha, run_identity

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def expand_defaults(argv: list[str]) -> list[str]:
    """Insert the fragments an experiment lists under `defaults:` as `--config` before it (recursively).

    lightning-hydra-template's habit: `defaults: [_base/tiny_flow_qwen.yaml]` in an experiment means
    "start from these fragments"; paths are relative to the `experiments/` folder holding the file.
    """
    out: list[str] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        path = path.resolve()
        if path in seen:
            return
        seen.add(path)
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
        fragments = data.get("defaults") if isinstance(data, dict) else None
        if fragments:
            root = next((p for p in path.parents if p.name == "experiments"), path.parent)
            for fragment in fragments:
                target = root / fragment
                if not target.is_file():
                    raise SystemExit(f"{path}: defaults names {fragment!r}, but {target} does not exist")
                add(target)
        out.extend(["--config", str(path)])

    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            add(Path(argv[i + 1]))
            i += 2
        elif arg.startswith("--config="):
            add(Path(arg.split("=", 1)[1]))
            i += 1
        else:
            out.append(arg)
            i += 1
    return out


class OmnilabCLI(LightningCLI):
    """LightningCLI with the suite's defaults: tracking, checkpoint layout, health checks, test after fit."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        from omnilab.tracking import TrackConfig

        super().__init__(
            model_class=L.LightningModule,
            datamodule_class=L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=TrackConfig,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            parser_kwargs={"parser_mode": "omegaconf"},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """The checkpoint and health sections, `--test_after_fit` and `defaults` (see expand_defaults)."""
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {"checkpoint.filename": "best", "checkpoint.save_last": True, "checkpoint.save_top_k": 1}
        )
        parser.add_lightning_class_args(RunHealth, "health")
        parser.add_argument(
            "--test_after_fit", type=bool, default=True, help="Test the best checkpoint after fit."
        )
        parser.add_argument(
            "--defaults",
            type=list[str] | None,
            default=None,
            help="Fragments (under experiments/) this builds on.",
        )

    def before_instantiate_classes(self) -> None:
        """Name the run from the experiment path and place its checkpoints and config under runs/."""
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        method, name, config_path = run_identity(cfg.get("config") or [])
        trainer = cfg.trainer
        if trainer.get("default_root_dir") in (None, ".", os.getcwd()):
            trainer.default_root_dir = str(Path("runs") / method / name)
        if cfg.get("checkpoint") is not None and cfg.checkpoint.get("dirpath") is None:
            cfg.checkpoint.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")
        loggers = trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if getattr(logger, "class_path", "").endswith("MLFlowLogger"):
                init = logger.init_args
                if init.get("experiment_name") in (None, "lightning_logs"):
                    init.experiment_name = method
                if init.get("run_name") is None:
                    init.run_name = name
                init.tags = {
                    **(init.get("tags") or {}),
                    "git_sha": git_sha(),
                    "config": config_path or "",
                    "command": " ".join(["omnilab", *sys.argv[1:]])[:5000],
                }

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> L.Trainer:
        configured = list(config.get("callbacks") or [])
        extra = list(callbacks)
        if config.get("enable_checkpointing") is False:
            extra = [c for c in extra if not isinstance(c, ModelCheckpoint)]
        if config.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ProgressBar) for c in configured
        ):
            extra.append(RichProgressBar(leave=True))
        if config.get("logger") not in (None, False) and not any(
            isinstance(c, LearningRateMonitor) for c in configured
        ):
            extra.append(LearningRateMonitor(logging_interval="step"))
        return super()._instantiate_trainer(config, extra)

    def after_fit(self) -> None:
        """Test the best checkpoint in the same run, when the data has a test split."""
        if not self.config.fit.get("test_after_fit", True):
            return
        has_split = getattr(self.datamodule, "has_split", None)
        if callable(has_split) and not has_split("test"):
            return
        ckpt = self.trainer.checkpoint_callback
        best = "best" if ckpt is not None and getattr(ckpt, "best_model_path", "") else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best, weights_only=True)


# --------------------------------------------------------------------------- the suite's own commands


def _data(argv: list[str]) -> None:
    from datamodules.convert import CONVERTERS, converter
    from datamodules.synth import GENERATORS, synthesize

    parser = argparse.ArgumentParser(prog="omnilab data", description="Write WebDataset shards.")
    sub = parser.add_subparsers(dest="action", required=True)
    synth = sub.add_parser("synth", help="generate the embedded shards of a data kind")
    synth.add_argument("kind", choices=sorted(GENERATORS))
    synth.add_argument("--out", help="output folder (default data/<kind>)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--samples", nargs="*", default=[], metavar="SPLIT=N", help="e.g. train=1024 val=64")
    convert = sub.add_parser("convert", help="convert a real dataset to shards")
    convert.add_argument("dataset", choices=sorted(CONVERTERS))
    sub.add_parser("list", help="list the synth kinds and converters")
    args, rest = parser.parse_known_args(argv)
    if args.action == "list":
        print("synth:", ", ".join(sorted(GENERATORS)))
        print("convert:", ", ".join(sorted(CONVERTERS)))
    elif args.action == "synth":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        samples = {}
        for item in args.samples:
            split, _, count = item.partition("=")
            if not count.isdigit():
                parser.error(f"--samples expects SPLIT=N, got {item!r}")
            samples[split] = int(count)
        index = synthesize(args.kind, args.out or f"data/{args.kind}", samples=samples, seed=args.seed)
        print(f"wrote {index}")
    else:
        module = converter(args.dataset)
        conv = argparse.ArgumentParser(prog=f"omnilab data convert {args.dataset}")
        module.add_arguments(conv)
        print(f"wrote {module.convert(conv.parse_args(rest))}")


def _compare(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="omnilab compare", description="Compare the MLflow runs of a method."
    )
    parser.add_argument("--experiment", required=True, help="MLflow experiment = method name, e.g. ccmp")
    parser.add_argument("--metric", help="one metric to show and plot (default: all)")
    parser.add_argument("--out", help="PNG of the metric curves (default runs/compare/<experiment>.png)")
    parser.add_argument("--max-runs", type=int, default=20)
    args = parser.parse_args(argv)
    out = args.out or f"runs/compare/{args.experiment}.png"
    print(compare_runs(args.experiment, args.metric, out, max_runs=args.max_runs))


def _bench(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="omnilab bench", description="Run benchmark scripts from benchmarks/."
    )
    parser.add_argument("names", nargs="*", help="benchmark module names (default: all)")
    args, rest = parser.parse_known_args(argv)
    from benchmarks import BENCHMARKS

    for name in args.names or list(BENCHMARKS):
        if name not in BENCHMARKS:
            parser.error(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
        print(f"== {name}", flush=True)
        importlib.import_module(f"benchmarks.{name}").main(rest)


def _slurm(argv: list[str]) -> None:
    from omnilab.slurm import sbatch_script, submit

    parser = argparse.ArgumentParser(prog="omnilab slurm", description="Write and submit an sbatch script.")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--partition")
    parser.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    parser.add_argument("lightning_args", nargs=argparse.REMAINDER, help="-- fit --config ...")
    args = parser.parse_args(argv)
    rest = [a for a in args.lightning_args if a != "--"]
    if not rest or rest[0] not in LIGHTNING_COMMANDS:
        parser.error("give the Lightning command after --, e.g. -- fit --config experiments/ccmp/egoexo.yaml")
    configs = [rest[i + 1] for i, a in enumerate(rest[:-1]) if a == "--config"]
    method, name, _ = run_identity(configs)
    job = f"{method}-{name}".replace("/", "-")
    script = sbatch_script(rest, args.nodes, args.gpus, job, hours=args.hours, partition=args.partition)
    print(submit(script, job, dry_run=args.dry_run))


def _serve(argv: list[str]) -> None:
    from rewards.serving import main as serve_main

    serve_main(argv)


COMMANDS = {"data": _data, "compare": _compare, "bench": _bench, "slurm": _slurm, "serve": _serve}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `omnilab` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        COMMANDS[argv[0]](argv[1:])
        return
    guard_imports()
    OmnilabCLI(args=expand_defaults(argv))


if __name__ == "__main__":
    main()
