"""timm backbones that return a list of feature maps with known channels and strides.

Two kinds, built by :func:`build_backbone`:

- :class:`TimmCNNBackbone` — any timm model that supports ``features_only=True`` (ResNet, ConvNeXt,
  EfficientNet, RegNet, Swin, ...). Levels come from timm's ``feature_info``; by default the levels
  with stride >= 4 (strides 4, 8, 16, 32 for the usual families). Any input size works; sizes divisible
  by 32 give exact strides. ``output_stride=8`` (or 16) builds a *dilated* network (Yu et al. 2017,
  "Dilated Residual Networks"; LibMTL's ``resnet_dilated`` and MTAN's ResNet-50 NYUv2 model): the last
  stages keep the resolution and dilate their convolutions instead (for ResNets: stage 3 dilation 2,
  stage 4 dilation 4, the first block of each with the previous dilation), so the levels' strides are
  e.g. ``[4, 8, 8, 8]`` and the parameters (and pretrained weights) are unchanged.
- :class:`ViTBackbone` — a plain timm ``VisionTransformer`` (``vit_*``, ``deit_*``, DINOv2's
  ``vit_*_dinov2``) or ``Eva`` (``eva02_*``) turned into a 4-level pyramid: the patch tokens of one block
  (default: the last) form a stride-``P`` map (``P`` = patch size, 16 for ``*_patch16_*``). For ``P``
  divisible by 4, the ViTDet way (Li et al. 2022, "simple feature pyramid"): stride ``P/4`` comes from
  two 2x transposed convs, ``P/2`` from one, ``P`` is the map itself, ``2P`` is a 2x2 max-pool. For other
  patches (14), the DPT way (Ranftl et al. 2021; Depth Anything): strides 4, 8, 16 and 32, each a 1x1
  projection of the tokens, bilinearly resampled, then a 3x3 conv. The model is built with
  ``dynamic_img_size=True`` (position embeddings are interpolated per input), so **any input whose height and width are multiples of the patch size**
  works; other sizes raise ``ValueError``.

Pretrained weights (``pretrained``):

- ``None`` / ``False``: random initialisation.
- a local file path (the offline default): ``.pth``/``.pt``/``.bin`` through
  ``torch.load(weights_only=True)``, or ``.safetensors``, holding a timm-format state dict of the same
  architecture (e.g. ``timm.create_model(name).state_dict()``).
- ``True``: timm's published weights for the model (its ``pretrained_cfg``), fetched as
  ``timm.create_model(name, pretrained=True)`` fetches them: from the Hugging Face hub (``hf_hub_id``;
  cached in huggingface_hub's cache, ``HF_HOME`` / ``HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1`` reads the cache
  only) or, for the few models timm has only a URL for, through ``torch.hub`` (cached under
  ``TORCH_HOME``). A model without published weights, an offline run without the file in the cache and
  a failed download are :class:`BackboneError` (key ``pretrained``) saying which file was wanted, where
  the cache is and how to get the file.

Nothing is downloaded unless ``pretrained`` is ``True``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any, Optional, Union

import timm
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models import VisionTransformer
from timm.models._features import FeatureDictNet
from timm.models.eva import Eva
from torch import Tensor, nn

from ..registry import BACKBONES

__all__ = ["BackboneError", "TimmCNNBackbone", "ViTBackbone", "build_backbone", "is_vit_name"]

# Output strides a dilated CNN backbone may be built with (timm's ``output_stride``).
_OUTPUT_STRIDES = (8, 16, 32)

# timm modules whose models are plain VisionTransformers (forward_intermediates + dynamic_img_size).
_VIT_MODULES = ("timm.models.vision_transformer", "timm.models.deit", "timm.models.eva")


class BackboneError(ValueError):
    """Invalid backbone argument; ``key`` names the argument (``name``, ``pretrained``, ...)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


# ---------------------------------------------------------------------------------------------------
# Pretrained weights from a local file


def _read_state_dict(path: str) -> dict[str, Tensor]:
    """Tensors of a local checkpoint (weights_only / safetensors); ``state_dict``/``model`` wrappers and
    DDP ``module.`` prefixes are removed (timm's ``load_state_dict``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights file not found: {path!r}")
    try:
        # timm's loader: torch.load(weights_only=True) or safetensors by extension, unwraps
        # {'state_dict'|'model'|'state_dict_ema': ...} and strips 'module.' prefixes.
        sd = timm.models.load_state_dict(path, use_ema=False, device="cpu", weights_only=True)
    except Exception as e:  # unpickling / safetensors header errors: say which file
        raise BackboneError("pretrained", f"cannot read pretrained weights file {path!r}: {e}") from e
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise BackboneError("pretrained", f"pretrained weights file {path!r} does not hold a state dict of tensors")
    return sd


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    cls = cfg.get("classifier")
    if cls is None:
        return ()
    names = (cls,) if isinstance(cls, str) else tuple(cls)
    return tuple(n + "." for n in names)


def _short(keys: Sequence[str], n: int = 8) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _load_into(model: nn.Module, path: str, name: str) -> None:
    """Load ``path`` into a full (unwrapped) timm ``model``; every non-classifier weight must be present
    and every key in the file must belong to the model (the classifier head is ignored either way)."""
    sd = _read_state_dict(path)
    ignore = _classifier_prefixes(model)
    sd = {k: v for k, v in sd.items() if not k.startswith(ignore)}
    own = {k for k in model.state_dict() if not k.startswith(ignore)}
    missing = sorted(own - sd.keys())
    unexpected = sorted(sd.keys() - own)
    if missing or unexpected:
        msg = [f"pretrained weights file {path!r} does not match timm model {name!r}"]
        if missing:
            msg.append(f"missing keys: {_short(missing)}")
        if unexpected:
            msg.append(f"unexpected keys: {_short(unexpected)}")
        msg.append("expected a timm-format state dict of the same architecture "
                   "(e.g. timm.create_model(name).state_dict())")
        raise BackboneError("pretrained", "; ".join(msg))
    try:
        model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise BackboneError("pretrained",
                            f"pretrained weights file {path!r} does not fit timm model {name!r}: {e}") from e


# Overlay that makes timm load a given state dict and nothing else: no hub id, url, file or custom
# loader is left for it to try, so no code path can reach the network.
def _state_dict_overlay(sd: dict[str, Tensor]) -> dict[str, Any]:
    return dict(state_dict=sd, source=None, hf_hub_id=None, hf_hub_filename=None, url=None, file=None,
                custom_load=False)


def _forget_state_dict(model: nn.Module) -> nn.Module:
    """Drop the overlay's state dict that timm keeps in ``model.pretrained_cfg`` (a second copy of every
    weight for as long as the model lives)."""
    for m in model.modules():
        cfg = getattr(m, "pretrained_cfg", None)
        if isinstance(cfg, dict):
            cfg.pop("state_dict", None)
    return model


# ---------------------------------------------------------------------------------------------------
# Published weights (pretrained: true): fetched where timm fetches them, with errors that say what to do

_USE_LOCAL_FILE = "or download it and set model.backbone.pretrained to the local file's path"


def _hub_offline() -> bool:
    """huggingface_hub's offline mode (``HF_HUB_OFFLINE=1``, read when huggingface_hub is imported)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return bool(os.environ.get("HF_HUB_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE)


def _hf_cli() -> str:
    """The download command of the installed huggingface_hub (``hf`` since 0.34, before that
    ``huggingface-cli``)."""
    import huggingface_hub

    try:
        version = tuple(int(p) for p in huggingface_hub.__version__.split(".")[:2])
    except ValueError:
        version = (1, 0)
    return "hf download" if version >= (0, 34) else "huggingface-cli download"


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions of a failed HTTP request: OSError (urllib's and requests' errors derive from it) and the
    HTTP client huggingface_hub uses (httpx / httpx2, whose errors do not)."""
    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx", "httpx2"):
        mod = sys.modules.get(module)
        if mod is not None and isinstance(getattr(mod, "HTTPError", None), type):
            errors.append(mod.HTTPError)
    return tuple(errors)


def _published_cfg(name: str):
    """timm's pretrained config of ``name`` (its default tag when the name has none)."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as e:  # an unknown pretrained tag
        raise BackboneError("name", str(e)) from e
    return cfg


def _no_weights_error(name: str) -> BackboneError:
    arch = timm.models.get_arch_name(name)
    tagged = timm.list_pretrained(f"{arch}.*")
    other = f" (timm has published weights for {_short(tagged, 4)})" if tagged else ""
    return BackboneError("pretrained", f"timm model {name!r} has no published pretrained weights (its "
                                       f"pretrained_cfg names no Hugging Face hub repo or URL){other}; set "
                                       "model.backbone.pretrained to a local weights file (a timm-format "
                                       "state dict of this architecture), or to null for random init; "
                                       "timm.list_pretrained() lists the models that have published weights")


def _hub_weights_file(name: str, repo: str, filename: Optional[str]) -> str:
    """Local path of the weights file of hub repo ``repo`` (``repo@revision`` allowed), from the cache or
    downloaded into it. Like timm's ``load_state_dict_from_hf``: a ``.safetensors`` alternative of a
    ``.bin`` file is preferred."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    repo_id, _, revision = repo.partition("@")
    filename = filename or "pytorch_model.bin"
    candidates = [filename]
    if filename.endswith(".bin"):
        candidates.insert(0, "model.safetensors" if filename == "pytorch_model.bin"
                          else filename[:-4] + ".safetensors")
    uncached: Optional[BaseException] = None
    for candidate in candidates:
        try:
            return hf_hub_download(repo_id, filename=candidate, revision=revision or None)
        except LocalEntryNotFoundError as e:  # offline or hub unreachable, and not in the cache
            uncached = uncached or e
        except EntryNotFoundError:  # the repo has no such file: try the next one
            continue
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:  # GatedRepoError included
            reason = f"the hub refused it ({type(e).__name__}: {e}; a private or gated repo needs a login)"
            raise _hub_error(name, repo, candidates, reason) from e
        except _network_errors() as e:  # HfHubHTTPError, OSError, requests / httpx errors
            raise _hub_error(name, repo, candidates, f"the download failed ({type(e).__name__}: {e})") from e
    if uncached is None:
        raise _hub_error(name, repo, candidates, "the hub repo has none of these files")
    if _hub_offline():
        raise _hub_error(name, repo, candidates,
                         "offline mode is on (HF_HUB_OFFLINE=1) and the file is not in the cache") from None
    raise _hub_error(name, repo, candidates,
                     f"the file is not in the cache and the hub cannot be reached ({uncached})") from uncached


def _hub_error(name: str, repo: str, candidates: Sequence[str], reason: str) -> BackboneError:
    from huggingface_hub import constants

    files = " or ".join(candidates)
    repo_id, _, revision = repo.partition("@")
    if revision:
        repo_id += f" --revision {revision}"
    return BackboneError(
        "pretrained",
        f"cannot get the published weights of timm model {name!r}: file {files} of Hugging Face hub repo "
        f"{repo!r}: {reason}. The hub cache is {constants.HF_HUB_CACHE} (HF_HOME={constants.HF_HOME}; "
        f"HF_HUB_CACHE / HF_HOME choose another). To get the file: run once with network access (it is "
        f"then cached there), or run `{_hf_cli()} {repo_id} {candidates[0]}` where the hub can be reached "
        f"(with the same HF_HOME), {_USE_LOCAL_FILE}")


def _url_weights_file(name: str, url: str) -> str:
    """Local path of a weights file timm has only a URL for (torch.hub's cache, as timm's
    ``load_state_dict_from_url`` keeps it), downloaded when it is not there and the run is not offline."""
    from urllib.parse import urlparse

    from torch.hub import download_url_to_file, get_dir

    cache = os.path.join(get_dir(), "checkpoints")
    path = os.path.join(cache, os.path.basename(urlparse(url).path))
    if os.path.isfile(path):
        return path
    how = (f"The torch.hub cache is {cache} (TORCH_HOME chooses another). To get the file: run once with "
           f"network access, or download {url} into that folder, {_USE_LOCAL_FILE}")
    if _hub_offline():
        raise BackboneError("pretrained", f"cannot get the published weights of timm model {name!r} ({url}): "
                                          f"offline mode is on (HF_HUB_OFFLINE=1) and the file is not in the "
                                          f"cache. {how}")
    try:
        os.makedirs(cache, exist_ok=True)
        download_url_to_file(url, path, progress=True)
    except _network_errors() as e:  # urllib's URLError / HTTPError, disk errors
        raise BackboneError("pretrained", f"cannot download the published weights of timm model {name!r} "
                                          f"({url}): {type(e).__name__}: {e}. {how}") from e
    return path


def _published_state_dict(name: str) -> dict[str, Tensor]:
    """The state dict of timm's published weights for ``name`` (``pretrained: true``), as
    ``timm.create_model(name, pretrained=True)`` would read it: from the Hugging Face hub when timm names
    a hub repo, else from its URL; :class:`BackboneError` (key ``pretrained``) when there are none or the
    file cannot be had."""
    cfg = _published_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    url = getattr(cfg, "url", None) if cfg is not None else None
    if hub_id:
        path = _hub_weights_file(name, hub_id, getattr(cfg, "hf_hub_filename", None))
    elif url:
        path = _url_weights_file(name, url)
    else:
        raise _no_weights_error(name)
    return _read_state_dict(path)


def _create_published(name: str, **kw) -> nn.Module:
    """``timm.create_model(name, pretrained=True, **kw)`` with the published weights read above (timm's
    own checkpoint filter and classifier / input-channel adaptation apply)."""
    sd = _published_state_dict(name)
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=_state_dict_overlay(sd), **kw)
    except RuntimeError as e:  # strict load: the published weights do not fit (e.g. timm_kwargs depth)
        extra = f" built with {kw}" if kw else ""
        raise BackboneError("pretrained", f"the published weights of timm model {name!r} do not fit the "
                                          f"model{extra}: {e}") from e
    return _forget_state_dict(model)


# ---------------------------------------------------------------------------------------------------
# Backbones


class TimmCNNBackbone(nn.Module):
    """A timm ``features_only`` model. ``forward(x [B,3,H,W]) -> list of [B, out_channels[i], H/strides[i],
    W/strides[i]]`` (NCHW, rounded up for sizes not divisible by the stride).

    Attributes: ``out_channels: list[int]``, ``strides: list[int]`` (from timm's ``feature_info``; with
    ``output_stride=8`` a ResNet's default levels have strides ``[4, 8, 8, 8]``), ``output_stride`` (the
    largest stride).
    """

    def __init__(self, name: str, pretrained: Union[str, bool, None] = None,
                 out_indices: Optional[Sequence[int]] = None, timm_kwargs: Optional[dict[str, Any]] = None,
                 output_stride: Optional[int] = None):
        super().__init__()
        if pretrained is False:
            pretrained = None
        kw = dict(timm_kwargs or {})
        if out_indices is not None:
            kw["out_indices"] = tuple(int(i) for i in out_indices)
        if output_stride is not None:
            kw["output_stride"] = int(output_stride)
        try:
            if pretrained is None:
                body = timm.create_model(name, pretrained=False, features_only=True, **kw)
            else:
                # Check and load the file (or timm's published weights) into the full model (strict apart
                # from the classifier), then let timm build the features model from those exact tensors.
                full_kw = {k: v for k, v in kw.items() if k != "out_indices"}
                if pretrained is True:
                    full = _create_published(name, **full_kw)
                else:
                    full = timm.create_model(name, pretrained=False, **full_kw)
                    _load_into(full, pretrained, name)
                body = timm.create_model(name, pretrained=True, features_only=True,
                                         pretrained_cfg_overlay=_state_dict_overlay(full.state_dict()), **kw)
                _forget_state_dict(body)
                del full
        except TypeError as e:
            if output_stride is not None and "output_stride" in str(e):
                raise BackboneError("output_stride", f"timm model {name!r} does not support output_stride "
                                                     f"(dilated stages): {e}") from e
            raise
        except (RuntimeError, AssertionError, IndexError) as e:
            # timm raises these for models without feature extraction and for bad feature indices
            # (and an AssertionError for an output_stride the family does not support).
            key = "out_indices" if out_indices is not None else "output_stride" if output_stride is not None else "name"
            raise BackboneError(key, f"cannot build timm model {name!r} as a feature extractor (features_only"
                                     f"{'' if output_stride is None else f', output_stride={output_stride}'}): "
                                     f"{e or type(e).__name__}") from e
        self.name = name
        self.body = body
        channels = list(body.feature_info.channels())
        reductions = list(body.feature_info.reduction())
        if out_indices is None:
            # timm's default includes the stride-2 stem level for most CNNs; dense heads start at 4.
            keep = [i for i, r in enumerate(reductions) if r >= 4] or list(range(len(reductions)))
        else:
            keep = list(range(len(reductions)))
        self._keep = keep
        self.out_channels: list[int] = [int(channels[i]) for i in keep]
        self.strides: list[int] = [int(reductions[i]) for i in keep]
        self.output_stride: int = max(self.strides)
        fmt = getattr(body, "output_fmt", "NCHW")
        self._nhwc = str(getattr(fmt, "value", fmt)).upper() == "NHWC"
        # timm's FeatureListNet runs its modules in order and taps the stage outputs: the module names of
        # each stage (ending at a tap), so that the body can also run one stage at a time
        self._stages: Optional[list[list[str]]] = None
        if isinstance(body, FeatureDictNet):
            self._stages, current = [], []
            for module_name in body.keys():
                current.append(module_name)
                if module_name in body.return_layers:
                    self._stages.append(current)
                    current = []
        self.stage_channels: list[int] = channels
        self.stage_channel_dim: int = -1 if self._nhwc else 1

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.levels_from_stages(self.body(x))

    # Stage by stage (cross-stitch networks mix task streams between stages)

    @property
    def num_stages(self) -> int:
        """Stages :meth:`run_stage` runs (timm's feature levels, the stride-2 stem included); a
        ``BackboneError`` for a timm model whose feature extractor is not a module sequence."""
        if self._stages is None:
            raise BackboneError("name", f"timm model {self.name!r} has a {type(self.body).__name__} feature "
                                        "extractor, which runs as one piece; stage-by-stage running needs one "
                                        "built as a module sequence (ResNet, ConvNeXt, RegNet, Swin, ...)")
        return len(self._stages)

    def stage_modules(self, i: int) -> list[nn.Module]:
        """The modules stage ``i`` runs."""
        return [self.body[module_name] for module_name in self._stages[i]]

    def run_stage(self, i: int, x: Tensor) -> Tensor:
        """Stage ``i`` on ``x`` (the image for stage 0, else stage ``i-1``'s output): timm's layout, NCHW
        or NHWC (``stage_channel_dim``) with ``stage_channels[i]`` channels."""
        for module in self.stage_modules(i):
            x = module(x)
        return x

    def levels_from_stages(self, outputs: Sequence[Tensor], image_size: Optional[Sequence[int]] = None
                           ) -> list[Tensor]:
        """The levels :meth:`forward` returns, from every stage's output (``image_size`` unused)."""
        feats = [outputs[i] for i in self._keep]
        if self._nhwc:
            feats = [f.permute(0, 3, 1, 2).contiguous() for f in feats]
        return feats


class _ResampledLevel(nn.Module):
    """One pyramid level from a stride-P token map whose patch P is not a multiple of 4 (DINOv2's 14), as
    DPT / Depth Anything reassemble theirs: a 1x1 projection to ``channels``, a bilinear resampling to
    ``ceil(H / stride) x ceil(W / stride)`` of the input image, and a 3x3 conv (the learned part of the
    resampling)."""

    def __init__(self, dim: int, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.project = nn.Conv2d(dim, channels, 1)
        self.refine = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, tokens: Tensor, size) -> Tensor:
        h, w = size
        s = self.stride
        x = F.interpolate(self.project(tokens), size=((h + s - 1) // s, (w + s - 1) // s), mode="bilinear",
                          align_corners=False)
        return self.refine(x)


class ViTBackbone(nn.Module):
    """A timm VisionTransformer (or EVA) with a 4-level feature pyramid.

    ``forward(x [B,3,H,W]) -> 4 maps [B, out_channels[i], H/strides[i], W/strides[i]]`` with channels
    ``[D/4, D/2, D, D]`` (``D`` = embed dim). For a patch ``P`` divisible by 4, the ViTDet simple feature
    pyramid with strides ``[P/4, P/2, P, 2P]`` (``[4, 8, 16, 32]`` for patch 16). For any other patch
    (DINOv2's and EVA-02's 14), the DPT way: strides ``[4, 8, 16, 32]`` resampled from the stride-``P``
    tokens (:class:`_ResampledLevel`; a level is ``ceil(H / stride)`` high). H and W must be multiples of
    the patch size ``P`` (``ValueError`` otherwise).

    ``block_indices``: transformer blocks whose patch tokens feed the pyramid: one index (default the
    last block, -1) feeds all four levels (ViTDet); four indices, shallow to deep, feed one level each.
    Blocks after the deepest one used, the final norm and the classifier are removed.
    """

    def __init__(self, name: str, pretrained: Union[str, bool, None] = None,
                 block_indices: Optional[Sequence[int]] = None, timm_kwargs: Optional[dict[str, Any]] = None):
        super().__init__()
        if pretrained is False:
            pretrained = None
        kw = dict(timm_kwargs or {})
        kw.setdefault("dynamic_img_size", True)
        try:
            if pretrained is True:  # the full model with timm's published weights, pruned below
                vit = _create_published(name, **kw)
            else:
                vit = timm.create_model(name, pretrained=False, **kw)
        except TypeError as e:
            raise BackboneError("timm_kwargs", f"timm model {name!r} rejected its arguments: {e}") from e
        if not isinstance(vit, (VisionTransformer, Eva)):
            raise BackboneError("name", f"timm model {name!r} is a {type(vit).__name__}, not a "
                                        "VisionTransformer or Eva")
        if isinstance(pretrained, str):
            _load_into(vit, pretrained, name)

        depth = len(vit.blocks)
        idx = [-1] if block_indices is None else [int(i) for i in block_indices]
        if len(idx) not in (1, 4):
            raise BackboneError("out_indices", f"ViT backbone takes 1 or 4 block indices, got {len(idx)}: {idx}")
        for i in idx:
            if not -depth <= i < depth:
                raise BackboneError("out_indices", f"block index {i} out of range for {name!r} ({depth} blocks)")
        idx = [i % depth for i in idx]
        if len(idx) == 4 and idx != sorted(idx):
            raise BackboneError("out_indices", f"ViT block indices must go from shallow to deep, got {idx}")
        self._take = sorted(set(idx))
        self._level_src = [self._take.index(i) for i in (idx * 4 if len(idx) == 1 else idx)]
        vit.prune_intermediate_layers(self._take, prune_norm=True, prune_head=True)

        patch = vit.patch_embed.patch_size
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        if patch[0] != patch[1]:
            raise BackboneError("name", f"ViT backbone needs a square patch, {name!r} has {patch}")
        p = patch[0]
        d = vit.embed_dim
        if d % 4:
            raise BackboneError("name", f"ViT embed dim must be divisible by 4, {name!r} has {d}")
        self.name = name
        self.vit = vit
        self.patch_size = p
        self.out_channels: list[int] = [d // 4, d // 2, d, d]
        if p % 4 == 0:
            # ViTDet simple feature pyramid (without the per-level 1x1/3x3 convs: the FPN neck does those).
            self.up4 = nn.Sequential(
                nn.ConvTranspose2d(d, d // 2, 2, stride=2), LayerNorm2d(d // 2), nn.GELU(),
                nn.ConvTranspose2d(d // 2, d // 4, 2, stride=2),
            )
            self.up2 = nn.ConvTranspose2d(d, d // 2, 2, stride=2)
            self.down2 = nn.MaxPool2d(2, 2)
            self.strides: list[int] = [p // 4, p // 2, p, 2 * p]
            self.resampled = None
        else:
            self.strides = [4, 8, 16, 32]
            self.resampled = nn.ModuleList(_ResampledLevel(d, c, stride)
                                           for c, stride in zip(self.out_channels, self.strides))

    def _check_size(self, x: Tensor) -> None:
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"ViT backbone {self.name!r} needs input height and width divisible by the patch size "
                             f"{p}, got {h}x{w}")

    def forward(self, x: Tensor) -> list[Tensor]:
        self._check_size(x)
        maps = self.vit.forward_intermediates(x, indices=self._take, norm=False, output_fmt="NCHW",
                                              intermediates_only=True)
        return self._pyramid(maps, x.shape[-2:])

    # Stage by stage: one transformer block a stage (stage 0 also embeds the patches)

    @property
    def num_stages(self) -> int:
        if not isinstance(self.vit, VisionTransformer):
            raise BackboneError("name", f"{self.name!r} is a {type(self.vit).__name__}: stage-by-stage running "
                                        "takes a plain VisionTransformer's blocks (EVA's need its rotary "
                                        "embedding passed along)")
        return len(self.vit.blocks)

    @property
    def stage_channels(self) -> list[int]:
        return [self.vit.embed_dim] * len(self.vit.blocks)

    stage_channel_dim = -1

    def stage_modules(self, i: int) -> list[nn.Module]:
        """The modules stage ``i`` runs (its block; stage 0 also embeds the patches)."""
        return [self.vit.blocks[i]]

    def run_stage(self, i: int, x: Tensor) -> Tensor:
        """Block ``i`` on the tokens ``[B, N, D]`` (prefix tokens first); stage 0 takes the image."""
        vit = self.vit
        if i == 0:
            self._check_size(x)
            x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        return vit.blocks[i](x)

    def levels_from_stages(self, outputs: Sequence[Tensor], image_size: Sequence[int]) -> list[Tensor]:
        """The levels :meth:`forward` returns, from every block's tokens."""
        h, w = (int(v) for v in image_size)
        gh, gw = self.vit.patch_embed.dynamic_feat_size((h, w))
        n = self.vit.num_prefix_tokens
        maps = [y[:, n:].reshape(y.shape[0], gh, gw, -1).permute(0, 3, 1, 2).contiguous()
                for y in (outputs[i] for i in self._take)]
        return self._pyramid(maps, (h, w))

    def _pyramid(self, maps: Sequence[Tensor], size) -> list[Tensor]:
        """The four levels from the tapped blocks' ``[B, D, H/P, W/P]`` maps."""
        h, w = size
        s = self._level_src
        if self.resampled is not None:
            return [level(maps[src], (h, w)) for level, src in zip(self.resampled, s)]
        return [self.up4(maps[s[0]]), self.up2(maps[s[1]]), maps[s[2]], self.down2(maps[s[3]])]


# ---------------------------------------------------------------------------------------------------


def is_vit_name(name: str) -> bool:
    """Whether timm model ``name`` is a plain VisionTransformer (built as :class:`ViTBackbone`)."""
    arch = timm.models.get_arch_name(name)
    if arch.startswith("vit_"):
        return True
    try:
        return timm.models.model_entrypoint(name).__module__ in _VIT_MODULES
    except RuntimeError:
        return False


@BACKBONES.register("timm")
def build_backbone(name: str, pretrained: Union[str, bool, None] = None,
                   out_indices: Optional[Sequence[int]] = None, timm_kwargs: Optional[dict[str, Any]] = None,
                   output_stride: Optional[int] = None) -> nn.Module:
    """A backbone from a timm model name; the result has ``out_channels`` and ``strides`` lists and
    returns a list of NCHW maps.

    - ``pretrained``: ``None`` or ``False`` (random init), a local weights file (timm-format state dict,
      ``.pth`` or ``.safetensors``; a missing file raises ``FileNotFoundError``, a mismatching one
      :class:`BackboneError` naming the file and the missing/unexpected keys), or ``True``: timm's
      published weights, as ``timm.create_model(name, pretrained=True)`` gets them (Hugging Face hub and
      its cache; see the module docstring). Only ``True`` ever downloads; no published weights, an
      offline run without them in the cache or a failed download is a :class:`BackboneError` saying how
      to get the file.
    - ``out_indices``: CNNs: timm feature indices (default: every level with stride >= 4); ViTs: block
      indices (1 or 4, default the last block).
    - ``timm_kwargs``: extra arguments for ``timm.create_model`` (e.g. ``drop_path_rate``).
    - ``output_stride``: CNNs only: ``None`` (the model's own, 32 for ResNets), 8 or 16 for a dilated
      network whose last stages keep stride 8/16 (DeepLab's ResNet-50, LibMTL's ``resnet_dilated``).
    """
    if not isinstance(name, str) or not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(str(name), timm.list_models(), n=3) if isinstance(name, str) else []
        hint = f" (did you mean: {', '.join(close)}?)" if close else ""
        raise BackboneError("name", f"unknown timm model {name!r}{hint}")
    if pretrained is False:
        pretrained = None
    if pretrained is not None and pretrained is not True:
        if not isinstance(pretrained, (str, os.PathLike)):
            raise BackboneError("pretrained", f"expected null, true (timm's published weights) or a file "
                                              f"path, got {pretrained!r}")
        pretrained = os.fspath(pretrained)
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"pretrained weights file not found: {pretrained!r}")
    if out_indices is not None:
        if isinstance(out_indices, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in out_indices):
            raise BackboneError("out_indices", f"expected null or a list of ints, got {out_indices!r}")
    if timm_kwargs is not None and not isinstance(timm_kwargs, dict):
        raise BackboneError("timm_kwargs", f"expected a mapping, got {timm_kwargs!r}")
    for key in timm_kwargs or {}:
        # timm drops None-valued arguments without a word, so YAML's {depth:2} (no space: one key
        # "depth:2" with value null) would build the default model silently
        if not isinstance(key, str) or not key.isidentifier():
            hint = " (YAML needs a space after the colon: {depth: 2})" if ":" in str(key) else ""
            raise BackboneError("timm_kwargs", f"{key!r} is not an argument name{hint}")
    if output_stride is not None:
        if isinstance(output_stride, bool) or output_stride not in _OUTPUT_STRIDES:
            raise BackboneError("output_stride", f"expected null or one of {', '.join(map(str, _OUTPUT_STRIDES))}, "
                                                 f"got {output_stride!r}")
    for reserved in ("pretrained", "features_only", "out_indices", "pretrained_cfg_overlay", "checkpoint_path",
                     "output_stride"):
        if timm_kwargs and reserved in timm_kwargs:
            raise BackboneError("timm_kwargs", f"{reserved!r} is set by mtvision, not through timm_kwargs")
    if is_vit_name(name):
        if output_stride is not None:
            raise BackboneError("output_stride", f"output_stride applies to CNN backbones; {name!r} is a "
                                                 "VisionTransformer (its pyramid strides come from the patch size)")
        return ViTBackbone(name, pretrained=pretrained, block_indices=out_indices, timm_kwargs=timm_kwargs)
    try:
        return TimmCNNBackbone(name, pretrained=pretrained, out_indices=out_indices, timm_kwargs=timm_kwargs,
                               output_stride=output_stride)
    except TypeError as e:
        raise BackboneError("timm_kwargs", f"timm model {name!r} rejected its arguments: {e}") from e
