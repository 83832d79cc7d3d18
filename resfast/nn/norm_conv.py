"""The fused ops applied with nn modules' parameters: a norm module's
normalisation of x (or of the parts of a channel concatenation) as
NormAffines, and a convolution module applied to it, fused. The blocks and
models share these.

A module's arguments are the ops' as they are, so most calls go to the
registered ops directly (`direct`), which check them in C++ with the
entry points' messages; the entry points (resfast.ops.*) take the rest:
autocast, mixed-dtype residuals, empty batches, anything not a tensor. Per
unit that saves the Python-level checks, which cost more than a small
layer's convolution.
"""

import torch
from torch import nn

from resfast import ops
from resfast.activations import activate
from resfast.nn.batch_norm import BATCH_NORMS, BATCH_NORMS_3D, batch_norm_affine, batch_norm_args, bn_affine, \
    direct, sync_process_group
from resfast.nn.members import tensor

fused = torch.ops.resfast


def conv_arguments(conv: nn.Conv2d):
    """conv's stride, padding (ints), dilation and groups as the ops take them."""
    padding = conv.padding  # a tuple of ints as the module sets it, or a string
    if not isinstance(padding, tuple):
        padding = ops.conv_padding(padding, conv.kernel_size, conv.dilation)
    return list(conv.stride), list(padding), list(conv.dilation), conv.groups


def check_conv_module(conv: nn.Module, conv_type=nn.Conv2d):
    """conv is a plain conv_type (nn.Conv2d or nn.Conv3d) with zero padding."""
    if not isinstance(conv, conv_type) or type(conv).forward is not conv_type.forward:
        raise TypeError(f"conv: expected a plain nn.{conv_type.__name__}, got {type(conv).__name__}")
    if conv.padding_mode != "zeros":
        raise ValueError(f"conv: expected padding_mode='zeros', got {conv.padding_mode!r}")


def affine_conv(x, affine, conv, weight, bias, residual, activation, output_stats=False):
    """The fused op with conv's arguments (stride, padding, dilation, groups)
    and the given weight and bias."""
    stride, padding, dilation, groups = conv_arguments(conv)
    if direct(x, residual, weight):
        args = (x, affine.mean, affine.scale, affine.shift, weight, bias, residual, stride, padding, dilation, groups,
                activation, affine.batch_invstd)
        return fused.norm_act_conv2d_stats(*args) if output_stats else fused.norm_act_conv2d(*args)
    return ops.affine_act_conv2d(x, affine, weight, bias, residual, stride, padding, dilation, groups, activation,
                                 output_stats=output_stats)


def norm_conv(x: torch.Tensor, affine: "ops.NormAffine", conv: nn.Conv2d, residual=None, activation="relu",
              output_stats=False):
    """conv(act(normalised x)) + residual, one fused op, with conv's
    parameters; with output_stats, also the output's per-channel (mean, var)
    from the epilogue: (y, (mean, var))."""
    out = affine_conv(x, affine, conv, tensor(conv, "weight"), tensor(conv, "bias"), residual, activation,
                      output_stats)
    return (out[0], out[1:]) if output_stats else out


def batch_norm_conv(bn: nn.Module, conv: nn.Conv2d, x: torch.Tensor, training: bool, residual=None,
                    activation="relu", batch_stats=None, weight=None) -> torch.Tensor:
    """conv(act(bn(x))) + residual, one fused unit with the modules'
    parameters (F.batch_norm's semantics; statistics over every process when
    bn is synchronised). batch_stats: x's, from its producer. weight: the
    convolution's, when it is not conv.weight as it is (a standardised one)."""
    conv_weight = tensor(conv, "weight") if weight is None else weight
    conv_bias = tensor(conv, "bias")
    if sync_process_group(bn, training)[0]:
        return affine_conv(x, bn_affine(bn, x, training), conv, conv_weight, conv_bias, residual, activation)
    running_mean, running_var, weight, bias, use_batch, factor, eps = batch_norm_args(bn, training)
    if direct(x, residual, conv_weight):
        return fused.batch_norm_act_conv2d(x, running_mean, running_var, weight, bias, use_batch, factor, eps,
                                           conv_weight, conv_bias, residual, *conv_arguments(conv), activation,
                                           *(batch_stats or (None, None)))
    return ops.batch_norm_act_conv2d(x, running_mean, running_var, weight, bias, use_batch, factor, eps, conv_weight,
                                     conv_bias, conv.stride, ops.conv_padding(conv.padding, conv.kernel_size,
                                                                              conv.dilation),
                                     conv.dilation, conv.groups, activation, residual, batch_stats)


def batch_norm_max_pool(bn: nn.Module, pool: nn.MaxPool2d, x: torch.Tensor, activation="relu") -> torch.Tensor:
    """pool(act(bn(x))) as one op with the modules' parameters, buffers and
    modes (a ResNet's or DenseNet's stem): only x and the per-channel vectors
    are saved for backward."""
    if x.numel() == 0:  # nothing to fuse: eager torch defines what an empty batch returns
        return pool(activate(bn(x), activation))
    return ops.norm_act_max_pool2d(x, bn_affine(bn, x, bn.training), pool.kernel_size, pool.stride, pool.padding,
                                   pool.dilation, pool.ceil_mode, activation)


def norm_affines(parts, norm: nn.Module, training: bool) -> list:
    """`norm` (an nn.BatchNorm2d or 3d, nn.SyncBatchNorm or nn.GroupNorm) of the channel concatenation
    of `parts`, as one NormAffine per part and without concatenating: BatchNorm
    statistics are per channel, GroupNorm's per group, and no group may
    straddle two parts. Running statistics are updated through views of the
    module's buffers; a BatchNorm counts the batch once."""
    batch_norm = isinstance(norm, BATCH_NORMS + BATCH_NORMS_3D)
    if len(parts) == 1:
        # The common case, without the parts' bookkeeping and parameter
        # slices, which at small sizes cost more than the op itself.
        x = parts[0]
        if batch_norm and x.shape[1] == norm.num_features:
            return [bn_affine(norm, x, training)]
        if not batch_norm and isinstance(norm, nn.GroupNorm) and x.shape[1] == norm.num_channels:
            return [group_norm_affine(x, norm.num_groups, tensor(norm, "weight"), tensor(norm, "bias"), norm.eps)]
    widths = [p.shape[1] for p in parts]
    if batch_norm:
        channels = norm.num_features
    elif isinstance(norm, nn.GroupNorm):
        channels = norm.num_channels
    else:
        raise TypeError(f"norm: expected an nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm or nn.GroupNorm, "
                        f"got {type(norm).__name__}")
    if sum(widths) != channels:
        raise ValueError(f"input: expected {channels} channels in all, got {widths}")
    starts = [sum(widths[:i]) for i in range(len(widths))]

    def part(t, start, width):
        return None if t is None else t[start:start + width]

    if batch_norm:
        sync, group = sync_process_group(norm, training)
        running_mean, running_var, weight, bias, use_batch, factor, eps = batch_norm_args(norm, training)
        if sync:
            return [ops.sync_batch_norm_affine(x, part(running_mean, s, w), part(running_var, s, w),
                                               part(weight, s, w), part(bias, s, w), factor, eps, group)
                    for x, s, w in zip(parts, starts, widths)]
        return [batch_norm_affine(x, part(running_mean, s, w), part(running_var, s, w), part(weight, s, w),
                                  part(bias, s, w), use_batch, factor, eps)
                for x, s, w in zip(parts, starts, widths)]
    group_size = check_whole_groups(widths, norm.num_groups, "input")
    return [group_norm_affine(x, w // group_size, part(norm.weight, s, w), part(norm.bias, s, w), norm.eps)
            for x, s, w in zip(parts, starts, widths)]


def check_whole_groups(widths, num_groups, name) -> int:
    """The group size of a GroupNorm of num_groups groups over parts of
    `widths` channels, each of which must hold whole groups (ValueError
    naming `name` otherwise)."""
    total = sum(widths)
    group_size = total // num_groups
    if any(w % group_size for w in widths):
        raise ValueError(f"{name}: each part's channels {list(widths)} must hold whole groups of {group_size} "
                         f"channels (num_groups={num_groups} over {total})")
    return group_size


def group_norm_affine(x, num_groups, weight, bias, eps) -> "ops.NormAffine":
    """ops.group_norm_affine, the op called directly where it can be."""
    if direct(x):
        return ops.NormAffine(*fused.group_norm_affine(x, num_groups, weight, bias, eps))
    return ops.group_norm_affine(x, num_groups, weight, bias, eps)


def join_parts(parts, weight, norm: nn.Module, training: bool):
    """parts as they are, or [their channel concatenation] where that is
    cheaper for a convolution with `weight` over them, normalised by `norm`.
    A weight split along its input channels is strided, so the convolution
    copies each part of it (and the backward concatenates their gradients),
    and each part is a convolution call of its own: without autograd, and
    wherever the maps are smaller than the weight (a U-Net's deepest levels),
    concatenating them costs less. The concatenation is then saved for
    backward besides the skip map's own saved copy: at most the weight's
    size more. Join before normalising: one normalisation of the
    concatenation, not one per part. Never with a synchronised BatchNorm in
    training: ranks whose batches differ in size would decide differently
    and make different collective calls."""
    if len(parts) == 1 or sync_process_group(norm, training)[0]:
        return parts
    if torch.is_grad_enabled() and sum(p.numel() for p in parts) >= weight.numel():
        return parts
    return [torch.cat(parts, 1)]


def norm_conv_parts(parts, affines, conv: nn.Conv2d, activation, residual=None):
    """conv(act(normalised concatenation of parts)) + residual: each part is
    a slice of the convolution's input channels, and each partial sum
    reaches the next part's convolution as its residual, added in the
    epilogue (join_parts decides, before the normalisation, where one
    concatenated part is cheaper)."""
    if len(parts) > 1 and conv.groups != 1:
        raise ValueError(f"conv: a split input needs groups=1, got {conv.groups}")
    # One split, not a slice per part: the slices' backward would zero-fill
    # and copy a whole weight-sized gradient for each part.
    weight, bias = tensor(conv, "weight"), tensor(conv, "bias")
    weights = weight.split([x.shape[1] for x in parts], dim=1) if len(parts) > 1 else (weight,)
    y = residual
    for i, (x, affine, weight) in enumerate(zip(parts, affines, weights)):
        y = affine_conv(x, affine, conv, weight, bias if i == len(parts) - 1 else None, y, activation)
    return y
