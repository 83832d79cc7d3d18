"""Drop-in modules built on the resfast ops."""

from resfast.nn.norm_act_conv import BNReLUConv2d
from resfast.nn.preact_blocks import PreActBasicBlock, PreActBottleneck, Projection

__all__ = ["BNReLUConv2d", "PreActBasicBlock", "PreActBottleneck", "Projection"]
