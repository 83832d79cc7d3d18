"""Benchmark cases: each builds the eager torch module and the resfast module
with the same weights, and an input."""

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

import resfast


@dataclass(frozen=True)
class UnitCase:
    """One BN→ReLU→conv unit of a pre-activation ResNet."""

    name: str
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    size: int  # input H = W

    def config(self, batch):
        return {"case": self.name, "batch": batch, **asdict(self)}

    def build(self, batch, device, dtype, channels_last):
        unit = resfast.nn.BNReLUConv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                       self.kernel_size // 2)
        eager = nn.Sequential(copy.deepcopy(unit.bn), nn.ReLU(inplace=True), copy.deepcopy(unit.conv))
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        unit = unit.to(device=device, dtype=dtype, memory_format=fmt)
        eager = eager.to(device=device, dtype=dtype, memory_format=fmt)
        x = torch.randn(batch, self.in_channels, self.size, self.size, device=device, dtype=dtype)
        return eager, unit, x.contiguous(memory_format=fmt)


# Units at ResNet-200 shapes (224x224 input): the bottleneck's 1x1 reduce and
# 3x3 in stages 1-3, and the 1x1 expand of stage 2.
OPS = [
    UnitCase("unit 1x1 256->64 @56", 256, 64, 1, 1, 56),
    UnitCase("unit 3x3 64->64 @56", 64, 64, 3, 1, 56),
    UnitCase("unit 3x3 128->128 @28", 128, 128, 3, 1, 28),
    UnitCase("unit 1x1 128->512 @28", 128, 512, 1, 1, 28),
    UnitCase("unit 3x3 256->256 @14", 256, 256, 3, 1, 14),
]
QUICK_OPS = OPS[:3]

SUITES = {"ops": OPS}
QUICK_SUITES = {"ops": QUICK_OPS}
