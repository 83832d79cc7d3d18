#include "checks.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>

#include "layout.h"

namespace resfast {
namespace {

void check_eps(double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "eps: expected a finite number >= 0, got ", eps);
}

}  // namespace

Activation parse_activation(c10::string_view activation) {
  if (activation == "identity") return Activation::Identity;
  if (activation == "relu") return Activation::ReLU;
  if (activation == "silu") return Activation::SiLU;
  if (activation == "relu6") return Activation::ReLU6;
  TORCH_CHECK_VALUE(false, "activation: expected 'identity', 'relu', 'relu6' or 'silu', got '",
                    std::string(activation), "'");
}

void check_same_device(const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, ": expected a tensor on ", x.device(), " like x, got one on ",
                    t.device());
}

void check_activation_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.dim() == 4 || x.dim() == 5, name,
                    ": expected a 4-D (N, C, H, W) or 5-D (N, C, D, H, W) tensor, got ", x.dim(), "-D with shape ",
                    x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble,
                   name, ": expected float32, float16, bfloat16 or float64, got ", t);
}

void check_channel_vector(const at::Tensor& x, const std::optional<at::Tensor>& t, const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == x.size(1), name, ": expected shape (", x.size(1),
                    ",) for input of shape ", x.sizes(), ", got ", t->sizes());
  check_same_device(x, *t, name);
}

void check_batch_norm_args(const at::Tensor& x, const std::optional<at::Tensor>& running_mean,
                           const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& bn_weight,
                           const std::optional<at::Tensor>& bn_bias, bool training, double momentum, double eps) {
  check_activation_input(x, "x");
  check_eps(eps);
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
  if (training) {
    TORCH_CHECK_VALUE(x.size(0) * spatial_numel(x) != 1,
                      "Expected more than 1 value per channel when training, got input size ", x.sizes());
  }
}

bool check_batch_stats(const at::Tensor& x, const std::optional<at::Tensor>& batch_mean,
                       const std::optional<at::Tensor>& batch_var) {
  if (!batch_mean.has_value() && !batch_var.has_value()) return false;
  const auto acc = accumulation_type(x.scalar_type());
  for (const auto* t : {&batch_mean, &batch_var}) {
    TORCH_CHECK_VALUE(t->has_value() && (*t)->dim() == 1 && (*t)->size(0) == x.size(1) &&
                          (*t)->scalar_type() == acc && (*t)->device() == x.device(),
                      "batch_stats ", t == &batch_mean ? "mean" : "var", ": expected a (", x.size(1), ",) ", acc,
                      " tensor on ", x.device());
  }
  return true;
}

at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_norm_params(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                       const at::Tensor& shift) {
  const int64_t n = x.size(0), c = x.size(1);
  const auto acc = accumulation_type(x.scalar_type());
  const std::pair<const at::Tensor*, const char*> params[] = {
      {&mean, "mean"}, {&scale, "scale"}, {&shift, "shift"}};
  for (const auto& [p, name] : params) {
    const bool per_channel = p->dim() == 1 && p->size(0) == c;
    const bool per_sample = p->dim() == 2 && p->size(0) == n && p->size(1) == c;
    TORCH_CHECK_VALUE(per_channel || per_sample, name, ": expected shape (", c, ",) or (", n, ", ",
                      c, ") for input of shape ", x.sizes(), ", got ", p->sizes());
    TORCH_CHECK_TYPE(p->scalar_type() == acc, name, ": expected dtype ", acc, " for input dtype ",
                     x.scalar_type(), ", got ", p->scalar_type());
    check_same_device(x, *p, name);
  }
  TORCH_CHECK_VALUE(mean.sizes() == scale.sizes() && scale.sizes() == shift.sizes(),
                    "mean, scale and shift: expected one shape, got ", mean.sizes(), ", ",
                    scale.sizes(), ", ", shift.sizes());
}

void check_group_norm_affine(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias) {
  const auto acc = accumulation_type(x.scalar_type());
  const std::pair<const std::optional<at::Tensor>*, const char*> vectors[] = {{&weight, "weight"}, {&bias, "bias"}};
  for (const auto& [t, name] : vectors) {
    if (!t->has_value()) continue;
    check_channel_vector(x, *t, name);
    const auto dtype = (*t)->scalar_type();
    TORCH_CHECK_TYPE(dtype == x.scalar_type() || dtype == acc, name, ": expected dtype ", x.scalar_type(), " or ",
                     acc, ", got ", dtype);
  }
}

void check_group_norm_params(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias, double eps) {
  check_group_norm_affine(x, weight, bias);
  check_eps(eps);
}

void check_stats_backward_args(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& grad_mean,
                               const at::Tensor& grad_var) {
  const int64_t c = x.size(1);
  const auto acc = accumulation_type(x.scalar_type());
  const std::pair<const at::Tensor*, const char*> vectors[] = {
      {&mean, "mean"}, {&grad_mean, "grad_mean"}, {&grad_var, "grad_var"}};
  for (const auto& [t, name] : vectors) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == c, name, ": expected shape (", c, ",), got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == acc, name, ": expected dtype ", acc, ", got ", t->scalar_type());
    check_same_device(x, *t, name);
  }
}

void check_conv_args(const at::Tensor& x, const at::Tensor& weight, c10::IntArrayRef stride,
                     c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  const int64_t dims = x.dim() - 2;
  TORCH_CHECK_VALUE(weight.dim() == x.dim(), "weight: expected a ", x.dim(), "-D (out_channels, in_channels/groups, ",
                    dims == 2 ? "kH, kW" : "kD, kH, kW", ") tensor for ", x.dim(), "-D input, got shape ",
                    weight.sizes());
  check_same_device(x, weight, "weight");
  TORCH_CHECK_VALUE(groups > 0, "groups: expected a positive integer, got ", groups);
  TORCH_CHECK_VALUE(x.size(1) % groups == 0 && weight.size(0) % groups == 0,
                    "groups: expected to divide in_channels (", x.size(1), ") and out_channels (",
                    weight.size(0), "), got ", groups);
  TORCH_CHECK_VALUE(weight.size(1) * groups == x.size(1), "weight: expected in_channels/groups = ",
                    x.size(1) / groups, " in dim 1 for input of shape ", x.sizes(), ", got shape ",
                    weight.sizes());
  const char* count = dims == 2 ? "two" : "three";
  const auto all = [dims](c10::IntArrayRef v, int64_t low) {
    return static_cast<int64_t>(v.size()) == dims && std::all_of(v.begin(), v.end(), [low](int64_t e) { return e >= low; });
  };
  TORCH_CHECK_VALUE(all(stride, 1), "stride: expected ", count, " positive integers, got ", stride);
  TORCH_CHECK_VALUE(all(padding, 0), "padding: expected ", count, " non-negative integers, got ", padding);
  TORCH_CHECK_VALUE(all(dilation, 1), "dilation: expected ", count, " positive integers, got ", dilation);
  const auto out_size = conv_output_size(x, weight, stride, padding, dilation);
  TORCH_CHECK_VALUE(*std::min_element(out_size.begin(), out_size.end()) > 0, "input: spatial size ", x.sizes(),
                    " (padded) is smaller than the dilated kernel ", weight.sizes());
}

void check_compute_dtype(const at::Tensor& x, const at::Tensor& weight) {
  const auto xt = x.scalar_type(), wt = weight.scalar_type();
  const bool autocast_pair = xt == at::kFloat && (wt == at::kHalf || wt == at::kBFloat16);
  TORCH_CHECK_TYPE(xt == wt || autocast_pair, "weight: expected dtype ", xt,
                   " (or float16/bfloat16 with float32 input), got ", wt);
}

}  // namespace resfast
