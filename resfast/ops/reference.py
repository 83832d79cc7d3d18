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
        # mean and scale are x's batch statistics: their gradient reaches x too.
        count = x.shape[0] * x.shape[2] * x.shape[3]
        grad_x = grad_x - _per_element(scale) * (
            _per_element(grad_shift) + centered * _per_element(batch_invstd**2 * grad_scale)) / count
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


IMPLS = {
    "channel_stats": channel_stats,
    "channel_stats_backward": channel_stats_backward,
    "norm_act_conv2d": norm_act_conv2d,
    "norm_act_conv2d_backward": norm_act_conv2d_backward,
}
