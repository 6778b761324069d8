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

}  // namespace mtvision
