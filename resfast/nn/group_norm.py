"""GroupNorm modules: a drop-in nn.GroupNorm, GroupNorm + activation in one
pass, and the fused GroupNorm → activation → conv unit."""

import torch
from torch import nn

from resfast import ops
from resfast.activations import check_activation
from resfast.nn.batch_norm import direct
from resfast.nn.members import child, plain, tensor
from resfast.nn.norm_act_conv import NormActConvUnit
from resfast.nn.norm_conv import conv_arguments, norm_conv


@plain
class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same constructor, parameters and state_dict) on resfast's
    GroupNorm kernels: fast on channels_last, statistics in float32 with a
    stable method, and only the input saved for backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.group_norm(x, self.num_groups, tensor(self, "weight"), tensor(self, "bias"), self.eps)


@plain
class GroupNormAct(nn.GroupNorm):
    """act(GroupNorm(x)) in one pass, act in {"identity", "relu", "relu6", "silu"};
    parameters and state_dict as nn.GroupNorm. The backward recomputes the
    activation's input from x: one saved tensor where GroupNorm followed by
    nn.SiLU saves two."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, activation="silu", device=None, dtype=None,
                 *, bias=True):
        check_activation(activation)
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype, bias=bias)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.group_norm(x, self.num_groups, tensor(self, "weight"), tensor(self, "bias"), self.eps,
                              self.activation)

    def extra_repr(self):
        return f"{super().extra_repr()}, activation={self.activation!r}"


class _GroupNormActConv(NormActConvUnit):
    """The GroupNorm units of both ranks: construction and forward."""

    norm_attr, norm_types, channels_attr, default_activation = "norm", (nn.GroupNorm,), "num_channels", "silu"
    norm_description = "an nn.GroupNorm"

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 num_groups=32, eps=1e-5, affine=True, activation="silu", device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        norm = GroupNorm(num_groups, in_channels, eps, affine, **factory)
        conv = self.conv_type(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                              **factory)
        self._adopt(norm, conv, activation)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        norm, conv = child(self, "norm"), child(self, "conv")
        self.check_input(x, conv)
        norm_weight, norm_bias, weight = tensor(norm, "weight"), tensor(norm, "bias"), tensor(conv, "weight")
        if direct(x, residual, weight):
            return torch.ops.resfast.group_norm_act_conv2d(x, norm.num_groups, norm_weight, norm_bias, norm.eps,
                                                           weight, tensor(conv, "bias"), residual,
                                                           *conv_arguments(conv), self.activation)
        affine = ops.group_norm_affine(x, norm.num_groups, norm_weight, norm_bias, norm.eps)
        return norm_conv(x, affine, conv, residual, self.activation)


class GNActConv2d(_GroupNormActConv):
    """conv(act(group_norm(x))) with the normalised activation never stored.

    Holds an nn.GroupNorm-compatible `norm` and an `nn.Conv2d` `conv` for their
    parameters, so state dicts match `nn.Sequential(norm, act, conv)` keyed
    `norm.*` / `conv.*`. The GroupNorm statistics become a per-(sample,
    channel) scale/shift applied in the fused convolution's prologue; backward
    recomputes the activation from x. `forward(x, residual=None)` adds
    `residual` in the convolution's epilogue.
    """


class GNActConv3d(_GroupNormActConv):
    """GNActConv2d for volumes: conv3d(act(group_norm(x))) on 5-D (N, C, D, H,
    W) input, NCDHW or channels_last_3d, with an nn.GroupNorm-compatible `norm`
    and an `nn.Conv3d` `conv` (MONAI's GroupNorm(8) -> ReLU -> Conv3d blocks
    with activation="relu")."""

    conv_type = nn.Conv3d
