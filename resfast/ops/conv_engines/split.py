"""The `split` engine, always available and the safe default: one pointwise
Triton pass writes act(x * scale + shift) into a temporary in the
convolution's dtype and x's layout, the convolution is ATen's (cuDNN on
CUDA; on CPU tensors, under the Triton interpreter, ATen's CPU convolution
stands in), and the temporary is freed at once: only x and the vectors are
kept for backward, which recomputes it. The residual add, the slice store
and the statistics are one pass over the output; the backward is one
convolution_backward call for both gradients, then one pass for the
activation's derivative and the per-channel sums, and one for the input
gradient (with the statistics' share folded in)."""

import torch

from resfast.ops.conv_engines import calls
from resfast.ops.layout import kernel_format, spatial_numel


NAME = "split"
DETERMINISTIC = True  # with torch.use_deterministic_algorithms, ATen picks deterministic convolutions


def _pointwise():
    from resfast.kernels import pointwise

    return pointwise


def _stats():
    from resfast.kernels import stats

    return stats


# Why the engine cannot run a call, or None.
unsupported = calls.unsupported_by_triton


def _activated(call, x):
    """act(x * scale + shift) in the convolution's dtype, laid out like x."""
    return _pointwise().affine_act(x, call.mean.contiguous(), call.scale.contiguous(), call.shift.contiguous(),
                                   call.activation, dtype=call.weight.dtype)


def forward(call):
    """(y, stats): y the output (or the written slice of call.out), stats its
    per-channel (mean, var) when call.compute_stats."""
    fmt = kernel_format(call.x)
    a = _activated(call, call.x)
    y = torch.ops.aten.convolution(a, call.weight, call.bias, call.stride, call.padding, call.dilation, False,
                                   [0] * len(call.stride), call.groups)
    del a
    destination = call.destination()
    if destination is None and call.residual is None and not call.compute_stats:
        return y.contiguous(memory_format=fmt), None
    if destination is None:
        destination = y if y.is_contiguous(memory_format=fmt) else torch.empty_like(y, memory_format=fmt)
    # The residual add, the slice store and the statistics: one pass.
    stats = _stats().store_output(y, call.residual, destination, call.compute_stats)
    return destination, stats


def _input_grad_coefs(call, grad_scale, grad_shift):
    """(a, b) with x's share of its statistics' gradient a + b (x - mean)
    (zero without batch_invstd), shaped like the parameters."""
    x, scale, invstd = call.x, call.scale, call.batch_invstd
    if invstd is None:
        zeros = torch.zeros_like(scale)
        return zeros, zeros
    if scale.dim() == 1:
        count = x.shape[0] * spatial_numel(x)
        grad_mean, grad_var = -scale * grad_shift, -0.5 * scale * invstd * invstd * grad_scale
    else:
        n, c = scale.shape
        groups = invstd.shape[1]
        count = c // groups * spatial_numel(x)
        grad_mean = -(scale * grad_shift).reshape(n, groups, -1).sum(2)
        grad_var = -0.5 * invstd * invstd * (scale * grad_scale).reshape(n, groups, -1).sum(2)
        grad_mean, grad_var = (t.repeat_interleave(c // groups, 1) for t in (grad_mean, grad_var))
    return (grad_mean / count).contiguous(), (2 * grad_var / count).contiguous()


def input_grad(call, grad_a):
    """(grad_x, grad_scale, grad_shift) from grad_a, the gradient of the
    convolution's input act(z): one pass for act'(z) and the per-channel
    sums, one for grad_x with the statistics' share folded in."""
    x, fmt = call.x, kernel_format(call.x)
    grad_a = grad_a.contiguous(memory_format=fmt)
    pointwise = _pointwise()
    mean, scale, shift = call.mean.contiguous(), call.scale.contiguous(), call.shift.contiguous()
    sums = pointwise.act_grad_sums(grad_a, x, mean, scale, shift, call.activation).double().sum(2)  # (2, N, C)
    if scale.dim() == 1:
        sums = sums.sum(1)
    grad_shift, grad_scale = (t.to(scale.dtype) for t in sums.unbind(0))
    coef_a, coef_b = _input_grad_coefs(call, grad_scale, grad_shift)
    grad_x = pointwise.centered_affine_grad(x, grad_a, mean, scale, shift, coef_a, coef_b, call.activation)
    return grad_x, grad_scale, grad_shift


def _convolution_backward(call, a, output_mask):
    return torch.ops.aten.convolution_backward(
        call.grad_out.contiguous(memory_format=kernel_format(call.x)), a, call.weight, None, call.stride,
        call.padding, call.dilation, False, [0] * len(call.stride), call.groups, [*output_mask, False])


def conv_input_grad(call):
    """The gradient of the convolution's input (ATen's data gradient), which
    reads only the input's shape, dtype and layout, not its values."""
    placeholder = torch.empty(call.x.shape, dtype=call.weight.dtype, device=call.x.device,
                              memory_format=kernel_format(call.x))
    return _convolution_backward(call, placeholder, (True, False))[0]


def backward(call):
    want_input, want_weight = call.output_mask
    if not want_weight:
        return *input_grad(call, conv_input_grad(call)), None
    # The weight gradient needs act(z), recomputed; both gradients come from one call.
    a = _activated(call, call.x)
    grad_a, grad_weight, _ = _convolution_backward(call, a, (want_input, True))
    del a
    grad_weight = grad_weight.contiguous(memory_format=kernel_format(call.weight))
    if not want_input:
        return None, None, None, grad_weight
    return *input_grad(call, grad_a), grad_weight
