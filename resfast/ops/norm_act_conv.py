"""The fused normalise -> activate -> conv unit: its ops (forward, the
channel-slice store, the output-statistics twin and the backward) and its
entry points.

    y = conv(act((x - mean) * scale + shift), weight, bias) + residual

a 2-D convolution for 4-D x and weight, a 3-D one for 5-D (the ops keep the
conv2d names they were registered with first).

mean/scale/shift are per channel (C,) (BatchNorm) or per (sample, channel)
(N, C) (GroupNorm). The normalised activation is never stored: backward
recomputes it from x.
"""

import math
from typing import NamedTuple, Optional

import torch
from torch.nn.modules.utils import _ntuple

from resfast.activations import activate, activation_grad, check_activation
from resfast.ops import conv_engines, registry
from resfast.ops.checks import check_activation_input, check_conv_args, check_same_device, triton_input
from resfast.ops.layout import accumulation_dtype, conv_output_size, kernel_format, per_element, reduced_dims, \
    spatial_numel

ops = torch.ops.resfast


def check_finite(name, value, low=None):
    if not isinstance(value, (int, float)) or not math.isfinite(value) or (low is not None and value < low):
        raise ValueError(f"{name}: expected a finite number{'' if low is None else f' >= {low}'}, got {value!r}")


# ---------------------------------------------------------------- op-level checks
def _check_norm_params(x, mean, scale, shift):
    n, c = x.shape[:2]
    acc = accumulation_dtype(x.dtype)
    for name, p in (("mean", mean), ("scale", scale), ("shift", shift)):
        if tuple(p.shape) not in ((c,), (n, c)):
            raise ValueError(f"{name}: expected shape ({c},) or ({n}, {c}) for input of shape {tuple(x.shape)}, "
                             f"got {tuple(p.shape)}")
        if p.dtype != acc:
            raise TypeError(f"{name}: expected dtype {acc} for input dtype {x.dtype}, got {p.dtype}")
        if p.device != x.device:
            raise ValueError(f"{name}: expected device {x.device}, got {p.device}")
    if not mean.shape == scale.shape == shift.shape:
        raise ValueError(f"mean, scale and shift: expected one shape, got {tuple(mean.shape)}, "
                         f"{tuple(scale.shape)}, {tuple(shift.shape)}")


def _check_compute_dtype(x, weight):
    autocast_pair = x.dtype == torch.float32 and weight.dtype in (torch.float16, torch.bfloat16)
    if x.dtype != weight.dtype and not autocast_pair:
        raise TypeError(f"weight: expected dtype {x.dtype} (or float16/bfloat16 with float32 input), got "
                        f"{weight.dtype}")


def _check_batch_invstd(mean, batch_invstd):
    if batch_invstd is None:
        return
    if mean.dim() == 1:
        if batch_invstd.shape != mean.shape:
            raise ValueError(f"batch_invstd: expected shape {tuple(mean.shape)} like the per-channel mean, got "
                             f"{tuple(batch_invstd.shape)}")
    elif batch_invstd.dim() != 2 or batch_invstd.shape[0] != mean.shape[0] or batch_invstd.shape[1] == 0 or \
            mean.shape[1] % batch_invstd.shape[1]:
        raise ValueError(f"batch_invstd: expected shape ({mean.shape[0]}, G) with G groups dividing the per-sample "
                         f"mean's {mean.shape[1]} channels, got {tuple(batch_invstd.shape)}")
    if batch_invstd.dtype != mean.dtype:
        raise TypeError(f"batch_invstd: expected dtype {mean.dtype}, got {batch_invstd.dtype}")


def _output_shape(x, weight, stride, padding, dilation):
    return (x.shape[0], weight.shape[0], *conv_output_size(x, weight, stride, padding, dilation))


def _check_output_like(name, t, shape, dtype):
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")


def _check_unit(x, mean, scale, shift, weight, stride, padding, dilation, groups, activation, batch_invstd):
    check_activation_input(x)
    _check_norm_params(x, mean, scale, shift)
    check_conv_args(x, weight, tuple(stride), tuple(padding), tuple(dilation), groups)
    _check_compute_dtype(x, weight)
    check_activation(activation)
    _check_batch_invstd(mean, batch_invstd)


def _check_forward(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups, activation,
                   batch_invstd=None):
    _check_unit(x, mean, scale, shift, weight, stride, padding, dilation, groups, activation, batch_invstd)
    if bias is not None:
        _check_output_like("bias", bias, (weight.shape[0],), weight.dtype)
    if residual is not None:
        _check_output_like("residual", residual, _output_shape(x, weight, stride, padding, dilation), weight.dtype)


def _normalize(x, mean, scale, shift):
    acc = accumulation_dtype(x.dtype)
    return (x.to(acc) - per_element(mean, x)) * per_element(scale, x) + per_element(shift, x)


def _conv_functions(x):
    """torch's (convolution, input gradient, weight gradient) for x's rank."""
    if x.dim() == 4:
        return torch.nn.functional.conv2d, torch.nn.grad.conv2d_input, torch.nn.grad.conv2d_weight
    return torch.nn.functional.conv3d, torch.nn.grad.conv3d_input, torch.nn.grad.conv3d_weight


# ---------------------------------------------------------------- norm_act_conv2d
norm_act_conv2d_op = registry.define("norm_act_conv2d", engines=tuple(conv_engines.ENGINES))
norm_act_conv2d_op.register_check(_check_forward)


@norm_act_conv2d_op.register_fake
def _(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups, activation,
      batch_invstd=None):
    y = x.new_empty(_output_shape(x, weight, stride, padding, dilation), dtype=weight.dtype)
    return y.contiguous(memory_format=kernel_format(x))


@norm_act_conv2d_op.register_reference
def _reference_forward(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups, activation,
                       batch_invstd=None):
    a = activate(_normalize(x, mean, scale, shift), activation).to(weight.dtype)
    y = _conv_functions(x)[0](a, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        y = y + residual
    return y.contiguous(memory_format=kernel_format(x))


@norm_act_conv2d_op.register_triton
def _(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups, activation,
      batch_invstd=None):
    y, _ = conv_engines.forward(conv_engines.Forward(triton_input(x), mean, scale, shift, weight, bias, residual,
                                                     stride, padding, dilation, groups, activation))
    return y


# ---------------------------------------------------------------- norm_act_conv2d_into
# The forward storing into the channel slice out[:, out_offset:out_offset + C_out]
# of an NC(D)HW- or channels_last-contiguous buffer; with compute_stats, the
# per-channel mean and biased variance of the stored values.
norm_act_conv2d_into_op = registry.define("norm_act_conv2d_into", engines=tuple(conv_engines.ENGINES))


@norm_act_conv2d_into_op.register_check
def _(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups, activation, out, out_offset,
      compute_stats=False):
    _check_forward(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups, activation)
    n, oc, *spatial = _output_shape(x, weight, stride, padding, dilation)
    check_activation_input(out, "out")
    if out.dim() != x.dim() or out.shape[0] != n or list(out.shape[2:]) != spatial:
        raise ValueError(f"out: expected shape ({n}, C_out, {', '.join(map(str, spatial))}), got {tuple(out.shape)}")
    if not 0 <= out_offset <= out.shape[1] - oc:
        raise ValueError(f"out_offset: expected 0 <= out_offset <= {out.shape[1] - oc} for {oc} output channels in "
                         f"a buffer of {out.shape[1]}, got {out_offset}")
    if out.dtype != weight.dtype:
        raise TypeError(f"out: expected dtype {weight.dtype}, got {out.dtype}")
    check_same_device(x, out=out)
    if not out.is_contiguous(memory_format=kernel_format(out)):
        layouts = "NCHW- or channels_last" if out.dim() == 4 else "NCDHW- or channels_last_3d"
        raise ValueError(f"out: expected an {layouts}-contiguous buffer, got strides {out.stride()}")
    if compute_stats and n * math.prod(spatial) == 0:
        raise ValueError("compute_stats: needs at least one output value per channel")


@norm_act_conv2d_into_op.register_fake
def _(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups, activation, out, out_offset,
      compute_stats=False):
    channels = weight.shape[0] if compute_stats else 0
    acc = accumulation_dtype(weight.dtype)
    return out.new_empty((channels,), dtype=acc), out.new_empty((channels,), dtype=acc)


@norm_act_conv2d_into_op.register_reference
def _(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups, activation, out, out_offset,
      compute_stats=False):
    y = _reference_forward(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups,
                           activation)
    out[:, out_offset:out_offset + y.shape[1]].copy_(y)
    acc = accumulation_dtype(y.dtype)
    if not compute_stats:
        return y.new_empty((0,), dtype=acc), y.new_empty((0,), dtype=acc)
    var, m = torch.var_mean(y.to(torch.float64), dim=reduced_dims(y), unbiased=False)
    return m.to(acc), var.to(acc)


@norm_act_conv2d_into_op.register_triton
def _(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups, activation, out, out_offset,
      compute_stats=False):
    _, stats = conv_engines.forward(conv_engines.Forward(triton_input(x), mean, scale, shift, weight, bias, residual,
                                                         stride, padding, dilation, groups, activation,
                                                         triton_input(out, "out"), out_offset, compute_stats))
    if stats is None:
        empty = x.new_empty((0,), dtype=torch.float32)
        return empty, empty.clone()
    return stats


# ---------------------------------------------------------------- norm_act_conv2d_stats
# norm_act_conv2d and its output's per-channel (mean, var), taken in the epilogue.
norm_act_conv2d_stats_op = registry.define("norm_act_conv2d_stats", engines=tuple(conv_engines.ENGINES))


@norm_act_conv2d_stats_op.register_check
def _(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups, activation,
      batch_invstd=None):
    _check_forward(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups, activation,
                   batch_invstd)
    shape = _output_shape(x, weight, stride, padding, dilation)
    if shape[0] * math.prod(shape[2:]) == 0:
        raise ValueError(f"norm_act_conv2d_stats: needs at least one output value per channel, got output shape "
                         f"{shape}")


@norm_act_conv2d_stats_op.register_fake
def _(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups, activation,
      batch_invstd=None):
    y = x.new_empty(_output_shape(x, weight, stride, padding, dilation), dtype=weight.dtype)
    acc = accumulation_dtype(weight.dtype)
    vec = y.new_empty((weight.shape[0],), dtype=acc)
    return y.contiguous(memory_format=kernel_format(x)), vec, torch.empty_like(vec)


@norm_act_conv2d_stats_op.register_reference
def _(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups, activation,
      batch_invstd=None):
    y = _reference_forward(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups,
                           activation)
    var, m = torch.var_mean(y.to(torch.float64), dim=reduced_dims(y), unbiased=False)
    acc = accumulation_dtype(y.dtype)
    return y, m.to(acc), var.to(acc)


@norm_act_conv2d_stats_op.register_triton
def _(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups, activation,
      batch_invstd=None):
    y, (y_mean, y_var) = conv_engines.forward(conv_engines.Forward(
        triton_input(x), mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups, activation,
        compute_stats=True))
    return y, y_mean, y_var


# ---------------------------------------------------------------- norm_act_conv2d_backward
# Both gradients in one op: grad_x (with batch_invstd, through the statistics
# too), grad_scale, grad_shift and grad_weight (see csrc/ops.cpp).
norm_act_conv2d_backward_op = registry.define("norm_act_conv2d_backward", engines=tuple(conv_engines.ENGINES))


@norm_act_conv2d_backward_op.register_check
def _(grad_out, x, mean, scale, shift, weight, stride, padding, dilation, groups, activation, batch_invstd,
      output_mask):
    _check_unit(x, mean, scale, shift, weight, stride, padding, dilation, groups, activation, batch_invstd)
    if grad_out.dim() != x.dim() or grad_out.shape[:2] != (x.shape[0], weight.shape[0]):
        spatial = "H_out, W_out" if x.dim() == 4 else "D_out, H_out, W_out"
        raise ValueError(f"grad_out: expected shape ({x.shape[0]}, {weight.shape[0]}, {spatial}), got "
                         f"{tuple(grad_out.shape)}")
    if grad_out.dtype != weight.dtype:
        raise TypeError(f"grad_out: expected dtype {weight.dtype}, got {grad_out.dtype}")


@norm_act_conv2d_backward_op.register_fake
def _(grad_out, x, mean, scale, shift, weight, stride, padding, dilation, groups, activation, batch_invstd,
      output_mask):
    grad_x = grad_scale = grad_shift = grad_weight = None
    if output_mask[0]:
        grad_x = torch.empty_like(x, memory_format=kernel_format(x))
        grad_scale, grad_shift = torch.empty_like(scale), torch.empty_like(scale)
    if output_mask[1]:
        grad_weight = torch.empty_like(weight, memory_format=kernel_format(weight))
    return grad_x, grad_scale, grad_shift, grad_weight


def _reference_stats_grad(x, centered, scale, grad_scale, grad_shift, invstd):
    """mean and scale are x's own statistics (BatchNorm's per channel,
    GroupNorm's per (sample, group)): their share of x's gradient."""
    if scale.dim() == 1:
        count = x.shape[0] * spatial_numel(x)
        grad_mean, grad_var = -scale * grad_shift, -0.5 * invstd**2 * scale * grad_scale
    else:
        n, c = scale.shape
        per_group = c // invstd.shape[1]
        count = per_group * spatial_numel(x)

        def per_group_sum(t):
            return t.reshape(n, -1, per_group).sum(2).repeat_interleave(per_group, 1)

        grad_mean = -per_group_sum(scale * grad_shift)
        grad_var = -0.5 * invstd.repeat_interleave(per_group, 1)**2 * per_group_sum(scale * grad_scale)
    return (per_element(grad_mean, x) + 2 * per_element(grad_var, x) * centered) / count


@norm_act_conv2d_backward_op.register_reference
def _(grad_out, x, mean, scale, shift, weight, stride, padding, dilation, groups, activation, batch_invstd,
      output_mask):
    grad_x = grad_scale = grad_shift = grad_weight = None
    z = _normalize(x, mean, scale, shift)
    _, conv_input, conv_weight = _conv_functions(x)
    if output_mask[0]:
        grad_a = conv_input(x.shape, weight, grad_out, stride, padding, dilation, groups)
        dz = grad_a.to(z.dtype) * activation_grad(z, activation)
        centered = x.to(z.dtype) - per_element(mean, x)
        dims = reduced_dims(x) if scale.dim() == 1 else reduced_dims(x)[1:]
        grad_scale, grad_shift = (dz * centered).sum(dims), dz.sum(dims)
        grad_x = dz * per_element(scale, x)
        if batch_invstd is not None:
            grad_x = grad_x + _reference_stats_grad(x, centered, scale, grad_scale, grad_shift, batch_invstd)
        grad_x = grad_x.to(x.dtype).contiguous(memory_format=kernel_format(x))
        grad_scale, grad_shift = grad_scale.to(scale.dtype), grad_shift.to(scale.dtype)
    if output_mask[1]:
        a = activate(z, activation).to(weight.dtype)
        grad_weight = conv_weight(a, weight.shape, grad_out, stride, padding, dilation, groups)
        grad_weight = grad_weight.to(weight.dtype).contiguous(memory_format=kernel_format(weight))
    return grad_x, grad_scale, grad_shift, grad_weight


@norm_act_conv2d_backward_op.register_triton
def _(grad_out, x, mean, scale, shift, weight, stride, padding, dilation, groups, activation, batch_invstd,
      output_mask):
    return conv_engines.backward(conv_engines.Backward(grad_out, triton_input(x), mean, scale, shift, weight, stride,
                                                       padding, dilation, groups, activation, batch_invstd,
                                                       tuple(output_mask)))


# ---------------------------------------------------------------- entry points
def conv_padding(padding, kernel_size, dilation):
    """nn.Conv2d's (nn.Conv3d's) padding argument (an int, one per spatial dim,
    'valid' or 'same') as one int per spatial dim of kernel_size."""
    if padding == "valid":
        return (0,) * len(kernel_size)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
        if any(t % 2 for t in total):
            raise ValueError(f"padding: 'same' needs symmetric padding, which kernel_size {tuple(kernel_size)} with "
                             f"dilation {tuple(dilation)} does not give; pad explicitly")
        return tuple(t // 2 for t in total)
    if isinstance(padding, str):
        raise ValueError(f"padding: expected an int, one int per spatial dim, 'valid' or 'same', got {padding!r}")
    return _ntuple(len(kernel_size))(padding)


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


def conv_args(weight, stride, padding, dilation, groups, x=None):
    """nn.Conv2d-style (nn.Conv3d-style for a 5-D weight) stride, padding and
    dilation as the ops' int lists, checked (against x's shape when given)."""
    spatial = _ntuple(weight.dim() - 2)
    stride, dilation = spatial(stride), spatial(dilation)
    padding = conv_padding(padding, weight.shape[2:], dilation)
    if x is not None:
        check_conv_args(x, weight, stride, padding, dilation, groups)
    return list(stride), list(padding), list(dilation)


def _unit_args(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups, activation):
    """The fused unit's arguments checked, conv arguments as int lists, and
    x, weight and bias in the dtypes autocast computes in."""
    check_activation_input(x)
    check_activation(activation)
    stride, padding, dilation = conv_args(weight, stride, padding, dilation, groups, x)
    check_same_device(x, mean=mean, scale=scale, shift=shift, bias=bias, residual=residual)
    x, weight, bias = _autocast_compute(x, weight, bias)
    return x, weight, bias, stride, padding, dilation


def norm_act_conv2d(x, mean, scale, shift, weight, bias=None, residual=None, stride=1, padding=0, dilation=1,
                    groups=1, activation="relu", batch_invstd=None):
    """conv(act((x - mean) * scale + shift), weight, bias) + residual, fused
    (a 2-D convolution for 4-D x and weight, 3-D for 5-D):
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
    preallocated NC(D)HW- or channels_last(_3d)-contiguous buffer (no temporary output,
    no copy); the buffer's other channels are left untouched.

    Returns the per-channel (mean, biased variance) of the stored values when
    compute_stats (the next BatchNorm's batch statistics, float32, float64 for
    float64), else two empty tensors. Not differentiable: gradients are
    composed from the fused op's backward by the caller (see resfast.nn's
    dense block)."""
    check_activation_input(x)
    check_activation_input(out, "out")
    check_activation(activation)
    stride, padding, dilation = conv_args(weight, stride, padding, dilation, groups, x)
    check_same_device(x, mean=mean, scale=scale, shift=shift, bias=bias, residual=residual, out=out)
    if not isinstance(out_offset, int):
        raise TypeError(f"out_offset: expected an int, got {type(out_offset).__name__}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, mean, scale, shift, weight, bias, residual)):
        raise RuntimeError("norm_act_conv2d_into: not differentiable; call it under torch.no_grad() or inside an "
                           "autograd.Function that composes its gradient")
    x, weight, bias = _autocast_compute(x, weight, bias)
    return ops.norm_act_conv2d_into(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups,
                                    activation, out, out_offset, compute_stats)


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


def affine_act_conv2d(x, affine: NormAffine, weight, bias=None, residual=None, stride=1, padding=0, dilation=1,
                      groups=1, activation="relu", output_stats=False):
    """norm_act_conv2d with the normalisation given as a NormAffine; with
    output_stats, norm_act_conv2d_stats: (y, y_mean, y_var)."""
    fused = norm_act_conv2d_stats if output_stats else norm_act_conv2d
    return fused(x, affine.mean, affine.scale, affine.shift, weight, bias, residual, stride, padding, dilation, groups,
                 activation, affine.batch_invstd)
