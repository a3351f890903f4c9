"""Every shipped experiment parses and instantiates; paper backbones build at tiny size; tiny runs fit.

litgpt's `test_config_hub` habit: a YAML that does not parse is a bug found here, not on a cluster.
Paper configs ask for GPUs and pretrained weights; here they run on CPU, and each `pretrained` backbone
is swapped for the random-init `config` of the same argument in the method's tiny experiment.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml

from omnilab.cli import OmnilabCLI, expand_defaults, main

REPO = Path(__file__).resolve().parents[1]
BASE = str(REPO / "experiments" / "_base" / "default.yaml")
EXPERIMENTS = sorted(p for p in (REPO / "experiments").rglob("*.yaml") if "_base" not in p.parts)
TINY = [p for p in EXPERIMENTS if p.stem.endswith("tiny")]
CPU = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.strategy=auto",
    "--trainer.precision=32-true",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
]


def model_args(path: Path) -> dict[str, Any]:
    """The model init_args an experiment ends up with after its `defaults` fragments."""
    args: dict[str, Any] = {}
    configs = expand_defaults(["--config", str(path)])[1::2]
    for config in configs:
        args.update((yaml.safe_load(Path(config).read_text()).get("model") or {}).get("init_args") or {})
    return args


def tiny_backbones(method: str) -> dict[str, Any]:
    """The model arguments of the method's tiny experiments that are random-init specs (`config:`)."""
    specs: dict[str, Any] = {}
    for path in (REPO / "experiments" / method).glob("*tiny*.yaml"):
        specs.update({k: v for k, v in model_args(path).items() if isinstance(v, dict) and "config" in v})
    return specs


def test_there_are_experiments_and_each_method_has_a_tiny_one():
    assert EXPERIMENTS
    methods = {p.parent.name for p in EXPERIMENTS}
    assert methods == {p.parent.name for p in TINY}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_experiment_parses_instantiates_and_builds(path, in_tmp):
    data_dir = f"--data.init_args.data_dir={in_tmp}/data"
    args = expand_defaults(["--config", BASE, "--config", str(path), *CPU, data_dir])
    cli = OmnilabCLI(args=args, run=False)
    assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None
    hparams = {k: v for k, v in cli.model.hparams.items() if not k.startswith("_")}
    tiny = tiny_backbones(path.parent.name)
    for key, value in hparams.items():
        if isinstance(value, dict) and "pretrained" in value:
            assert key in tiny, f"{path}: no tiny config for backbone argument {key!r}"
            hparams[key] = tiny[key]
        if key.endswith("checkpoint"):
            hparams[key] = None
    model = type(cli.model)(**hparams)
    model.configure_model()
    assert sum(p.numel() for p in model.parameters()) > 0


class FitProbe(L.Callback):
    """Records what a fit changed (its trainable weights), its losses and what its test logged (fit_probe.json)."""

    def on_train_start(self, trainer, pl_module):
        self.start = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))

    def on_train_end(self, trainer, pl_module):
        now = dict(pl_module.named_parameters())
        moved = max(float((now[n].detach() - p).abs().max()) for n, p in self.start.items())
        self.record = {"moved": moved, "steps": trainer.global_step, "losses": self.losses}

    def on_test_end(self, trainer, pl_module):
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        Path("fit_probe.json").write_text(json.dumps({**self.record, "test": metrics}))


@pytest.mark.parametrize("path", TINY, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_tiny_experiment_fits_and_tests(path, in_tmp):
    # a run that starts from another experiment's checkpoint starts from random init here (the start
    # from a checkpoint is tested with the method); everything else runs as `make train` runs it
    starts = [f"--model.init_args.{k}=null" for k in model_args(path) if k.startswith("init_")]
    test_only = _test_only(path)  # a benchmark runner: `omnilab test`, nothing to fit
    tests = 4 if path.parent.name == "ccmp" else 1  # CCMP's same-view test pairs are not scored: take all 4
    main(
        [
            "test" if test_only else "fit", "--config", BASE, "--config", str(path), *CPU, *starts,
            f"--data.init_args.data_dir={in_tmp}/data",
            "--data.init_args.synth_samples={train: 16, val: 4, test: 4}",
            "--trainer.max_steps=3", "--trainer.limit_val_batches=1", f"--trainer.limit_test_batches={tests}",
            *(["--model.init_args.vae_fit_steps=2"] if model_args(path).get("vae_fit_steps") else []),
            "--trainer.val_check_interval=3", "--trainer.check_val_every_n_epoch=null",
            *([] if test_only else ["--trainer.callbacks+=tests.test_experiments.FitProbe"]),
        ]
    )  # fmt: skip
    method, name = path.parent.name, path.stem
    if test_only:
        assert (in_tmp / "runs" / method / name / "latest" / "bench/summary.json").exists()
        return
    probe = json.loads((in_tmp / "fit_probe.json").read_text())
    assert probe["steps"] == 3 and probe["moved"] > 0  # three optimizer steps changed the trainable weights
    assert len(probe["losses"]) == 3 and all(math.isfinite(v) for v in probe["losses"]), probe
    # the best checkpoint was tested: its headline metric is a number (a direction without visible pairs
    # may log nan for its own IoU, never inf)
    tested = probe["test"]
    assert not any(math.isinf(v) for v in tested.values()), probe
    if path.parent.name == "ccmp":
        assert math.isfinite(tested["test/iou"]), probe
    else:  # each method logs its own headline metrics (loss, accuracy, PSNR ...): at least one is a number
        assert any(math.isfinite(v) for v in tested.values()), probe
    last_ckpt = in_tmp / "runs" / method / name / "latest" / "checkpoints" / "last.ckpt"
    last = torch.load(last_ckpt, weights_only=True)
    assert last["global_step"] == 3


def _test_only(path: Path) -> bool:
    """Whether the experiment's model only tests (a benchmark runner, `test_only = True`)."""
    import importlib

    configs = expand_defaults(["--config", str(path)])[1::2]
    class_path = None
    for config in configs:
        class_path = (yaml.safe_load(Path(config).read_text()).get("model") or {}).get(
            "class_path", class_path
        )
    module, _, name = (class_path or "").rpartition(".")
    return bool(module) and getattr(getattr(importlib.import_module(module), name), "test_only", False)
