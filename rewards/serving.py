"""`omnilab serve reward --config ...`: serve a reward over HTTP (rewards/remote.py's server) on its own GPUs.

Two kinds of config:

- a reward config: `reward: {class_path, init_args}` at the top level (optional `host`, `port`), e.g.
  a trained JRM checkpoint as `rewards.reward_model.RewardModelReward`;
- an experiment config whose GRPO rewards are `rewards.remote.RemoteReward`s (experiments/uniref/msgrpo.yaml,
  experiments/unipic2/pdtr.yaml): each RemoteReward carries `serve: {class_path, init_args}`, what runs
  behind its URL; `--reward NAME` picks one (its key in the reward dict, or its `name`), and the port comes
  from its URL, so the trainer and the server cannot disagree. The experiment's `defaults` fragments are
  read too (the later file wins a name).

`--gpus 2,3` sets CUDA_VISIBLE_DEVICES before anything touches CUDA (the reward's `device: auto` then uses
the first of them); `--dry-run` prints what would be served and exits. The class paths are allowlisted
as every config's are. The server binds 127.0.0.1 unless `--host` says otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import urllib.parse
from pathlib import Path
from typing import Any

import yaml

from omnilab.allowlist import check_import_path

REMOTE = "rewards.remote.RemoteReward"


def remote_specs(config: str | Path) -> dict[str, dict[str, Any]]:
    """{name: RemoteReward init_args} of every RemoteReward in an experiment config and its `defaults`."""
    from omnilab.cli import expand_defaults

    files = expand_defaults(["--config", str(config)])[1::2]
    found: dict[str, dict[str, Any]] = {}

    def visit(obj: Any, key: str | None) -> None:
        if isinstance(obj, dict):
            if obj.get("class_path") == REMOTE:
                args = dict(obj.get("init_args") or {})
                found[key or str(args.get("name"))] = args
                if args.get("name") and args["name"] != key:
                    found.setdefault(str(args["name"]), args)
                return
            for k, v in obj.items():
                visit(v, str(k))
        elif isinstance(obj, list):
            for v in obj:
                visit(v, key)

    for path in files:
        visit(yaml.safe_load(Path(path).read_text()) or {}, None)
    return found


def serve_target(config: str | Path, reward: str | None) -> tuple[dict[str, Any], str | None, int | None]:
    """(the reward's {class_path, init_args}, host from its URL or None, port or None) a config names."""
    data = yaml.safe_load(Path(config).read_text()) or {}
    if isinstance(data.get("reward"), dict) and "class_path" in data["reward"]:
        if reward is not None:
            raise SystemExit(
                f"{config} is a reward config (a top-level `reward:`): --reward {reward!r} names nothing in it"
            )
        return data["reward"], data.get("host"), data.get("port")
    specs = remote_specs(config)
    if not specs:
        raise SystemExit(f"{config}: no top-level `reward:` and no {REMOTE} in it: nothing to serve")
    if reward is None or reward not in specs:
        names = ", ".join(sorted(specs))
        raise SystemExit(
            f"{config} names the remote rewards {names}: pick one with --reward NAME (got {reward!r})"
        )
    args = specs[reward]
    if not isinstance(args.get("serve"), dict) or "class_path" not in args["serve"]:
        raise SystemExit(
            f"{config}: the remote reward {reward!r} ({args.get('url')}) has no `serve: {{class_path, init_args}}`"
        )
    url = urllib.parse.urlsplit(str(args.get("url")))
    return args["serve"], None, url.port


def build(spec: dict[str, Any]) -> Any:
    """Instantiate {class_path, init_args} (allowlisted)."""
    path = spec.get("class_path")
    if not isinstance(path, str) or "." not in path:
        raise SystemExit(f"a reward spec needs class_path: module.Class, got {spec}")
    check_import_path(path)
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)(**dict(spec.get("init_args") or {}))


def main(argv: list[str]) -> None:
    """`omnilab serve reward --config FILE [--reward NAME] [--host H] [--port P] [--gpus IDS] [--dry-run]`."""
    parser = argparse.ArgumentParser(prog="omnilab serve", description="Serve a reward over HTTP.")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("reward", help="a reward from a reward config or an experiment's RemoteReward")
    p.add_argument(
        "--config", required=True, help="a reward config (top-level reward:) or an experiment config"
    )
    p.add_argument("--reward", help="which RemoteReward of an experiment config (its name)")
    p.add_argument("--host", default=None, help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: the config's / the URL's; 0: any)")
    p.add_argument("--gpus", default=None, help="CUDA_VISIBLE_DEVICES for the reward, e.g. 2,3")
    p.add_argument("--max-mb", type=float, default=256.0, help="largest request accepted (MiB)")
    p.add_argument("--dry-run", action="store_true", help="print what would be served and exit")
    args = parser.parse_args(argv)
    if args.gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpus
    spec, host, port = serve_target(args.config, args.reward)
    host = args.host or host or "127.0.0.1"
    port = args.port if args.port is not None else (port if port is not None else 8765)
    if args.dry_run:
        print(json.dumps({"serve": spec, "host": host, "port": port}, indent=1))
        return
    from omnilab.allowlist import guard_imports
    from rewards.remote import serve

    guard_imports()
    serve(build(spec), host, port, int(args.max_mb * 2**20))
