// Per-task gradient Gramian and weighted combination: the two passes over the T x P per-task
// gradients that every gradient-balancing method (PCGrad, MGDA, CAGrad, Nash-MTL, ...) needs. The
// gradients come as a list of [T, ...] chunks (one per parameter), never concatenated.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace mtvision {

// Validated chunk list: every chunk [T, n_i] (flattened, contiguous), one dtype, one device.
struct GradChunks {
  std::vector<at::Tensor> chunks;
  int64_t T = 0;
};

GradChunks check_grad_chunks(at::TensorList grads, const char* op);

// Columns of one work item: fixed, so the per-item partial sums (and the result) do not depend on
// the number of threads or blocks.
constexpr int64_t kGramItemColumns = 1 << 16;

// G [T, T] = sum over chunks of chunk @ chunk^T; float32 (float64 for float64 gradients).
at::Tensor gram_matrix_cpu(at::TensorList grads);

// out_i [...] = sum_t weights[t] * grads_i[t], in each chunk's dtype.
std::vector<at::Tensor> weighted_sum_cpu(at::TensorList grads, const at::Tensor& weights);

}  // namespace mtvision
