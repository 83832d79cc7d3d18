// norm_act_conv2d_stats for every backend: a fresh output tensor filled by
// norm_act_conv2d_into, whose epilogue also takes the output's moments. The
// autograd kernel is in autograd.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/layout.h"

namespace resfast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_act_conv2d_stats(
    const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    c10::string_view activation, const std::optional<at::Tensor>& batch_invstd) {
  static const auto into =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("resfast::norm_act_conv2d_into", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, c10::IntArrayRef,
              c10::IntArrayRef, c10::IntArrayRef, int64_t, c10::string_view, at::Tensor&, int64_t, bool)>();
  TORCH_CHECK_VALUE(x.dim() == 4 && weight.dim() == 4 && stride.size() == 2 && padding.size() == 2 &&
                        dilation.size() == 2,
                    "norm_act_conv2d_stats: expected 4-D x and weight and pairs of stride, padding, dilation");
  std::vector<int64_t> shape{x.size(0), weight.size(0), 0, 0};
  for (int d = 0; d < 2; ++d) {
    shape[2 + d] = (x.size(2 + d) + 2 * padding[d] - dilation[d] * (weight.size(2 + d) - 1) - 1) / stride[d] + 1;
    TORCH_CHECK_VALUE(shape[2 + d] > 0, "input: spatial size ", x.sizes(), " (padded) is smaller than the dilated kernel ",
                      weight.sizes());
  }
  at::Tensor y = at::empty(shape, x.options().dtype(weight.scalar_type()).memory_format(kernel_format(x)));
  auto [y_mean, y_var] = into.call(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups,
                                   activation, y, 0, true);
  return {y, y_mean, y_var};
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CompositeExplicitAutograd, m) {
  m.impl("norm_act_conv2d_stats", &norm_act_conv2d_stats);
}

}  // namespace resfast
