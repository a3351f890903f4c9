"""Build a transformers or diffusers model from `pretrained: <hub id or dir>` or `config: {...}`.

README "Running an experiment": a backbone is passed as data, either real weights (`from_pretrained`) or a config
dict for a random-init model (the tiny experiments). This is the one place that turns such a dict
into a model, so every method reads its backbones the same way, and the one place that checks them:
a spec key or a config key the library does not know (`pretraind`, `num_hiden_layers`) is an error
that names it and the nearest valid key; `trust_remote_code` is refused (it runs the repository's code).

`BackboneSpec` / `PlainConfig` type such arguments for the CLI: jsonargparse reads them as plain data
(numbers, strings, lists, dicts) and refuses a `class_path` anywhere inside, so nothing is ever built
from them but the model itself.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from typing import Any, TypedDict, TypeVar

from jsonargparse.typing import register_type
from torch import nn

ModelT = TypeVar("ModelT", bound=nn.Module)

# from_pretrained arguments a spec may add to `pretrained` (never trust_remote_code)
LOAD_KEYS = frozenset({"subfolder", "revision", "variant", "dtype", "torch_dtype"})
REMOTE_CODE = "trust_remote_code"


class PlainConfig(dict):
    """The type of a `config:` argument: plain data (numbers, strings, lists, dicts), never a class to build."""


def plain_config(value: Any, where: str = "config") -> dict[str, Any]:
    """`value` as a plain dict of data; ValueError on a class spec (`class_path`/`init_args`) or a non-data value."""

    def walk(v: Any, at: str) -> Any:
        if hasattr(v, "as_dict") and callable(v.as_dict):  # a jsonargparse Namespace
            v = v.as_dict()
        if isinstance(v, Mapping):
            spec = {"class_path", "init_args"} & set(v)
            if spec:
                raise ValueError(
                    f"{at} is plain data (the library config's keyword arguments) and may not name a class "
                    f"({sorted(spec)[0]}: {v.get('class_path', '...')!r}); nothing was built from it"
                )
            if not all(isinstance(k, str) for k in v):
                raise ValueError(f"{at}: keys must be strings")
            return {k: walk(x, f"{at}.{k}") for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [walk(x, f"{at}[{i}]") for i, x in enumerate(v)]
        if v is None or isinstance(v, bool | int | float | str):
            return v
        raise ValueError(
            f"{at} holds a {type(v).__name__}; only numbers, strings, lists and dicts are allowed"
        )

    if not isinstance(value, Mapping) and not hasattr(value, "as_dict"):
        raise ValueError(f"{where} must be a dict of the library config's keyword arguments, got {value!r}")
    return walk(value, where)


register_type(PlainConfig, serializer=plain_config, deserializer=plain_config)


class BackboneSpec(TypedDict, total=False):
    """A backbone as data: `pretrained` (hub id or local dir, with from_pretrained's `subfolder`, `revision`,
    `variant`, `dtype`) or `config` (the config class's keyword arguments, random init)."""

    pretrained: str
    config: PlainConfig
    subfolder: str
    revision: str
    variant: str
    dtype: str


def _nearest(key: str, valid: set[str]) -> str:
    match = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def _unknown(keys: Any, valid: set[str], what: str, also: set[str] = frozenset()) -> None:
    for key in keys:
        if key not in valid:
            raise ValueError(f"unknown key {key!r} in {what}{_nearest(key, valid | also)}")


def _init_keys(init: Any) -> set[str] | None:
    """The keyword names `init` accepts (None when it takes **kwargs: anything)."""
    params = inspect.signature(init).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.name != "self" and p.kind is not p.VAR_POSITIONAL}


# special-token and tying attributes every transformers config carries whether or not its class lists them
# (transformers v5 dataclass configs keep unlisted keyword arguments as attributes)
TRANSFORMERS_COMMON_KEYS = frozenset(
    {
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "tie_word_embeddings",
    }
)


def check_config_keys(config_class: type, config: Mapping[str, Any], where: str = "config") -> None:
    """ValueError naming the first key of `config` that `config_class` does not take (and the nearest one).

    transformers: its `__init__` arguments, `attribute_map` aliases, and `sub_configs` (`text_config`,
    `vision_config`, ...) checked against their own classes; diffusers (`register_to_config`): `__init__`.
    """
    valid = _init_keys(config_class.__init__)
    if valid is None:
        return
    valid |= set(getattr(config_class, "attribute_map", None) or {})
    if hasattr(config_class, "sub_configs"):  # a transformers config
        valid |= TRANSFORMERS_COMMON_KEYS
    subs = dict(getattr(config_class, "sub_configs", None) or {})
    valid |= set(subs)
    _unknown(config, valid, f"{where} ({config_class.__name__})")
    for key, sub in subs.items():
        if isinstance(config.get(key), Mapping) and isinstance(sub, type):
            check_config_keys(sub, config[key], f"{where}.{key}")


def check_spec(cls: type, kwargs: Mapping[str, Any]) -> None:
    """ValueError for a spec key that is neither `pretrained`, `config` nor a from_pretrained key (LOAD_KEYS)."""
    if REMOTE_CODE in kwargs:
        raise ValueError(
            f"{cls.__name__}: {REMOTE_CODE} is refused: it would run code from the model repository"
        )
    what = f"the {cls.__name__} spec (pretrained, config, {', '.join(sorted(LOAD_KEYS))})"
    _unknown(kwargs, set(LOAD_KEYS), what, also={"pretrained", "config"})


def check_backbone(cls: type, spec: Mapping[str, Any]) -> None:
    """Check a `{pretrained | config, ...}` spec for `cls` without building anything (errors as build_backbone's)."""
    rest = {k: v for k, v in spec.items() if k not in ("pretrained", "config")}
    check_spec(cls, rest)
    if spec.get("config") is not None:
        config_class = getattr(cls, "config_class", None)
        check_config_keys(config_class or cls, {**plain_config(spec["config"]), **rest})


def build_backbone(
    cls: type[ModelT],
    pretrained: str | None = None,
    config: dict[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> ModelT:
    """`cls.from_pretrained(pretrained, **kwargs)`, or a random-init `cls` built from the `config` dict.

    `kwargs` are the spec's loading keys (LOAD_KEYS); `overrides` are config attributes the calling code sets
    on either path (e.g. a vocabulary size it derived), never taken from a user's spec.

    transformers models are built as `cls(cls.config_class(**config, **kwargs))`, diffusers models
    (no `config_class`) as `cls.from_config({**config, **kwargs})`. Exactly one of `pretrained` and
    `config` must be given; unknown spec and config keys are errors (`check_spec`, `check_config_keys`).
    """
    check_spec(cls, kwargs)
    if (pretrained is None) == (config is None):
        raise ValueError(
            f"{cls.__name__}: give exactly one of `pretrained` (hub id or local dir) and `config` (dict), "
            f"got pretrained={pretrained!r}, config={'given' if config is not None else None}"
        )
    overrides = dict(overrides or {})
    if pretrained is not None:
        return cls.from_pretrained(pretrained, **kwargs, **overrides)
    config = {**plain_config(config), **overrides, **kwargs}
    config_class = getattr(cls, "config_class", None)
    check_config_keys(config_class or cls, config)
    if config_class is not None:
        return cls(config_class(**config))
    return cls.from_config(config)
