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
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from jsonargparse import DefaultHelpFormatter
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.rank_zero import _get_rank
from lightning.pytorch.callbacks import (
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
)
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import MLFlowLogger

from callbacks.checkpoint import AtomicCheckpointIO, RunCheckpoint, check_writable
from callbacks.final_validation import FinalValidation
from callbacks.health import RunHealth
from callbacks.progress import RunProgressBar
from omnilab.allowlist import RefusedImport, check_config, check_import_path, guard_imports, safe_resolvers
from omnilab.configs import merging_dicts
from omnilab.runs import (
    CHECKPOINTS,
    RUN_DIR_ENV,
    NoCheckpoint,
    experiment_dir,
    find_checkpoint,
    latest_run,
    run_of_checkpoint,
    set_latest,
    timestamp_id,
)
from omnilab.tracking import (
    COMMAND_TAG,
    EVALUATES_TAG,
    checkpoint_run_id,
    compare_runs,
    continue_run,
    git_sha,
    open_store,
    process_tags,
    run_identity,
    settle_killed_runs,
    start_run,
)

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
CKPT_KEYWORDS = ("last", "best", "hpc", "registry")  # --ckpt_path values Lightning resolves itself


def expand_defaults(argv: list[str]) -> list[str]:
    """Insert the fragments an experiment lists under `defaults:` as `--config` before it (recursively).

    `-c` is `--config` (both spellings, `--config=path` too); every config comes out as `--config path`.

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
        if arg in ("--config", "-c") and i + 1 < len(argv):
            add(Path(argv[i + 1]))
            i += 2
        elif arg.startswith(("--config=", "-c=")):
            add(Path(arg.split("=", 1)[1]))
            i += 1
        else:
            out.append(arg)
            i += 1
    return out


class SuiteHelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, with the description's lines (the suite's commands) kept as written."""


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
            parser_kwargs={
                "parser_mode": "omegaconf",
                "prog": "omnilab",
                "description": suite_help(),
                "formatter_class": SuiteHelpFormatter,
            },
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
        """Parse with only omegaconf's own resolvers available to `${...}` (allowlist.safe_resolvers), dict-valued
        arguments merging key by key at any depth (omnilab/configs.py)."""
        with safe_resolvers(), merging_dicts():
            super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Resolve `--ckpt_path latest` / a run folder to its checkpoint file and say which one is used; then
        Lightning replaces the model config by the checkpoint's hyperparameters, except for a test-only model
        (a benchmark runner, `test_only = True`), which keeps its own config and reads the checkpoint itself."""
        subcommand = self.config.get("subcommand")
        cfg = self.config.get(subcommand or "", self.config)
        self._resolve_ckpt_path(cfg, subcommand or "fit")
        model = cfg.get("model") if hasattr(cfg, "get") else None
        class_path = model.get("class_path") if hasattr(model, "get") else None
        self._test_only = False
        if isinstance(class_path, str) and "." in class_path:
            try:
                model_class = check_import_path(class_path)
            except RefusedImport as err:
                self.parser.error(str(err))
            if getattr(model_class, "test_only", False):
                self._test_only = True
                return
        with safe_resolvers():  # a checkpoint's hyperparameters are parsed as a config too
            super()._parse_ckpt_path()

    def _resolve_ckpt_path(self, cfg: Any, subcommand: str) -> None:
        """`latest`, a run folder or an experiment folder -> the checkpoint file (`last.ckpt` to resume a fit,
        `best.ckpt`, else `last.ckpt`, to evaluate); print the checkpoint a command uses (omnilab/runs.py)."""
        ckpt_path = cfg.get("ckpt_path") if hasattr(cfg, "get") else None
        if not ckpt_path or str(ckpt_path).split(":", 1)[0] in CKPT_KEYWORDS or "://" in str(ckpt_path):
            return
        method, name, _ = run_identity(cfg.get("config") or [])
        try:
            path, how = find_checkpoint(
                str(ckpt_path), experiment_dir(method, name), resume=subcommand == "fit"
            )
        except NoCheckpoint as err:
            self.parser.error(f"{err}; nothing was started")
        cfg.ckpt_path = str(path)
        if (_get_rank() or 0) == 0:
            verb = "resumes from" if subcommand == "fit" else "uses"
            print(f"omnilab {subcommand} {verb} checkpoint {path} ({how})", flush=True)

    def before_instantiate_classes(self) -> None:
        """Before any work: check every class_path, the checkpoint to load, the folders to write, the MLflow
        store; name the run, give it its run folder (omnilab/runs.py) and continue a resumed run."""
        try:
            check_config(self.config)
        except RefusedImport as err:
            self.parser.error(str(err))
        subcommand = self.subcommand or "fit"
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        method, name, config_path = run_identity(cfg.get("config") or [])
        trainer = cfg.trainer
        ckpt_path = cfg.get("ckpt_path")
        keyword = str(ckpt_path).split(":", 1)[0] in CKPT_KEYWORDS  # "last", "registry:<model>", ...
        local_ckpt = ckpt_path and not keyword and "://" not in str(ckpt_path)
        if local_ckpt and not Path(ckpt_path).exists():
            self.parser.error(f"--ckpt_path {ckpt_path}: no such checkpoint file; nothing was started")
        rank = _get_rank() or 0
        fast = bool(trainer.get("fast_dev_run"))
        exp_dir = experiment_dir(method, name)
        # where this command writes: a folder of its own (a new fit, a benchmark), the run it resumes or evaluates
        run_dir, new_run = None, False
        chosen = trainer.get("default_root_dir") not in (None, ".", os.getcwd())
        if chosen:
            run_dir = Path(trainer.default_root_dir)  # chosen by the user
        elif rank > 0:  # the folder rank 0 chose: inherited when it launched us, else broadcast at setup
            run_dir = Path(os.environ.get(RUN_DIR_ENV) or exp_dir)
        elif fast:
            run_dir = exp_dir / "fast_dev_run"  # a smoke test: no run folder, no checkpoint, no MLflow run
        elif local_ckpt and not self._test_only and run_of_checkpoint(ckpt_path) is not None:
            run_dir = run_of_checkpoint(ckpt_path)  # a resumed fit continues it; eval/predict write into it
        else:
            new_run = True
        ckpt_dir = cfg.checkpoint.get("dirpath") if cfg.get("checkpoint") is not None else None
        checkpoints = subcommand == "fit" and cfg.get("checkpoint") is not None and not fast
        checkpoints = checkpoints and trainer.get("enable_checkpointing") is not False
        try:  # before any work, the MLflow run included
            check_writable(exp_dir if new_run else run_dir, "run folder (trainer.default_root_dir)")
            if checkpoints and ckpt_dir is not None:
                check_writable(ckpt_dir, "checkpoint folder (checkpoint.dirpath)")
        except OSError as err:
            self.parser.error(f"{err}; nothing was started")
        mlflow_run = None
        loggers = trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if getattr(logger, "class_path", "").endswith("MLFlowLogger"):
                init = logger.init_args
                if init.get("experiment_name") in (None, "lightning_logs"):
                    init.experiment_name = method
                if init.get("run_name") is None:
                    init.run_name = name
                evaluates = run_dir.name if run_dir is not None and subcommand != "fit" else None
                init.tags = {
                    **(init.get("tags") or {}),
                    "git_sha": git_sha(),
                    "config": config_path or "",
                    "command": " ".join(["omnilab", *sys.argv[1:]])[:5000],
                    COMMAND_TAG: subcommand,
                    **({EVALUATES_TAG: evaluates} if evaluates else {}),
                    **process_tags(),
                }
                if rank == 0 and not fast:
                    resume = ckpt_path if subcommand == "fit" and local_ckpt else None
                    mlflow_run = self._track(init, resume, start=new_run and mlflow_run is None)
        if new_run:
            run_dir = exp_dir / (mlflow_run or timestamp_id(exp_dir))
            run_dir.mkdir(parents=True, exist_ok=True)
        trainer.default_root_dir = str(run_dir)
        if cfg.get("checkpoint") is not None and ckpt_dir is None:
            cfg.checkpoint.dirpath = str(run_dir / CHECKPOINTS)
        if rank == 0:
            os.environ[RUN_DIR_ENV] = str(run_dir)  # for the processes a DDP launch starts
            if not (fast or chosen) and (subcommand == "fit" or (new_run and self._test_only)):
                set_latest(run_dir)  # the newest fit (or benchmark run) of the experiment
        self.save_config_kwargs["config_filename"] = (
            "config.yaml" if subcommand == "fit" else f"{subcommand}_config.yaml"
        )  # eval / predict never overwrite the config of the run they evaluate
        self.run_dir, self._started = run_dir, time.time()

    @staticmethod
    def _track(init: Any, ckpt_path: str | None, start: bool) -> str | None:
        """Open the MLflow store (plain error if it cannot be), continue a resumed fit's run, mark dead runs
        KILLED, start the run now when `start` (its id names the run folder); returns the run id."""
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
        if run_id is None and start:
            run_id = start_run(
                client, init.experiment_name, init.run_name, init.tags, init.get("artifact_location")
            )
            init.run_id = run_id
        return run_id

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> L.Trainer:
        configured = list(config.get("callbacks") or [])
        extra = list(callbacks)
        if config.get("enable_checkpointing") is False:
            extra = [c for c in extra if not isinstance(c, ModelCheckpoint)]
        if config.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ProgressBar) for c in configured
        ):
            extra.append(RunProgressBar(leave=True))
        if config.get("logger") not in (None, False) and not any(
            isinstance(c, LearningRateMonitor) for c in configured
        ):
            extra.append(LearningRateMonitor(logging_interval="step"))
        if not config.get("fast_dev_run"):
            extra.append(FinalValidation())  # a run stopped by max_steps still validates at its end
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
        """Test the best checkpoint in the same run, when the data has a test split; then the summary."""
        has_split = getattr(self.datamodule, "has_split", None)
        if self.config.fit.get("test_after_fit", True) and not (
            callable(has_split) and not has_split("test")
        ):
            ckpt = self.trainer.checkpoint_callback
            best = "best" if ckpt is not None and getattr(ckpt, "best_model_path", "") else None
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best, weights_only=True)
        self.print_summary(fitted=True)

    def after_validate(self) -> None:
        """The summary of the command (run folder, MLflow run, what was written)."""
        self.print_summary()

    def after_test(self) -> None:
        """The summary of the command (run folder, MLflow run, what was written)."""
        self.print_summary()

    def after_predict(self) -> None:
        """The summary of the command (run folder, MLflow run, where predictions were written)."""
        self.print_summary()

    def print_summary(self, fitted: bool = False) -> None:
        """Print `run_summary` on global rank 0."""
        if self.trainer.is_global_zero:
            print(run_summary(self.trainer, Path(self.run_dir), self._started, fitted), flush=True)


def run_summary(trainer: L.Trainer, run_dir: Path, started: float, fitted: bool = False) -> str:
    """What a command left: its run folder, MLflow run (id and URL), best checkpoint and score, what it wrote."""
    latest = latest_run(run_dir.parent)
    is_latest = latest is not None and latest.resolve() == run_dir.resolve()
    lines = [f"run folder     {_relative(run_dir)}" + ("  (latest)" if is_latest else "")]
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger) and getattr(logger, "_run_id", None):
            lines.append(f"MLflow run     {logger.run_id}  {mlflow_run_url(logger)}")
    ckpt = trainer.checkpoint_callback
    if fitted and isinstance(ckpt, ModelCheckpoint):
        if ckpt.best_model_path:
            score = ckpt.best_model_score
            shown = f"{ckpt.monitor} = {float(score):.4g}" if score is not None and ckpt.monitor else ""
            lines.append(f"best checkpoint {_relative(ckpt.best_model_path)}  {shown}".rstrip())
        last = Path(ckpt.dirpath or run_dir / CHECKPOINTS) / "last.ckpt"
        if last.exists():
            lines.append(f"last checkpoint {_relative(last)}")
    written = sorted(
        p.name
        for p in (run_dir.iterdir() if run_dir.is_dir() else [])
        if p.name not in (CHECKPOINTS, "config.yaml") and not p.name.startswith(".")
        and p.stat().st_mtime >= started
    )  # fmt: skip
    if written:
        lines.append(f"written        {', '.join(_relative(run_dir / w) for w in written)}")
    width = max(len(line) for line in lines)
    return "\n".join(["─" * width, *lines, "─" * width])


def _relative(path: str | os.PathLike) -> str:
    """`path` relative to the working directory when it lies inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def mlflow_run_url(logger: MLFlowLogger) -> str:
    """The run's page: on the tracking server when there is one, else on `make mlflow-ui`'s local dashboard."""
    uri = str(getattr(logger, "_tracking_uri", "") or "")
    page = f"#/experiments/{logger.experiment_id}/runs/{logger.run_id}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"(store {uri}; make mlflow-ui, then http://127.0.0.1:5000/{page})"


# --------------------------------------------------------------------------- the suite's own commands


def _data(argv: list[str]) -> None:
    """`omnilab data synth|convert|curate|list`: write WebDataset shards (generated, converted, curated)."""
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
    # convert and curate leave -h to the converter's / step's own parser (its arguments)
    convert = sub.add_parser("convert", help="convert a real dataset to shards", add_help=False)
    convert.add_argument("dataset", choices=sorted(CONVERTERS))
    curate = sub.add_parser(
        "curate", help="a curation step (collect, filter, compose, dere) over shards", add_help=False
    )
    curate.add_argument("step", choices=sorted(STEPS))
    sub.add_parser("list", help="list the synth kinds and converters")
    # `data cache` is dispatched before this parser (_data_or_cache); listed here so `data --help` shows it
    sub.add_parser(
        "cache", help="cache VAE latents and text states of a shard set (docs/data.md)", add_help=False
    )
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
    """`omnilab compare --experiment METHOD`: a table and a plot of a method's MLflow runs."""
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
    """`omnilab bench [name ...]`: run benchmark scripts from benchmarks/ (RESULTS.md sections)."""
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
    """`omnilab slurm --nodes N --gpus G -- fit --config ...`: write (and submit) an sbatch script."""
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
    """`omnilab serve reward --config ...`: serve a reward over HTTP."""
    from rewards.serving import main as serve_main

    serve_main(argv)


COMMANDS = {"data": _data, "compare": _compare, "bench": _bench, "slurm": _slurm, "serve": _serve}


def _export(argv: list[str]) -> None:
    """Export a trained model: a diffusers pipeline folder, LoRA weights, or CCMP safetensors (docs/export.md)."""
    from omnilab.export import main as export_main

    export_main(argv)


COMMANDS["export"] = _export


def _data_or_cache(argv: list[str]) -> None:
    """`omnilab data synth|convert|curate|cache|list ...`: write WebDataset shards (cache: latents, text states)."""
    if argv and argv[0] == "cache":
        from datamodules.cache import main as cache_main

        cache_main(argv[1:])
    else:
        _data(argv)


COMMANDS["data"] = _data_or_cache


def suite_help() -> str:
    """`omnilab --help`'s description: the Lightning commands below, then every other command of the suite."""
    lines = [f"  {name:8s} {(fn.__doc__ or '').strip().splitlines()[0]}" for name, fn in COMMANDS.items()]
    return "\n".join(
        [
            "omnilab: Lightning's fit/validate/test/predict (below; -c is --config and expands `defaults:`),",
            "and the suite's own commands (each with --help):",
            *lines,
        ]
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `omnilab` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        COMMANDS[argv[0]](argv[1:])
        return
    guard_imports()
    with warnings.catch_warnings():
        # main() hands LightningCLI the expanded argv; the "args and command line arguments" warning is ours
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        # a new run's checkpoint folder is empty; one that is not is the run being resumed
        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        OmnilabCLI(args=expand_defaults(argv))


if __name__ == "__main__":
    main()
