"""BatchNorm → activation → max pool (a ResNet stem's bn1 → relu → maxpool)
as one op that saves only x and the per-channel vectors
(csrc/norm_act_max_pool.cpp: the kernels, in ATen ops for every device)."""

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
    kernel_size = list(_pair(kernel_size))
    stride = kernel_size if stride is None or stride == [] or stride == () else list(_pair(stride))
    padding, dilation = list(_pair(padding)), list(_pair(dilation))
    for name, values, low in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0),
                              ("dilation", dilation, 1)):
        if len(values) != 2 or not all(isinstance(v, int) and v >= low for v in values):
            raise ValueError(f"{name}: expected one or two ints >= {low}, got {values}")
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
    normalisation (exact), wherever that gains: NCHW float32/float64 CPU input
    (resfast's loop) and inputs that need a gradient (only x saved, not also
    the int64 indices). Everything else goes to F.max_pool2d."""
    fast_loop = x.is_cpu and x.dtype in (torch.float32, torch.float64) and x.is_contiguous()
    if x.dim() != 4 or x.numel() == 0 or not x.is_floating_point() or not (
            fast_loop or (x.requires_grad and torch.is_grad_enabled())):
        return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
    args = max_pool_args(kernel_size, stride, padding, dilation)
    zeros = torch.zeros(x.shape[1], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                        device=x.device)
    return torch.ops.resfast.norm_act_max_pool2d(x, zeros, torch.ones_like(zeros), zeros, *args, bool(ceil_mode),
                                                 "identity", None)
