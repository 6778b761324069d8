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

// 32-bit finaliser of MurmurHash3: every input bit affects every output bit.
MTV_HOST_DEVICE inline uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// The uniform draw of coordinate `index` (counted over all chunks in order, below 2^32) for `seed`: the
// coordinate mixed with the seed's two halves in two MurmurHash3 finalisers, its top 24 bits as a float
// in [0, 1). Counter-based, so the CPU and CUDA kernels draw the same values and no tensor of draws is
// written or read; 32-bit integer arithmetic, so it vectorises on the CPU.
MTV_HOST_DEVICE inline float counter_uniform(uint64_t seed, uint64_t index) {
  const uint32_t h = mix32(mix32(static_cast<uint32_t>(index) ^ static_cast<uint32_t>(seed)) +
                           static_cast<uint32_t>(seed >> 32));
  return static_cast<float>(h >> 8) * 5.9604644775390625e-08f;  // 2^-24
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
