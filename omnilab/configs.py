"""How configs merge (docs/configs.md "How values merge"): dict-valued arguments merge key by key, at any depth.

jsonargparse merges a class's `init_args` key by key, but a dict-valued argument (a backbone spec, `sampler:`,
`lora:`) is one value to it: a later config file replaces the whole dict, and a command-line override one level
deeper than the dict (`--model.init_args.backbone.config.num_layers=1`) replaces the inner dict by
`{num_layers: "1"}`, a string. Users of Hydra and of the Lightning CLI expect the OmegaConf rule instead, which
`merging_dicts` gives the CLI while it parses:

- a later file's dict merges into the earlier one recursively; lists and scalars replace;
- `--a.b.c.d=v` on a dict-valued `a.b` sets that one leaf, `v` read as YAML (so `1` is an int, `true` a bool);
- the two sources of a backbone, `pretrained:` and `config:` (lightning_modules/components/backbones.py), are
  alternatives: a later spec naming one drops the other, so a paper spec can stand in for a tiny one.

What a config may build is unchanged: the merged config is checked by omnilab/allowlist.py like any other.
`merged_documents` applies the same rule to plain YAML documents (tests read experiments' chains with it).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

ALTERNATIVES = (frozenset({"pretrained", "config"}),)  # keys of which a dict holds one


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`override` merged into `base`: dicts recursively, everything else replaced; alternatives exclude each other."""
    out = {k: copy.deepcopy(v) for k, v in base.items()}
    for keys in ALTERNATIVES:
        if keys & override.keys():
            for key in keys - override.keys():
                out.pop(key, None)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_leaf(base: Mapping[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """`base` with the value at `a.b.c` set to `value` (missing levels created), as `deep_merge` would set it."""
    nested: Any = value
    for key in reversed(dotted.split(".")):
        nested = {key: nested}
    return deep_merge(base, nested)


def merged_documents(documents: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Config documents (fragments first) merged as the CLI merges them: `deep_merge`, one after the other.

    (jsonargparse also drops the earlier `init_args` a new `class_path` does not accept; plain documents keep them.)
    """
    out: dict[str, Any] = {}
    for doc in documents:
        out = deep_merge(out, doc or {})
    return out


@contextlib.contextmanager
def merging_dicts() -> Iterator[None]:
    """While parsing: dict-valued arguments merge with their previous value instead of replacing it."""
    from jsonargparse import _typehints
    from jsonargparse._loaders_dumpers import load_value

    original = _typehints.adapt_typehints

    def adapt(val: Any, typehint: Any, *args: Any, **kwargs: Any) -> Any:
        serialize = kwargs.get("serialize", args[0] if args else False)
        instantiate = kwargs.get("instantiate_classes", args[1] if len(args) > 1 else False)
        prev = kwargs.get("prev_val", args[2] if len(args) > 2 else None)
        origin = _typehints.get_typehint_origin(typehint)
        if (
            not (serialize or instantiate)
            and origin in _typehints.mapping_origin_types
            and isinstance(prev, dict)
        ):
            if isinstance(val, _typehints.NestedArg) and "." in str(val.key):
                leaf = load_value(val.val, simple_types=True) if isinstance(val.val, str) else val.val
                val = set_leaf(prev, val.key, leaf)
            elif isinstance(val, dict) and val is not prev:
                val = deep_merge(prev, val)
        return original(val, typehint, *args, **kwargs)

    _typehints.adapt_typehints = adapt
    try:
        yield
    finally:
        _typehints.adapt_typehints = original
