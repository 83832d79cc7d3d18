"""The activations the fused ops apply, by name. Their order is the ACT code
the Triton kernels take; csrc/common/checks.cpp parses the same names for the
C++ kernels."""

import torch
import torch.nn.functional as F

ACTIVATIONS = ("identity", "relu", "silu", "relu6")


def check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected 'identity', 'relu', 'relu6' or 'silu', got {activation!r}")


def activation_code(activation) -> int:
    """The ACT constexpr of the Triton kernels."""
    return ACTIVATIONS.index(activation)


def activate(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return F.relu(z)
    if activation == "silu":
        return F.silu(z)
    if activation == "relu6":
        return F.relu6(z)
    return z


def activation_grad(z: torch.Tensor, activation: str) -> torch.Tensor:
    """d act / dz at z, as torch's backward computes it."""
    if activation == "relu":
        return (~(z <= 0)).to(z.dtype)  # torch's threshold_backward: 1 at NaN
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if activation == "relu6":
        return (~((z <= 0) | (z >= 6))).to(z.dtype)  # torch's hardtanh_backward: 1 at NaN
    return torch.ones_like(z)
