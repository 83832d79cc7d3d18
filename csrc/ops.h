// The C++ API of resfast's ops: one function per schema of ops.cpp, calling
// the op through the dispatcher (so autograd, the backends and Python-side
// registrations all apply), for the autograd and composite kernels and for
// libtorch users. Each signature is written here once; the typed handle takes
// its type from the function itself (torchvision's pattern).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <optional>
#include <tuple>

namespace resfast::ops {

template <typename Signature>
c10::TypedOperatorHandle<Signature> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

#define RESFAST_CALL(name, ...)                                          \
  static const auto op = handle<decltype(name)>("resfast::" #name); \
  return op.call(__VA_ARGS__)

using Tensors2 = std::tuple<at::Tensor, at::Tensor>;
using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensors4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using OptionalTensor = std::optional<at::Tensor>;

inline Tensors2 channel_stats(const at::Tensor& x) { RESFAST_CALL(channel_stats, x); }

inline at::Tensor channel_stats_backward(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& grad_mean,
                                         const at::Tensor& grad_var) {
  RESFAST_CALL(channel_stats_backward, x, mean, grad_mean, grad_var);
}

inline at::Tensor norm_act_conv2d(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                                  const at::Tensor& shift, const at::Tensor& weight, const OptionalTensor& bias,
                                  const OptionalTensor& residual, c10::IntArrayRef stride, c10::IntArrayRef padding,
                                  c10::IntArrayRef dilation, int64_t groups, c10::string_view activation,
                                  const OptionalTensor& batch_invstd) {
  RESFAST_CALL(norm_act_conv2d, x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups,
               activation, batch_invstd);
}

inline Tensors2 norm_act_conv2d_into(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                                     const at::Tensor& shift, const at::Tensor& weight, const OptionalTensor& bias,
                                     const OptionalTensor& residual, c10::IntArrayRef stride,
                                     c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                                     c10::string_view activation, at::Tensor& out, int64_t out_offset,
                                     bool compute_stats) {
  RESFAST_CALL(norm_act_conv2d_into, x, mean, scale, shift, weight, bias, residual, stride, padding, dilation,
               groups, activation, out, out_offset, compute_stats);
}

inline Tensors3 norm_act_conv2d_stats(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                                      const at::Tensor& shift, const at::Tensor& weight, const OptionalTensor& bias,
                                      const OptionalTensor& residual, c10::IntArrayRef stride,
                                      c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                                      c10::string_view activation, const OptionalTensor& batch_invstd) {
  RESFAST_CALL(norm_act_conv2d_stats, x, mean, scale, shift, weight, bias, residual, stride, padding, dilation,
               groups, activation, batch_invstd);
}

inline Tensors4 norm_act_conv2d_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
                                         const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& weight,
                                         c10::IntArrayRef stride, c10::IntArrayRef padding,
                                         c10::IntArrayRef dilation, int64_t groups, c10::string_view activation,
                                         const OptionalTensor& batch_invstd, std::array<bool, 2> output_mask) {
  RESFAST_CALL(norm_act_conv2d_backward, grad_out, x, mean, scale, shift, weight, stride, padding, dilation, groups,
               activation, batch_invstd, output_mask);
}

inline Tensors3 group_norm(const at::Tensor& x, int64_t num_groups, const OptionalTensor& weight,
                           const OptionalTensor& bias, double eps, c10::string_view activation) {
  RESFAST_CALL(group_norm, x, num_groups, weight, bias, eps, activation);
}

inline Tensors3 group_norm_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                                    const at::Tensor& rstd, const OptionalTensor& weight, const OptionalTensor& bias,
                                    c10::string_view activation, std::array<bool, 3> output_mask) {
  RESFAST_CALL(group_norm_backward, grad_y, x, mean, rstd, weight, bias, activation, output_mask);
}

inline Tensors2 group_stats(const at::Tensor& x, int64_t num_groups) { RESFAST_CALL(group_stats, x, num_groups); }

inline at::Tensor group_stats_backward(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& grad_mean,
                                       const at::Tensor& grad_var) {
  RESFAST_CALL(group_stats_backward, x, mean, grad_mean, grad_var);
}

inline Tensors4 group_norm_affine(const at::Tensor& x, int64_t num_groups, const OptionalTensor& weight,
                                  const OptionalTensor& bias, double eps) {
  RESFAST_CALL(group_norm_affine, x, num_groups, weight, bias, eps);
}

inline Tensors4 batch_norm_affine(const at::Tensor& x, const OptionalTensor& running_mean,
                                  const OptionalTensor& running_var, const OptionalTensor& bn_weight,
                                  const OptionalTensor& bn_bias, bool training, double momentum, double eps,
                                  const OptionalTensor& batch_mean, const OptionalTensor& batch_var) {
  RESFAST_CALL(batch_norm_affine, x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps,
               batch_mean, batch_var);
}

inline at::Tensor batch_norm_act_conv2d(const at::Tensor& x, const OptionalTensor& running_mean,
                                        const OptionalTensor& running_var, const OptionalTensor& bn_weight,
                                        const OptionalTensor& bn_bias, bool training, double momentum, double eps,
                                        const at::Tensor& weight, const OptionalTensor& bias,
                                        const OptionalTensor& residual, c10::IntArrayRef stride,
                                        c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                                        c10::string_view activation, const OptionalTensor& batch_mean,
                                        const OptionalTensor& batch_var) {
  RESFAST_CALL(batch_norm_act_conv2d, x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps,
               weight, bias, residual, stride, padding, dilation, groups, activation, batch_mean, batch_var);
}

inline at::Tensor group_norm_act_conv2d(const at::Tensor& x, int64_t num_groups, const OptionalTensor& norm_weight,
                                        const OptionalTensor& norm_bias, double eps, const at::Tensor& weight,
                                        const OptionalTensor& bias, const OptionalTensor& residual,
                                        c10::IntArrayRef stride, c10::IntArrayRef padding,
                                        c10::IntArrayRef dilation, int64_t groups, c10::string_view activation) {
  RESFAST_CALL(group_norm_act_conv2d, x, num_groups, norm_weight, norm_bias, eps, weight, bias, residual, stride,
               padding, dilation, groups, activation);
}

inline at::Tensor norm_act_max_pool2d(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                                      const at::Tensor& shift, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                                      c10::IntArrayRef padding, c10::IntArrayRef dilation, bool ceil_mode,
                                      c10::string_view activation, const OptionalTensor& batch_invstd) {
  RESFAST_CALL(norm_act_max_pool2d, x, mean, scale, shift, kernel_size, stride, padding, dilation, ceil_mode,
               activation, batch_invstd);
}

inline Tensors3 norm_act_max_pool2d_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
                                             const at::Tensor& scale, const at::Tensor& shift,
                                             c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                                             c10::IntArrayRef padding, c10::IntArrayRef dilation, bool ceil_mode,
                                             c10::string_view activation, const OptionalTensor& batch_invstd) {
  RESFAST_CALL(norm_act_max_pool2d_backward, grad_out, x, mean, scale, shift, kernel_size, stride, padding, dilation,
               ceil_mode, activation, batch_invstd);
}

#undef RESFAST_CALL

}  // namespace resfast::ops
