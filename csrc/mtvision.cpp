// Every op schema of mtvision, in one place. Kernels register per device in csrc/<op>/; the Python
// side (mtvision/ops) adds fake (meta) kernels and autograd.
#include <torch/library.h>

TORCH_LIBRARY(mtvision, m) {
  // Fused segmentation CE + depth L1 + normal (1 - cos) losses: (losses [3] float32, valid counts
  // [3] int64, per-pixel log-sum-exp of the logits [B,H,W]); see csrc/fused_loss/fused_loss.h.
  m.def(
      "fused_dense_loss_forward(Tensor? seg_logits, Tensor? seg_target, Tensor? depth_pred, "
      "Tensor? depth_target, Tensor? normal_pred, Tensor? normal_target, int ignore_index) "
      "-> (Tensor, Tensor, Tensor)");
  // Gradients of sum_t grad_losses[t] * losses[t] w.r.t. the three predictions (empty if absent).
  m.def(
      "fused_dense_loss_backward(Tensor grad_losses, Tensor counts, Tensor seg_lse, "
      "Tensor? seg_logits, Tensor? seg_target, Tensor? depth_pred, Tensor? depth_target, "
      "Tensor? normal_pred, Tensor? normal_target, int ignore_index) -> (Tensor, Tensor, Tensor)");
  // Gramian G[s,t] = <g_s, g_t> of T per-task gradients given as [T, ...] chunks (one per parameter,
  // no concatenation): [T, T], float32 (float64 for float64 gradients).
  m.def("gram_matrix(Tensor[] grads) -> Tensor");
  // sum_t weights[t] * grads[t], chunk by chunk: one [...] tensor per [T, ...] chunk, in its dtype.
  m.def("weighted_sum(Tensor[] grads, Tensor weights) -> Tensor[]");
  // The same written into `out` (one tensor shaped like each chunk without its T dim), e.g. .grad.
  m.def("weighted_sum_out(Tensor[] grads, Tensor weights, Tensor(a!)[] out) -> ()");
  // GradDrop's sign dropout, chunk by chunk into `out`: per coordinate, with pos / neg the sums of the
  // positive / negative task values and P = (1 + (pos + neg) / (pos - neg)) / 2 (1/2 where all are 0),
  // out = leak * (pos + neg) + (1 - leak) * ([P > u] pos + [P < u] neg); u = counter_uniform(seed, i) for
  // coordinate i counted over all chunks in order (csrc/gram/sign_dropout.h).
  m.def("sign_dropout_sum_out(Tensor[] grads, int seed, float leak, Tensor(a!)[] out) -> ()");
  // ExcessMTL's AdaGrad step over [T, ...] chunks, one pass: accumulator += grads^2 (in place, each
  // accumulator shaped and typed as its chunk), and per task sum(grads^2 / sqrt(accumulator + eps)) over
  // all chunks: [T] float64.
  m.def("excess_risk_step(Tensor[] grads, Tensor(a!)[] accumulator, float eps) -> Tensor");
}
