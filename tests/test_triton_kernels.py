"""Numerical tests of the Triton implementations (resfast.backend("triton"))
against float64 torch references, at the launchers' edge cases: every
layout, stride phases, split-K, folded statistics, and every shipped config.

Runs on CUDA when available, otherwise on CPU under the Triton interpreter:
    TRITON_INTERPRET=1 python -m pytest tests/test_triton_kernels.py -q
Shapes are tiny because the interpreter executes every program in numpy.
"""
import os

import pytest
import torch

if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402

import resfast  # noqa: E402
from resfast.kernels import conv, stats  # noqa: E402
from utils import TOLERANCE  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ops = torch.ops.resfast
pytestmark = pytest.mark.usefixtures("poison_empty")


@pytest.fixture(autouse=True)
def _triton_backend():
    # The fused engine's kernels (the split engine's run in test_ops.py).
    with resfast.backend("triton"), resfast.ops.conv_impl("triton"):
        yield


def assert_close(actual, expected, tol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.double()
    assert not torch.isnan(actual).any(), f"{what}: {int(torch.isnan(actual).sum())} NaN entries"
    err = (actual - expected).abs()
    scale = expected.abs().max().clamp_min(1e-6)
    worst = int(err.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
    rel = float(err.max() / scale)
    assert rel <= tol, (f"{what}: worst error {float(err.max()):.3e} at {idx} "
                        f"(got {float(actual[idx]):.6g}, want {float(expected[idx]):.6g}), "
                        f"relative {rel:.3e} > {tol:.0e}")


def make_x(shape, dtype, layout):
    x = torch.randn(shape, device=DEVICE) * 1.5 + 0.3
    if layout == "channels_last":
        return x.to(dtype).contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        # Neither NCHW nor channels_last: channel stride between H and W strides.
        return x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3).to(dtype)
    return x.to(dtype)


def make_norm(c):
    mean = torch.randn(c, device=DEVICE) * 0.5
    sign = torch.where(torch.arange(c, device=DEVICE) % 3 == 1, -1.0, 1.0)
    scale = sign * (0.5 + torch.rand(c, device=DEVICE))
    shift = torch.randn(c, device=DEVICE) * 0.5
    return mean, scale, shift


def reference_activation(x, mean, scale, shift, activation, dot_dtype):
    z = (x.double() - mean.double()[:, None, None]) * scale.double()[:, None, None] \
        + shift.double()[:, None, None]
    a = {"identity": lambda t: t, "relu": F.relu, "silu": F.silu}[activation](z)
    # The kernels round a to the weight dtype before the dot; mimic that
    # (a differentiable cast, so autograd still sees the chain rule).
    return a if dot_dtype == torch.float32 else a.to(dot_dtype).double()


# (id, N, C, H, W, OC, kernel, stride, padding, dilation, groups, activation,
#  layout, bias, residual, x dtype, weight dtype)
CASES = [
    ("k1-nchw-relu", 2, 5, 5, 5, 6, 1, 1, 0, 1, 1, "relu", "nchw", True, False,
     torch.float32, torch.float32),
    ("k3p1-cl-silu-res", 2, 20, 7, 9, 10, 3, 1, 1, 1, 1, "silu", "channels_last", False, True,
     torch.float32, torch.float32),
    ("k7s2p3-stem-cl", 1, 3, 9, 7, 6, 7, 2, 3, 1, 1, "relu", "channels_last", True, False,
     torch.float32, torch.float32),
    ("k3s2p1-nchw-id-res", 2, 5, 7, 9, 6, 3, 2, 1, 1, 1, "identity", "nchw", True, True,
     torch.float32, torch.float32),
    ("k3d2p2-silu", 1, 5, 7, 9, 6, 3, 1, 2, 2, 1, "silu", "nchw", False, False,
     torch.float32, torch.float32),
    ("k3p1-g2-cl", 2, 6, 5, 5, 10, 3, 1, 1, 1, 2, "silu", "channels_last", True, False,
     torch.float32, torch.float32),
    ("k1s2-down-wide", 2, 20, 7, 9, 40, 1, 2, 0, 1, 1, "relu", "nchw", False, False,
     torch.float32, torch.float32),
    ("k3p1-strided", 1, 5, 5, 7, 6, 3, 1, 1, 1, 1, "relu", "strided", True, True,
     torch.float32, torch.float32),
    ("k3p1-bf16-cl", 2, 20, 7, 9, 10, 3, 1, 1, 1, 1, "silu", "channels_last", True, True,
     torch.bfloat16, torch.bfloat16),
    ("k3s2-autocast-fp16", 1, 5, 7, 9, 6, 3, 2, 1, 1, 1, "relu", "channels_last", False, False,
     torch.float32, torch.float16),
]


class Case:
    def __init__(self, params):
        (self.id, n, c, h, w, oc, k, s, p, d, self.groups, self.activation, self.layout,
         has_bias, has_res, self.dtype, self.wdtype) = params
        self.stride, self.padding, self.dilation = (s, s), (p, p), (d, d)
        self.x = make_x((n, c, h, w), self.dtype, self.layout)
        self.mean, self.scale, self.shift = make_norm(c)
        self.weight = (torch.randn(oc, c // self.groups, k, k, device=DEVICE) / (k * (c ** 0.5))
                       ).to(self.wdtype)
        self.bias = torch.randn(oc, device=DEVICE).to(self.wdtype) if has_bias else None
        self.out_shape = F.conv2d(torch.empty(n, c, h, w, device="meta"),
                                  torch.empty(self.weight.shape, device="meta"),
                                  None, self.stride, self.padding, self.dilation, self.groups).shape
        self.residual = make_x(self.out_shape, self.wdtype, self.layout) if has_res else None
        self.grad_out = make_x(self.out_shape, self.wdtype, self.layout)

    @property
    def conv_args(self):
        return list(self.stride), list(self.padding), list(self.dilation), self.groups, self.activation

    def forward(self):
        return ops.norm_act_conv2d(self.x, self.mean, self.scale, self.shift, self.weight, self.bias,
                                   self.residual, *self.conv_args)

    def backward(self, output_mask):
        return ops.norm_act_conv2d_backward(self.grad_out, self.x, self.mean, self.scale, self.shift, self.weight,
                                            *self.conv_args, None, output_mask)

    def reference(self):
        """Float64 forward output and autograd gradients (x, scale, shift, weight)."""
        x = self.x.double().requires_grad_()
        scale = self.scale.double().requires_grad_()
        shift = self.shift.double().requires_grad_()
        weight = self.weight.double().requires_grad_()
        a = reference_activation(x, self.mean, scale, shift, self.activation, self.wdtype)
        y = F.conv2d(a, weight, None if self.bias is None else self.bias.double(),
                     self.stride, self.padding, self.dilation, self.groups)
        if self.residual is not None:
            y = y + self.residual.double()
        grads = torch.autograd.grad(y, (x, scale, shift, weight), self.grad_out.double())
        return (y.detach(),) + grads


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def case(request):
    torch.manual_seed(sum(map(ord, request.param[0])))
    return Case(request.param)


def expect_format(out, like, what):
    cl = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    if cl:
        assert out.is_contiguous(memory_format=torch.channels_last), f"{what} should be channels_last"
    else:
        assert out.is_contiguous(), f"{what} should be NCHW-contiguous"


def test_forward(case):
    y = case.forward()
    y_ref = case.reference()[0]
    assert y.dtype == case.wdtype
    expect_format(y, case.x, "y")
    assert_close(y, y_ref, TOLERANCE[case.wdtype], f"{case.id} y")


def test_backward_input(case):
    grad_x, grad_scale, grad_shift, _ = case.backward([True, False])
    _, gx_ref, gscale_ref, gshift_ref, _ = case.reference()
    assert grad_x.dtype == case.dtype
    assert grad_scale.dtype == grad_shift.dtype == torch.float32
    expect_format(grad_x, case.x, "grad_x")
    tol = TOLERANCE[case.wdtype]
    assert_close(grad_x, gx_ref, tol, f"{case.id} grad_x")
    assert_close(grad_scale, gscale_ref, tol, f"{case.id} grad_scale")
    assert_close(grad_shift, gshift_ref, tol, f"{case.id} grad_shift")


def test_backward_weight(case):
    grad_w = case.backward([False, True])[3]
    gw_ref = case.reference()[4]
    assert grad_w.dtype == case.wdtype
    assert_close(grad_w, gw_ref, TOLERANCE[case.wdtype], f"{case.id} grad_weight")


def test_backward_weight_split_k():
    # Enough positions that the reduction is split across programs.
    torch.manual_seed(7)
    c = Case(("split-k", 2, 5, 16, 20, 6, 3, 1, 1, 1, 1, "silu", "channels_last", False, False,
              torch.float32, torch.float32))
    cfg = conv._gemm_config(conv._wgrad_kernel, conv.WGRAD_CONFIGS, 6, 5, 2 * 16 * 20)
    splits, _ = conv._wgrad_splits(9, 2 * 16 * 20, cfg["BLOCK_K"], c.x.device)
    assert splits > 1
    grad_w = c.backward([False, True])[3]
    assert_close(grad_w, c.reference()[4], TOLERANCE[torch.float32], "split-k grad_weight")


def test_backward_input_stride_phase_without_taps():
    # 1x1 stride-2 conv: odd input rows/cols get no tap at all and must come back 0.
    torch.manual_seed(3)
    c = Case(("k1s2", 1, 5, 5, 7, 6, 1, 2, 0, 1, 1, "relu", "nchw", False, False,
              torch.float32, torch.float32))
    grad_x = c.backward([True, False])[0]
    assert (grad_x[:, :, 1::2] == 0).all() and (grad_x[:, :, :, 1::2] == 0).all()
    assert_close(grad_x, c.reference()[1], TOLERANCE[torch.float32], "k1s2 grad_x")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("few_programs", [False, True], ids=["wide", "folded"])
def test_channel_stats(layout, dtype, few_programs, monkeypatch):
    if few_programs:
        # One program per channel tile, so every program folds many row tiles.
        monkeypatch.setattr(stats, "multiprocessor_count", lambda device: 1)
    torch.manual_seed(11)
    x = make_x((4, 20, 13, 11), dtype, layout)
    mean, var = ops.channel_stats(x)
    var_ref, mean_ref = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    assert mean.dtype == var.dtype == torch.float32
    assert_close(mean, mean_ref, 1e-5, "mean")
    assert_close(var, var_ref, 1e-5, "var")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_channel_stats_large_mean(layout):
    torch.manual_seed(5)
    x = make_x((4, 3, 32, 32), torch.float32, layout) + 1e4
    mean, var = ops.channel_stats(x)
    var_ref, mean_ref = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    assert_close(mean, mean_ref, 1e-6, "mean")
    rel = float(((var.double() - var_ref) / var_ref).abs().max())
    assert rel < 1e-3, f"var relative error {rel:.3e} with a 1e4 offset"


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channel_stats_backward(layout, dtype):
    torch.manual_seed(13)
    x = make_x((2, 6, 5, 7), dtype, layout)
    mean = x.double().mean(dim=(0, 2, 3)).float()
    grad_mean, grad_var = torch.randn(6, device=DEVICE), torch.randn(6, device=DEVICE)
    grad_x = ops.channel_stats_backward(x, mean, grad_mean, grad_var)
    x64 = x.double().requires_grad_()
    var_ref, mean_ref = torch.var_mean(x64, dim=(0, 2, 3), correction=0)
    ref, = torch.autograd.grad((mean_ref, var_ref), x64, (grad_mean.double(), grad_var.double()))
    assert grad_x.dtype == dtype
    expect_format(grad_x, x, "grad_x")
    assert_close(grad_x, ref, TOLERANCE[dtype], "stats grad_x")

    only_mean = ops.channel_stats_backward(x, mean, grad_mean, torch.zeros_like(grad_var))
    expected = (grad_mean.double() / x[:, 0].numel())[None, :, None, None].expand(x.shape)
    assert_close(only_mean, expected, TOLERANCE[dtype], "stats grad_x with grad_var = 0")


def test_rejects_unsupported_inputs():
    """What the Triton implementations cannot take is refused by name."""
    x = torch.randn(1, 4, 5, 5, device=DEVICE)
    mean, scale, shift = make_norm(4)
    w = torch.randn(4, 4, 3, 3, device=DEVICE)
    args = (None, None, [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(TypeError, match="x: expected one of float32, float16, bfloat16"):
        ops.norm_act_conv2d(x.double(), mean.double(), scale.double(), shift.double(), w.double(), *args, "relu")
    with pytest.raises(TypeError, match="x: expected one of"):
        ops.norm_act_conv2d(x.to(torch.int32), mean, scale, shift, w, *args, "relu")
    with pytest.raises(ValueError, match="4-D"):
        ops.norm_act_conv2d(x[0], mean, scale, shift, w, *args, "relu")
    with pytest.raises(ValueError, match="activation"):
        ops.norm_act_conv2d(x, mean, scale, shift, w, *args, "gelu")
    with pytest.raises(ValueError, match="channels"):
        ops.norm_act_conv2d(x, mean, scale, shift, w[:, :3], *args, "relu")
    with pytest.raises(TypeError, match="x: expected one of float32, float16, bfloat16"):
        ops.channel_stats(x.double())


@pytest.mark.parametrize("config", range(len(stats.STORE_CONFIGS)), ids=["wide", "tall"])
@pytest.mark.parametrize("where", ["in-place", "slice", "nchw-residual", "5-d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_output(config, where, dtype):
    """The split engine's output pass under every shipped config: y (+
    residual) stored in place or into a channel slice, and the stored
    values' statistics (stable at a 1e3 offset)."""
    from resfast.kernels import forced_configs

    torch.manual_seed(17)
    shape = (2, 6, 3, 5, 7) if where == "5-d" else (3, 6, 9, 11)
    fmt = torch.channels_last_3d if where == "5-d" else torch.channels_last
    y = (torch.randn(shape, device=DEVICE) + 1e3).to(dtype).contiguous(memory_format=fmt)
    residual = torch.randn(shape, device=DEVICE).to(dtype)
    residual = residual if where == "nchw-residual" else residual.contiguous(memory_format=fmt)
    expected = (y.double() + residual.double()).to(dtype)
    if where == "slice":
        buffer = torch.randn((shape[0], 13, *shape[2:]), device=DEVICE).to(dtype).contiguous(memory_format=fmt)
        before, out = buffer.clone(), buffer[:, 4:10]
    else:
        out = y
    with forced_configs({"_store_output_kernel": stats.STORE_CONFIGS[config]}):
        mean, var = stats.store_output(y, residual, out, True)
        assert stats.store_output(y, None, torch.empty_like(y), False) is None
    # bf16: within one rounding (the interpreter's casts truncate, the GPU's round to nearest)
    ulps = 0 if dtype == torch.float32 else 2.0 ** -7
    assert ((out.double() - expected.double()).abs() <= ulps * expected.double().abs()).all()
    if where == "slice":
        assert torch.equal(buffer[:, :4], before[:, :4]) and torch.equal(buffer[:, 10:], before[:, 10:])
    dims = [d for d in range(y.dim()) if d != 1]
    var_ref, mean_ref = torch.var_mean(out.double(), dim=dims, correction=0)  # of the stored values
    assert_close(mean, mean_ref, 1e-6, "mean")
    assert_close(var, var_ref, 1e-4, "var")


CONV_KERNELS = {"_fwd_kernel": conv.FWD_CONFIGS, "_dgrad_kernel": conv.DGRAD_CONFIGS,
                "_wgrad_kernel": conv.WGRAD_CONFIGS}


@pytest.mark.parametrize("kernel,config", [(k, i) for k, cfgs in CONV_KERNELS.items() for i in range(len(cfgs))],
                         ids=[f"{k.strip('_')}-{'x'.join(str(v) for v in c.values())}"
                              for k, cfgs in CONV_KERNELS.items() for c in cfgs])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_shipped_convolution_config(kernel, config, dtype):
    """Each convolution kernel under each of its shipped configs (the 8-warp
    ones included), at a shape with two channel blocks of the largest BLOCK_K
    and a 3x3 kernel, so the reduction walks every (tap, channel block)."""
    from resfast.kernels import forced_configs

    torch.manual_seed(23)
    params = ("every-config", 2, 72, 6, 5, 20, 3, 1, 1, 1, 1, "silu", "channels_last", True, True, dtype, dtype)
    case = Case(params)
    with forced_configs({kernel: CONV_KERNELS[kernel][config]}):
        got = case.forward() if kernel == "_fwd_kernel" else case.backward([kernel == "_dgrad_kernel",
                                                                           kernel == "_wgrad_kernel"])
    expected = case.reference()
    tol = TOLERANCE[dtype]
    if kernel == "_fwd_kernel":
        assert_close(got, expected[0], tol, "y")
    elif kernel == "_dgrad_kernel":
        for name, g, e in zip(["grad_x", "grad_scale", "grad_shift"], got[:3], expected[1:4]):
            assert_close(g, e, tol, name)
    else:
        assert_close(got[3], expected[4], tol, "grad_weight")


@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_bf16_with_a_large_mean(activation):
    """bf16 x around 300 with unit spread: the mean folded into the shift (a
    16-bit dot's prologue) costs nothing against the float64 reference."""
    torch.manual_seed(29)
    params = ("large-mean", 2, 20, 7, 9, 10, 3, 1, 1, 1, 1, activation, "channels_last", False, False,
              torch.bfloat16, torch.bfloat16)
    case = Case(params)
    case.x = (case.x.float() + 300).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    case.mean = case.mean + 300
    expected = case.reference()
    assert_close(case.forward(), expected[0], TOLERANCE[torch.bfloat16], "y")
    grads = case.backward([True, True])
    for name, g, e in zip(["grad_x", "grad_scale", "grad_shift", "grad_weight"], grads, expected[1:]):
        assert_close(g, e, TOLERANCE[torch.bfloat16], name)


def test_int64_offsets_beyond_two_to_the_31(monkeypatch):
    """int32 element offsets unless a tensor reaches 2**31 elements away;
    the kernels' int64 variant computes the same result."""
    import triton.language as tl

    small = torch.empty(4, 4)
    far = torch.empty((2, 1), device="meta").as_strided((2, 1), (2**31, 1))  # no storage needed
    assert conv._index_dtype(small) == tl.int32 and conv._index_dtype(small, far) == tl.int64
    torch.manual_seed(31)
    case = Case(("int64", 2, 20, 7, 9, 10, 3, 2, 1, 1, 1, "relu", "channels_last", True, True,
                 torch.float32, torch.float32))
    monkeypatch.setattr(conv, "_index_dtype", lambda *tensors: tl.int64)
    expected = case.reference()
    assert_close(case.forward(), expected[0], TOLERANCE[torch.float32], "y")
    for name, g, e in zip(["grad_x", "grad_scale", "grad_shift", "grad_weight"], case.backward([True, True]),
                          expected[1:]):
        assert_close(g, e, TOLERANCE[torch.float32], name)
