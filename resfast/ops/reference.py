"""Pure-torch implementations of the resfast ops: the oracle of the tests and a
readable statement of what each kernel computes. Never the product path."""

import torch
import torch.nn.functional as F

from resfast.ops.layout import accumulation_dtype, kernel_format


def _per_element(p: torch.Tensor) -> torch.Tensor:
    """(C,) or (N, C) parameters, broadcastable against (N, C, H, W)."""
    return p[:, None, None] if p.dim() == 1 else p[:, :, None, None]


def _activate(z, activation):
    return {"identity": lambda t: t, "relu": F.relu, "silu": F.silu}[activation](z)


def _activation_grad(z, activation):
    if activation == "relu":
        return (~(z <= 0)).to(z.dtype)  # torch's threshold_backward: 1 at NaN
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    return torch.ones_like(z)


def _normalize(x, mean, scale, shift):
    acc = accumulation_dtype(x.dtype)
    return (x.to(acc) - _per_element(mean)) * _per_element(scale) + _per_element(shift)


def channel_stats(x):
    acc = accumulation_dtype(x.dtype)
    var, mean = torch.var_mean(x.to(torch.float64), dim=(0, 2, 3), unbiased=False)
    return mean.to(acc), var.to(acc)


def channel_stats_backward(x, mean, grad_mean, grad_var):
    count = x.shape[0] * x.shape[2] * x.shape[3]
    g = (_per_element(grad_mean) + 2 * _per_element(grad_var) * (x.to(mean.dtype) - _per_element(mean))) / count
    return g.to(x.dtype).contiguous(memory_format=kernel_format(x))


def norm_act_conv2d(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups, activation,
                    batch_invstd=None):
    a = _activate(_normalize(x, mean, scale, shift), activation).to(weight.dtype)
    y = F.conv2d(a, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        y = y + residual
    return y.contiguous(memory_format=kernel_format(x))


def norm_act_conv2d_into(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups, activation,
                         out, out_offset, compute_stats=False):
    y = norm_act_conv2d(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups, activation)
    out[:, out_offset:out_offset + y.shape[1]].copy_(y)
    acc = accumulation_dtype(y.dtype)
    if not compute_stats:
        return y.new_empty((0,), dtype=acc), y.new_empty((0,), dtype=acc)
    var, m = torch.var_mean(y.to(torch.float64), dim=(0, 2, 3), unbiased=False)
    return m.to(acc), var.to(acc)


def _stats_grad(x, centered, scale, grad_scale, grad_shift, invstd):
    """mean and scale are x's own statistics (BatchNorm's per channel,
    GroupNorm's per (sample, group)): their share of x's gradient."""
    if scale.dim() == 1:
        count = x.shape[0] * x.shape[2] * x.shape[3]
        grad_mean, grad_var = -scale * grad_shift, -0.5 * invstd**2 * scale * grad_scale
    else:
        n, c = scale.shape
        per_group = c // invstd.shape[1]
        count = per_group * x.shape[2] * x.shape[3]

        def per_group_sum(t):
            return t.reshape(n, -1, per_group).sum(2).repeat_interleave(per_group, 1)

        grad_mean = -per_group_sum(scale * grad_shift)
        grad_var = -0.5 * invstd.repeat_interleave(per_group, 1)**2 * per_group_sum(scale * grad_scale)
    return (_per_element(grad_mean) + 2 * _per_element(grad_var) * centered) / count


def _backward_input(grad_out, x, mean, scale, shift, weight, stride, padding, dilation, groups, activation,
                    batch_invstd):
    z = _normalize(x, mean, scale, shift)
    grad_a = torch.nn.grad.conv2d_input(x.shape, weight, grad_out, stride, padding, dilation, groups)
    dz = grad_a.to(z.dtype) * _activation_grad(z, activation)
    centered = x.to(z.dtype) - _per_element(mean)
    dims = (0, 2, 3) if scale.dim() == 1 else (2, 3)
    grad_scale, grad_shift = (dz * centered).sum(dims), dz.sum(dims)
    grad_x = dz * _per_element(scale)
    if batch_invstd is not None:
        grad_x = grad_x + _stats_grad(x, centered, scale, grad_scale, grad_shift, batch_invstd)
    grad_x = grad_x.to(x.dtype).contiguous(memory_format=kernel_format(x))
    return grad_x, grad_scale.to(scale.dtype), grad_shift.to(scale.dtype)


def _backward_weight(grad_out, x, mean, scale, shift, weight, stride, padding, dilation, groups, activation):
    a = _activate(_normalize(x, mean, scale, shift), activation).to(weight.dtype)
    grad_w = torch.nn.grad.conv2d_weight(a, weight.shape, grad_out, stride, padding, dilation, groups)
    return grad_w.to(weight.dtype).contiguous(memory_format=kernel_format(weight))


def norm_act_conv2d_backward(grad_out, x, mean, scale, shift, weight, stride, padding, dilation, groups, activation,
                             batch_invstd, output_mask):
    conv_args = (stride, padding, dilation, groups, activation)
    grad_x = grad_scale = grad_shift = grad_weight = None
    if output_mask[0]:
        grad_x, grad_scale, grad_shift = _backward_input(grad_out, x, mean, scale, shift, weight, *conv_args,
                                                         batch_invstd)
    if output_mask[1]:
        grad_weight = _backward_weight(grad_out, x, mean, scale, shift, weight, *conv_args)
    return grad_x, grad_scale, grad_shift, grad_weight


def _by_group(t, num_groups):
    return t.reshape(t.shape[0], num_groups, -1)


def _per_channel(per_group, channels):
    """(N, G) values as (N, C, 1, 1), each group's value over its channels."""
    return per_group.repeat_interleave(channels // per_group.shape[1], dim=1)[:, :, None, None]


def group_stats(x, num_groups):
    acc = accumulation_dtype(x.dtype)
    var, mean = torch.var_mean(_by_group(x.to(torch.float64), num_groups), dim=2, unbiased=False)
    return mean.to(acc), var.to(acc)


def group_stats_backward(x, mean, grad_mean, grad_var):
    count = x[0].numel() // mean.shape[1]
    centered = x.to(mean.dtype) - _per_channel(mean, x.shape[1])
    g = (_per_channel(grad_mean, x.shape[1]) + 2 * _per_channel(grad_var, x.shape[1]) * centered) / count
    return g.to(x.dtype).contiguous(memory_format=kernel_format(x))


def _affine_vectors(x, weight, bias, acc):
    w = x.new_ones(x.shape[1], dtype=acc) if weight is None else weight.to(acc)
    b = x.new_zeros(x.shape[1], dtype=acc) if bias is None else bias.to(acc)
    return w, b


def group_norm(x, num_groups, weight, bias, eps, activation):
    mean, var = group_stats(x, num_groups)
    rstd = torch.rsqrt(var + eps)
    w, b = _affine_vectors(x, weight, bias, mean.dtype)
    xhat = (x.to(mean.dtype) - _per_channel(mean, x.shape[1])) * _per_channel(rstd, x.shape[1])
    y = _activate(xhat * _per_element(w) + _per_element(b), activation)
    return y.to(x.dtype).contiguous(memory_format=kernel_format(x)), mean, rstd


def group_norm_backward(grad_y, x, mean, rstd, weight, bias, activation, output_mask):
    w, b = _affine_vectors(x, weight, bias, mean.dtype)
    num_groups = mean.shape[1]
    xhat = (x.to(mean.dtype) - _per_channel(mean, x.shape[1])) * _per_channel(rstd, x.shape[1])
    z = xhat * _per_element(w) + _per_element(b)
    dz = grad_y.to(z.dtype) * _activation_grad(z, activation)
    grad_x = grad_weight = grad_bias = None
    if output_mask[0]:
        dxhat = dz * _per_element(w)
        mean_dxhat = _by_group(dxhat, num_groups).mean(2)
        mean_dxhat_xhat = _by_group(dxhat * xhat, num_groups).mean(2)
        grad_x = _per_channel(rstd, x.shape[1]) * (
            dxhat - _per_channel(mean_dxhat, x.shape[1]) - xhat * _per_channel(mean_dxhat_xhat, x.shape[1]))
        grad_x = grad_x.to(x.dtype).contiguous(memory_format=kernel_format(x))
    if output_mask[1]:
        grad_weight = (dz * xhat).sum((0, 2, 3))
        grad_weight = grad_weight if weight is None else grad_weight.to(weight.dtype)
    if output_mask[2]:
        grad_bias = dz.sum((0, 2, 3))
        grad_bias = grad_bias if bias is None else grad_bias.to(bias.dtype)
    return grad_x, grad_weight, grad_bias


IMPLS = {
    "group_stats": group_stats,
    "group_stats_backward": group_stats_backward,
    "group_norm": group_norm,
    "group_norm_backward": group_norm_backward,
    "channel_stats": channel_stats,
    "channel_stats_backward": channel_stats_backward,
    "norm_act_conv2d": norm_act_conv2d,
    "norm_act_conv2d_backward": norm_act_conv2d_backward,
    "norm_act_conv2d_into": norm_act_conv2d_into,
}
