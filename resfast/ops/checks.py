"""Argument checks of the Python entry points and of the ops' Python kernels
(the registry's op-level checks are built from these), with the messages of
the C++ kernels' checks (csrc/common/checks.cpp): each names the argument and
what was expected. The Triton launchers below only assert."""

import torch

from resfast.activations import check_activation  # noqa: F401  (re-exported: one list of activations)
from resfast.ops.layout import conv_output_size, kernel_format, spatial_numel

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The Triton kernels index rows (N*H*W or N*D*H*W positions) in int32.
MAX_ROWS = 2**31 - 1


def _dtype_names(dtypes):
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_activation_input(x, name="x", dtypes=FLOAT_DTYPES):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (4, 5):
        raise ValueError(f"{name}: expected a 4-D (N, C, H, W) or 5-D (N, C, D, H, W) tensor, got {x.dim()}-D with "
                         f"shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name}: expected one of {_dtype_names(dtypes)}, got {x.dtype}")


def triton_input(x, name="x"):
    """x for the Triton kernels: a dtype they support, at most MAX_ROWS
    positions, contiguous in its kernel format (a no-op for NC(D)HW and
    channels_last tensors)."""
    check_activation_input(x, name, TRITON_DTYPES)
    rows = x.shape[0] * spatial_numel(x)
    if rows > MAX_ROWS:
        raise ValueError(f"{name}: {rows} positions (N times the spatial size) exceeds the kernels' int32 row "
                         f"index")
    return x.contiguous(memory_format=kernel_format(x))


def check_same_device(x, **tensors):
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} like x, got one on {t.device}")


def check_channel_vector(x, name, t):
    if t is not None and (t.dim() != 1 or t.shape[0] != x.shape[1]):
        raise ValueError(f"{name}: expected shape ({x.shape[1]},) for input of shape {tuple(x.shape)}, "
                         f"got {tuple(t.shape)}")


def check_conv_args(x, weight, stride, padding, dilation, groups):
    if not isinstance(weight, torch.Tensor) or weight.dim() != x.dim():
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        taps = "kH, kW" if x.dim() == 4 else "kD, kH, kW"
        raise ValueError(f"weight: expected a {x.dim()}-D (out_channels, in_channels/groups, {taps}) tensor for "
                         f"{x.dim()}-D input, got {shape}")
    check_same_device(x, weight=weight)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"groups: expected a positive integer, got {groups!r}")
    if x.shape[1] % groups or weight.shape[0] % groups:
        raise ValueError(f"groups: expected to divide in_channels ({x.shape[1]}) and out_channels "
                         f"({weight.shape[0]}), got {groups}")
    if weight.shape[1] * groups != x.shape[1]:
        raise ValueError(f"weight: expected in_channels/groups = {x.shape[1] // groups} in dim 1 for input of "
                         f"shape {tuple(x.shape)}, got shape {tuple(weight.shape)}")
    dims = x.dim() - 2
    for name, value, low in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(value) != dims or any((not isinstance(v, int)) or v < low for v in value):
            kind = "positive" if low else "non-negative"
            raise ValueError(f"{name}: expected {'two' if dims == 2 else 'three'} {kind} integers, got {value!r}")
    if min(conv_output_size(x, weight, stride, padding, dilation)) < 1:
        raise ValueError(f"input: spatial size {tuple(x.shape)} (padded) is smaller than the dilated kernel "
                         f"{tuple(weight.shape)}")
