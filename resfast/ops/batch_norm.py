"""BatchNorm as the fused unit's normalisation: entry points."""

import torch
import torch.nn.functional as F

from resfast.activations import activate, check_activation
from resfast.ops.checks import check_activation_input, check_channel_vector, check_same_device
from resfast.ops.layout import accumulation_dtype
from resfast.ops.norm_act_conv import NormAffine, affine_act_conv2d, check_finite, conv_args

ops = torch.ops.resfast


def _checked_stats(x, batch_stats):
    mean, var = batch_stats
    acc = accumulation_dtype(x.dtype)
    for name, t in (("batch_stats mean", mean), ("batch_stats var", var)):
        if not isinstance(t, torch.Tensor) or t.shape != (x.shape[1],) or t.dtype != acc or t.device != x.device:
            got = (tuple(t.shape), t.dtype, str(t.device)) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a ({x.shape[1]},) {acc} tensor on {x.device}, got {got}")
    return mean.detach(), var.detach()


def check_batch_norm_args(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps):
    check_activation_input(x)
    check_finite("eps", eps, low=0)
    if training and running_mean is not None:
        check_finite("momentum", momentum)
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("bn_weight", bn_weight),
                    ("bn_bias", bn_bias)):
        check_channel_vector(x, name, t)
    check_same_device(x, running_mean=running_mean, running_var=running_var, bn_weight=bn_weight, bn_bias=bn_bias)


def update_running_stats(running_mean, running_var, mean, var, count, momentum):
    """nn.BatchNorm2d's running-statistics update from a batch's mean and
    biased variance over `count` values (stored unbiased)."""
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        unbiased = var * (count / (count - 1))
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


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
    check_batch_norm_args(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
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
                update_running_stats(running_mean, running_var, mean, var, count, momentum)
            invstd = torch.rsqrt(var + eps)
        batch_invstd = invstd
    else:
        invstd = torch.rsqrt(running_var.to(acc) + eps)
        mean, batch_invstd = running_mean.to(acc), None
    scale = invstd if bn_weight is None else bn_weight.to(acc) * invstd
    shift = torch.zeros_like(mean) if bn_bias is None else bn_bias.to(acc)
    return NormAffine(mean, scale, shift, batch_invstd)


def batch_norm_act_conv2d(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps, weight,
                          bias=None, stride=1, padding=0, dilation=1, groups=1, activation="relu", residual=None):
    """conv2d(act(batch_norm(x)), weight, bias) + residual in one fused unit;
    the BatchNorm arguments are those of F.batch_norm (see batch_norm_affine)."""
    check_activation_input(x)
    check_activation(activation)
    stride, padding, dilation = conv_args(weight, stride, padding, dilation, groups, x)
    if x.numel() == 0:
        # Nothing to fuse: eager torch defines what an empty batch returns.
        a = activate(F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps),
                     activation)
        y = F.conv2d(a, weight, bias, stride, padding, dilation, groups)
        return y if residual is None else y + residual
    affine = batch_norm_affine(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return affine_act_conv2d(x, affine, weight, bias, residual, stride, padding, dilation, groups, activation)
