"""The resfast ops implemented with the Triton kernels of resfast/kernels: the
CUDA implementation of the convolution ops, and every op under
resfast.backend("triton")."""

import torch

from resfast.ops.checks import check_activation, check_activation_input, check_channel_vector, check_conv_args
from resfast.ops.layout import kernel_format

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Ops whose registered CUDA kernel is the Triton one; the others run CUDA C++.
CUDA_OPS = ("norm_act_conv2d", "norm_act_conv2d_backward", "norm_act_conv2d_into", "group_stats",
            "group_stats_backward", "group_norm", "group_norm_backward")


def _kernels():
    # Imported on first use: the Triton interpreter flag is read when kernels are defined.
    from resfast.kernels import conv, stats

    return conv, stats


def _gn_kernels():
    from resfast.kernels import group_norm

    return group_norm


def _check_groups(x, num_groups):
    check_activation_input(x, dtypes=TRITON_DTYPES)
    if num_groups <= 0 or x.shape[1] % num_groups:
        raise ValueError(f"num_groups: expected a positive divisor of the {x.shape[1]} channels, got {num_groups}")
    if x.shape[0] and not x[0].numel():
        raise ValueError(f"x: expected at least one value per group, got shape {tuple(x.shape)}")
    return x.contiguous(memory_format=kernel_format(x))


def _check_group_vectors(x, **tensors):
    for name, t in tensors.items():
        if t.dim() != 2 or t.shape[0] != x.shape[0] or t.dtype != torch.float32:
            raise ValueError(f"{name}: expected a float32 (N, G) tensor with N = {x.shape[0]}, got {t.dtype} "
                             f"{tuple(t.shape)}")


def _check_affine(x, **tensors):
    for name, t in tensors.items():
        if t is not None:
            check_channel_vector(x, name, t)


def group_stats(x, num_groups):
    x = _check_groups(x, num_groups)
    return _gn_kernels().group_stats(x, num_groups)


def group_stats_backward(x, mean, grad_mean, grad_var):
    x = _check_groups(x, mean.shape[1] if mean.dim() == 2 else 0)
    _check_group_vectors(x, mean=mean, grad_mean=grad_mean, grad_var=grad_var)
    return _gn_kernels().group_stats_backward(x, mean, grad_mean, grad_var)


def group_norm(x, num_groups, weight, bias, eps, activation):
    x = _check_groups(x, num_groups)
    check_activation(activation)
    _check_affine(x, weight=weight, bias=bias)
    return _gn_kernels().group_norm(x, num_groups, weight, bias, eps, activation)


def group_norm_backward(grad_y, x, mean, rstd, weight, bias, activation, output_mask):
    x = _check_groups(x, mean.shape[1] if mean.dim() == 2 else 0)
    check_activation(activation)
    _check_group_vectors(x, mean=mean, rstd=rstd)
    _check_affine(x, weight=weight, bias=bias)
    if grad_y.shape != x.shape or grad_y.dtype != x.dtype:
        raise ValueError(f"grad_y: expected {x.dtype} {tuple(x.shape)}, got {grad_y.dtype} {tuple(grad_y.shape)}")
    grad_y = grad_y.contiguous(memory_format=kernel_format(x))
    return _gn_kernels().group_norm_backward(grad_y, x, mean, rstd, weight, bias, activation, output_mask)


def _prepare_unit(x, mean, scale, shift, weight, stride, padding, dilation, groups, activation):
    check_activation_input(x, dtypes=TRITON_DTYPES)
    check_activation(activation)
    check_conv_args(x, weight, tuple(stride), tuple(padding), tuple(dilation), groups)
    for name, p in (("mean", mean), ("scale", scale), ("shift", shift)):
        check_channel_vector(x, name, p)
        if p.dtype != torch.float32:
            raise TypeError(f"{name}: expected dtype torch.float32, got {p.dtype}")
    return x.contiguous(memory_format=kernel_format(x)), (tuple(stride), tuple(padding), tuple(dilation), groups,
                                                         activation)


def channel_stats(x):
    check_activation_input(x, dtypes=TRITON_DTYPES)
    if x.shape[0] * x.shape[2] * x.shape[3] == 0:
        raise ValueError(f"x: expected at least one value per channel, got shape {tuple(x.shape)}")
    return _kernels()[1].channel_stats(x.contiguous(memory_format=kernel_format(x)))


def channel_stats_backward(x, mean, grad_mean, grad_var):
    check_activation_input(x, dtypes=TRITON_DTYPES)
    fmt = kernel_format(x)
    return _kernels()[1].channel_stats_backward(x.contiguous(memory_format=fmt), mean, grad_mean, grad_var)


def _per_sample_params(x, mean, scale, shift, batch_invstd):
    """True for (N, C) parameters (GroupNorm, with batch_invstd, if given,
    (N, G)). The convolution kernels index parameters by channel only, so such
    units run one sample at a time: correct, but N launches; a sample stride
    in the kernels' prologue and per-sample dgrad sums would fuse them (not
    done yet)."""
    if mean.dim() != 2:
        return False
    for name, p in (("mean", mean), ("scale", scale), ("shift", shift)):
        if tuple(p.shape) != tuple(x.shape[:2]):
            raise ValueError(f"{name}: expected shape {tuple(x.shape[:2])} like mean, got {tuple(p.shape)}")
    if batch_invstd is not None:
        groups = batch_invstd.shape[1] if batch_invstd.dim() == 2 else 0
        if tuple(batch_invstd.shape) != (x.shape[0], groups) or not groups or x.shape[1] % groups:
            raise ValueError(f"batch_invstd: expected shape ({x.shape[0]}, G) with G groups dividing the "
                             f"per-sample mean's {x.shape[1]} channels, got {tuple(batch_invstd.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"x: per-sample parameters need at least one sample, got shape {tuple(x.shape)}")
    return True


def _group_stats_grad(x, mean, scale, grad_scale, grad_shift, invstd):
    """mean and scale are x's GroupNorm statistics (mean[n, c] the group's
    mean, scale[n, c] = gamma[c] * invstd[n, g]): their share of x's gradient."""
    n, c = scale.shape
    groups = invstd.shape[1]

    def per_group_sum(t):
        return t.reshape(n, groups, -1).sum(2)

    grad_mean = -per_group_sum(scale * grad_shift)
    grad_var = -0.5 * invstd * invstd * per_group_sum(scale * grad_scale)
    return group_stats_backward(x, mean[:, ::c // groups].contiguous(), grad_mean, grad_var)


def norm_act_conv2d(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups, activation,
                    batch_invstd=None):
    if _per_sample_params(x, mean, scale, shift, batch_invstd):
        ys = [norm_act_conv2d(x[i:i + 1], mean[i], scale[i], shift[i], weight, bias,
                              None if residual is None else residual[i:i + 1], stride, padding, dilation, groups,
                              activation) for i in range(x.shape[0])]
        return torch.cat(ys).contiguous(memory_format=kernel_format(x))
    x, conv_args = _prepare_unit(x, mean, scale, shift, weight, stride, padding, dilation, groups, activation)
    y = _kernels()[0].norm_act_conv2d_forward(x, mean, scale, shift, weight, bias, residual, *conv_args)
    return y.contiguous(memory_format=kernel_format(x))


def norm_act_conv2d_into(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups, activation,
                         out, out_offset, compute_stats=False):
    x, conv_args = _prepare_unit(x, mean, scale, shift, weight, stride, padding, dilation, groups, activation)
    check_activation_input(out, "out", dtypes=TRITON_DTYPES)
    if not out.is_contiguous(memory_format=kernel_format(out)):
        raise ValueError(f"out: expected an NCHW- or channels_last-contiguous buffer, got strides {out.stride()}")
    oc = weight.shape[0]
    if not 0 <= out_offset <= out.shape[1] - oc:
        raise ValueError(f"out_offset: expected 0 <= out_offset <= {out.shape[1] - oc} for {oc} output channels in "
                         f"a buffer of {out.shape[1]}, got {out_offset}")
    return _kernels()[0].norm_act_conv2d_forward_into(x, mean, scale, shift, weight, bias, residual, *conv_args,
                                                      out=out[:, out_offset:out_offset + oc],
                                                      compute_stats=compute_stats)


def norm_act_conv2d_backward(grad_out, x, mean, scale, shift, weight, stride, padding, dilation, groups, activation,
                             batch_invstd, output_mask):
    if _per_sample_params(x, mean, scale, shift, batch_invstd):
        outs = [norm_act_conv2d_backward(grad_out[i:i + 1], x[i:i + 1], mean[i], scale[i], shift[i], weight, stride,
                                         padding, dilation, groups, activation, None, output_mask)
                for i in range(x.shape[0])]
        grad_x = grad_scale = grad_shift = grad_weight = None
        if output_mask[0]:
            grad_x = torch.cat([o[0] for o in outs]).contiguous(memory_format=kernel_format(x))
            grad_scale, grad_shift = torch.stack([o[1] for o in outs]), torch.stack([o[2] for o in outs])
            if batch_invstd is not None:
                grad_x = grad_x + _group_stats_grad(x, mean, scale, grad_scale, grad_shift, batch_invstd)
        if output_mask[1]:
            grad_weight = torch.stack([o[3].float() for o in outs]).sum(0).to(weight.dtype)
            grad_weight = grad_weight.contiguous(memory_format=kernel_format(weight))
        return grad_x, grad_scale, grad_shift, grad_weight
    x, conv_args = _prepare_unit(x, mean, scale, shift, weight, stride, padding, dilation, groups, activation)
    conv, stats = _kernels()
    grad_x = grad_scale = grad_shift = grad_weight = None
    if output_mask[0]:
        grad_x, grad_scale, grad_shift = conv.norm_act_conv2d_backward_input(
            grad_out, x, mean, scale, shift, weight, *conv_args
        )
        if batch_invstd is not None:
            # Training-mode BatchNorm: the batch statistics' share of the gradient.
            grad_mean = -scale * grad_shift
            grad_var = -0.5 * scale * batch_invstd * batch_invstd * grad_scale
            grad_x = grad_x + stats.channel_stats_backward(x, mean, grad_mean, grad_var)
        grad_x = grad_x.contiguous(memory_format=kernel_format(x))
    if output_mask[1]:
        grad_weight = conv.norm_act_conv2d_backward_weight(grad_out, x, mean, scale, shift, tuple(weight.shape),
                                                           *conv_args)
        grad_weight = grad_weight.to(weight.dtype).contiguous(memory_format=kernel_format(weight))
    return grad_x, grad_scale, grad_shift, grad_weight


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
