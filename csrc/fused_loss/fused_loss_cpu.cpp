// CPU kernels of the fused dense loss. Pixels are processed in fixed blocks of kBlock pixels (never
// crossing an image), each block's sums land in their own slot and are added in block order at the
// end: the result is bit-identical whatever the number of threads.
#include "fused_loss.h"

#include "cpu_memory.h"
#include "cpu_simd.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace mtvision {
namespace {

constexpr int64_t kBlock = 256;

// exp(x) for float with ~1 ulp error, written without branches or calls so that loops over a block
// auto-vectorize (std::exp does not). Range reduction x = n ln2 + r, Cephes polynomial for e^r.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.33654f), 88.72283f);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float n = (x * 1.44269504088896341f + shifter) - shifter;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double exp_approx(double x) { return std::exp(x); }

// log(x) for float x > 0 (normal numbers) with ~1 ulp error, vectorizable like exp_approx: x = m 2^e
// with m in [sqrt(1/2), sqrt(2)), Cephes polynomial for log(m). A scalar logf per pixel cost as much as
// the C exponentials of the pixel's softmax.
inline float log_approx(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  int32_t e = ((bits >> 23) & 0xff) - 127;
  int32_t mbits = (bits & 0x007fffff) | 0x3f800000;  // mantissa scaled to [1, 2)
  float m;
  std::memcpy(&m, &mbits, sizeof(m));
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const float f = m - 1.0f, z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float ef = static_cast<float>(e);
  float r = f * z * p + ef * -2.12194440e-4f - 0.5f * z;
  return f + r + ef * 0.693359375f;
}
inline double log_approx(double x) { return std::log(x); }


// Per-block partial sums, one slot per block, reduced in block order.
struct Partials {
  std::vector<double> sum;
  std::vector<int64_t> count;
  explicit Partials(int64_t n) : sum(n, 0.0), count(n, 0) {}
  std::pair<double, int64_t> total() const {
    double s = 0.0;
    int64_t c = 0;
    for (size_t i = 0; i < sum.size(); ++i) { s += sum[i]; c += count[i]; }
    return {s, c};
  }
};

// Runs fn(b, p0, p1, block_index) over all blocks of B images of P pixels, in parallel.
template <typename Fn>
void for_each_block(int64_t B, int64_t P, Fn fn) {
  const int64_t blocks_per_image = (P + kBlock - 1) / kBlock;
  at::parallel_for(0, B * blocks_per_image, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / blocks_per_image, p0 = (i % blocks_per_image) * kBlock;
      fn(b, p0, std::min(P, p0 + kBlock), i);
    }
  });
}

int64_t num_blocks(int64_t B, int64_t P) { return B * ((P + kBlock - 1) / kBlock); }

// The logits of one block of pixels of one image, channel by channel. UNIT: pixels are contiguous
// (NCHW), so the inner loops are unit-stride and vectorize; otherwise (channels_last) they stride.
template <typename T, bool UNIT>
struct BlockLogits {
  const T* base;
  int64_t sc, sp;
  T at(int64_t c, int64_t p) const { return base[c * sc + (UNIT ? p : p * sp)]; }
};

// Copies one block's logits into xs ([C, kBlock], acc_t) while taking each pixel's max, then sums
// exp(x - max) from the copy. The copy matters: the channel rows of an NCHW block sit H*W elements
// apart, which maps them all to the same cache sets, so a second pass over the tensor would miss.
template <typename T, bool UNIT, typename acc_t>
MTV_SIMD_CLONES void block_log_sum_exp(const BlockLogits<T, UNIT>& x, int64_t C, int64_t n,
                                       acc_t* __restrict xs, acc_t* __restrict lse) {
  acc_t mx[kBlock], sum[kBlock];
  for (int64_t p = 0; p < n; ++p) mx[p] = -std::numeric_limits<acc_t>::infinity();
  for (int64_t c = 0; c < C; ++c) {
    acc_t* __restrict xc = xs + c * kBlock;
    for (int64_t p = 0; p < n; ++p) {
      const acc_t v = static_cast<acc_t>(x.at(c, p));
      xc[p] = v;
      mx[p] = std::max(mx[p], v);
    }
  }
  for (int64_t p = 0; p < n; ++p) sum[p] = 0;
  for (int64_t c = 0; c < C; ++c) {
    const acc_t* xc = xs + c * kBlock;
    for (int64_t p = 0; p < n; ++p) sum[p] += exp_approx(xc[p] - mx[p]);
  }
  for (int64_t p = 0; p < n; ++p) lse[p] = mx[p] + log_approx(sum[p]);
}

// Per-thread scratch of at least `size` elements, reused across blocks and calls.
template <typename acc_t>
acc_t* scratch(int64_t size) {
  thread_local std::vector<acc_t> buffer;
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(static_cast<size_t>(size));
  return buffer.data();
}

// Cross-entropy with ignore_index: sums lse - x[label] over valid pixels, stores lse per pixel.
template <typename T, bool UNIT>
void seg_forward(const FusedLossInputs& in, int64_t ignore_index, at::Tensor& lse_out, Partials& out) {
  using acc_t = typename AccType<T>::type;
  const PixelView v = in.seg, vt = in.seg_t;
  const T* x = in.seg_logits.data_ptr<T>();
  const int64_t* y = in.seg_target.data_ptr<int64_t>();
  acc_t* lse_all = lse_out.data_ptr<acc_t>();
  const int64_t C = v.C;
  std::vector<int64_t> bad_label(out.sum.size(), ignore_index);  // per block: an invalid label seen
  for_each_block(v.B, v.P, [&](int64_t b, int64_t p0, int64_t p1, int64_t blk) {
    const int64_t n = p1 - p0;
    const BlockLogits<T, UNIT> xb{x + b * v.sb + p0 * v.sp, v.sc, v.sp};
    acc_t* lse = lse_all + b * v.P + p0;
    acc_t* xs = scratch<acc_t>(C * kBlock);
    block_log_sum_exp(xb, C, n, xs, lse);
    const int64_t* yb = y + b * vt.sb + p0 * vt.sp;
    double block_sum = 0.0;
    int64_t block_count = 0;
    for (int64_t p = 0; p < n; ++p) {
      const int64_t label = yb[p * vt.sp];
      if (label == ignore_index) continue;
      if (label < 0 || label >= C) {  // reported after the parallel loop: no throw inside it
        bad_label[blk] = label;
        continue;
      }
      block_sum += static_cast<double>(lse[p] - xs[label * kBlock + p]);
      ++block_count;
    }
    out.sum[blk] = block_sum;
    out.count[blk] = block_count;
  });
  for (const int64_t label : bad_label)
    TORCH_CHECK(label == ignore_index, "fused_dense_loss: seg_target holds label ", label,
                " outside [0, ", C, ") and not ignore_index (", ignore_index, ")");
}

// One block's k * (softmax - onehot), k = scale on valid pixels and 0 on ignored ones, in one
// branch-free pass over the channels (labels as acc_t so the one-hot compare vectorizes too).
template <typename T, bool UNIT, typename acc_t>
MTV_SIMD_CLONES void block_softmax_grad(const BlockLogits<T, UNIT>& xb, const acc_t* label,
                                        const acc_t* k, const acc_t* lse, int64_t C, int64_t n,
                                        T* __restrict gb) {
  for (int64_t c = 0; c < C; ++c) {
    T* gc = gb + c * xb.sc;
    const acc_t cf = static_cast<acc_t>(c);
    for (int64_t p = 0; p < n; ++p) {
      const acc_t onehot = label[p] == cf ? acc_t(1) : acc_t(0);
      const acc_t sm = exp_approx(static_cast<acc_t>(xb.at(c, p)) - lse[p]);
      gc[UNIT ? p : p * xb.sp] = static_cast<T>(k[p] * (sm - onehot));
    }
  }
}

// d/dx of scale * sum CE: scale * (softmax - onehot) on valid pixels, 0 on ignored ones.
template <typename T, bool UNIT>
void seg_backward(const FusedLossInputs& in, int64_t ignore_index, const at::Tensor& lse_all,
                  double scale, at::Tensor& grad) {
  using acc_t = typename AccType<T>::type;
  const PixelView v = in.seg, vt = in.seg_t, vg = pixel_view(grad).second;
  TORCH_CHECK(vg.sp == v.sp && vg.sc == v.sc && vg.sb == v.sb,
              "fused_dense_loss_backward: gradient layout differs from the logits'");
  const T* x = in.seg_logits.data_ptr<T>();
  const int64_t* y = in.seg_target.data_ptr<int64_t>();
  const acc_t* lse_ptr = lse_all.data_ptr<acc_t>();
  T* g = grad.data_ptr<T>();
  const int64_t C = v.C;
  for_each_block(v.B, v.P, [&](int64_t b, int64_t p0, int64_t p1, int64_t) {
    const int64_t n = p1 - p0;
    const int64_t off = b * v.sb + p0 * v.sp;
    const int64_t* yb = y + b * vt.sb + p0 * vt.sp;
    acc_t label[kBlock], k[kBlock];
    for (int64_t p = 0; p < n; ++p) {
      const int64_t l = yb[p * vt.sp];
      const bool valid = l != ignore_index;
      label[p] = valid ? static_cast<acc_t>(l) : acc_t(-1);
      k[p] = valid ? static_cast<acc_t>(scale) : acc_t(0);
    }
    block_softmax_grad(BlockLogits<T, UNIT>{x + off, v.sc, v.sp}, label, k, lse_ptr + b * v.P + p0,
                       C, n, g + off);
  });
}

// L1 on pixels with target > 0; the gradient is scale * sign(pred - target) there, 0 elsewhere.
template <typename T>
void depth_pass(const FusedLossInputs& in, Partials* out, double scale, at::Tensor* grad) {
  using acc_t = typename AccType<T>::type;
  const PixelView v = in.depth, vt = in.depth_t;
  const PixelView vg = grad ? pixel_view(*grad).second : PixelView{};
  const T* x = in.depth_pred.data_ptr<T>();
  const T* t = in.depth_target.data_ptr<T>();
  T* g = grad ? grad->data_ptr<T>() : nullptr;
  const acc_t k = static_cast<acc_t>(scale);
  for_each_block(v.B, v.P, [&](int64_t b, int64_t p0, int64_t p1, int64_t blk) {
    acc_t s = 0;
    int64_t c = 0;
    for (int64_t p = p0; p < p1; ++p) {
      const acc_t d = static_cast<acc_t>(x[b * v.sb + p * v.sp]);
      const acc_t target = static_cast<acc_t>(t[b * vt.sb + p * vt.sp]);
      const bool valid = target > acc_t(0);
      const acc_t diff = d - target;
      s += valid ? std::abs(diff) : acc_t(0);
      c += valid;
      if (g) {
        const acc_t sign = diff > 0 ? acc_t(1) : (diff < 0 ? acc_t(-1) : acc_t(0));
        g[b * vg.sb + p * vg.sp] = static_cast<T>(valid ? k * sign : acc_t(0));
      }
    }
    if (out) {
      out->sum[blk] = static_cast<double>(s);
      out->count[blk] = c;
    }
  });
}

// 1 - <p / max(|p|, eps), t> on pixels with |t| > 0. Its gradient w.r.t. p, times scale:
// -(t - cos * p / |p|) / |p| when |p| > eps, -t / eps otherwise (what autograd through
// F.normalize gives).
template <typename T>
void normal_pass(const FusedLossInputs& in, Partials* out, double scale, at::Tensor* grad) {
  using acc_t = typename AccType<T>::type;
  const PixelView v = in.normal, vt = in.normal_t;
  const PixelView vg = grad ? pixel_view(*grad).second : PixelView{};
  const T* x = in.normal_pred.data_ptr<T>();
  const T* t = in.normal_target.data_ptr<T>();
  T* g = grad ? grad->data_ptr<T>() : nullptr;
  const acc_t eps = static_cast<acc_t>(kNormalEps), k = static_cast<acc_t>(scale);
  for_each_block(v.B, v.P, [&](int64_t b, int64_t p0, int64_t p1, int64_t blk) {
    acc_t s = 0;
    int64_t c = 0;
    for (int64_t p = p0; p < p1; ++p) {
      acc_t px[3], tx[3];
      for (int j = 0; j < 3; ++j) {
        px[j] = static_cast<acc_t>(x[b * v.sb + j * v.sc + p * v.sp]);
        tx[j] = static_cast<acc_t>(t[b * vt.sb + j * vt.sc + p * vt.sp]);
      }
      const bool valid = tx[0] * tx[0] + tx[1] * tx[1] + tx[2] * tx[2] > acc_t(0);
      const acc_t norm = std::sqrt(px[0] * px[0] + px[1] * px[1] + px[2] * px[2]);
      const acc_t cos = (px[0] * tx[0] + px[1] * tx[1] + px[2] * tx[2]) / std::max(norm, eps);
      s += valid ? acc_t(1) - cos : acc_t(0);
      c += valid;
      if (g) {
        for (int j = 0; j < 3; ++j) {
          acc_t gj = 0;
          if (valid) gj = norm > eps ? -(tx[j] - cos * px[j] / norm) / norm : -tx[j] / eps;
          g[b * vg.sb + j * vg.sc + p * vg.sp] = static_cast<T>(k * gj);
        }
      }
    }
    if (out) {
      out->sum[blk] = static_cast<double>(s);
      out->count[blk] = c;
    }
  });
}

template <typename Fn>
void dispatch_unit_stride(bool unit, Fn fn) {
  if (unit) fn(std::true_type{});
  else fn(std::false_type{});
}

}  // namespace

std::array<double, 3> backward_scales(const at::Tensor& grad_losses, const at::Tensor& counts) {
  check_backward_inputs(grad_losses, counts);
  const at::Tensor gl = grad_losses.to(at::kCPU, at::kDouble).contiguous();
  const at::Tensor cn = counts.to(at::kCPU, at::kLong).contiguous();
  std::array<double, 3> k{};
  for (int t = 0; t < 3; ++t)
    k[t] = gl.data_ptr<double>()[t] / static_cast<double>(std::max<int64_t>(cn.data_ptr<int64_t>()[t], 1));
  return k;
}

FusedLossOutputs fused_dense_loss_forward_cpu(
    const c10::optional<at::Tensor>& seg_logits, const c10::optional<at::Tensor>& seg_target,
    const c10::optional<at::Tensor>& depth_pred, const c10::optional<at::Tensor>& depth_target,
    const c10::optional<at::Tensor>& normal_pred, const c10::optional<at::Tensor>& normal_target,
    int64_t ignore_index) {
  const FusedLossInputs in = check_fused_loss_inputs(seg_logits, seg_target, depth_pred,
                                                     depth_target, normal_pred, normal_target);
  const at::Tensor& any = in.first_prediction();
  double sums[3] = {0, 0, 0};
  int64_t counts[3] = {0, 0, 0};
  at::Tensor lse = at::empty({0}, any.options().dtype(at::kFloat));
  if (in.has_seg) {
    const auto acc = in.seg_logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    lse = at::empty({in.seg.B, in.seg_logits.size(2), in.seg_logits.size(3)}, any.options().dtype(acc));
    Partials part(num_blocks(in.seg.B, in.seg.P));
    AT_DISPATCH_FLOATING_TYPES(in.seg_logits.scalar_type(), "fused_dense_loss_seg_cpu", [&] {
      dispatch_unit_stride(in.seg.sp == 1, [&](auto unit) {
        seg_forward<scalar_t, decltype(unit)::value>(in, ignore_index, lse, part);
      });
    });
    std::tie(sums[0], counts[0]) = part.total();
  }
  if (in.has_depth) {
    Partials part(num_blocks(in.depth.B, in.depth.P));
    AT_DISPATCH_FLOATING_TYPES(in.depth_pred.scalar_type(), "fused_dense_loss_depth_cpu", [&] {
      depth_pass<scalar_t>(in, &part, 0.0, nullptr);
    });
    std::tie(sums[1], counts[1]) = part.total();
  }
  if (in.has_normal) {
    Partials part(num_blocks(in.normal.B, in.normal.P));
    AT_DISPATCH_FLOATING_TYPES(in.normal_pred.scalar_type(), "fused_dense_loss_normal_cpu", [&] {
      normal_pass<scalar_t>(in, &part, 0.0, nullptr);
    });
    std::tie(sums[2], counts[2]) = part.total();
  }
  const bool f64 = any.scalar_type() == at::kDouble;  // float64 in, float64 losses (gradcheck)
  at::Tensor losses = at::empty({3}, any.options().dtype(f64 ? at::kDouble : at::kFloat));
  at::Tensor count_t = at::empty({3}, any.options().dtype(at::kLong));
  for (int i = 0; i < 3; ++i) {
    const double mean = counts[i] > 0 ? sums[i] / counts[i] : 0.0;
    if (f64) losses.data_ptr<double>()[i] = mean;
    else losses.data_ptr<float>()[i] = static_cast<float>(mean);
    count_t.data_ptr<int64_t>()[i] = counts[i];
  }
  return {losses, count_t, lse};
}

FusedLossGrads fused_dense_loss_backward_cpu(
    const at::Tensor& grad_losses, const at::Tensor& counts, const at::Tensor& seg_lse,
    const c10::optional<at::Tensor>& seg_logits, const c10::optional<at::Tensor>& seg_target,
    const c10::optional<at::Tensor>& depth_pred, const c10::optional<at::Tensor>& depth_target,
    const c10::optional<at::Tensor>& normal_pred, const c10::optional<at::Tensor>& normal_target,
    int64_t ignore_index) {
  const FusedLossInputs in = check_fused_loss_inputs(seg_logits, seg_target, depth_pred,
                                                     depth_target, normal_pred, normal_target);
  const std::array<double, 3> k = backward_scales(grad_losses, counts);
  const at::Tensor& any = in.first_prediction();
  at::Tensor out[3];
  if (in.has_seg) {
    TORCH_CHECK(seg_lse.numel() == in.seg.B * in.seg.P && seg_lse.is_contiguous(),
                "fused_dense_loss_backward: seg_lse must be the forward's [B,H,W] output");
    out[0] = empty_like_huge_pages(in.seg_logits);
    AT_DISPATCH_FLOATING_TYPES(in.seg_logits.scalar_type(), "fused_dense_loss_seg_backward_cpu", [&] {
      dispatch_unit_stride(in.seg.sp == 1, [&](auto unit) {
        seg_backward<scalar_t, decltype(unit)::value>(in, ignore_index, seg_lse, k[0], out[0]);
      });
    });
  }
  if (in.has_depth) {
    out[1] = empty_like_huge_pages(in.depth_pred);
    AT_DISPATCH_FLOATING_TYPES(in.depth_pred.scalar_type(), "fused_dense_loss_depth_backward_cpu", [&] {
      depth_pass<scalar_t>(in, nullptr, k[1], &out[1]);
    });
  }
  if (in.has_normal) {
    out[2] = empty_like_huge_pages(in.normal_pred);
    AT_DISPATCH_FLOATING_TYPES(in.normal_pred.scalar_type(), "fused_dense_loss_normal_backward_cpu", [&] {
      normal_pass<scalar_t>(in, nullptr, k[2], &out[2]);
    });
  }
  for (auto& o : out)
    if (!o.defined()) o = at::empty({0}, any.options());
  return {out[0], out[1], out[2]};
}

TORCH_LIBRARY_IMPL(mtvision, CPU, m) {
  m.impl("fused_dense_loss_forward", &fused_dense_loss_forward_cpu);
  m.impl("fused_dense_loss_backward", &fused_dense_loss_backward_cpu);
}

}  // namespace mtvision
