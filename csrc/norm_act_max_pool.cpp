// BatchNorm → activation → 2-D max pool (a ResNet stem's bn1 → relu →
// maxpool) as one op that saves only x and the per-channel vectors: eager
// keeps the activation and the pool's int64 indices (twice the pooled
// output's bytes) as well. Written once for every device in ATen ops.
//
// For a non-decreasing activation (identity, ReLU, ReLU6), act((x - mean) *
// scale + shift) is non-decreasing in x wherever scale >= 0, and each of its
// rounded steps is too, so the window's maximum of the normalised values is
// the normalised value of its maximum: the forward pools x and normalises only
// the pooled values, exactly. Channels with scale < 0 are pooled negated
// (their window minimum). Other activations (SiLU) are applied to the whole
// input before the pool. The CPU has a kernel of its own for NCHW input
// (csrc/cpu/norm_act_max_pool.cpp).
#include <ATen/ATen.h>
#include <ATen/native/Pool.h>
#include <torch/library.h>

#include "norm_act_max_pool.h"

#include "common/layout.h"

namespace resfast {
namespace {

at::Tensor activate(const at::Tensor& z, Activation activation) {
  switch (activation) {
    case Activation::ReLU: return at::relu(z);
    case Activation::ReLU6: return at::hardtanh(z, 0, 6);
    case Activation::SiLU: return at::silu(z);
    default: return z;
  }
}

// grad * act'(z), torch's own conventions at the kinks (0 at ReLU's 0 and ReLU6's 0 and 6).
at::Tensor activation_backward(const at::Tensor& grad, const at::Tensor& z, Activation activation) {
  switch (activation) {
    case Activation::ReLU: return at::threshold_backward(grad, z, 0);
    case Activation::ReLU6: return at::hardtanh_backward(grad, z, 0, 6);
    case Activation::SiLU: return at::silu_backward(grad, z);
    default: return grad;
  }
}

at::Tensor per_channel(const at::Tensor& v) { return v.view({1, v.size(0), 1, 1}); }

}  // namespace

// Every window along one dimension holds at least one element of x: ATen
// accepts dilated windows made only of padding (and returns -inf there),
// which the pool-first normalisation would turn into a finite value.
void check_windows(int64_t size, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation, bool ceil_mode,
                   const char* dim) {
  TORCH_CHECK_VALUE(kernel >= 1 && stride >= 1 && padding >= 0 && dilation >= 1 && 2 * padding <= kernel,
                    "kernel_size, stride, padding, dilation: expected kernel_size >= 1, stride >= 1, dilation >= 1 ",
                    "and 0 <= padding <= kernel_size / 2, got ", kernel, ", ", stride, ", ", padding, ", ", dilation);
  const int64_t out = at::native::pooling_output_shape<int64_t>(size, kernel, padding, stride, dilation, ceil_mode);
  for (int64_t o = 0; o < out; ++o) {
    bool covers = false;
    for (int64_t i = 0; i < kernel && !covers; ++i) {
      const int64_t at = o * stride - padding + i * dilation;
      covers = at >= 0 && at < size;
    }
    TORCH_CHECK_VALUE(covers, "kernel_size, padding and dilation: window ", o, " along ", dim,
                      " covers only padding (input size ", size, ")");
  }
}

void check_pool_args(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift,
                     c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
                     c10::IntArrayRef dilation, bool ceil_mode, c10::string_view activation,
                     const std::optional<at::Tensor>& batch_invstd) {
  check_activation_input(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 4, "x: expected a 4-D (N, C, H, W) tensor for a 2-D max pool, got ", x.dim(),
                    " dimensions");
  TORCH_CHECK_VALUE(kernel_size.size() == 2 && padding.size() == 2 && dilation.size() == 2 &&
                        (stride.empty() || stride.size() == 2),
                    "kernel_size, stride, padding and dilation: expected two ints each (stride may be empty)");
  for (int d = 0; d < 2; ++d) {
    check_windows(x.size(2 + d), kernel_size[d], stride.empty() ? kernel_size[d] : stride[d], padding[d],
                  dilation[d], ceil_mode, d == 0 ? "height" : "width");
  }
  check_norm_params(x, mean, scale, shift);
  TORCH_CHECK_VALUE(mean.dim() == 1, "mean, scale and shift: expected per-channel (", x.size(1),
                    ",) vectors (BatchNorm's), got ", mean.sizes());
  parse_activation(activation);
  if (batch_invstd.has_value()) {
    TORCH_CHECK_VALUE(batch_invstd->sizes() == mean.sizes(), "batch_invstd: expected shape ", mean.sizes(),
                      ", got ", batch_invstd->sizes());
    check_same_device(x, *batch_invstd, "batch_invstd");
  }
}

namespace {

// What the pool runs on for a pools-first activation: x, or x with the
// channels of negative scale negated, and that sign (undefined if none). Only
// a concrete CPU tensor is looked at (a device sync elsewhere, and fake
// tensors have no values): otherwise the sign is always applied.
std::pair<at::Tensor, at::Tensor> pooled_input(const at::Tensor& x, const at::Tensor& scale) {
  const at::Tensor negative = scale < 0;
  const bool concrete = x.is_cpu() && !x.key_set().has(c10::DispatchKey::Python);
  if (concrete && !negative.any().item<bool>()) return {x, at::Tensor()};
  const at::Tensor sign = per_channel(at::where(negative, -1.0, 1.0).to(x.scalar_type()));
  return {x * sign, sign};
}

}  // namespace

at::Tensor norm_act_max_pool2d_aten(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                               const at::Tensor& shift, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                               c10::IntArrayRef padding, c10::IntArrayRef dilation, bool ceil_mode,
                               c10::string_view activation, const std::optional<at::Tensor>& batch_invstd) {
  check_pool_args(x, mean, scale, shift, kernel_size, stride, padding, dilation, ceil_mode, activation, batch_invstd);
  const Activation act = parse_activation(activation);
  const auto format = kernel_format(x);
  if (!pools_first(act)) {
    const at::Tensor z = activate((x.to(mean.scalar_type()) - per_channel(mean)) * per_channel(scale) +
                                      per_channel(shift), act).to(x.scalar_type());
    return at::max_pool2d(z, kernel_size, stride, padding, dilation, ceil_mode).contiguous(format);
  }
  const auto [input, sign] = pooled_input(x, scale);
  at::Tensor pooled = at::max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode);
  if (sign.defined()) pooled.mul_(sign);
  const at::Tensor z = (pooled.to(mean.scalar_type()) - per_channel(mean)) * per_channel(scale) + per_channel(shift);
  return activate(z, act).to(x.scalar_type()).contiguous(format);
}

// grad_x, grad_scale = sum(dz * (x - mean)) and grad_shift = sum(dz) with dz
// the gradient of act's input at x's positions, and grad_x = dz * scale plus,
// with batch_invstd, the share through x's own statistics, as in
// norm_act_conv2d_backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_act_max_pool2d_backward_aten(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
    const at::Tensor& shift, c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef dilation, bool ceil_mode, c10::string_view activation,
    const std::optional<at::Tensor>& batch_invstd) {
  check_pool_args(x, mean, scale, shift, kernel_size, stride, padding, dilation, ceil_mode, activation, batch_invstd);
  const Activation act = parse_activation(activation);
  const auto acc = mean.scalar_type();
  const std::vector<int64_t> channel_dims{0, 2, 3};
  at::Tensor dz, grad_scale, grad_shift;
  if (pools_first(act)) {
    const auto [input, sign] = pooled_input(x, scale);
    const auto [pooled, indices] = at::max_pool2d_with_indices(input, kernel_size, stride, padding, dilation,
                                                               ceil_mode);
    const at::Tensor centred = (sign.defined() ? pooled * sign : pooled).to(acc) - per_channel(mean);
    const at::Tensor dz_pooled =
        activation_backward(grad_out.to(acc), centred * per_channel(scale) + per_channel(shift), act);
    grad_shift = dz_pooled.sum(channel_dims);
    grad_scale = (dz_pooled * centred).sum(channel_dims);
    // Each window's gradient to its maximum, summed where windows share one;
    // the pool's input stands in for x only by its shape and layout.
    const at::Tensor like = input.scalar_type() == acc ? input : at::empty_like(input, input.options().dtype(acc));
    dz = at::max_pool2d_with_indices_backward(dz_pooled, like, kernel_size, stride, padding, dilation, ceil_mode,
                                              indices);
  } else {
    const at::Tensor centred = x.to(acc) - per_channel(mean);
    const at::Tensor z = centred * per_channel(scale) + per_channel(shift);
    const at::Tensor a = activate(z, act);
    const auto [pooled, indices] = at::max_pool2d_with_indices(a, kernel_size, stride, padding, dilation, ceil_mode);
    dz = activation_backward(
        at::max_pool2d_with_indices_backward(grad_out.to(acc), a, kernel_size, stride, padding, dilation, ceil_mode,
                                             indices),
        z, act);
    grad_shift = dz.sum(channel_dims);
    grad_scale = (dz * centred).sum(channel_dims);
  }
  at::Tensor grad_x = dz.mul_(per_channel(scale));  // dz is this op's own temporary
  if (batch_invstd.has_value()) {
    // - scale * (grad_shift + (x - mean) * invstd^2 * grad_scale) / count, as x * a + b per channel.
    const double count = static_cast<double>(x.size(0) * spatial_numel(x));
    const at::Tensor slope = -scale * batch_invstd->square() * grad_scale / count;
    const at::Tensor offset = -slope * mean - scale * grad_shift / count;
    grad_x.addcmul_(x, per_channel(slope)).add_(per_channel(offset));
  }
  return {grad_x.to(x.scalar_type()).contiguous(kernel_format(x)), std::move(grad_scale), std::move(grad_shift)};
}

TORCH_LIBRARY_IMPL(resfast, CompositeExplicitAutograd, m) {
  m.impl("norm_act_max_pool2d", &norm_act_max_pool2d_aten);
  m.impl("norm_act_max_pool2d_backward", &norm_act_max_pool2d_backward_aten);
}

}  // namespace resfast
