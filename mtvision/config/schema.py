"""The config schema: one dataclass per section (:class:`Config` holds them all), the value checks kept in
field metadata, and :class:`ConfigError`."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal, Optional


class ConfigError(ValueError):
    """A config file, dict or override is invalid; the message names the key and its source."""


# Value checks live in field metadata ("check": (description, predicate on the whole value)).


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
    instead of stretching it to ``size``. ``check``: read every sample of the file datasets once before
    the first step (headers, shapes, label ranges) so a corrupt file stops the run before any work is
    done; ``null`` (default) = on for datasets read from files with at most 5000 samples, off for larger
    ones and for the synthetic scenes; ``true``/``false`` force it.
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
    check: Optional[bool] = None


@dataclass
class ModelConfig:
    """Free-form dicts handed to ``mtvision.models.build_model`` (which validates their contents)."""

    arch: dict[str, Any] = _f({"name": "hps"})
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
    #: ``checkpoints/best.pth`` with the whole training state (optimizer, RNGs, ...: resumable); by default
    #: it keeps what inference and Δm need (weights, config, metrics), a fraction of ``last.pth``'s size
    full_best_checkpoint: bool = False
    #: every this many steps: the per-task gradient norms and pairwise cosines on the shared parameters
    #: (TensorBoard ``relations/``, ``metrics.json`` ``relations``); gradient methods at the parameter level
    #: give them every step at no cost, loss weightings pay one forward and T backward passes; 0: off
    monitor_interval: int = _f(0, _NONNEG)
    #: every this many steps: TAG's lookahead inter-task affinity (also one forward more per task); 0: off
    affinity_interval: int = _f(0, _NONNEG)
    #: the SGD step size of the affinity's lookahead; null: the optimizer's current learning rate
    affinity_lr: Optional[float] = _f(None, _POSITIVE)
    #: tasks trained as usual but left out of the best-checkpoint score and of Δm (reported apart)
    auxiliary_tasks: list[str] = _f([])


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
    #: modules imported (from ``sys.path`` / ``PYTHONPATH``) once the config is validated, before anything
    #: is built, so the heads, datasets, balancers or tasks they register (``mtvision.registry``) can be
    #: named in it; the name follows mmengine
    custom_imports: list[str] = _f([])
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    balancer: BalancerConfig = field(default_factory=BalancerConfig)

