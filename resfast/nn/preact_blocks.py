"""Pre-activation residual blocks (He et al. 2016, "Identity Mappings in Deep
Residual Networks") built from fused BN→ReLU→conv units.

Parameters and buffers are named as in timm's PreActBasic / PreActBottleneck
(norm1, conv1, ..., downsample.conv), so their state dicts load directly. The
shortcut projection takes the block's shared pre-activation: both of its
consumers (conv1 and the projection) apply it as they load x, from one
statistics pass; the residual add happens in the last convolution's epilogue.
In training a block hands its output's batch statistics, taken in that
epilogue, to the next block (resfast.nn.batch_stats), so a stack of blocks
makes no statistics pass but for the first block's input.
"""

import torch
from torch import nn

from resfast import ops
from resfast.nn import batch_stats
from resfast.nn.batch_norm import BATCH_NORMS, bn_affine
from resfast.nn.members import child
from resfast.nn.norm_conv import check_conv_module, norm_conv


def make_divisible(v, divisor=8, round_limit=0.9):
    """Round a channel count to a multiple of divisor, never losing more than
    10% (the rule of timm's blocks, whose widths must match to load its weights)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < round_limit * v else new_v


class Projection(nn.Module):
    """The 1x1 strided shortcut convolution (`downsample.conv`): a parameter
    container, which the block applies fused with its pre-activation."""

    def __init__(self, in_chs, out_chs, stride=1, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, device=device, dtype=dtype)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d):
        """A projection that takes over `conv` (shared, not copied)."""
        check_conv_module(conv)
        projection = cls.__new__(cls)
        nn.Module.__init__(projection)
        projection.conv = conv
        return projection


class _PreActBlock(nn.Module):
    _NUM_STAGES = 0  # BN→ReLU→conv stages: norm1/conv1 ... normN/convN
    # In training, take the output's batch statistics in the last epilogue and
    # hand them to the next block; a model turns it off for a block whose
    # output no resfast BatchNorm reads.
    hand_off_stats = True

    @classmethod
    def from_modules(cls, downsample, drop_path_rate=0.0, **stages):
        """A block that takes over existing modules (shared, not copied): the
        BatchNorms and convolutions named as the block names them (norm1,
        conv1, ...) and the shortcut's Projection or None. The convolutions
        keep their own strides, dilations and groups."""
        names = {f"{kind}{i}" for i in range(1, cls._NUM_STAGES + 1) for kind in ("norm", "conv")}
        if set(stages) != names:
            raise ValueError(f"{cls.__name__}.from_modules: expected modules {sorted(names)}, got {sorted(stages)}")
        if downsample is not None and not isinstance(downsample, Projection):
            raise TypeError(f"downsample: expected a Projection or None, got {type(downsample).__name__}")
        block = cls.__new__(cls)
        nn.Module.__init__(block)
        block.downsample = downsample
        for i in range(1, cls._NUM_STAGES + 1):
            norm, conv = stages[f"norm{i}"], stages[f"conv{i}"]
            if not isinstance(norm, BATCH_NORMS) or norm.num_features != conv.in_channels:
                raise ValueError(f"norm{i}: expected a BatchNorm of conv{i}.in_channels = {conv.in_channels} "
                                 f"features, got {norm}")
            check_conv_module(conv)
            setattr(block, f"norm{i}", norm)
            setattr(block, f"conv{i}", conv)
        block.drop_path_rate = drop_path_rate
        return block

    def _make_projection(self, in_chs, out_chs, stride, factory):
        needs = in_chs != out_chs or stride != 1
        return Projection(in_chs, out_chs, stride, **factory) if needs else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """In training, x's batch statistics come from the block that produced
        it when they are at hand (resfast.nn.batch_stats), and each
        convolution's epilogue gives the next BatchNorm its own, so only the
        first block of a stack makes a statistics pass."""
        x_stats = batch_stats.lookup(x) if self.training else None
        y, y_stats = self._forward(x, x_stats, self.training and self.hand_off_stats)
        batch_stats.record(y, y_stats)
        return y

    def _shortcut(self, x, preact):
        downsample = self.downsample  # None lives in __dict__, not in _modules
        return x if downsample is None else norm_conv(x, preact, child(downsample, "conv"))

    def _unit(self, x, affine, conv):
        """(conv(relu(affine(x))), its statistics in training, else None)."""
        if self.training:
            return norm_conv(x, affine, conv, output_stats=True)
        return norm_conv(x, affine, conv), None

    def _inner(self, h, bn, conv):
        return self._unit(h[0], bn_affine(bn, h[0], self.training, batch_stats=h[1]), conv)

    def _last(self, h, bn, conv, shortcut, output_stats):
        affine = bn_affine(bn, h[0], self.training, batch_stats=h[1])
        if self.training and self.drop_path_rate > 0:
            # Stochastic depth scales the branch per sample before the add, so
            # the add (and so the output's statistics) cannot ride in the epilogue.
            return shortcut + ops.drop_path(norm_conv(h[0], affine, conv), self.drop_path_rate, True), None
        if output_stats:
            return norm_conv(h[0], affine, conv, residual=shortcut, output_stats=True)
        return norm_conv(h[0], affine, conv, residual=shortcut), None

    def extra_repr(self):
        return f"drop_path_rate={self.drop_path_rate}" if self.drop_path_rate else ""


class PreActBasicBlock(_PreActBlock):
    """BN→ReLU→conv3x3 (stride) → BN→ReLU→conv3x3, plus the shortcut."""

    expansion = 1
    _NUM_STAGES = 2

    def __init__(self, in_chs, out_chs, stride=1, groups=1, dilation=1, drop_path_rate=0.0, device=None,
                 dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.downsample = self._make_projection(in_chs, out_chs, stride, factory)
        self.norm1 = nn.BatchNorm2d(in_chs, **factory)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, dilation, dilation, groups, bias=False, **factory)
        self.norm2 = nn.BatchNorm2d(out_chs, **factory)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, dilation, dilation, groups, bias=False, **factory)
        self.drop_path_rate = drop_path_rate

    def _forward(self, x, x_stats, output_stats):
        preact = bn_affine(child(self, "norm1"), x, self.training, batch_stats=x_stats)
        shortcut = self._shortcut(x, preact)
        h = self._unit(x, preact, child(self, "conv1"))
        return self._last(h, child(self, "norm2"), child(self, "conv2"), shortcut, output_stats)


class PreActBottleneck(_PreActBlock):
    """BN→ReLU→conv1x1 → BN→ReLU→conv3x3 (stride, groups) → BN→ReLU→conv1x1
    (expansion 4), plus the shortcut.

    The middle width is out_chs * bottle_ratio (rounded as timm does), or, for
    ResNeXt-style blocks, out_chs * bottle_ratio * width_per_group / 64 * groups
    (torchvision's rule).
    """

    expansion = 4
    _NUM_STAGES = 3

    def __init__(self, in_chs, out_chs, stride=1, bottle_ratio=0.25, groups=1, width_per_group=None, dilation=1,
                 drop_path_rate=0.0, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if width_per_group is None:
            mid_chs = make_divisible(out_chs * bottle_ratio)
        else:
            mid_chs = int(int(out_chs * bottle_ratio) * width_per_group / 64) * groups
        self.downsample = self._make_projection(in_chs, out_chs, stride, factory)
        self.norm1 = nn.BatchNorm2d(in_chs, **factory)
        self.conv1 = nn.Conv2d(in_chs, mid_chs, 1, bias=False, **factory)
        self.norm2 = nn.BatchNorm2d(mid_chs, **factory)
        self.conv2 = nn.Conv2d(mid_chs, mid_chs, 3, stride, dilation, dilation, groups, bias=False, **factory)
        self.norm3 = nn.BatchNorm2d(mid_chs, **factory)
        self.conv3 = nn.Conv2d(mid_chs, out_chs, 1, bias=False, **factory)
        self.drop_path_rate = drop_path_rate

    def _forward(self, x, x_stats, output_stats):
        preact = bn_affine(child(self, "norm1"), x, self.training, batch_stats=x_stats)
        shortcut = self._shortcut(x, preact)
        h = self._unit(x, preact, child(self, "conv1"))
        h = self._inner(h, child(self, "norm2"), child(self, "conv2"))
        return self._last(h, child(self, "norm3"), child(self, "conv3"), shortcut, output_stats)
