"""Drop-in modules built on the resfast ops."""

from resfast.nn.norm_act_conv import BNReLUConv2d, SyncBatchNorm2d, convert_sync_batchnorm
from resfast.nn.preact_blocks import PreActBasicBlock, PreActBottleneck, Projection
from resfast.nn.preact_res_block import PreActResBlock

__all__ = ["BNReLUConv2d", "PreActBasicBlock", "PreActBottleneck", "PreActResBlock", "Projection", "SyncBatchNorm2d",
           "convert_sync_batchnorm"]
