// CUDA kernels of the fused dense loss: one launch for the forward (all three tasks: losses, valid
// counts, per-pixel log-sum-exp) and one for the backward (all three gradients, re-reading inputs).
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


__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }
__device__ __forceinline__ float fast_log(float x) { return __logf(x); }
__device__ __forceinline__ double fast_log(double x) { return log(x); }

template <typename T>
struct Task {  // one task's prediction, target and gradient, addressed through PixelViews
  const T* pred = nullptr;
  const void* target = nullptr;
  T* grad = nullptr;  // backward only; same layout as pred
  PixelView v, vt;
  int64_t n = 0;  // B * P pixels, 0 when the task is absent
};

template <typename T>
struct ForwardArgs {
  Task<T> seg, depth, normal;
  int64_t ignore_index;
  typename AccType<T>::type* lse;  // [B * P] of the segmentation task
  double* partial_sums;      // [gridDim.x, 3]
  int64_t* partial_counts;   // [gridDim.x, 3]
  unsigned int* blocks_done; // completed blocks; zeroed by the host before each launch
  typename AccType<T>::type* losses;  // [3], float32 (float64 for float64 inputs)
  int64_t* counts;           // [3]
};

// Pixel index i -> (image b, pixel p). 32-bit division: the host checks B * P < 2^31, and a 64-bit
// division costs several times more, once per task and pixel.
__device__ __forceinline__ void split_pixel(int64_t i, int64_t P, int64_t& b, int64_t& p) {
  const uint32_t ui = static_cast<uint32_t>(i), uP = static_cast<uint32_t>(P);
  const uint32_t ub = ui / uP;
  b = ub;
  p = ui - ub * uP;
}

__device__ __forceinline__ int64_t offset(const PixelView& v, int64_t b, int64_t c, int64_t p) {
  return b * v.sb + c * v.sc + p * v.sp;
}

template <typename T, typename acc_t>
__device__ __forceinline__ void seg_forward_pixel(const Task<T>& t, int64_t i, int64_t ignore_index,
                                                  acc_t* lse_out, acc_t& sum, int64_t& count) {
  const int64_t C = t.v.C;
  int64_t b, p;
  split_pixel(i, t.v.P, b, p);
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
  const acc_t lse = m + fast_log(s);
  lse_out[i] = lse;
  const int64_t label = static_cast<const int64_t*>(t.target)[offset(t.vt, b, 0, p)];
  if (label == ignore_index) return;
  CUDA_KERNEL_ASSERT(label >= 0 && label < C);
  sum += lse - static_cast<acc_t>(x[label * t.v.sc]);
  ++count;
}

template <typename T, typename acc_t>
__device__ __forceinline__ void seg_backward_pixel(const Task<T>& t, int64_t i, int64_t ignore_index,
                                                   const acc_t* lse_in, acc_t k) {
  const int64_t C = t.v.C;
  int64_t b, p;
  split_pixel(i, t.v.P, b, p);
  const int64_t o = offset(t.v, b, 0, p);
  const T* x = t.pred + o;
  T* g = t.grad + o;
  const int64_t label = static_cast<const int64_t*>(t.target)[offset(t.vt, b, 0, p)];
  const acc_t lse = lse_in[i];
  if (label == ignore_index) k = 0;
  for (int64_t c = 0; c < C; ++c) {
    const acc_t sm = fast_exp(static_cast<acc_t>(x[c * t.v.sc]) - lse);
    g[c * t.v.sc] = static_cast<T>(k * (sm - (c == label ? acc_t(1) : acc_t(0))));
  }
}

// L1 where target > 0. Forward when grad == nullptr (adds to sum/count), else writes k * sign.
template <typename T, typename acc_t>
__device__ __forceinline__ void depth_pixel(const Task<T>& t, int64_t i, acc_t k, acc_t& sum,
                                            int64_t& count) {
  int64_t b, p;
  split_pixel(i, t.v.P, b, p);
  const int64_t o = offset(t.v, b, 0, p);
  const acc_t d = static_cast<acc_t>(t.pred[o]);
  const acc_t target = static_cast<acc_t>(static_cast<const T*>(t.target)[offset(t.vt, b, 0, p)]);
  const bool valid = target > acc_t(0);
  const acc_t diff = d - target;
  if (t.grad) {
    const acc_t sign = diff > 0 ? acc_t(1) : (diff < 0 ? acc_t(-1) : acc_t(0));
    t.grad[o] = static_cast<T>(valid ? k * sign : acc_t(0));
  } else if (valid) {
    sum += fabs(diff);
    ++count;
  }
}

// 1 - cos where |target| > 0; gradient as in the CPU kernel (autograd through F.normalize).
template <typename T, typename acc_t>
__device__ __forceinline__ void normal_pixel(const Task<T>& t, int64_t i, acc_t k, acc_t& sum,
                                             int64_t& count) {
  int64_t b, p;
  split_pixel(i, t.v.P, b, p);
  const int64_t o = offset(t.v, b, 0, p);
  const T* x = t.pred + o;
  const T* y = static_cast<const T*>(t.target) + offset(t.vt, b, 0, p);
  acc_t px[3], tx[3];
#pragma unroll
  for (int j = 0; j < 3; ++j) {
    px[j] = static_cast<acc_t>(x[j * t.v.sc]);
    tx[j] = static_cast<acc_t>(y[j * t.vt.sc]);
  }
  const acc_t eps = static_cast<acc_t>(kNormalEps);
  const bool valid = tx[0] * tx[0] + tx[1] * tx[1] + tx[2] * tx[2] > acc_t(0);
  const acc_t norm = sqrt(px[0] * px[0] + px[1] * px[1] + px[2] * px[2]);
  const acc_t cos = (px[0] * tx[0] + px[1] * tx[1] + px[2] * tx[2]) / (norm > eps ? norm : eps);
  if (t.grad) {
#pragma unroll
    for (int j = 0; j < 3; ++j) {
      acc_t gj = 0;
      if (valid) gj = norm > eps ? -(tx[j] - cos * px[j] / norm) / norm : -tx[j] / eps;
      t.grad[o + j * t.v.sc] = static_cast<T>(k * gj);
    }
  } else if (valid) {
    sum += acc_t(1) - cos;
    ++count;
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
    if (i < a.seg.n) seg_forward_pixel(a.seg, i, a.ignore_index, a.lse, sum[0], count[0]);
    if (i < a.depth.n) depth_pixel(a.depth, i, acc_t(0), sum[1], count[1]);
    if (i < a.normal.n) normal_pixel(a.normal, i, acc_t(0), sum[2], count[2]);
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
    a.losses[k] = static_cast<typename AccType<T>::type>(c > 0 ? s / static_cast<double>(c) : 0.0);
    a.counts[k] = c;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) fused_loss_backward_kernel(
    Task<T> seg, Task<T> depth, Task<T> normal, int64_t ignore_index,
    const typename AccType<T>::type* lse, const typename AccType<T>::type* grad_losses,
    const int64_t* counts) {
  using acc_t = typename AccType<T>::type;
  acc_t k[3];
#pragma unroll
  for (int j = 0; j < 3; ++j)
    k[j] = static_cast<acc_t>(grad_losses[j]) / static_cast<acc_t>(counts[j] > 0 ? counts[j] : 1);
  acc_t unused_sum = 0;
  int64_t unused_count = 0;
  const int64_t n = max(seg.n, max(depth.n, normal.n));
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    if (i < seg.n) seg_backward_pixel(seg, i, ignore_index, lse, k[0]);
    if (i < depth.n) depth_pixel(depth, i, k[1], unused_sum, unused_count);
    if (i < normal.n) normal_pixel(normal, i, k[2], unused_sum, unused_count);
  }
}

int grid_size(int64_t n, int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  // At most 8 blocks per SM, each thread looping over pixels: measured on an H100 at both benchmark
  // shapes, 32 blocks per SM (one pixel per thread) was twice as slow (with the unrolled channel loop).
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(sms) * 8)));
}

template <typename T>
Task<T> make_task(const at::Tensor& pred, const at::Tensor& target, const PixelView& v,
                  const PixelView& vt, at::Tensor* grad) {
  Task<T> t;
  t.pred = pred.data_ptr<T>();
  t.target = target.data_ptr();
  t.v = v;
  t.vt = vt;
  t.n = v.B * v.P;
  if (grad) {
    *grad = at::empty_like(pred);
    const PixelView vg = pixel_view(*grad).second;
    TORCH_CHECK(vg.sb == v.sb && vg.sc == v.sc && vg.sp == v.sp,
                "fused_dense_loss_backward: gradient layout differs from the prediction's");
    t.grad = grad->data_ptr<T>();
  }
  return t;
}

at::ScalarType common_dtype(const FusedLossInputs& in) {
  const at::Tensor& any = in.first_prediction();
  for (const at::Tensor* t : {&in.seg_logits, &in.depth_pred, &in.normal_pred}) {
    TORCH_CHECK(!t->defined() || t->scalar_type() == any.scalar_type(),
                "fused_dense_loss (CUDA): all predictions must share one dtype, got ",
                any.scalar_type(), " and ", t->scalar_type());
  }
  return any.scalar_type();
}

// Fills the present tasks of a, allocating gradients when `grads` is given (the backward).
template <typename T>
void make_tasks(const FusedLossInputs& in, Task<T>& seg, Task<T>& depth, Task<T>& normal,
                at::Tensor* grads) {
  if (in.has_seg) seg = make_task<T>(in.seg_logits, in.seg_target, in.seg, in.seg_t, grads ? &grads[0] : nullptr);
  if (in.has_depth)
    depth = make_task<T>(in.depth_pred, in.depth_target, in.depth, in.depth_t, grads ? &grads[1] : nullptr);
  if (in.has_normal)
    normal = make_task<T>(in.normal_pred, in.normal_target, in.normal, in.normal_t,
                          grads ? &grads[2] : nullptr);
}

int64_t max_pixels(const FusedLossInputs& in) {
  const int64_t n = std::max({in.has_seg ? in.seg.B * in.seg.P : 0,
                              in.has_depth ? in.depth.B * in.depth.P : 0,
                              in.has_normal ? in.normal.B * in.normal.P : 0});
  TORCH_CHECK(n < (int64_t(1) << 31), "fused_dense_loss (CUDA): at most 2^31 - 1 pixels per call, got ", n);
  return n;
}

FusedLossOutputs fused_dense_loss_forward_cuda(
    const c10::optional<at::Tensor>& seg_logits, const c10::optional<at::Tensor>& seg_target,
    const c10::optional<at::Tensor>& depth_pred, const c10::optional<at::Tensor>& depth_target,
    const c10::optional<at::Tensor>& normal_pred, const c10::optional<at::Tensor>& normal_target,
    int64_t ignore_index) {
  const FusedLossInputs in = check_fused_loss_inputs(seg_logits, seg_target, depth_pred,
                                                     depth_target, normal_pred, normal_target);
  const at::ScalarType dtype = common_dtype(in);
  const at::Tensor& any = in.first_prediction();
  const c10::cuda::CUDAGuard guard(any.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor lse = in.has_seg
      ? at::empty({in.seg.B, in.seg_logits.size(2), in.seg_logits.size(3)}, any.options().dtype(acc))
      : at::empty({0}, any.options().dtype(at::kFloat));
  const at::Tensor losses = at::empty({3}, any.options().dtype(acc));
  const at::Tensor counts = at::empty({3}, any.options().dtype(at::kLong));
  const int grid = grid_size(max_pixels(in), any.device().index());
  // workspace: [grid, 3] double sums, [grid, 3] int64 counts, then one zeroed completion counter
  const at::Tensor partials = at::empty({grid * 6 + 1}, any.options().dtype(at::kLong));
  C10_CUDA_CHECK(cudaMemsetAsync(partials.data_ptr<int64_t>() + grid * 6, 0, sizeof(int64_t), stream));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fused_dense_loss_forward_cuda", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    ForwardArgs<scalar_t> a;
    make_tasks<scalar_t>(in, a.seg, a.depth, a.normal, nullptr);
    a.ignore_index = ignore_index;
    a.lse = in.has_seg ? lse.data_ptr<acc_t>() : nullptr;
    int64_t* ws = partials.data_ptr<int64_t>();
    a.partial_sums = reinterpret_cast<double*>(ws);
    a.partial_counts = ws + grid * 3;
    a.blocks_done = reinterpret_cast<unsigned int*>(ws + grid * 6);
    a.losses = losses.data_ptr<acc_t>();
    a.counts = counts.data_ptr<int64_t>();
    fused_loss_forward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {losses, counts, lse};
}

FusedLossGrads fused_dense_loss_backward_cuda(
    const at::Tensor& grad_losses, const at::Tensor& counts, const at::Tensor& seg_lse,
    const c10::optional<at::Tensor>& seg_logits, const c10::optional<at::Tensor>& seg_target,
    const c10::optional<at::Tensor>& depth_pred, const c10::optional<at::Tensor>& depth_target,
    const c10::optional<at::Tensor>& normal_pred, const c10::optional<at::Tensor>& normal_target,
    int64_t ignore_index) {
  const FusedLossInputs in = check_fused_loss_inputs(seg_logits, seg_target, depth_pred,
                                                     depth_target, normal_pred, normal_target);
  check_backward_inputs(grad_losses, counts);
  const at::ScalarType dtype = common_dtype(in);
  const at::Tensor& any = in.first_prediction();
  const c10::cuda::CUDAGuard guard(any.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor gl = grad_losses.to(any.device(), dtype == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  const at::Tensor cn = counts.to(any.device(), at::kLong).contiguous();
  at::Tensor grads[3];
  const int grid = grid_size(max_pixels(in), any.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fused_dense_loss_backward_cuda", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    Task<scalar_t> seg, depth, normal;
    make_tasks<scalar_t>(in, seg, depth, normal, grads);
    TORCH_CHECK(!in.has_seg || (seg_lse.numel() == in.seg.B * in.seg.P && seg_lse.is_contiguous() &&
                                seg_lse.scalar_type() == (dtype == at::kDouble ? at::kDouble : at::kFloat)),
                "fused_dense_loss_backward: seg_lse must be the forward's [B,H,W] output");
    fused_loss_backward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        seg, depth, normal, ignore_index, in.has_seg ? seg_lse.data_ptr<acc_t>() : nullptr,
        gl.data_ptr<acc_t>(), cn.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  for (auto& g : grads)
    if (!g.defined()) g = at::empty({0}, any.options());
  return {grads[0], grads[1], grads[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtvision, CUDA, m) {
  m.impl("fused_dense_loss_forward", &fused_dense_loss_forward_cuda);
  m.impl("fused_dense_loss_backward", &fused_dense_loss_backward_cuda);
}

}  // namespace mtvision
