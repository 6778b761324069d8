"""YAML experiment configs -> validated dataclasses.

A config file is a YAML mapping whose keys mirror :class:`Config`. Any key may be left out (its default
is used). ``_base_: other.yaml`` (or a list of files) inherits from other files, resolved relative to
the including file and deep-merged, later bases over earlier ones and the including file over all; a
mapping holding ``_delete_: true`` replaces the inherited mapping instead of merging into it.
Command-line overrides ``key.sub=value`` are applied last, the value parsed as YAML. The top-level
``custom_imports: [my_plugin, ...]`` lists modules imported once the config is validated, so the
components they register (:mod:`mtvision.registry`) can be named in it.

Validation is one generic walk over the dataclass type hints; every error is a :class:`ConfigError`
naming the dotted key and the file (or override) it came from.

The schema lives in :mod:`.schema`, the walk in :mod:`.validation`, files and overrides in :mod:`.loading`.
"""

from .loading import apply_overrides, load_config, save_config
from .schema import (
    AugmentConfig,
    BalancerConfig,
    Config,
    ConfigError,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    ScheduleConfig,
    TrainConfig,
)
from .validation import config_from_dict, config_to_dict

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
