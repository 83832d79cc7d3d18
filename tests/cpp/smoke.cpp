// Calls the resfast operators through their C++ API (ops.h), as libtorch
// users do, and checks them against ATen.
#include <ATen/ATen.h>

#include "ops.h"

#include <cstdio>
#include <tuple>

namespace {

int failures = 0;

void expect_close(const at::Tensor& actual, const at::Tensor& expected, const char* what) {
  const double err = (actual.to(at::kDouble) - expected.to(at::kDouble)).abs().max().item<double>();
  const double scale = expected.abs().max().item<double>();
  const bool ok = err <= 1e-4 * (scale > 0 ? scale : 1.0);
  std::printf("%s %s: max error %.3g\n", ok ? "PASS" : "FAIL", what, err);
  failures += !ok;
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (const auto format : {at::MemoryFormat::Contiguous, at::MemoryFormat::ChannelsLast}) {
    const at::Tensor x = (at::randn({3, 5, 7, 9}) * 2 + 3).contiguous(format);
    const auto [mean, var] = resfast::ops::channel_stats(x);
    const auto [ref_var, ref_mean] = at::var_mean(x, {0, 2, 3}, /*correction=*/0);
    expect_close(mean, ref_mean, "channel_stats mean");
    expect_close(var, ref_var, "channel_stats var");

    const at::Tensor scale = at::rand({5}) + 0.5, shift = at::randn({5});
    const at::Tensor weight = at::randn({4, 5, 3, 3}), bias = at::randn({4});
    const at::Tensor y = resfast::ops::norm_act_conv2d(x, mean, scale, shift, weight, bias, std::nullopt, {1, 1},
                                                       {1, 1}, {1, 1}, 1, "relu", std::nullopt);
    const at::Tensor a = at::relu((x - mean.view({1, 5, 1, 1})) * scale.view({1, 5, 1, 1}) +
                                  shift.view({1, 5, 1, 1}));
    expect_close(y, at::conv2d(a, weight, bias, 1, 1), "norm_act_conv2d");
  }
  std::printf("%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
