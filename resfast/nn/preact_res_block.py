"""A pre-activation residual block with BatchNorm or GroupNorm, for
encoder-decoder networks: its input may arrive as several parts (a U-Net's
skip and upsampled maps) that it reads as one channel concatenation without
ever building it."""

from typing import Sequence

import torch
from torch import nn

from resfast import ops
from resfast.nn.members import child, tensor
from resfast.nn.norm_conv import check_whole_groups, join_parts, norm_affines, norm_conv_parts

NORMS = {"batch": "relu", "group": "silu"}
CONVS = {2: nn.Conv2d, 3: nn.Conv3d}


def check_spatial_dims(spatial_dims):
    if spatial_dims not in CONVS:
        raise ValueError(f"spatial_dims: expected 2 (images) or 3 (volumes), got {spatial_dims!r}")


def make_norm(norm, channels, num_groups, device=None, dtype=None, spatial_dims=2):
    """The normalisation layer of a block: nn.BatchNorm2d (nn.BatchNorm3d for
    volumes) for "batch", nn.GroupNorm(num_groups) for "group"."""
    if norm == "batch":
        return (nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d)(channels, device=device, dtype=dtype)
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
    shortcut to match. spatial_dims: 2 for images (N, C, H, W), 3 for
    volumes (N, C, D, H, W) with 3x3x3 convolutions.
    """

    def __init__(self, in_chs: int | Sequence[int], out_chs: int, norm="group", num_groups=32, padding="same",
                 device=None, dtype=None, spatial_dims=2):
        super().__init__()
        check_spatial_dims(spatial_dims)
        factory = {"device": device, "dtype": dtype}
        conv = CONVS[spatial_dims]
        self.in_parts = (in_chs,) if isinstance(in_chs, int) else tuple(in_chs)
        total = sum(self.in_parts)
        if padding not in ("same", "valid"):
            raise ValueError(f"padding: expected 'same' or 'valid', got {padding!r}")
        self.norm1 = make_norm(norm, total, num_groups, **factory, spatial_dims=spatial_dims)
        if norm == "group":
            # Checked here, not per call: a forward may normalise the parts
            # one by one or concatenated (join_parts), and must accept the
            # same inputs either way.
            check_whole_groups(self.in_parts, num_groups, "in_chs")
        self.activation = NORMS[norm]
        self.conv1 = conv(total, out_chs, 3, padding=padding, bias=False, **factory)
        self.norm2 = make_norm(norm, out_chs, num_groups, **factory, spatial_dims=spatial_dims)
        self.conv2 = conv(out_chs, out_chs, 3, padding=padding, bias=False, **factory)
        needs_projection = total != out_chs or len(self.in_parts) > 1
        self.downsample = conv(total, out_chs, 1, bias=False, **factory) if needs_projection else None
        self.crop = 2 if padding == "valid" else 0
        self.spatial_dims = spatial_dims

    def forward(self, *parts: torch.Tensor) -> torch.Tensor:
        if any(p.dim() != self.spatial_dims + 2 for p in parts):
            raise ValueError(f"input: expected {self.spatial_dims + 2}-D parts for a {self.spatial_dims}-D block, got "
                             f"shapes {[tuple(p.shape) for p in parts]}")
        widths = tuple(p.shape[1] for p in parts)
        if widths != self.in_parts:
            raise ValueError(f"input: expected parts of {self.in_parts} channels, got {widths}")
        norm1, conv1, downsample = child(self, "norm1"), child(self, "conv1"), self.downsample
        parts = join_parts(parts, tensor(conv1, "weight"), norm1, self.training)  # once for both convolutions
        preact = norm_affines(parts, norm1, self.training)
        if downsample is None:
            shortcut = parts[0]
        else:
            shortcut = norm_conv_parts(parts, preact, downsample, self.activation)
        if self.crop:
            c = self.crop
            inner = (slice(None), slice(None)) + (slice(c, -c),) * (shortcut.dim() - 2)
            shortcut = shortcut[inner].contiguous(memory_format=ops.kernel_format(shortcut))
        h = norm_conv_parts(parts, preact, conv1, self.activation)
        return norm_conv_parts([h], norm_affines([h], child(self, "norm2"), self.training), child(self, "conv2"),
                               self.activation, residual=shortcut)

