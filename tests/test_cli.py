"""The omnilab command: allowlisted class paths, clear errors for bad keys, run naming, SLURM scripts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from omnilab.allowlist import RefusedImport, check_import_path
from omnilab.cli import COMMANDS, main
from omnilab.slurm import sbatch_script
from omnilab.tracking import flatten_config, run_identity
from tests.toy import write_toy_shards

REPO = Path(__file__).resolve().parents[1]
BASE = str(REPO / "experiments" / "_base" / "default.yaml")


def toy_experiment(root: Path, **trainer) -> Path:
    """experiments/toy/tiny.yaml under root, over generated toy shards."""
    write_toy_shards(root / "data", {"train": [6, 6], "val": [4], "test": [4]})
    config = {
        "model": {"class_path": "tests.toy.ToyModule", "init_args": {"lr": 0.01}},
        "data": {
            "class_path": "tests.toy.ToyData",
            "init_args": {"data_dir": str(root / "data"), "batch_size": 2, "batches_per_epoch": 3},
        },
        "trainer": {
            "max_epochs": 1,
            "accelerator": "cpu",
            "logger": False,
            "enable_progress_bar": False,
            **trainer,
        },
        "checkpoint": {"monitor": "val/loss"},
    }
    path = root / "experiments" / "toy" / "tiny.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_class_outside_the_allowlist_is_refused_before_import(in_tmp, monkeypatch, capsys):
    marker = in_tmp / "imported"
    pkg = in_tmp / "evilpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Evil: pass\n")
    monkeypatch.syspath_prepend(str(in_tmp))
    exp = toy_experiment(in_tmp)
    config = yaml.safe_load(exp.read_text())
    config["model"] = {"class_path": "evilpkg.Evil"}
    exp.write_text(yaml.safe_dump(config))
    with pytest.raises((SystemExit, RefusedImport)):
        main(["fit", "--config", str(exp)])
    assert not marker.exists()
    assert "evilpkg" in capsys.readouterr().err
    with pytest.raises(RefusedImport, match="OMNILAB_ALLOW_IMPORTS=evilpkg"):
        check_import_path("evilpkg.Evil")
    monkeypatch.setenv("OMNILAB_ALLOW_IMPORTS", "tests,evilpkg")
    check_import_path("evilpkg.Evil")  # allowed once the user says so


def test_a_callback_outside_the_allowlist_is_refused(in_tmp, capsys):
    exp = toy_experiment(in_tmp)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(exp), "--trainer.callbacks+=os.path.join"])
    assert "os.path.join" in capsys.readouterr().err


def test_a_mistyped_key_fails_naming_it(in_tmp, capsys):
    exp = toy_experiment(in_tmp)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(exp), "--trainer.max_stepz=3"])
    assert "max_stepz" in capsys.readouterr().err
    config = yaml.safe_load(exp.read_text())
    config["model"]["init_args"]["lrr"] = 0.1
    exp.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(exp)])
    assert "lrr" in capsys.readouterr().err


def test_fit_names_the_run_saves_config_and_tests_best(in_tmp):
    exp = toy_experiment(in_tmp)
    main(["fit", "--config", BASE, "--config", str(exp), "--trainer.logger=false"])
    run = in_tmp / "runs" / "toy" / "tiny" / "latest"
    assert (run / "checkpoints" / "best.ckpt").exists() and (run / "checkpoints" / "last.ckpt").exists()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["seed_everything"] == 0 and saved["model"]["class_path"] == "tests.toy.ToyModule"


def test_run_identity_and_flattened_config():
    assert run_identity(["experiments/_base/default.yaml", "experiments/ccmp/tiny.yaml"])[:2] == (
        "ccmp",
        "tiny",
    )
    assert run_identity(["/x/experiments/unipic2/kontext.yaml"])[:2] == ("unipic2", "kontext")
    flat = flatten_config({"model": {"class_path": "a.B", "init_args": {"lr": 0.1, "enc": {"depth": 2}}}})
    assert flat == {"model/class_path": "a.B", "model/lr": "0.1", "model/enc/depth": "2"}


def test_slurm_script_runs_srun_with_the_layout():
    script = sbatch_script(
        ["fit", "--config", "experiments/ccmp/egoexo.yaml"], 2, 8, "ccmp-egoexo", hours=1.5
    )
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=8" in script
    assert "#SBATCH --gpus-per-node=8" in script and "#SBATCH --time=01:30:00" in script
    last = script.strip().splitlines()[-1]
    assert last.startswith("srun omnilab fit --config experiments/ccmp/egoexo.yaml")
    assert "--trainer.num_nodes=2" in last and "--trainer.devices=8" in last
    with pytest.raises(ValueError, match="GPUS=0"):
        sbatch_script(["fit"], 1, 0, "x")


def test_make_train_cluster_dry_prints_the_script(capsys):
    main(
        [
            "slurm",
            "--nodes",
            "4",
            "--gpus",
            "8",
            "--dry-run",
            "--",
            "fit",
            "--config",
            "experiments/ccmp/egoexo.yaml",
        ]
    )
    out = capsys.readouterr().out
    assert "#SBATCH --job-name=ccmp-egoexo" in out and "#SBATCH --nodes=4" in out


def test_data_synth_command_needs_a_known_kind(capsys):
    with pytest.raises(SystemExit):
        main(["data", "synth", "no-such-kind"])
    assert "invalid choice" in capsys.readouterr().err


def test_help_lists_subcommands(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["omnilab", "--help"])
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "fit" in out and "test" in out


class CountValidations(L.Callback):
    """Writes the global step of each validation (fit only) to validations.json."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.steps.append(trainer.global_step)
            Path("validations.json").write_text(json.dumps(self.steps))


@pytest.mark.parametrize("max_steps, validated", [(2, [2]), (3, [3]), (4, [3, 4])])
def test_a_run_cut_short_by_max_steps_validates_at_its_end(in_tmp, recwarn, max_steps, validated):
    """3 batches an epoch: a stop at step 2 or 4 validates there; at 3 (an epoch end) once, as Lightning does."""
    exp = toy_experiment(in_tmp, max_epochs=5)
    main(["fit", "--config", str(exp), f"--trainer.max_steps={max_steps}", "--test_after_fit=false",
          "--trainer.callbacks+=tests.test_cli.CountValidations"])  # fmt: skip
    assert json.loads(Path("validations.json").read_text()) == validated
    best = torch.load(next(Path("runs/toy/tiny").glob("*/checkpoints/best.ckpt")), weights_only=True)
    assert best["global_step"] in validated
    assert not [w for w in recwarn if "val/loss" in str(w.message)]  # the monitored metric was there


def test_help_lists_the_suites_own_commands(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["omnilab", "--help"])
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "usage: omnilab" in out
    for command in COMMANDS:
        assert f"\n  {command} " in out, command
    assert {"data", "compare", "bench", "slurm"} <= set(COMMANDS)
