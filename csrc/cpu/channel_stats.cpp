// CPU kernels of channel_stats and its backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/norm_act_math.h"
#include "channel_loops.h"

namespace resfast::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> channel_stats(const at::Tensor& input) {
  check_activation_input(input, "x");
  const at::Tensor x = input.contiguous(kernel_format(input));
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
    for (int64_t c = 0; c < g.c; ++c) pivot[c] = static_cast<double>(px[g.channels_last ? c : c * g.hw]);
    const std::vector<double> sums = sum_per_sample_channel<2>(g, [&](int64_t, int64_t c, int64_t i) {
      const double d = static_cast<double>(px[i]) - pivot[c];
      return std::array<double, 2>{d, d * d};
    });
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

at::Tensor channel_stats_backward(const at::Tensor& input, const at::Tensor& mean,
                                  const at::Tensor& grad_mean, const at::Tensor& grad_var) {
  check_activation_input(input, "x");
  const at::Tensor x = input.contiguous(kernel_format(input));
  const Geometry g = geometry(x);
  const auto acc = accumulation_type(x.scalar_type());
  const std::pair<const at::Tensor*, const char*> vectors[] = {
      {&mean, "mean"}, {&grad_mean, "grad_mean"}, {&grad_var, "grad_var"}};
  for (const auto& [t, name] : vectors) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == g.c, name, ": expected shape (", g.c, ",), got ",
                      t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == acc, name, ": expected dtype ", acc, ", got ", t->scalar_type());
  }
  at::Tensor grad_x = at::empty_like(x);
  if (x.numel() == 0) return grad_x;
  const at::Tensor m = mean.contiguous(), gm = grad_mean.contiguous(), gv = grad_var.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* pg = grad_x.data_ptr<scalar_t>();
    const acc_t* pm = m.const_data_ptr<acc_t>();
    const acc_t* pgm = gm.const_data_ptr<acc_t>();
    const acc_t* pgv = gv.const_data_ptr<acc_t>();
    const acc_t inv_count = acc_t(1) / static_cast<acc_t>(g.n * g.hw);
    for_each_element(g, [&](int64_t, int64_t c, int64_t i) {
      pg[i] = static_cast<scalar_t>(
          channel_stats_grad<acc_t>(static_cast<acc_t>(px[i]), pm[c], pgm[c], pgv[c], inv_count));
    });
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CPU, m) {
  m.impl("channel_stats", &channel_stats);
  m.impl("channel_stats_backward", &channel_stats_backward);
}

}  // namespace resfast::cpu
