"""The parts of a norm → activation → conv (or BatchNorm → activation → max
pool) chain that resfast.convert fuses, recognised by type, and the fused
unit they become: one function that reads
the modules' parameters and buffers where they are, at each call, so the
model keeps its modules, names and state dict.

Each `*_kind` function returns what the fused op needs (an activation name,
a conv weight rule) or raises Unsupported with the reason a recognised part
cannot be fused; None means "not this kind of part at all".
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn

from resfast.nn.batch_norm import BATCH_NORMS, BATCH_NORMS_3D, SyncBatchNorm2d, SyncBatchNorm3d, direct
from resfast.nn.group_norm import GroupNorm
from resfast.nn.norm_conv import affine_conv, batch_norm_conv, batch_norm_max_pool, conv_arguments, \
    group_norm_affine
from resfast.ops import conv_padding


class Unsupported(Exception):
    """A recognised pattern that cannot be converted exactly; the message says why."""


def _timm_layers():
    """timm.layers if timm is loaded (a model holding timm modules has loaded it); never imports it."""
    return sys.modules.get("timm.layers")


# ------------------------------------------------------------- activations
_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu"}
_ACTIVATION_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6", F.silu: "silu"}
_ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu"}
# Recognised but not fused (resfast's kernels apply identity, ReLU and SiLU only).
_OTHER_ACTIVATIONS = (nn.GELU, nn.LeakyReLU, nn.ELU, nn.PReLU, nn.Hardswish, nn.Mish, nn.Tanh, nn.Sigmoid)


def activation_module_kind(m: nn.Module):
    """'relu' / 'silu' for a module the fused kernels apply, Unsupported for
    another activation, None for anything else."""
    kind = _ACTIVATION_MODULES.get(type(m))
    if kind is not None:
        return kind
    if isinstance(m, _OTHER_ACTIVATIONS):
        raise Unsupported(f"activation {type(m).__name__} (resfast fuses ReLU, ReLU6, SiLU or none)")
    return None


def activation_call_kind(op: str, target):
    """The same for a traced function or method call (F.relu(x), x.relu())."""
    if op == "call_function":
        return _ACTIVATION_FUNCTIONS.get(target)
    if op == "call_method":
        return _ACTIVATION_METHODS.get(target)
    return None


def is_pass_through(m: nn.Module) -> bool:
    """Modules that return their input unchanged: nn.Identity, a dropout with
    p = 0 (diffusers' ResnetBlock2D default). A dropout with p > 0 is
    recognised and refused."""
    if type(m) is nn.Identity:
        return True
    if type(m) in (nn.Dropout, nn.Dropout2d, nn.Dropout3d):
        if m.p == 0:
            return True
        raise Unsupported(f"{type(m).__name__}(p={m.p}) between the normalisation and the convolution")
    return False


# ------------------------------------------------------------- norms
def _folded_activation(norm, where):
    """timm's BatchNormAct2d / GroupNormAct apply drop → act themselves."""
    if type(norm.drop) is not nn.Identity:
        raise Unsupported(f"{where} applies {type(norm.drop).__name__} before its activation")
    if type(norm.act) is nn.Identity:
        return "identity"
    kind = activation_module_kind(norm.act)
    if kind is None:
        raise Unsupported(f"{where} applies {type(norm.act).__name__} (resfast fuses ReLU, ReLU6, SiLU or none)")
    return kind


def norm_kind(m: nn.Module):
    """('batch' | 'group', folded activation or None) for a normalisation the
    fused units apply exactly; Unsupported for a recognised one they cannot;
    None for anything else."""
    layers = _timm_layers()
    if layers is not None and type(m) is layers.BatchNormAct2d:
        return "batch", _folded_activation(m, "BatchNormAct2d")
    if layers is not None and type(m) is layers.GroupNormAct:
        return "group", _folded_activation(m, "GroupNormAct")
    if type(m) in (nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, SyncBatchNorm2d, SyncBatchNorm3d):
        return "batch", None
    if type(m) in (nn.GroupNorm, GroupNorm):
        return "group", None
    if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm)):
        raise Unsupported(f"normalisation {type(m).__name__} has its own forward")
    return None


# ------------------------------------------------------------- convolutions
def conv_kind(m: nn.Module):
    """'plain' (nn.Conv2d, nn.Conv3d) or 'standardised' (timm's StdConv2d:
    weight standardisation per forward) for a convolution the fused op
    computes exactly; Unsupported for a recognised one it cannot; None for
    anything else."""
    layers = _timm_layers()
    if type(m) in (nn.Conv2d, nn.Conv3d) or (layers is not None and type(m) is layers.StdConv2d):
        if m.padding_mode != "zeros":
            raise Unsupported(f"conv padding_mode={m.padding_mode!r}")
        try:
            conv_padding(m.padding, m.kernel_size, m.dilation)
        except ValueError as e:
            raise Unsupported(f"conv {e}") from None
        return "plain" if type(m) in (nn.Conv2d, nn.Conv3d) else "standardised"
    if isinstance(m, (nn.Conv2d, nn.Conv3d)):
        raise Unsupported(f"convolution {type(m).__name__} has its own forward")
    return None


# ------------------------------------------------------------- pools
def pool_kind(m: nn.Module):
    """'max' for an nn.MaxPool2d the fused op computes; Unsupported for one
    it cannot (indices returned); None for anything else."""
    if type(m) is not nn.MaxPool2d:
        return None
    if m.return_indices:
        raise Unsupported("MaxPool2d(return_indices=True)")
    return "max"


def pool_mismatch(norm: nn.Module):
    """Why a normalisation (one norm_kind accepts) cannot be fused with the
    max pool after it, or None."""
    if not isinstance(norm, (nn.BatchNorm2d, nn.SyncBatchNorm)):  # timm's BatchNormAct2d is an nn.BatchNorm2d
        return f"{type(norm).__name__} before a max pool (resfast fuses a 2-D BatchNorm there)"
    return None


def rank_mismatch(norm: nn.Module, conv: nn.Module):
    """Why a BatchNorm of one rank cannot be fused with a convolution of
    another (nn.BatchNorm2d would reject the 5-D input an nn.Conv3d takes), or
    None."""
    norm_rank = 2 if isinstance(norm, nn.BatchNorm2d) else 3 if isinstance(norm, nn.BatchNorm3d) else None
    conv_rank = 3 if isinstance(conv, nn.Conv3d) else 2
    if norm_rank is not None and norm_rank != conv_rank:
        return f"{type(norm).__name__} feeds a {conv_rank}-D convolution {type(conv).__name__}"
    return None


def conv_weight(conv: nn.Module) -> torch.Tensor:
    """The weight conv's forward convolves with: timm's StdConv2d standardises
    each output channel's weights in every forward, exactly as it does."""
    if type(conv) in (nn.Conv2d, nn.Conv3d):
        return conv.weight
    if type(conv) is not getattr(_timm_layers(), "StdConv2d", None):
        raise TypeError(f"conv: expected an nn.Conv2d, nn.Conv3d or timm's StdConv2d, got {type(conv).__name__}")
    return F.batch_norm(conv.weight.reshape(1, conv.out_channels, -1), None, None, training=True, momentum=0.,
                        eps=conv.eps).reshape_as(conv.weight)


# ------------------------------------------------------------- the fused unit
def norm_act_conv(x: torch.Tensor, norm: nn.Module, conv: nn.Conv2d, activation: str) -> torch.Tensor:
    """conv(act(norm(x))) as one fused resfast op, with the modules' own
    parameters, buffers and training mode (the norm's, as its forward would
    use): what a converted model's forward calls in place of the chain."""
    weight = conv_weight(conv)
    if isinstance(norm, BATCH_NORMS + BATCH_NORMS_3D):
        return batch_norm_conv(norm, conv, x, norm.training, activation=activation, weight=weight)
    if direct(x, None, weight):
        return torch.ops.resfast.group_norm_act_conv2d(x, norm.num_groups, norm.weight, norm.bias, norm.eps, weight,
                                                       conv.bias, None, *conv_arguments(conv), activation)
    affine = group_norm_affine(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return affine_conv(x, affine, conv, weight, conv.bias, None, activation)


def norm_act_max_pool(x: torch.Tensor, norm: nn.Module, pool: nn.MaxPool2d, activation: str) -> torch.Tensor:
    """pool(act(norm(x))) as one resfast op: what a converted model's forward calls in place of the chain."""
    return batch_norm_max_pool(norm, pool, x, activation)
