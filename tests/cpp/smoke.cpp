// Calls the resfast operators through the dispatcher, as libtorch users do,
// and checks them against ATen.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

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
  auto& dispatcher = c10::Dispatcher::singleton();
  const auto stats = dispatcher.findSchemaOrThrow("resfast::channel_stats", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
  const auto unit =
      dispatcher.findSchemaOrThrow("resfast::norm_act_conv2d", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, c10::IntArrayRef, c10::IntArrayRef,
                            c10::IntArrayRef, int64_t, c10::string_view, const std::optional<at::Tensor>&)>();

  for (const auto format : {at::MemoryFormat::Contiguous, at::MemoryFormat::ChannelsLast}) {
    const at::Tensor x = (at::randn({3, 5, 7, 9}) * 2 + 3).contiguous(format);
    const auto [mean, var] = stats.call(x);
    const auto [ref_var, ref_mean] = at::var_mean(x, {0, 2, 3}, /*correction=*/0);
    expect_close(mean, ref_mean, "channel_stats mean");
    expect_close(var, ref_var, "channel_stats var");

    const at::Tensor scale = at::rand({5}) + 0.5, shift = at::randn({5});
    const at::Tensor weight = at::randn({4, 5, 3, 3}), bias = at::randn({4});
    const at::Tensor y = unit.call(x, mean, scale, shift, weight, bias, std::nullopt, {1, 1}, {1, 1},
                                   {1, 1}, 1, "relu", std::nullopt);
    const at::Tensor a = at::relu((x - mean.view({1, 5, 1, 1})) * scale.view({1, 5, 1, 1}) +
                                  shift.view({1, 5, 1, 1}));
    expect_close(y, at::conv2d(a, weight, bias, 1, 1), "norm_act_conv2d");
  }
  std::printf("%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
