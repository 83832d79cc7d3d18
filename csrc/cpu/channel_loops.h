// Parallel loops over an (N, C, H, W) tensor that is NCHW- or channels_last-
// contiguous, for kernels whose math depends on each element's sample n and
// channel c. A kernel sees contiguous runs so its inner loops vectorise:
//   NCHW:          plane(n, c, offset, length): the H*W values of one (n, c);
//   channels_last: row(n, offset): the C values of one pixel of sample n.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <array>
#include <vector>

#include "../common/layout.h"
#include "isa.h"

namespace resfast::cpu {

struct Geometry {
  int64_t n, c, hw;
  bool channels_last;
};

inline Geometry geometry(const at::Tensor& x) {
  return {x.size(0), x.size(1), x.size(2) * x.size(3), kernel_format(x) == at::MemoryFormat::ChannelsLast};
}

// Pixels of one sample per work item in channels_last loops.
constexpr int64_t kRowsPerChunk = 256;

inline int64_t plane_grain(const Geometry& g) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(g.hw, 1)); }

// kernel.plane(n, c, offset, length) / kernel.row(n, offset) over every element.
template <typename Kernel>
void for_each_run(const Geometry& g, const Kernel& kernel) {
  if (g.channels_last) {
    at::parallel_for(0, g.n * g.hw, kRowsPerChunk, [&](int64_t begin, int64_t end) {
      run_with_best_isa([&] {
        for (int64_t pixel = begin; pixel < end; ++pixel) kernel.row(pixel / g.hw, pixel * g.c);
      });
    });
  } else {
    at::parallel_for(0, g.n * g.c, plane_grain(g), [&](int64_t begin, int64_t end) {
      run_with_best_isa([&] {
        for (int64_t plane = begin; plane < end; ++plane) kernel.plane(plane / g.c, plane % g.c, plane * g.hw, g.hw);
      });
    });
  }
}

// Per-(sample, channel) sums of K quantities, returned as [N][C][K] doubles.
//   kernel.plane(n, c, offset, length) -> std::array<double, K>: one plane's sums;
//   kernel.row(n, offset, acc): adds one pixel's values to acc[k * C + c], an
//   array of Kernel::sum_t (the kernel's own precision: rows are summed in
//   chunks of kRowsPerChunk before the chunk sums are added in double).
// The work is split into chunks that do not depend on the thread count, and
// chunk sums are added in a fixed order: results are bitwise reproducible.
template <int K, typename Kernel>
std::vector<double> sum_per_sample_channel(const Geometry& g, const Kernel& kernel) {
  using sum_t = typename Kernel::sum_t;
  std::vector<double> out(static_cast<size_t>(g.n * g.c * K), 0.0);
  if (g.channels_last) {
    const int64_t chunks_per_sample = (g.hw + kRowsPerChunk - 1) / kRowsPerChunk;
    const int64_t chunks = g.n * chunks_per_sample;
    std::vector<double> partial(static_cast<size_t>(chunks * g.c * K));
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<sum_t> acc(static_cast<size_t>(g.c * K));
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t n = chunk / chunks_per_sample;
        const int64_t p0 = (chunk % chunks_per_sample) * kRowsPerChunk;
        const int64_t p1 = std::min(p0 + kRowsPerChunk, g.hw);
        std::fill(acc.begin(), acc.end(), sum_t(0));
        run_with_best_isa([&] {
          for (int64_t p = p0; p < p1; ++p) kernel.row(n, (n * g.hw + p) * g.c, acc.data());
        });
        std::copy(acc.begin(), acc.end(), partial.begin() + chunk * g.c * K);
      }
    });
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const double* src = partial.data() + chunk * g.c * K;
      double* dst = out.data() + (chunk / chunks_per_sample) * g.c * K;
      for (int64_t c = 0; c < g.c; ++c) {
        for (int k = 0; k < K; ++k) dst[c * K + k] += src[k * g.c + c];
      }
    }
  } else {
    at::parallel_for(0, g.n * g.c, plane_grain(g), [&](int64_t begin, int64_t end) {
      run_with_best_isa([&] {
        for (int64_t plane = begin; plane < end; ++plane) {
          const std::array<double, K> s = kernel.plane(plane / g.c, plane % g.c, plane * g.hw, g.hw);
          std::copy(s.begin(), s.end(), out.begin() + plane * K);
        }
      });
    });
  }
  return out;
}

}  // namespace resfast::cpu
