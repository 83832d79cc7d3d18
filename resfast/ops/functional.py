"""The functional API: torch.nn.functional-style entry points that validate
their arguments, handle autocast, and compose the registered resfast ops."""

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from resfast.ops.checks import (
    FLOAT_DTYPES,
    check_activation,
    check_activation_input,
    check_channel_vector,
    check_conv_args,
    check_same_device,
)
from resfast.ops.layout import accumulation_dtype

ops = torch.ops.resfast
_ACTIVATIONS = {"identity": lambda t: t, "relu": F.relu, "silu": F.silu}


def conv_padding(padding, kernel_size, dilation):
    """nn.Conv2d's padding argument (int, pair, 'valid' or 'same') as a pair of ints."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
        if any(t % 2 for t in total):
            raise ValueError(f"padding: 'same' needs symmetric padding, which kernel_size {tuple(kernel_size)} with "
                             f"dilation {tuple(dilation)} does not give; pad explicitly")
        return tuple(t // 2 for t in total)
    if isinstance(padding, str):
        raise ValueError(f"padding: expected an int, a pair of ints, 'valid' or 'same', got {padding!r}")
    return _pair(padding)


def channel_stats(x):
    """Per-channel mean and biased variance of an (N, C, H, W) tensor over (N, H, W)."""
    check_activation_input(x)
    return ops.channel_stats(x)


def _autocast_compute(x, weight, bias):
    """The dtypes the torch modules would compute in under autocast: the
    convolution in the autocast dtype, the normalisation in float32."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type) or x.dtype == torch.float64:
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    weight = weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    if x.dtype not in (torch.float32, dtype):
        x = x.float()
    return x, weight, bias


def _unit_args(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups, activation):
    """The fused unit's arguments checked, conv arguments as int lists, and
    x, weight and bias in the dtypes autocast computes in."""
    check_activation_input(x)
    check_activation(activation)
    stride, dilation = _pair(stride), _pair(dilation)
    padding = conv_padding(padding, weight.shape[2:], dilation)
    check_conv_args(x, weight, stride, padding, dilation, groups)
    check_same_device(x, mean=mean, scale=scale, shift=shift, bias=bias, residual=residual)
    x, weight, bias = _autocast_compute(x, weight, bias)
    return x, weight, bias, list(stride), list(padding), list(dilation)


def norm_act_conv2d(x, mean, scale, shift, weight, bias=None, residual=None, stride=1, padding=0, dilation=1,
                    groups=1, activation="relu", batch_invstd=None):
    """conv2d(act((x - mean) * scale + shift), weight, bias) + residual, fused:
    the normalised activation is never stored; backward recomputes it.

    batch_invstd: when mean and scale are x's own statistics (computed
    without autograd), their 1/sqrt(var + eps): (C,) for training-mode
    BatchNorm, scale = gamma * batch_invstd; (N, G) for GroupNorm with G
    groups, per-(sample, channel) mean and scale = gamma * batch_invstd of
    the channel's group. x's gradient then includes the statistics'."""
    x, weight, bias, stride, padding, dilation = _unit_args(x, mean, scale, shift, weight, bias, residual, stride,
                                                            padding, dilation, groups, activation)
    fused_residual = residual if residual is not None and residual.dtype == weight.dtype else None
    y = ops.norm_act_conv2d(x, mean, scale, shift, weight, bias, fused_residual, stride, padding, dilation, groups,
                            activation, batch_invstd)
    if residual is not None and fused_residual is None:
        y = y + residual  # mixed dtypes (autocast): promote as eager torch does
    return y


def norm_act_conv2d_into(x, mean, scale, shift, weight, out, out_offset, bias=None, residual=None, stride=1, padding=0,
                         dilation=1, groups=1, activation="relu", compute_stats=False):
    """norm_act_conv2d whose epilogue stores its result straight into the
    channel slice out[:, out_offset:out_offset + weight.shape[0]] of a
    preallocated NCHW- or channels_last-contiguous buffer (no temporary output,
    no copy); the buffer's other channels are left untouched.

    Returns the per-channel (mean, biased variance) of the stored values when
    compute_stats (the next BatchNorm's batch statistics, float32, float64 for
    float64), else two empty tensors. Not differentiable: gradients are
    composed from the fused op's backward by the caller (see resfast.nn's
    dense block)."""
    check_activation_input(x)
    check_activation_input(out, "out")
    check_activation(activation)
    stride, dilation = _pair(stride), _pair(dilation)
    padding = conv_padding(padding, weight.shape[2:], dilation)
    check_conv_args(x, weight, stride, padding, dilation, groups)
    check_same_device(x, mean=mean, scale=scale, shift=shift, bias=bias, residual=residual, out=out)
    if not isinstance(out_offset, int):
        raise TypeError(f"out_offset: expected an int, got {type(out_offset).__name__}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, mean, scale, shift, weight, bias, residual)):
        raise RuntimeError("norm_act_conv2d_into: not differentiable; call it under torch.no_grad() or inside an "
                           "autograd.Function that composes its gradient")
    x, weight, bias = _autocast_compute(x, weight, bias)
    return ops.norm_act_conv2d_into(x, mean, scale, shift, weight, bias, residual, list(stride), list(padding),
                                    list(dilation), groups, activation, out, out_offset, compute_stats)


def norm_act_conv2d_stats(x, mean, scale, shift, weight, bias=None, residual=None, stride=1, padding=0,
                          dilation=1, groups=1, activation="relu", batch_invstd=None):
    """norm_act_conv2d returning (y, y_mean, y_var): y's per-channel mean and
    biased variance come from the convolution's epilogue, for the training-
    mode BatchNorm that consumes y (pass them as its batch_stats). They carry
    no gradient: that BatchNorm's fused op adds theirs through batch_invstd."""
    x, weight, bias, stride, padding, dilation = _unit_args(x, mean, scale, shift, weight, bias, residual, stride,
                                                            padding, dilation, groups, activation)
    if residual is not None and residual.dtype != weight.dtype:
        # Mixed dtypes (autocast): the add promotes outside the op, so the
        # statistics need their own pass over the promoted sum.
        y = ops.norm_act_conv2d(x, mean, scale, shift, weight, bias, None, stride, padding, dilation, groups,
                                activation, batch_invstd) + residual
        with torch.no_grad():
            y_mean, y_var = ops.channel_stats(y)
        return y, y_mean, y_var
    return ops.norm_act_conv2d_stats(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups,
                                     activation, batch_invstd)


def _check_finite(name, value, low=None):
    if not isinstance(value, (int, float)) or not math.isfinite(value) or (low is not None and value < low):
        raise ValueError(f"{name}: expected a finite number{'' if low is None else f' >= {low}'}, got {value!r}")


class NormAffine(NamedTuple):
    """A normalisation as the fused op applies it: act((x - mean) * scale + shift).
    batch_invstd is set when mean and scale come from x's own statistics
    (training-mode BatchNorm, GroupNorm), whose gradient the fused op then
    includes (see norm_act_conv2d). Pass it on with the rest, as
    affine_act_conv2d does: mean and scale carry no gradient to x themselves."""

    mean: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    batch_invstd: Optional[torch.Tensor]


def _checked_stats(x, batch_stats):
    mean, var = batch_stats
    acc = accumulation_dtype(x.dtype)
    for name, t in (("batch_stats mean", mean), ("batch_stats var", var)):
        if not isinstance(t, torch.Tensor) or t.shape != (x.shape[1],) or t.dtype != acc or t.device != x.device:
            got = (tuple(t.shape), t.dtype, str(t.device)) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a ({x.shape[1]},) {acc} tensor on {x.device}, got {got}")
    return mean.detach(), var.detach()


def batch_norm_affine(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps,
                      batch_stats=None) -> NormAffine:
    """BatchNorm of x as a NormAffine, with F.batch_norm's semantics: with
    training=True the batch statistics are used and, when given, running_mean
    and running_var are updated in place with `momentum` (unbiased variance);
    otherwise the running statistics are used. One statistics pass serves every
    consumer of the result.

    batch_stats: x's per-channel (mean, biased variance), float32, when its
    producer already computed them (a fused convolution's epilogue); training
    then makes no pass over x."""
    check_activation_input(x)
    _check_finite("eps", eps, low=0)
    if training and running_mean is not None:
        _check_finite("momentum", momentum)
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("bn_weight", bn_weight),
                    ("bn_bias", bn_bias)):
        check_channel_vector(x, name, t)
    check_same_device(x, running_mean=running_mean, running_var=running_var, bn_weight=bn_weight, bn_bias=bn_bias)
    if not training and (running_mean is None or running_var is None):
        raise ValueError("running_mean, running_var: expected tensors when training=False")
    count = x.shape[0] * x.shape[2] * x.shape[3]
    if training and count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")

    acc = accumulation_dtype(x.dtype)
    if training:
        # The statistics' gradient is folded into the fused op's input gradient
        # (batch_invstd), so they are computed outside autograd.
        with torch.no_grad():
            mean, var = ops.channel_stats(x) if batch_stats is None else _checked_stats(x, batch_stats)
            if running_mean is not None:
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                unbiased = var * (count / (count - 1))
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
            invstd = torch.rsqrt(var + eps)
        batch_invstd = invstd
    else:
        invstd = torch.rsqrt(running_var.to(acc) + eps)
        mean, batch_invstd = running_mean.to(acc), None
    scale = invstd if bn_weight is None else bn_weight.to(acc) * invstd
    shift = torch.zeros_like(mean) if bn_bias is None else bn_bias.to(acc)
    return NormAffine(mean, scale, shift, batch_invstd)


def _check_group_norm_args(x, num_groups, weight, bias, eps):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES)
        raise TypeError(f"x: expected one of {names}, got {x.dtype}")
    _check_finite("eps", eps, low=0)
    c = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0 or c % num_groups:
        raise ValueError(f"num_groups: expected a positive divisor of the {c} channels, got {num_groups!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        check_channel_vector(x, name, t)
        if t is not None and t.dtype not in (x.dtype, accumulation_dtype(x.dtype)):
            raise TypeError(f"{name}: expected dtype {x.dtype} or {accumulation_dtype(x.dtype)}, got {t.dtype}")
    check_same_device(x, weight=weight, bias=bias)


# Devices whose autocast runs group_norm in float32 (torch's autocast op
# lists: on CUDA group_norm is a float32 op; on the CPU it keeps x's dtype).
_GROUP_NORM_AUTOCAST_FP32 = ("cuda",)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, activation="identity"):
    """act(F.group_norm(x, num_groups, weight, bias, eps)) in one pass, with
    F.group_norm's semantics for (N, C, *) input; the backward recomputes
    act's input from x, so only x is saved."""
    if isinstance(x, torch.Tensor) and x.dim() < 2:
        raise ValueError(f"x: expected an (N, C, *) tensor of at least 2 dimensions, got shape {tuple(x.shape)}")
    _check_group_norm_args(x, num_groups, weight, bias, eps)
    check_activation(activation)
    if x.device.type in _GROUP_NORM_AUTOCAST_FP32 and torch.is_autocast_enabled(x.device.type):
        x, weight, bias = (None if t is None else t.float() for t in (x, weight, bias))
    if x.dim() == 4:
        return ops.group_norm(x, num_groups, weight, bias, float(eps), activation)[0]
    # Other ranks are (N, C, L) in effect: one pixel column of L values.
    shape = x.shape
    x4 = x.reshape(shape[0], shape[1], -1, 1)
    return ops.group_norm(x4, num_groups, weight, bias, float(eps), activation)[0].reshape(shape)


def group_norm_affine(x, num_groups, weight, bias, eps) -> NormAffine:
    """GroupNorm of x (F.group_norm's arguments) as a per-(sample, channel)
    NormAffine whose batch_invstd is the (N, G) 1/sqrt(var + eps): the
    statistics read x in place (no copy, either layout), and the fused op
    folds their gradient into its own input gradient, as for training-mode
    BatchNorm; weight and bias get theirs through scale and shift."""
    check_activation_input(x)
    _check_group_norm_args(x, num_groups, weight, bias, eps)
    return NormAffine(*ops.group_norm_affine(x, num_groups, weight, bias, float(eps)))


def affine_act_conv2d(x, affine: NormAffine, weight, bias=None, residual=None, stride=1, padding=0, dilation=1,
                      groups=1, activation="relu", output_stats=False):
    """norm_act_conv2d with the normalisation given as a NormAffine; with
    output_stats, norm_act_conv2d_stats: (y, y_mean, y_var)."""
    fused = norm_act_conv2d_stats if output_stats else norm_act_conv2d
    return fused(x, affine.mean, affine.scale, affine.shift, weight, bias, residual, stride, padding, dilation, groups,
                 activation, affine.batch_invstd)


def batch_norm_act_conv2d(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps, weight,
                          bias=None, stride=1, padding=0, dilation=1, groups=1, activation="relu", residual=None):
    """conv2d(act(batch_norm(x)), weight, bias) + residual in one fused unit;
    the BatchNorm arguments are those of F.batch_norm (see batch_norm_affine)."""
    check_activation_input(x)
    check_activation(activation)
    check_conv_args(x, weight, _pair(stride), conv_padding(padding, weight.shape[2:], _pair(dilation)),
                    _pair(dilation), groups)
    if x.numel() == 0:
        # Nothing to fuse: eager torch defines what an empty batch returns.
        a = _ACTIVATIONS[activation](F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training,
                                                  momentum, eps))
        y = F.conv2d(a, weight, bias, stride, conv_padding(padding, weight.shape[2:], _pair(dilation)), dilation,
                     groups)
        return y if residual is None else y + residual
    affine = batch_norm_affine(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return affine_act_conv2d(x, affine, weight, bias, residual, stride, padding, dilation, groups, activation)


def drop_path(x, p: float, training: bool):
    """Stochastic depth (Huang et al. 2016): zero whole samples with
    probability p in training and scale the kept ones by 1 / (1 - p)."""
    if not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"p: expected a drop probability in [0, 1), got {p!r}")
    if not training or p == 0.0:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)
