"""GroupNorm (+ activation), its statistics op and the GN→act→conv unit, every
backend, against float64 torch.nn.functional.group_norm."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resfast
from conftest import available_backends, triton_device
from resfast.bench.timing import saved_activation_bytes
from utils import assert_close

BACKENDS = list(dict.fromkeys(b for b, _ in available_backends()))
ACTS = {"identity": lambda t: t, "relu": F.relu, "silu": F.silu, "relu6": F.relu6}
CL = torch.channels_last

# (N, C, H, W, num_groups): odd sizes, groups of 1 channel and of all of them.
SHAPES = [(2, 6, 5, 3, 3), (3, 4, 7, 5, 1), (2, 5, 3, 4, 5)]


def reference(x, num_groups, weight, bias, eps, activation):
    return ACTS[activation](F.group_norm(x, num_groups, weight, bias, eps))


def check_against_float64(backend, shape, activation, fmt, dtype=torch.float32, affine=True, tol=None):
    n, c, h, w, groups = shape
    x64 = (torch.randn(n, c, h, w, dtype=torch.float64) * 1.5 + 0.7).contiguous(memory_format=fmt)
    w64 = (torch.rand(c, dtype=torch.float64) + 0.5) if affine else None
    b64 = (torch.randn(c, dtype=torch.float64) * 0.3) if affine else None
    leaves64 = [t.requires_grad_() for t in (x64, w64, b64) if t is not None]
    y64 = reference(x64, groups, w64, b64, 1e-5, activation)
    g64 = torch.randn_like(y64)
    grads64 = torch.autograd.grad(y64, leaves64, g64)

    x = x64.detach().to(dtype).contiguous(memory_format=fmt).requires_grad_()
    params = [None if t is None else t.detach().to(dtype).requires_grad_() for t in (w64, b64)]
    leaves = [x] + [p for p in params if p is not None]
    with resfast.backend(backend):
        y = resfast.ops.group_norm(x, groups, *params, eps=1e-5, activation=activation)
        grads = torch.autograd.grad(y, leaves, g64.to(dtype))
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt), (y.dtype, y.stride())
    assert_close(y, y64, dtype, "y", tol)
    for name, got, want in zip(("grad x", "grad weight", "grad bias"), grads, grads64):
        assert_close(got, want, dtype, name, tol)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("activation", ["identity", "relu", "silu", "relu6"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64(backend, activation, fmt, shape, poison_empty):
    check_against_float64(backend, shape, activation, fmt)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("activation,fmt,shape", [
    ("silu", CL, SHAPES[0]), ("relu", torch.contiguous_format, SHAPES[0]), ("identity", CL, SHAPES[2]),
    ("silu", torch.contiguous_format, SHAPES[1])], ids=["silu-cl", "relu-nchw", "id-cl-g=c", "silu-nchw-g1"])
def test_triton_matches_float64(activation, fmt, shape):
    with torch.device(triton_device()):
        check_against_float64("triton", shape, activation, fmt)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "cl"])
def test_other_dtypes_cpu(dtype, fmt):
    check_against_float64("auto", SHAPES[0], "silu", fmt, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_affine(backend):
    check_against_float64(backend, SHAPES[0], "silu", CL, affine=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "cl"])
def test_large_mean_keeps_the_variance(backend, fmt):
    """mean 1e4, std 1: E[x^2] - E[x]^2 in float32 would lose every digit."""
    x = (1e4 + torch.randn(2, 8, 9, 7)).contiguous(memory_format=fmt)
    with resfast.backend(backend):
        mean, var = torch.ops.resfast.group_stats(x, 2)
        y = resfast.ops.group_norm(x, 2, activation="silu")
    var64, mean64 = torch.var_mean(x.double().reshape(2, 2, -1), dim=2, unbiased=False)
    assert_close(var, var64, torch.float32, "var", tol=1e-4)
    assert_close(mean, mean64, torch.float32, "mean", tol=1e-6)
    # x - mean is exact; the rest is mean's float32 rounding (~5e-4 / std).
    assert_close(y, F.silu(F.group_norm(x.double(), 2)), torch.float32, "y", tol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", ["identity", "silu"])
def test_cpu_nchw_ways_agree_bitwise(activation, dtype):
    """The CPU kernels take NCHW input one (sample, group) at a time when
    there are at least as many groups as threads, else in two passes over the
    whole tensor: outputs, statistics and gradients must be bitwise equal."""
    x = torch.randn(1, 6, 9, 7, dtype=dtype) * 2 + 0.5
    w, b, g = (torch.rand(6, dtype=dtype) + 0.5, torch.randn(6, dtype=dtype), torch.randn(1, 6, 9, 7, dtype=dtype))
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 4):  # 3 groups: one at a time with 1 thread, two passes with 4
            torch.set_num_threads(n)
            leaves = [t.clone().requires_grad_() for t in (x, w, b)]
            y, mean, rstd = torch.ops.resfast.group_norm(leaves[0], 3, leaves[1], leaves[2], 1e-5, activation)
            results.append([y.detach(), mean, rstd, *torch.autograd.grad(y, leaves, g)])
    finally:
        torch.set_num_threads(threads)
    for name, one, two in zip(("y", "mean", "rstd", "grad x", "grad weight", "grad bias"), *results):
        assert torch.equal(one, two), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "cl"])
def test_group_stats_gradient(backend, fmt):
    x64 = torch.randn(2, 6, 5, 3, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    var64, mean64 = torch.var_mean(x64.reshape(2, 3, -1), dim=2, unbiased=False)
    gm, gv = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    (want,) = torch.autograd.grad((mean64 * gm).sum() + (var64 * gv).sum(), x64)
    x = x64.detach().float().contiguous(memory_format=fmt).requires_grad_()
    with resfast.backend(backend):
        mean, var = torch.ops.resfast.group_stats(x, 3)
        (got,) = torch.autograd.grad((mean * gm.float()).sum() + (var * gv.float()).sum(), x)
    assert_close(mean, mean64, torch.float32, "mean")
    assert_close(var, var64, torch.float32, "var")
    assert_close(got, want, torch.float32, "grad x")


def test_gradcheck_float64():
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: resfast.ops.group_norm(*t[:1], 2, *t[1:], activation="silu"),
                                    (x, w, b))
    assert torch.autograd.gradcheck(lambda t: torch.ops.resfast.group_stats(t, 2), (x,))

    # GroupNorm → SiLU → conv: x's gradient through the group statistics is
    # folded into the fused op's (batch_invstd), weight's and bias's come
    # through group_norm_affine's scale and shift.
    conv_w = torch.randn(3, 4, 3, 3, dtype=torch.float64, requires_grad=True)

    def unit(x, conv_w, *affine):
        weight, bias = (affine + (None, None))[:2]
        norm = resfast.ops.group_norm_affine(x, 2, weight, bias, 1e-5)
        return resfast.ops.affine_act_conv2d(x, norm, conv_w, padding=1, activation="silu")

    for affine in ((w, b), (), (w,)):
        assert torch.autograd.gradcheck(unit, (x, conv_w, *affine))


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_norm_affine_spreads_the_statistics(backend):
    x = torch.randn(2, 6, 5, 3) * 2 + 1
    w, b = torch.rand(6) + 0.5, torch.randn(6)
    with resfast.backend(backend):
        mean, scale, shift, rstd = torch.ops.resfast.group_norm_affine(x, 3, w, b, 1e-3)
        plain = torch.ops.resfast.group_norm_affine(x, 3, None, None, 1e-3)
    var64, mean64 = torch.var_mean(x.double().reshape(2, 3, -1), dim=2, unbiased=False)
    assert_close(rstd, (var64 + 1e-3).rsqrt(), torch.float32, "rstd")
    rstd64 = (var64 + 1e-3).rsqrt().repeat_interleave(2, 1)
    assert_close(mean, mean64.repeat_interleave(2, 1), torch.float32, "mean")
    assert_close(scale, rstd64 * w.double(), torch.float32, "scale")
    assert torch.equal(shift, b.expand(2, 6))
    assert_close(plain[1], rstd64, torch.float32, "scale without weight")
    assert torch.equal(plain[2], torch.zeros(2, 6))


def test_compile_fullgraph():
    m = resfast.nn.GroupNormAct(2, 6)
    x = torch.randn(2, 6, 5, 4, requires_grad=True)
    y = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    y.sum().backward()
    want = F.silu(F.group_norm(x.detach().double(), 2, m.weight.double(), m.bias.double()))
    assert_close(y, want, torch.float32, "y")
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- modules
def test_group_norm_is_a_drop_in():
    ours, theirs = resfast.nn.GroupNorm(4, 12, eps=1e-3), nn.GroupNorm(4, 12, eps=1e-3)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict()) and repr(ours).endswith(repr(theirs)[11:])
    # Every rank nn.GroupNorm takes: (N, C), (N, C, L), (N, C, H, W), (N, C, D, H, W).
    for shape in [(3, 12), (3, 12, 7), (2, 12, 5, 3), (2, 12, 3, 2, 4)]:
        x = torch.randn(shape, requires_grad=True)
        y = ours(x)
        y.backward(torch.ones_like(y))
        gx = x.grad.clone()
        x.grad = None
        y_ref = theirs(x)
        y_ref.backward(torch.ones_like(y_ref))
        assert y.shape == y_ref.shape
        assert_close(y, y_ref, torch.float32, f"y {shape}")
        assert_close(gx, x.grad, torch.float32, f"grad x {shape}", floor=1.0)


def test_group_norm_act_state_dict_and_activation():
    m = resfast.nn.GroupNormAct(2, 6, activation="relu", affine=False)
    assert list(m.state_dict()) == [] and "relu" in repr(m)
    x = torch.randn(2, 6, 3, 3)
    assert_close(m(x), F.relu(F.group_norm(x.double(), 2)), torch.float32, "y")
    with pytest.raises(ValueError, match="activation"):
        resfast.nn.GroupNormAct(2, 6, activation="gelu")


def test_autocast_cpu_matches_torch():
    x = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)
    ours, theirs = resfast.nn.GroupNorm(4, 8), nn.GroupNorm(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = ours(x), theirs(x)
        y32, y32_ref = ours(x.float()), theirs(x.float())
    assert y.dtype == y_ref.dtype and y32.dtype == y32_ref.dtype
    assert_close(y, y_ref, torch.bfloat16, "y")


def make_unit(cin, cout, k, groups, activation, padding, stride=1, bias=True):
    unit = resfast.nn.GNActConv2d(cin, cout, k, stride, padding, num_groups=groups, bias=bias,
                                  activation=activation)
    with torch.no_grad():
        unit.norm.weight.uniform_(0.5, 1.5)
        unit.norm.bias.uniform_(-0.5, 0.5)
    eager = nn.Sequential(nn.GroupNorm(groups, cin), nn.SiLU() if activation == "silu" else nn.ReLU(),
                          nn.Conv2d(cin, cout, k, stride, padding, bias=bias))
    eager[0].load_state_dict(unit.norm.state_dict())
    eager[2].load_state_dict(unit.conv.state_dict())
    return unit, eager


UNIT_CONFIGS = [(6, 5, 3, 3, "silu", 1, 1), (4, 6, 1, 1, "relu", 0, 2), (8, 4, 3, 8, "silu", 1, 2)]
# The Triton convolutions (per-sample parameters: one launch per sample) are
# slow under the interpreter: one config there.
UNIT_CASES = [pytest.param(b, cfg, id=f"{b}-{i}") for b in BACKENDS for i, cfg in enumerate(UNIT_CONFIGS)
              if b != "triton" or i == 0]


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("backend,cfg", UNIT_CASES)
def test_gn_act_conv_matches_float64(backend, fmt, cfg, poison_empty):
    cin, cout, k, groups, act, padding, stride = cfg
    unit, eager = make_unit(cin, cout, k, groups, act, padding, stride)
    ref = copy.deepcopy(eager).double()
    x64 = (torch.randn(2, cin, 7, 5, dtype=torch.float64) * 1.3 + 0.4).contiguous(memory_format=fmt)
    x64.requires_grad_()
    y64 = ref(x64)
    g = torch.randn_like(y64)
    y64.backward(g)
    x = x64.detach().float().contiguous(memory_format=fmt).requires_grad_()
    with resfast.backend(backend):
        y = unit(x)
        y.backward(g.float())
    assert y.is_contiguous(memory_format=fmt)
    assert_close(y, y64, torch.float32, "y")
    assert_close(x.grad, x64.grad, torch.float32, "grad x")
    ref_params = dict(zip(("norm.weight", "norm.bias", "conv.weight", "conv.bias"), ref.parameters()))
    for name, p in unit.named_parameters():
        assert_close(p.grad, ref_params[name].grad, torch.float32, f"grad {name}")


def test_gn_act_conv_from_modules_shares_parameters():
    norm, conv = nn.GroupNorm(2, 4), nn.Conv2d(4, 3, 3, padding=1)
    unit = resfast.nn.GNActConv2d.from_modules(norm, conv)
    assert unit.norm is norm and unit.conv is conv
    assert list(unit.state_dict()) == ["norm.weight", "norm.bias", "conv.weight", "conv.bias"]
    with pytest.raises(ValueError, match="num_channels"):
        resfast.nn.GNActConv2d.from_modules(nn.GroupNorm(2, 6), conv)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "cl"])
def test_saved_activation_memory(fmt):
    unit, eager = make_unit(64, 64, 3, 32, "silu", 1)
    x = torch.randn(2, 64, 24, 24).contiguous(memory_format=fmt).requires_grad_()
    ours, theirs = saved_activation_bytes(unit, x), saved_activation_bytes(eager, x)
    assert ours <= 0.55 * theirs, f"GNActConv2d saved {ours} bytes vs eager {theirs}"
    gn_act, gn_act_eager = resfast.nn.GroupNormAct(32, 64), nn.Sequential(nn.GroupNorm(32, 64), nn.SiLU())
    ours, theirs = saved_activation_bytes(gn_act, x), saved_activation_bytes(gn_act_eager, x)
    assert ours <= 0.55 * theirs, f"GroupNormAct saved {ours} bytes vs eager {theirs}"


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend):
    x = torch.randn(2, 6, 3, 3)
    cases = [
        (ValueError, "num_groups", lambda: resfast.ops.group_norm(x, 4)),
        (ValueError, "num_groups", lambda: resfast.ops.group_norm(x, 0)),
        (ValueError, "x: expected an \\(N, C, \\*\\)", lambda: resfast.ops.group_norm(torch.randn(6), 3)),
        (ValueError, "weight: expected shape \\(6,\\)", lambda: resfast.ops.group_norm(x, 3, torch.ones(5))),
        (ValueError, "bias: expected shape \\(6,\\)", lambda: resfast.ops.group_norm(x, 3, None, torch.ones(6, 1))),
        (TypeError, "x: expected one of", lambda: resfast.ops.group_norm(x.int(), 3)),
        (TypeError, "weight: expected dtype", lambda: resfast.ops.group_norm(x.half(), 3, torch.ones(6).double())),
        (ValueError, "eps", lambda: resfast.ops.group_norm(x, 3, eps=-1.0)),
        (ValueError, "activation", lambda: resfast.ops.group_norm(x, 3, activation="tanh")),
        (ValueError, "num_groups", lambda: resfast.ops.group_norm_affine(x, 4, None, None, 1e-5)),
    ]
    with resfast.backend(backend):
        for exc, match, call in cases:
            with pytest.raises(exc, match=match):
                call()


def test_bad_inputs_reach_the_op_with_clear_errors():
    """The C++ kernels check too, for callers of torch.ops.resfast directly."""
    x = torch.randn(2, 6, 3, 3)
    with pytest.raises(ValueError, match="num_groups"):
        torch.ops.resfast.group_norm(x, 4, None, None, 1e-5, "silu")
    with pytest.raises(ValueError, match="expected a 4-D"):
        torch.ops.resfast.group_stats(torch.randn(2, 6, 3), 3)
    with pytest.raises(ValueError, match="weight: expected shape"):
        torch.ops.resfast.group_norm(x, 3, torch.ones(4), None, 1e-5, "silu")
    with pytest.raises(ValueError, match="bias: expected shape"):
        torch.ops.resfast.group_norm_affine(x, 3, None, torch.ones(1), 1e-5)
    with pytest.raises(ValueError, match="eps: expected a finite number"):
        torch.ops.resfast.group_norm_affine(x, 3, None, None, float("nan"))
    with pytest.raises(TypeError, match="x: expected float32"):
        torch.ops.resfast.group_norm(x.int(), 3, None, None, 1e-5, "silu")
    mean, _ = torch.ops.resfast.group_stats(x, 3)
    with pytest.raises(ValueError, match="grad_var: expected shape"):
        torch.ops.resfast.group_stats_backward(x, mean, mean, torch.ones(2, 2))
