"""Loads the compiled library mtvision._C (which registers the op schemas and kernels)."""

import torch

try:
    from mtvision import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - only hit on a broken install
    raise ImportError(
        "mtvision._C is not built: run `make install` (or `pip install --no-build-isolation -e .`) "
        f"in the repository root ({exc})"
    ) from exc


def has_cuda_kernels() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("mtvision::fused_dense_loss_forward", "CUDA")
