// CUDA kernels of the fused dense loss: one launch for the forward (all three tasks, their losses,
// valid counts and per-pixel gradients) and one for the backward (scaling of the saved gradients).
// The forward's final reduction is done by the last block to finish (threadfence pattern) over
// per-block partials in block order, so the result is deterministic and needs no second launch.
#include "fused_loss.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime.h>
#include <torch/library.h>

namespace mtvision {
namespace {

constexpr int kThreads = 256;

template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }
__device__ __forceinline__ float fast_log(float x) { return __logf(x); }
__device__ __forceinline__ double fast_log(double x) { return log(x); }

template <typename T>
struct Task {  // one task's prediction, target and gradient, addressed through PixelViews
  const T* pred = nullptr;
  const void* target = nullptr;
  T* grad = nullptr;
  PixelView v, vt, vg;
  int64_t n = 0;  // B * P pixels, 0 when the task is absent
};

template <typename T>
struct ForwardArgs {
  Task<T> seg, depth, normal;
  int64_t ignore_index;
  double* partial_sums;      // [gridDim.x, 3]
  int64_t* partial_counts;   // [gridDim.x, 3]
  unsigned int* blocks_done; // zero on entry, reset to zero by the last block
  float* losses;             // [3]
  int64_t* counts;           // [3]
};

__device__ __forceinline__ int64_t offset(const PixelView& v, int64_t b, int64_t c, int64_t p) {
  return b * v.sb + c * v.sc + p * v.sp;
}

template <typename T, typename acc_t>
__device__ __forceinline__ void seg_pixel(const Task<T>& t, int64_t i, int64_t ignore_index,
                                          acc_t& sum, int64_t& count) {
  const int64_t b = i / t.v.P, p = i % t.v.P, C = t.v.C;
  const T* x = t.pred + offset(t.v, b, 0, p);
  acc_t m = -INFINITY, s = 0;
  for (int64_t c = 0; c < C; ++c) {  // online log-sum-exp: one read of the logits
    const acc_t xv = static_cast<acc_t>(x[c * t.v.sc]);
    if (xv > m) {
      s = s * fast_exp(m - xv) + acc_t(1);
      m = xv;
    } else {
      s += fast_exp(xv - m);
    }
  }
  const int64_t label = static_cast<const int64_t*>(t.target)[offset(t.vt, b, 0, p)];
  const bool valid = label != ignore_index;
  CUDA_KERNEL_ASSERT(!valid || (label >= 0 && label < C));
  const acc_t lse = m + fast_log(s);
  if (valid) {
    sum += lse - static_cast<acc_t>(x[label * t.v.sc]);
    ++count;
  }
  if (t.grad) {
    T* g = t.grad + offset(t.vg, b, 0, p);
    for (int64_t c = 0; c < C; ++c) {
      const acc_t sm = fast_exp(static_cast<acc_t>(x[c * t.v.sc]) - lse);
      g[c * t.vg.sc] = static_cast<T>(valid ? sm - (c == label ? acc_t(1) : acc_t(0)) : acc_t(0));
    }
  }
}

template <typename T, typename acc_t>
__device__ __forceinline__ void depth_pixel(const Task<T>& t, int64_t i, acc_t& sum, int64_t& count) {
  const int64_t b = i / t.v.P, p = i % t.v.P;
  const acc_t d = static_cast<acc_t>(t.pred[offset(t.v, b, 0, p)]);
  const acc_t target = static_cast<acc_t>(static_cast<const T*>(t.target)[offset(t.vt, b, 0, p)]);
  const bool valid = target > acc_t(0);
  const acc_t diff = d - target;
  if (valid) {
    sum += fabs(diff);
    ++count;
  }
  if (t.grad) {
    const acc_t sign = diff > 0 ? acc_t(1) : (diff < 0 ? acc_t(-1) : acc_t(0));
    t.grad[offset(t.vg, b, 0, p)] = static_cast<T>(valid ? sign : acc_t(0));
  }
}

template <typename T, typename acc_t>
__device__ __forceinline__ void normal_pixel(const Task<T>& t, int64_t i, acc_t& sum, int64_t& count) {
  const int64_t b = i / t.v.P, p = i % t.v.P;
  const T* x = t.pred + offset(t.v, b, 0, p);
  const T* y = static_cast<const T*>(t.target) + offset(t.vt, b, 0, p);
  acc_t px[3], tx[3];
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    px[k] = static_cast<acc_t>(x[k * t.v.sc]);
    tx[k] = static_cast<acc_t>(y[k * t.vt.sc]);
  }
  const acc_t eps = static_cast<acc_t>(kNormalEps);
  const bool valid = tx[0] * tx[0] + tx[1] * tx[1] + tx[2] * tx[2] > acc_t(0);
  const acc_t norm = sqrt(px[0] * px[0] + px[1] * px[1] + px[2] * px[2]);
  const acc_t cos = (px[0] * tx[0] + px[1] * tx[1] + px[2] * tx[2]) / (norm > eps ? norm : eps);
  if (valid) {
    sum += acc_t(1) - cos;
    ++count;
  }
  if (t.grad) {
    T* g = t.grad + offset(t.vg, b, 0, p);
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      acc_t gk = 0;
      if (valid) gk = norm > eps ? -(tx[k] - cos * px[k] / norm) / norm : -tx[k] / eps;
      g[k * t.vg.sc] = static_cast<T>(gk);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) fused_loss_forward_kernel(ForwardArgs<T> a) {
  using acc_t = typename AccType<T>::type;
  acc_t sum[3] = {0, 0, 0};
  int64_t count[3] = {0, 0, 0};
  const int64_t n = max(a.seg.n, max(a.depth.n, a.normal.n));
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    if (i < a.seg.n) seg_pixel(a.seg, i, a.ignore_index, sum[0], count[0]);
    if (i < a.depth.n) depth_pixel(a.depth, i, sum[1], count[1]);
    if (i < a.normal.n) normal_pixel(a.normal, i, sum[2], count[2]);
  }

  // Block reduction: warp shuffles, then one value per warp through shared memory.
  __shared__ double warp_sum[kThreads / 32][3];
  __shared__ int64_t warp_count[kThreads / 32][3];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    double s = static_cast<double>(sum[k]);
    int64_t c = count[k];
    for (int off = 16; off > 0; off /= 2) {
      s += __shfl_down_sync(0xffffffffu, s, off);
      c += __shfl_down_sync(0xffffffffu, c, off);
    }
    if (lane == 0) {
      warp_sum[warp][k] = s;
      warp_count[warp][k] = c;
    }
  }
  __syncthreads();
  __shared__ bool is_last;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      double s = 0;
      int64_t c = 0;
      for (int w = 0; w < kThreads / 32; ++w) {
        s += warp_sum[w][k];
        c += warp_count[w][k];
      }
      a.partial_sums[blockIdx.x * 3 + k] = s;
      a.partial_counts[blockIdx.x * 3 + k] = c;
    }
    __threadfence();
    is_last = atomicAdd(a.blocks_done, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  if (threadIdx.x < 3) {  // the last block adds the partials in block order: deterministic
    const int k = threadIdx.x;
    double s = 0;
    int64_t c = 0;
    for (unsigned int blk = 0; blk < gridDim.x; ++blk) {
      s += static_cast<volatile double*>(a.partial_sums)[blk * 3 + k];
      c += static_cast<volatile int64_t*>(a.partial_counts)[blk * 3 + k];
    }
    a.losses[k] = c > 0 ? static_cast<float>(s / static_cast<double>(c)) : 0.0f;
    a.counts[k] = c;
  }
  if (threadIdx.x == 0) *a.blocks_done = 0;
}

template <typename T>
__global__ void fused_loss_backward_kernel(const float* grad_losses, const int64_t* counts,
                                           const T* s0, const T* s1, const T* s2, T* o0, T* o1,
                                           T* o2, int64_t n0, int64_t n1, int64_t n2) {
  using acc_t = typename AccType<T>::type;
  const acc_t k0 = grad_losses[0] / static_cast<acc_t>(counts[0] > 0 ? counts[0] : 1);
  const acc_t k1 = grad_losses[1] / static_cast<acc_t>(counts[1] > 0 ? counts[1] : 1);
  const acc_t k2 = grad_losses[2] / static_cast<acc_t>(counts[2] > 0 ? counts[2] : 1);
  const int64_t n = n0 + n1 + n2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    if (i < n0) {
      o0[i] = static_cast<T>(k0 * static_cast<acc_t>(s0[i]));
    } else if (i < n0 + n1) {
      o1[i - n0] = static_cast<T>(k1 * static_cast<acc_t>(s1[i - n0]));
    } else {
      o2[i - n0 - n1] = static_cast<T>(k2 * static_cast<acc_t>(s2[i - n0 - n1]));
    }
  }
}

int grid_size(int64_t n, int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(sms) * 8)));
}

template <typename T>
Task<T> make_task(const at::Tensor& pred, const at::Tensor& target, const PixelView& v,
                  const PixelView& vt, at::Tensor& grad, bool compute_grad) {
  Task<T> t;
  t.pred = pred.data_ptr<T>();
  t.target = target.data_ptr();
  t.v = v;
  t.vt = vt;
  t.n = v.B * v.P;
  if (compute_grad) {
    grad = at::empty_like(pred);
    t.grad = grad.data_ptr<T>();
    t.vg = pixel_view(grad).second;
  }
  return t;
}

FusedLossOutputs fused_dense_loss_forward_cuda(
    const c10::optional<at::Tensor>& seg_logits, const c10::optional<at::Tensor>& seg_target,
    const c10::optional<at::Tensor>& depth_pred, const c10::optional<at::Tensor>& depth_target,
    const c10::optional<at::Tensor>& normal_pred, const c10::optional<at::Tensor>& normal_target,
    int64_t ignore_index, bool compute_grad) {
  const FusedLossInputs in = check_fused_loss_inputs(seg_logits, seg_target, depth_pred,
                                                     depth_target, normal_pred, normal_target);
  const at::Tensor& any = in.has_seg ? in.seg_logits : (in.has_depth ? in.depth_pred : in.normal_pred);
  const auto dtype = any.scalar_type();
  for (const at::Tensor* t : {&in.seg_logits, &in.depth_pred, &in.normal_pred}) {
    TORCH_CHECK(!t->defined() || t->scalar_type() == dtype,
                "fused_dense_loss (CUDA): all predictions must share one dtype, got ", dtype,
                " and ", t->scalar_type());
  }
  const c10::cuda::CUDAGuard guard(any.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor seg_grad = at::empty({0}, any.options()), depth_grad = at::empty({0}, any.options()),
             normal_grad = at::empty({0}, any.options());
  const at::Tensor losses = at::empty({3}, any.options().dtype(at::kFloat));
  const at::Tensor counts = at::empty({3}, any.options().dtype(at::kLong));
  const int64_t n = std::max({in.has_seg ? in.seg.B * in.seg.P : 0,
                              in.has_depth ? in.depth.B * in.depth.P : 0,
                              in.has_normal ? in.normal.B * in.normal.P : 0});
  const int grid = grid_size(n, any.device().index());
  // workspace: [grid, 3] double sums, [grid, 3] int64 counts, then one zeroed completion counter
  const at::Tensor partials = at::empty({grid * 6 + 1}, any.options().dtype(at::kLong));
  C10_CUDA_CHECK(cudaMemsetAsync(partials.data_ptr<int64_t>() + grid * 6, 0, sizeof(int64_t), stream));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fused_dense_loss_forward_cuda", [&] {
    ForwardArgs<scalar_t> a;
    if (in.has_seg)
      a.seg = make_task<scalar_t>(in.seg_logits, in.seg_target, in.seg, in.seg_t, seg_grad, compute_grad);
    if (in.has_depth)
      a.depth = make_task<scalar_t>(in.depth_pred, in.depth_target, in.depth, in.depth_t, depth_grad,
                                    compute_grad);
    if (in.has_normal)
      a.normal = make_task<scalar_t>(in.normal_pred, in.normal_target, in.normal, in.normal_t,
                                     normal_grad, compute_grad);
    a.ignore_index = ignore_index;
    int64_t* ws = partials.data_ptr<int64_t>();
    a.partial_sums = reinterpret_cast<double*>(ws);
    a.partial_counts = ws + grid * 3;
    a.blocks_done = reinterpret_cast<unsigned int*>(ws + grid * 6);
    a.losses = losses.data_ptr<float>();
    a.counts = counts.data_ptr<int64_t>();
    fused_loss_forward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {losses, counts, seg_grad, depth_grad, normal_grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_dense_loss_backward_cuda(
    const at::Tensor& grad_losses, const at::Tensor& counts, const at::Tensor& seg_grad,
    const at::Tensor& depth_grad, const at::Tensor& normal_grad) {
  TORCH_CHECK(grad_losses.numel() == 3 && counts.numel() == 3,
              "fused_dense_loss_backward: grad_losses and counts must have 3 entries");
  const c10::cuda::CUDAGuard guard(seg_grad.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor gl = grad_losses.to(at::kFloat).contiguous();
  const at::Tensor cn = counts.to(at::kLong).contiguous();
  at::Tensor out[3] = {at::empty_like(seg_grad), at::empty_like(depth_grad), at::empty_like(normal_grad)};
  const at::Tensor* saved[3] = {&seg_grad, &depth_grad, &normal_grad};
  for (int t = 0; t < 3; ++t) {
    TORCH_CHECK(saved[t]->numel() == 0 || (saved[t]->is_non_overlapping_and_dense() &&
                                           out[t].strides() == saved[t]->strides()),
                "fused_dense_loss_backward: saved gradient must be dense");
    TORCH_CHECK(saved[t]->numel() == 0 || saved[t]->scalar_type() == seg_grad.scalar_type(),
                "fused_dense_loss_backward: saved gradients must share one dtype");
  }
  const int64_t n = seg_grad.numel() + depth_grad.numel() + normal_grad.numel();
  if (n == 0) return {out[0], out[1], out[2]};
  const int grid = grid_size(n, seg_grad.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, seg_grad.scalar_type(),
                                  "fused_dense_loss_backward_cuda", [&] {
    auto ptr = [](const at::Tensor& t) { return t.numel() ? t.data_ptr<scalar_t>() : nullptr; };
    fused_loss_backward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        gl.data_ptr<float>(), cn.data_ptr<int64_t>(), ptr(seg_grad), ptr(depth_grad),
        ptr(normal_grad), ptr(out[0]), ptr(out[1]), ptr(out[2]), seg_grad.numel(),
        depth_grad.numel(), normal_grad.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtvision, CUDA, m) {
  m.impl("fused_dense_loss_forward", &fused_dense_loss_forward_cuda);
  m.impl("fused_dense_loss_backward", &fused_dense_loss_backward_cuda);
}

}  // namespace mtvision
