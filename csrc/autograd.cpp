// Autograd of the differentiable ops (norm_act_conv2d and its _stats twin,
// norm_act_max_pool2d, group_norm, group_norm_affine and the statistics ops), in C++:
// they run once per unit per step, and a Python autograd wrapper cost
// ~0.3 ms a call (5% of a ResNet-200 CPU training step; a third of a small
// GroupNorm's). The backward is written in terms of registered ops, so every
// backend (and resfast.backend's dispatch mode) serves it, and torch.compile
// traces it through the fake kernels.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include "ops.h"

namespace resfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::compute_requires_grad;
using torch::autograd::variable_list;

// Whether any tensor argument carries a forward-mode gradient (dual tensor).
bool has_forward_grad(const at::Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }
bool has_forward_grad(const std::optional<at::Tensor>& t) { return t.has_value() && has_forward_grad(*t); }
template <typename... Tensors>
bool any_forward_grad(const Tensors&... ts) {
  return (has_forward_grad(ts) || ...);
}

// Function::apply builds its context (saved tensors and arguments) even when
// nothing will be differentiated: several microseconds a call, more than a
// small unit's normalisation. Without a gradient to record (grad mode off,
// or no input requiring one) and no forward-mode gradient (which apply
// rejects, as it should), each kernel below calls its op directly.
#define RESFAST_UNRECORDED(call, ...)                                              \
  if (!compute_requires_grad(__VA_ARGS__) && !any_forward_grad(__VA_ARGS__)) {     \
    const at::AutoDispatchBelowADInplaceOrView below_autograd;                     \
    return call;                                                                   \
  }

// What the unit's backward needs: x, the per-channel vectors and the weight
// (act(z) is recomputed), and the non-tensor arguments.
void save_unit(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
               const at::Tensor& shift, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
               const std::optional<at::Tensor>& residual, c10::IntArrayRef stride, c10::IntArrayRef padding,
               c10::IntArrayRef dilation, int64_t groups, c10::string_view activation,
               const std::optional<at::Tensor>& batch_invstd) {
  ctx->save_for_backward({x, mean, scale, shift, weight, batch_invstd.value_or(at::Tensor())});
  ctx->saved_data["stride"] = stride.vec();
  ctx->saved_data["padding"] = padding.vec();
  ctx->saved_data["dilation"] = dilation.vec();
  ctx->saved_data["groups"] = groups;
  ctx->saved_data["activation"] = std::string(activation);
  ctx->saved_data["bias_dtype"] = bias.has_value() ? bias->scalar_type() : weight.scalar_type();
  // needs_input_grad counts only the tensors passed: absent optionals shift
  // the indices of those after them.
  ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
  ctx->saved_data["has_residual"] = residual.has_value() && residual->defined();
}

variable_list unit_backward(AutogradContext* ctx, const at::Tensor& grad_out) {
  const auto saved = ctx->get_saved_variables();
  const at::Tensor &x = saved[0], &mean = saved[1], &scale = saved[2], &shift = saved[3], &weight = saved[4];
  const std::optional<at::Tensor> batch_invstd =
      saved[5].defined() ? std::optional<at::Tensor>(saved[5]) : std::nullopt;
  const auto stride = ctx->saved_data["stride"].toIntVector();
  const auto padding = ctx->saved_data["padding"].toIntVector();
  const auto dilation = ctx->saved_data["dilation"].toIntVector();
  const std::string activation = ctx->saved_data["activation"].toStringRef();

  at::Tensor grad_x, grad_mean, grad_scale, grad_shift, grad_weight, grad_bias, grad_residual;
  const bool want_input = ctx->needs_input_grad(0) || ctx->needs_input_grad(1) || ctx->needs_input_grad(2) ||
                          ctx->needs_input_grad(3);
  const bool want_weight = ctx->needs_input_grad(4);
  if (want_input || want_weight) {
    std::tie(grad_x, grad_scale, grad_shift, grad_weight) =
        ops::norm_act_conv2d_backward(grad_out, x, mean, scale, shift, weight, stride, padding, dilation,
                      ctx->saved_data["groups"].toInt(), activation, batch_invstd, {want_input, want_weight});
    if (ctx->needs_input_grad(1)) grad_mean = -scale * grad_shift;
  }
  const bool has_bias = ctx->saved_data["has_bias"].toBool();
  if (has_bias && ctx->needs_input_grad(5)) {
    const auto acc = grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    std::vector<int64_t> reduced{0};
    for (int64_t d = 2; d < grad_out.dim(); ++d) reduced.push_back(d);
    grad_bias = grad_out.sum(reduced, false, acc).to(ctx->saved_data["bias_dtype"].toScalarType());
  }
  if (ctx->saved_data["has_residual"].toBool() && ctx->needs_input_grad(has_bias ? 6 : 5)) {
    grad_residual = grad_out;
  }
  return {grad_x, grad_mean, grad_scale, grad_shift, grad_weight, grad_bias, grad_residual,
          at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
}

// The unit; WithStats: with its output's statistics as two non-differentiable
// outputs (norm_act_conv2d_stats).
template <bool WithStats>
class NormActConv2dUnit : public torch::autograd::Function<NormActConv2dUnit<WithStats>> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& mean,
                               const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                               c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                               int64_t groups, c10::string_view activation,
                               const std::optional<at::Tensor>& batch_invstd) {
    at::AutoDispatchBelowADInplaceOrView guard;
    save_unit(ctx, x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups, activation,
              batch_invstd);
    if constexpr (WithStats) {
      auto [y, y_mean, y_var] = ops::norm_act_conv2d_stats(x, mean, scale, shift, weight, bias, residual, stride,
                                                           padding, dilation, groups, activation, batch_invstd);
      ctx->mark_non_differentiable({y_mean, y_var});
      return {y, y_mean, y_var};
    } else {
      return {ops::norm_act_conv2d(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups,
                                   activation, batch_invstd)};
    }
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) { return unit_backward(ctx, grads[0]); }
};

std::optional<at::Tensor> present(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// act(group_norm(x)); the statistics are non-differentiable outputs. Only x
// and the (N, G) statistics are saved: act's input is recomputed from x.
class GroupNorm : public torch::autograd::Function<GroupNorm> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, int64_t num_groups,
                               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                               double eps, c10::string_view activation) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, rstd] = ops::group_norm(x, num_groups, weight, bias, eps, activation);
    ctx->save_for_backward({x, mean, rstd, weight.value_or(at::Tensor()), bias.value_or(at::Tensor())});
    ctx->saved_data["activation"] = std::string(activation);
    ctx->mark_non_differentiable({mean, rstd});
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &mean = saved[1], &rstd = saved[2];
    const std::optional<at::Tensor> weight = present(saved[3]), bias = present(saved[4]);
    // needs_input_grad counts only the tensors passed (x, then the present optionals).
    const int64_t weight_index = 1, bias_index = weight.has_value() ? 2 : 1;
    const bool want_weight = weight.has_value() && ctx->needs_input_grad(weight_index);
    const bool want_bias = bias.has_value() && ctx->needs_input_grad(bias_index);
    const at::Tensor grad_y = grads[0].defined() ? grads[0] : at::zeros_like(x);
    auto [grad_x, grad_weight, grad_bias] =
        ops::group_norm_backward(grad_y, x, mean, rstd, weight, bias, ctx->saved_data["activation"].toStringRef(),
                                 {ctx->needs_input_grad(0), want_weight, want_bias});
    return {grad_x, at::Tensor(), grad_weight, grad_bias, at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_autograd(const at::Tensor& x, int64_t num_groups,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   double eps, c10::string_view activation) {
  RESFAST_UNRECORDED(ops::group_norm(x, num_groups, weight, bias, eps, activation), x, weight, bias);
  const auto out = GroupNorm::apply(x, num_groups, weight, bias, eps, activation);
  return {out[0], out[1], out[2]};
}

// grad_x of a (mean, var) statistics op that saved (x, mean); an absent
// gradient is zero.
template <typename StatsBackward>
at::Tensor stats_backward(const StatsBackward& op, AutogradContext* ctx, const variable_list& grads) {
  const auto saved = ctx->get_saved_variables();
  const at::Tensor &x = saved[0], &mean = saved[1];
  const auto or_zeros = [&](const at::Tensor& g) { return g.defined() ? g.contiguous() : at::zeros_like(mean); };
  return op(x, mean, or_zeros(grads[0]), or_zeros(grads[1]));
}

class ChannelStats : public torch::autograd::Function<ChannelStats> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [mean, var] = ops::channel_stats(x);
    ctx->save_for_backward({x, mean});
    return {mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {stats_backward(ops::channel_stats_backward, ctx, grads)};
  }
};

class GroupStats : public torch::autograd::Function<GroupStats> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, int64_t num_groups) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [mean, var] = ops::group_stats(x, num_groups);
    ctx->save_for_backward({x, mean});
    return {mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {stats_backward(ops::group_stats_backward, ctx, grads), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> channel_stats_autograd(const at::Tensor& x) {
  RESFAST_UNRECORDED(ops::channel_stats(x), x);
  const auto out = ChannelStats::apply(x);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> group_stats_autograd(const at::Tensor& x, int64_t num_groups) {
  RESFAST_UNRECORDED(ops::group_stats(x, num_groups), x);
  const auto out = GroupStats::apply(x, num_groups);
  return {out[0], out[1]};
}

at::Tensor norm_act_conv2d_autograd(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                                    const at::Tensor& shift, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias,
                                    const std::optional<at::Tensor>& residual, c10::IntArrayRef stride,
                                    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                                    c10::string_view activation, const std::optional<at::Tensor>& batch_invstd) {
  RESFAST_UNRECORDED(ops::norm_act_conv2d(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation,
                                          groups, activation, batch_invstd),
                     x, mean, scale, shift, weight, bias, residual);
  return NormActConv2dUnit<false>::apply(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation,
                                         groups, activation, batch_invstd)[0];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_act_conv2d_stats_autograd(
    const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    c10::string_view activation, const std::optional<at::Tensor>& batch_invstd) {
  RESFAST_UNRECORDED(ops::norm_act_conv2d_stats(x, mean, scale, shift, weight, bias, residual, stride, padding,
                                                dilation, groups, activation, batch_invstd),
                     x, mean, scale, shift, weight, bias, residual);
  const auto out = NormActConv2dUnit<true>::apply(x, mean, scale, shift, weight, bias, residual, stride, padding,
                                                  dilation, groups, activation, batch_invstd);
  return {out[0], out[1], out[2]};
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
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [mean, scale, shift, rstd] = ops::group_norm_affine(x, num_groups, weight, bias, eps);
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
    const auto grad_of = [&](const at::Tensor& grad, const char* dtype_key) {
      const c10::IValue& dtype = ctx->saved_data[dtype_key];
      if (!grad.defined()) return at::zeros({channels}, rstd.options().dtype(dtype.toScalarType()));
      return converted(grad.sum(0), dtype.toScalarType());
    };
    // needs_input_grad counts the tensors passed: x is 0, then weight and
    // bias if present.
    const bool has_weight = !ctx->saved_data["weight_dtype"].isNone();
    at::Tensor grad_weight, grad_bias;
    if (has_weight && ctx->needs_input_grad(1)) {
      // rstd[n, g] spread over g's channels by broadcasting, not by
      // repeat_interleave (an index op costing more than the rest of this).
      const int64_t n = rstd.size(0), groups = rstd.size(1);
      grad_weight = grad_of(grad_scale.defined() ? (grad_scale.reshape({n, groups, channels / groups}) *
                                                    rstd.unsqueeze(2)).reshape({n, channels})
                                                 : grad_scale,
                            "weight_dtype");
    }
    const bool has_bias = !ctx->saved_data["bias_dtype"].isNone();
    if (has_bias && ctx->needs_input_grad(has_weight ? 2 : 1)) {
      grad_bias = grad_of(grad_shift, "bias_dtype");
    }
    return {at::Tensor(), at::Tensor(), grad_weight, grad_bias, at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_affine_autograd(
    const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  RESFAST_UNRECORDED(ops::group_norm_affine(x, num_groups, weight, bias, eps), x, weight, bias);
  const auto out = GroupNormAffine::apply(x, num_groups, weight, bias, eps);
  return {out[0], out[1], out[2], out[3]};
}

// scale = bn_weight * invstd and shift = bn_bias carry the parameters'
// gradients; mean and invstd, statistics (or buffers), carry none (in training
// the consumer's batch_invstd accounts for them).
class BatchNormAffine : public torch::autograd::Function<BatchNormAffine> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var,
                               const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                               bool training, double momentum, double eps,
                               const std::optional<at::Tensor>& batch_mean,
                               const std::optional<at::Tensor>& batch_var) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [mean, scale, shift, invstd] = ops::batch_norm_affine(x, running_mean, running_var, bn_weight, bn_bias,
                                                               training, momentum, eps, batch_mean, batch_var);
    ctx->save_for_backward({invstd});
    // needs_input_grad counts only the tensors passed: absent optionals
    // shift the indices of those after them.
    const auto present = [](const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); };
    const int64_t weight_index = 1 + present(running_mean) + present(running_var);
    ctx->saved_data["weight_index"] = present(bn_weight) ? weight_index : int64_t(-1);
    ctx->saved_data["bias_index"] = present(bn_bias) ? weight_index + present(bn_weight) : int64_t(-1);
    ctx->saved_data["weight_dtype"] = present(bn_weight) ? c10::IValue(bn_weight->scalar_type()) : c10::IValue();
    ctx->saved_data["bias_dtype"] = present(bn_bias) ? c10::IValue(bn_bias->scalar_type()) : c10::IValue();
    ctx->mark_non_differentiable({mean, invstd});
    return {mean, scale, shift, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor invstd = ctx->get_saved_variables()[0];
    const int64_t weight_index = ctx->saved_data["weight_index"].toInt();
    const int64_t bias_index = ctx->saved_data["bias_index"].toInt();
    const auto grad_or_zeros = [&](const at::Tensor& grad) { return grad.defined() ? grad : at::zeros_like(invstd); };
    at::Tensor grad_weight, grad_bias;
    if (weight_index >= 0 && ctx->needs_input_grad(weight_index)) {
      grad_weight = (grad_or_zeros(grads[1]) * invstd).to(ctx->saved_data["weight_dtype"].toScalarType());
    }
    if (bias_index >= 0 && ctx->needs_input_grad(bias_index)) {
      grad_bias = grad_or_zeros(grads[2]).to(ctx->saved_data["bias_dtype"].toScalarType());
    }
    return {at::Tensor(), at::Tensor(), at::Tensor(), grad_weight, grad_bias, at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_affine_autograd(
    const at::Tensor& x, const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias, bool training,
    double momentum, double eps, const std::optional<at::Tensor>& batch_mean,
    const std::optional<at::Tensor>& batch_var) {
  RESFAST_UNRECORDED(ops::batch_norm_affine(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps,
                                            batch_mean, batch_var),
                     x, bn_weight, bn_bias);
  const auto out = BatchNormAffine::apply(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps,
                                          batch_mean, batch_var);
  return {out[0], out[1], out[2], out[3]};
}

// BatchNorm → act → max pool: x and the vectors saved, like the unit.
class NormActMaxPool2d : public torch::autograd::Function<NormActMaxPool2d> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& mean,
                               const at::Tensor& scale, const at::Tensor& shift, c10::IntArrayRef kernel_size,
                               c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                               bool ceil_mode, c10::string_view activation,
                               const std::optional<at::Tensor>& batch_invstd) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, mean, scale, shift, batch_invstd.value_or(at::Tensor())});
    ctx->saved_data["kernel_size"] = kernel_size.vec();
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["ceil_mode"] = ceil_mode;
    ctx->saved_data["activation"] = std::string(activation);
    return {ops::norm_act_max_pool2d(x, mean, scale, shift, kernel_size, stride, padding, dilation, ceil_mode,
                                     activation, batch_invstd)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &mean = saved[1], &scale = saved[2], &shift = saved[3];
    auto [grad_x, grad_scale, grad_shift] = ops::norm_act_max_pool2d_backward(
        grads[0], x, mean, scale, shift, ctx->saved_data["kernel_size"].toIntVector(),
        ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
        ctx->saved_data["dilation"].toIntVector(), ctx->saved_data["ceil_mode"].toBool(),
        ctx->saved_data["activation"].toStringRef(), present(saved[4]));
    at::Tensor grad_mean = ctx->needs_input_grad(1) ? -scale * grad_shift : at::Tensor();
    return {grad_x, grad_mean, grad_scale, grad_shift, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor norm_act_max_pool2d_autograd(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                                        const at::Tensor& shift, c10::IntArrayRef kernel_size,
                                        c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                        bool ceil_mode, c10::string_view activation,
                                        const std::optional<at::Tensor>& batch_invstd) {
  RESFAST_UNRECORDED(ops::norm_act_max_pool2d(x, mean, scale, shift, kernel_size, stride, padding, dilation,
                                              ceil_mode, activation, batch_invstd),
                     x, mean, scale, shift);
  return NormActMaxPool2d::apply(x, mean, scale, shift, kernel_size, stride, padding, dilation, ceil_mode, activation,
                                 batch_invstd)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, Autograd, m) {
  m.impl("norm_act_conv2d", &norm_act_conv2d_autograd);
  m.impl("norm_act_conv2d_stats", &norm_act_conv2d_stats_autograd);
  m.impl("group_norm", &group_norm_autograd);
  m.impl("channel_stats", &channel_stats_autograd);
  m.impl("group_stats", &group_stats_autograd);
  m.impl("group_norm_affine", &group_norm_affine_autograd);
  m.impl("batch_norm_affine", &batch_norm_affine_autograd);
  m.impl("norm_act_max_pool2d", &norm_act_max_pool2d_autograd);
}

}  // namespace resfast
