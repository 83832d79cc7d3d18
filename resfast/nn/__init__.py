"""Drop-in modules built on the resfast ops."""

from resfast.nn.norm_act_conv import BNReLUConv2d

__all__ = ["BNReLUConv2d"]
