"""resfast: fused kernels for pre-activation residual, dense and U-shaped conv nets."""

from resfast import models, nn, ops
from resfast.conversion import convert
from resfast.ops.backend import backend

__version__ = "0.1.0"
__all__ = ["backend", "convert", "models", "nn", "ops"]
