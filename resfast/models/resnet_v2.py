"""Pre-activation ResNets (ResNet-v2, He et al. 2016) from resfast's fused blocks.

Parameter names follow timm's ResNetV2 as built for `resnetv2_50`
(conv_layer=create_conv2d, norm_layer=BatchNormAct2d): stem.conv,
stages.{i}.blocks.{j}.{norm1, conv1, ...}, norm, head.fc (a 1x1 convolution),
so timm checkpoints load with strict=True.
"""

import torch
import torch.nn.functional as F
from torch import nn

from resfast.nn import PreActBasicBlock, PreActBottleneck
from resfast.ops import max_pool2d

# A leaf of torch.fx traces (feature extraction): its dispatch reads tensor properties.
torch.fx.wrap("max_pool2d")


class Stem(nn.Module):
    """7x7/2 convolution and 3x3/2 max-pool; no normalisation (the first block's
    pre-activation normalises its output)."""

    def __init__(self, in_chans, out_chs):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chs, 7, stride=2, padding=3, bias=False)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x):
        p = self.pool  # resfast's max pool: only its input saved
        return max_pool2d(self.conv(x), p.kernel_size, p.stride, p.padding, p.dilation, p.ceil_mode)


class Stage(nn.Module):
    """The blocks of one resolution, each handing the next its output's batch
    statistics in training (resfast.nn.batch_stats)."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(x)


class Head(nn.Module):
    """Global average pool and a 1x1 convolution classifier (timm's use_conv head)."""

    def __init__(self, in_chs, num_classes):
        super().__init__()
        self.fc = nn.Conv2d(in_chs, num_classes, 1, bias=True) if num_classes > 0 else nn.Identity()

    def forward(self, x):
        x = x.mean((2, 3))
        if isinstance(self.fc, nn.Conv2d):
            # The 1x1 convolution of a 1x1 map, as a linear layer: the output is
            # no view of the convolution's (FSDP2 warns against views).
            return F.linear(x, self.fc.weight.flatten(1), self.fc.bias)
        return x


class ResNetV2(nn.Module):
    """Pre-activation ResNet.

    layers: blocks per stage; channels: each stage's output channels; basic:
    PreActBasicBlock instead of PreActBottleneck; drop_path_rate: stochastic
    depth, rising linearly from 0 at the first block to this at the last.
    """

    def __init__(self, layers, channels=(256, 512, 1024, 2048), basic=False, bottle_ratio=0.25, num_classes=1000,
                 in_chans=3, stem_chs=64, drop_path_rate=0.0, groups=1, width_per_group=None):
        super().__init__()
        self.num_classes = num_classes
        self.stem = Stem(in_chans, stem_chs)
        rates = torch.linspace(0, drop_path_rate, sum(layers)).tolist()
        stages, prev, index = [], stem_chs, 0
        for i, (depth, out_chs) in enumerate(zip(layers, channels)):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                if basic:
                    block = PreActBasicBlock(prev, out_chs, stride, groups=groups, drop_path_rate=rates[index])
                else:
                    block = PreActBottleneck(prev, out_chs, stride, bottle_ratio=bottle_ratio, groups=groups,
                                             width_per_group=width_per_group, drop_path_rate=rates[index])
                blocks.append(block)
                prev, index = out_chs, index + 1
            stages.append(Stage(blocks))
        self.stages = nn.Sequential(*stages)
        # The final norm is a plain BatchNorm2d: no statistics for it.
        stages[-1].blocks[-1].hand_off_stats = False
        self.num_features = prev
        self.norm = nn.BatchNorm2d(prev)
        self.head = Head(prev, num_classes)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # Each residual branch starts as zero (as timm's zero_init_last).
        for m in self.modules():
            if isinstance(m, (PreActBasicBlock, PreActBottleneck)):
                nn.init.zeros_((m.conv2 if isinstance(m, PreActBasicBlock) else m.conv3).weight)

    def forward_features(self, x):
        x = self.stages(self.stem(x))
        # The final pre-activation feeds a pooling, not a convolution: plain torch.
        return F.relu(self.norm(x))

    def forward(self, x):
        return self.head(self.forward_features(x))


def _resnet(layers, basic=False, **kwargs):
    if basic:
        kwargs.setdefault("channels", (64, 128, 256, 512))
        kwargs.setdefault("bottle_ratio", 1.0)
    return ResNetV2(layers, basic=basic, **kwargs)


def resnet18v2(**kwargs):
    return _resnet([2, 2, 2, 2], basic=True, **kwargs)


def resnet34v2(**kwargs):
    return _resnet([3, 4, 6, 3], basic=True, **kwargs)


def resnet50v2(**kwargs):
    return _resnet([3, 4, 6, 3], **kwargs)


def resnet101v2(**kwargs):
    return _resnet([3, 4, 23, 3], **kwargs)


def resnet152v2(**kwargs):
    return _resnet([3, 8, 36, 3], **kwargs)


def resnet200v2(**kwargs):
    return _resnet([3, 24, 36, 3], **kwargs)
