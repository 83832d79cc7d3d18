// The ops composed of other resfast ops, written once for every device:
// CompositeExplicitAutograd ones (a backend may register a faster kernel of
// its own: the CPU has both; their autograd is in autograd.cpp, and
// resfast.backend runs these same kernels with its inner ops switched), and
// CompositeImplicitAutograd ones, which autograd sees through.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "common/checks.h"
#include "common/layout.h"
#include "ops.h"

namespace resfast {
namespace {

// group_stats spread over channels: mean[n, c] = mean[n, g], scale[n, c] =
// rstd[n, g] * weight[c], shift[n, c] = bias[c].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_affine(
    const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  check_group_norm_params(x, weight, bias, eps);
  const auto [mean, var] = ops::group_stats(x, num_groups);
  const int64_t n = x.size(0), c = x.size(1);
  at::Tensor rstd = (var + eps).rsqrt();
  // Each group's value over its channels, in a fresh tensor (never a view of
  // t): a broadcast copy, cheaper than repeat_interleave's index op.
  const auto spread = [&](const at::Tensor& t) {
    at::Tensor out = at::empty({n, num_groups, c / num_groups}, t.options());
    out.copy_(t.unsqueeze(2));
    return out.view({n, c});
  };
  at::Tensor scale = spread(rstd);
  // In place and by copy_: an op below autograd must not return its input,
  // which Tensor::to does when the dtype already matches.
  if (weight.has_value()) scale.mul_(*weight);
  at::Tensor shift = at::zeros_like(scale);
  if (bias.has_value()) shift.copy_(bias->expand({n, c}));
  return {spread(mean), std::move(scale), std::move(shift), std::move(rstd)};
}

// F.batch_norm's normalisation as the unit's (mean, scale, shift, invstd).
// One op instead of a dozen tensor calls from Python per unit: at CIFAR-size
// layers they cost more than the convolution.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_affine(
    const at::Tensor& x, const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias, bool training,
    double momentum, double eps, const std::optional<at::Tensor>& batch_mean,
    const std::optional<at::Tensor>& batch_var) {
  check_batch_norm_args(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps);
  const auto acc = accumulation_type(x.scalar_type());
  at::Tensor mean, invstd;
  if (training) {
    const int64_t count = x.size(0) * spatial_numel(x);
    at::Tensor var;
    if (check_batch_stats(x, batch_mean, batch_var)) {
      mean = batch_mean->clone();
      var = *batch_var;
    } else {
      std::tie(mean, var) = ops::channel_stats(x);
    }
    if (running_mean.has_value()) {
      running_mean->mul_(1 - momentum).add_(mean.to(running_mean->scalar_type()), momentum);
      const double unbiased = static_cast<double>(count) / static_cast<double>(count - 1);
      running_var->mul_(1 - momentum).add_((var * unbiased).to(running_var->scalar_type()), momentum);
    }
    invstd = (var + eps).rsqrt();
  } else {
    mean = running_mean->to(acc, /*non_blocking=*/false, /*copy=*/true);
    invstd = (running_var->to(acc) + eps).rsqrt();
  }
  // Fresh tensors throughout: an op's outputs alias neither its inputs nor each other.
  at::Tensor scale = bn_weight.has_value() ? bn_weight->to(acc) * invstd : invstd.clone();
  at::Tensor shift = bn_bias.has_value() ? bn_bias->to(acc, false, /*copy=*/true) : at::zeros_like(mean);
  return {std::move(mean), std::move(scale), std::move(shift), std::move(invstd)};
}

// The unit's own arguments (convolution, activation, bias and residual
// devices), checked before the normalisation runs, as the Python entry points
// do: a bad one must fail before the running statistics are updated, and a
// residual on another device would otherwise send the call to that device's
// kernel.
void check_unit_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& residual, c10::IntArrayRef stride, c10::IntArrayRef padding,
                     c10::IntArrayRef dilation, int64_t groups, c10::string_view activation) {
  check_activation_input(x, "x");
  check_conv_args(x, weight, stride, padding, dilation, groups);
  parse_activation(activation);
  if (bias.has_value()) check_same_device(x, *bias, "bias");
  if (residual.has_value()) check_same_device(x, *residual, "residual");
}

// The unit from a BatchNorm's arguments.
at::Tensor batch_norm_act_conv2d(const at::Tensor& x, const std::optional<at::Tensor>& running_mean,
                                 const std::optional<at::Tensor>& running_var,
                                 const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                                 bool training, double momentum, double eps, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                                 c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                 int64_t groups, c10::string_view activation,
                                 const std::optional<at::Tensor>& batch_mean,
                                 const std::optional<at::Tensor>& batch_var) {
  check_unit_args(x, weight, bias, residual, stride, padding, dilation, groups, activation);
  auto [mean, scale, shift, invstd] = ops::batch_norm_affine(x, running_mean, running_var, bn_weight, bn_bias,
                                                             training, momentum, eps, batch_mean, batch_var);
  return ops::norm_act_conv2d(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups,
                              activation, training ? std::optional<at::Tensor>(invstd) : std::nullopt);
}

at::Tensor group_norm_act_conv2d(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& norm_weight,
                                 const std::optional<at::Tensor>& norm_bias, double eps, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                                 c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                 int64_t groups, c10::string_view activation) {
  check_unit_args(x, weight, bias, residual, stride, padding, dilation, groups, activation);
  auto [mean, scale, shift, rstd] = ops::group_norm_affine(x, num_groups, norm_weight, norm_bias, eps);
  return ops::norm_act_conv2d(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups,
                              activation, rstd);
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CompositeImplicitAutograd, m) {
  m.impl("batch_norm_act_conv2d", &batch_norm_act_conv2d);
  m.impl("group_norm_act_conv2d", &group_norm_act_conv2d);
}

TORCH_LIBRARY_IMPL(resfast, CompositeExplicitAutograd, m) {
  m.impl("group_norm_affine", &group_norm_affine);
  m.impl("batch_norm_affine", &batch_norm_affine);
}

}  // namespace resfast
