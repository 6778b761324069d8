// GradDrop's value of one coordinate, shared by the CPU and CUDA kernels: with pos / neg the sums of the
// positive / negative task values, the sign purity P = (1 + (pos + neg) / (pos - neg)) / 2 (1/2 where all
// values are 0) decides against the uniform draw u which sign is kept.
#pragma once

#if defined(__CUDACC__)
#define MTV_HOST_DEVICE __host__ __device__
#else
#define MTV_HOST_DEVICE
#endif

namespace mtvision {

template <typename acc_t>
MTV_HOST_DEVICE inline acc_t sign_dropout_value(acc_t pos, acc_t neg, float u, acc_t leak, acc_t keep) {
  const acc_t mass = pos - neg;
  const acc_t purity = acc_t(0.5) * (acc_t(1) + (pos + neg) / (mass > 0 ? mass : acc_t(1)));
  const acc_t draw = static_cast<acc_t>(u);
  const acc_t kept = (purity > draw ? pos : acc_t(0)) + (purity < draw ? neg : acc_t(0));
  return leak > 0 ? leak * (pos + neg) + keep * kept : kept;
}

}  // namespace mtvision
