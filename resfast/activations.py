"""The activations the fused ops apply, by name. Their order is the ACT code
the Triton kernels take; csrc/common/checks.cpp parses the same names for the
C++ kernels."""

import torch
import torch.nn.functional as F

ACTIVATIONS = ("identity", "relu", "silu")


def check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected 'identity', 'relu' or 'silu', got {activation!r}")


def activation_code(activation) -> int:
    """The ACT constexpr of the Triton kernels."""
    return ACTIVATIONS.index(activation)


def activate(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return F.relu(z)
    if activation == "silu":
        return F.silu(z)
    return z


def activation_grad(z: torch.Tensor, activation: str) -> torch.Tensor:
    """d act / dz at z, as torch's backward computes it."""
    if activation == "relu":
        return (~(z <= 0)).to(z.dtype)  # torch's threshold_backward: 1 at NaN
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    return torch.ones_like(z)
