"""Memory-format and shape rules shared by every backend (csrc/common/layout.h
states the same for C++)."""

import torch
from torch._prims_common import suggest_memory_format


def kernel_format(x: torch.Tensor) -> torch.memory_format:
    """The layout a kernel runs in and returns: channels_last if that is how x
    is laid out, else NCHW (the same rule as the C++ kernels)."""
    fmt = suggest_memory_format(x)
    return torch.channels_last if fmt == torch.channels_last else torch.contiguous_format


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def conv_output_size(x, weight, stride, padding, dilation):
    """A convolution's output (height, width); < 1 where the padded input is
    smaller than the dilated kernel."""
    return [
        (x.shape[2 + d] + 2 * padding[d] - dilation[d] * (weight.shape[2 + d] - 1) - 1) // stride[d] + 1
        for d in range(2)
    ]
