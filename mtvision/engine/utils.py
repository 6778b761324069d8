"""Small pieces the loop, its hooks and the tools share: the autocast context, a fast gradient clip, and
atomic JSON files."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["autocast_context", "clip_grad_norm", "write_json"]


def autocast_context(amp: str, device: torch.device):
    """A zero-argument factory of the autocast context for ``train.amp`` (``none``: no autocast)."""
    if amp == "none":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def clip_grad_norm(parameters, max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (L2 norm, the same arithmetic, bit-identical) in four operator
    calls when every gradient has one device and dtype; torch's makes one more call per parameter to
    gather the norms, host work that a launch-bound GPU step waits for. Returns the total norm (a
    tensor, not read back)."""
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads:
        return torch.zeros(())
    if len({(g.device, g.dtype) for g in grads}) > 1:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0))
    return total


def write_json(obj, path) -> None:
    """Write ``obj`` as indented JSON atomically (temporary file + rename); NaN/inf become null."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(clean(obj), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
