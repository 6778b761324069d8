"""MultiTaskModel (backbone -> neck -> dict of heads) and ``build_model`` from the config's ``model`` section."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Optional

from torch import Tensor, nn

from ..config import ConfigError
from .backbones import BackboneError
from ..registry import ARCHS, BACKBONES, HEADS, NECKS, check_kwargs
from .parts import ModelParts, last_stage_parameters

__all__ = ["MultiTaskModel", "build_model", "model_parts", "NO_NECK"]

# Heads are built as cls(in_channels=neck.out_channels, strides=neck.strides, **kwargs) (the backbone's
# lists without a neck); necks as cls(in_channels=backbone.out_channels, strides=backbone.strides, **kwargs).
# model.neck.name meaning "no neck": the heads take the backbone's levels as they are.
NO_NECK = "none"
# Keys of model.backbone; anything else is an error naming the key.
BACKBONE_KEYS = ("name", "pretrained", "out_indices", "output_stride", "timm_kwargs")


class MultiTaskModel(nn.Module):
    """One backbone and neck shared by several task heads.

    ``forward(images [B,3,H,W]) -> {task: map at [H, W]}``; with the built-in heads: ``"seg"`` logits
    ``[B,C,H,W]``, ``"depth"`` ``[B,1,H,W]`` positive metres, ``"normal"`` ``[B,3,H,W]`` raw vectors (the
    keys are the task names the heads were given). A single head is the single-task baseline.

    Args:
        backbone: module returning a list of maps, with ``out_channels`` and ``strides``.
        neck: module mapping that list to the list the heads take (``None``: the backbone maps as they are;
            ``self.neck`` is then an ``nn.Identity`` without parameters).
        heads: task name -> module called as ``head(features, image_size)``.
    """

    def __init__(self, backbone: nn.Module, neck: Optional[nn.Module], heads: Mapping[str, nn.Module]):
        super().__init__()
        if not heads:
            raise ValueError("MultiTaskModel needs at least one head")
        self.backbone = backbone
        self.neck = neck if neck is not None else nn.Identity()
        self.heads = nn.ModuleDict(dict(heads))

    #: ``forward_features`` is a representation every task reads (``balancer.level: rep`` measures there).
    rep_level = True

    @property
    def patch_size(self) -> int:
        """Inputs must be multiples of it (a ViT backbone's patch; 1 for CNNs)."""
        return int(getattr(self.backbone, "patch_size", 1) or 1)

    @property
    def has_neck(self) -> bool:
        """Whether a neck sits between the backbone and the heads (False: ``self.neck`` is an identity)."""
        return not isinstance(self.neck, nn.Identity)

    @property
    def tasks(self) -> list[str]:
        """Task names, in head order."""
        return list(self.heads.keys())

    def forward_features(self, images: Tensor) -> list[Tensor]:
        """``images [B,3,H,W]`` -> the shared features the heads take: the neck levels (list of
        ``[B, C, H/s, W/s]``, finest first), or the backbone levels when there is no neck."""
        if images.dim() != 4:
            raise ValueError(f"images must be [B,3,H,W], got shape {tuple(images.shape)}")
        return list(self.neck(self.backbone(images)))

    def forward_heads(self, features: Sequence[Tensor], image_size: Sequence[int]) -> dict[str, Tensor]:
        """Every head on the same ``features``; each map is returned at ``image_size = (H, W)``."""
        return {task: head(features, image_size) for task, head in self.heads.items()}

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.forward_heads(self.forward_features(images), images.shape[-2:])

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters every task depends on (backbone, then neck)."""
        yield from self.backbone.parameters()
        yield from self.neck.parameters()

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The last shared layer's parameters (what GradNorm measures gradient norms on): the neck's, or
        without a neck the last stage of the backbone (the last child module of a CNN backbone's timm
        body that has parameters, e.g. ``layer4`` of a ResNet; a ViT's last transformer block)."""
        return list(self.neck.parameters()) or last_stage_parameters(self.backbone)

    def compile_parts(self) -> list[nn.Module]:
        """The modules ``train.compile`` compiles one by one (each is called as a whole)."""
        return [self.backbone, *([self.neck] if self.has_neck else []), *self.heads.values()]

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Parameters only ``task`` depends on (its head)."""
        if task not in self.heads:
            raise KeyError(f"unknown task {task!r} (model tasks: {', '.join(self.heads)})")
        return self.heads[task].parameters()


# ---------------------------------------------------------------------------------------------------
# build_model


def _as_dict(section: Any, key: str) -> dict:
    if section is None:
        return {}
    if dataclasses.is_dataclass(section) and not isinstance(section, type):
        return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
    if not isinstance(section, Mapping):
        raise ConfigError(f"{key}: expected a mapping, got {type(section).__name__} {section!r}")
    return dict(section)


def _neck_name(cfg: dict) -> str:
    """``cfg["name"]`` (popped); the error lists ``none`` too."""
    name = cfg.pop("name", None)
    if not isinstance(name, str) or name not in NECKS:
        what = "required" if name is None else f"unknown neck {name!r}"
        raise ConfigError(f"model.neck.name: {what} (choose from: {', '.join([*NECKS, NO_NECK])})")
    return name


def build_model(cfg: Any) -> nn.Module:
    """The multi-task model of the config's ``model`` section (a dict or ``ModelConfig``)::

        arch:     {name: hps}                                 # absent: hps; or soft_sharing, cross_stitch,
                                                              # mtan, padnet with their arguments
        backbone: {name: resnet18, pretrained: null | true | /path/weights.pth|.safetensors, out_indices: null,
                   output_stride: null | 8 | 16, timm_kwargs: {}}
        neck:     {name: fpn, out_channels: 128}              # absent: fpn with defaults
                                                              # {name: none} or null: no neck
        heads:    {seg: {name: segmentation, num_classes: 6}, depth: {name: depth}, normal: {name: normals}}

    ``hps`` (hard parameter sharing) is a :class:`MultiTaskModel`; the other architectures
    (:mod:`mtvision.models.arch`) build their copies of the backbone, neck and heads from the same
    sections. The LibMTL / MTAN protocol model (dilated ResNet-50 and one DeepLab head per task)::

        backbone: {name: resnet50, output_stride: 8, out_indices: [1, 4]}    # strides 4 and 8
        neck:     {name: none}
        heads:    {seg: {name: deeplab_segmentation, num_classes: 13, low_level_channels: null}, ...}

    Heads get ``in_channels``/``strides`` from the neck (from the backbone without one), the neck from
    the backbone. Errors are
    :class:`mtvision.config.ConfigError` naming the key (``model.heads.seg.name: unknown head ...``); a
    missing pretrained file raises ``FileNotFoundError`` naming ``model.backbone.pretrained`` and the path.
    """
    cfg = _as_dict(cfg, "model")
    for k in cfg:
        if k not in ("arch", "backbone", "neck", "heads"):
            raise ConfigError(f"model.{k}: unknown key (expected: arch, backbone, neck, heads)")
    parts = model_parts(cfg)
    acfg = _as_dict(cfg.get("arch"), "model.arch")
    name = acfg.pop("name", "hps")
    builder = ARCHS.lookup(name, "model.arch.name")
    check_kwargs(builder, acfg, "model.arch", f"architecture {name!r}", injected=("parts",))
    try:
        return builder(parts, **acfg)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        if isinstance(e, BackboneError):
            raise ConfigError(f"model.backbone.{e.key}: {e} (model.arch.name is {name!r})") from e
        arg = str(e).split(" ", 1)[0].rstrip(":")
        raise ConfigError(f"model.arch{'.' + arg if arg in acfg else ''}: {e}") from e


def model_parts(cfg: dict) -> ModelParts:
    """Factories of the ``model`` section's backbone, neck and heads (:class:`ModelParts`); each
    section is checked once here, so a wrong key fails before any architecture is built."""
    bcfg = _as_dict(cfg.get("backbone"), "model.backbone")
    if "name" not in bcfg:
        raise ConfigError("model.backbone.name: required (a timm model name, e.g. resnet18)")
    name = bcfg.pop("name")
    if not (name in BACKBONES and name != "timm"):  # a timm model name (a registered plugin: its own args)
        for k in bcfg:
            if k not in BACKBONE_KEYS:
                raise ConfigError(f"model.backbone.{k}: unexpected key (allowed: {', '.join(BACKBONE_KEYS)}; "
                                  "other timm.create_model arguments go in timm_kwargs)")

    def backbone() -> nn.Module:
        try:
            if name in BACKBONES and name != "timm":
                return BACKBONES.build(name, "model.backbone", bcfg)
            return BACKBONES["timm"](name, **bcfg)
        except BackboneError as e:
            raise ConfigError(f"model.backbone.{e.key}: {e}") from e
        except FileNotFoundError as e:
            raise FileNotFoundError(f"model.backbone.pretrained: {e}") from e

    # neck ("none" / null: the heads take the backbone's levels)
    if "neck" not in cfg:
        ncfg: Optional[dict] = {"name": "fpn"}
    elif cfg["neck"] is None:
        ncfg = None
    else:
        ncfg = _as_dict(cfg["neck"], "model.neck")
    if ncfg is None or ncfg.get("name") == NO_NECK:
        extra = sorted(k for k in (ncfg or {}) if k != "name")
        if extra:
            raise ConfigError(f"model.neck.{extra[0]}: unexpected argument: neck {NO_NECK!r} takes none")
        ncfg = None
    else:
        neck_name = _neck_name(ncfg)

    def neck(of: nn.Module) -> Optional[nn.Module]:
        if ncfg is None:
            return None
        return NECKS.build(neck_name, "model.neck", ncfg,
                           injected=dict(in_channels=of.out_channels, strides=of.strides))

    hcfg = _as_dict(cfg.get("heads"), "model.heads")
    if not hcfg:
        raise ConfigError("model.heads: at least one head is required")
    specs = {}
    for task, spec in hcfg.items():
        key = f"model.heads.{task}"
        if not isinstance(task, str) or not task or "." in task or "/" in task:
            raise ConfigError(f"{key}: task names must be non-empty strings without '.' or '/'")
        spec = _as_dict(spec, key)
        if "name" not in spec:
            raise ConfigError(f"{key}.name: required (choose from: {', '.join(HEADS)})")
        specs[task] = spec

    def head(task: str, in_channels, strides) -> nn.Module:
        spec = dict(specs[task])
        return HEADS.build(spec.pop("name"), f"model.heads.{task}", spec,
                           injected=dict(in_channels=in_channels, strides=strides))

    classes = {t: HEADS.lookup(spec["name"], f"model.heads.{t}.name") for t, spec in specs.items()}
    return ModelParts(backbone, neck, head, list(specs), classes)


@ARCHS.register("hps")
def build_hps(parts: ModelParts) -> MultiTaskModel:
    """``model.arch: {name: hps}``: one backbone and neck shared by every task's head."""
    backbone = parts.backbone()
    neck = parts.neck(backbone)
    channels, strides = (backbone.out_channels, backbone.strides) if neck is None else (neck.out_channels,
                                                                                       neck.strides)
    return MultiTaskModel(backbone, neck, {t: parts.head(t, channels, strides) for t in parts.tasks})
