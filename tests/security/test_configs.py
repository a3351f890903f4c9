"""A config cannot run code: what it may build is named, at any depth, before import (issue 9 items 1, 10, 11).

Each attack writes a marker file if it ever runs; every test asserts the marker is absent and the refusal
names what was refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch import Callback
from omegaconf import OmegaConf

from lightning_modules.ccmp import CCMP, check_stages
from lightning_modules.components.backbones import build_backbone, check_backbone
from omnilab.allowlist import RefusedImport, check_import_path, guard_imports
from omnilab.cli import OmnilabCLI, main
from tests.test_cli import toy_experiment

REPO = Path(__file__).resolve().parents[2]
BASE = str(REPO / "experiments" / "_base" / "default.yaml")
CCMP_TINY = str(REPO / "experiments" / "ccmp" / "tiny.yaml")
FLOW_TINY = str(REPO / "experiments" / "_base" / "tiny_flow_qwen.yaml")
NO_LOGGER = ["--trainer.logger=false", "--trainer.enable_progress_bar=false"]


class Holder(Callback):
    """A callback with a `dict[str, Any]` and an `Any` argument, like the GRPO reward or a backbone spec."""

    def __init__(self, specs: dict[str, Any] | None = None, anything: Any = None, **kwargs: Any) -> None:
        self.specs, self.anything = specs, anything


def hubconf(root: Path) -> tuple[Path, Path]:
    """A folder whose hubconf.py writes `marker` when torch.hub imports it: (folder, marker)."""
    marker = root / "PWNED-hubconf"
    hub = root / "hub"
    hub.mkdir(exist_ok=True)
    (hub / "hubconf.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef evil(**kw):\n    return None\n")
    return hub, marker


def hub_spec(hub: Path) -> dict[str, Any]:
    return {
        "class_path": "torch.hub.load",
        "init_args": {"repo_or_dir": str(hub), "model": "evil", "source": "local"},
    }


def open_spec(marker: Path) -> dict[str, Any]:
    return {"class_path": "builtins.open", "init_args": {"file": str(marker), "mode": "w"}}


def refused(args: list[str], capsys) -> str:
    """Parse + instantiate `args` without running; return the error text of the refusal."""
    with pytest.raises((SystemExit, ValueError)) as err:  # a parse error, or a refusal at instantiation
        OmnilabCLI(args=args, run=False)
    return capsys.readouterr().err + str(err.value)


def overlay(root: Path, config: dict[str, Any]) -> str:
    path = root / "attack.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


# --- the attack, at the exact places: CCMP's encoder specs and the FlowEdit backbone config dicts


@pytest.mark.parametrize(
    "where",
    [
        lambda spec: {"source_encoder": spec},  # the spec itself
        lambda spec: {"source_encoder": {"config": {"depths": [1, 1, 1, 1], "evil": spec}}},  # inside config
        lambda spec: {"target_encoder": {"pretrained": spec}},
    ],
    ids=["spec", "config-value", "pretrained-value"],
)
def test_hubconf_in_a_ccmp_encoder_spec_never_runs(in_tmp, capsys, where):
    hub, marker = hubconf(in_tmp)
    attack = overlay(in_tmp, {"model": {"init_args": where(hub_spec(hub))}})
    err = refused(["--config", BASE, "--config", CCMP_TINY, "--config", attack, *NO_LOGGER], capsys)
    assert not marker.exists()
    assert "torch.hub" in err or "class_path" in err or "Unexpected keys" in err


@pytest.mark.parametrize("arg", ["backbone", "vae", "text"])
def test_hubconf_in_a_flow_edit_backbone_config_never_runs(in_tmp, capsys, arg):
    hub, marker = hubconf(in_tmp)
    config = {"text_config": {"evil": hub_spec(hub)}} if arg == "text" else {"evil": hub_spec(hub)}
    attack = overlay(in_tmp, {"model": {"init_args": {arg: {"config": config}}}})
    err = refused(["--config", BASE, "--config", FLOW_TINY, "--config", attack, *NO_LOGGER], capsys)
    assert not marker.exists() and "torch.hub" in err


def test_an_allowed_class_inside_a_config_dict_is_data_and_refused_when_built(in_tmp):
    # parsed: kept as a dict (never instantiated); built: the config check names the key
    cli = OmnilabCLI(
        args=["--config", BASE, "--config", CCMP_TINY, *NO_LOGGER, f"--data.init_args.data_dir={in_tmp}"],
        run=False,
    )
    spec = dict(cli.model.hparams["target_encoder"])
    spec["config"] = {**spec["config"], "act": {"class_path": "torch.nn.GELU"}}
    with pytest.raises(ValueError, match="plain data"):
        CCMP(source_encoder=cli.model.hparams["source_encoder"], target_encoder=spec)


# --- builtins.open and friends anywhere in a config


def test_open_for_writing_is_refused_in_callbacks_logger_and_nested_init_args(in_tmp, capsys):
    marker = in_tmp / "PWNED-open"
    exp = toy_experiment(in_tmp)
    places = [
        {"trainer": {"callbacks": [open_spec(marker)]}},
        {"trainer": {"logger": open_spec(marker)}},
        {"trainer": {"callbacks": [{"class_path": "tests.security.test_configs.Holder",
                                    "init_args": {"specs": {"x": open_spec(marker)}}}]}},
        {"trainer": {"callbacks": [{"class_path": "tests.security.test_configs.Holder",
                                    "init_args": {"anything": [{"deeper": open_spec(marker)}]}}]}},
        {"trainer": {"callbacks": [{"class_path": "tests.security.test_configs.Holder",
                                    "dict_kwargs": {"specs": {"x": open_spec(marker)}}}]}},
        {"optimizer": open_spec(marker)},
        {"lr_scheduler": open_spec(marker)},
    ]  # fmt: skip
    for place in places:
        err = refused(["--config", str(exp), "--config", overlay(in_tmp, place)], capsys)
        assert "builtins" in err, place
        assert not marker.exists(), place


@pytest.mark.parametrize(
    "flag",
    [
        "--trainer.callbacks+=builtins.open",
        "--trainer.callbacks+=os.system",
        "--model.class_path=subprocess.Popen",
        "--model=importlib.import_module",
        "--trainer.logger.class_path=pickle.loads",
        "--optimizer=functools.partial",
        "--trainer.callbacks+=lightning.pytorch.loggers.mlflow.os.system",  # a re-export of os.system
    ],
)
def test_class_paths_on_the_command_line_are_refused(in_tmp, capsys, flag):
    exp = toy_experiment(in_tmp)
    err = refused(["--config", str(exp), flag], capsys)
    assert flag.split("=", 1)[1].split(".")[0] in err or "refused" in err


@pytest.mark.parametrize(
    "path",
    [
        "builtins.open", "builtins.eval", "builtins.__import__", "torch.hub.load", "torch.load",
        "importlib.import_module", "pickle.loads", "functools.partial", "operator.methodcaller", "os.system",
        "subprocess.Popen", "shutil.rmtree", "lightning.pytorch.loggers.mlflow.os.system",
        "transformers.pipeline",  # a function in an allowed package (runs remote code with trust_remote_code)
        "transformers.AutoTokenizer",  # a class, but not a model, layer or config
        "transformers.dynamic_module_utils.get_class_from_dynamic_module", "diffusers.DiffusionPipeline",
        "torch.optim.Optimizer.__init__", "torch.nn.modules.module.torch", "evilpkg.Evil",
    ],
)  # fmt: skip
def test_the_allowlist_refuses_what_a_config_must_not_build(path):
    with pytest.raises(RefusedImport):
        check_import_path(path)


@pytest.mark.parametrize(
    "path",
    [
        "lightning_modules.ccmp.CCMP", "callbacks.ema.EMA", "rewards.scene.ColourCheck", "rewards.scene",
        "torch.optim.AdamW", "torch.optim.lr_scheduler.CosineAnnealingLR", "torch.nn.GELU",
        "lightning.pytorch.callbacks.EarlyStopping", "lightning.pytorch.loggers.MLFlowLogger",
        "lightning.pytorch.strategies.FSDPStrategy", "lightning.pytorch.plugins.environments.SLURMEnvironment",
        "transformers.DINOv3ViTModel", "transformers.DINOv3ViTConfig", "diffusers.AutoencoderKL",
        "diffusers.FlowMatchEulerDiscreteScheduler", "peft.LoraConfig", "torchmetrics.MeanMetric",
        "builtins.int", "typing.Mapping",
    ],
)  # fmt: skip
def test_the_allowlist_names_the_families_a_config_may_build(path):
    check_import_path(path)


def test_the_env_extension_cannot_open_a_denied_package(monkeypatch):
    monkeypatch.setenv("OMNILAB_ALLOW_IMPORTS", "tests,os,builtins")
    for path in ("os.system", "builtins.open"):
        with pytest.raises(RefusedImport, match="refused"):
            check_import_path(path)


def test_an_interpolated_class_path_is_checked_like_a_written_one(in_tmp, capsys, monkeypatch):
    marker = in_tmp / "PWNED-env"
    monkeypatch.setenv("EVIL_CLASS", "builtins.open")
    exp = toy_experiment(in_tmp)
    attack = in_tmp / "attack.yaml"
    attack.write_text(  # in an `Any` argument, where a class spec used to be built
        "trainer:\n  callbacks:\n    - class_path: tests.security.test_configs.Holder\n"
        "      init_args:\n        anything:\n          class_path: ${oc.env:EVIL_CLASS}\n"
        f"          init_args: {{file: {marker}, mode: w}}\n"
    )
    err = refused(["--config", str(exp), "--config", str(attack)], capsys)
    assert "builtins" in err and not marker.exists()


def test_a_resolver_that_runs_code_is_not_available_to_configs(in_tmp, capsys):
    marker = in_tmp / "PWNED-resolver"
    OmegaConf.register_new_resolver("pwn", lambda *a: marker.touch() or "x", replace=True)
    try:
        exp = toy_experiment(in_tmp)
        attack = in_tmp / "attack.yaml"
        attack.write_text("model:\n  init_args:\n    trace_dir: ${pwn:now}\n")
        with pytest.raises((SystemExit, Exception), match="pwn"):  # omegaconf: unsupported interpolation
            OmnilabCLI(args=["--config", str(exp), "--config", str(attack)], run=False)
        assert not marker.exists()
        assert OmegaConf.has_resolver("pwn")  # still registered for code that is not a config
    finally:
        OmegaConf.clear_resolver("pwn")


def test_any_typed_values_arrive_as_plain_data_never_as_objects(in_tmp):
    exp = toy_experiment(in_tmp)
    holder = {"class_path": "tests.security.test_configs.Holder",
              "init_args": {"specs": {"opt": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}},
                            "anything": {"class_path": "callbacks.ema.EMA"}}}  # fmt: skip
    cli = OmnilabCLI(
        args=["--config", str(exp), "--config", overlay(in_tmp, {"trainer": {"callbacks": [holder]}})],
        run=False,
    )
    (built,) = [c for c in cli.trainer.callbacks if isinstance(c, Holder)]
    opt = built.specs["opt"]
    assert type(opt) is dict and opt["class_path"] == "torch.optim.SGD" and opt["init_args"]["lr"] == 0.1
    assert type(built.anything) is dict and built.anything["class_path"] == "callbacks.ema.EMA"


# --- item 10: misspelt keys of backbone specs and config dicts


def test_a_misspelt_backbone_config_key_is_refused_naming_the_nearest():
    from transformers import DINOv3ViTModel, Qwen2_5_VLForConditionalGeneration

    with pytest.raises(ValueError, match=r"'num_hiden_layers'.*did you mean 'num_hidden_layers'"):
        check_backbone(DINOv3ViTModel, {"config": {"hidden_size": 32, "num_hiden_layers": 2}})
    with pytest.raises(ValueError, match=r"'pretraind'.*did you mean 'pretrained'"):
        check_backbone(DINOv3ViTModel, {"pretraind": "facebook/dinov3-vitl16-pretrain-lvd1689m"})
    with pytest.raises(ValueError, match=r"'hiden_size' in config\.text_config.*'hidden_size'"):
        check_backbone(Qwen2_5_VLForConditionalGeneration, {"config": {"text_config": {"hiden_size": 32}}})
    # aliases (attribute_map) and sub-configs are keys too
    from transformers import T5EncoderModel

    check_backbone(T5EncoderModel, {"config": {"hidden_size": 32, "num_heads": 2}})


def test_a_misspelt_text_encoder_config_key_is_refused_naming_it():
    from lightning_modules.components.text import build_text_encoder

    with pytest.raises(ValueError, match=r"'hiden_size' in config\.text_config"):
        build_text_encoder("qwen", config={"text_config": {"hiden_size": 32}})
    with pytest.raises(ValueError, match=r"'d_modle'.*'d_model'"):
        build_text_encoder("sd3", config={"clip": [], "t5": {"d_modle": 8}})


def test_a_misspelt_diffusers_config_key_is_refused_before_building():
    from diffusers import AutoencoderKL

    with pytest.raises(ValueError, match=r"'latent_chanels'.*'latent_channels'"):
        build_backbone(AutoencoderKL, config={"latent_chanels": 4})


def test_trust_remote_code_is_refused():
    from transformers import DINOv3ViTModel

    with pytest.raises(ValueError, match="trust_remote_code"):
        build_backbone(DINOv3ViTModel, pretrained="some/repo", trust_remote_code=True)


def test_a_misspelt_ccmp_spec_key_fails_at_parse_naming_it(in_tmp, capsys):
    attack = overlay(in_tmp, {"model": {"init_args": {"target_encoder": {"pretraind": "x"}}}})
    err = refused(["--config", BASE, "--config", CCMP_TINY, "--config", attack, *NO_LOGGER], capsys)
    assert "pretraind" in err
    attack = overlay(
        in_tmp, {"model": {"init_args": {"target_encoder": {"config": {"num_hiden_layers": 1}}}}}
    )
    err = refused(["--config", BASE, "--config", CCMP_TINY, "--config", attack, *NO_LOGGER], capsys)
    assert "num_hiden_layers" in err and "num_hidden_layers" in err


# --- item 11: schedule values that would not train as meant


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"steps": 10, "lr": -1e-3}, r"stages\[1\]\.lr=-0\.001"),
        ({"steps": 10, "lr": float("nan")}, r"\.lr=nan"),
        ({"steps": 10, "lr": 1e-3, "lr_end": -1e-4}, r"\.lr_end"),
        ({"steps": 0, "lr": 1e-3}, r"\.steps=0"),
        ({"steps": 10, "lr": 1e-3, "warmup_steps": 11}, r"\.warmup_steps=11"),
        ({"steps": 10, "lr": 1e-3, "warmup": 2}, r"unknown key"),
    ],
)
def test_every_stage_value_is_validated(stage, message):
    with pytest.raises(ValueError, match=message):
        check_stages([{"steps": 5, "lr": 1e-3}, stage])
    check_stages([{"steps": 5, "lr": 1e-3, "lr_end": 0.0, "warmup_steps": 5, "train_backbones": False}])


def test_a_negative_stage_lr_stops_the_cli_before_training(in_tmp, capsys):
    attack = overlay(in_tmp, {"model": {"init_args": {"stages": [{"steps": 40, "lr": -1.0e-3}]}}})
    err = refused(["--config", BASE, "--config", CCMP_TINY, "--config", attack, *NO_LOGGER], capsys)
    assert "lr=-0.001" in err


def test_checkpoint_hparams_of_a_parsed_config_load_with_weights_only(in_tmp):
    cli = OmnilabCLI(
        args=["--config", BASE, "--config", CCMP_TINY, *NO_LOGGER, f"--data.init_args.data_dir={in_tmp}"],
        run=False,
    )
    torch.save({"hyper_parameters": dict(cli.model.hparams)}, in_tmp / "h.ckpt")
    assert torch.load(in_tmp / "h.ckpt", weights_only=True)["hyper_parameters"]["image_size"] == 64


def test_fit_through_main_still_works_with_the_guard(in_tmp):
    guard_imports()
    exp = toy_experiment(in_tmp)
    main(["fit", "--config", str(exp), "--trainer.max_steps=1", "--test_after_fit=false"])


def test_type_values_callables_and_short_names_resolve_through_the_allowlist(in_tmp):
    from collections.abc import Callable

    from jsonargparse import ArgumentParser

    guard_imports()
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--kind", type=type)
    parser.add_argument("--fn", type=Callable | None)
    assert parser.parse_args(["--kind=builtins.int"]).kind is int
    for bad in ("--kind=subprocess.Popen", "--kind=os.PathLike", "--fn=os.system", "--fn=builtins.eval"):
        with pytest.raises(Exception, match=r"refused|outside the allowlist|not allowed"):
            parser.parse_args([bad])
    exp = toy_experiment(in_tmp)
    cli = OmnilabCLI(
        args=["--config", str(exp), "--optimizer=AdamW"], run=False
    )  # a short name: found, allowed
    assert cli.config_init["optimizer"]["class_path"] == "torch.optim.AdamW"
