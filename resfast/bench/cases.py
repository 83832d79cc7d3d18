"""Benchmark cases: each builds the eager torch module and the resfast module
with the same weights, and an input."""

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

import resfast


def _same_weights(eager, ours):
    ours.load_state_dict(eager.state_dict(), strict=True)
    return eager, ours


def _place(eager, ours, x, device, dtype, channels_last):
    fmt = torch.contiguous_format
    if channels_last:
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    eager = eager.to(device=device, dtype=dtype, memory_format=fmt)
    ours = ours.to(device=device, dtype=dtype, memory_format=fmt)
    return eager, ours, x.to(device=device, dtype=dtype).contiguous(memory_format=fmt)


def _timm_resnetv2(**kwargs):
    from timm.layers import BatchNormAct2d, create_conv2d
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(conv_layer=create_conv2d, norm_layer=BatchNormAct2d, **kwargs)


class _Case:
    # Batch sizes by device; a whole ResNet-200 step takes seconds on a CPU.
    batch = {"cuda": 32, "cpu": 8, "quick": 2}

    def bare_conv(self, eager):
        """The unit's convolution alone (its input as the unit's), for the
        limit a unit can reach; None for cases that are not one unit."""
        return None

    def default_batch(self, device_type, quick):
        return self.batch["quick" if quick else device_type]

    def config(self, batch):
        return {"case": self.name, "batch": batch, **asdict(self)}


@dataclass(frozen=True)
class UnitCase(_Case):
    """One BN→ReLU→conv unit of a pre-activation ResNet."""

    name: str
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    size: int  # input H = W

    def build(self, batch, device, dtype, channels_last):
        unit = resfast.nn.BNReLUConv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                       self.kernel_size // 2)
        eager = nn.Sequential(copy.deepcopy(unit.bn), nn.ReLU(inplace=True), copy.deepcopy(unit.conv))
        x = torch.randn(batch, self.in_channels, self.size, self.size)
        return _place(eager, unit, x, device, dtype, channels_last)

    def bare_conv(self, eager):
        return copy.deepcopy(eager[2])


@dataclass(frozen=True)
class BottleneckCase(_Case):
    """One pre-activation bottleneck against timm's (plain torch.nn) block."""

    name: str
    in_chs: int
    out_chs: int
    stride: int
    size: int

    def build(self, batch, device, dtype, channels_last):
        from functools import partial

        from timm.layers import BatchNormAct2d, create_conv2d
        from timm.models.resnetv2 import DownsampleConv, PreActBottleneck

        proj = partial(DownsampleConv, preact=True) if self.in_chs != self.out_chs or self.stride != 1 else None
        eager = PreActBottleneck(self.in_chs, self.out_chs, stride=self.stride, conv_layer=create_conv2d,
                                 norm_layer=BatchNormAct2d, proj_layer=proj)
        eager, ours = _same_weights(eager, resfast.nn.PreActBottleneck(self.in_chs, self.out_chs, self.stride))
        x = torch.randn(batch, self.in_chs, self.size, self.size)
        return _place(eager, ours, x, device, dtype, channels_last)


@dataclass(frozen=True)
class ResNetV2Case(_Case):
    """A whole pre-activation ResNet against timm's eager ResNetV2."""

    batch = {"cuda": 32, "cpu": 2, "quick": 2}

    name: str
    layers: tuple
    size: int

    def build(self, batch, device, dtype, channels_last):
        eager, ours = _same_weights(_timm_resnetv2(layers=list(self.layers)),
                                    resfast.models.ResNetV2(list(self.layers)))
        x = torch.randn(batch, 3, self.size, self.size)
        return _place(eager, ours, x, device, dtype, channels_last)


@dataclass(frozen=True)
class UNetCase(_Case):
    """A whole U-Net against its plain torch.nn twin (torch.cat skips), for
    images or (spatial_dims=3) volumes."""

    batch = {"cuda": 8, "cpu": 2, "quick": 1}

    name: str
    widths: tuple
    norm: str
    size: int
    spatial_dims: int = 2
    in_channels: int = 3
    num_groups: int = 32

    def default_batch(self, device_type, quick):
        return 1 if self.spatial_dims == 3 else super().default_batch(device_type, quick)

    def build(self, batch, device, dtype, channels_last):
        from resfast.bench.references import EagerUNet

        cfg = dict(in_channels=self.in_channels, out_channels=2, widths=self.widths, norm=self.norm,
                   num_groups=self.num_groups, spatial_dims=self.spatial_dims)
        eager, ours = _same_weights(EagerUNet(**cfg), resfast.models.UNet(**cfg))
        x = torch.randn(batch, self.in_channels, *([self.size] * self.spatial_dims))
        return _place(eager, ours, x, device, dtype, channels_last)


@dataclass(frozen=True)
class GroupNormActCase(_Case):
    """GroupNorm + SiLU (resfast.nn.GroupNormAct) against nn.GroupNorm, nn.SiLU.
    channels_last is part of the case: torch's GroupNorm is much slower on it."""

    batch = {"cuda": 16, "cpu": 4, "quick": 2}

    name: str
    channels: int
    groups: int
    size: int
    channels_last: bool

    def build(self, batch, device, dtype, channels_last):
        ours = resfast.nn.GroupNormAct(self.groups, self.channels, activation="silu")
        eager = nn.Sequential(nn.GroupNorm(self.groups, self.channels), nn.SiLU())
        with torch.no_grad():
            eager[0].weight.uniform_(0.5, 1.5)
            eager[0].bias.uniform_(-0.5, 0.5)
        ours.load_state_dict(eager[0].state_dict())
        x = torch.randn(batch, self.channels, self.size, self.size)
        return _place(eager, ours, x, device, dtype, channels_last or self.channels_last)


@dataclass(frozen=True)
class GNActConvCase(_Case):
    """One GN→SiLU→conv3x3 unit (resfast.nn.GNActConv2d) against its eager twin."""

    batch = {"cuda": 16, "cpu": 4, "quick": 2}

    name: str
    in_channels: int
    out_channels: int
    groups: int
    size: int
    channels_last: bool

    def build(self, batch, device, dtype, channels_last):
        unit = resfast.nn.GNActConv2d(self.in_channels, self.out_channels, 3, padding=1, num_groups=self.groups)
        eager = nn.Sequential(nn.GroupNorm(self.groups, self.in_channels), nn.SiLU(),
                              nn.Conv2d(self.in_channels, self.out_channels, 3, padding=1))
        eager[0].load_state_dict(unit.norm.state_dict())
        eager[2].load_state_dict(unit.conv.state_dict())
        x = torch.randn(batch, self.in_channels, self.size, self.size)
        return _place(eager, unit, x, device, dtype, channels_last or self.channels_last)

    def bare_conv(self, eager):
        return copy.deepcopy(eager[2])


# GroupNorm at U-Net / diffusion shapes (32 groups), both memory formats.
GROUP_NORM = [GroupNormActCase(f"GroupNorm+SiLU {c}@{s} {'cl' if cl else 'nchw'}", c, 32, s, cl)
              for c, s in ((128, 64), (256, 32), (512, 16)) for cl in (False, True)]
GN_UNITS = [GNActConvCase(f"GroupNorm->SiLU->conv3x3 {c}@{s} {'cl' if cl else 'nchw'}", c, c, 32, s, cl)
            for c, s in ((128, 32),) for cl in (False, True)]
QUICK_GROUP_NORM = [GroupNormActCase(f"GroupNorm+SiLU 64@32 {'cl' if cl else 'nchw'}", 64, 32, 32, cl)
                    for cl in (False, True)]
QUICK_GN_UNITS = [GNActConvCase(f"GroupNorm->SiLU->conv3x3 64@16 {'cl' if cl else 'nchw'}", 64, 64, 32, 16, cl)
                  for cl in (False, True)]


@dataclass(frozen=True)
class DenseBlockCase(_Case):
    """One DenseNet dense block against torchvision's (torch.cat of all features)."""

    name: str
    num_layers: int
    in_channels: int
    size: int
    growth_rate: int = 32

    def build(self, batch, device, dtype, channels_last):
        from torchvision.models.densenet import _DenseBlock

        eager = _DenseBlock(self.num_layers, self.in_channels, bn_size=4, growth_rate=self.growth_rate, drop_rate=0)
        eager, ours = _same_weights(eager, resfast.nn.DenseBlock(self.num_layers, self.in_channels, 4,
                                                                 self.growth_rate))
        x = torch.randn(batch, self.in_channels, self.size, self.size)
        return _place(eager, ours, x, device, dtype, channels_last)


@dataclass(frozen=True)
class DenseNetCase(_Case):
    """A whole DenseNet against torchvision's, eager or with memory_efficient=True
    (checkpointed bottlenecks)."""

    batch = {"cuda": 32, "cpu": 2, "quick": 1}

    name: str
    block_config: tuple
    size: int
    memory_efficient: bool = False

    def build(self, batch, device, dtype, channels_last):
        import torchvision

        cfg = dict(growth_rate=32, block_config=self.block_config, num_init_features=64)
        eager = torchvision.models.DenseNet(**cfg, memory_efficient=self.memory_efficient)
        eager, ours = _same_weights(eager, resfast.models.DenseNet(**cfg))
        x = torch.randn(batch, 3, self.size, self.size)
        return _place(eager, ours, x, device, dtype, channels_last)


# Units at ResNet-200 shapes (224x224 input): the bottleneck's 1x1 reduce and
# 3x3 in stages 1-3, and the 1x1 expand of stage 2.
OPS = [
    UnitCase("unit 1x1 256->64 @56", 256, 64, 1, 1, 56),
    UnitCase("unit 3x3 64->64 @56", 64, 64, 3, 1, 56),
    UnitCase("unit 3x3 128->128 @28", 128, 128, 3, 1, 28),
    UnitCase("unit 1x1 128->512 @28", 128, 512, 1, 1, 28),
    UnitCase("unit 3x3 256->256 @14", 256, 256, 3, 1, 14),
]
QUICK_OPS = OPS[:3] + QUICK_GROUP_NORM + QUICK_GN_UNITS
OPS = OPS + GROUP_NORM + GN_UNITS

BLOCKS = [
    BottleneckCase("bottleneck 256->256 @56", 256, 256, 1, 56),
    BottleneckCase("bottleneck 512->1024 /2 @28", 512, 1024, 2, 28),
    DenseBlockCase("dense block 6 layers 64+6x32 @56", 6, 64, 56),
]
QUICK_BLOCKS = [BottleneckCase("bottleneck 256->256 @28", 256, 256, 1, 28),
                DenseBlockCase("dense block 6 layers 64+6x32 @28", 6, 64, 28)]

CLASSIC_UNET = (64, 128, 256, 512, 1024)
MODELS = [ResNetV2Case("ResNet-200 @224", (3, 24, 36, 3), 224),
          UNetCase("U-Net GN @256", CLASSIC_UNET, "group", 256),
          DenseNetCase("DenseNet-121 @224", (6, 12, 24, 16), 224),
          DenseNetCase("DenseNet-121 @224 vs memory_efficient", (6, 12, 24, 16), 224, True),
          DenseNetCase("DenseNet-264 @224", (6, 12, 64, 48), 224),
          DenseNetCase("DenseNet-264 @224 vs memory_efficient", (6, 12, 64, 48), 224, True)]
QUICK_MODELS = [ResNetV2Case("ResNet-200 @64", (3, 24, 36, 3), 64),
                UNetCase("U-Net GN (32-512) @64", (32, 64, 128, 256, 512), "group", 64),
                DenseNetCase("DenseNet-121 @64", (6, 12, 24, 16), 64),
                DenseNetCase("DenseNet-264 @64", (6, 12, 64, 48), 64)]

@dataclass(frozen=True)
class SegResNetCase(_Case):
    """MONAI's SegResNet (3-D, its defaults) against resfast.convert of it."""

    batch = {"cuda": 2, "cpu": 1, "quick": 1}

    name: str
    size: int

    def build(self, batch, device, dtype, channels_last):
        from monai.networks.nets import SegResNet

        eager = SegResNet(spatial_dims=3, in_channels=1, out_channels=2)
        ours, _ = resfast.convert(eager)
        x = torch.randn(batch, 1, self.size, self.size, self.size)
        return _place(eager, ours, x, device, dtype, channels_last)


# Volumes (CT/MRI crops): one channel in, GroupNorm(8) as MONAI's nets use it.
VOLUME_UNET = (32, 64, 128, 256)
VOLUMES = [UNetCase("3-D U-Net GN (32-256) @128", VOLUME_UNET, "group", 128, 3, 1, 8),
           SegResNetCase("MONAI SegResNet 3-D converted @128", 128)]
QUICK_VOLUMES = [UNetCase("3-D U-Net GN (32-256) @64", VOLUME_UNET, "group", 64, 3, 1, 8),
                 SegResNetCase("MONAI SegResNet 3-D converted @64", 64)]

SUITES = {"ops": OPS, "blocks": BLOCKS, "models": MODELS, "volumes": VOLUMES}
QUICK_SUITES = {"ops": QUICK_OPS, "blocks": QUICK_BLOCKS, "models": QUICK_MODELS, "volumes": QUICK_VOLUMES}
