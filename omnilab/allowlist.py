"""Configs are code: only allowlisted `class_path` values are ever imported (DESIGN.md "Reliability rules").

jsonargparse imports every `class_path` it meets (and resolves dotted names) through one function,
`import_object`. `guard_imports()` wraps it so that a dotted path outside the allowlist is refused
*before* anything is imported: a module with an import side effect named in a config never runs.
A user extends the allowlist explicitly, with `OMNILAB_ALLOW_IMPORTS=pkg1,pkg2`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

ALLOWED_ROOTS = frozenset(
    {
        # the suite
        "omnilab",
        "lightning_modules",
        "datamodules",
        "callbacks",
        "metrics",
        "rewards",
        # the stacks it is built on
        "torch",
        "lightning",
        "pytorch_lightning",
        "lightning_fabric",
        "diffusers",
        "transformers",
        "peft",
        "torchmetrics",
        # what jsonargparse itself resolves while reading type hints
        "builtins",
        "typing",
        "collections",
        "pathlib",
        "datetime",
        "enum",
    }
)
ALLOW_ENV = "OMNILAB_ALLOW_IMPORTS"


class RefusedImport(ValueError):
    """A config named a class outside the allowlist."""


def allowed_roots() -> frozenset[str]:
    """The allowlisted top-level packages, plus those named in $OMNILAB_ALLOW_IMPORTS."""
    extra = {p.strip() for p in os.environ.get(ALLOW_ENV, "").split(",") if p.strip()}
    return ALLOWED_ROOTS | extra


def check_import_path(path: str) -> None:
    """Raise RefusedImport unless the dotted `path` lies under an allowlisted top-level package."""
    root = path.strip().split(".", 1)[0]
    if root not in allowed_roots():
        raise RefusedImport(
            f"class_path {path!r} is outside the allowlist ({', '.join(sorted(ALLOWED_ROOTS - {'builtins'}))}); "
            f"nothing was imported. To allow it, set {ALLOW_ENV}={root}"
        )


def _guarded(original: Callable[..., Any]) -> Callable[..., Any]:
    def import_object(name: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(name, str) and "." in name:
            check_import_path(name)
        return original(name, *args, **kwargs)

    import_object.__wrapped__ = original  # type: ignore[attr-defined]
    return import_object


def guard_imports() -> None:
    """Route every jsonargparse `import_object` through the allowlist (idempotent)."""
    import jsonargparse._typehints  # noqa: F401
    import jsonargparse._util as util

    original = util.import_object
    if hasattr(original, "__wrapped__"):
        return
    guarded = _guarded(original)
    for name, module in list(sys.modules.items()):
        if name.startswith("jsonargparse") and getattr(module, "import_object", None) is original:
            module.import_object = guarded
