// CPU kernels of channel_stats and its backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/norm_act_math.h"
#include "block_sums.h"
#include "channel_loops.h"
#include "channel_stats.h"
#include "stats_grad.h"

namespace resfast::cpu {
namespace {

// Sums of (x - pivot[c]) and its square: shifting each channel by one of its
// own values keeps the sums small whatever the mean (moments_from_shifted_sums).
template <typename scalar_t>
struct ShiftedSums {
  using sum_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ x;
  const double* __restrict__ pivot;
  const sum_t* __restrict__ row_pivot;  // pivot in sum_t, for the channels_last rows
  int64_t channels;

  std::array<double, 2> plane(int64_t, int64_t c, int64_t, int64_t x_offset, int64_t length) const {
    const double shift = pivot[c];
    return block_sums<2, double>(x_offset, x_offset + length, [&](int64_t i, double* t) {
      const double d = static_cast<double>(x[i]) - shift;
      t[0] = d;
      t[1] = d * d;
    });
  }

  void row(int64_t, int64_t, int64_t x_offset, sum_t* __restrict__ acc) const {
    const scalar_t* __restrict__ xr = x + x_offset;
    sum_t* __restrict__ sum = acc;
    sum_t* __restrict__ sum_sq = acc + channels;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      const sum_t d = static_cast<sum_t>(xr[c]) - row_pivot[c];
      sum[c] += d;
      sum_sq[c] += d * d;
    }
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> channel_stats(const at::Tensor& input) {
  check_activation_input(input, "x");
  const at::Tensor x = kernel_input(input);
  const Geometry g = geometry(x);
  const int64_t count = g.n * g.hw;
  TORCH_CHECK_VALUE(count > 0, "x: expected at least one value per channel, got shape ", x.sizes());
  const auto acc_opts = x.options().dtype(accumulation_type(x.scalar_type()));
  at::Tensor mean = at::empty({g.c}, acc_opts);
  at::Tensor var = at::empty({g.c}, acc_opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    // Each channel's sums are taken around its first value (see moments_from_shifted_sums).
    std::vector<double> pivot(g.c);
    std::vector<acc_t> row_pivot(g.c);
    for (int64_t c = 0; c < g.c; ++c) {
      row_pivot[c] = static_cast<acc_t>(px[g.channels_last ? c : c * g.hw]);
      pivot[c] = static_cast<double>(row_pivot[c]);
    }
    const std::vector<double> sums =
        sum_per_sample_channel<2>(g, ShiftedSums<scalar_t>{px, pivot.data(), row_pivot.data(), g.c});
    acc_t* pm = mean.data_ptr<acc_t>();
    acc_t* pv = var.data_ptr<acc_t>();
    for (int64_t c = 0; c < g.c; ++c) {
      double s1 = 0, s2 = 0;
      for (int64_t n = 0; n < g.n; ++n) {
        s1 += sums[(n * g.c + c) * 2];
        s2 += sums[(n * g.c + c) * 2 + 1];
      }
      const Moments<double> m = moments_from_shifted_sums<double>(count, pivot[c], s1, s2);
      pm[c] = static_cast<acc_t>(m.mean);
      pv[c] = static_cast<acc_t>(m.m2 / count);
    }
  });
  return {mean, var};
}

namespace {

at::Tensor channel_stats_backward(const at::Tensor& input, const at::Tensor& mean,
                                  const at::Tensor& grad_mean, const at::Tensor& grad_var) {
  check_activation_input(input, "x");
  const at::Tensor x = kernel_input(input);
  const Geometry g = geometry(x);
  check_stats_backward_args(x, mean, grad_mean, grad_var);
  at::Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(kernel_format(x)));
  if (x.numel() == 0) return grad_x;
  const at::Tensor m = mean.contiguous(), gm = grad_mean.contiguous(), gv = grad_var.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // channel_stats_grad's a and b per channel, computed once.
    const acc_t inv_count = acc_t(1) / static_cast<acc_t>(g.n * g.hw);
    const acc_t* pgm = gm.const_data_ptr<acc_t>();
    const acc_t* pgv = gv.const_data_ptr<acc_t>();
    std::vector<acc_t> a(g.c), b(g.c);
    for (int64_t c = 0; c < g.c; ++c) {
      a[c] = pgm[c] * inv_count;
      b[c] = acc_t(2) * pgv[c] * inv_count;
    }
    for_each_run(g, CenteredAffineGrad<scalar_t, acc_t, /*kAccumulate=*/false>{
                        x.const_data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), m.const_data_ptr<acc_t>(),
                        a.data(), b.data(), g.c, /*sample_stride=*/0});
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CPU, m) {
  m.impl("channel_stats", &channel_stats);
  m.impl("channel_stats_backward", &channel_stats_backward);
}

}  // namespace resfast::cpu
