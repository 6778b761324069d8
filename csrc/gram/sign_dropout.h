// GradDrop's value of one coordinate, shared by the CPU and CUDA kernels: with pos / neg the sums of the
// positive / negative task values, the sign purity P = (1 + (pos + neg) / (pos - neg)) / 2 (1/2 where all
// values are 0) decides against the uniform draw u which sign is kept.
#pragma once

#if defined(__CUDACC__)
#define MTV_HOST_DEVICE __host__ __device__
#else
#define MTV_HOST_DEVICE
#endif

#include <cstdint>

namespace mtvision {

// The uniform draw of coordinate `index` (counted over all chunks in order) for `seed`: SplitMix64 of
// seed + (index + 1) * golden ratio, its top 24 bits as a float in [0, 1). Counter-based, so the CPU and
// CUDA kernels draw the same values and no tensor of draws is written or read.
MTV_HOST_DEVICE inline float counter_uniform(uint64_t seed, uint64_t index) {
  uint64_t z = seed + (index + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * 5.9604644775390625e-08f;  // 2^-24
}

template <typename acc_t>
MTV_HOST_DEVICE inline acc_t sign_dropout_value(acc_t pos, acc_t neg, float u, acc_t leak, acc_t keep) {
  const acc_t mass = pos - neg;
  const acc_t purity = acc_t(0.5) * (acc_t(1) + (pos + neg) / (mass > 0 ? mass : acc_t(1)));
  const acc_t draw = static_cast<acc_t>(u);
  const acc_t kept = (purity > draw ? pos : acc_t(0)) + (purity < draw ? neg : acc_t(0));
  return leak > 0 ? leak * (pos + neg) + keep * kept : kept;
}

}  // namespace mtvision
