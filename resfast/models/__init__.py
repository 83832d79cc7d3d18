"""Models built from resfast's modules."""

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

__all__ = ["ResNetV2", "StackedHourglass", "UNet", "resnet18v2", "resnet34v2", "resnet50v2", "resnet101v2", "resnet152v2", "resnet200v2"]
