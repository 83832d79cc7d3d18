"""Argument checks of the Python entry points and the Triton kernels, with the
messages of the C++ kernels' checks (csrc/common/checks.cpp): each names the
argument and what was expected."""

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ACTIVATIONS = ("identity", "relu", "silu")


def check_activation_input(x, name="x", dtypes=FLOAT_DTYPES):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D (N, C, H, W) tensor, got {x.dim()}-D with shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected one of {names}, got {x.dtype}")


def check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected 'identity', 'relu' or 'silu', got {activation!r}")


def check_same_device(x, **tensors):
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} like x, got one on {t.device}")


def check_channel_vector(x, name, t):
    if t is not None and (t.dim() != 1 or t.shape[0] != x.shape[1]):
        raise ValueError(f"{name}: expected shape ({x.shape[1]},) for input of shape {tuple(x.shape)}, "
                         f"got {tuple(t.shape)}")


def check_conv_args(x, weight, stride, padding, dilation, groups):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight: expected a 4-D (out_channels, in_channels/groups, kH, kW) tensor, got {shape}")
    check_same_device(x, weight=weight)
    if not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"groups: expected a positive integer, got {groups!r}")
    if x.shape[1] % groups or weight.shape[0] % groups:
        raise ValueError(f"groups: expected to divide in_channels ({x.shape[1]}) and out_channels "
                         f"({weight.shape[0]}), got {groups}")
    if weight.shape[1] * groups != x.shape[1]:
        raise ValueError(f"weight: expected in_channels/groups = {x.shape[1] // groups} in dim 1 for input of "
                         f"shape {tuple(x.shape)}, got shape {tuple(weight.shape)}")
    for name, value, low in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(value) != 2 or any((not isinstance(v, int)) or v < low for v in value):
            kind = "positive" if low else "non-negative"
            raise ValueError(f"{name}: expected two {kind} integers, got {value!r}")
    for d in range(2):
        if x.shape[2 + d] + 2 * padding[d] - dilation[d] * (weight.shape[2 + d] - 1) <= 0:
            raise ValueError(f"input: spatial size {tuple(x.shape)} (padded) is smaller than the dilated kernel "
                             f"{tuple(weight.shape)}")
