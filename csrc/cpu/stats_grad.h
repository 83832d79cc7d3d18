// grad_x = a + b * (x - mean), per-channel or per-(sample, channel) a, b and
// mean, written to grad_x (dense) or added to it; x may be strided
// (channel_loops.h). The gradient of a (mean, biased variance) over M values
// with respect to each value has this form, a = grad_mean / M and
// b = 2 grad_var / M: channel_stats_backward, group_stats_backward, and the
// statistics term of the fused unit's input gradient in training-mode
// BatchNorm and GroupNorm; so has GroupNorm's input gradient beyond
// dz * scale (norm_act_math.h's centered_affine).
#pragma once

#include <cstdint>

#include "../common/norm_act_math.h"

namespace resfast::cpu {

// mean, a and b are indexed [n * sample_stride + c]: sample_stride 0 for
// per-channel vectors, C for (N, C) ones.
template <typename scalar_t, typename acc_t, bool kAccumulate>
struct CenteredAffineGrad {
  const scalar_t* __restrict__ x;
  scalar_t* __restrict__ grad_x;
  const acc_t* __restrict__ mean;
  const acc_t* __restrict__ a;
  const acc_t* __restrict__ b;
  int64_t channels;
  int64_t sample_stride;

  static void store(scalar_t& out, acc_t xv, acc_t m, acc_t ca, acc_t cb) {
    const acc_t g = centered_affine(xv, m, ca, cb);
    out = static_cast<scalar_t>(kAccumulate ? static_cast<acc_t>(out) + g : g);
  }

  void plane(int64_t n, int64_t c, int64_t offset, int64_t x_offset, int64_t length) const {
    const int64_t k = n * sample_stride + c;
    const acc_t m = mean[k], ca = a[k], cb = b[k];
    const scalar_t* __restrict__ xp = x + x_offset;
    scalar_t* __restrict__ gx = grad_x + offset;
#pragma omp simd
    for (int64_t i = 0; i < length; ++i) {
      store(gx[i], static_cast<acc_t>(xp[i]), m, ca, cb);
    }
  }

  void row(int64_t n, int64_t offset, int64_t x_offset) const {
    const int64_t k0 = n * sample_stride;
    const acc_t* __restrict__ m = mean + k0;
    const acc_t* __restrict__ ca = a + k0;
    const acc_t* __restrict__ cb = b + k0;
    const scalar_t* __restrict__ xr = x + x_offset;
    scalar_t* __restrict__ gx = grad_x + offset;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      store(gx[c], static_cast<acc_t>(xr[c]), m[c], ca[c], cb[c]);
    }
  }
};

}  // namespace resfast::cpu
