#include "gram.h"

#include <c10/util/Exception.h>

namespace mtvision {

GradChunks check_grad_chunks(at::TensorList grads, const char* op) {
  TORCH_CHECK(!grads.empty(), op, ": no gradients given");
  GradChunks out;
  out.T = grads[0].dim() >= 1 ? grads[0].size(0) : 0;
  TORCH_CHECK(out.T >= 1, op, ": each gradient chunk must be [T, ...] with T >= 1, got shape ", grads[0].sizes());
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.dim() >= 1 && g.size(0) == out.T, op, ": chunk ", i, " has shape ", g.sizes(),
                ", expected [", out.T, ", ...] like chunk 0");
    TORCH_CHECK(g.device() == grads[0].device(), op, ": chunk ", i, " is on ", g.device(),
                ", chunk 0 on ", grads[0].device());
    TORCH_CHECK(g.scalar_type() == grads[0].scalar_type(), op, ": chunk ", i, " is ", g.scalar_type(),
                ", chunk 0 is ", grads[0].scalar_type());
    TORCH_CHECK(at::isFloatingType(g.scalar_type()), op, ": gradients must be floating point, got ",
                g.scalar_type());
    out.chunks.push_back(g.reshape({out.T, -1}).contiguous());
  }
  return out;
}

void check_weights(const GradChunks& g, const at::Tensor& weights) {
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == g.T, "weighted_sum: weights must be [", g.T,
              "], got shape ", weights.sizes());
}

std::vector<at::Tensor> flat_outputs(const GradChunks& g, at::TensorList out, const char* op) {
  TORCH_CHECK(out.size() == g.chunks.size(), op, ": ", out.size(), " outputs for ",
              g.chunks.size(), " gradient chunks");
  std::vector<at::Tensor> flat;
  for (size_t i = 0; i < out.size(); ++i) {
    const at::Tensor& o = out[i];
    TORCH_CHECK(o.numel() == g.chunks[i].size(1) && o.is_contiguous() &&
                    o.scalar_type() == g.chunks[i].scalar_type() && o.device() == g.chunks[i].device(),
                op, ": output ", i, " must be a contiguous ", g.chunks[i].scalar_type(), " tensor of ",
                g.chunks[i].size(1), " elements on ", g.chunks[i].device(), ", got ", o.scalar_type(), " ",
                o.sizes(), " on ", o.device());
    flat.push_back(o.view({-1}));
  }
  return flat;
}

std::vector<at::Tensor> accumulator_views(const GradChunks& g, at::TensorList accumulator) {
  TORCH_CHECK(accumulator.size() == g.chunks.size(), "excess_risk_step: ", accumulator.size(),
              " accumulators for ", g.chunks.size(), " gradient chunks");
  std::vector<at::Tensor> views;
  for (size_t i = 0; i < accumulator.size(); ++i) {
    const at::Tensor& a = accumulator[i];
    const at::Tensor& c = g.chunks[i];
    TORCH_CHECK(a.numel() == c.numel() && a.is_contiguous() && a.scalar_type() == c.scalar_type() &&
                    a.device() == c.device(),
                "excess_risk_step: accumulator ", i, " must be a contiguous ", c.scalar_type(), " tensor of ",
                c.numel(), " elements on ", c.device(), " (its chunk's), got ", a.scalar_type(), " ", a.sizes(),
                " on ", a.device());
    views.push_back(a.view({g.T, -1}));
  }
  return views;
}

void check_leak(double leak) {
  TORCH_CHECK(leak >= 0.0 && leak <= 1.0, "sign_dropout_sum: leak must be in [0, 1], got ", leak);
}

std::vector<int64_t> chunk_offsets(const GradChunks& g) {
  std::vector<int64_t> offsets;
  int64_t at = 0;
  for (const at::Tensor& c : g.chunks) {
    offsets.push_back(at);
    at += c.size(1);
  }
  return offsets;
}

}  // namespace mtvision
