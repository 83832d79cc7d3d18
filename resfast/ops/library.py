"""Python side of the op registrations whose schemas csrc/ops.cpp defines:
fake (meta) kernels for torch.compile, and the Triton kernels as the CUDA
implementation of the convolution ops."""

import torch

from resfast.ops.layout import accumulation_dtype, conv_output_size, kernel_format

ops = torch.ops.resfast


# ---------------------------------------------------------------- fake kernels
@torch.library.register_fake("resfast::channel_stats")
def _channel_stats_fake(x):
    acc = accumulation_dtype(x.dtype)
    return x.new_empty((x.shape[1],), dtype=acc), x.new_empty((x.shape[1],), dtype=acc)


@torch.library.register_fake("resfast::channel_stats_backward")
def _channel_stats_backward_fake(x, mean, grad_mean, grad_var):
    return torch.empty_like(x, memory_format=kernel_format(x))


@torch.library.register_fake("resfast::norm_act_conv2d")
def _norm_act_conv2d_fake(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups,
                          activation, batch_invstd=None):
    oh, ow = conv_output_size(x, weight, stride, padding, dilation)
    y = x.new_empty((x.shape[0], weight.shape[0], oh, ow), dtype=weight.dtype)
    return y.contiguous(memory_format=kernel_format(x))


@torch.library.register_fake("resfast::norm_act_conv2d_stats")
def _norm_act_conv2d_stats_fake(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups,
                                activation, batch_invstd=None):
    y = _norm_act_conv2d_fake(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups,
                              activation)
    acc = accumulation_dtype(weight.dtype)
    return y, y.new_empty((weight.shape[0],), dtype=acc), y.new_empty((weight.shape[0],), dtype=acc)


@torch.library.register_fake("resfast::norm_act_conv2d_into")
def _norm_act_conv2d_into_fake(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups,
                               activation, out, out_offset, compute_stats=False):
    channels = weight.shape[0] if compute_stats else 0
    acc = accumulation_dtype(weight.dtype)
    return out.new_empty((channels,), dtype=acc), out.new_empty((channels,), dtype=acc)


@torch.library.register_fake("resfast::norm_act_conv2d_backward")
def _norm_act_conv2d_backward_fake(grad_out, x, mean, scale, shift, weight, stride, padding, dilation, groups,
                                   activation, batch_invstd, output_mask):
    grad_x = grad_scale = grad_shift = grad_weight = None
    if output_mask[0]:
        grad_x = torch.empty_like(x, memory_format=kernel_format(x))
        grad_scale, grad_shift = torch.empty_like(scale), torch.empty_like(scale)
    if output_mask[1]:
        grad_weight = torch.empty_like(weight, memory_format=kernel_format(weight))
    return grad_x, grad_scale, grad_shift, grad_weight


@torch.library.register_fake("resfast::group_stats")
def _group_stats_fake(x, num_groups):
    acc = accumulation_dtype(x.dtype)
    shape = (x.shape[0], num_groups)
    return x.new_empty(shape, dtype=acc), x.new_empty(shape, dtype=acc)


@torch.library.register_fake("resfast::group_stats_backward")
def _group_stats_backward_fake(x, mean, grad_mean, grad_var):
    return torch.empty_like(x, memory_format=kernel_format(x))


@torch.library.register_fake("resfast::group_norm_affine")
def _group_norm_affine_fake(x, num_groups, weight, bias, eps):
    acc = accumulation_dtype(x.dtype)
    per_channel = tuple(x.new_empty((x.shape[0], x.shape[1]), dtype=acc) for _ in range(3))
    return *per_channel, x.new_empty((x.shape[0], num_groups), dtype=acc)


@torch.library.register_fake("resfast::group_norm")
def _group_norm_fake(x, num_groups, weight, bias, eps, activation):
    acc = accumulation_dtype(x.dtype)
    shape = (x.shape[0], num_groups)
    y = torch.empty_like(x, memory_format=kernel_format(x))
    return y, x.new_empty(shape, dtype=acc), x.new_empty(shape, dtype=acc)


@torch.library.register_fake("resfast::group_norm_backward")
def _group_norm_backward_fake(grad_y, x, mean, rstd, weight, bias, activation, output_mask):
    acc = accumulation_dtype(x.dtype)
    grad_x = torch.empty_like(x, memory_format=kernel_format(x)) if output_mask[0] else None
    vectors = []
    for wanted, t in zip(output_mask[1:], (weight, bias)):
        like = t if t is not None else x.new_empty((x.shape[1],), dtype=acc)
        vectors.append(torch.empty_like(like) if wanted else None)
    return grad_x, *vectors


# The differentiable ops' autograd is registered in C++ (csrc/autograd.cpp).


# ---------------------------------------------------------------- Triton on CUDA
def _register_triton_cuda_kernels():
    from resfast.ops import triton_impl

    for name in triton_impl.CUDA_OPS:
        torch.library.register_kernel(f"resfast::{name}", "cuda", triton_impl.IMPLS[name])


_register_triton_cuda_kernels()
