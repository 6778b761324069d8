"""The registries every component is found through, by the name a config gives it.

One :class:`Registry` per kind: ``HEADS``, ``NECKS``, ``BACKBONES``, ``DATASETS``, ``BALANCERS``,
``TASKS`` and ``ARCHS`` (multi-task architectures: a builder taking the part factories). A registry reads like a read-only dict (``name in HEADS``, ``HEADS["fcos"]``, ``list(HEADS)``);
``@HEADS.register("name")`` adds a class. The built-in components register themselves the same way, in
the modules that define them; a registry imports those modules the first time it is read, so
``mtvision.registry.HEADS`` lists the built-ins even before ``mtvision.models`` was imported.

A user's own component is a module that registers it; a config lists such modules in its top-level
``custom_imports: [my_plugin, ...]``, which :func:`import_custom_modules` imports (from ``sys.path`` /
``PYTHONPATH``) before anything is built. :meth:`Registry.build` checks the keyword arguments a config
gives against the constructor's signature once, naming the config key in the error.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

__all__ = ["Registry", "HEADS", "NECKS", "BACKBONES", "DATASETS", "BALANCERS", "TASKS", "ARCHS",
           "import_custom_modules", "check_kwargs"]


def _config_error(message: str) -> Exception:
    from .config import ConfigError  # late: the config package imports nothing from here at import time

    return ConfigError(message)


class Registry(Mapping):
    """Name -> class, filled by :meth:`register`.

    Args:
        kind: what the entries are, for messages (``"head"``).
        builtins: modules whose import registers the built-in entries; imported on the first read.
    """

    def __init__(self, kind: str, builtins: Sequence[str] = ()):
        self.kind = kind
        self._entries: dict[str, Any] = {}
        self._builtins = tuple(builtins)
        self._loaded = not self._builtins

    def _load_builtins(self) -> None:
        if not self._loaded:
            self._loaded = True  # first: the modules being imported read the registry themselves
            for module in self._builtins:
                importlib.import_module(module)

    def register(self, name: Optional[str] = None, *, override: bool = False) -> Callable[[Any], Any]:
        """Decorator registering a class (or other object) under ``name`` (default: its ``__name__``
        lower-cased). A name taken by another object is a ValueError unless ``override``."""
        def add(obj):
            key = name if name is not None else obj.__name__.lower()
            if not isinstance(key, str) or not key or "." in key:
                raise ValueError(f"{self.kind} registry: names are non-empty strings without '.', "
                                 f"got {key!r}")
            if key in self._entries and self._entries[key] is not obj and not override:
                raise ValueError(f"{self.kind} {key!r} is already registered ({self._entries[key]!r}); "
                                 f"pick another name or pass override=True")
            self._entries[key] = obj
            return obj
        return add

    def __getitem__(self, name: str):
        self._load_builtins()
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        self._load_builtins()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self._load_builtins()
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._entries

    def lookup(self, name: Any, key: str):
        """The entry ``name``; a ConfigError naming the config ``key`` and the choices when there is none."""
        if not isinstance(name, str) or name not in self:
            raise _config_error(f"{key}: unknown {self.kind} {name!r} (choose from: {', '.join(self)})")
        return self[name]

    def build(self, name: Any, key: str, kwargs: Optional[Mapping[str, Any]] = None,
              injected: Optional[Mapping[str, Any]] = None):
        """``cls(**injected, **kwargs)`` for the entry ``name``, with ``kwargs`` (from the config section
        ``key``) checked against the constructor first (:func:`check_kwargs`). A ValueError / TypeError of
        the constructor becomes a ConfigError naming the argument when its message starts with one."""
        cls = self.lookup(name, f"{key}.name")
        kwargs, injected = dict(kwargs or {}), dict(injected or {})
        what = f"{self.kind} {name!r}"
        check_kwargs(cls, kwargs, key, what, injected=tuple(injected))
        try:
            return cls(**injected, **kwargs)
        except (TypeError, ValueError) as e:
            arg = str(e).split(" ", 1)[0].rstrip(":")
            where = f"{key}.{arg}" if arg in kwargs else key
            raise _config_error(f"{where}: invalid value for {what}: {e}") from e

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self)})"


def check_kwargs(cls: Any, kwargs: Mapping[str, Any], key: str, what: str,
                 injected: Sequence[str] = ()) -> None:
    """ConfigError naming ``key.arg`` for an argument ``cls`` does not take, one set automatically
    (``injected``), or a required one missing. A constructor taking ``**kwargs`` accepts any name."""
    target = cls.__init__ if isinstance(cls, type) else cls
    params = inspect.signature(target).parameters
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = [p for p in params if p != "self" and params[p].kind in named]
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    settable = [p for p in accepted if p not in injected]
    for k in kwargs:
        if k in injected:
            raise _config_error(f"{key}.{k}: set automatically for {what}; remove it")
        if k not in accepted and not open_ended:
            raise _config_error(f"{key}.{k}: unexpected argument for {what} "
                                f"(accepted: {', '.join(settable) or 'none'})")
    for p in settable:
        if params[p].default is inspect.Parameter.empty and p not in kwargs:
            raise _config_error(f"{key}.{p}: required by {what}")


def import_custom_modules(modules: Sequence[str], key: str = "custom_imports") -> None:
    """Import every module named in ``modules`` (dotted names on ``sys.path``), so the components they
    register are there before anything is built. ConfigError naming ``key[i]`` when one fails to import."""
    for i, name in enumerate(modules or ()):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise _config_error(f"{key}[{i}]: cannot import {name!r}: {e} "
                                "(is its folder on PYTHONPATH?)") from e


HEADS = Registry("head", ["mtvision.models.heads"])
NECKS = Registry("neck", ["mtvision.models.necks"])
BACKBONES = Registry("backbone", ["mtvision.models.backbones"])
DATASETS = Registry("dataset", ["mtvision.data.builders"])
BALANCERS = Registry("balancing method", ["mtvision.balancing"])
TASKS = Registry("task", ["mtvision.tasks"])
ARCHS = Registry("architecture", ["mtvision.models.multitask", "mtvision.models.arch"])
