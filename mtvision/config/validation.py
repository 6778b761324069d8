"""The generic validation walk over the dataclass type hints: a raw (YAML-shaped) dict -> :class:`Config`,
every error a :class:`ConfigError` naming the dotted key and the file (or override) it came from."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal, Optional, Union

from .schema import Config, ConfigError

_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _schema_keys(cls, prefix=""):
    """Every dotted key the schema knows (sections and fields), for 'did you mean' suggestions."""
    out = []
    for name, tp in typing.get_type_hints(cls).items():
        out.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            out += _schema_keys(tp, prefix + name + ".")
    return out


def _is_optional(tp):
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any value"
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if _is_optional(tp):
        rest = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in rest) + " or null"
    if origin is tuple:
        return f"a list of {len(args)} {_type_name(args[0])}"
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    if origin is dict:
        return f"a mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    return tp.__name__


class _Walker:
    """Converts a raw (YAML-shaped) dict into dataclasses, reporting errors with their source."""

    def __init__(self, source: str, origins: Optional[dict[str, str]] = None):
        self.source, self.origins = source, origins or {}

    def where(self, key: str) -> str:
        parts = re.sub(r"\[\d+\]", "", key).split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in self.origins:
                return self.origins[".".join(parts[:n])]
        return self.source

    def fail(self, key, tp, value):
        raise ConfigError(
            f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__}) in {self.where(key)}"
        )

    def unknown(self, key):
        raise ConfigError(f"unknown key {key!r} in {self.where(key)}{_suggest(key)}")

    def convert(self, value, tp, key):
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if tp is Any:
            return value
        if dataclasses.is_dataclass(tp):
            return self.section(value, tp, key)
        if origin is Literal:
            if isinstance(value, str) and value in args:
                return value
            return self.fail(key, tp, value)
        if _is_optional(tp):
            if value is None:
                return None
            (inner,) = [a for a in args if a is not type(None)]
            try:
                return self.convert(value, inner, key)
            except ConfigError:
                return self.fail(key, tp, value)
        if origin in (tuple, list):
            if not isinstance(value, (list, tuple)) or (origin is tuple and len(value) != len(args)):
                return self.fail(key, tp, value)
            item_types = args if origin is tuple else args * len(value)
            items = [self.convert(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, item_types))]
            return tuple(items) if origin is tuple else items
        if origin is dict:
            if not isinstance(value, dict):
                return self.fail(key, tp, value)
            kt, vt = args
            return {self.convert(k, kt, key): self.convert(v, vt, f"{key}.{k}") for k, v in value.items()}
        if tp is float:
            # PyYAML reads `1e-3` (no dot) as a string; accept it as the number it obviously is.
            if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
                return float(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            return self.fail(key, tp, value)
        if tp is int and isinstance(value, bool):  # bool is an int subclass; True is not a batch size
            return self.fail(key, tp, value)
        if isinstance(value, tp):
            return value
        return self.fail(key, tp, value)

    def section(self, value, cls, key):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            return self.fail(key, cls, value)
        hints = typing.get_type_hints(cls)
        prefix = f"{key}." if key else ""
        for k in value:
            if k not in hints:
                self.unknown(f"{prefix}{k}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in value:
                continue
            name = prefix + f.name
            v = self.convert(value[f.name], hints[f.name], name)
            check = f.metadata.get("check")
            if check and not check[1](v):
                raise ConfigError(f"{name}: must be {check[0]}, got {v!r} in {self.where(name)}")
            kwargs[f.name] = v
        return cls(**kwargs)


def _suggest(key: str) -> str:
    """' (did you mean ...)': a close name in the same section, else a (very) close one in another."""
    known = _schema_keys(Config)
    prefix, _, leaf = key.rpartition(".")
    siblings = [k for k in known if k.rpartition(".")[0] == prefix]
    others = [k for k in known if k not in siblings]
    for pool, cutoff in ((siblings, 0.6), (others, 0.8)):
        close = difflib.get_close_matches(leaf, [k.rpartition(".")[2] for k in pool], n=1, cutoff=cutoff)
        if close:
            match = next(k for k in pool if k.rpartition(".")[2] == close[0])
            return f" (did you mean {match!r}?)"
    return ""


def _validated(raw: dict, source: str, origins: Optional[dict] = None) -> Config:
    """``raw`` validated into a :class:`Config`, with its ``custom_imports`` imported."""
    cfg = _Walker(source, origins).section(raw, Config, "")
    # Late, so that importing mtvision.config does not import mtvision.registry (which imports
    # ConfigError from here late in turn).
    from ..registry import import_custom_modules

    import_custom_modules(cfg.custom_imports)
    return cfg


def config_from_dict(d: dict, source: str = "<dict>") -> Config:
    """Validate a plain (YAML-shaped) dict into a :class:`Config`, absent keys taking their defaults, and
    import its ``custom_imports``."""
    return _validated(d, source)


def config_to_dict(cfg) -> dict:
    """A :class:`Config` (or any section) as plain dicts/lists/scalars, ready for ``yaml.safe_dump``."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg
