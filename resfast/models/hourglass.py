"""Stacked hourglass networks (Newell et al. 2016, "Stacked Hourglass Networks
for Human Pose Estimation") from resfast's fused pre-activation modules.

Every residual module is a pre-activation bottleneck C -> C/2 -> C/2 -> C
(`resfast.nn.PreActBottleneck` with bottle_ratio 0.5), so each of its three
BN→ReLU→conv units and its shortcut projection run fused. The intermediate
supervision heads are pre-activation too: the head's two 1x1 convolutions that
read the same normalised features share one statistics pass, and the remap
back into the residual stream adds in the convolution's epilogue.
"""

import torch
import torch.nn.functional as F
from torch import nn

from resfast.nn import BNReLUConv2d, PreActBottleneck
from resfast.nn.batch_norm import bn_affine
from resfast.nn.norm_conv import norm_conv
from resfast.ops import max_pool2d

# A leaf of torch.fx traces (feature extraction): its dispatch reads tensor properties.
torch.fx.wrap("max_pool2d")


def residual(in_chs, out_chs, stride=1):
    """Newell's residual module: a pre-activation bottleneck of half width."""
    return PreActBottleneck(in_chs, out_chs, stride, bottle_ratio=0.5)


def residuals(chs, count):
    return nn.Sequential(*(residual(chs, chs) for _ in range(count)))


class Stem(nn.Module):
    """7x7/2 convolution, a residual to 128 channels, 2x2 max-pool, and two
    residuals to `channels`: the input at a quarter of its resolution."""

    def __init__(self, in_chans, channels):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)  # BN follows
        self.res1 = residual(64, 128)
        self.res2 = residual(128, 128)
        self.res3 = residual(128, channels)

    def forward(self, x):
        x = self.res1(self.conv(x))
        x = max_pool2d(x, 2, ceil_mode=True)
        return self.res3(self.res2(x))


class Hourglass(nn.Module):
    """One hourglass of the given depth: at each level a skip branch at full
    resolution and a branch through max-pool, the next level and nearest
    upsampling, added. Odd sizes keep every pixel: the pool rounds up and the
    upsampling returns to the skip's exact size."""

    def __init__(self, depth, channels, num_blocks=1):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth: expected an int >= 1, got {depth!r}")
        self.skip = residuals(channels, num_blocks)
        self.down = residuals(channels, num_blocks)
        self.inner = Hourglass(depth - 1, channels, num_blocks) if depth > 1 else residuals(channels, num_blocks)
        self.up = residuals(channels, num_blocks)
        # Their outputs go into the sum below: no BatchNorm reads them.
        self.skip[-1].hand_off_stats = self.up[-1].hand_off_stats = False

    def forward(self, x):
        low = self.up(self.inner(self.down(max_pool2d(x, 2, ceil_mode=True))))
        return self.skip(x) + F.interpolate(low, size=x.shape[-2:], mode="nearest")


class StackHead(nn.Module):
    """Intermediate supervision: features = conv1x1(relu(bn(y))), heatmaps =
    score(relu(norm(features))) and, except after the last stack, the remap
    x + fc_remap(relu(norm(features))) + score_remap(heatmaps) into the
    residual stream."""

    def __init__(self, channels, num_joints, remap=True):
        super().__init__()
        self.fc = BNReLUConv2d(channels, channels, 1)
        self.norm = nn.BatchNorm2d(channels)
        self.score = nn.Conv2d(channels, num_joints, 1, bias=True)
        self.fc_remap = nn.Conv2d(channels, channels, 1, bias=True) if remap else None
        self.score_remap = nn.Conv2d(num_joints, channels, 1, bias=True) if remap else None

    def forward(self, x, y):
        features = self.fc(y)
        affine = bn_affine(self.norm, features, self.training)
        heatmaps = norm_conv(features, affine, self.score)
        if self.fc_remap is None:
            return heatmaps, None
        stream = norm_conv(features, affine, self.fc_remap, residual=x + self.score_remap(heatmaps))
        return heatmaps, stream


class StackedHourglass(nn.Module):
    """`num_stacks` hourglasses of the given depth on a 4x-downsampling stem;
    forward returns the list of each stack's heatmaps, (N, num_joints, H/4, W/4)
    rounded up, the last being the prediction."""

    def __init__(self, num_stacks=8, channels=256, num_joints=16, depth=4, num_blocks=1, in_chans=3):
        super().__init__()
        for name, value in (("num_stacks", num_stacks), ("channels", channels), ("num_joints", num_joints),
                            ("num_blocks", num_blocks)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if channels % 2:
            raise ValueError(f"channels: expected an even number (the residuals halve it), got {channels}")
        self.stem = Stem(in_chans, channels)
        self.hourglasses = nn.ModuleList(Hourglass(depth, channels, num_blocks) for _ in range(num_stacks))
        self.features = nn.ModuleList(residuals(channels, num_blocks) for _ in range(num_stacks))
        self.heads = nn.ModuleList(StackHead(channels, num_joints, remap=i < num_stacks - 1)
                                   for i in range(num_stacks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        heatmaps = []
        for hourglass, features, head in zip(self.hourglasses, self.features, self.heads):
            out, x = head(x, features(hourglass(x)))
            heatmaps.append(out)
        return heatmaps
