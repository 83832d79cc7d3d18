"""Property-based tests (hypothesis): over shapes, strides and layouts,
dtypes and module options, the CPU kernels agree with the reference backend
and the modules with eager torch.nn."""

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import resfast
from utils import assert_close

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _layout(x, kind):
    """x's values in the given memory layout (sliced ones are views into larger storage)."""
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "channel_slice":
        n, c, h, w = x.shape
        big = torch.empty(n, c + 2, h, w + 1, dtype=x.dtype)
        big[:, 1:c + 1, :, :w] = x
        return big[:, 1:c + 1, :, :w]
    if kind == "spatial_step":
        n, c, h, w = x.shape
        big = torch.empty(n, c, 2 * h, 2 * w, dtype=x.dtype).contiguous(memory_format=torch.channels_last)
        big[:, :, ::2, ::2] = x
        return big[:, :, ::2, ::2]
    return x.contiguous()


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    c = groups * draw(st.integers(1, 3))
    oc = groups * draw(st.integers(1, 3))
    k = draw(st.sampled_from([1, 3]))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 1))
    stride = draw(st.integers(1, 2))
    min_size = max(1, dilation * (k - 1) + 1 - 2 * padding)
    h, w = draw(st.integers(min_size, min_size + 6)), draw(st.integers(min_size, min_size + 6))
    n = draw(st.integers(1, 3))
    training = draw(st.booleans()) and n * h * w > 1
    return dict(shape=(n, c, h, w), oc=oc, k=k, stride=stride, padding=padding, dilation=dilation, groups=groups,
                training=training, activation=draw(st.sampled_from(["relu", "silu", "identity"])),
                bias=draw(st.booleans()), residual=draw(st.booleans()),
                layout=draw(st.sampled_from(["contiguous", "channels_last", "channel_slice", "spatial_step"])),
                dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])))


def _run(case, backend, x, params):
    x = x.detach().requires_grad_()
    # The running statistics are buffers: no gradient.
    ps = {k: (None if v is None else v.detach().requires_grad_(not k.startswith("running")))
          for k, v in params.items() if k != "grad"}
    rm, rv = ps["running_mean"].detach().clone(), ps["running_var"].detach().clone()
    with resfast.backend(backend):
        y = resfast.ops.batch_norm_act_conv2d(
            x, rm, rv, ps["bn_weight"], ps["bn_bias"], case["training"], 0.1, 1e-5, ps["weight"], ps["bias"],
            case["stride"], case["padding"], case["dilation"], case["groups"], case["activation"], ps["residual"])
        y.backward(params["grad"])
    grads = {k: v.grad for k, v in ps.items() if v is not None and v.requires_grad}
    return y, x.grad, grads, rm, rv


@SETTINGS
@given(conv_cases())
def test_fused_unit_cpu_matches_reference(case):
    dtype = case["dtype"]
    n, c, h, w = case["shape"]
    k = case["k"]
    x = _layout(torch.randn(case["shape"], dtype=dtype) * 1.5 + 0.3, case["layout"])
    out = torch.nn.functional.conv2d(torch.zeros(1, c, h, w), torch.zeros(case["oc"], c // case["groups"], k, k),
                                     None, case["stride"], case["padding"], case["dilation"], case["groups"])
    params = dict(
        running_mean=torch.randn(c), running_var=torch.rand(c) + 0.5, bn_weight=torch.rand(c) + 0.5,
        bn_bias=torch.randn(c) * 0.2, weight=torch.randn(case["oc"], c // case["groups"], k, k, dtype=dtype),
        bias=torch.randn(case["oc"], dtype=dtype) if case["bias"] else None,
        residual=torch.randn(n, case["oc"], *out.shape[2:], dtype=dtype) if case["residual"] else None,
        grad=torch.randn(n, case["oc"], *out.shape[2:], dtype=dtype))
    x_before = x.clone()
    y, gx, grads, rm, rv = _run(case, "auto", x, params)
    y_ref, gx_ref, grads_ref, rm_ref, rv_ref = _run(case, "reference", x, params)
    assert torch.equal(x, x_before)
    assert y.is_contiguous(memory_format=torch.channels_last) == y_ref.is_contiguous(
        memory_format=torch.channels_last)
    assert_close(y, y_ref, dtype, "output")
    # The input gradient of a training-mode BatchNorm cancels: measure it
    # against what the reduction summed.
    floor = (params["grad"].abs().max() * params["weight"].abs().sum() / c).item() if case["training"] else 0.0
    assert_close(gx, gx_ref, dtype, "grad x", floor=floor)
    for name, g in grads.items():
        assert_close(g, grads_ref[name], dtype, f"grad {name}", floor=grads_ref["weight"].abs().max().item())
    assert_close(rm, rm_ref, torch.float32, "running_mean")
    assert_close(rv, rv_ref, torch.float32, "running_var")


@SETTINGS
@given(affine=st.booleans(), track=st.booleans(), momentum=st.sampled_from([None, 0.1, 0.5]),
       training=st.booleans(), steps=st.integers(1, 3), channels_last=st.booleans(),
       activation=st.sampled_from(["relu", "silu", "identity"]))
def test_unit_module_options_match_eager(affine, track, momentum, training, steps, channels_last, activation):
    """BNReLUConv2d's BatchNorm options behave as nn.BatchNorm2d's, step after step."""
    unit = resfast.nn.BNReLUConv2d(3, 5, 3, padding=1, bias=True, momentum=momentum, affine=affine,
                                   track_running_stats=track, activation=activation).double().train(training)
    act = {"relu": torch.nn.ReLU(), "silu": torch.nn.SiLU(), "identity": torch.nn.Identity()}[activation]
    eager = torch.nn.Sequential(copy.deepcopy(unit.bn), act, copy.deepcopy(unit.conv))
    for _ in range(steps):
        x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y, y_ref = unit(x), eager(x)
        assert_close(y, y_ref, torch.float64, "output")
        assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    for (name, b), b_ref in zip(unit.bn.named_buffers(), eager[0].buffers()):
        assert torch.equal(b, b_ref) if not b.is_floating_point() else torch.allclose(b, b_ref, atol=1e-12), name
