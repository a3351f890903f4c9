"""How configs merge (omnilab/configs.py): dict-valued arguments merge key by key and keep their types."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from omnilab.allowlist import RefusedImport
from omnilab.cli import OmnilabCLI, expand_defaults
from omnilab.configs import deep_merge, merged_documents, set_leaf

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"


def test_deep_merge_merges_dicts_and_replaces_lists_and_scalars():
    base = {"a": {"b": 1, "c": [1, 2], "d": {"e": "x"}}, "f": 0}
    out = deep_merge(base, {"a": {"c": [3], "d": {"g": True}}, "f": 2})
    assert out == {"a": {"b": 1, "c": [3], "d": {"e": "x", "g": True}}, "f": 2}
    assert base["a"]["d"] == {"e": "x"}  # the base is not changed


def test_a_later_backbone_source_drops_the_other():
    tiny = {"family": "sd3", "config": {"num_layers": 2}, "subfolder": "transformer"}
    paper = deep_merge(tiny, {"pretrained": "org/model"})
    assert paper == {"family": "sd3", "pretrained": "org/model", "subfolder": "transformer"}
    assert deep_merge(paper, {"config": {"num_layers": 1}})["config"] == {"num_layers": 1}
    assert "pretrained" not in deep_merge(paper, {"config": {"num_layers": 1}})


def test_set_leaf_creates_missing_levels():
    assert set_leaf({"a": {"b": 1}}, "a.c.d", 2) == {"a": {"b": 1, "c": {"d": 2}}}
    assert merged_documents([{"x": {"y": 1}}, None, {"x": {"z": 2}}]) == {"x": {"y": 1, "z": 2}}


def parsed(*argv: str) -> OmnilabCLI:
    """The CLI parsed and instantiated (no command run) from argv, `-c`/`defaults:` expanded as main() does."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return OmnilabCLI(args=expand_defaults(["--trainer.logger=false", *argv]), run=False)


def test_a_nested_command_line_override_sets_one_leaf_typed():
    """`--...backbone.config.num_layers=1` keeps the rest of backbone.config and is the int 1 (issue 12 item 4)."""
    cli = parsed(
        "-c", str(EXPERIMENTS / "unipic3" / "tiny.yaml"), "--model.init_args.backbone.config.num_layers=1"
    )
    config = cli.config.model.init_args.backbone["config"]
    assert config["num_layers"] == 1 and isinstance(config["num_layers"], int)
    assert config["attention_head_dim"] == 64 and config["zero_cond_t"] is True
    assert cli.model.hparams["backbone"]["config"]["num_layers"] == 1


def test_a_later_config_file_merges_into_a_dict_argument(tmp_path):
    """A file that adds one key to backbone.config keeps the fragment's other keys; `-c` expands `defaults:`."""
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump({"model": {"init_args": {"backbone": {"config": {"num_layers": 3}}}}}))
    cli = parsed("-c", str(EXPERIMENTS / "unipic3" / "tiny.yaml"), "-c", str(extra))
    config = cli.config.model.init_args.backbone["config"]
    assert config["num_layers"] == 3 and config["num_attention_heads"] == 2
    # the fragment of `defaults:` was read: its datamodule is the one built
    assert (
        type(cli.datamodule).__name__
        == yaml.safe_load((EXPERIMENTS / "_base" / "tiny_flow_qwen.yaml").read_text())["data"][
            "class_path"
        ].rsplit(".", 1)[1]
    )


def test_merging_does_not_let_a_dict_smuggle_a_class(tmp_path, monkeypatch, capsys):
    """A class_path merged into a nested dict is still checked against the allowlist."""
    monkeypatch.delenv("OMNILAB_ALLOW_IMPORTS", raising=False)
    evil = tmp_path / "evil.yaml"
    evil.write_text(
        yaml.safe_dump({"model": {"init_args": {"backbone": {"config": {"x": {"class_path": "os.system"}}}}}})
    )
    with pytest.raises((SystemExit, RefusedImport)):
        parsed("-c", str(EXPERIMENTS / "unipic3" / "tiny.yaml"), "-c", str(evil))
    assert "os.system" in capsys.readouterr().err
