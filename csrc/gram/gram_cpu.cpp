// CPU kernels of gram_matrix and weighted_sum. Work is split into fixed items of kGramItemColumns
// columns of one chunk; an item walks its columns in L1-sized tiles and adds each tile's float32 dot
// products into float64 sums; items are summed in order at the end (thread-count independent).
#include "gram.h"

#include "acc_type.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_memory.h"
#include "sign_dropout.h"
#include "cpu_simd.h"

namespace mtvision {
namespace {

struct Item {
  int64_t chunk, begin, end;
};

std::vector<Item> make_items(const GradChunks& g) {
  std::vector<Item> items;
  for (size_t c = 0; c < g.chunks.size(); ++c) {
    const int64_t n = g.chunks[c].size(1);
    for (int64_t b = 0; b < n; b += kGramItemColumns)
      items.push_back({static_cast<int64_t>(c), b, std::min(n, b + kGramItemColumns)});
  }
  return items;
}


// Dot products of all row pairs s <= t of rows[0..T) over n columns, added to sums[s * T + t]. Pairs
// go in 2x2 register blocks (four dot products from four loads per column), each dot keeping kLanes
// independent partial sums so that it vectorizes without reassociating float additions.
template <typename T>
MTV_SIMD_CLONES void tile_gram(const T* const* rows, int64_t T_, int64_t n, double* sums) {
  using acc_t = typename AccType<T>::type;
  constexpr int64_t kLanes = 16;
  auto lane_sum = [](const acc_t* lane) {
    acc_t acc = 0;
    for (int64_t l = 0; l < kLanes; ++l) acc += lane[l];
    return static_cast<double>(acc);
  };
  for (int64_t s = 0; s < T_; s += 2) {
    const int64_t s1 = std::min(s + 1, T_ - 1);  // == s for an odd last row (its results are dropped)
    const T* __restrict a0 = rows[s];
    const T* __restrict a1 = rows[s1];
    for (int64_t t = s; t < T_; t += 2) {
      const int64_t t1 = std::min(t + 1, T_ - 1);
      const T* __restrict b0 = rows[t];
      const T* __restrict b1 = rows[t1];
      acc_t l00[kLanes] = {}, l01[kLanes] = {}, l10[kLanes] = {}, l11[kLanes] = {};
      int64_t j = 0;
      if constexpr (std::is_same_v<T, float>) {
        // GCC/Clang vector types: the 4 x 8 accumulators stay in registers across the column loop
        // (arrays, even when the inner loop vectorizes, go through the stack every iteration).
        typedef float v8 __attribute__((vector_size(32)));
        auto load = [](const float* p) {
          v8 v;
          std::memcpy(&v, p, sizeof(v));
          return v;
        };
        v8 c00 = {}, c01 = {}, c10 = {}, c11 = {};
        for (; j + 8 <= n; j += 8) {
          const v8 x0 = load(a0 + j), x1 = load(a1 + j), y0 = load(b0 + j), y1 = load(b1 + j);
          c00 += x0 * y0;
          c01 += x0 * y1;
          c10 += x1 * y0;
          c11 += x1 * y1;
        }
        for (int l = 0; l < 8; ++l) {
          l00[l] = c00[l];
          l01[l] = c01[l];
          l10[l] = c10[l];
          l11[l] = c11[l];
        }
      }
      auto accumulate = [&](int64_t col, int64_t l) {
        const acc_t x0 = static_cast<acc_t>(a0[col]), x1 = static_cast<acc_t>(a1[col]);
        const acc_t y0 = static_cast<acc_t>(b0[col]), y1 = static_cast<acc_t>(b1[col]);
        l00[l] += x0 * y0;
        l01[l] += x0 * y1;
        l10[l] += x1 * y0;
        l11[l] += x1 * y1;
      };
      for (; j + kLanes <= n; j += kLanes)
        for (int64_t l = 0; l < kLanes; ++l) accumulate(j + l, l);
      for (int64_t l = 0; j + l < n; ++l) accumulate(j + l, l);
      sums[s * T_ + t] += lane_sum(l00);
      if (t1 != t) sums[s * T_ + t1] += lane_sum(l01);
      if (s1 != s && s1 <= t) sums[s1 * T_ + t] += lane_sum(l10);
      if (s1 != s && t1 != t) sums[s1 * T_ + t1] += lane_sum(l11);
    }
  }
}

// out[j] = sum_t w[t] * rows[t][j] over n columns.
template <typename T, typename acc_t = typename AccType<T>::type>
MTV_SIMD_CLONES void tile_weighted_sum(const T* const* rows, const acc_t* w, int64_t T_, int64_t n,
                                       T* __restrict out) {
  constexpr int64_t kTile = 256;
  acc_t acc[kTile];
  for (int64_t j0 = 0; j0 < n; j0 += kTile) {
    const int64_t m = std::min(kTile, n - j0);
    for (int64_t j = 0; j < m; ++j) acc[j] = 0;
    for (int64_t t = 0; t < T_; ++t) {
      const T* __restrict r = rows[t] + j0;
      const acc_t wt = static_cast<acc_t>(w[t]);
      for (int64_t j = 0; j < m; ++j) acc[j] += wt * static_cast<acc_t>(r[j]);
    }
    for (int64_t j = 0; j < m; ++j) out[j0 + j] = static_cast<T>(acc[j]);
  }
}

// GradDrop on n columns: the positive and negative sums of the T values, the sign purity, the draw.
// Tiles of columns with the task loop outside, so that both passes vectorize (branch-free selects).
template <typename T, typename acc_t = typename AccType<T>::type>
MTV_SIMD_CLONES void tile_sign_dropout(const T* const* rows, uint64_t seed, int64_t first, int64_t T_, int64_t n,
                                       acc_t leak, acc_t keep, T* __restrict out) {
  constexpr int64_t kTile = 256;
  acc_t pos[kTile], neg[kTile];
  for (int64_t j0 = 0; j0 < n; j0 += kTile) {
    const int64_t m = std::min(kTile, n - j0);
    for (int64_t j = 0; j < m; ++j) pos[j] = neg[j] = 0;
    for (int64_t t = 0; t < T_; ++t) {
      const T* __restrict r = rows[t] + j0;
      for (int64_t j = 0; j < m; ++j) {
        const acc_t v = static_cast<acc_t>(r[j]);
        pos[j] += v > 0 ? v : acc_t(0);
        neg[j] += v < 0 ? v : acc_t(0);
      }
    }
    for (int64_t j = 0; j < m; ++j) {
      const float u = counter_uniform(seed, static_cast<uint64_t>(first + j0 + j));
      out[j0 + j] = static_cast<T>(sign_dropout_value(pos[j], neg[j], u, leak, keep));
    }
  }
}

// ExcessMTL on n columns of one row: a += g^2 in place, returns sum g^2 / sqrt(a + eps), kLanes partial
// sums in acc_t so that the loop vectorizes without reassociating float additions.
template <typename T, typename acc_t = typename AccType<T>::type>
MTV_SIMD_CLONES double row_excess_risk(const T* __restrict g, T* __restrict a, int64_t n, acc_t eps) {
  constexpr int64_t kLanes = 16;
  acc_t lane[kLanes] = {};
  auto step = [&](int64_t j, int64_t l) {
    const acc_t v = static_cast<acc_t>(g[j]);
    const acc_t sq = v * v;
    const T updated = static_cast<T>(static_cast<acc_t>(a[j]) + sq);
    a[j] = updated;
    lane[l] += sq / std::sqrt(static_cast<acc_t>(updated) + eps);
  };
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) step(j + l, l);
  for (int64_t l = 0; j + l < n; ++l) step(j + l, l);
  double total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += static_cast<double>(lane[l]);
  return total;
}

// Tile width: all T rows of a tile stay in L1 (~16 KiB) while the T(T+1)/2 dot products read them.
int64_t tile_columns(int64_t T_, int64_t elem_size) {
  return std::max<int64_t>(64, (16384 / (T_ * elem_size)) / 16 * 16);
}

}  // namespace

at::Tensor gram_matrix_cpu(at::TensorList grads) {
  const GradChunks g = check_grad_chunks(grads, "gram_matrix");
  const int64_t T_ = g.T;
  const std::vector<Item> items = make_items(g);
  std::vector<double> partial(items.size() * T_ * T_, 0.0);
  const auto dtype = g.chunks[0].scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gram_matrix_cpu", [&] {
    const int64_t tile = tile_columns(T_, sizeof(scalar_t));
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
      std::vector<const scalar_t*> rows(T_);
      for (int64_t i = begin; i < end; ++i) {
        const Item& it = items[i];
        const at::Tensor& chunk = g.chunks[it.chunk];
        const scalar_t* base = chunk.data_ptr<scalar_t>();
        const int64_t n = chunk.size(1);
        for (int64_t j = it.begin; j < it.end; j += tile) {
          for (int64_t t = 0; t < T_; ++t) rows[t] = base + t * n + j;
          tile_gram(rows.data(), T_, std::min(tile, it.end - j), partial.data() + i * T_ * T_);
        }
      }
    });
  });
  const bool f64 = dtype == at::kDouble;
  at::Tensor out = at::empty({T_, T_}, g.chunks[0].options().dtype(f64 ? at::kDouble : at::kFloat));
  for (int64_t s = 0; s < T_; ++s)
    for (int64_t t = s; t < T_; ++t) {
      double v = 0;
      for (size_t i = 0; i < items.size(); ++i) v += partial[i * T_ * T_ + s * T_ + t];
      if (f64) {
        out.data_ptr<double>()[s * T_ + t] = out.data_ptr<double>()[t * T_ + s] = v;
      } else {
        out.data_ptr<float>()[s * T_ + t] = out.data_ptr<float>()[t * T_ + s] = static_cast<float>(v);
      }
    }
  return out;
}

// Calls fn(rows, item) for every work item in parallel, rows[t] pointing at task t's first column of it.
template <typename scalar_t, typename Fn>
void for_each_item(const GradChunks& g, const std::vector<Item>& items, Fn fn) {
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<const scalar_t*> rows(g.T);
    for (int64_t i = begin; i < end; ++i) {
      const Item& it = items[i];
      const at::Tensor& chunk = g.chunks[it.chunk];
      const int64_t n = chunk.size(1);
      for (int64_t t = 0; t < g.T; ++t) rows[t] = chunk.data_ptr<scalar_t>() + t * n + it.begin;
      fn(rows.data(), it);
    }
  });
}

void weighted_sum_out_cpu(at::TensorList grads, const at::Tensor& weights, at::TensorList out_list) {
  const GradChunks g = check_grad_chunks(grads, "weighted_sum");
  check_weights(g, weights);
  const std::vector<at::Tensor> out = flat_outputs(g, out_list, "weighted_sum");
  const bool f64 = g.chunks[0].scalar_type() == at::kDouble;
  const at::Tensor w = weights.to(at::kCPU, f64 ? at::kDouble : at::kFloat).contiguous();
  const std::vector<Item> items = make_items(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.chunks[0].scalar_type(), "weighted_sum_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    for_each_item<scalar_t>(g, items, [&](const scalar_t* const* rows, const Item& it) {
      tile_weighted_sum(rows, w.data_ptr<acc_t>(), g.T, it.end - it.begin,
                        out[it.chunk].data_ptr<scalar_t>() + it.begin);
    });
  });
}

void sign_dropout_sum_out_cpu(at::TensorList grads, int64_t seed, double leak, at::TensorList out_list) {
  const GradChunks g = check_grad_chunks(grads, "sign_dropout_sum");
  check_leak(leak);
  const std::vector<int64_t> offsets = chunk_offsets(g);
  const std::vector<at::Tensor> out = flat_outputs(g, out_list, "sign_dropout_sum");
  const std::vector<Item> items = make_items(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.chunks[0].scalar_type(), "sign_dropout_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    for_each_item<scalar_t>(g, items, [&](const scalar_t* const* rows, const Item& it) {
      tile_sign_dropout(rows, static_cast<uint64_t>(seed), offsets[it.chunk] + it.begin, g.T, it.end - it.begin,
                        static_cast<acc_t>(leak), static_cast<acc_t>(1.0 - leak),
                        out[it.chunk].data_ptr<scalar_t>() + it.begin);
    });
  });
}

at::Tensor excess_risk_step_cpu(at::TensorList grads, at::TensorList accumulator, double eps) {
  const GradChunks g = check_grad_chunks(grads, "excess_risk_step");
  const std::vector<at::Tensor> acc = accumulator_views(g, accumulator);
  const std::vector<Item> items = make_items(g);
  std::vector<double> partial(items.size() * g.T, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.chunks[0].scalar_type(), "excess_risk_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const Item& it = items[i];
        const int64_t n = g.chunks[it.chunk].size(1);
        const scalar_t* src = g.chunks[it.chunk].data_ptr<scalar_t>();
        scalar_t* dst = acc[it.chunk].data_ptr<scalar_t>();
        for (int64_t t = 0; t < g.T; ++t)
          partial[i * g.T + t] = row_excess_risk(src + t * n + it.begin, dst + t * n + it.begin,
                                                 it.end - it.begin, static_cast<acc_t>(eps));
      }
    });
  });
  at::Tensor out = at::empty({g.T}, g.chunks[0].options().dtype(at::kDouble));
  for (int64_t t = 0; t < g.T; ++t) {  // items in order: independent of the number of threads
    double v = 0;
    for (size_t i = 0; i < items.size(); ++i) v += partial[i * g.T + t];
    out.data_ptr<double>()[t] = v;
  }
  return out;
}

std::vector<at::Tensor> weighted_sum_cpu(at::TensorList grads, const at::Tensor& weights) {
  TORCH_CHECK(!grads.empty(), "weighted_sum: no gradients given");
  return weighted_sum_alloc(
      grads, weights, [](int64_t n, const at::TensorOptions& o) { return empty_huge_pages({n}, o); },
      weighted_sum_out_cpu);
}

TORCH_LIBRARY_IMPL(mtvision, CPU, m) {
  m.impl("gram_matrix", &gram_matrix_cpu);
  m.impl("weighted_sum", &weighted_sum_cpu);
  m.impl("weighted_sum_out", &weighted_sum_out_cpu);
  m.impl("sign_dropout_sum_out", &sign_dropout_sum_out_cpu);
  m.impl("excess_risk_step", &excess_risk_step_cpu);
}

}  // namespace mtvision
