"""Build a transformers or diffusers model from `pretrained: <hub id or dir>` or `config: {...}`.

DESIGN.md "Configs": a backbone is passed as data, either real weights (`from_pretrained`) or a config
dict for a random-init model (the tiny experiments). This is the one place that turns such a dict
into a model, so every method reads its backbones the same way.
"""

from __future__ import annotations

from typing import Any, TypeVar

from torch import nn

ModelT = TypeVar("ModelT", bound=nn.Module)


def build_backbone(
    cls: type[ModelT], pretrained: str | None = None, config: dict[str, Any] | None = None, **kwargs: Any
) -> ModelT:
    """`cls.from_pretrained(pretrained, **kwargs)`, or a random-init `cls` built from the `config` dict.

    transformers models are built as `cls(cls.config_class(**config, **kwargs))`, diffusers models
    (no `config_class`) as `cls.from_config({**config, **kwargs})`. Exactly one of `pretrained` and
    `config` must be given.
    """
    if (pretrained is None) == (config is None):
        raise ValueError(
            f"{cls.__name__}: give exactly one of `pretrained` (hub id or local dir) and `config` (dict), "
            f"got pretrained={pretrained!r}, config={'given' if config is not None else None}"
        )
    if pretrained is not None:
        return cls.from_pretrained(pretrained, **kwargs)
    config_class = getattr(cls, "config_class", None)
    if config_class is not None:
        return cls(config_class(**config, **kwargs))
    return cls.from_config({**config, **kwargs})
