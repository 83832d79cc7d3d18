// The memory layout and output size every resfast kernel runs in and
// returns, CPU and CUDA alike (resfast/ops/layout.py states the same rules
// for Python).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <array>

namespace resfast {

// channels_last if that is how x is laid out, NCHW otherwise. Tensors are made
// contiguous in it (a no-op for both standard layouts).
inline at::MemoryFormat kernel_format(const at::Tensor& x) {
  return x.suggest_memory_format() == at::MemoryFormat::ChannelsLast ? at::MemoryFormat::ChannelsLast
                                                                     : at::MemoryFormat::Contiguous;
}

// A convolution's output height and width; < 1 where the padded input is
// smaller than the dilated kernel.
inline std::array<int64_t, 2> conv_output_size(const at::Tensor& x, const at::Tensor& weight, c10::IntArrayRef stride,
                                               c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  std::array<int64_t, 2> size{};
  for (int d = 0; d < 2; ++d) {
    const int64_t extent = x.size(2 + d) + 2 * padding[d] - dilation[d] * (weight.size(2 + d) - 1);
    size[d] = extent > 0 ? (extent - 1) / stride[d] + 1 : 0;
  }
  return size;
}

}  // namespace resfast
