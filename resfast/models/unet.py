"""U-Net (Ronneberger et al. 2015) from resfast's pre-activation residual
blocks, for images or (spatial_dims=3) volumes.

Each level is a PreActResBlock: GroupNorm→SiLU→conv units (norm="group") or
BatchNorm→ReLU units (norm="batch"), fused. A decoder block receives the
encoder's map and the upsampled map as two parts, and each of its fused
convolutions reads them as two slices of its input channels, the first partial
sum arriving as the second's residual. That costs no copy of the maps and
leaves nothing to write in place, so autograd and torch.compile see a plain
functional graph; the saved state is the same two maps a concatenation buffer
would hold. Where the maps are smaller than the convolution's weight (the
deepest levels), and without autograd, the block concatenates them instead
(resfast.nn.norm_conv.join_parts): the split weight would cost more to copy
(never with a synchronised BatchNorm in training).
"""

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from resfast.nn import PreActResBlock
from resfast.nn.norm_conv import norm_affines, norm_conv_parts
from resfast.nn.preact_res_block import CONVS, NORMS, check_spatial_dims, make_norm
from resfast.ops import max_pool2d

_TRANSPOSED_CONVS = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
# A leaf of torch.fx traces (feature extraction): its dispatch reads tensor properties.
torch.fx.wrap("max_pool2d")


class Upsample(nn.Module):
    """2x upsampling from `in_chs` to `out_chs` channels to a given size: a 2x2
    (2x2x2) stride-2 transposed convolution, zero-padded (odd sizes) or
    cropped ('valid' padding) to the size; or nearest interpolation to the
    size and a 3x3 (3x3x3) convolution."""

    def __init__(self, in_chs, out_chs, mode="transpose", device=None, dtype=None, spatial_dims=2):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if mode == "transpose":
            self.conv = _TRANSPOSED_CONVS[spatial_dims](in_chs, out_chs, 2, stride=2, **factory)
        elif mode == "interpolate":
            self.conv = CONVS[spatial_dims](in_chs, out_chs, 3, padding=1, **factory)
        else:
            raise ValueError(f"upsample: expected 'transpose' or 'interpolate', got {mode!r}")
        self.mode = mode

    def forward(self, x, size):
        if self.mode == "interpolate":
            return self.conv(F.interpolate(x, size=size, mode="nearest"))
        y = self.conv(x)
        missing = [want - have for want, have in zip(size, y.shape[2:])]
        if not any(missing):
            return y
        # F.pad takes the last dim first, and crops when given negative amounts.
        return F.pad(y, [amount for d in reversed(missing) for amount in (d // 2, d - d // 2)])


def center_crop(x, size):
    starts = [(have - want) // 2 for have, want in zip(x.shape[2:], size)]
    return x[(slice(None), slice(None)) + tuple(slice(s, s + n) for s, n in zip(starts, size))]


class DecoderLevel(nn.Module):
    def __init__(self, in_chs, out_chs, norm, num_groups, upsample, padding, spatial_dims=2):
        super().__init__()
        self.up = Upsample(in_chs, out_chs, upsample, spatial_dims=spatial_dims)
        self.block = PreActResBlock((out_chs, out_chs), out_chs, norm, num_groups, padding, spatial_dims=spatial_dims)
        self.valid = padding == "valid"

    def forward(self, x, skip):
        if self.valid:
            # The original U-Net: the upsampled map sets the size and the skip is
            # cropped to it.
            up = self.up(x, [2 * s for s in x.shape[2:]])
            skip = center_crop(skip, up.shape[2:])
        else:
            up = self.up(x, skip.shape[2:])
        return self.block(skip, up)


class Head(nn.Module):
    """The final norm→act→conv1x1 to the output channels, fused."""

    def __init__(self, in_chs, out_chs, norm, num_groups, spatial_dims=2):
        super().__init__()
        self.norm = make_norm(norm, in_chs, num_groups, spatial_dims=spatial_dims)
        self.conv = CONVS[spatial_dims](in_chs, out_chs, 1, bias=True)
        self.activation = NORMS[norm]

    def forward(self, x):
        return norm_conv_parts([x], norm_affines([x], self.norm, self.training), self.conv, self.activation)


class UNet(nn.Module):
    """U-Net of len(widths) levels (default the classic 64-128-256-512-1024),
    one pre-activation residual block per level and 2x2 max-pooling between
    them.

    norm: "group" (GroupNorm→SiLU, num_groups groups) or "batch" (BatchNorm→
    ReLU). upsample: "transpose" (2x2 transposed convolution) or "interpolate"
    (nearest + 3x3 convolution). padding: "same" gives an output of the
    input's size for any size, odd ones included; "valid" uses unpadded
    convolutions and cropped skips as in the original paper, so the output is
    smaller than the input. spatial_dims: 2 for images (N, C, H, W), 3 for
    volumes (N, C, D, H, W): 3x3x3 convolutions, 2x2x2 pooling and
    upsampling, the same fused units and uncopied skips.
    """

    def __init__(self, in_channels=3, out_channels=1, widths: Sequence[int] = (64, 128, 256, 512, 1024),
                 norm="group", num_groups=32, upsample="transpose", padding="same", spatial_dims=2):
        super().__init__()
        check_spatial_dims(spatial_dims)
        widths = tuple(widths)
        if len(widths) < 2 or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths: expected at least two positive ints, got {widths!r}")
        if padding not in ("same", "valid"):
            raise ValueError(f"padding: expected 'same' or 'valid', got {padding!r}")
        self.spatial_dims = spatial_dims
        self.stem = CONVS[spatial_dims](in_channels, widths[0], 3, padding=padding, bias=False)
        self.encoder = nn.ModuleList(
            PreActResBlock(widths[max(i - 1, 0)], w, norm, num_groups, padding, spatial_dims=spatial_dims)
            for i, w in enumerate(widths))
        self.decoder = nn.ModuleList(
            DecoderLevel(widths[i + 1], widths[i], norm, num_groups, upsample, padding, spatial_dims)
            for i in reversed(range(len(widths) - 1)))
        self.head = Head(widths[0], out_channels, norm, num_groups, spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2:
            layout = "(N, C, H, W)" if self.spatial_dims == 2 else "(N, C, D, H, W)"
            raise ValueError(f"x: expected a {self.spatial_dims + 2}-D {layout} tensor for a {self.spatial_dims}-D "
                             f"UNet, got shape {tuple(x.shape)}")
        x = self.stem(x)
        skips = []
        for i, block in enumerate(self.encoder):
            if i:
                x = max_pool2d(x, 2) if self.spatial_dims == 2 else F.max_pool3d(x, 2)
            x = block(x)
            skips.append(x)
        skips.pop()
        for level in self.decoder:
            x = level(x, skips.pop())
        return self.head(x)
