// The ops composed of other resfast ops, written once for every device
// (CompositeExplicitAutograd); a backend may register a faster kernel of its
// own (the CPU has both). resfast.backend runs these same kernels with its
// inner ops switched, and their autograd is in autograd.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "common/checks.h"
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
  at::Tensor scale = rstd.repeat_interleave(c / num_groups, 1);
  // In place and by copy_: an op below autograd must not return its input,
  // which Tensor::to does when the dtype already matches.
  if (weight.has_value()) scale.mul_(*weight);
  at::Tensor shift = at::zeros_like(scale);
  if (bias.has_value()) shift.copy_(bias->expand({n, c}));
  return {mean.repeat_interleave(c / num_groups, 1), std::move(scale), std::move(shift), std::move(rstd)};
}

// A (C,) vector for x's channels, on x's device.
void check_channel_vector(const at::Tensor& x, const std::optional<at::Tensor>& t, const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == x.size(1), name, ": expected shape (", x.size(1),
                    ",) for input of shape ", x.sizes(), ", got ", t->sizes());
  TORCH_CHECK_VALUE(t->device() == x.device(), name, ": expected a tensor on ", x.device(), " like x, got one on ",
                    t->device());
}

// F.batch_norm's normalisation as the unit's (mean, scale, shift, invstd).
// One op instead of a dozen tensor calls from Python per unit: at CIFAR-size
// layers they cost more than the convolution.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_affine(
    const at::Tensor& x, const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias, bool training,
    double momentum, double eps, const std::optional<at::Tensor>& batch_mean,
    const std::optional<at::Tensor>& batch_var) {
  check_activation_input(x, "x");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "eps: expected a finite number >= 0, got ", eps);
  if (training && running_mean.has_value()) {
    TORCH_CHECK_VALUE(std::isfinite(momentum), "momentum: expected a finite number, got ", momentum);
  }
  const std::pair<const std::optional<at::Tensor>*, const char*> vectors[] = {
      {&running_mean, "running_mean"}, {&running_var, "running_var"}, {&bn_weight, "bn_weight"}, {&bn_bias, "bn_bias"}};
  for (const auto& [t, name] : vectors) check_channel_vector(x, *t, name);
  TORCH_CHECK_VALUE(training || (running_mean.has_value() && running_var.has_value()),
                    "running_mean, running_var: expected tensors when training=False");
  TORCH_CHECK_VALUE(running_mean.has_value() == running_var.has_value(),
                    "running_mean, running_var: expected both or neither");
  const auto acc = accumulation_type(x.scalar_type());
  at::Tensor mean, invstd;
  if (training) {
    const int64_t count = x.size(0) * x.size(2) * x.size(3);
    TORCH_CHECK_VALUE(count != 1, "Expected more than 1 value per channel when training, got input size ",
                      x.sizes());
    at::Tensor var;
    if (batch_mean.has_value() || batch_var.has_value()) {
      for (const auto* t : {&batch_mean, &batch_var}) {
        TORCH_CHECK_VALUE(t->has_value() && (*t)->sizes() == at::IntArrayRef{x.size(1)} &&
                              (*t)->scalar_type() == acc && (*t)->device() == x.device(),
                          "batch_stats ", t == &batch_mean ? "mean" : "var", ": expected a (", x.size(1), ",) ", acc,
                          " tensor on ", x.device());
      }
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

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CompositeExplicitAutograd, m) {
  m.impl("group_norm_affine", &group_norm_affine);
  m.impl("batch_norm_affine", &batch_norm_affine);
}

}  // namespace resfast
