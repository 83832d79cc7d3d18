// The memory layout and output size every resfast kernel runs in and
// returns, CPU and CUDA alike (resfast/ops/layout.py states the same rules
// for Python).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <vector>

namespace resfast {

// channels_last (channels_last_3d for 5-D) if that is how x is laid out,
// NCHW (NCDHW) otherwise. Tensors are made contiguous in it (a no-op for the
// standard layouts).
inline at::MemoryFormat kernel_format(const at::Tensor& x) {
  const at::MemoryFormat format = x.suggest_memory_format();
  return format == at::MemoryFormat::ChannelsLast || format == at::MemoryFormat::ChannelsLast3d
             ? format
             : at::MemoryFormat::Contiguous;
}

inline bool is_channels_last(at::MemoryFormat format) {
  return format == at::MemoryFormat::ChannelsLast || format == at::MemoryFormat::ChannelsLast3d;
}

// Positions per sample: the product of the spatial sizes (H * W, or D * H * W).
inline int64_t spatial_numel(const at::Tensor& x) {
  int64_t positions = 1;
  for (int64_t d = 2; d < x.dim(); ++d) positions *= x.size(d);
  return positions;
}

// A convolution's output spatial sizes; < 1 where the padded input is smaller
// than the dilated kernel.
inline std::vector<int64_t> conv_output_size(const at::Tensor& x, const at::Tensor& weight, c10::IntArrayRef stride,
                                             c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  std::vector<int64_t> size(x.dim() - 2);
  for (size_t d = 0; d < size.size(); ++d) {
    const int64_t extent = x.size(2 + d) + 2 * padding[d] - dilation[d] * (weight.size(2 + d) - 1);
    size[d] = extent > 0 ? (extent - 1) / stride[d] + 1 : 0;
  }
  return size;
}

}  // namespace resfast
