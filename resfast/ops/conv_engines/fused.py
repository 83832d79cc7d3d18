"""The `triton` engine: our implicit-GEMM kernels with the normalisation in
the prologue and the residual, slice store and statistics in the epilogue
(resfast/kernels/conv.py). Nothing but x and the vectors is ever written
beside the output. A candidate where fusion can win: low arithmetic
intensity (1x1 layers with C_in >= C_out, dense-block bottlenecks) and what
cuDNN cannot express (SiLU, GroupNorm parameters)."""

import torch

from resfast.ops.conv_engines import calls
from resfast.ops.layout import kernel_format

ops = torch.ops.resfast

NAME = "triton"
DETERMINISTIC = True  # no atomics: fixed-order reductions


def _conv():
    from resfast.kernels import conv

    return conv


def _pointwise_3d(call):
    """A 3-D convolution with a 1x1x1 kernel and stride 1: over the (D*H, W)
    view of NCDHW or channels_last_3d tensors it is the same 1x1 convolution
    in 2-D, which the kernels run."""
    return call.x.dim() == 5 and tuple(call.weight.shape[2:]) == (1, 1, 1) and tuple(call.stride) == (1, 1, 1) \
        and tuple(call.padding) == (0, 0, 0)


def unsupported(call):
    """Why the engine cannot run a call, or None."""
    if call.x.dim() != 4 and not _pointwise_3d(call):
        return "3-D convolution other than 1x1x1 with stride 1 and no padding (the implicit-GEMM kernels are 2-D)"
    return calls.unsupported_by_triton(call)


def _flat(t):
    """A 5-D tensor as its (N, C, D*H, W) view (a view for both dense layouts)."""
    return None if t is None else t.flatten(2, 3)


def _as_2d(call):
    """A 1x1x1 3-D call as the 2-D call on flattened views, and the depth D
    that unflattens its results."""
    spatial = dict(stride=call.stride[1:], padding=call.padding[1:], dilation=call.dilation[1:])
    if isinstance(call, calls.Forward):
        flat = call._replace(x=_flat(call.x), weight=_flat(call.weight), residual=_flat(call.residual),
                             out=_flat(call.out), **spatial)
    else:
        flat = call._replace(grad_out=_flat(call.grad_out), x=_flat(call.x), weight=_flat(call.weight), **spatial)
    return flat, call.x.shape[2]


def _unflatten(t, depth):
    return None if t is None else t.unflatten(2, (depth, -1))


def _per_sample(call):
    # The kernels index parameters by channel: (N, C) ones run a sample at a
    # time (N launches; a sample stride in the prologue would fuse them).
    return call.mean.dim() == 2


def forward(call):
    """(y, stats): y the output (or the written slice of call.out), stats its
    per-channel (mean, var) when call.compute_stats."""
    if call.x.dim() == 5:
        flat, depth = _as_2d(call)
        y, stats = forward(flat)
        return _unflatten(y, depth), stats
    launch = _conv().norm_act_conv2d_forward
    y = call.destination()
    y = call.fresh_output() if y is None else y
    x, weight = call.x, call.weight
    conv_args = (call.stride, call.padding, call.dilation, call.groups, call.activation)
    if _per_sample(call):
        for i in range(x.shape[0]):
            launch(x[i:i + 1], call.mean[i], call.scale[i], call.shift[i], weight, call.bias,
                   None if call.residual is None else call.residual[i:i + 1], *conv_args, y[i:i + 1], False)
        return y, ops.channel_stats(y) if call.compute_stats else None
    stats = launch(x, call.mean.contiguous(), call.scale.contiguous(), call.shift.contiguous(), weight, call.bias,
                   call.residual, *conv_args, y, call.compute_stats)
    return y, stats


def _group_stats_grad(x, mean, scale, grad_scale, grad_shift, invstd):
    """mean and scale are x's GroupNorm statistics (mean[n, c] the group's
    mean, scale[n, c] = gamma[c] * invstd[n, g]): their share of x's gradient."""
    n, c = scale.shape
    groups = invstd.shape[1]

    def per_group_sum(t):
        return t.reshape(n, groups, -1).sum(2)

    grad_mean = -per_group_sum(scale * grad_shift)
    grad_var = -0.5 * invstd * invstd * per_group_sum(scale * grad_scale)
    return ops.group_stats_backward(x, mean[:, ::c // groups].contiguous(), grad_mean, grad_var)


def backward(call):
    if call.x.dim() == 5:
        flat, depth = _as_2d(call)
        grad_x, grad_scale, grad_shift, grad_weight = backward(flat)
        if grad_weight is not None:
            grad_weight = grad_weight.reshape(call.weight.shape).contiguous(memory_format=kernel_format(call.weight))
        return _unflatten(grad_x, depth), grad_scale, grad_shift, grad_weight
    x, weight, mask = call.x, call.weight, call.output_mask
    conv_args = (call.stride, call.padding, call.dilation, call.groups, call.activation)
    if _per_sample(call):
        outs = [backward(call._replace(grad_out=call.grad_out[i:i + 1], x=x[i:i + 1], mean=call.mean[i],
                                       scale=call.scale[i], shift=call.shift[i], batch_invstd=None))
                for i in range(x.shape[0])]
        grad_x = grad_scale = grad_shift = grad_weight = None
        if mask[0]:
            grad_x = torch.cat([o[0] for o in outs]).contiguous(memory_format=kernel_format(x))
            grad_scale, grad_shift = torch.stack([o[1] for o in outs]), torch.stack([o[2] for o in outs])
            if call.batch_invstd is not None:
                grad_x = grad_x + _group_stats_grad(x, call.mean, call.scale, grad_scale, grad_shift, call.batch_invstd)
        if mask[1]:
            grad_weight = torch.stack([o[3].float() for o in outs]).sum(0).to(weight.dtype)
            grad_weight = grad_weight.contiguous(memory_format=kernel_format(weight))
        return grad_x, grad_scale, grad_shift, grad_weight
    conv = _conv()
    mean, scale, shift = call.mean.contiguous(), call.scale.contiguous(), call.shift.contiguous()
    grad_x = grad_scale = grad_shift = grad_weight = None
    if mask[0]:
        grad_x, grad_scale, grad_shift = conv.norm_act_conv2d_backward_input(call.grad_out, x, mean, scale, shift,
                                                                             weight, *conv_args)
        if call.batch_invstd is not None:
            # Training-mode BatchNorm: the batch statistics' share of the gradient.
            grad_mean = -scale * grad_shift
            grad_var = -0.5 * scale * call.batch_invstd * call.batch_invstd * grad_scale
            grad_x = grad_x + ops.channel_stats_backward(x, mean, grad_mean, grad_var)
        grad_x = grad_x.contiguous(memory_format=kernel_format(x))
    if mask[1]:
        grad_weight = conv.norm_act_conv2d_backward_weight(call.grad_out, x, mean, scale, shift, tuple(weight.shape),
                                                           *conv_args)
        grad_weight = grad_weight.to(weight.dtype).contiguous(memory_format=kernel_format(weight))
    return grad_x, grad_scale, grad_shift, grad_weight
