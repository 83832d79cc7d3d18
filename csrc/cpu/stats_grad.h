// The gradient of per-channel (mean, biased variance) with respect to each
// value, written to grad_x (dense) or added to it; x may be strided
// (channel_loops.h): channel_stats_backward, and the
// batch-statistics term of training-mode BatchNorm's input gradient.
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

  void plane(int64_t, int64_t c, int64_t offset, int64_t x_offset, int64_t length) const {
    const acc_t m = mean[c], gm = grad_mean[c], gv = grad_var[c];
    const scalar_t* __restrict__ xp = x + x_offset;
    scalar_t* __restrict__ gx = grad_x + offset;
#pragma omp simd
    for (int64_t i = 0; i < length; ++i) {
      const acc_t g = channel_stats_grad<acc_t>(static_cast<acc_t>(xp[i]), m, gm, gv, inv_count);
      gx[i] = static_cast<scalar_t>(accumulate ? static_cast<acc_t>(gx[i]) + g : g);
    }
  }

  void row(int64_t, int64_t offset, int64_t x_offset) const {
    const scalar_t* __restrict__ xr = x + x_offset;
    scalar_t* __restrict__ gx = grad_x + offset;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      const acc_t g = channel_stats_grad<acc_t>(static_cast<acc_t>(xr[c]), mean[c], grad_mean[c], grad_var[c], inv_count);
      gx[c] = static_cast<scalar_t>(accumulate ? static_cast<acc_t>(gx[c]) + g : g);
    }
  }
};

}  // namespace resfast::cpu
