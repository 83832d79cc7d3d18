"""The cudnn convolution engine (resfast/ops/conv_engines/cudnn_fused.py) on
the CPU: its graphs built with the real nvidia-cudnn-frontend API where the
package is installed (planning and running them needs a GPU), and run end
to end in the torch stand-in (tests/cudnn_stand_in.py); what it refuses and
why; its plans per geometry; its place in the per-shape choice. Every op
sample it takes is checked against the float64 reference in test_ops.py."""

import types

import pytest
import torch

import cudnn_stand_in
import resfast
from conftest import triton_available
from resfast.ops.conv_engines import calls, cudnn_fused, cudnn_graphs, selection
from utils import assert_close, max_rel_error

pytestmark = [pytest.mark.skipif(not triton_available(), reason="needs CUDA or TRITON_INTERPRET=1"),
              pytest.mark.usefixtures("fresh_conv_choices")]
ops = torch.ops.resfast
CL = torch.channels_last


def unit(n=2, c=8, oc=12, hw=6, k=3, dtype=torch.float32, fmt=CL, residual=False, bias=False, stride=1):
    x = torch.randn(n, c, hw, hw).to(dtype).contiguous(memory_format=fmt)
    mean, scale, shift = torch.randn(c) * 0.3, torch.rand(c) + 0.5, torch.randn(c) * 0.3
    w = (torch.randn(oc, c, k, k) / (c * k * k) ** 0.5).to(dtype).contiguous(memory_format=fmt)
    out_hw = (hw + 2 * (k // 2) - k) // stride + 1
    r = torch.randn(n, oc, out_hw, out_hw).to(dtype).contiguous(memory_format=fmt) if residual else None
    b = torch.randn(oc).to(dtype) if bias else None
    return (x, mean, scale, shift, w, b, r, [stride] * 2, [k // 2] * 2, [1, 1], 1, "relu")


def run(args, op="norm_act_conv2d", backend=None, engine="cudnn", extra=()):
    stand_in = backend or cudnn_stand_in.Backend()
    with cudnn_fused.graph_backend(stand_in), resfast.backend("triton"), resfast.ops.conv_impl(engine):
        return getattr(ops, op)(*args, *extra)


def reference(args, op="norm_act_conv2d", extra=()):
    double = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    with resfast.backend("reference"):
        return getattr(ops, op)(*double, *[a.double() if isinstance(a, torch.Tensor) else a for a in extra])


def backward_args(args, grad, batch_invstd=None, mask=(True, True)):
    return (grad, *args[:5], *args[7:], batch_invstd, list(mask))


# ---------------------------------------------------------------- refusals
def test_without_a_graph_backend_only_cuda_tensors_are_taken(monkeypatch):
    call = calls.Forward(*unit())
    assert cudnn_fused.unsupported(call) == "CUDA tensors only"
    monkeypatch.setitem(__import__("sys").modules, "cudnn", None)
    monkeypatch.setattr(cudnn_fused, "_frontend", None)
    reason = cudnn_fused._graphs_for(types.SimpleNamespace(device=torch.device("cuda")))
    assert reason.startswith("nvidia-cudnn-frontend cannot be imported")


def test_what_the_graphs_cannot_express_is_refused_naming_it():
    args = unit()
    x, mean, scale, shift, w = args[:5]
    grouped = calls.Forward(x, mean, scale, shift, w[:, :4].contiguous(memory_format=CL), *args[5:10], 2, "relu")
    per_sample = calls.Forward(x, mean.expand(2, -1), scale.expand(2, -1), shift.expand(2, -1), *args[4:])
    grad = torch.randn(2, 12, 6, 6)
    input_only = calls.Backward(*backward_args(args, grad, mask=(True, False)))
    out = torch.randn(2, 13, 6, 6).contiguous(memory_format=CL)
    misaligned = calls.Forward(*args, out=out, out_offset=1)
    with cudnn_fused.graph_backend(cudnn_stand_in.Backend()):
        assert cudnn_fused.unsupported(grouped) == "grouped convolution"
        assert cudnn_fused.unsupported(per_sample).startswith("per-sample (GroupNorm) parameters")
        assert cudnn_fused.unsupported(input_only).startswith("no weight gradient asked")
        assert cudnn_fused.unsupported(misaligned).startswith("a tensor not 16-byte aligned")
        assert cudnn_fused.unsupported(calls.Forward(*args)) is None


def test_a_graph_cudnn_cannot_plan_is_refused_with_its_reason_and_not_measured():
    refusing = cudnn_stand_in.Backend(refuse="cuDNN has no plan for this graph (no engine)")
    seen = []
    with cudnn_fused.graph_backend(refusing), selection.timer(lambda fn: seen.append(fn) or 1.0):
        with resfast.backend("triton"):
            ops.norm_act_conv2d(*unit())
    (choice,) = resfast.ops.conv_choices().values()
    assert choice["candidates"]["cudnn"] == "cuDNN has no plan for this graph (no engine)"
    assert choice["choice"] in ("split", "triton") and refusing.executed == 0 and len(seen) == 2


# ---------------------------------------------------------------- results
@pytest.mark.parametrize("activation", ["relu", "identity", "silu", "relu6"])
@pytest.mark.parametrize("fmt", [CL, torch.contiguous_format], ids=["cl", "nchw"])
def test_forward_with_every_epilogue_matches_the_reference(activation, fmt):
    args = list(unit(fmt=fmt, residual=True, bias=True))
    args[11] = activation
    y, mean, var = run(args, "norm_act_conv2d_stats")
    y_ref, mean_ref, var_ref = reference(args, "norm_act_conv2d_stats")
    assert y.is_contiguous(memory_format=fmt)
    for name, a, e in (("y", y, y_ref), ("mean", mean, mean_ref), ("var", var, var_ref)):
        assert_close(a, e, torch.float32, name)


def test_the_slice_store_writes_its_channels_only():
    args = unit(oc=8)
    out = torch.randn(2, 20, 6, 6).contiguous(memory_format=CL)
    before = out.clone()
    stats = run(args, "norm_act_conv2d_into", extra=(out, 4, True))  # 4 float32 channels: 16 bytes in
    assert_close(out[:, 4:12], reference(args), torch.float32, "slice")
    assert torch.equal(out[:, :4], before[:, :4]) and torch.equal(out[:, 12:], before[:, 12:])
    mean, var = reference(args, "norm_act_conv2d_stats")[1:]
    assert_close(stats[0], mean, torch.float32, "mean")
    assert_close(stats[1], var, torch.float32, "var")


@pytest.mark.parametrize("batch_stats", [False, True], ids=["fixed-stats", "batch-stats"])
def test_bfloat16_errors_are_those_of_the_split_engine(batch_stats):
    """bf16 channels_last (the graphs' dtype): against float64, within twice
    the split engine's error, forward and every gradient."""
    args = unit(n=4, c=16, oc=16, hw=8, dtype=torch.bfloat16, residual=True, bias=True)
    grad = torch.randn(4, 16, 8, 8).to(torch.bfloat16).contiguous(memory_format=CL)
    invstd = torch.rand(16) + 0.5 if batch_stats else None
    bwd = backward_args(args, grad, invstd)
    expected = [reference(args, "norm_act_conv2d_stats"), reference(bwd, "norm_act_conv2d_backward")]
    ours = [run(args, "norm_act_conv2d_stats"), run(bwd, "norm_act_conv2d_backward")]
    split = [run(args, "norm_act_conv2d_stats", engine="split"), run(bwd, "norm_act_conv2d_backward", engine="split")]
    names = ["y", "y_mean", "y_var", "grad_x", "grad_scale", "grad_shift", "grad_weight"]
    for name, a, s, e in zip(names, [t for r in ours for t in r], [t for r in split for t in r],
                             [t for r in expected for t in r]):
        assert a.dtype == s.dtype, name
        assert max_rel_error(a, e) <= max(2 * max_rel_error(s, e), 1e-5), f"{name}: {max_rel_error(a, e):.2e} " \
            f"against the split engine's {max_rel_error(s, e):.2e}"


def test_backward_weight_gradient_alone_and_strided():
    args = unit(stride=2)
    grad = torch.randn(2, 12, 3, 3)  # NCHW while x is channels_last: the engine reads a copy
    bwd = backward_args(args, grad, mask=(False, True))
    got = run(bwd, "norm_act_conv2d_backward")
    expected = reference(bwd, "norm_act_conv2d_backward")
    assert got[:3] == (None, None, None)
    assert got[3].is_contiguous(memory_format=CL)
    assert_close(got[3], expected[3], torch.float32, "grad_weight")


# ---------------------------------------------------------------- plans
def test_one_plan_per_geometry_and_deterministic_mode_is_passed_on(monkeypatch):
    planned = []
    backend = cudnn_stand_in.Backend()
    monkeypatch.setattr(backend, "plan", lambda graph, device, deterministic: planned.append(deterministic))
    previous = torch.are_deterministic_algorithms_enabled()
    with cudnn_fused.graph_backend(backend), resfast.backend("triton"), resfast.ops.conv_impl("cudnn"):
        for _ in range(3):
            ops.norm_act_conv2d(*unit())
        ops.norm_act_conv2d(*unit(n=3))  # a new batch size: a new graph
        assert len(backend.graphs) == 2 and backend.executed == 4
        torch.use_deterministic_algorithms(True)
        try:
            ops.norm_act_conv2d(*unit())
        finally:
            torch.use_deterministic_algorithms(previous)
    assert planned == [False, False, True]


def test_the_selection_takes_it_when_fastest_and_drops_it_when_wrong():
    backend = cudnn_stand_in.Backend()

    def measure(fn):  # cudnn fastest: told apart by its graph executions
        executed = backend.executed
        fn()
        return 1e-3 if backend.executed > executed else 1.0

    with cudnn_fused.graph_backend(backend), selection.timer(measure), resfast.backend("triton"):
        ops.norm_act_conv2d(*unit())
    (choice,) = resfast.ops.conv_choices().values()
    assert choice["choice"] == "cudnn"

    class Wrong(cudnn_stand_in.Backend):
        def execute(self, graph, pack, device):
            super().execute(graph, pack, device)
            for t, buffer in pack.items():
                if t.evaluate is not None:
                    buffer.mul_(1.1)

    with cudnn_fused.graph_backend(Wrong()), selection.timer(lambda fn: (fn(), 1.0)[1]), resfast.backend("triton"):
        with pytest.warns(UserWarning, match="the cudnn convolution engine disagrees with the split engine"):
            ops.norm_act_conv2d(*unit(c=16, oc=16))
    choice = next(c for key, c in resfast.ops.conv_choices().items() if "-w16x16x3x3-" in key)
    assert choice["candidates"]["cudnn"].startswith("disagrees with split")


# ---------------------------------------------------------------- the real frontend's graphs
def _frontend():
    cudnn = pytest.importorskip("cudnn", reason="nvidia-cudnn-frontend is not installed")
    return cudnn, cudnn.pygraph(io_data_type=cudnn.data_type.BFLOAT16, intermediate_data_type=cudnn.data_type.FLOAT,
                                compute_data_type=cudnn.data_type.FLOAT)


def _io(graph):
    return {name: (t["dim"], t["stride"], t["dtype"]) for name, t in graph.inspect()["tensors"].items()
            if not t["is_virtual"]}


def test_the_forward_graph_is_nvidias_conv_bn_fprop_pattern_with_the_epilogue():
    _, g = _frontend()
    args = unit(dtype=torch.bfloat16, residual=True, bias=True)
    call = calls.Forward(*args, compute_stats=True)
    y = call.fresh_output()
    tensors = cudnn_graphs.forward(g, call, y)
    nodes = [(n["type"], n["params"].get("mode")) for n in g.inspect()["nodes"]]
    assert nodes == [("POINTWISE", "scale"), ("POINTWISE", "bias"), ("POINTWISE", "relu"), ("CONV_FPROP", None),
                     ("POINTWISE", "bias"), ("POINTWISE", "add"), ("GENSTATS", None)]
    io = _io(g)
    x, w = args[0], args[4]
    assert io["x"] == ([2, 8, 6, 6], list(x.stride()), "torch.bfloat16")
    assert io["weight"] == ([12, 8, 3, 3], list(w.stride()), "torch.bfloat16")
    assert io["scale"] == io["bias"] == ([1, 8, 1, 1], [8, 1, 8, 8], "torch.float32")
    assert io[tensors["y"].name] == ([2, 12, 6, 6], list(y.stride()), "torch.bfloat16")
    assert io[tensors["sum"].name][0] == io[tensors["sum_sq"].name][0] == [1, 12, 1, 1]
    assert set(tensors) == {"x", "scale", "bias", "weight", "conv_bias", "residual", "y", "sum", "sum_sq"}


def test_the_weight_gradient_graph_is_nvidias_conv_bn_wgrad_pattern():
    _, g = _frontend()
    args = unit(dtype=torch.bfloat16)
    grad = torch.randn(2, 12, 6, 6).to(torch.bfloat16).contiguous(memory_format=CL)
    call = calls.Backward(*backward_args(args, grad))
    grad_weight = torch.empty_like(args[4])
    tensors = cudnn_graphs.weight_grad(g, call, grad_weight)
    nodes = [(n["type"], n["params"].get("mode")) for n in g.inspect()["nodes"]]
    assert nodes == [("POINTWISE", "scale"), ("POINTWISE", "bias"), ("POINTWISE", "relu"), ("CONV_WGRAD", None)]
    assert _io(g)[tensors["grad_weight"].name] == ([12, 8, 3, 3], list(grad_weight.stride()), "torch.bfloat16")
