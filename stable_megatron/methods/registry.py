"""The list of stability methods: the built-in ones (every module of this package but `base`
and `registry`, each registering its method when imported) and any registered at run time, by
a module that calls `register` when imported. Modules named in the environment variable
`STABLE_MEGATRON_METHODS` (comma-separated import names) are imported when the registry is
first read, in every process of a run, so a method outside this package trains under any
launcher."""

from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path

from stable_megatron.methods.base import Field, Method

PLUGINS_ENV = "STABLE_MEGATRON_METHODS"

NOT_METHODS = ("base", "registry")  # the modules of this package that define no method

_methods: dict[str, Method] = {}
_loaded = False


def register(method: Method) -> Method:
    """Add `method`; its name and its config keys must be new. Returns it."""
    from stable_megatron.config import base_model_keys

    if not method.name or not method.name.isidentifier():
        raise ValueError(f"a method needs a name that is an identifier, got {method.name!r}")
    if method.name in _methods:
        raise ValueError(f"method {method.name!r} is registered already")
    taken = {f.name: m.name for m in _methods.values() for f in m.fields}
    taken.update({key: "the model config" for key in base_model_keys()})
    for f in method.fields:
        if f.name in taken:
            raise ValueError(f"method {method.name!r}: model.{f.name} belongs to {taken[f.name]}")
    _methods[method.name] = method
    ordered = sorted(_methods.values(), key=lambda m: (m.order, m.name))
    _methods.clear()
    _methods.update((m.name, m) for m in ordered)
    return method


def unregister(name: str) -> None:
    """Remove a method registered at run time (tests)."""
    _methods.pop(name)


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    package = Path(__file__).parent
    for info in sorted(pkgutil.iter_modules([str(package)]), key=lambda i: i.name):
        if info.name not in NOT_METHODS:
            importlib.import_module(f"stable_megatron.methods.{info.name}")
    for name in filter(None, (s.strip() for s in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ImportError(f"{PLUGINS_ENV}: cannot import method module {name!r} ({err})") \
                from err


def methods() -> tuple[Method, ...]:
    """Every registered method, by `Method.order`, then by name."""
    _load()
    return tuple(_methods.values())


def get(name: str) -> Method:
    _load()
    if name not in _methods:
        raise KeyError(f"no method {name!r}; registered: {', '.join(_methods)}")
    return _methods[name]


def enabled(cfg) -> list[Method]:
    """The methods switched on in `cfg`, in registry order."""
    return [m for m in methods() if m.enabled(cfg)]


def model_fields() -> tuple[Field, ...]:
    """The `model.*` keys the methods own, in registry order."""
    return tuple(f for m in methods() for f in m.fields)


def variants() -> dict[str, dict]:
    """Every method variant's name -> its `model` overrides (the benchmarks' method names)."""
    out: dict[str, dict] = {}
    for method in methods():
        out.update(method.variants)
    return out


def export_blockers(cfg, fmt: str) -> list[str]:
    return [b for m in enabled(cfg) for b in m.export_blockers(cfg, fmt)]


def hooks(cfg, module, state=None, engine=None) -> list:
    """The step hooks of every enabled method, in registry order."""
    return [h for m in enabled(cfg) for h in m.hooks(cfg, module, state, engine)]
