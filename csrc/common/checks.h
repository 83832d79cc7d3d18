// Argument checks shared by the C++ kernels of every backend. They raise
// ValueError/TypeError in Python, naming the argument and the expectation.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include <optional>

#include "norm_act_math.h"

namespace resfast {

Activation parse_activation(c10::string_view activation);

// (N, C, H, W) with a float dtype the kernels support.
void check_activation_input(const at::Tensor& x, const char* name);

// t on x's device.
void check_same_device(const at::Tensor& x, const at::Tensor& t, const char* name);

// An optional (C,) vector for x's channels, on x's device.
void check_channel_vector(const at::Tensor& x, const std::optional<at::Tensor>& t, const char* name);

// F.batch_norm's arguments for x: the optional (C,) vectors, eps finite and
// >= 0, momentum finite when running statistics are updated, and running
// statistics when training is false.
void check_batch_norm_args(const at::Tensor& x, const std::optional<at::Tensor>& running_mean,
                           const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& bn_weight,
                           const std::optional<at::Tensor>& bn_bias, bool training, double momentum, double eps);

// x's batch (mean, var) from its producer: both or neither, (C,) of x's
// accumulation dtype on its device. Whether they are given.
bool check_batch_stats(const at::Tensor& x, const std::optional<at::Tensor>& batch_mean,
                       const std::optional<at::Tensor>& batch_var);

// mean/scale/shift: (C,) or (N, C) of the accumulation dtype of x.
void check_norm_params(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                       const at::Tensor& shift);

void check_conv_args(const at::Tensor& x, const at::Tensor& weight, c10::IntArrayRef stride,
                     c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups);

// mean, grad_mean, grad_var of channel_stats_backward: (C,) vectors of the
// accumulation dtype, on x's device.
void check_stats_backward_args(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& grad_mean,
                               const at::Tensor& grad_var);

// GroupNorm's optional weight and bias: (C,) of x's dtype or of its
// accumulation dtype, on x's device.
void check_group_norm_affine(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias);

// check_group_norm_affine, and eps finite and >= 0.
void check_group_norm_params(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias, double eps);

// float64 for float64 input, else float32.
at::ScalarType accumulation_type(at::ScalarType t);

// The dtype the convolution runs in: weight's. x must be weight's dtype, or
// float32 with a half/bfloat16 weight (autocast).
void check_compute_dtype(const at::Tensor& x, const at::Tensor& weight);

}  // namespace resfast
