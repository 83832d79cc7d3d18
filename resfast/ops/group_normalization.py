"""GroupNorm (+ activation) and GroupNorm as the fused conv unit's
normalisation: ops and entry points."""

import torch

from resfast.activations import activate, activation_grad, check_activation
from resfast.ops import registry
from resfast.ops.checks import FLOAT_DTYPES, check_activation_input, check_channel_vector, check_same_device, \
    triton_input
from resfast.ops.layout import accumulation_dtype, kernel_format, per_element, reduced_dims
from resfast.ops.norm_act_conv import NormAffine, check_finite
from resfast.ops.statistics import by_group, check_group_vectors, check_groups, per_channel, stats_groups

ops = torch.ops.resfast


def _kernels():
    from resfast.kernels import pointwise

    return pointwise


def check_group_norm_vectors(x, weight, bias):
    """GroupNorm's optional weight and bias: (C,) of x's dtype or its accumulation dtype, on x's device."""
    for name, t in (("weight", weight), ("bias", bias)):
        check_channel_vector(x, name, t)
        if t is not None and t.dtype not in (x.dtype, accumulation_dtype(x.dtype)):
            raise TypeError(f"{name}: expected dtype {x.dtype} or {accumulation_dtype(x.dtype)}, got {t.dtype}")
    check_same_device(x, weight=weight, bias=bias)


def _affine_vectors(x, weight, bias, acc):
    w = x.new_ones(x.shape[1], dtype=acc) if weight is None else weight.to(acc)
    b = x.new_zeros(x.shape[1], dtype=acc) if bias is None else bias.to(acc)
    return w, b


# ---------------------------------------------------------------- group_norm
# y = act((x - mean[n, g]) * rstd[n, g] * weight[c] + bias[c]), with (N, G) mean and rstd.
group_norm_op = registry.define("group_norm")


@group_norm_op.register_check
def _(x, num_groups, weight, bias, eps, activation):
    check_groups(x, num_groups)
    check_group_norm_vectors(x, weight, bias)
    check_finite("eps", eps, low=0)
    check_activation(activation)


@group_norm_op.register_fake
def _(x, num_groups, weight, bias, eps, activation):
    acc = accumulation_dtype(x.dtype)
    shape = (x.shape[0], num_groups)
    y = torch.empty_like(x, memory_format=kernel_format(x))
    return y, x.new_empty(shape, dtype=acc), x.new_empty(shape, dtype=acc)


@group_norm_op.register_reference
def _(x, num_groups, weight, bias, eps, activation):
    mean, var = ops.group_stats(x, num_groups)
    rstd = torch.rsqrt(var + eps)
    w, b = _affine_vectors(x, weight, bias, mean.dtype)
    xhat = (x.to(mean.dtype) - per_channel(mean, x)) * per_channel(rstd, x)
    y = activate(xhat * per_element(w, x) + per_element(b, x), activation)
    return y.to(x.dtype).contiguous(memory_format=kernel_format(x)), mean, rstd


def _spread(per_group, channels):
    return per_group.repeat_interleave(channels // per_group.shape[1], dim=1).contiguous()


def _channel_params(x, mean, rstd, weight, bias):
    """GroupNorm's (N, C) float32 mean, scale and shift for the Triton passes."""
    n, c = x.shape[:2]
    mean_c, scale_c = _spread(mean, c), _spread(rstd, c)
    if weight is not None:
        scale_c = (scale_c * weight.float()).contiguous()
    shift_c = (torch.zeros((n, c), dtype=torch.float32, device=x.device) if bias is None
               else bias.float().expand(n, c).contiguous())
    return mean_c, scale_c, shift_c


@group_norm_op.register_triton
def _(x, num_groups, weight, bias, eps, activation):
    x = triton_input(x)
    mean, var = ops.group_stats(x, num_groups)
    rstd = torch.rsqrt(var + eps)
    y = _kernels().affine_act(x, *_channel_params(x, mean, rstd, weight, bias), activation)
    return y, mean, rstd


# ---------------------------------------------------------------- group_norm_backward
# Gradients of group_norm's y, recomputing act's input from x.
group_norm_backward_op = registry.define("group_norm_backward")


@group_norm_backward_op.register_check
def _(grad_y, x, mean, rstd, weight, bias, activation, output_mask):
    groups = stats_groups(x, mean)
    check_groups(x, groups)
    check_group_vectors(x, groups, mean=mean, rstd=rstd)
    check_group_norm_vectors(x, weight, bias)
    check_activation(activation)
    if grad_y.shape != x.shape:
        raise ValueError(f"grad_y: expected shape {tuple(x.shape)}, got {tuple(grad_y.shape)}")
    if grad_y.dtype != x.dtype:
        raise TypeError(f"grad_y: expected dtype {x.dtype}, got {grad_y.dtype}")


@group_norm_backward_op.register_fake
def _(grad_y, x, mean, rstd, weight, bias, activation, output_mask):
    acc = accumulation_dtype(x.dtype)
    grad_x = torch.empty_like(x, memory_format=kernel_format(x)) if output_mask[0] else None
    vectors = []
    for wanted, t in zip(output_mask[1:], (weight, bias)):
        like = t if t is not None else x.new_empty((x.shape[1],), dtype=acc)
        vectors.append(torch.empty_like(like) if wanted else None)
    return grad_x, *vectors


@group_norm_backward_op.register_reference
def _(grad_y, x, mean, rstd, weight, bias, activation, output_mask):
    w, b = _affine_vectors(x, weight, bias, mean.dtype)
    num_groups = mean.shape[1]
    xhat = (x.to(mean.dtype) - per_channel(mean, x)) * per_channel(rstd, x)
    z = xhat * per_element(w, x) + per_element(b, x)
    dz = grad_y.to(z.dtype) * activation_grad(z, activation)
    grad_x = grad_weight = grad_bias = None
    if output_mask[0]:
        dxhat = dz * per_element(w, x)
        mean_dxhat = by_group(dxhat, num_groups).mean(2)
        mean_dxhat_xhat = by_group(dxhat * xhat, num_groups).mean(2)
        grad_x = per_channel(rstd, x) * (dxhat - per_channel(mean_dxhat, x) - xhat * per_channel(mean_dxhat_xhat, x))
        grad_x = grad_x.to(x.dtype).contiguous(memory_format=kernel_format(x))
    if output_mask[1]:
        grad_weight = (dz * xhat).sum(reduced_dims(x))
        grad_weight = grad_weight if weight is None else grad_weight.to(weight.dtype)
    if output_mask[2]:
        grad_bias = dz.sum(reduced_dims(x))
        grad_bias = grad_bias if bias is None else grad_bias.to(bias.dtype)
    return grad_x, grad_weight, grad_bias


@group_norm_backward_op.register_triton
def _(grad_y, x, mean, rstd, weight, bias, activation, output_mask):
    x = triton_input(x)
    grad_y = grad_y.contiguous(memory_format=kernel_format(x))
    n, c = x.shape[:2]
    groups = mean.shape[1]
    mean_c, scale_c, shift_c = _channel_params(x, mean, rstd, weight, bias)
    sums = _kernels().act_grad_sums(grad_y, x, mean_c, scale_c, shift_c, activation).double().sum(2)
    sum_dz, sum_dz_x = sums.unbind(0)  # (N, C) each
    grad_x = grad_weight = grad_bias = None
    if output_mask[1]:
        grad_weight = (sum_dz_x * _spread(rstd.double(), c)).sum(0)
        grad_weight = grad_weight.to(torch.float32 if weight is None else weight.dtype)
    if output_mask[2]:
        grad_bias = sum_dz.sum(0).to(torch.float32 if bias is None else bias.dtype)
    if output_mask[0]:
        # grad_x = dz * scale - rstd / M * S1 - (x - mean) * rstd^3 / M * S2 with
        # S1 = sum_c weight * sum(dz), S2 = sum_c weight * sum(dz * (x - mean)).
        w = torch.ones(c, dtype=torch.float64, device=x.device) if weight is None else weight.double()
        s1 = (sum_dz * w).reshape(n, groups, -1).sum(2)
        s2 = (sum_dz_x * w).reshape(n, groups, -1).sum(2)
        count = x[0].numel() // groups
        r = rstd.double()
        coef_a = _spread((-r * s1 / count).float(), c)
        coef_b = _spread((-r**3 * s2 / count).float(), c)
        grad_x = _kernels().centered_affine_grad(x, grad_y, mean_c, scale_c, shift_c, coef_a, coef_b, activation)
    return grad_x, grad_weight, grad_bias


# ---------------------------------------------------------------- group_norm_affine
# GroupNorm as the fused unit's (N, C) mean, scale, shift and its (N, G) rstd:
# composed of group_stats in C++ (csrc/composites.cpp; the CPU has one kernel).
registry.define("group_norm_affine", composite="explicit")
# group_norm_affine then norm_act_conv2d, composed in C++ for autograd to see through.
registry.define("group_norm_act_conv2d", composite="implicit")


# ---------------------------------------------------------------- entry points
def _check_group_norm_args(x, num_groups, weight, bias, eps):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES)
        raise TypeError(f"x: expected one of {names}, got {x.dtype}")
    check_finite("eps", eps, low=0)
    c = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0 or c % num_groups:
        raise ValueError(f"num_groups: expected a positive divisor of the {c} channels, got {num_groups!r}")
    check_group_norm_vectors(x, weight, bias)


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
    if x.dim() in (4, 5):
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
