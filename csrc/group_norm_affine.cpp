// group_norm_affine for every backend, and its autograd: GroupNorm's (N, G)
// statistics (the group_stats op) spread into the (N, C) mean, scale and shift
// the fused conv unit applies in its prologue. The few small tensor ops run
// here in C++, under one autograd node, instead of as a dozen Python-level
// ops with a dozen nodes: a GN→act→conv unit at small shapes spent more time
// in that glue than in its GroupNorm passes.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace resfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct GroupAffine {
  at::Tensor group_mean, group_rstd;  // (N, G)
  at::Tensor mean, scale, shift;      // (N, C)
};

GroupAffine group_affine(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias, double eps) {
  static const auto group_stats = c10::Dispatcher::singleton()
                                      .findSchemaOrThrow("resfast::group_stats", "")
                                      .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>();
  auto [mean, var] = group_stats.call(x, num_groups);
  const int64_t n = x.size(0), c = x.size(1);
  at::Tensor rstd = (var + eps).rsqrt();
  at::Tensor scale = rstd.repeat_interleave(c / num_groups, 1);
  if (weight.has_value()) scale.mul_(*weight);
  at::Tensor shift = at::zeros_like(scale);
  if (bias.has_value()) shift.copy_(bias->expand({n, c}));
  at::Tensor mean_nc = mean.repeat_interleave(c / num_groups, 1);
  return {std::move(mean), std::move(rstd), std::move(mean_nc), std::move(scale), std::move(shift)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_affine(const at::Tensor& x, int64_t num_groups,
                                                                 const std::optional<at::Tensor>& weight,
                                                                 const std::optional<at::Tensor>& bias, double eps) {
  GroupAffine a = group_affine(x, num_groups, weight, bias, eps);
  return {a.mean, a.scale, a.shift};
}

// t in dtype. Not Tensor::to, which returns t itself when the dtype matches:
// an op below autograd must not return its input.
at::Tensor converted(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// (N, C) -> (N, G): the sum over each group's channels.
at::Tensor sum_per_group(const at::Tensor& t, int64_t groups) {
  return t.reshape({t.size(0), groups, -1}).sum(2);
}

class GroupNormAffine : public torch::autograd::Function<GroupNormAffine> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, int64_t num_groups,
                               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                               double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    GroupAffine a = group_affine(x, num_groups, weight, bias, eps);
    ctx->save_for_backward({x, a.group_mean, a.group_rstd, weight.value_or(at::Tensor())});
    ctx->saved_data["bias_dtype"] = bias.has_value() ? c10::IValue(bias->scalar_type()) : c10::IValue();
    return {a.mean, a.scale, a.shift};
  }

  // mean[n, c] = mean[n, g], scale[n, c] = rstd[n, g] * weight[c] with
  // rstd = (var + eps)^-1/2, shift[n, c] = bias[c]; x's gradient comes from
  // group_stats_backward given those of the group mean and variance.
  // needs_input_grad counts tensor arguments only: x 0, weight 1, bias 2.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto stats_backward =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("resfast::group_stats_backward", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &mean = saved[1], &rstd = saved[2], &weight = saved[3];
    const at::Tensor &grad_mean_nc = grads[0], &grad_scale = grads[1], &grad_shift = grads[2];
    const int64_t groups = mean.size(1), per_group = x.size(1) / groups;
    at::Tensor grad_x, grad_weight, grad_bias;
    if (ctx->needs_input_grad(0)) {
      const at::Tensor grad_mean = grad_mean_nc.defined() ? sum_per_group(grad_mean_nc, groups) : at::zeros_like(mean);
      at::Tensor grad_var = at::zeros_like(mean);
      if (grad_scale.defined()) {
        const at::Tensor grad_rstd =
            sum_per_group(weight.defined() ? grad_scale * weight : grad_scale, groups);
        grad_var = grad_rstd * rstd.pow(3) * -0.5;
      }
      grad_x = stats_backward.call(x, mean, grad_mean, grad_var);
    }
    if (weight.defined() && ctx->needs_input_grad(1)) {
      grad_weight = grad_scale.defined()
                        ? converted((grad_scale * rstd.repeat_interleave(per_group, 1)).sum(0), weight.scalar_type())
                        : at::zeros_like(weight);
    }
    const c10::IValue& bias_dtype = ctx->saved_data["bias_dtype"];
    if (!bias_dtype.isNone() && ctx->needs_input_grad(2)) {
      grad_bias = grad_shift.defined() ? converted(grad_shift.sum(0), bias_dtype.toScalarType())
                                       : at::zeros({x.size(1)}, x.options().dtype(bias_dtype.toScalarType()));
    }
    return {grad_x, at::Tensor(), grad_weight, grad_bias, at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_affine_autograd(const at::Tensor& x, int64_t num_groups,
                                                                          const std::optional<at::Tensor>& weight,
                                                                          const std::optional<at::Tensor>& bias,
                                                                          double eps) {
  const auto out = GroupNormAffine::apply(x, num_groups, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CompositeExplicitAutograd, m) {
  m.impl("group_norm_affine", &group_norm_affine);
}

TORCH_LIBRARY_IMPL(resfast, Autograd, m) {
  m.impl("group_norm_affine", &group_norm_affine_autograd);
}

}  // namespace resfast
