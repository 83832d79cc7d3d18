// norm_act_max_pool2d in ATen ops for every device (csrc/norm_act_max_pool.cpp),
// which the CPU kernel falls back to outside its own cases.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

#include "common/checks.h"

namespace resfast {

// Activations the pool commutes with (non-decreasing): the pool runs on x.
inline bool pools_first(Activation activation) { return activation != Activation::SiLU; }

// The op's arguments, the same on every path: shapes and dtypes, two ints
// per pool argument, and windows that each hold an element of x.
void check_pool_args(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift,
                     c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
                     c10::IntArrayRef dilation, bool ceil_mode, c10::string_view activation,
                     const std::optional<at::Tensor>& batch_invstd);

at::Tensor norm_act_max_pool2d_aten(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                                    const at::Tensor& shift, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                                    c10::IntArrayRef padding, c10::IntArrayRef dilation, bool ceil_mode,
                                    c10::string_view activation, const std::optional<at::Tensor>& batch_invstd);

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_act_max_pool2d_backward_aten(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
    const at::Tensor& shift, c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef dilation, bool ceil_mode, c10::string_view activation,
    const std::optional<at::Tensor>& batch_invstd);

}  // namespace resfast
