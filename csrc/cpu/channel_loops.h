// Parallel loops over an (N, C, H, W) or (N, C, D, H, W) tensor that is
// NC(D)HW- or channels_last(_3d)-contiguous (its spatial dims are one run of
// `hw` positions), for kernels whose math depends on each element's sample n and
// channel c. A kernel sees contiguous runs so its inner loops vectorise:
//   NCHW:          plane(n, c, offset, x_offset, length): the H*W values of one (n, c);
//   channels_last: row(n, offset, x_offset): the C values of one pixel of sample n.
// `offset` indexes the dense tensors the kernel writes (and reads, other than
// x); `x_offset` indexes x, which may be the first C channels of a wider
// tensor (a dense block's feature buffer), read in place instead of copied.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <vector>

#include "../common/layout.h"
#include "isa.h"

namespace resfast::cpu {

struct Geometry {
  int64_t n, c, hw;
  bool channels_last;
  // x's strides: between samples, and (channels_last) between pixels.
  int64_t x_sample_stride = 0, x_pixel_stride = 0;

  int64_t x_plane(int64_t sample, int64_t channel) const { return sample * x_sample_stride + channel * hw; }
  int64_t x_row(int64_t sample, int64_t pixel) const { return sample * x_sample_stride + pixel * x_pixel_stride; }
};

// Elements between a channels_last x's pixels: the stride of its last spatial
// dim longer than 1 (a size-1 dim's stride is arbitrary).
inline int64_t pixel_stride(const at::Tensor& x) {
  for (int64_t d = x.dim() - 1; d >= 2; --d) {
    if (x.size(d) > 1) return x.stride(d);
  }
  return x.size(1);
}

// Whether the spatial dims of x are laid out densely, `innermost` elements
// apart in the last one (size-1 dims may have any stride).
inline bool dense_spatial(const at::Tensor& x, int64_t innermost) {
  int64_t expected = innermost;
  for (int64_t d = x.dim() - 1; d >= 2; --d) {
    if (x.size(d) > 1 && x.stride(d) != expected) return false;
    expected *= x.size(d);
  }
  return true;
}

// Whether the kernels can read x where it lies: NC(D)HW planes or channels_last
// pixel rows contiguous, any sample (and pixel) stride, as in x[:, :C] of a
// wider tensor in either layout.
inline bool kernel_readable(const at::Tensor& x) {
  if (x.dim() != 4 && x.dim() != 5) return false;
  const int64_t c = x.size(1);
  if (is_channels_last(kernel_format(x))) {
    const int64_t p = pixel_stride(x);
    return (c == 1 || x.stride(1) == 1) && p >= c && dense_spatial(x, p);
  }
  return dense_spatial(x, 1) && (c == 1 || x.stride(1) == spatial_numel(x));
}

// x itself when the kernels can read it, else a copy in its kernel format.
inline at::Tensor kernel_input(const at::Tensor& x) {
  return kernel_readable(x) ? x : x.contiguous(kernel_format(x));
}

// The loop geometry of x laid out densely in its kernel format (what
// x.contiguous(kernel_format(x)) gives).
inline Geometry dense_geometry(const at::Tensor& x) {
  const bool channels_last = is_channels_last(kernel_format(x));
  const int64_t c = x.size(1), hw = spatial_numel(x);
  return {x.size(0), c, hw, channels_last, c * hw, channels_last ? c : 0};
}

// The loop geometry of x where it lies; x must be kernel_readable.
inline Geometry geometry(const at::Tensor& x) {
  TORCH_INTERNAL_ASSERT(kernel_readable(x), "resfast: kernel input with unsupported strides ", x.strides());
  Geometry g = dense_geometry(x);
  if (g.channels_last) g.x_pixel_stride = pixel_stride(x);
  if (g.n > 1) g.x_sample_stride = x.stride(0);
  else if (g.channels_last) g.x_sample_stride = g.hw * g.x_pixel_stride;
  return g;
}

// Pixels of one sample per work item in channels_last loops.
constexpr int64_t kRowsPerChunk = 256;

// NCHW planes per work item: at least 8192 values. A tensor of 8K to 32K
// values (a GroupNorm unit at 64 channels, 16x16, batch 2) then runs its
// passes on every thread, as its channels_last rows already did: with the
// whole pass on one thread the passes took twice as long and oneDNN's
// convolution after them ran 10-35% slower (AMD EPYC, 2 threads, forward
// and backward; likeliest, because its input then sat in one core's cache).
inline int64_t plane_grain(const Geometry& g) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(g.hw, 1)); }

// kernel.plane(n, c, offset, x_offset, length) / kernel.row(n, offset, x_offset) over every element.
template <typename Kernel>
void for_each_run(const Geometry& g, const Kernel& kernel) {
  if (g.channels_last) {
    at::parallel_for(0, g.n * g.hw, kRowsPerChunk, [&](int64_t begin, int64_t end) {
      run_with_best_isa([&] {
        for (int64_t pixel = begin; pixel < end; ++pixel) {
          const int64_t n = pixel / g.hw;
          kernel.row(n, pixel * g.c, g.x_row(n, pixel - n * g.hw));
        }
      });
    });
  } else {
    at::parallel_for(0, g.n * g.c, plane_grain(g), [&](int64_t begin, int64_t end) {
      run_with_best_isa([&] {
        for (int64_t plane = begin; plane < end; ++plane) {
          const int64_t n = plane / g.c, c = plane % g.c;
          kernel.plane(n, c, plane * g.hw, g.x_plane(n, c), g.hw);
        }
      });
    });
  }
}

// Per-(sample, channel) sums of K quantities, returned as [N][C][K] doubles.
//   kernel.plane(n, c, offset, x_offset, length) -> std::array<double, K>: one plane's sums;
//   kernel.row(n, offset, x_offset, acc): adds one pixel's values to acc[k * C + c], an
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
          for (int64_t p = p0; p < p1; ++p) kernel.row(n, (n * g.hw + p) * g.c, g.x_row(n, p), acc.data());
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
          const int64_t n = plane / g.c, c = plane % g.c;
          const std::array<double, K> s = kernel.plane(n, c, plane * g.hw, g.x_plane(n, c), g.hw);
          std::copy(s.begin(), s.end(), out.begin() + plane * K);
        }
      });
    });
  }
  return out;
}

}  // namespace resfast::cpu
