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

// The same into given tensors (out_i: grads_i[0]'s shape, contiguous, same dtype and device), e.g.
// persistent .grad buffers: no allocation (and no page faults) per step.
void weighted_sum_out_cpu(at::TensorList grads, const at::Tensor& weights, at::TensorList out);

// GradDrop's sign dropout of the T values of every coordinate (see the schema in mtvision.cpp) into out.
void sign_dropout_sum_out_cpu(at::TensorList grads, int64_t seed, double leak, at::TensorList out);

// ExcessMTL's step (see the schema in mtvision.cpp): accumulator += grads^2 in place; returns [T] float64
// sums of grads^2 / sqrt(accumulator + eps).
at::Tensor excess_risk_step_cpu(at::TensorList grads, at::TensorList accumulator, double eps);

// excess_risk_step's accumulators, checked against the chunks and viewed as [T, n_i].
std::vector<at::Tensor> accumulator_views(const GradChunks& g, at::TensorList accumulator);

// sign_dropout_sum's leak must be in [0, 1].
void check_leak(double leak);

// Index of each chunk's first coordinate when the coordinates of all chunks are counted in order.
std::vector<int64_t> chunk_offsets(const GradChunks& g);

// Checks of weighted_sum's weights, and of an op's out tensors (returned flattened to [n_i]).
void check_weights(const GradChunks& g, const at::Tensor& weights);
std::vector<at::Tensor> flat_outputs(const GradChunks& g, at::TensorList out, const char* op);

// Allocates weighted_sum's outputs with `alloc(numel, options)`, runs `fill(grads, weights, flat)`,
// and returns them shaped like grads_i[0].
template <typename Alloc, typename Fill>
std::vector<at::Tensor> weighted_sum_alloc(at::TensorList grads, const at::Tensor& weights, Alloc alloc,
                                           Fill fill) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& c : grads) {
    std::vector<int64_t> shape(c.sizes().begin() + (c.dim() > 0 ? 1 : 0), c.sizes().end());
    out.push_back(alloc(c.dim() > 0 ? c.numel() / std::max<int64_t>(c.size(0), 1) : 0, c.options()).view(shape));
  }
  fill(grads, weights, at::TensorList(out));
  return out;
}

}  // namespace mtvision
