// CUDA kernels of gram_matrix, weighted_sum, sign_dropout_sum and excess_risk_step: one launch each over
// all chunks. A chunk table on the
// device maps each block to (chunk, column range); gram blocks keep the T(T+1)/2 dot products of their
// columns in registers (T <= 16), reduce them per block, and the last block to finish adds the block
// partials in order (deterministic, no second launch).
#include "gram.h"

#include "acc_type.h"
#include "sign_dropout.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

namespace mtvision {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kItemColumns = 16 * kThreads;  // columns per block
constexpr int kMaxTasks = 16;


struct ChunkDesc {
  const void* src;     // [T, n] contiguous
  void* dst;           // weighted_sum output [n]
  int64_t n;
  int64_t first_item;  // index of the chunk's first block
};

// Chunk of block `item`: the last chunk whose first_item <= item (binary search).
__device__ __forceinline__ int find_chunk(const ChunkDesc* table, int num_chunks, int64_t item) {
  int lo = 0, hi = num_chunks - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table[mid].first_item <= item) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// The columns of block `item`: its chunk (index `chunk`), the chunk's source and destination, and the
// column range [begin, end).
template <typename T>
struct BlockColumns {
  int chunk;
  const T* src;
  T* dst;
  int64_t n, begin, end;
};

template <typename T>
__device__ __forceinline__ BlockColumns<T> block_columns(const ChunkDesc* table, int num_chunks, int64_t item) {
  const int ci = find_chunk(table, num_chunks, item);
  const ChunkDesc c = table[ci];
  const int64_t begin = (item - c.first_item) * kItemColumns;
  return {ci, static_cast<const T*>(c.src), static_cast<T*>(c.dst), c.n, begin, min(c.n, begin + kItemColumns)};
}

template <typename T, int MAXT>
__global__ void __launch_bounds__(kThreads) gram_kernel(const ChunkDesc* table, int num_chunks, int T_,
                                                        typename AccType<T>::type* partials,
                                                        unsigned int* blocks_done,  // zeroed by the host
                                                        typename AccType<T>::type* out) {
  using acc_t = typename AccType<T>::type;
  constexpr int NP = MAXT * (MAXT + 1) / 2;
  const int64_t item = blockIdx.x;
  const BlockColumns<T> b = block_columns<T>(table, num_chunks, item);
  acc_t acc[NP];
#pragma unroll
  for (int k = 0; k < NP; ++k) acc[k] = 0;
  for (int64_t j = b.begin + threadIdx.x; j < b.end; j += kThreads) {
    acc_t v[MAXT];
#pragma unroll
    for (int t = 0; t < MAXT; ++t) v[t] = t < T_ ? static_cast<acc_t>(b.src[t * b.n + j]) : acc_t(0);
    int k = 0;
#pragma unroll
    for (int s = 0; s < MAXT; ++s)
#pragma unroll
      for (int t = s; t < MAXT; ++t) acc[k++] += v[s] * v[t];
  }
  // Block reduction of each of the NP sums: warp shuffles, then warp leaders through shared memory.
  __shared__ acc_t warp_sums[kThreads / 32][NP];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < NP; ++k) {
    acc_t x = acc[k];
    for (int off = 16; off > 0; off /= 2) x += __shfl_down_sync(0xffffffffu, x, off);
    if (lane == 0) warp_sums[warp][k] = x;
  }
  __syncthreads();
  for (int k = threadIdx.x; k < NP; k += kThreads) {
    acc_t x = 0;
    for (int w = 0; w < kThreads / 32; ++w) x += warp_sums[w][k];
    partials[item * NP + k] = x;
  }
  __shared__ bool is_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(blocks_done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int k = threadIdx.x; k < NP; k += kThreads) {  // in block order: deterministic
    double x = 0;
    for (unsigned int b = 0; b < gridDim.x; ++b) x += static_cast<volatile acc_t*>(partials)[b * NP + k];
    int s = 0, rem = k;  // k -> (s, t), s <= t, row-major over the upper triangle of MAXT
    while (rem >= MAXT - s) {
      rem -= MAXT - s;
      ++s;
    }
    const int t = s + rem;
    if (s < T_ && t < T_) out[s * T_ + t] = out[t * T_ + s] = static_cast<acc_t>(x);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) weighted_sum_kernel(const ChunkDesc* table, int num_chunks,
                                                                int T_, const typename AccType<T>::type* w) {
  using acc_t = typename AccType<T>::type;
  const BlockColumns<T> b = block_columns<T>(table, num_chunks, blockIdx.x);
  for (int64_t j = b.begin + threadIdx.x; j < b.end; j += kThreads) {
    acc_t x = 0;
    for (int t = 0; t < T_; ++t) x += w[t] * static_cast<acc_t>(b.src[t * b.n + j]);
    b.dst[j] = static_cast<T>(x);
  }
}

// GradDrop's sign dropout per coordinate (see the CPU kernel); offsets[c]: the index of chunk c's first
// coordinate over all chunks, for the counter-based draw.
template <typename T>
__global__ void __launch_bounds__(kThreads) sign_dropout_kernel(const ChunkDesc* table, int num_chunks,
                                                                int T_, uint64_t seed, const int64_t* offsets,
                                                                typename AccType<T>::type leak,
                                                                typename AccType<T>::type keep) {
  using acc_t = typename AccType<T>::type;
  const BlockColumns<T> b = block_columns<T>(table, num_chunks, blockIdx.x);
  const int64_t first = offsets[b.chunk];
  for (int64_t j = b.begin + threadIdx.x; j < b.end; j += kThreads) {
    acc_t pos = 0, neg = 0;
    for (int t = 0; t < T_; ++t) {
      const acc_t v = static_cast<acc_t>(b.src[t * b.n + j]);
      pos += v > 0 ? v : acc_t(0);
      neg += v < 0 ? v : acc_t(0);
    }
    const float u = counter_uniform(seed, static_cast<uint64_t>(first + j));
    b.dst[j] = static_cast<T>(sign_dropout_value(pos, neg, u, leak, keep));
  }
}

// ExcessMTL's step (see the CPU kernel): the accumulator chunk is the table's dst ([T, n]); per block and
// task, the sum of g^2 / sqrt(a + eps) over its columns into partials[item * T + t].
template <typename T>
__global__ void __launch_bounds__(kThreads) excess_risk_kernel(const ChunkDesc* table, int num_chunks, int T_,
                                                               typename AccType<T>::type eps,
                                                               typename AccType<T>::type* partials) {
  using acc_t = typename AccType<T>::type;
  const int64_t item = blockIdx.x;
  const BlockColumns<T> b = block_columns<T>(table, num_chunks, item);  // dst: the accumulator chunk
  __shared__ acc_t warp_sums[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int t = 0; t < T_; ++t) {
    acc_t x = 0;
    for (int64_t j = b.begin + threadIdx.x; j < b.end; j += kThreads) {
      const int64_t k = t * b.n + j;
      const acc_t v = static_cast<acc_t>(b.src[k]);
      const acc_t sq = v * v;
      const T updated = static_cast<T>(static_cast<acc_t>(b.dst[k]) + sq);
      b.dst[k] = updated;
      x += sq / sqrt(static_cast<acc_t>(updated) + eps);
    }
    for (int off = 16; off > 0; off /= 2) x += __shfl_down_sync(0xffffffffu, x, off);
    if (lane == 0) warp_sums[warp] = x;
    __syncthreads();
    if (threadIdx.x == 0) {
      acc_t total = 0;
      for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
      partials[item * T_ + t] = total;
    }
    __syncthreads();
  }
}

// Device copy of the chunk table; returns it and the number of blocks.
std::pair<at::Tensor, int64_t> chunk_table(const GradChunks& g, const std::vector<at::Tensor>* outs) {
  std::vector<ChunkDesc> table;
  int64_t items = 0;
  for (size_t i = 0; i < g.chunks.size(); ++i) {
    const int64_t n = g.chunks[i].size(1);
    table.push_back({g.chunks[i].data_ptr(), outs ? (*outs)[i].data_ptr() : nullptr, n, items});
    items += std::max<int64_t>(1, (n + kItemColumns - 1) / kItemColumns);
  }
  const int64_t bytes = static_cast<int64_t>(table.size() * sizeof(ChunkDesc));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), table.data(), bytes);
  return {host.to(g.chunks[0].device(), /*non_blocking=*/true), items};
}

at::Tensor gram_matrix_cuda(at::TensorList grads) {
  const GradChunks g = check_grad_chunks(grads, "gram_matrix");
  const at::Tensor& first = g.chunks[0];
  const c10::cuda::CUDAGuard guard(first.device());
  const auto dtype = first.scalar_type();
  const auto out_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  if (g.T > kMaxTasks) {  // beyond the register tile: one matrix product per chunk
    at::Tensor out = at::zeros({g.T, g.T}, first.options().dtype(out_dtype));
    for (const at::Tensor& c : g.chunks) out += at::mm(c.to(out_dtype), c.to(out_dtype).t());
    return out;
  }
  auto [table, items] = chunk_table(g, nullptr);
  TORCH_CHECK(items < (int64_t(1) << 31), "gram_matrix: too many columns");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor out = at::empty({g.T, g.T}, first.options().dtype(out_dtype));
  const int maxt = g.T <= 2 ? 2 : g.T <= 4 ? 4 : g.T <= 8 ? 8 : 16;
  const int np = maxt * (maxt + 1) / 2;
  at::Tensor partials = at::empty({items * np}, first.options().dtype(out_dtype));
  at::Tensor done = at::zeros({1}, first.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gram_matrix_cuda", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const auto* tab = reinterpret_cast<const ChunkDesc*>(table.data_ptr());
    const int nc = static_cast<int>(g.chunks.size());
    auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned int>(items), kThreads, 0, stream>>>(
          tab, nc, static_cast<int>(g.T), partials.data_ptr<acc_t>(),
          reinterpret_cast<unsigned int*>(done.data_ptr<int>()), out.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (maxt == 2) launch(gram_kernel<scalar_t, 2>);
    else if (maxt == 4) launch(gram_kernel<scalar_t, 4>);
    else if (maxt == 8) launch(gram_kernel<scalar_t, 8>);
    else launch(gram_kernel<scalar_t, 16>);
  });
  return out;
}

void weighted_sum_out_cuda(at::TensorList grads, const at::Tensor& weights, at::TensorList out_list) {
  const GradChunks g = check_grad_chunks(grads, "weighted_sum");
  check_weights(g, weights);
  const std::vector<at::Tensor> out = flat_outputs(g, out_list, "weighted_sum");
  const at::Tensor& first = g.chunks[0];
  const c10::cuda::CUDAGuard guard(first.device());
  const auto dtype = first.scalar_type();
  const at::Tensor w = weights.to(first.device(), dtype == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  auto [table, items] = chunk_table(g, &out);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "weighted_sum_cuda", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    weighted_sum_kernel<scalar_t><<<static_cast<unsigned int>(items), kThreads, 0, stream>>>(
        reinterpret_cast<const ChunkDesc*>(table.data_ptr()), static_cast<int>(g.chunks.size()),
        static_cast<int>(g.T), w.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void sign_dropout_sum_out_cuda(at::TensorList grads, int64_t seed, double leak, at::TensorList out_list) {
  const GradChunks g = check_grad_chunks(grads, "sign_dropout_sum");
  check_leak(leak);
  const std::vector<at::Tensor> out = flat_outputs(g, out_list, "sign_dropout_sum");
  const at::Tensor& first = g.chunks[0];
  const c10::cuda::CUDAGuard guard(first.device());
  auto [table, items] = chunk_table(g, &out);
  // the chunks' first coordinates, copied with the table's pinned-host pattern
  const std::vector<int64_t> offsets = chunk_offsets(g);
  const int64_t bytes = static_cast<int64_t>(offsets.size() * sizeof(int64_t));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), offsets.data(), bytes);
  const at::Tensor dev_offsets = host.to(first.device(), /*non_blocking=*/true);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "sign_dropout_cuda", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    sign_dropout_kernel<scalar_t><<<static_cast<unsigned int>(items), kThreads, 0, stream>>>(
        reinterpret_cast<const ChunkDesc*>(table.data_ptr()), static_cast<int>(g.chunks.size()),
        static_cast<int>(g.T), static_cast<uint64_t>(seed),
        reinterpret_cast<const int64_t*>(dev_offsets.data_ptr()), static_cast<acc_t>(leak),
        static_cast<acc_t>(1.0 - leak));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor excess_risk_step_cuda(at::TensorList grads, at::TensorList accumulator, double eps) {
  const GradChunks g = check_grad_chunks(grads, "excess_risk_step");
  const std::vector<at::Tensor> acc = accumulator_views(g, accumulator);
  const at::Tensor& first = g.chunks[0];
  const c10::cuda::CUDAGuard guard(first.device());
  auto [table, items] = chunk_table(g, &acc);
  const auto dtype = first.scalar_type();
  at::Tensor partials = at::empty({items, g.T}, first.options().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "excess_risk_cuda", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    excess_risk_kernel<scalar_t><<<static_cast<unsigned int>(items), kThreads, 0, stream>>>(
        reinterpret_cast<const ChunkDesc*>(table.data_ptr()), static_cast<int>(g.chunks.size()),
        static_cast<int>(g.T), static_cast<acc_t>(eps), partials.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return partials.to(at::kDouble).sum(0);  // a fixed reduction order: deterministic
}

std::vector<at::Tensor> weighted_sum_cuda(at::TensorList grads, const at::Tensor& weights) {
  TORCH_CHECK(!grads.empty(), "weighted_sum: no gradients given");
  return weighted_sum_alloc(
      grads, weights, [](int64_t n, const at::TensorOptions& o) { return at::empty({n}, o); },
      weighted_sum_out_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(mtvision, CUDA, m) {
  m.impl("gram_matrix", &gram_matrix_cuda);
  m.impl("weighted_sum", &weighted_sum_cuda);
  m.impl("weighted_sum_out", &weighted_sum_out_cuda);
  m.impl("sign_dropout_sum_out", &sign_dropout_sum_out_cuda);
  m.impl("excess_risk_step", &excess_risk_step_cuda);
}

}  // namespace mtvision
