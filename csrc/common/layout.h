// The memory layout every resfast kernel runs in and returns, CPU and CUDA
// alike (resfast/ops/layout.py states the same rule for Python).
#pragma once

#include <ATen/core/Tensor.h>

namespace resfast {

// channels_last if that is how x is laid out, NCHW otherwise. Tensors are made
// contiguous in it (a no-op for both standard layouts).
inline at::MemoryFormat kernel_format(const at::Tensor& x) {
  return x.suggest_memory_format() == at::MemoryFormat::ChannelsLast ? at::MemoryFormat::ChannelsLast
                                                                     : at::MemoryFormat::Contiguous;
}

}  // namespace resfast
