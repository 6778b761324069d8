"""YAML experiment configs -> validated dataclasses.

A config file is a YAML mapping whose keys mirror :class:`Config`. Any key may be left out (its default
is used). ``_base_: other.yaml`` (or a list of files) inherits from other files, resolved relative to
the including file and deep-merged, later bases over earlier ones and the including file over all; a
mapping holding ``_delete_: true`` replaces the inherited mapping instead of merging into it.
Command-line overrides ``key.sub=value`` are applied last, the value parsed as YAML.

Validation is one generic walk over the dataclass type hints; every error is a :class:`ConfigError`
naming the dotted key and the file (or override) it came from.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

__all__ = [
    "ConfigError",
    "Config",
    "AugmentConfig",
    "DataConfig",
    "ModelConfig",
    "LossConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "TrainConfig",
    "BalancerConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "save_config",
    "apply_overrides",
]


class ConfigError(ValueError):
    """A config file, dict or override is invalid; the message names the key and its source."""


# ---------------------------------------------------------------------------------------------------
# Schema. Value checks live in field metadata ("check": (description, predicate on the whole value)).


def _leaves(v):
    if isinstance(v, (list, tuple)):
        for x in v:
            yield from _leaves(x)
    elif isinstance(v, dict):
        for x in v.values():
            yield from _leaves(x)
    elif v is not None:
        yield v


_POSITIVE = ("> 0", lambda v: all(x > 0 for x in _leaves(v)))
_NONNEG = (">= 0", lambda v: all(x >= 0 for x in _leaves(v)))
_NONEMPTY = ("non-empty", lambda v: len(v) > 0)


def _f(default, check=None):
    """A dataclass field with an optional value check; list/dict defaults are copied per instance."""
    meta = {"check": check} if check else {}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class AugmentConfig:
    """Training-time augmentation (``mtvision.data.transforms``), applied jointly to the image and every
    label so geometry stays right. The defaults do nothing.

    ``hflip``: probability of a horizontal flip (negates the normal's x component). ``scale_range``:
    a random scale factor ``s`` drawn uniformly from ``[lo, hi]`` (metric depth is divided by ``s``,
    labels resized with nearest neighbour). ``crop``: (H, W) random crop taken after scaling, padded with
    ignore/invalid values where the scaled image is smaller; ``null`` crops back to ``data.size``.
    ``color_jitter``: strength in [0, 1) of brightness/contrast/saturation jitter (image only).
    """

    hflip: float = _f(0.0, (">= 0 and <= 1", lambda v: 0.0 <= v <= 1.0))
    scale_range: tuple[float, float] = _f((1.0, 1.0), ("two values 0 < lo <= hi",
                                                       lambda v: 0 < v[0] <= v[1]))
    crop: Optional[tuple[int, int]] = _f(None, _POSITIVE)
    color_jitter: float = _f(0.0, (">= 0 and < 1", lambda v: 0.0 <= v < 1.0))


@dataclass
class DataConfig:
    """Dataset and loader. ``size`` is (H, W) in pixels; ``mean``/``std`` are per RGB channel in [0, 1].

    ``kwargs`` go to the dataset class (e.g. NYUv2's ``eigen_crop``); ``augment`` is used for the training
    split only; ``skip_bad``: a sample that cannot be read (corrupt or missing file, wrong shape, label out
    of range) is skipped and counted instead of stopping the run with an error naming the file.
    ``keep_ratio`` (datasets read from files): resize every image to the largest size that fits inside
    ``size`` with its aspect ratio kept, padded at the bottom and right (detection's usual resize),
    instead of stretching it to ``size``.
    """

    dataset: str = "synthetic"
    root: Optional[str] = None
    size: tuple[int, int] = _f((128, 160), _POSITIVE)
    num_train: int = _f(2000, _POSITIVE)
    num_val: int = _f(200, _POSITIVE)
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = _f(8, _POSITIVE)
    num_workers: int = _f(2, _NONNEG)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = _f((0.229, 0.224, 0.225), _POSITIVE)
    num_classes: int = _f(6, _POSITIVE)
    tasks: list[str] = _f(["seg", "depth", "normal"], _NONEMPTY)
    kwargs: dict[str, Any] = _f({})
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    skip_bad: bool = False
    keep_ratio: bool = False


@dataclass
class ModelConfig:
    """Free-form dicts handed to ``mtvision.models.build_model`` (which validates their contents)."""

    backbone: dict[str, Any] = _f({"name": "resnet18", "pretrained": None})
    neck: dict[str, Any] = _f({"name": "fpn", "out_channels": 128})
    heads: dict[str, Any] = _f(
        {
            "seg": {"name": "segmentation", "num_classes": 6},
            "depth": {"name": "depth"},
            "normal": {"name": "normals"},
        }
    )


@dataclass
class LossConfig:
    """Per-task loss weights (a task not listed weighs 1.0) and the segmentation ignore label."""

    weights: dict[str, float] = _f({}, _NONNEG)
    ignore_index: int = 255


@dataclass
class OptimizerConfig:
    """Optimizer; the backbone's learning rate is ``lr * backbone_lr_mult``."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = _f(1e-3, _POSITIVE)
    weight_decay: float = _f(1e-4, _NONNEG)
    momentum: float = _f(0.9, _NONNEG)
    backbone_lr_mult: float = _f(1.0, _NONNEG)
    #: One fused kernel for the whole update (torch's ``fused=True``) where torch has one for the
    #: parameters' device (CPU, CUDA); false: torch's default (foreach) implementation.
    fused: bool = True


@dataclass
class ScheduleConfig:
    """Per-iteration LR schedule with linear warm-up from ``warmup_factor * lr`` over ``warmup_iters``."""

    name: Literal["cosine", "poly", "constant"] = "cosine"
    warmup_iters: int = _f(0, _NONNEG)
    warmup_factor: float = _f(0.001, _POSITIVE)
    power: float = _f(0.9, _POSITIVE)
    min_lr_ratio: float = _f(0.0, _NONNEG)


@dataclass
class TrainConfig:
    """Training loop; every interval is in iterations. ``grad_clip`` is a max global grad norm or None."""

    max_iters: int = _f(1000, _POSITIVE)
    eval_interval: int = _f(500, _POSITIVE)
    checkpoint_interval: int = _f(500, _POSITIVE)
    log_interval: int = _f(20, _POSITIVE)
    amp: Literal["none", "bf16", "fp16"] = "none"
    grad_clip: Optional[float] = _f(None, _POSITIVE)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: memory format of the images and the model's weights (NHWC is faster for convolutions on GPU)
    channels_last: bool = False
    #: ``torch.compile`` the model (the fused loss op is compile-safe)
    compile: bool = False
    #: convert BatchNorm layers to SyncBatchNorm when training on more than one process
    sync_bn: bool = False
    #: stop with an error after this many non-finite steps in a row (each one is skipped and counted)
    max_consecutive_skips: int = _f(20, _POSITIVE)
    #: ask torch for deterministic kernels (``torch.use_deterministic_algorithms``)
    deterministic: bool = False


@dataclass
class BalancerConfig:
    """Name and keyword arguments for ``mtvision.balancing.build_balancer``."""

    name: str = "ew"
    kwargs: dict[str, Any] = _f({})
    #: gradient methods only: per-task gradients w.r.t. the shared parameters, or the shared features
    level: Literal["param", "rep"] = "param"


@dataclass
class Config:
    """A whole experiment."""

    work_dir: str = "work_dirs/default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    balancer: BalancerConfig = field(default_factory=BalancerConfig)


# ---------------------------------------------------------------------------------------------------
# Generic validation walk.

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


def config_from_dict(d: dict, source: str = "<dict>") -> Config:
    """Validate a plain (YAML-shaped) dict into a :class:`Config`; absent keys take their defaults."""
    return _Walker(source).section(d, Config, "")


def config_to_dict(cfg) -> dict:
    """A :class:`Config` (or any section) as plain dicts/lists/scalars, ready for ``yaml.safe_dump``."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


class _Dumper(yaml.SafeDumper):
    """Block-style mappings, flow-style lists: `size: [128, 160]` under readable sections."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def save_config(cfg: Config, path) -> None:
    """Write ``cfg`` as YAML that :func:`load_config` reads back to an equal Config (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False))


# ---------------------------------------------------------------------------------------------------
# Files, inheritance and overrides (all on raw dicts, validated once at the end).


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
    """Return a new Config with ``["a.b=value", ...]`` applied (values parsed as YAML) and re-validated."""
    origins: dict = {}
    raw = _override_raw(config_to_dict(cfg), overrides, origins)
    return _Walker("<config>", origins).section(raw, Config, "")


def load_config(path, overrides=()) -> Config:
    """Load a YAML config (with ``_base_`` inheritance), apply ``key.sub=value`` overrides, validate."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    origins: dict = {}
    raw = _load_raw(p, str(path), origins)
    raw = _override_raw(raw, overrides, origins)
    return _Walker(str(path), origins).section(raw, Config, "")
