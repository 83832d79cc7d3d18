"""Malformed input gives a clear Python exception naming the argument, never a
crash or a silent wrong answer."""

import math

import pytest
import torch

import resfast
from conftest import triton_available

F = resfast.ops


def unit_args(c=4, oc=6):
    return dict(running_mean=torch.zeros(c), running_var=torch.ones(c), bn_weight=torch.ones(c),
                bn_bias=torch.zeros(c), training=True, momentum=0.1, eps=1e-5, weight=torch.randn(oc, c, 3, 3))


def call(x, **overrides):
    args = {**unit_args(), **overrides}
    return F.batch_norm_act_conv2d(x, args.pop("running_mean"), args.pop("running_var"), args.pop("bn_weight"),
                                   args.pop("bn_bias"), args.pop("training"), args.pop("momentum"),
                                   args.pop("eps"), args.pop("weight"), **args)


@pytest.mark.parametrize("x, overrides, error, match", [
    (torch.randn(4, 5, 5), {}, ValueError, "x: expected a 4-D"),
    (torch.randint(0, 3, (2, 4, 5, 5)), {}, TypeError, "x: expected one of"),
    (torch.randn(2, 5, 5, 5), {}, ValueError, "weight: expected in_channels/groups = 5"),
    (torch.randn(2, 4, 5, 5), {"weight": torch.randn(6, 4, 3)}, ValueError, "weight: expected a 4-D"),
    (torch.randn(2, 4, 5, 5), {"groups": 3}, ValueError, "groups: expected to divide"),
    (torch.randn(2, 4, 5, 5), {"running_mean": torch.zeros(3)}, ValueError, "running_mean: expected shape"),
    (torch.randn(2, 4, 5, 5), {"bn_weight": torch.ones(5)}, ValueError, "bn_weight: expected shape"),
    (torch.randn(2, 4, 5, 5), {"momentum": math.nan}, ValueError, "momentum: expected a finite number"),
    (torch.randn(2, 4, 5, 5), {"eps": -1.0}, ValueError, "eps: expected a finite number >= 0"),
    (torch.randn(2, 4, 5, 5), {"eps": math.inf}, ValueError, "eps: expected a finite number"),
    (torch.randn(2, 4, 5, 5), {"activation": "gelu"}, ValueError, "activation: expected"),
    (torch.randn(2, 4, 5, 5), {"stride": 0}, ValueError, "stride: expected two positive"),
    (torch.randn(2, 4, 5, 5), {"padding": -1}, ValueError, "padding: expected two non-negative"),
    (torch.randn(2, 4, 2, 2), {}, ValueError, "smaller than the dilated kernel"),
    (torch.randn(1, 4, 1, 1), {"weight": torch.randn(6, 4, 1, 1)}, ValueError,
     "Expected more than 1 value per channel when training"),
    (torch.randn(2, 4, 5, 5), {"running_mean": torch.zeros(4, device="meta")}, ValueError,
     "running_mean: expected a tensor on cpu"),
    (torch.randn(2, 4, 5, 5), {"training": False, "running_mean": None}, ValueError,
     "running_mean, running_var: expected tensors when training=False"),
    (torch.randn(2, 4, 5, 5), {"padding": "same", "weight": torch.randn(6, 4, 2, 2)}, ValueError,
     "padding: 'same' needs symmetric padding"),
])
def test_functional_rejects(x, overrides, error, match):
    with pytest.raises(error, match=match):
        call(x, **overrides)


def test_module_rejects_wrong_channels_and_rank():
    unit = resfast.nn.BNReLUConv2d(4, 6, 3, padding=1)
    with pytest.raises(ValueError, match=r"x: expected 4 channels for BNReLUConv2d, got shape \(2, 3, 5, 5\)"):
        unit(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="x: expected a 4-D"):
        unit(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match=r"x: expected a 4-D \(N, C, H, W\) tensor for BNReLUConv2d, got 5-D"):
        unit(torch.randn(2, 4, 5, 5, 5))


def test_from_modules_rejects_mismatch():
    with pytest.raises(ValueError, match="bn: expected num_features"):
        resfast.nn.BNReLUConv2d.from_modules(torch.nn.BatchNorm2d(3), torch.nn.Conv2d(4, 4, 3))
    with pytest.raises(TypeError, match="bn: expected an nn.BatchNorm2d"):
        resfast.nn.BNReLUConv2d.from_modules(torch.nn.GroupNorm(2, 4), torch.nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match="conv: expected padding_mode='zeros'"):
        resfast.nn.BNReLUConv2d.from_modules(torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 4, 3, padding_mode="reflect"))


def test_registered_ops_reject_bad_arguments():
    """The C++ kernels check their arguments too, for direct torch.ops callers."""
    x = torch.randn(2, 4, 5, 5)
    v = torch.randn(4)
    w = torch.randn(6, 4, 3, 3)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    op = torch.ops.resfast.norm_act_conv2d
    with pytest.raises(ValueError, match="scale: expected shape"):
        op(x, v, torch.randn(3), v, w, None, None, *conv, "relu")
    with pytest.raises(TypeError, match="mean: expected dtype"):
        op(x, v.double(), v, v, w, None, None, *conv, "relu")
    with pytest.raises(ValueError, match="activation: expected"):
        op(x, v, v, v, w, None, None, *conv, "tanh")
    with pytest.raises(TypeError, match="weight: expected dtype"):
        op(x.half(), v, v, v, w, None, None, *conv, "relu")
    with pytest.raises(ValueError, match="residual: expected shape"):
        op(x, v, v, v, w, None, torch.randn(2, 6, 4, 4), *conv, "relu")
    with pytest.raises(ValueError, match="x: expected at least one value per channel"):
        torch.ops.resfast.channel_stats(torch.randn(0, 4, 5, 5))
    with pytest.raises(ValueError, match="batch_invstd: expected shape"):
        op(x, v, v, v, w, None, None, *conv, "relu", torch.ones(3))


def test_unit_ops_check_before_touching_running_statistics():
    """batch_norm_act_conv2d (what the modules call) rejects a bad activation
    or a residual on another device before BatchNorm updates its buffers."""
    x, w = torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3)
    running_mean, running_var = torch.zeros(4), torch.ones(4)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    op = torch.ops.resfast.batch_norm_act_conv2d
    with pytest.raises(ValueError, match="activation: expected"):
        op(x, running_mean, running_var, None, None, True, 0.1, 1e-5, w, None, None, *conv, "gelu")
    with pytest.raises(ValueError, match="residual: expected a tensor on cpu like x, got one on meta"):
        op(x, running_mean, running_var, None, None, True, 0.1, 1e-5, w, None, torch.randn(2, 6, 5, 5, device="meta"),
           *conv, "relu")
    assert torch.equal(running_mean, torch.zeros(4)) and torch.equal(running_var, torch.ones(4))


def test_forward_mode_ad_is_refused():
    """The autograd kernels' shortcut (no input requiring grad) must not drop
    a dual tensor's tangent: forward-mode AD is not supported, and says so."""
    import torch.autograd.forward_ad as fwAD

    x, v = torch.randn(2, 4, 5, 5), torch.rand(4) + 0.5
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.randn_like(x))
        with pytest.raises(RuntimeError, match="jvp is not implemented"):
            torch.ops.resfast.norm_act_conv2d(dual, v, v, v, torch.randn(6, 4, 3, 3), None, None, [1, 1], [1, 1],
                                              [1, 1], 1, "relu", None)

def test_backend_switch_rejects():
    with pytest.raises(ValueError, match="backend: expected one of"):
        with resfast.backend("mps"):
            pass
    for removed in ("cpu", "cuda"):  # they switched nothing: the registered kernels are "auto"
        with pytest.raises(ValueError, match="backend: expected one of 'auto', 'triton', 'reference'"):
            with resfast.backend(removed):
                pass


@pytest.mark.skipif(not triton_available(), reason="needs CUDA or TRITON_INTERPRET=1")
def test_triton_backend_rejects_float64():
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with pytest.raises(TypeError, match="x: expected one of float32, float16, bfloat16"):
        with resfast.backend("triton"):
            F.channel_stats(x)


# ---------------------------------------------------------------- battery through every public API
def _bn_relu_conv_eager(x, rm, rv, w, b, training, momentum, eps, weight, stride=1, padding=0, dilation=1, groups=1):
    a = torch.relu(torch.nn.functional.batch_norm(x, rm, rv, w, b, training, momentum, eps))
    return torch.nn.functional.conv2d(a, weight, None, stride, padding, dilation, groups)


def test_more_functional_rejects():
    x, v, w = torch.randn(2, 4, 5, 5), torch.randn(4), torch.randn(6, 4, 3, 3)
    cases = [
        (lambda: F.norm_act_conv2d(x, v, v, v, w.to("meta"), padding=1), ValueError,
         "weight: expected a tensor on cpu like x, got one on meta"),
        (lambda: F.norm_act_conv2d(x.to("meta"), v, v, v, w, padding=1), ValueError, "expected a tensor on meta"),
        (lambda: F.norm_act_conv2d(x, v, v, v, w, residual=torch.randn(2, 6, 5, 5, device="meta"), padding=1),
         ValueError, "residual: expected a tensor on cpu"),
        (lambda: F.norm_act_conv2d(x, v, v, v, w, residual=torch.randn(2, 6, 4, 5), padding=1), ValueError,
         "residual: expected shape"),
        (lambda: F.norm_act_conv2d(x, v, v, v, w, bias=torch.randn(5), padding=1), ValueError,
         "bias: expected shape"),
        (lambda: F.norm_act_conv2d(x, torch.randn(3, 4), v, v, w, padding=1), ValueError, "mean: expected shape"),
        (lambda: F.norm_act_conv2d(x, v, v.int(), v, w, padding=1), TypeError, "scale: expected dtype"),
        (lambda: F.norm_act_conv2d(x, v, v, v, w.double(), padding=1), TypeError, "weight: expected dtype"),
        (lambda: F.channel_stats(torch.ones(2, 4, 3, 3, dtype=torch.int32)), TypeError, "x: expected one of"),
        (lambda: F.channel_stats([1.0]), TypeError, "x: expected a torch.Tensor"),
        (lambda: F.group_norm_affine(x, 3, None, None, 1e-5), ValueError, "num_groups: expected a positive divisor"),
        (lambda: F.group_norm_affine(x, 2, None, None, math.nan), ValueError, "eps: expected a finite number"),
        (lambda: F.group_norm_affine(x, 2, torch.ones(3), None, 1e-5), ValueError, "weight: expected shape"),
        (lambda: F.sync_batch_norm_affine(x, torch.zeros(4), torch.ones(4), None, None, math.nan, 1e-5),
         ValueError, "momentum: expected a finite number"),
        (lambda: F.sync_batch_norm_affine(x, torch.zeros(3), torch.ones(4), None, None, 0.1, 1e-5), ValueError,
         "running_mean: expected shape"),
        (lambda: F.batch_norm_affine(x, None, None, None, None, True, 0.1, "a"), ValueError,
         "eps: expected a finite number"),
        (lambda: F.drop_path(x, 1.5, True), ValueError, r"p: expected a drop probability in \[0, 1\)"),
    ]
    for fn, error, match in cases:
        with pytest.raises(error, match=match):
            fn()


def test_modules_reject():
    unit = resfast.nn.BNReLUConv2d(4, 6, 3, padding=1)
    block = resfast.nn.PreActBottleneck(4, 8)
    cases = [
        (lambda: unit(torch.randn(1, 4, 1, 1)), ValueError, "Expected more than 1 value per channel"),
        (lambda: unit(torch.randn(2, 4, 5, 5, device="meta")), ValueError, "expected a tensor on meta like x"),
        (lambda: unit(torch.randn(2, 4, 5, 5, dtype=torch.complex64)), TypeError, "x: expected one of"),
        (lambda: unit([1, 2]), TypeError, "x: expected a torch.Tensor"),
        (lambda: resfast.nn.BNReLUConv2d(4, 6, 3, momentum=math.inf)(torch.randn(2, 4, 5, 5)), ValueError,
         "momentum: expected a finite number"),
        (lambda: resfast.nn.BNReLUConv2d(4, 6, 3, eps=math.nan)(torch.randn(2, 4, 5, 5)), ValueError,
         "eps: expected a finite number"),
        (lambda: resfast.nn.BNReLUConv2d(4, 6, 3, groups=3), ValueError, "in_channels must be divisible by groups"),
        (lambda: block(torch.randn(2, 3, 5, 5)), ValueError, r"running_mean: expected shape \(3,\)"),
        (lambda: block(torch.randn(3, 5, 5)), ValueError, "x: expected a 4-D"),
        (lambda: resfast.nn.PreActResBlock(8, 8, num_groups=4)(torch.randn(2, 6, 5, 5)), ValueError,
         r"input: expected parts of \(8,\) channels"),
        (lambda: resfast.nn.PreActResBlock(6, 8, num_groups=4), ValueError, "num_groups: expected a divisor of 6"),
        (lambda: resfast.models.UNet(3, 2, widths=(4, 8), norm="batch")(torch.randn(1, 3, 2, 2)), ValueError,
         "Expected more than 1 value per channel"),
    ]
    for fn, error, match in cases:
        with pytest.raises(error, match=match):
            fn()


def test_wrong_weight_shape_in_module_state():
    unit = resfast.nn.BNReLUConv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        unit.conv.weight = torch.nn.Parameter(torch.randn(6, 4, 3))
    with pytest.raises(ValueError, match="weight: expected a 4-D"):
        unit(torch.randn(2, 4, 5, 5))
    unit = resfast.nn.BNReLUConv2d(4, 6, 3, padding=1)
    unit.bn.weight = torch.nn.Parameter(torch.ones(5))
    with pytest.raises(ValueError, match="bn_weight: expected shape"):
        unit(torch.randn(2, 4, 5, 5))


def _layouts():
    """Odd strides: overlapping (stride-0 and as_strided), sliced, channels_last slices."""
    base = torch.randn(3, 6, 9, 10, dtype=torch.float64)
    return {
        "expanded": torch.randn(1, 4, 1, 7, dtype=torch.float64).expand(3, 4, 6, 7),
        "overlapping": torch.randn(200, dtype=torch.float64).as_strided((2, 4, 6, 7), (3, 5, 7, 1)),
        "channel-slice": base[:, 1:5, :6, :7],
        "spatial-step": base[:, ::2, ::2, ::2][:, :4, :, :4].contiguous(memory_format=torch.channels_last)[..., 1:],
        "cl-slice": base.contiguous(memory_format=torch.channels_last)[1:, :4, 2:8, 3:],
    }


@pytest.mark.parametrize("layout", list(_layouts()))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_odd_strides_are_correct(layout, training):
    """Overlapping or non-contiguous inputs give eager torch's answer and are never written to."""
    x = _layouts()[layout]
    before = x.clone()
    c = x.shape[1]
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    w, b = torch.rand(c, dtype=torch.float64) + 0.5, torch.randn(c, dtype=torch.float64)
    weight = torch.randn(5, c, 3, 3, dtype=torch.float64)
    xa, xb = x.detach().requires_grad_(), x.detach().requires_grad_()
    rma, rva, rmb, rvb = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    y = F.batch_norm_act_conv2d(xa, rma, rva, w, b, training, 0.1, 1e-5, weight, padding=1)
    y_ref = _bn_relu_conv_eager(xb, rmb, rvb, w, b, training, 0.1, 1e-5, weight, padding=1)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(rma, rmb)
    torch.testing.assert_close(rva, rvb)
    assert torch.equal(x, before)


def test_more_than_int32_rows_refused_by_triton_wrappers():
    """The Triton kernels index rows (N*H*W) in int32 and memory in int64: larger inputs are refused clearly
    by every Triton implementation (meta tensors: nothing is allocated)."""
    from resfast.ops.checks import triton_input

    big = torch.empty(2**12, 4, 2**10, 2**9 + 1, device="meta")
    with pytest.raises(ValueError, match="exceeds the kernels' int32 row index"):
        triton_input(big)
