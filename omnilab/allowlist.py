"""Configs are code: what a config may build is named here, everything else is refused (README "Security and
reliability").

A config names Python objects by dotted path (`class_path: ...`, a class given as a value, a type string, a
short class name jsonargparse resolves). jsonargparse imports every such path through one function,
`import_object`; `guard_imports()` routes it through this allowlist, twice:

- before anything is imported, the *name* must lie in a named family (`FAMILIES`), under no `DENIED` entry
  (builtins, os, subprocess, importlib, pickle, functools, operator, torch.hub, torch.load, ...) and with no
  private (`_x`) part, so a module with an import side effect named in a config never runs;
- after import, before use, the *object* must be a class of that family, defined where the family lives, so
  a re-export (`lightning.pytorch.loggers.mlflow.os.system` is `posix.system`) or a function in an allowed
  package (`transformers.pipeline`) is refused too.

Beyond `import_object`: values typed `Any` (and `dict[str, Any]`) are never instantiated by jsonargparse and
reach the code as plain dicts; `check_config` (run by `OmnilabCLI` before anything is built) checks every
`class_path` of the parsed config at any depth (lists, dict values, `dict_kwargs`, callbacks, loggers,
optimizers, schedulers, hyperparameters read from a checkpoint); and while a config is read only omegaconf's
own resolvers (`oc.env`, `oc.select`, ...; none of them evaluates code) can be interpolated. Type hints are
resolved from code, not from a config, and are not affected. A user extends the allowlist explicitly with
`OMNILAB_ALLOW_IMPORTS=pkg1,pkg2.sub` (any class or function under them; never a DENIED entry).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

ALLOW_ENV = "OMNILAB_ALLOW_IMPORTS"

LIGHTNING_PARTS = ("callbacks", "loggers", "strategies", "plugins", "profilers", "accelerators")
BUILTIN_TYPES = tuple(
    f"builtins.{t}" for t in ("bool", "int", "float", "complex", "str", "bytes", "list", "tuple")
)


@dataclass(frozen=True)
class Family:
    """Classes a config may name: those under `roots`, defined under `roots`, subclassing one of `bases`."""

    what: str
    roots: tuple[str, ...]
    bases: tuple[str, ...] = ()  # dotted paths; empty: any class
    functions: bool = False  # also plain functions (only families a user adds)
    forms: bool = False  # also typing's special forms (`typing.Mapping`, `typing.Optional`)


FAMILIES: tuple[Family, ...] = (
    Family(
        "the suite's classes",
        (
            "lightning_modules",
            "datamodules",
            "callbacks",
            "metrics",
            "rewards",
            "omnilab.chat",
            "omnilab.fsdp",
        ),
    ),
    Family(
        "torch optimizers and lr schedulers",
        ("torch.optim",),
        (
            "torch.optim.Optimizer",
            "torch.optim.lr_scheduler.LRScheduler",
            "torch.optim.lr_scheduler.ReduceLROnPlateau",
        ),
    ),
    Family("torch.nn modules", ("torch.nn",), ("torch.nn.Module",)),
    Family("FSDP settings and wrap policies", ("torch.distributed.fsdp",)),
    Family(
        "Lightning callbacks, loggers, strategies, plugins, profilers and accelerators",
        (
            *(
                f"{ns}.{part}"
                for ns in ("lightning.pytorch", "pytorch_lightning")
                for part in LIGHTNING_PARTS
            ),
            "lightning.fabric.plugins",
            "lightning_fabric.plugins",
        ),
    ),
    Family(
        "transformers models, layers and configs",
        ("transformers",),
        ("torch.nn.Module", "transformers.PretrainedConfig"),
    ),
    Family(
        "diffusers models, layers and schedulers",
        ("diffusers",),
        ("torch.nn.Module", "diffusers.SchedulerMixin"),
    ),
    Family("peft adapter configs and layers", ("peft",), ("torch.nn.Module", "peft.PeftConfig")),
    Family("torchmetrics metrics", ("torchmetrics",), ("torchmetrics.Metric",)),
    # values of `type`-typed arguments and type strings ("int | None", "typing.Mapping[str, int]")
    Family("type names", ("typing", "collections.abc"), forms=True),
    Family("builtin data types", BUILTIN_TYPES),
)

# Never allowed, whatever a family or $OMNILAB_ALLOW_IMPORTS says: an entry denies itself and everything
# under it (a class *defined* under one is refused too, whatever path reached it).
DENIED = frozenset(
    {
        "builtins",  # open, eval, exec, __import__, getattr, ... (BUILTIN_TYPES are the exception)
        "os", "posix", "nt", "subprocess", "pty", "signal", "shutil", "tempfile", "socket", "ssl", "http",
        "urllib", "requests", "ctypes", "sys", "site", "runpy", "code", "codeop", "pdb", "timeit",
        "importlib", "pkgutil", "zipimport", "pydoc", "setuptools", "pip",
        "pickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve", "dbm", "joblib",
        "functools", "operator", "inspect", "types", "ast", "gc", "atexit", "asyncio", "multiprocessing",
        "threading", "concurrent", "io", "codecs", "pathlib", "glob", "tarfile", "zipfile", "sqlite3",
        "torch.hub", "torch.load", "torch.save", "torch.serialization", "torch.jit", "torch.package",
        "torch.ops", "torch.library", "torch.utils.cpp_extension", "numpy", "jsonargparse", "omegaconf",
        "yaml", "webdataset", "huggingface_hub", "transformers.dynamic_module_utils", "transformers.pipelines",
        "diffusers.pipelines", "diffusers.utils", "transformers.utils",
    }
)  # fmt: skip

# omegaconf's own resolvers: none evaluates code (env vars, selections, YAML-typed decoding)
SAFE_RESOLVERS = frozenset(
    {"oc.env", "oc.select", "oc.decode", "oc.create", "oc.deprecated", "oc.dict.keys", "oc.dict.values"}
)


class RefusedImport(ValueError):
    """A config named something outside the allowlist; nothing of it was built."""


def extra_roots() -> tuple[str, ...]:
    """The packages a user allowed with $OMNILAB_ALLOW_IMPORTS."""
    return tuple(p.strip() for p in os.environ.get(ALLOW_ENV, "").split(",") if p.strip())


def families() -> tuple[Family, ...]:
    """The named families, plus one for the packages of $OMNILAB_ALLOW_IMPORTS."""
    extra = extra_roots()
    return FAMILIES + ((Family(f"${ALLOW_ENV}", extra, functions=True),) if extra else ())


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + ".")


def denied_entry(path: str) -> str | None:
    """The DENIED entry a dotted path lies under (None when it lies under none, or is a BUILTIN_TYPES name)."""
    if path in BUILTIN_TYPES:
        return None
    parts = path.split(".")
    return next((e for e in (".".join(parts[:n]) for n in range(len(parts), 0, -1)) if e in DENIED), None)


def _summary() -> str:
    return "; ".join(
        f"{f.what} ({', '.join(f.roots[:3])}{', ...' if len(f.roots) > 3 else ''})" for f in FAMILIES
    )


def check_name(path: str) -> Family:
    """The family a dotted path belongs to, judged on the name alone (nothing is imported); else RefusedImport."""
    path = path.strip()
    parts = path.split(".")
    if not path or not all(p.isidentifier() for p in parts):
        raise RefusedImport(f"{path!r} is not a dotted import path; nothing was imported")
    private = [p for p in parts if p.startswith("_")]
    if private:
        raise RefusedImport(f"{path!r} names a private attribute ({private[0]}); nothing was imported")
    entry = denied_entry(path)
    if entry is not None:
        raise RefusedImport(
            f"{path!r} is refused: configs may not name {entry!r} (it can run code, read or write files, or "
            f"load pickles); nothing was imported"
        )
    for family in families():
        if any(_under(path, root) for root in family.roots):
            return family
    root = parts[0]
    raise RefusedImport(
        f"class_path {path!r} is outside the allowlist; nothing was imported. A config may build: {_summary()}. "
        f"To allow a package of your own, set {ALLOW_ENV}={root}"
    )


def _resolve(dotted: str) -> Any:
    """Import a dotted path: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and not module_name.startswith(err.name):
                raise  # a dependency of the module is missing, not the path itself
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(f"no module named {parts[0]!r}")


def defined_at(obj: Any) -> str | None:
    """Where a class, function or module is defined (`module.qualname`), or None for other objects."""
    if inspect.ismodule(obj):
        return obj.__name__
    if inspect.isclass(obj) or inspect.isroutine(obj):
        module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
        return f"{module}.{name}" if module and name else None
    return None


def check_object(path: str, obj: Any, family: Family) -> None:
    """Raise RefusedImport unless `obj` (what `path` imported) is a class of `family`, defined in the family."""
    home = defined_at(obj)
    kind = "class" if inspect.isclass(obj) else "module" if inspect.ismodule(obj) else "function"
    if family.forms and home is None and type(obj).__module__ == "typing":
        return  # a type expression, nothing to call
    if home is None:
        raise RefusedImport(f"{path!r} is a {type(obj).__name__} instance, not a class; refused")
    if denied_entry(home) is not None or not any(_under(home, root) for root in family.roots):
        raise RefusedImport(f"{path!r} is {home} (defined outside {family.what}); refused")
    if inspect.ismodule(obj):
        if family is not FAMILIES[0] and not family.functions:
            raise RefusedImport(f"{path!r} is a module; a config names classes")
        return
    if kind == "function" and not family.functions:
        raise RefusedImport(
            f"{path!r} is a function; a config may only name classes of {family.what} (functions can run anything)"
        )
    if kind == "class" and family.bases:
        bases = [_resolve(b) for b in family.bases]
        if not issubclass(obj, tuple(bases)):
            raise RefusedImport(
                f"{path!r} is not one of {family.what} (a subclass of {', '.join(family.bases)}); refused"
            )


def check_import_path(path: str) -> Any:
    """Check a dotted path (a class, or a module of the suite) and return what it names; RefusedImport if not allowed.

    The name is judged before anything is imported; the object after its (allowed) module is imported.
    """
    family = check_name(path)
    obj = _resolve(path.strip())
    check_object(path, obj, family)
    return obj


def class_paths(value: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """(location, class_path) of every class spec in a parsed config: Namespaces, dicts and lists, at any depth."""
    if hasattr(value, "as_dict") and callable(value.as_dict):
        value = value.as_dict()
    if isinstance(value, Mapping):
        path = value.get("class_path")
        if path is not None:
            yield where or "<root>", str(path)
        for key, sub in value.items():
            yield from class_paths(sub, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list | tuple):
        for i, sub in enumerate(value):
            yield from class_paths(sub, f"{where}[{i}]")


def check_config(config: Any) -> None:
    """Check every `class_path` of a parsed config against the allowlist; RefusedImport names the first bad one."""
    for where, path in class_paths(config):
        try:
            check_import_path(path)
        except RefusedImport as err:
            raise RefusedImport(f"{where}: {err}") from None
        except (ImportError, AttributeError) as err:
            raise RefusedImport(f"{where}: class_path {path!r} does not import: {err}") from None


@contextlib.contextmanager
def safe_resolvers() -> Iterator[None]:
    """While reading configs, only omegaconf's own resolvers may be interpolated (`${oc.env:X}` yes, others no)."""
    try:
        from omegaconf.basecontainer import BaseContainer
    except ImportError:  # no omegaconf: no interpolation at all
        yield
        return
    registered = BaseContainer._resolvers
    BaseContainer._resolvers = {k: v for k, v in registered.items() if k in SAFE_RESOLVERS}
    try:
        yield
    finally:
        added = {k: v for k, v in BaseContainer._resolvers.items() if k not in registered}
        BaseContainer._resolvers = {**registered, **added}


def _guarded(original: Callable[..., Any]) -> Callable[..., Any]:
    def import_object(name: Any, check_path: bool = True) -> Any:
        # check_path=False: the path comes from code (a type annotation), not from a config value
        if not check_path or not isinstance(name, str):
            return original(name, check_path=check_path)
        family = check_name(name)
        obj = original(name)
        check_object(name, obj, family)
        return obj

    import_object.__wrapped__ = original  # type: ignore[attr-defined]
    return import_object


def plain(value: Any) -> Any:
    """A parsed value as plain data: jsonargparse Namespaces become dicts, at any depth."""
    if hasattr(value, "as_dict") and callable(value.as_dict):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def _as_data(original: Callable[..., Any]) -> Callable[..., Any]:
    def adapt_classes_any(
        val: Any, typehint: Any, serialize: bool, instantiate_classes: bool, *args: Any
    ) -> Any:
        out = original(val, typehint, serialize, instantiate_classes, *args)
        return plain(out) if instantiate_classes else out  # what a module receives: dicts, never Namespaces

    adapt_classes_any.__wrapped__ = original  # type: ignore[attr-defined]
    return adapt_classes_any


def guard_imports() -> None:
    """Route every jsonargparse `import_object` through the allowlist; keep `Any` values as data (idempotent)."""
    import jsonargparse
    import jsonargparse._typehints as typehints
    import jsonargparse._util as util

    if not hasattr(typehints.adapt_classes_any, "__wrapped__"):
        typehints.adapt_classes_any = _as_data(typehints.adapt_classes_any)

    jsonargparse.set_parsing_settings(
        instantiate_subclass_spec_in_any=False,  # a class spec in an Any/dict[str, Any] value stays data
        validate_subclass_spec_in_any=False,  # (checked against the allowlist by check_config instead)
        import_path_denylist=sorted(DENIED),  # jsonargparse's own check, a second layer
        import_path_allowlist=list(BUILTIN_TYPES),
    )
    original = util.import_object
    if hasattr(original, "__wrapped__"):
        return
    guarded = _guarded(original)
    for name, module in list(sys.modules.items()):
        if name.startswith("jsonargparse") and getattr(module, "import_object", None) is original:
            module.import_object = guarded
