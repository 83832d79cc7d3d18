// Per-channel batch statistics on the CPU, for the other CPU kernels that
// need them (the registered op is resfast::channel_stats).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace resfast::cpu {

// (mean, biased variance) of each channel of x over (N, H, W), in x's
// accumulation dtype; x is read in place when kernel_readable.
std::tuple<at::Tensor, at::Tensor> channel_stats(const at::Tensor& input);

}  // namespace resfast::cpu
