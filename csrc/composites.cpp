// The ops composed of other resfast ops, written once for every device
// (CompositeExplicitAutograd); a backend may register a faster kernel of its
// own (the CPU has both). resfast.backend runs these same kernels with its
// inner ops switched, and their autograd is in autograd.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/layout.h"
#include "ops.h"

namespace resfast {
namespace {

// A fresh output filled by norm_act_conv2d_into, whose epilogue also takes
// the output's moments.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_act_conv2d_stats(
    const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    c10::string_view activation, const std::optional<at::Tensor>& batch_invstd) {
  check_activation_input(x, "x");
  check_conv_args(x, weight, stride, padding, dilation, groups);
  const auto [oh, ow] = conv_output_size(x, weight, stride, padding, dilation);
  at::Tensor y = at::empty({x.size(0), weight.size(0), oh, ow},
                           x.options().dtype(weight.scalar_type()).memory_format(kernel_format(x)));
  auto [y_mean, y_var] = ops::norm_act_conv2d_into(x, mean, scale, shift, weight, bias, residual, stride, padding,
                                                   dilation, groups, activation, y, 0, true);
  return {y, y_mean, y_var};
}

// group_stats spread over channels: mean[n, c] = mean[n, g], scale[n, c] =
// rstd[n, g] * weight[c], shift[n, c] = bias[c].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_affine(
    const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  check_group_norm_params(x, weight, bias, eps);
  const auto [mean, var] = ops::group_stats(x, num_groups);
  const int64_t n = x.size(0), c = x.size(1);
  at::Tensor rstd = (var + eps).rsqrt();
  at::Tensor scale = rstd.repeat_interleave(c / num_groups, 1);
  // In place and by copy_: an op below autograd must not return its input,
  // which Tensor::to does when the dtype already matches.
  if (weight.has_value()) scale.mul_(*weight);
  at::Tensor shift = at::zeros_like(scale);
  if (bias.has_value()) shift.copy_(bias->expand({n, c}));
  return {mean.repeat_interleave(c / num_groups, 1), std::move(scale), std::move(shift), std::move(rstd)};
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CompositeExplicitAutograd, m) {
  m.impl("norm_act_conv2d_stats", &norm_act_conv2d_stats);
  m.impl("group_norm_affine", &group_norm_affine);
}

}  // namespace resfast
