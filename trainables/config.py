"""Typed, validated configuration objects.

Every config is a dataclass whose fields are declared with :func:`param`, which carries the
field's meaning/unit (``help``) and what is allowed (range, choices, registry). :func:`build`
turns a plain mapping (from YAML, the CLI or a sweep) into the typed object and fails, before
any work starts, with a :class:`ConfigError` naming the field, the value and what is allowed.

Polymorphic sections (an attack, a defense) carry a ``name``; the registry named in the
field's metadata picks the implementation, whose ``Config`` subclass lists the extra keys it
accepts. Layering is done on plain mappings with :func:`merge` (defaults < YAML < CLI/sweep):
the dataclass defaults fill whatever no layer set.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Mapping

import yaml

from .registry import Registry, UnknownNameError, did_you_mean

_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A configuration value that is not allowed; the message names the field."""


def param(
    default: Any = _MISSING,
    help: str = "",
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    choices: tuple | list | None = None,
    registry: Registry | None = None,
    factory: typing.Callable[[], Any] | None = None,
) -> Any:
    """A config field: ``help`` gives its meaning and unit; the rest says what is allowed.

    ``low``/``high`` bound numbers (inclusive, ``low_open`` makes the lower bound strict);
    ``choices`` lists the allowed values; ``registry`` means the value (or, for a section, its
    ``name``) must be registered there.
    """
    meta = dict(help=help, low=low, high=high, low_open=low_open, choices=choices, registry=registry)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class Config:
    """Base of every config dataclass: a ``resolve`` hook for defaults that follow other fields,
    then a ``check`` hook for rules between fields. ``key_hints`` maps a key that is not a field
    to where it lives (said in the unknown-key error)."""

    key_hints: typing.ClassVar[dict[str, str]] = {}

    def resolve(self) -> None:  # no defaults taken from other fields unless a subclass has them
        return None

    def check(self, path: str) -> None:  # no cross-field rules unless a subclass has them
        return None

    def to_dict(self) -> dict:
        return to_dict(self)

    def replace(self, **changes: Any) -> "Config":
        return build(type(self), merge(to_dict(self), changes))


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _describe(meta: Mapping) -> str:
    parts = []
    if meta.get("choices") is not None:
        parts.append("one of " + ", ".join(repr(c) for c in meta["choices"]))
    if meta.get("low") is not None or meta.get("high") is not None:
        lo = meta.get("low")
        hi = meta.get("high")
        # an unbounded end is open: inf and nan are never allowed
        left = "(" if lo is None or meta.get("low_open") else "["
        right = ")" if hi is None else "]"
        parts.append(f"in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}")
    return " and ".join(parts)


def _check_value(value: Any, meta: Mapping, path: str) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{path}: {value!r} is not allowed; allowed: {_describe(meta)}")
    reg = meta.get("registry")
    if reg is not None and isinstance(value, str) and value not in reg:
        raise ConfigError(f"{path}: {UnknownNameError(reg.kind, value, reg.names(), reg.plugin_errors.get(value, ''))}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = meta.get("low"), meta.get("high")
        bad = (lo is not None and (value < lo or (meta.get("low_open") and value == lo))) or (
            hi is not None and value > hi
        )
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}: {value!r} is not a finite number; allowed: {('a finite number ' + _describe(meta)).strip()}")
        if bad:
            raise ConfigError(f"{path}: {value!r} is out of range; allowed: {_describe(meta)}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str, meta: Mapping) -> Any:
    """Check ``value`` against the annotation ``tp`` (and coerce int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: a value is required (got null)")
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, path, meta)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not allowed; allowed: one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path, registry=meta.get("registry"))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
            items = [_convert(v, a, _join(path, i), {}) for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(v, item_tp, _join(path, i), meta) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): _convert(v, val_tp, _join(path, str(k)), {}) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        value = float(value)
    elif tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
    elif tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
    elif isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    _check_value(value, meta, path)
    return value


def build(cls: type, data: Any, path: str = "", registry: Registry | None = None) -> Any:
    """Build the config dataclass ``cls`` from a mapping, validating every field.

    With ``registry``, ``data['name']`` chooses the implementation and its ``Config`` class
    (a subclass of ``cls``) is built instead.
    """
    if isinstance(data, cls):
        data = to_dict(data)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {data!r}")
    if registry is not None:
        name = data.get("name", _default_name(cls))
        if name is None:
            raise ConfigError(f"{_join(path, 'name')}: required; known {registry.kind}s: {', '.join(registry.names())}")
        try:
            impl = registry.get(name)
        except UnknownNameError as exc:
            raise ConfigError(f"{_join(path, 'name')}: {exc}") from None
        cls = getattr(impl, "Config", cls)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        hint = getattr(cls, "key_hints", {}).get(unknown[0])
        guess = "" if hint else did_you_mean(unknown[0], sorted(fields))
        raise ConfigError(
            f"{_join(path, unknown[0])}: unknown key{f' ({hint})' if hint else ''};{guess} allowed keys: "
            f"{', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        fpath = _join(path, name)
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], fpath, f.metadata)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise ConfigError(f"{fpath}: required ({f.metadata.get('help', '')})")
        elif f.metadata.get("registry") is not None and dataclasses.is_dataclass(hints[name]):
            default = f.default_factory() if f.default_factory is not _MISSING else f.default
            if default is not None:
                kwargs[name] = build(hints[name], to_dict(default), fpath, registry=f.metadata["registry"])
    obj = cls(**kwargs)
    if isinstance(obj, Config):
        obj.resolve()  # so the resolved config, saved with each run, holds the values used
        obj.check(path)
    return obj


def _default_name(cls: type) -> str | None:
    for f in dataclasses.fields(cls):
        if f.name == "name" and f.default is not _MISSING:
            return f.default
    return None


def to_dict(cfg: Any) -> Any:
    """Plain, YAML-safe data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def merge(base: Mapping | None, override: Mapping | None) -> dict:
    """Deep-merge ``override`` into ``base`` (neither is modified).

    A section whose ``name`` changes is replaced, not merged: the keys of one attack or defense
    mean nothing to another.
    """
    out = dict(base or {})
    for key, value in (override or {}).items():
        old = out.get(key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            if "name" in value and old.get("name") not in (None, value["name"]):
                out[key] = dict(value)
            else:
                out[key] = merge(old, value)
        else:
            out[key] = value
    return out


def set_path(data: Mapping, dotted: str, value: Any) -> dict:
    """Return ``data`` with ``a.b.c`` set to ``value`` (intermediate sections created)."""
    keys = dotted.split(".")
    override: dict = {}
    node = override
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return merge(data, override)


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict:
    """``["train.epochs=3", "attack.name=blended"]`` -> nested mapping (values parsed as YAML)."""
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
        out = set_path(out, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return out


def load_yaml(path: str) -> dict:
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path!r} is not valid YAML{where}: {what}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path!r} is not a text (YAML) file") from None
    except OSError as exc:
        raise ConfigError(f"config file {path!r} cannot be read: {exc.strerror or exc}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path!r}: expected a mapping at the top level")
    return dict(data)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) for every field, for ``bibau config --help``-style listings."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not _MISSING else (
            f.default_factory() if f.default_factory is not _MISSING else "(required)"
        )
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and f.metadata.get("registry") is None:
            rows += describe(tp, _join(prefix, f.name))
        else:
            allowed = _describe(f.metadata)
            text = f.metadata.get("help", "") + (f" ({allowed})" if allowed else "")
            rows.append((_join(prefix, f.name), _type_name(tp), to_dict(default), text))
    return rows
