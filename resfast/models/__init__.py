"""Models built from resfast's modules."""

from resfast.models.densenet import DenseNet, densenet121, densenet161, densenet169, densenet201, densenet264
from resfast.models.hourglass import StackedHourglass
from resfast.models.unet import UNet
from resfast.models.resnet_v2 import (
    ResNetV2,
    resnet18v2,
    resnet34v2,
    resnet50v2,
    resnet101v2,
    resnet152v2,
    resnet200v2,
)

__all__ = ["DenseNet", "ResNetV2", "densenet121", "densenet161", "densenet169", "densenet201", "densenet264",
           "StackedHourglass", "UNet", "resnet18v2", "resnet34v2", "resnet50v2", "resnet101v2", "resnet152v2", "resnet200v2"]
