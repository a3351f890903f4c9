"""Reading shipped experiment YAMLs in tests: the files of an experiment's `defaults` chain, merged as the CLI does.

A dict-typed argument (a backbone spec) is replaced whole by a later file, as jsonargparse replaces it; the
trainer callbacks list likewise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from omnilab.cli import expand_defaults

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "experiments" / "_base" / "default.yaml"
EXPERIMENTS = sorted(p for p in (REPO / "experiments").rglob("*.yaml") if "_base" not in p.parts)


def experiment_id(path: Path) -> str:
    """`<method>/<name>` of an experiment YAML."""
    return f"{path.parent.name}/{path.stem}"


def chain(path: Path) -> list[dict[str, Any]]:
    """The YAML documents of an experiment's defaults chain, fragments first, the experiment last."""
    configs = expand_defaults(["--config", str(path)])[1::2]
    return [yaml.safe_load(Path(c).read_text()) or {} for c in configs]


def init_args(path: Path, section: str) -> dict[str, Any]:
    """The merged `init_args` of `model` or `data` after the defaults chain."""
    args: dict[str, Any] = {}
    for doc in chain(path):
        args.update((doc.get(section) or {}).get("init_args") or {})
    return args


def class_path(path: Path, section: str) -> str | None:
    """The `class_path` of `model` or `data` after the defaults chain."""
    found = None
    for doc in chain(path):
        found = (doc.get(section) or {}).get("class_path", found)
    return found


def trainer_args(path: Path) -> dict[str, Any]:
    """The merged `trainer` section (default.yaml first, then the chain)."""
    args: dict[str, Any] = dict(yaml.safe_load(BASE.read_text())["trainer"])
    for doc in chain(path):
        args.update(doc.get("trainer") or {})
    return args


def callback_args(path: Path, name: str) -> list[dict[str, Any]]:
    """The init_args of each configured trainer callback whose class name is `name`."""
    return [
        dict(c.get("init_args") or {})
        for c in trainer_args(path).get("callbacks") or []
        if isinstance(c, dict) and str(c.get("class_path", "")).rsplit(".", 1)[-1] == name
    ]
