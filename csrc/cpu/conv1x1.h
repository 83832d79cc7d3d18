// The fused unit's 1x1 convolutions on the CPU as GEMMs over chunks of
// positions: each chunk's activation act((x - mean) * scale + shift) is
// written to a small buffer that stays in L2 and fed straight to the GEMM,
// in the forward and in both backward products, so no full-size temporary
// is ever allocated (with glibc's default malloc every such temporary is a
// fresh mapping whose pages fault in on first touch: that, more than the
// arithmetic, made a 1x1 unit several times slower than its convolution).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <array>
#include <vector>

#include "../common/norm_act_math.h"

namespace resfast::cpu {

// Whether the chunked path runs the unit: a 1x1 kernel, stride 1, no
// padding, one group, x and weight float32 or float64 of one dtype (the
// GEMMs run in the convolution's dtype), and enough positions per sample.
bool conv1x1_applies(const at::Tensor& x, const at::Tensor& weight, c10::IntArrayRef stride,
                     c10::IntArrayRef padding, int64_t groups);

// conv1x1(act((x - mean) * scale + shift), weight) + bias, laid out like x
// (dense). x is kernel_readable (a channel slice is read in place); mean,
// scale and shift are contiguous (C,) or (N, C) of x's dtype.
at::Tensor conv1x1_forward(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                           const at::Tensor& shift, Activation activation, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias);

struct Conv1x1Grads {
  at::Tensor grad_x;         // dz * scale, laid out like x (dense); undefined unless asked
  std::vector<double> sums;  // [N][C][2]: sums of dz and dz * (x - mean) per (sample, channel)
  at::Tensor grad_weight;    // undefined unless asked
};

// The backward of conv1x1_forward's unit (before any statistics term):
// output_mask = (input side, weight).
Conv1x1Grads conv1x1_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
                              const at::Tensor& scale, const at::Tensor& shift, Activation activation,
                              const at::Tensor& weight, std::array<bool, 2> output_mask);

}  // namespace resfast::cpu
