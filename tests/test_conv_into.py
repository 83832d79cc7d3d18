"""norm_act_conv2d_into: the fused convolution's epilogue storing into a channel
slice of a preallocated buffer, with the output's per-channel statistics."""

import pytest
import torch
import torch.nn.functional as F

import resfast
from conftest import available_backends
from resfast.ops.layout import kernel_format
from utils import assert_close

BACKENDS = available_backends()

# (in, out, kernel, stride, padding, groups, bias, residual, (H, W), buffer channels, offset)
CONFIGS = [
    (5, 6, 1, 1, 0, 1, False, False, (7, 9), 13, 4),
    (4, 10, 3, 1, 1, 1, True, True, (8, 8), 10, 0),
    (6, 4, 3, 2, 1, 2, False, True, (9, 7), 9, 5),
    (3, 7, 3, 1, 1, 1, True, False, (5, 6), 20, 11),
]


def _inputs(cfg, dtype, channels_last):
    cin, cout, k, s, p, g, has_bias, has_res, (h, w), width, offset = cfg
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = (torch.randn(3, cin, h, w, dtype=torch.float64) * 1.5 + 0.3).to(dtype).contiguous(memory_format=fmt)
    mean = torch.randn(cin, dtype=acc) * 0.3
    scale = torch.rand(cin, dtype=acc) + 0.5
    shift = torch.randn(cin, dtype=acc) * 0.2
    weight = torch.randn(cout, cin // g, k, k, dtype=dtype) * 0.3
    bias = torch.randn(cout, dtype=dtype) if has_bias else None
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    residual = torch.randn(3, cout, oh, ow, dtype=dtype) if has_res else None
    # Sentinel values everywhere: the untouched channels are compared exactly.
    out = torch.randn(3, width, oh, ow, dtype=dtype).contiguous(memory_format=fmt) * 100
    return x, mean, scale, shift, weight, bias, residual, (s, p, g), out, offset


def _expected(x, mean, scale, shift, weight, bias, residual, conv):
    s, p, g = conv
    a = F.relu((x.double() - mean.double()[:, None, None]) * scale.double()[:, None, None]
               + shift.double()[:, None, None])
    y = F.conv2d(a, weight.double(), None if bias is None else bias.double(), s, p, 1, g)
    return y if residual is None else y + residual.double()


# The Triton interpreter is slow: it runs the configs with at most 4 input channels.
CASES = [(backend, i) for backend, _ in BACKENDS for i, cfg in enumerate(CONFIGS)
         if backend != "triton" or cfg[0] <= 4]


@pytest.mark.parametrize("backend,cfg_index", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_into_slice_with_stats(backend, cfg_index, channels_last, poison_empty):
    dtype, cfg = torch.float32, CONFIGS[cfg_index]
    x, mean, scale, shift, weight, bias, residual, (s, p, g), out, offset = _inputs(cfg, dtype, channels_last)
    before = out.clone()
    with resfast.backend(backend):
        m, v = resfast.ops.norm_act_conv2d_into(x, mean, scale, shift, weight, out, offset, bias, residual, s, p,
                                                groups=g, compute_stats=True)
    expected = _expected(x, mean, scale, shift, weight, bias, residual, (s, p, g))
    cout = weight.shape[0]
    written = out[:, offset:offset + cout]
    assert_close(written, expected, dtype, "slice")
    keep = torch.ones(out.shape[1], dtype=torch.bool)
    keep[offset:offset + cout] = False
    assert torch.equal(out[:, keep], before[:, keep]), "channels outside the slice were written"
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    var_ref, mean_ref = torch.var_mean(written.double(), dim=(0, 2, 3), unbiased=False)
    assert m.dtype == v.dtype == torch.float32
    assert_close(m, mean_ref, dtype, "mean", tol=1e-6, floor=written.abs().max().item())
    assert_close(v, var_ref, dtype, "var", tol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
def test_into_float64_cpu_and_no_stats(channels_last):
    x, mean, scale, shift, weight, bias, residual, (s, p, g), out, offset = _inputs(CONFIGS[0], torch.float64,
                                                                                  channels_last)
    before = out.clone()
    m, v = resfast.ops.norm_act_conv2d_into(x, mean, scale, shift, weight, out, offset, bias, residual, s, p,
                                            groups=g, compute_stats=True)
    written = out[:, offset:offset + weight.shape[0]]
    assert_close(written, _expected(x, mean, scale, shift, weight, bias, residual, (s, p, g)), torch.float64,
                 "slice")
    var_ref, mean_ref = torch.var_mean(written, dim=(0, 2, 3), unbiased=False)
    assert m.dtype == torch.float64
    assert_close(m, mean_ref, torch.float64, "mean", floor=1.0)
    assert_close(v, var_ref, torch.float64, "var")
    out2 = before.clone()
    m2, v2 = resfast.ops.norm_act_conv2d_into(x, mean, scale, shift, weight, out2, offset, bias, residual, s, p,
                                              groups=g)
    assert m2.numel() == v2.numel() == 0
    assert torch.equal(out2, out)


def test_stats_stable_for_large_mean():
    # A large common offset must not cost the variance its precision.
    x, mean, scale, shift, weight, _, _, conv, out, offset = _inputs(CONFIGS[0], torch.float32, True)
    residual = torch.full((3, weight.shape[0]) + out.shape[2:], 1e4)
    _, v = resfast.ops.norm_act_conv2d_into(x, mean, scale, shift, weight, out, offset, None, residual,
                                            compute_stats=True)
    written = out[:, offset:offset + weight.shape[0]].double()
    assert_close(v, written.var(dim=(0, 2, 3), unbiased=False), torch.float32, "var", tol=1e-5)


def test_into_bad_arguments():
    x, mean, scale, shift, weight, _, _, _, out, _ = _inputs(CONFIGS[0], torch.float32, False)
    with pytest.raises(ValueError, match="out_offset"):
        resfast.ops.norm_act_conv2d_into(x, mean, scale, shift, weight, out, out.shape[1] - 2)
    with pytest.raises(TypeError, match="out: expected dtype"):
        resfast.ops.norm_act_conv2d_into(x, mean, scale, shift, weight, out.double(), 0)
    with pytest.raises(ValueError, match="out: expected an NCHW"):
        resfast.ops.norm_act_conv2d_into(x, mean, scale, shift, weight, out[:, 1:], 0)
    with pytest.raises(ValueError, match="out: expected shape"):
        resfast.ops.norm_act_conv2d_into(x, mean, scale, shift, weight, out[:, :, 1:].contiguous(), 0)
    with pytest.raises(RuntimeError, match="not differentiable"):
        resfast.ops.norm_act_conv2d_into(x, mean, scale, shift, weight.requires_grad_(), out, 0)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_channel_slice_is_read_in_place(channels_last):
    """x = buffer[:, :C] (a dense block's input) is read where it lies, not
    copied, by the unit's forward and backward and by channel_stats, with the
    results of a contiguous copy bit for bit."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    buf = (torch.randn(3, 11, 17, 19) * 1.5 + 0.3).contiguous(memory_format=fmt)
    x = buf[:, :6]
    dense = x.contiguous(memory_format=fmt)
    mean, scale, shift = torch.randn(6) * 0.3, torch.rand(6) + 0.5, torch.randn(6) * 0.2
    weight = torch.randn(5, 6, 3, 3) * 0.3
    conv = ([1, 1], [1, 1], [1, 1], 1, "relu")
    invstd = torch.rand(6) + 0.5
    grad_out = torch.randn(3, 5, 17, 19).contiguous(memory_format=fmt)

    def run(inp):
        y = torch.ops.resfast.norm_act_conv2d(inp, mean, scale, shift, weight, None, None, *conv, None)
        grads = torch.ops.resfast.norm_act_conv2d_backward(grad_out, inp, mean, scale, shift, weight, *conv, invstd,
                                                           [True, True])
        m, v = torch.ops.resfast.channel_stats(inp)
        gx = torch.ops.resfast.channel_stats_backward(inp, m, torch.randn(6, generator=torch.Generator().manual_seed(0)),
                                                      torch.ones(6))
        return (y, *grads, m, v, gx)

    with torch.profiler.profile(record_shapes=True) as prof:
        sliced = run(x)
    copies = [e.name for e in prof.events() if e.name in ("aten::clone", "aten::copy_", "aten::contiguous")
              and e.input_shapes and e.input_shapes[0] == list(x.shape)]
    assert not copies, f"x was copied: {copies}"
    for got, want in zip(sliced, run(dense)):
        assert torch.equal(got, want)
    assert sliced[1].is_contiguous(memory_format=fmt), "grad_x is laid out densely"


@pytest.mark.parametrize("shape,channels_last,view", [
    ((1, 6, 5, 7), False, "expand"),   # one sample repeated: sample stride 0
    ((3, 6, 1, 7), True, "slice"),     # H = 1: pixel stride from W's stride
    ((3, 6, 5, 1), True, "slice"),     # W = 1: pixel stride from H's stride
    ((1, 6, 1, 1), True, "slice"),     # one pixel
    ((3, 6, 5, 7), False, "permute"),  # neither layout: copied
], ids=["expand", "cl-h1", "cl-w1", "cl-1px", "permuted"])
def test_strided_inputs_match_contiguous(shape, channels_last, view):
    n, c, h, w = shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if view == "expand":
        x = torch.randn(1, c, h, w).expand(3, c, h, w)
    elif view == "slice":
        x = torch.randn(n, c + 5, h, w).contiguous(memory_format=fmt)[:, :c]
    else:
        x = torch.randn(n, h, c, w).permute(0, 2, 1, 3)
    mean, scale, shift = torch.randn(c) * 0.3, torch.rand(c) + 0.5, torch.randn(c) * 0.2
    weight = torch.randn(4, c, 1, 1)
    conv = ([1, 1], [0, 0], [1, 1], 1, "silu")
    grad_out = torch.randn(x.shape[0], 4, h, w)
    invstd = torch.rand(c) + 0.5

    def run(inp):
        y = torch.ops.resfast.norm_act_conv2d(inp, mean, scale, shift, weight, None, None, *conv, None)
        grads = torch.ops.resfast.norm_act_conv2d_backward(grad_out.contiguous(memory_format=kernel_format(inp)), inp,
                                                           mean, scale, shift, weight, *conv, invstd, [True, True])
        return (y, *grads, *torch.ops.resfast.channel_stats(inp))

    dense = x.contiguous(memory_format=kernel_format(x))
    for got, want in zip(run(x), run(dense)):
        assert torch.equal(got, want)
