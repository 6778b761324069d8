"""Custom ops of mtvision (C++/CUDA kernels in csrc/, registered as torch.ops.mtvision.*).

`mtvision.ops.reference` holds a pure-PyTorch twin of every op, the ground truth of the tests.
"""

import torch  # noqa: F401  (must be imported before the extension)

from mtvision.ops import _library  # noqa: F401  loads mtvision._C and registers fake/autograd
from mtvision.ops.fused_loss import fused_dense_loss
from mtvision.ops.gram import excess_risk_step, gram_matrix, sign_dropout_sum, weighted_sum

__all__ = ["cuda_kernels_available", "excess_risk_step", "fused_dense_loss", "gram_matrix", "sign_dropout_sum",
           "weighted_sum"]


def cuda_kernels_available() -> bool:
    """True when mtvision._C was built with its CUDA kernels."""
    return _library.has_cuda_kernels()
