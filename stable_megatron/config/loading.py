"""Reading a run's configuration: a YAML recipe (with `base:` recipes under it) merged with
dotted `a.b=c` overrides, checked against the schema of `sections.py` key by key and type by
type. Every user error raises `ConfigError` with one line naming the key; nothing here knows
what a key means (that is `rules.py`).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from stable_megatron.config.sections import Config, ConfigError, method_keys


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif isinstance(tp, types.UnionType) or origin is typing.Union:
        for arg in typing.get_args(tp):
            try:
                return _coerce(name, value, arg)
            except ConfigError:
                pass
    elif origin is list:
        if isinstance(value, list):
            (item_type,) = typing.get_args(tp)
            return [_coerce(f"{name}[{i}]", v, item_type) for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{name}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'recipe'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    extra = method_keys(cls)
    hints.update(extra)
    fields = [f.name for f in dataclasses.fields(cls)] + list(extra)
    unknown = sorted(str(k) for k in set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]}; valid keys under {prefix or 'the top level'}: "
            f"{', '.join(fields)}"
        )
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, {} if value is None else value, name)
        else:
            kwargs[key] = _coerce(name, value, tp)
    obj = cls(**{k: v for k, v in kwargs.items() if k not in extra})
    for key in extra.keys() & kwargs.keys():  # the methods' keys: set after the defaults
        setattr(obj, key, kwargs[key])
    return obj


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=20")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_recipe(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe's sections; `base: other.yaml` (relative to the recipe) is read first and
    the recipe's own keys override it, so method recipes state only what they change."""
    path = Path(path)
    if path.resolve() in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path.resolve()))
        raise ConfigError(f"recipe {path}: base recipes form a cycle ({chain})")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"recipe {path}: base must be a path to a recipe, got {base!r}")
    return _merge(read_recipe(path.parent / base, (*_seen, path.resolve())), data)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"recipe {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"recipe {path}: not UTF-8 text ({err.reason} at byte {err.start})") \
            from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ConfigError(f"recipe {path}{where}: invalid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError(f"recipe {path}: expected a mapping of sections, got {kind}")
    return data


def load_config(
    recipe: str | os.PathLike | None, overrides: list[str] | None = None
) -> Config:
    """Recipe YAML + `a.b=c` overrides -> Config (types checked, not yet validated)."""
    data = read_recipe(recipe) if recipe is not None else {}
    # Recipe metadata, not run settings: per-world-size layouts read by `plan` (plan.py) and
    # the default methods / learning rates of `stable-megatron sweep` (sweep.py).
    data.pop("layouts", None)
    data.pop("sweep", None)
    data = _merge(data, parse_overrides(overrides or []))
    return _build(Config, data, "")


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "")


def dump_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
