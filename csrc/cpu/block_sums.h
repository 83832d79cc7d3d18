// Vectorised sums for the NCHW plane kernels. GCC 12 leaves a
// `#pragma omp simd reduction` loop scalar once it is inlined into a larger
// function (its per-lane arrays are never vectorised), so plane reductions
// ran at one add per add-latency. Here each block's terms are first written
// to a local array (a plain elementwise loop), then summed into independent
// lane accumulators: both vectorise at every instruction-set level (isa.h).
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>

namespace resfast::cpu {

// Values per block: summed in sum_t (float for float/half/bfloat16 input),
// then the block sums in double, which keeps long planes accurate.
constexpr int64_t kSumBlock = 256;
constexpr int64_t kSumLanes = 16;

// Sums over i in [begin, end) of the K values that term(i, t) stores in t[k],
// in a fixed order: bitwise reproducible for a given plane.
template <int K, typename sum_t, typename Term>
inline __attribute__((always_inline)) std::array<double, K> block_sums(int64_t begin, int64_t end,
                                                                       const Term& term) {
  std::array<double, K> total{};
  if (end - begin <= kSumLanes) {
    // A short plane (a dense block's 4x4 or 2x2 maps): one lane's worth,
    // summed directly; the block's padding and lane sums would cost more
    // than the terms.
    for (int64_t i = begin; i < end; ++i) {
      sum_t t[K];
      term(i, t);
      for (int k = 0; k < K; ++k) total[k] += static_cast<double>(t[k]);
    }
    return total;
  }
  alignas(64) sum_t terms[K][kSumBlock];
  for (int64_t start = begin; start < end; start += kSumBlock) {
    const int64_t len = std::min(kSumBlock, end - start);
    for (int64_t j = 0; j < len; ++j) {
      sum_t t[K];
      term(start + j, t);
      for (int k = 0; k < K; ++k) terms[k][j] = t[k];
    }
    // Zero padding to whole lanes keeps the lane loop branch-free.
    for (int k = 0; k < K; ++k) std::fill(terms[k] + len, terms[k] + (len + kSumLanes - 1) / kSumLanes * kSumLanes, sum_t(0));
    for (int k = 0; k < K; ++k) {
      sum_t lanes[kSumLanes] = {};
      for (int64_t j = 0; j < len; j += kSumLanes) {
        for (int64_t l = 0; l < kSumLanes; ++l) lanes[l] += terms[k][j + l];
      }
      sum_t s = 0;
      for (int64_t l = 0; l < kSumLanes; ++l) s += lanes[l];
      total[k] += static_cast<double>(s);
    }
  }
  return total;
}

}  // namespace resfast::cpu
