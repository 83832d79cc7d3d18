"""BatchNorm → activation → max pool (a ResNet stem's bn1 → relu → maxpool)
as one op that saves only x and the per-channel vectors
(csrc/norm_act_max_pool.cpp: the kernels, in ATen ops for every device)."""

import operator

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from resfast.activations import check_activation
from resfast.ops import registry
from resfast.ops.checks import check_activation_input
from resfast.ops.norm_act_conv import NormAffine

registry.define("norm_act_max_pool2d", composite="explicit")
registry.define("norm_act_max_pool2d_backward", composite="explicit")


def max_pool_args(kernel_size, stride=None, padding=0, dilation=1):
    """nn.MaxPool2d's kernel_size, stride (None or empty: the kernel size),
    padding and dilation as the op's int lists, checked as F.max_pool2d checks them."""
    def pair(name, value, low):
        values = list(_pair(value))
        try:
            values = [operator.index(v) for v in values * (2 if len(values) == 1 else 1)]
        except TypeError:
            values = None
        if values is None or len(values) != 2 or min(values) < low:
            raise ValueError(f"{name}: expected one or two ints >= {low}, got {value!r}")
        return values

    kernel_size = pair("kernel_size", kernel_size, 1)
    stride = kernel_size if stride is None or len(_pair(stride)) == 0 else pair("stride", stride, 1)
    padding, dilation = pair("padding", padding, 0), pair("dilation", dilation, 1)
    if any(2 * p > k for p, k in zip(padding, kernel_size)):
        raise ValueError(f"padding: expected at most half the kernel size {kernel_size}, got {padding}")
    return kernel_size, stride, padding, dilation


def norm_act_max_pool2d(x: torch.Tensor, affine: NormAffine, kernel_size, stride=None, padding=0, dilation=1,
                        ceil_mode=False, activation="relu") -> torch.Tensor:
    """F.max_pool2d(act((x - mean) * scale + shift), ...) with per-channel
    (C,) vectors (a BatchNorm's, from batch_norm_affine), saving only x and
    the vectors for backward; nn.MaxPool2d's arguments."""
    check_activation_input(x)
    check_activation(activation)
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    args = max_pool_args(kernel_size, stride, padding, dilation)
    return torch.ops.resfast.norm_act_max_pool2d(x, affine.mean, affine.scale, affine.shift, *args, bool(ceil_mode),
                                                 activation, affine.batch_invstd)


def max_pool2d(x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False) -> torch.Tensor:
    """F.max_pool2d(x, ...) as norm_act_max_pool2d with the identity
    normalisation, on CPU tensors: the same values (a -0.0 maximum comes out
    +0.0) and, as ATen chooses them, the same gradients; only x is saved (not
    also the int64 indices), and NCHW float32/float64 input runs resfast's
    loop. Other devices go to F.max_pool2d: there the op is ATen calls
    around the same pool, and costs more than it saves."""
    if not x.is_cpu or x.dim() != 4 or x.numel() == 0 or not x.is_floating_point():
        return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
    args = max_pool_args(kernel_size, stride, padding, dilation)
    zeros = torch.zeros(x.shape[1], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                        device=x.device)
    return torch.ops.resfast.norm_act_max_pool2d(x, zeros, torch.ones_like(zeros), zeros, *args, bool(ceil_mode),
                                                 "identity", None)
