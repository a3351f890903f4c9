"""The `omnilab` command: the Lightning CLI (fit | validate | test | predict) and the suite's own commands.

- `omnilab fit --config experiments/_base/default.yaml --config experiments/ccmp/tiny.yaml` trains,
  then tests the best checkpoint (`--test_after_fit false` to skip), logging both to one MLflow run.
- `omnilab data synth <kind>` / `omnilab data convert <dataset>`: write shards; `omnilab data curate <step>`:
  a curation step over shards (datamodules/curate).
- `omnilab compare --experiment <method>`: a table of runs and a PNG of their curves.
- `omnilab bench [name ...]`: the benchmark scripts under benchmarks/.
- `omnilab slurm --nodes N --gpus G [--dry-run] -- fit --config ...`: an sbatch script running srun.
- `omnilab serve reward --config ... [--reward NAME]`: a reward served over HTTP (rewards/serving.py).

README "Running an experiment": subclass mode for model and data, omegaconf parser mode, allowlisted class paths,
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
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.rank_zero import _get_rank
from lightning.pytorch.callbacks import (
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
    RichProgressBar,
)
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks.checkpoint import AtomicCheckpointIO, RunCheckpoint, check_writable
from callbacks.health import RunHealth
from omnilab.allowlist import RefusedImport, check_config, check_import_path, guard_imports, safe_resolvers
from omnilab.tracking import (
    checkpoint_run_id,
    compare_runs,
    continue_run,
    git_sha,
    open_store,
    process_tags,
    run_identity,
    settle_killed_runs,
)

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
CKPT_KEYWORDS = ("last", "best", "hpc", "registry")  # --ckpt_path values Lightning resolves itself


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

        guard_imports()
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
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.filename": "best",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.enable_version_counter": False,  # best.ckpt / last.ckpt are replaced, atomically
            }
        )
        parser.add_lightning_class_args(RunHealth, "health")
        parser.add_argument(
            "--test_after_fit", type=bool, default=True, help="Test the best checkpoint after fit."
        )
        parser.add_argument(
            "--paper_global_batch",
            type=int | None,
            default=None,
            help="The paper's global batch (checked against nodes x devices x batch x accumulation).",
        )
        parser.add_argument(
            "--defaults",
            type=list[str] | None,
            default=None,
            help="Fragments (under experiments/) this builds on.",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse with only omegaconf's own resolvers available to `${...}` (allowlist.safe_resolvers)."""
        with safe_resolvers():
            super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces the model config by a `--ckpt_path` checkpoint's hyperparameters; a test-only model
        (a benchmark runner, `test_only = True`) keeps its own config and reads the checkpoint itself."""
        cfg = self.config.get(self.config.get("subcommand") or "", self.config)
        model = cfg.get("model") if hasattr(cfg, "get") else None
        class_path = model.get("class_path") if hasattr(model, "get") else None
        if isinstance(class_path, str) and "." in class_path:
            try:
                model_class = check_import_path(class_path)
            except RefusedImport as err:
                self.parser.error(str(err))
            if getattr(model_class, "test_only", False):
                return
        with safe_resolvers():  # a checkpoint's hyperparameters are parsed as a config too
            super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        """Before any work: check every class_path, the checkpoint to load, the folders to write, the MLflow
        store; name the run, place its checkpoints and config under runs/, continue a resumed run."""
        try:
            check_config(self.config)
        except RefusedImport as err:
            self.parser.error(str(err))
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        method, name, config_path = run_identity(cfg.get("config") or [])
        trainer = cfg.trainer
        if trainer.get("default_root_dir") in (None, ".", os.getcwd()):
            trainer.default_root_dir = str(Path("runs") / method / name)
        if cfg.get("checkpoint") is not None and cfg.checkpoint.get("dirpath") is None:
            cfg.checkpoint.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")
        ckpt_path = cfg.get("ckpt_path")
        keyword = str(ckpt_path).split(":", 1)[0] in CKPT_KEYWORDS  # "last", "registry:<model>", ...
        local_ckpt = ckpt_path and not keyword and "://" not in str(ckpt_path)
        if local_ckpt and not Path(ckpt_path).is_file():
            self.parser.error(f"--ckpt_path {ckpt_path}: no such checkpoint file; nothing was started")
        checkpoints = self.subcommand in (None, "fit") and cfg.get("checkpoint") is not None
        try:
            check_writable(trainer.default_root_dir, "run folder (trainer.default_root_dir)")
            if checkpoints and trainer.get("enable_checkpointing") is not False:
                check_writable(cfg.checkpoint.dirpath, "checkpoint folder (checkpoint.dirpath)")
        except OSError as err:
            self.parser.error(f"{err}; nothing was started")
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
                    **process_tags(),
                }
                if (_get_rank() or 0) == 0:
                    self._track(init, ckpt_path if self.subcommand in (None, "fit") else None)

    @staticmethod
    def _track(init: Any, ckpt_path: str | None) -> None:
        """Open the MLflow store (plain error if it cannot be), continue a resumed fit's run, mark dead runs KILLED."""
        # as MLFlowLogger resolves it: the argument, else $MLFLOW_TRACKING_URI, else a file store in save_dir
        uri = init.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
        uri = uri or f"file:{init.get('save_dir') or './mlruns'}"
        client = open_store(uri)
        run_id = init.get("run_id")
        if run_id is None and ckpt_path and Path(ckpt_path).is_file():
            run_id = checkpoint_run_id(ckpt_path, uri)
            if run_id is not None:
                from mlflow.exceptions import MlflowException

                try:
                    continue_run(client, run_id)
                    init.run_id = run_id
                except MlflowException:  # the run was deleted from the store: a new run, then
                    run_id = None
        settle_killed_runs(client, init.experiment_name, init.run_name, keep=run_id)

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
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = [*plugins, AtomicCheckpointIO()]  # checkpoints written atomically
        return super()._instantiate_trainer(config, extra)

    def before_fit(self) -> None:
        """Warn when the run's global batch differs from the experiment's `paper_global_batch`."""
        from lightning.pytorch.utilities import rank_zero_warn

        from omnilab.slurm import GlobalBatch

        paper = self.config.fit.get("paper_global_batch")
        size = getattr(self.datamodule, "batch_size", None)
        if paper is None or not isinstance(size, int):
            return
        trainer = self.trainer
        batch = GlobalBatch(
            trainer.num_nodes, trainer.num_devices, size, trainer.accumulate_grad_batches, paper
        )
        if (warning := batch.warning()) is not None:
            rank_zero_warn(warning)

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
    from datamodules.curate import STEPS, step
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
    curate = sub.add_parser("curate", help="a curation step (collect, filter, compose, dere) over shards")
    curate.add_argument("step", choices=sorted(STEPS))
    sub.add_parser("list", help="list the synth kinds and converters")
    args, rest = parser.parse_known_args(argv)
    if args.action == "list":
        print("synth:", ", ".join(sorted(GENERATORS)))
        print("convert:", ", ".join(sorted(CONVERTERS)))
        print("curate:", ", ".join(sorted(STEPS)))
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
    elif args.action == "curate":
        module = step(args.step)
        parser_step = argparse.ArgumentParser(prog=f"omnilab data curate {args.step}")
        module.add_arguments(parser_step)
        print(f"wrote {module.run(parser_step.parse_args(rest))}")
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
    from benchmarks import BENCHMARKS, NEEDS_CUDA

    names = args.names
    if not names:
        import torch

        cuda = torch.cuda.is_available()
        names = [n for n in BENCHMARKS if cuda or n not in NEEDS_CUDA]
        if not cuda:
            print(f"skipped without CUDA: {', '.join(sorted(NEEDS_CUDA))}", flush=True)
    for name in names:
        if name not in BENCHMARKS:
            parser.error(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
        print(f"== {name}", flush=True)
        importlib.import_module(f"benchmarks.{name}").main(rest)


def _slurm(argv: list[str]) -> None:
    from omnilab.slurm import global_batch, sbatch_script, submit

    parser = argparse.ArgumentParser(prog="omnilab slurm", description="Write and submit an sbatch script.")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--mem", help="memory per node, as sbatch takes it (e.g. 480G; 0 = all)")
    parser.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    parser.add_argument("lightning_args", nargs=argparse.REMAINDER, help="-- fit --config ...")
    args = parser.parse_args(argv)
    rest = [a for a in args.lightning_args if a != "--"]
    if not rest or rest[0] not in LIGHTNING_COMMANDS:
        parser.error("give the Lightning command after --, e.g. -- fit --config experiments/ccmp/egoexo.yaml")
    configs = [rest[i + 1] for i, a in enumerate(rest[:-1]) if a == "--config"]
    method, name, _ = run_identity(configs)
    job = f"{method}-{name}".replace("/", "-")
    batch = global_batch(rest, args.nodes, args.gpus)
    print(batch.warning() or batch.describe(), file=sys.stderr)
    script = sbatch_script(
        rest, args.nodes, args.gpus, job, hours=args.hours, partition=args.partition,
        account=args.account, mem=args.mem, batch=batch,
    )  # fmt: skip
    print(submit(script, job, dry_run=args.dry_run))


def _serve(argv: list[str]) -> None:
    from rewards.serving import main as serve_main

    serve_main(argv)


COMMANDS = {"data": _data, "compare": _compare, "bench": _bench, "slurm": _slurm, "serve": _serve}


def _export(argv: list[str]) -> None:
    from omnilab.export import main as export_main

    export_main(argv)


COMMANDS["export"] = _export


def _data_or_cache(argv: list[str]) -> None:
    """`omnilab data cache ...` (datamodules/cache.py), else the `data` command."""
    if argv and argv[0] == "cache":
        from datamodules.cache import main as cache_main

        cache_main(argv[1:])
    else:
        _data(argv)


COMMANDS["data"] = _data_or_cache


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
