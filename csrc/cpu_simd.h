// Shared by the CPU kernels: hot per-block loops are compiled twice on x86-64 (AVX2+FMA and baseline
// SSE2) and the loader picks the one the CPU runs, so they run 8-wide with no -march flag in the build.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MTV_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MTV_SIMD_CLONES
#endif
