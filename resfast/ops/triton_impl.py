"""The resfast ops implemented with the Triton kernels of resfast/kernels: the
CUDA implementation of the convolution ops, and every op under
resfast.backend("triton")."""

import torch

from resfast.ops.checks import check_activation, check_activation_input, check_channel_vector, check_conv_args
from resfast.ops.layout import kernel_format

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Ops whose registered CUDA kernel is the Triton one; the others run CUDA C++.
CUDA_OPS = ("norm_act_conv2d", "norm_act_conv2d_backward", "norm_act_conv2d_into")


def _kernels():
    # Imported on first use: the Triton interpreter flag is read when kernels are defined.
    from resfast.kernels import conv, stats

    return conv, stats


def _prepare_unit(x, mean, scale, shift, weight, stride, padding, dilation, groups, activation):
    check_activation_input(x, dtypes=TRITON_DTYPES)
    check_activation(activation)
    check_conv_args(x, weight, tuple(stride), tuple(padding), tuple(dilation), groups)
    for name, p in (("mean", mean), ("scale", scale), ("shift", shift)):
        if p.dim() == 2:
            raise NotImplementedError(f"{name}: per-sample (N, C) parameters are not supported by the Triton "
                                      "kernels yet")
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


def norm_act_conv2d(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups, activation,
                    batch_invstd=None):
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
    "channel_stats": channel_stats,
    "channel_stats_backward": channel_stats_backward,
    "norm_act_conv2d": norm_act_conv2d,
    "norm_act_conv2d_backward": norm_act_conv2d_backward,
    "norm_act_conv2d_into": norm_act_conv2d_into,
}
