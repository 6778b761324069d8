#include "fused_loss.h"

#include <c10/util/Exception.h>

namespace mtvision {

namespace {

// Pixel stride of a tensor whose last two dims (H, W) can be flattened into one index, or -1.
int64_t flat_pixel_stride(const at::Tensor& t, int64_t h_dim, int64_t w_dim) {
  const int64_t H = t.size(h_dim), W = t.size(w_dim);
  if (W == 1) return H == 1 ? 1 : t.stride(h_dim);
  if (H == 1 || t.stride(h_dim) == W * t.stride(w_dim)) return t.stride(w_dim);
  return -1;
}

}  // namespace

std::pair<at::Tensor, PixelView> pixel_view(const at::Tensor& input) {
  const int64_t dim = input.dim();
  TORCH_CHECK(dim == 3 || dim == 4, "pixel_view: expected a 3-D or 4-D tensor, got ", dim, "-D");
  at::Tensor t = input;
  const int64_t h_dim = dim - 2, w_dim = dim - 1;
  int64_t sp = flat_pixel_stride(t, h_dim, w_dim);
  if (sp < 0) {
    t = t.contiguous();
    sp = flat_pixel_stride(t, h_dim, w_dim);
  }
  PixelView v;
  v.B = t.size(0);
  v.C = dim == 4 ? t.size(1) : 1;
  v.P = t.size(h_dim) * t.size(w_dim);
  v.sb = t.stride(0);
  v.sc = dim == 4 ? t.stride(1) : 0;
  v.sp = sp;
  return {t, v};
}

FusedLossInputs check_fused_loss_inputs(
    const c10::optional<at::Tensor>& seg_logits, const c10::optional<at::Tensor>& seg_target,
    const c10::optional<at::Tensor>& depth_pred, const c10::optional<at::Tensor>& depth_target,
    const c10::optional<at::Tensor>& normal_pred, const c10::optional<at::Tensor>& normal_target) {
  FusedLossInputs in;
  TORCH_CHECK(seg_logits.has_value() == seg_target.has_value(),
              "fused_dense_loss: seg_logits and seg_target must be given together");
  TORCH_CHECK(depth_pred.has_value() == depth_target.has_value(),
              "fused_dense_loss: depth_pred and depth_target must be given together");
  TORCH_CHECK(normal_pred.has_value() == normal_target.has_value(),
              "fused_dense_loss: normal_pred and normal_target must be given together");

  c10::optional<at::Device> device;
  auto same_device = [&](const at::Tensor& t, const char* name) {
    if (!device) device = t.device();
    TORCH_CHECK(t.device() == *device, "fused_dense_loss: ", name, " is on ", t.device(),
                " but other inputs are on ", *device);
  };
  auto check_pred = [&](const at::Tensor& t, const char* name, int64_t channels) {
    TORCH_CHECK(t.dim() == 4, "fused_dense_loss: ", name, " must be [B,C,H,W], got shape ", t.sizes());
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fused_dense_loss: ", name,
                " must be floating point, got ", t.scalar_type());
    TORCH_CHECK(channels < 0 || t.size(1) == channels, "fused_dense_loss: ", name, " must have ",
                channels, " channels, got shape ", t.sizes());
    same_device(t, name);
  };
  auto check_pair = [&](const at::Tensor& pred, const at::Tensor& target, const char* name) {
    TORCH_CHECK(target.sizes() == pred.sizes(), "fused_dense_loss: ", name,
                " target shape ", target.sizes(), " does not match the prediction's ", pred.sizes());
    TORCH_CHECK(target.scalar_type() == pred.scalar_type(), "fused_dense_loss: ", name,
                " target dtype ", target.scalar_type(), " differs from the prediction's ",
                pred.scalar_type());
    same_device(target, name);
  };

  if (seg_logits.has_value()) {
    const at::Tensor& x = *seg_logits;
    const at::Tensor& y = *seg_target;
    check_pred(x, "seg_logits", -1);
    TORCH_CHECK(x.size(1) >= 1, "fused_dense_loss: seg_logits needs at least one class");
    TORCH_CHECK(y.dim() == 3 && y.size(0) == x.size(0) && y.size(1) == x.size(2) && y.size(2) == x.size(3),
                "fused_dense_loss: seg_target must be [B,H,W] = [", x.size(0), ",", x.size(2), ",",
                x.size(3), "], got ", y.sizes());
    TORCH_CHECK(y.scalar_type() == at::kLong, "fused_dense_loss: seg_target must be int64, got ",
                y.scalar_type());
    same_device(y, "seg_target");
    in.has_seg = true;
    std::tie(in.seg_logits, in.seg) = pixel_view(x);
    std::tie(in.seg_target, in.seg_t) = pixel_view(y);
  }
  if (depth_pred.has_value()) {
    check_pred(*depth_pred, "depth_pred", 1);
    check_pair(*depth_pred, *depth_target, "depth");
    in.has_depth = true;
    std::tie(in.depth_pred, in.depth) = pixel_view(*depth_pred);
    std::tie(in.depth_target, in.depth_t) = pixel_view(*depth_target);
  }
  if (normal_pred.has_value()) {
    check_pred(*normal_pred, "normal_pred", 3);
    check_pair(*normal_pred, *normal_target, "normal");
    in.has_normal = true;
    std::tie(in.normal_pred, in.normal) = pixel_view(*normal_pred);
    std::tie(in.normal_target, in.normal_t) = pixel_view(*normal_target);
  }
  TORCH_CHECK(device.has_value(), "fused_dense_loss: at least one task must be given");
  return in;
}

void check_backward_inputs(const at::Tensor& grad_losses, const at::Tensor& counts) {
  TORCH_CHECK(grad_losses.numel() == 3 && counts.numel() == 3,
              "fused_dense_loss_backward: grad_losses and counts must have 3 entries, got ",
              grad_losses.numel(), " and ", counts.numel());
}

}  // namespace mtvision
