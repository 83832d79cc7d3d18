"""Drop-in modules built on the resfast ops."""

from resfast.nn.dense import DenseBlock, DenseLayer, Transition
from resfast.nn.group_norm import GNActConv2d, GNActConv3d, GroupNorm, GroupNormAct
from resfast.nn.batch_norm import SyncBatchNorm2d, SyncBatchNorm3d, convert_sync_batchnorm
from resfast.nn.norm_act_conv import BNReLUConv2d, BNReLUConv3d
from resfast.nn.pooling import MaxPool2d
from resfast.nn.preact_blocks import PreActBasicBlock, PreActBottleneck, Projection
from resfast.nn.preact_res_block import PreActResBlock

__all__ = ["BNReLUConv2d", "BNReLUConv3d", "DenseBlock", "DenseLayer", "GNActConv2d", "GNActConv3d", "GroupNorm",
           "GroupNormAct", "MaxPool2d", "PreActBasicBlock", "PreActBottleneck", "PreActResBlock", "Projection",
           "SyncBatchNorm2d", "SyncBatchNorm3d", "Transition", "convert_sync_batchnorm"]
