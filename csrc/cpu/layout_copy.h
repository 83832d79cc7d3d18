// A dense NC(D)HW tensor's values in channels_last(_3d), or back, copied in
// tiles. ATen's copy between the two layouts ran 3.5x (to channels_last_3d)
// and 9x (back) slower than a plain copy of the same tensor on an AMD EPYC;
// the 3-D units' backward converts three tensors per call (norm_act_conv2d.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace resfast::cpu {

// x with the same values, contiguous in `format`: x itself when it already
// is, a tiled transpose between a dense NC(D)HW and channels_last(_3d)
// layout, ATen's copy for anything else.
at::Tensor to_format(const at::Tensor& x, at::MemoryFormat format);

}  // namespace resfast::cpu
