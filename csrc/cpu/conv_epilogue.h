// The store epilogue of the fused convolution on the CPU: ATen's convolution
// cannot write into a channel slice of a larger tensor, so this pass moves its
// output (plus an optional residual) into out[:, offset:offset + C] and, on
// request, takes each channel's moments of the stored values on the way.
// Moments are per plane (NCHW) or per chunk of kRowsPerChunk pixels
// (channels_last), two-pass within the chunk while it is in cache, and merged
// with Chan's formula in a fixed order: stable and bitwise reproducible.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../common/norm_act_math.h"
#include "block_sums.h"
#include "channel_loops.h"

namespace resfast::cpu {

struct SliceGeometry {
  int64_t n, c, hw;     // the source (N, C, H*W)
  int64_t out_channels;  // channels of the destination buffer
  int64_t offset;       // first destination channel
  bool channels_last;
};

// Writes y (+ residual) into the slice; returns the merged per-channel moments
// when `stats` is set (empty otherwise). y, residual and out share one layout.
template <typename scalar_t, typename acc_t>
std::vector<Moments<double>> store_slice(const SliceGeometry& g, const scalar_t* __restrict__ y,
                                         const scalar_t* __restrict__ residual, scalar_t* __restrict__ out,
                                         bool stats) {
  std::vector<Moments<double>> parts;
  int64_t parts_per_sample = 0;
  if (g.channels_last) {
    parts_per_sample = (g.hw + kRowsPerChunk - 1) / kRowsPerChunk;
    if (stats) parts.resize(static_cast<size_t>(g.n * parts_per_sample * g.c));
    at::parallel_for(0, g.n * parts_per_sample, 1, [&](int64_t begin, int64_t end) {
      run_with_best_isa([&] {
        // Sums in double: a float sum of 256 values far from zero loses the
        // mean's low bits, which the variance then inherits.
        std::vector<double> sum(static_cast<size_t>(g.c));
        std::vector<acc_t> mean(static_cast<size_t>(g.c)), m2(static_cast<size_t>(g.c));
        for (int64_t chunk = begin; chunk < end; ++chunk) {
          const int64_t n = chunk / parts_per_sample;
          const int64_t p0 = n * g.hw + (chunk % parts_per_sample) * kRowsPerChunk;
          const int64_t p1 = std::min(p0 + kRowsPerChunk, (n + 1) * g.hw);
          std::fill(sum.begin(), sum.end(), 0.0);
          for (int64_t p = p0; p < p1; ++p) {
            const scalar_t* __restrict__ src = y + p * g.c;
            const scalar_t* __restrict__ res = residual ? residual + p * g.c : nullptr;
            scalar_t* __restrict__ dst = out + p * g.out_channels + g.offset;
            double* __restrict__ s = sum.data();
#pragma omp simd
            for (int64_t c = 0; c < g.c; ++c) {
              const scalar_t v = res ? static_cast<scalar_t>(static_cast<acc_t>(src[c]) + static_cast<acc_t>(res[c]))
                                     : src[c];
              dst[c] = v;
              if (stats) s[c] += static_cast<double>(v);
            }
          }
          if (!stats) continue;
          const double count = static_cast<double>(p1 - p0);
          for (int64_t c = 0; c < g.c; ++c) mean[c] = static_cast<acc_t>(sum[c] / count);
          std::fill(m2.begin(), m2.end(), acc_t(0));
          for (int64_t p = p0; p < p1; ++p) {
            const scalar_t* __restrict__ dst = out + p * g.out_channels + g.offset;
            const acc_t* __restrict__ mu = mean.data();
            acc_t* __restrict__ q = m2.data();
#pragma omp simd
            for (int64_t c = 0; c < g.c; ++c) {
              const acc_t d = static_cast<acc_t>(dst[c]) - mu[c];
              q[c] += d * d;
            }
          }
          Moments<double>* part = parts.data() + chunk * g.c;
          for (int64_t c = 0; c < g.c; ++c) {
            // M2 about the exact chunk mean: sum (x - mu)^2 - count (mean - mu)^2.
            const double delta = sum[c] / count - static_cast<double>(mean[c]);
            part[c] = {count, sum[c] / count, std::max(0.0, static_cast<double>(m2[c]) - count * delta * delta)};
          }
        }
      });
    });
  } else {
    parts_per_sample = 1;
    if (stats) parts.resize(static_cast<size_t>(g.n * g.c));
    at::parallel_for(0, g.n * g.c, plane_grain({g.n, g.c, g.hw, false}), [&](int64_t begin, int64_t end) {
      run_with_best_isa([&] {
        for (int64_t plane = begin; plane < end; ++plane) {
          const int64_t n = plane / g.c, c = plane % g.c;
          const scalar_t* __restrict__ src = y + plane * g.hw;
          const scalar_t* __restrict__ res = residual ? residual + plane * g.hw : nullptr;
          scalar_t* __restrict__ dst = out + (n * g.out_channels + g.offset + c) * g.hw;
          const auto value = [&](int64_t i) {
            return res ? static_cast<scalar_t>(static_cast<acc_t>(src[i]) + static_cast<acc_t>(res[i])) : src[i];
          };
          if (!stats) {
#pragma omp simd
            for (int64_t i = 0; i < g.hw; ++i) dst[i] = value(i);
            continue;
          }
          const double sum = block_sums<1, double>(0, g.hw, [&](int64_t i, double* t) {
            const scalar_t v = value(i);
            dst[i] = v;
            t[0] = static_cast<double>(v);
          })[0];
          const double mean = sum / static_cast<double>(g.hw);
          const double m2 = block_sums<1, double>(0, g.hw, [&](int64_t i, double* t) {
            const double d = static_cast<double>(dst[i]) - mean;
            t[0] = d * d;
          })[0];
          parts[plane] = {static_cast<double>(g.hw), mean, m2};
        }
      });
    });
  }
  if (!stats) return {};
  std::vector<Moments<double>> merged(static_cast<size_t>(g.c), Moments<double>{0, 0, 0});
  for (int64_t part = 0; part < g.n * parts_per_sample; ++part) {
    for (int64_t c = 0; c < g.c; ++c) merged[c] = merge_moments(merged[c], parts[part * g.c + c]);
  }
  return merged;
}

}  // namespace resfast::cpu
