// group_norm_affine for every backend without a kernel of its own (the CPU
// has one, in cpu/group_norm.cpp), and its autograd: GroupNorm's (N, G)
// statistics (the group_stats op) spread into the (N, C) mean, scale and
// shift the fused conv unit applies in its prologue. One op and one autograd
// node instead of a handful of Python-level ops with a node each: at small
// shapes a GN→act→conv unit spent more time in that glue than in its
// GroupNorm passes.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "common/checks.h"

namespace resfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_affine(
    const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  static const auto group_stats = c10::Dispatcher::singleton()
                                      .findSchemaOrThrow("resfast::group_stats", "")
                                      .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>();
  check_group_norm_params(x, weight, bias, eps);
  const auto [mean, var] = group_stats.call(x, num_groups);
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

at::Tensor converted(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// scale[n, c] = rstd[n, g] * weight[c] and shift[n, c] = bias[c] carry the
// parameters' gradients; mean and rstd, x's statistics, carry none (the
// consumer's batch_invstd accounts for them).
class GroupNormAffine : public torch::autograd::Function<GroupNormAffine> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, int64_t num_groups,
                               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                               double eps) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("resfast::group_norm_affine", "")
                               .typed<decltype(group_norm_affine)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [mean, scale, shift, rstd] = op.call(x, num_groups, weight, bias, eps);
    ctx->save_for_backward({rstd});
    // Absent (or undefined) parameters are not autograd inputs: no dtype saved.
    const auto dtype_of = [](const std::optional<at::Tensor>& t) {
      return t.has_value() && t->defined() ? c10::IValue(t->scalar_type()) : c10::IValue();
    };
    ctx->saved_data["weight_dtype"] = dtype_of(weight);
    ctx->saved_data["bias_dtype"] = dtype_of(bias);
    ctx->mark_non_differentiable({mean, rstd});
    return {mean, scale, shift, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor rstd = ctx->get_saved_variables()[0];
    const at::Tensor &grad_scale = grads[1], &grad_shift = grads[2];
    const int64_t channels = grad_scale.defined() ? grad_scale.size(1) : grad_shift.size(1);
    const auto grad_of = [&](const at::Tensor& grad, const at::Tensor& factor, const char* dtype_key) {
      const c10::IValue& dtype = ctx->saved_data[dtype_key];
      if (!grad.defined()) return at::zeros({channels}, rstd.options().dtype(dtype.toScalarType()));
      return converted((factor.defined() ? grad * factor : grad).sum(0), dtype.toScalarType());
    };
    // needs_input_grad counts the tensors passed: x is 0, then weight and
    // bias if present.
    const bool has_weight = !ctx->saved_data["weight_dtype"].isNone();
    at::Tensor grad_weight, grad_bias;
    if (has_weight && ctx->needs_input_grad(1)) {
      grad_weight = grad_of(grad_scale, rstd.repeat_interleave(channels / rstd.size(1), 1), "weight_dtype");
    }
    const bool has_bias = !ctx->saved_data["bias_dtype"].isNone();
    if (has_bias && ctx->needs_input_grad(has_weight ? 2 : 1)) {
      grad_bias = grad_of(grad_shift, at::Tensor(), "bias_dtype");
    }
    return {at::Tensor(), at::Tensor(), grad_weight, grad_bias, at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_affine_autograd(
    const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  const auto out = GroupNormAffine::apply(x, num_groups, weight, bias, eps);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CompositeExplicitAutograd, m) {
  m.impl("group_norm_affine", &group_norm_affine);
}

TORCH_LIBRARY_IMPL(resfast, Autograd, m) {
  m.impl("group_norm_affine", &group_norm_affine_autograd);
}

}  // namespace resfast
