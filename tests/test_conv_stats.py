"""norm_act_conv2d_stats: the fused unit returning its output's batch
statistics from the epilogue, with norm_act_conv2d's gradients."""

import pytest
import torch

import resfast
from conftest import available_backends
from utils import assert_close

BACKENDS = available_backends()


def _inputs(dtype, channels_last, batch_invstd):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(3, 4, 7, 6, dtype=dtype) * 1.5 + 0.3).contiguous(memory_format=fmt)
    mean, scale, shift = torch.randn(4, dtype=dtype) * 0.3, torch.rand(4, dtype=dtype) + 0.5, torch.randn(4, dtype=dtype)
    if batch_invstd:
        var, mean = torch.var_mean(x, (0, 2, 3), unbiased=False)
        invstd = torch.rsqrt(var + 1e-5)
        scale = invstd * (torch.rand(4, dtype=dtype) + 0.5)
    weight = torch.randn(5, 4, 3, 3, dtype=dtype) * 0.3
    residual = torch.randn(3, 5, 7, 6, dtype=dtype).contiguous(memory_format=fmt)
    bias = torch.randn(5, dtype=dtype)
    return x, mean, scale, shift, weight, bias, residual, (invstd if batch_invstd else None)


def _run(fn, inputs, grad):
    x, mean, scale, shift, weight, bias, residual, invstd = [t.clone().requires_grad_() if t is not None and i != 7
                                                             else t for i, t in enumerate(inputs)]
    out = fn(x, mean, scale, shift, weight, bias, residual, 1, 1, 1, 1, "relu", invstd)
    y = out[0] if isinstance(out, tuple) else out
    y.backward(grad)
    return out, [t.grad for t in (x, mean, scale, shift, weight, bias, residual)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("batch_invstd", [False, True], ids=["affine", "batch"])
def test_stats_and_gradients_match_the_plain_unit(backend, device, channels_last, batch_invstd):
    dtype = torch.float32
    inputs = _inputs(torch.float64 if backend != "triton" else dtype, channels_last, batch_invstd)
    inputs = [None if t is None else t.to(device) for t in inputs]
    grad = torch.randn(3, 5, 7, 6, dtype=inputs[0].dtype, device=device)
    with resfast.backend(backend):
        (y, y_mean, y_var), grads = _run(resfast.ops.norm_act_conv2d_stats, inputs, grad)
        y_ref, grads_ref = _run(resfast.ops.norm_act_conv2d, inputs, grad)
    tol = 1e-4 if backend == "triton" else 1e-10
    assert_close(y, y_ref, y.dtype, "y", tol)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    var, mean = torch.var_mean(y_ref.double(), (0, 2, 3), unbiased=False)
    assert_close(y_mean, mean, y.dtype, "mean", tol)
    assert_close(y_var, var, y.dtype, "var", tol)
    assert not y_mean.requires_grad and not y_var.requires_grad
    for name, g, g_ref in zip(("x", "mean", "scale", "shift", "weight", "bias", "residual"), grads, grads_ref):
        assert_close(g, g_ref, y.dtype, f"grad {name}", tol)
