// The CPU kernel of the fused dense loss against a direct C++ computation, on small inputs.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <vector>

#include "fused_loss/fused_loss.h"

namespace {

struct Direct {  // per-task losses and gradients computed pixel by pixel, in double
  double loss[3] = {0, 0, 0};
  std::vector<double> g_seg, g_depth, g_normal;
};

Direct direct(const at::Tensor& x, const at::Tensor& y, const at::Tensor& d, const at::Tensor& dt,
              const at::Tensor& n, const at::Tensor& nt, int64_t ignore) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto X = x.accessor<double, 4>();
  auto Y = y.accessor<int64_t, 3>();
  auto D = d.accessor<double, 4>();
  auto DT = dt.accessor<double, 4>();
  auto N = n.accessor<double, 4>();
  auto NT = nt.accessor<double, 4>();
  Direct r;
  r.g_seg.assign(B * C * H * W, 0.0);
  r.g_depth.assign(B * H * W, 0.0);
  r.g_normal.assign(B * 3 * H * W, 0.0);
  int64_t count[3] = {0, 0, 0};
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const int64_t label = Y[b][h][w];
        if (label != ignore) {
          double z = 0;
          for (int64_t c = 0; c < C; ++c) z += std::exp(X[b][c][h][w]);
          r.loss[0] += std::log(z) - X[b][label][h][w];
          for (int64_t c = 0; c < C; ++c)
            r.g_seg[((b * C + c) * H + h) * W + w] = std::exp(X[b][c][h][w]) / z - (c == label);
          ++count[0];
        }
        if (DT[b][0][h][w] > 0) {
          const double diff = D[b][0][h][w] - DT[b][0][h][w];
          r.loss[1] += std::abs(diff);
          r.g_depth[(b * H + h) * W + w] = diff > 0 ? 1.0 : -1.0;
          ++count[1];
        }
        double tn = 0, pn = 0, dot = 0;
        for (int k = 0; k < 3; ++k) {
          tn += NT[b][k][h][w] * NT[b][k][h][w];
          pn += N[b][k][h][w] * N[b][k][h][w];
          dot += N[b][k][h][w] * NT[b][k][h][w];
        }
        if (tn > 0) {
          pn = std::sqrt(pn);
          const double cos = dot / pn;
          r.loss[2] += 1 - cos;
          for (int k = 0; k < 3; ++k)
            r.g_normal[((b * 3 + k) * H + h) * W + w] = -(NT[b][k][h][w] - cos * N[b][k][h][w] / pn) / pn;
          ++count[2];
        }
      }
  for (int t = 0; t < 3; ++t) {
    const double inv = count[t] ? 1.0 / count[t] : 0.0;
    r.loss[t] *= inv;
    auto& g = t == 0 ? r.g_seg : (t == 1 ? r.g_depth : r.g_normal);
    for (double& v : g) v *= inv;
  }
  return r;
}

void expect_close(const at::Tensor& got, const std::vector<double>& want, double tol) {
  const at::Tensor g = got.contiguous().to(at::kDouble);
  ASSERT_EQ(g.numel(), static_cast<int64_t>(want.size()));
  for (int64_t i = 0; i < g.numel(); ++i) EXPECT_NEAR(g.data_ptr<double>()[i], want[i], tol) << "at " << i;
}

TEST(FusedDenseLossCpu, MatchesDirectComputation) {
  torch::manual_seed(0);
  const int64_t B = 2, C = 5, H = 7, W = 9, ignore = 255;
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  const at::Tensor x = torch::randn({B, C, H, W}, f64) * 3;
  at::Tensor y = torch::randint(0, C, {B, H, W}, torch::kLong);
  y.masked_fill_(torch::rand({B, H, W}) < 0.2, ignore);
  const at::Tensor d = torch::rand({B, 1, H, W}, f64) * 4 + 0.1;
  at::Tensor dt = torch::rand({B, 1, H, W}, f64) * 4;
  dt.masked_fill_(dt < 1, 0);
  const at::Tensor n = torch::randn({B, 3, H, W}, f64);
  at::Tensor nt = torch::nn::functional::normalize(torch::randn({B, 3, H, W}, f64),
                                                    torch::nn::functional::NormalizeFuncOptions().dim(1));
  nt.masked_fill_((torch::rand({B, 1, H, W}) < 0.25).expand({B, 3, H, W}), 0);

  const Direct want = direct(x, y, d, dt, n, nt, ignore);
  const auto [losses, counts, lse] = mtvision::fused_dense_loss_forward_cpu(x, y, d, dt, n, nt, ignore);
  ASSERT_EQ(losses.scalar_type(), at::kDouble);
  for (int t = 0; t < 3; ++t) EXPECT_NEAR(losses[t].item<double>(), want.loss[t], 1e-12) << "task " << t;

  const at::Tensor ones = torch::ones({3}, f64);
  const auto [gs, gd, gn] =
      mtvision::fused_dense_loss_backward_cpu(ones, counts, lse, x, y, d, dt, n, nt, ignore);
  expect_close(gs, want.g_seg, 1e-12);
  expect_close(gd, want.g_depth, 1e-12);
  expect_close(gn, want.g_normal, 1e-12);
}

TEST(FusedDenseLossCpu, AllInvalidGivesZeroAndAbsentTaskIsZero) {
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat);
  const at::Tensor x = torch::randn({1, 3, 4, 4}, f32);
  const at::Tensor y = torch::full({1, 4, 4}, 255, torch::kLong);
  const at::Tensor d = torch::rand({1, 1, 4, 4}, f32);
  const at::Tensor dt = torch::zeros({1, 1, 4, 4}, f32);
  const auto [losses, counts, lse] =
      mtvision::fused_dense_loss_forward_cpu(x, y, d, dt, c10::nullopt, c10::nullopt, 255);
  EXPECT_EQ(losses.scalar_type(), at::kFloat);
  for (int t = 0; t < 3; ++t) {
    EXPECT_EQ(losses[t].item<float>(), 0.0f);
    EXPECT_EQ(counts[t].item<int64_t>(), 0);
  }
  const auto [gs, gd, gn] = mtvision::fused_dense_loss_backward_cpu(
      torch::ones({3}), counts, lse, x, y, d, dt, c10::nullopt, c10::nullopt, 255);
  EXPECT_TRUE(torch::all(gs == 0).item<bool>());
  EXPECT_TRUE(torch::all(gd == 0).item<bool>());
  EXPECT_EQ(gn.numel(), 0);
}

TEST(FusedDenseLossCpu, RejectsOutOfRangeLabel) {
  const at::Tensor x = torch::randn({1, 3, 2, 2});
  const at::Tensor y = torch::full({1, 2, 2}, 3, torch::kLong);
  EXPECT_THROW(mtvision::fused_dense_loss_forward_cpu(x, y, c10::nullopt, c10::nullopt, c10::nullopt,
                                                      c10::nullopt, 255),
               c10::Error);
}

}  // namespace
