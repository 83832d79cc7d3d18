"""nn.MaxPool2d on resfast's max pool (resfast.ops.max_pool2d)."""

import torch
from torch import nn

from resfast.ops import max_pool2d

# A leaf of torch.fx traces (feature extraction of converted models): its dispatch reads tensor properties.
torch.fx.wrap("max_pool2d")


class MaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d, same arguments, whose backward recomputes the pool's
    choices from the input instead of keeping int64 indices (half an input's
    bytes for a 2x2 pool), on resfast's NCHW CPU loop where it runs (much
    faster than ATen's there). With return_indices=True it is torch's."""

    def forward(self, x: torch.Tensor):
        if self.return_indices:
            return super().forward(x)
        return max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)
