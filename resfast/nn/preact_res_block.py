"""A pre-activation residual block with BatchNorm or GroupNorm, for
encoder-decoder networks: its input may arrive as several parts (a U-Net's
skip and upsampled maps) that it reads as one channel concatenation without
ever building it."""

from typing import Sequence

import torch
from torch import nn

from resfast import ops
from resfast.nn.norm_conv import norm_affines, norm_conv_parts

NORMS = {"batch": "relu", "group": "silu"}


def make_norm(norm, channels, num_groups, device=None, dtype=None):
    """The normalisation layer of a block: nn.BatchNorm2d for "batch",
    nn.GroupNorm(num_groups) for "group"."""
    if norm == "batch":
        return nn.BatchNorm2d(channels, device=device, dtype=dtype)
    if norm == "group":
        if channels % num_groups:
            raise ValueError(f"num_groups: expected a divisor of {channels} channels, got {num_groups}")
        return nn.GroupNorm(num_groups, channels, device=device, dtype=dtype)
    raise ValueError(f"norm: expected 'batch' or 'group', got {norm!r}")


class PreActResBlock(nn.Module):
    """norm→act→conv3x3 → norm→act→conv3x3, plus the input, or a 1x1
    projection of its pre-activation when the width changes (as in
    pre-activation ResNets). The activation is ReLU with "batch" and SiLU with
    "group" norm; the residual add happens in the last convolution's epilogue.

    in_chs: an int, or the widths of the parts forward receives. padding:
    "same" keeps the size; "valid" shrinks each side by 2 and crops the
    shortcut to match.
    """

    def __init__(self, in_chs: int | Sequence[int], out_chs: int, norm="group", num_groups=32, padding="same",
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_parts = (in_chs,) if isinstance(in_chs, int) else tuple(in_chs)
        total = sum(self.in_parts)
        if padding not in ("same", "valid"):
            raise ValueError(f"padding: expected 'same' or 'valid', got {padding!r}")
        self.norm1 = make_norm(norm, total, num_groups, **factory)
        self.activation = NORMS[norm]
        self.conv1 = nn.Conv2d(total, out_chs, 3, padding=padding, bias=False, **factory)
        self.norm2 = make_norm(norm, out_chs, num_groups, **factory)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=padding, bias=False, **factory)
        needs_projection = total != out_chs or len(self.in_parts) > 1
        self.downsample = nn.Conv2d(total, out_chs, 1, bias=False, **factory) if needs_projection else None
        self.crop = 2 if padding == "valid" else 0

    def forward(self, *parts: torch.Tensor) -> torch.Tensor:
        widths = tuple(p.shape[1] for p in parts)
        if widths != self.in_parts:
            raise ValueError(f"input: expected parts of {self.in_parts} channels, got {widths}")
        preact = norm_affines(parts, self.norm1, self.training)
        if self.downsample is None:
            shortcut = parts[0]
        else:
            shortcut = norm_conv_parts(parts, preact, self.downsample, self.activation)
        if self.crop:
            c = self.crop
            shortcut = shortcut[..., c:-c, c:-c].contiguous(memory_format=ops.kernel_format(shortcut))
        h = norm_conv_parts(parts, preact, self.conv1, self.activation)
        return norm_conv_parts([h], norm_affines([h], self.norm2, self.training), self.conv2, self.activation,
                               residual=shortcut)

