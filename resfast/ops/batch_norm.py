"""BatchNorm as the fused unit's normalisation: the batch_norm_affine op and
the entry points."""

import torch
import torch.nn.functional as F

from resfast.activations import activate, check_activation
from resfast.ops import registry
from resfast.ops.checks import check_activation_input, check_channel_vector, check_same_device
from resfast.ops.norm_act_conv import NormAffine, affine_act_conv2d, check_finite, conv_args

ops = torch.ops.resfast


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
    biased variance over `count` values (stored unbiased), for the dense
    block and synchronised BatchNorm; the batch_norm_affine op makes the same
    update for the fused units (csrc/composites.cpp)."""
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        unbiased = var * (count / (count - 1))
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


# F.batch_norm's normalisation as (mean, scale, shift, invstd), running
# statistics updated in training: composed in C++ (csrc/composites.cpp).
registry.define("batch_norm_affine", composite="explicit")
# batch_norm_affine then norm_act_conv2d, composed in C++ for autograd to see through.
registry.define("batch_norm_act_conv2d", composite="implicit")


def batch_norm_affine(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps,
                      batch_stats=None) -> NormAffine:
    """BatchNorm of x as a NormAffine, with F.batch_norm's semantics: with
    training=True the batch statistics are used and, when given, running_mean
    and running_var are updated in place with `momentum` (unbiased variance);
    otherwise the running statistics are used. One statistics pass serves every
    consumer of the result.

    batch_stats: x's per-channel (mean, biased variance), float32, when its
    producer already computed them (a fused convolution's epilogue); training
    then makes no pass over x. The op checks the tensors."""
    check_activation_input(x)
    check_finite("eps", eps, low=0)
    if training and running_mean is not None:
        check_finite("momentum", momentum)
    batch_mean, batch_var = (None, None) if batch_stats is None else (t.detach() for t in batch_stats)
    mean, scale, shift, invstd = ops.batch_norm_affine(x, running_mean, running_var, bn_weight, bn_bias, training,
                                                       float(momentum), float(eps), batch_mean, batch_var)
    return NormAffine(mean, scale, shift, invstd if training else None)


def batch_norm_act_conv2d(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps, weight,
                          bias=None, stride=1, padding=0, dilation=1, groups=1, activation="relu", residual=None,
                          batch_stats=None):
    """conv(act(batch_norm(x)), weight, bias) + residual in one fused unit (2-D or 3-D);
    the BatchNorm arguments are those of F.batch_norm, and batch_stats x's
    statistics from its producer (see batch_norm_affine)."""
    check_activation_input(x)
    check_activation(activation)
    stride, padding, dilation = conv_args(weight, stride, padding, dilation, groups, x)
    if x.numel() == 0:
        # Nothing to fuse: eager torch defines what an empty batch returns.
        a = activate(F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps),
                     activation)
        y = (F.conv2d if x.dim() == 4 else F.conv3d)(a, weight, bias, stride, padding, dilation, groups)
        return y if residual is None else y + residual
    affine = batch_norm_affine(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps, batch_stats)
    return affine_act_conv2d(x, affine, weight, bias, residual, stride, padding, dilation, groups, activation)
