// Fused dense multi-task loss: cross-entropy (segmentation), masked L1 (depth) and 1 - cos (normals)
// in one pass over the pixels. Shared by the CPU and CUDA kernels: input checks and the strided view
// that lets one kernel read NCHW and channels_last tensors without a copy.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "acc_type.h"

#include <array>
#include <tuple>

namespace mtvision {

// A [B, C, H, W] (or [B, H, W] with C = 1) tensor seen as B x C x P pixels, P = H * W, where the
// pixel p = h * W + w lives at data + b * sb + c * sc + p * sp (strides in elements).
struct PixelView {
  int64_t B = 0, C = 0, P = 0;
  int64_t sb = 0, sc = 0, sp = 0;
};

// Makes `t` addressable as a PixelView (NCHW-contiguous and channels_last pass through unchanged,
// anything else is made contiguous) and returns it with its view.
std::pair<at::Tensor, PixelView> pixel_view(const at::Tensor& t);

// Validated inputs of one call: each task present or not, all on one device, shapes consistent.
struct FusedLossInputs {
  bool has_seg = false, has_depth = false, has_normal = false;
  at::Tensor seg_logits, seg_target, depth_pred, depth_target, normal_pred, normal_target;
  PixelView seg, seg_t, depth, depth_t, normal, normal_t;

  // The first prediction given (seg, else depth, else normal): device and options of the outputs.
  const at::Tensor& first_prediction() const {
    return has_seg ? seg_logits : (has_depth ? depth_pred : normal_pred);
  }
};



FusedLossInputs check_fused_loss_inputs(
    const c10::optional<at::Tensor>& seg_logits, const c10::optional<at::Tensor>& seg_target,
    const c10::optional<at::Tensor>& depth_pred, const c10::optional<at::Tensor>& depth_target,
    const c10::optional<at::Tensor>& normal_pred, const c10::optional<at::Tensor>& normal_target);

// Forward: (losses [3] float32, valid counts [3] int64, seg_lse). seg_lse [B,H,W] holds each pixel's
// log-sum-exp of the logits (float32, float64 for float64 logits; empty without segmentation): the
// one thing the backward cannot cheaply recompute. The backward re-reads the inputs, so no
// input-sized buffer lives between the passes.
using FusedLossOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

FusedLossOutputs fused_dense_loss_forward_cpu(
    const c10::optional<at::Tensor>& seg_logits, const c10::optional<at::Tensor>& seg_target,
    const c10::optional<at::Tensor>& depth_pred, const c10::optional<at::Tensor>& depth_target,
    const c10::optional<at::Tensor>& normal_pred, const c10::optional<at::Tensor>& normal_target,
    int64_t ignore_index);

// Backward: d(sum_t grad_losses[t] * losses[t]) / d(seg_logits, depth_pred, normal_pred), each in
// its prediction's dtype and layout (empty for an absent task).
using FusedLossGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

FusedLossGrads fused_dense_loss_backward_cpu(
    const at::Tensor& grad_losses, const at::Tensor& counts, const at::Tensor& seg_lse,
    const c10::optional<at::Tensor>& seg_logits, const c10::optional<at::Tensor>& seg_target,
    const c10::optional<at::Tensor>& depth_pred, const c10::optional<at::Tensor>& depth_target,
    const c10::optional<at::Tensor>& normal_pred, const c10::optional<at::Tensor>& normal_target,
    int64_t ignore_index);

// Checks the backward's grad_losses [3] and counts [3].
void check_backward_inputs(const at::Tensor& grad_losses, const at::Tensor& counts);

// Per-task factor of the backward: grad_losses[t] / max(counts[t], 1), as doubles on the host
// (grad_losses and counts are tiny; on CUDA the kernels read them on the device instead).
std::array<double, 3> backward_scales(const at::Tensor& grad_losses, const at::Tensor& counts);

// Normal-loss epsilon: the prediction is divided by max(||p||, kNormalEps), as F.normalize does.
constexpr double kNormalEps = 1e-12;

}  // namespace mtvision
