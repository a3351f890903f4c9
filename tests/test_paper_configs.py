"""Every paper config trains on the real path: its own strategy and precision, released-layout weights, 2 processes.

For each experiment YAML that is not a tiny one (found by glob, so new paper configs join on their own):
- each `pretrained:` part is replaced by a tiny stand-in written in the release's layout and dtype
  (tests/standins.py), built from the `config:` of the same argument in the method's tiny experiment, and
  loaded through the config's own `from_pretrained` path: only the `pretrained:` value changes;
- `omnilab fit` runs the experiment on 2 CPU processes (gloo) under the config's own strategy, precision,
  accumulation and callbacks, for 2 optimizer steps (RL configs: one rollout and its update), and writes its
  checkpoint (sharded under FSDP); the test asserts the steps ran with finite losses.

Mapped because the machine is a CPU (each mapping named where it is made, in `overrides`):
- accelerator gpu -> cpu, devices -> 2, num_nodes -> 1;
- `FSDPStrategy` -> tests.fsdp_cpu.CPUFSDPStrategy, same init_args (Lightning refuses FSDP without a GPU, wraps
  with a CUDA device id, and its FSDP precision plugin autocasts CUDA only);
- precision 16-mixed -> bf16-mixed (Lightning has no fp16 autocast on CPU); bf16-mixed runs as it is;
- data: the data module's generated shards (`synth_kind`) at the tiny experiment's geometry (budgets, sides, image size), keeping
  the paper's batch size and resize rule; pixel sizes in callbacks (budget milestones, rollout size) scaled alike;
- RL: 2 trajectories per group, 1 prompt, 4 sampling steps, one rollout per optimizer step; the placeholder
  reward servers are replaced by local HTTP servers (rewards.remote) serving the suite's scene rewards;
- an `init_checkpoint` (the earlier stage's result) is written from the earlier stage's model built on the
  same stand-ins;
- no validation, no logger but a CSV one, `test_after_fit` off.

`uniref/sft` runs in `make test`; the others are `slow` (`make test-full`).
"""

from __future__ import annotations

import csv
import math
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.configs import (
    BASE,
    EXPERIMENTS,
    REPO,
    callback_args,
    class_path,
    experiment_id,
    init_args,
    trainer_args,
)
from tests.standins import release, write_standin

PAPER = [p for p in EXPERIMENTS if "tiny" not in p.stem]
FAST = {"uniref/sft"}
KEEP_DATA = {"batch_size", "eval_batch_size", "budget_mode", "rounding", "upscale", "max_refs", "task_mix"}
KEEP_DATA |= {"target_like_ref", "drop_text"}
GEOMETRY = ("budget", "image_size")  # the data key whose paper / tiny ratio scales pixel sizes in callbacks
PLACEHOLDER = re.compile(r"https?://[\w.-]+\.placeholder(?::\d+)?/?")
STEPS = 2  # optimizer steps of a supervised config


def tiny_experiment(path: Path) -> Path:
    """The method's tiny experiment (name contains 'tiny'): the first with the paper config's model class, else the first."""
    tinies = sorted(path.parent.glob("*tiny*.yaml"))
    if not tinies:
        pytest.fail(f"{path.parent} has no tiny experiment to take the stand-ins' configs from")
    same = [t for t in tinies if class_path(t, "model") == class_path(path, "model")]
    return (same or tinies)[0]


def tiny_specs(path: Path) -> dict[str, Any]:
    """The model arguments of the method's tiny experiments that are random-init specs (`config:`)."""
    specs: dict[str, Any] = {}
    for tiny in sorted(path.parent.glob("*tiny*.yaml")):
        specs.update(
            {k: v for k, v in init_args(tiny, "model").items() if isinstance(v, dict) and "config" in v}
        )
    return specs


def standins(path: Path, root: Path) -> dict[str, dict[str, Any]]:
    """{argument: its paper spec with `pretrained` pointed at the stand-in folder} for every pretrained argument."""
    model, tiny = init_args(path, "model"), tiny_specs(path)
    pretrained = {k: v for k, v in model.items() if isinstance(v, dict) and v.get("pretrained")}
    parts: dict[str, dict[str, dict[str, Any]]] = {}
    for arg, spec in pretrained.items():
        if arg not in tiny:
            pytest.fail(f"{path}: the tiny experiment has no `config:` for the pretrained argument {arg!r}")
        entry = release(spec["pretrained"])
        part = "model" if entry.one_folder else spec.get("subfolder") or "text"
        parts.setdefault(spec["pretrained"], {})[part] = {"family": spec.get("family"), **tiny[arg]}
    folders = {hub: write_standin(hub, p, root) for hub, p in parts.items()}
    return {arg: {**spec, "pretrained": str(folders[spec["pretrained"]])} for arg, spec in pretrained.items()}


def scale_of(path: Path) -> float:
    """tiny / paper of the data geometry (1 when the data has none)."""
    paper, tiny = init_args(path, "data"), init_args(tiny_experiment(path), "data")
    for key in GEOMETRY:
        if key in paper and key in tiny:
            return tiny[key] / paper[key]
    return 1.0


def write_init_checkpoint(path: Path, model: dict[str, Any], out: Path) -> str:
    """The earlier stage's result: its model (the experiment `defaults` names, else this one) on the stand-ins."""
    earlier = next((p for p in reversed(chain_paths(path)[:-1]) if "_base" not in p.parts), path)
    cls = import_class(class_path(earlier, "model"))
    shared = {
        k: v for k, v in model.items() if k == "image_size" or (isinstance(v, dict) and v.get("pretrained"))
    }
    args = {**init_args(earlier, "model"), **shared}
    args = {k: (None if k.startswith("init_") else v) for k, v in args.items()}
    stage = cls(**args)
    stage.configure_model()
    torch.save({"state_dict": stage.state_dict()}, out)
    return str(out)


def chain_paths(path: Path) -> list[Path]:
    from omnilab.cli import expand_defaults

    return [Path(p) for p in expand_defaults(["--config", str(path)])[1::2]]


def rewards(urls: dict[str, str]) -> Any:
    """Local reward servers for the placeholder URLs: consistency-like names get ReferenceConsistency, the rest
    JpegCompressibility (both give a number for every sample, so every rollout trains)."""
    from rewards.remote import make_server
    from rewards.scene import JpegCompressibility, ReferenceConsistency

    servers = {}
    for placeholder in urls:
        consistency = re.search(r"consistency|similarity", placeholder)
        server = make_server(ReferenceConsistency() if consistency else JpegCompressibility())
        threading.Thread(target=server.serve_forever, daemon=True).start()
        host, port = server.server_address[:2]
        urls[placeholder] = f"http://{host}:{port}/"
        servers[placeholder] = server
    return servers


def replace_urls(value: Any, urls: dict[str, str]) -> Any:
    """`value` with every placeholder reward URL (strings at any depth) replaced by its local server's."""
    if isinstance(value, str):
        return PLACEHOLDER.sub(lambda m: urls[m.group(0)], value)
    if isinstance(value, dict):
        return {k: replace_urls(v, urls) for k, v in value.items()}
    if isinstance(value, list):
        return [replace_urls(v, urls) for v in value]
    return value


def overrides(path: Path, root: Path, data_dirs: DataDirs) -> tuple[dict[str, Any], bool]:
    """The override config of `path` (module doc) and whether it is an RL config."""
    model = {**init_args(path, "model"), **standins(path, root / "standins")}
    tiny_model = init_args(tiny_experiment(path), "model")
    if "image_size" in model and "image_size" in tiny_model:
        model["image_size"] = tiny_model["image_size"]  # model and data share it (CCMP)
    if model.get("init_checkpoint"):
        model["init_checkpoint"] = write_init_checkpoint(path, model, root / "init.ckpt")
    data_cls = class_path(path, "data")
    data = {**init_args(path, "data")}
    data.update({k: v for k, v in init_args(tiny_experiment(path), "data").items() if k not in KEEP_DATA})
    data.update(data_dir=str(data_dirs[data_cls]), synth=False, num_workers=0)
    scale = scale_of(path)
    trainer = trainer_args(path)
    rl = bool(callback_args(path, "GRPORollouts"))
    accumulation = int(trainer.get("accumulate_grad_batches") or 1)
    callbacks = []
    for callback in trainer.get("callbacks") or []:
        callback = dict(callback)
        name = callback["class_path"].rsplit(".", 1)[-1]
        kwargs = dict(callback.get("init_args") or {})
        if name == "PixelBudgetSchedule":
            kwargs["milestones"] = {s: round(b * scale) for s, b in kwargs["milestones"].items()}
        if name == "GRPORollouts":
            kwargs.update(
                group_size=2, prompts_per_rollout=1, steps=4, eval_steps=4, steps_per_rollout=accumulation
            )
            if kwargs.get("size") is not None:
                kwargs["size"] = [round(s * scale) for s in kwargs["size"]]
            if kwargs.get("train_steps") == "window":
                kwargs.update(window=[0, 2], window_size=2)
        callbacks.append({**callback, "init_args": kwargs})
    strategy = trainer.get("strategy", "auto")
    if isinstance(strategy, dict) and strategy["class_path"].endswith("FSDPStrategy"):
        strategy = {**strategy, "class_path": "tests.fsdp_cpu.CPUFSDPStrategy"}
    precision = {"16-mixed": "bf16-mixed", "16": "bf16-mixed"}.get(
        str(trainer.get("precision")), trainer.get("precision")
    )
    trainer_over = {
        "accelerator": "cpu",
        "devices": 2,
        "num_nodes": 1,
        "strategy": strategy,
        "precision": precision,
        "max_steps": 1 if rl else STEPS,
        "max_epochs": -1,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
        "log_every_n_steps": 1,
        "callbacks": callbacks,
        "logger": {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(root / "csv")},
        },
    }
    config = {
        "model": {"class_path": class_path(path, "model"), "init_args": model},
        "data": {"class_path": data_cls, "init_args": data},
        "trainer": trainer_over,
        "test_after_fit": False,
    }
    return config, rl


class DataDirs(dict):
    """Generated shards of each data module's kind (its `synth_kind`), written on first use, once per module."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, datamodule: str) -> Path:
        from datamodules.synth import synthesize

        kind = getattr(import_class(datamodule), "synth_kind", None)
        if kind is None:
            pytest.fail(f"{datamodule} has no `synth_kind`: the paper-config test cannot generate its shards")
        index = synthesize(kind, self.root / kind, samples={"train": 24, "val": 4, "test": 4}, seed=0)
        self[datamodule] = index.parent
        return index.parent


def import_class(path: str) -> type:
    """The class a dotted class path names."""
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory) -> DataDirs:
    """Generated shards of each data kind, on first use."""
    return DataDirs(tmp_path_factory.mktemp("paper-data"))


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=() if experiment_id(p) in FAST else pytest.mark.slow) for p in PAPER],
    ids=experiment_id,
)
def test_paper_config(path, tmp_path, data_dirs):
    if getattr(import_class(class_path(path, "model")), "test_only", False):
        pytest.skip("a benchmark runner (`test_only`): nothing to train; its own tests run it")
    urls: dict[str, str] = {m.group(0): "" for m in PLACEHOLDER.finditer(path.read_text())}
    for parent in chain_paths(path):
        urls |= {m.group(0): "" for m in PLACEHOLDER.finditer(parent.read_text())}
    servers = rewards(urls)
    try:
        config, rl = overrides(path, tmp_path, data_dirs)
        config = replace_urls(config, urls)
        method, name = experiment_id(path).split("/")
        # the experiment's own file name and folder, so the run is named as `make train` names it
        exp = tmp_path / "experiments" / method / f"{name}.yaml"
        exp.parent.mkdir(parents=True)
        exp.write_text(yaml.safe_dump(config, sort_keys=False))
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "OMNILAB_ALLOW_IMPORTS": "tests",
            "OMP_NUM_THREADS": "1",
        }
        cmd = [
            sys.executable,
            "-m",
            "omnilab",
            "fit",
            "--config",
            str(BASE),
            "--config",
            str(path),
            "--config",
            str(exp),
        ]
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    finally:
        for server in servers.values():
            server.shutdown()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    losses = train_losses(tmp_path / "csv")
    assert losses and all(math.isfinite(x) for x in losses), losses
    ckpt = tmp_path / "runs" / method / name / "latest" / "checkpoints" / "last.ckpt"
    meta = torch.load(ckpt / "meta.pt" if ckpt.is_dir() else ckpt, map_location="cpu", weights_only=True)
    assert meta["global_step"] == (1 if rl else STEPS)
    strategy = trainer_args(path).get("strategy") or {}
    if isinstance(strategy, dict) and strategy.get("init_args", {}).get("state_dict_type") == "sharded":
        assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2  # one shard file per process


def test_every_shipped_paper_config_is_collected():
    """The glob finds the paper configs of this suite (new ones join it by being non-tiny YAMLs)."""
    ids = {experiment_id(p) for p in PAPER}
    shipped = {
        "ccmp/egoexo",
        "ccmp/handalx",
        "uniref/sft",
        "uniref/msgrpo",
        "unipic2/kontext",
        "unipic2/pdtr",
        "unipic3/compose",
        "mico/qwen_mico",
        "mico/bench",
        "gedit/bench",
        "editreward/baseline",
        "jrm/paper",
        "spatialreward/paper",
        "pure/paper",
        "unipic2/metaquery",
        "unimrg/paper",
        "unipic3/consistency",
        "unipic3/dmd",
        "scot/paper",
    }
    assert shipped <= ids, shipped - ids
    assert not any("tiny" in i for i in ids)


def test_an_unknown_release_says_what_to_add():
    with pytest.raises(KeyError, match=r"add it to RELEASES in tests/standins.py.*layout.*dtype.*licence"):
        release("someone/new-model")


def train_losses(root: Path) -> list[float]:
    """The `train/loss` values the CSV logger wrote."""
    (metrics,) = root.rglob("metrics.csv")
    with metrics.open() as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]
