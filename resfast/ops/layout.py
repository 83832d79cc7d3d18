"""Memory-format and shape rules shared by every backend (csrc/common/layout.h
states the same for C++)."""

import math

import torch
from torch._prims_common import suggest_memory_format

CHANNELS_LAST = (torch.channels_last, torch.channels_last_3d)


def kernel_format(x: torch.Tensor) -> torch.memory_format:
    """The layout a kernel runs in and returns: channels_last (channels_last_3d
    for 5-D) if that is how x is laid out, else NC(D)HW (the same rule as the
    C++ kernels)."""
    fmt = suggest_memory_format(x)
    return fmt if fmt in CHANNELS_LAST else torch.contiguous_format


def spatial_numel(x) -> int:
    """Positions per sample: H * W, or D * H * W."""
    return math.prod(x.shape[2:])


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def per_element(p, x):
    """(C,) or (N, C) parameters viewed to broadcast against x (N, C, *)."""
    return p.reshape(*p.shape, *([1] * (x.dim() - 2)))


def reduced_dims(x):
    """Every dim of x but the channels: what a per-channel statistic reduces."""
    return (0, *range(2, x.dim()))


def conv_output_size(x, weight, stride, padding, dilation):
    """A convolution's output spatial sizes; < 1 where the padded input is
    smaller than the dilated kernel."""
    return [
        (x.shape[2 + d] + 2 * padding[d] - dilation[d] * (weight.shape[2 + d] - 1) - 1) // stride[d] + 1
        for d in range(x.dim() - 2)
    ]
