// Parallel loops over the elements of an (N, C, H, W) tensor that is either
// NCHW- or channels_last-contiguous, for kernels whose math depends on the
// sample n and channel c of each element. Inner loops run over contiguous
// memory (the H*W plane, or the C channels of a pixel) so they vectorise.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <array>
#include <vector>

namespace resfast::cpu {

struct Geometry {
  int64_t n, c, hw;
  bool channels_last;
};

// The layout the kernels run in: channels_last if that is how x is laid out,
// NCHW otherwise. Tensors are made contiguous in it (a no-op for both
// standard layouts).
inline at::MemoryFormat kernel_format(const at::Tensor& x) {
  return x.suggest_memory_format() == at::MemoryFormat::ChannelsLast ? at::MemoryFormat::ChannelsLast
                                                                     : at::MemoryFormat::Contiguous;
}

inline Geometry geometry(const at::Tensor& x) {
  return {x.size(0), x.size(1), x.size(2) * x.size(3), kernel_format(x) == at::MemoryFormat::ChannelsLast};
}

// Pixels of one sample per work item in channels_last loops.
constexpr int64_t kRowsPerChunk = 256;

// f(n, c, i) for every element, i being its offset in the contiguous buffer.
template <typename F>
void for_each_element(const Geometry& g, const F& f) {
  if (g.channels_last) {
    at::parallel_for(0, g.n * g.hw, kRowsPerChunk, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / g.hw;
        const int64_t base = row * g.c;
        for (int64_t c = 0; c < g.c; ++c) f(n, c, base + c);
      }
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(g.hw, 1));
    at::parallel_for(0, g.n * g.c, grain, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / g.c, c = plane % g.c;
        const int64_t base = plane * g.hw;
        for (int64_t p = 0; p < g.hw; ++p) f(n, c, base + p);
      }
    });
  }
}

// Sums, per (sample, channel), of the K values f(n, c, i) returns for each
// element; f may also write outputs. Returns [N][C][K] doubles. The work is
// split into a fixed set of chunks, independent of the thread count, and the
// chunk sums are added in a fixed order: results are bitwise reproducible.
template <int K, typename F>
std::vector<double> sum_per_sample_channel(const Geometry& g, const F& f) {
  std::vector<double> out(static_cast<size_t>(g.n * g.c * K), 0.0);
  if (g.channels_last) {
    const int64_t chunks_per_sample = (g.hw + kRowsPerChunk - 1) / kRowsPerChunk;
    const int64_t chunks = g.n * chunks_per_sample;
    std::vector<double> partial(static_cast<size_t>(chunks * g.c * K), 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t n = chunk / chunks_per_sample;
        const int64_t p0 = (chunk % chunks_per_sample) * kRowsPerChunk;
        const int64_t p1 = std::min(p0 + kRowsPerChunk, g.hw);
        double* acc = partial.data() + chunk * g.c * K;
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t base = (n * g.hw + p) * g.c;
          for (int64_t c = 0; c < g.c; ++c) {
            const std::array<double, K> v = f(n, c, base + c);
            for (int k = 0; k < K; ++k) acc[c * K + k] += v[k];
          }
        }
      }
    });
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const int64_t n = chunk / chunks_per_sample;
      const double* src = partial.data() + chunk * g.c * K;
      double* dst = out.data() + n * g.c * K;
      for (int64_t j = 0; j < g.c * K; ++j) dst[j] += src[j];
    }
  } else {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(g.hw, 1));
    at::parallel_for(0, g.n * g.c, grain, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / g.c, c = plane % g.c;
        const int64_t base = plane * g.hw;
        std::array<double, K> acc{};
        for (int64_t p = 0; p < g.hw; ++p) {
          const std::array<double, K> v = f(n, c, base + p);
          for (int k = 0; k < K; ++k) acc[k] += v[k];
        }
        for (int k = 0; k < K; ++k) out[plane * K + k] = acc[k];
      }
    });
  }
  return out;
}

}  // namespace resfast::cpu
