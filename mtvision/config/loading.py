"""Config files and overrides: YAML reading, ``_base_`` inheritance and ``_delete_``, ``key.sub=value``
overrides (all on raw dicts, validated once at the end), and writing a config back as YAML."""

from __future__ import annotations

import copy
import dataclasses
import os
import typing
from pathlib import Path
from typing import Any

import yaml

from .schema import Config, ConfigError
from .validation import _suggest, _validated, config_to_dict


class _Dumper(yaml.SafeDumper):
    """Block-style mappings, flow-style lists: `size: [128, 160]` under readable sections."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def save_config(cfg: Config, path) -> None:
    """Write ``cfg`` as YAML that :func:`load_config` reads back to an equal Config (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False))


def _merge(base: dict, child: dict, source, origins, prefix: str = "") -> dict:
    """Deep-merge ``child`` over ``base`` (child wins); records ``origins[dotted key] = source`` if given."""
    out = dict(base)
    for k, v in child.items():
        key = f"{prefix}{k}"
        if origins is not None:
            origins[key] = source
        if isinstance(v, dict):
            v = dict(v)
            replace = v.pop("_delete_", False)
            inherited = out.get(k) if isinstance(out.get(k), dict) and not replace else {}
            v = _merge(inherited, v, source, origins, key + ".")
        out[k] = v
    return out


def _read_yaml(path: Path, shown: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML in {shown}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{shown}: top level must be a mapping, got {type(data).__name__}")
    return data


def _load_raw(path: Path, shown: str, origins: dict, stack: tuple = ()) -> dict:
    real = path.resolve()
    if real in stack:
        chain = " -> ".join(str(p) for p in (*stack, real))
        raise ConfigError(f"_base_ cycle: {chain}")
    data = _read_yaml(path, shown)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"_base_ in {shown}: expected a file name or a list of them, got {bases!r}")
    merged: dict = {}
    for rel in bases:
        base_path = path.parent / rel
        base_shown = os.path.normpath(Path(shown).parent / rel)
        if not base_path.is_file():
            raise ConfigError(
                f"_base_ file {rel!r} included from {shown} not found (looked for {base_shown})"
            )
        # The base's own _load_raw already recorded where its keys came from (possibly deeper bases).
        merged = _merge(merged, _load_raw(base_path, base_shown, origins, (*stack, real)), None, None)
    return _merge(merged, data, shown, origins)


def _parse_override(text: str):
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"bad override {text!r}: expected key=value (e.g. train.amp=bf16)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"bad override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"bad override {text!r}: value is not valid YAML ({e})") from None
    return key, value


def _override_raw(raw: dict, overrides, origins: dict) -> dict:
    """Apply ``key.sub=value`` strings to a raw dict, following the schema to know what may be created."""
    if isinstance(overrides, str):
        overrides = [overrides]
    raw = copy.deepcopy(raw)
    defaults = config_to_dict(Config())
    for text in overrides or ():
        key, value = _parse_override(text)
        where = f"override {text!r}"
        node, default, tp = raw, defaults, Config
        parts = key.split(".")
        for i, part in enumerate(parts):
            dotted = ".".join(parts[: i + 1])
            is_field = dataclasses.is_dataclass(tp)
            if is_field:
                hints = typing.get_type_hints(tp)
                if part not in hints:
                    raise ConfigError(f"unknown key {dotted!r} in {where}{_suggest(dotted)}")
                tp, default = hints[part], default[part]
            elif typing.get_origin(tp) is dict:
                tp = typing.get_args(tp)[1]
            elif tp is not Any:  # a scalar or a list has no sub-keys
                raise ConfigError(f"{where}: {'.'.join(parts[:i])!r} is not a mapping, cannot set {key!r}")
            if i == len(parts) - 1:
                section = dataclasses.is_dataclass(tp) and isinstance(node.get(part), dict)
                if section and isinstance(value, dict):
                    value = _merge(node[part], value, None, None)  # a section keeps its other keys
                node[part] = value
                origins[dotted] = where
                break
            if node.get(part) is None:
                # An absent free-form dict field starts from its default, so `model.heads.seg.x=1` keeps
                # the other default heads; anything else absent starts empty.
                free_form_field = is_field and not dataclasses.is_dataclass(tp)
                node[part] = copy.deepcopy(default) if free_form_field and isinstance(default, dict) else {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"{where}: {dotted!r} is not a mapping, cannot set {key!r}")
            node = node[part]
    return raw


def apply_overrides(cfg: Config, overrides) -> Config:
    """Return a new Config with ``["a.b=value", ...]`` applied (values parsed as YAML) and re-validated,
    its ``custom_imports`` imported."""
    origins: dict = {}
    raw = _override_raw(config_to_dict(cfg), overrides, origins)
    return _validated(raw, "<config>", origins)


def load_config(path, overrides=()) -> Config:
    """Load a YAML config (with ``_base_`` inheritance), apply ``key.sub=value`` overrides, validate, and
    import its ``custom_imports``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    origins: dict = {}
    raw = _load_raw(p, str(path), origins)
    raw = _override_raw(raw, overrides, origins)
    return _validated(raw, str(path), origins)
