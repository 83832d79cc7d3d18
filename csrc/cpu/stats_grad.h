// The gradient of per-channel or per-(sample, channel) (mean, biased
// variance) with respect to each value, written to grad_x (dense) or added to
// it; x may be strided (channel_loops.h): channel_stats_backward, and the
// statistics term of the fused unit's input gradient in training-mode
// BatchNorm and GroupNorm. mean, grad_mean and grad_var are indexed
// [n * sample_stride + c]: sample_stride 0 for per-channel statistics.
#pragma once

#include <cstdint>

#include "../common/norm_act_math.h"

namespace resfast::cpu {

template <typename scalar_t, typename acc_t, bool accumulate>
struct StatsGrad {
  const scalar_t* __restrict__ x;
  scalar_t* __restrict__ grad_x;
  const acc_t* __restrict__ mean;
  const acc_t* __restrict__ grad_mean;
  const acc_t* __restrict__ grad_var;
  acc_t inv_count;
  int64_t channels;
  int64_t sample_stride;

  void plane(int64_t n, int64_t c, int64_t offset, int64_t x_offset, int64_t length) const {
    const int64_t k = n * sample_stride + c;
    const acc_t m = mean[k], gm = grad_mean[k], gv = grad_var[k];
    const scalar_t* __restrict__ xp = x + x_offset;
    scalar_t* __restrict__ gx = grad_x + offset;
#pragma omp simd
    for (int64_t i = 0; i < length; ++i) {
      const acc_t g = channel_stats_grad<acc_t>(static_cast<acc_t>(xp[i]), m, gm, gv, inv_count);
      gx[i] = static_cast<scalar_t>(accumulate ? static_cast<acc_t>(gx[i]) + g : g);
    }
  }

  void row(int64_t n, int64_t offset, int64_t x_offset) const {
    const int64_t k0 = n * sample_stride;
    const acc_t* __restrict__ m = mean + k0;
    const acc_t* __restrict__ gm = grad_mean + k0;
    const acc_t* __restrict__ gv = grad_var + k0;
    const scalar_t* __restrict__ xr = x + x_offset;
    scalar_t* __restrict__ gx = grad_x + offset;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      const acc_t g = channel_stats_grad<acc_t>(static_cast<acc_t>(xr[c]), m[c], gm[c], gv[c], inv_count);
      gx[c] = static_cast<scalar_t>(accumulate ? static_cast<acc_t>(gx[c]) + g : g);
    }
  }
};

}  // namespace resfast::cpu
