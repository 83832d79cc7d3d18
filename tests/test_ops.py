"""Generated from the op registry (resfast/ops/registry.py): every op's sample
inputs (tests/op_samples.py) against its reference on every backend, and,
for each op, gradcheck in float64 and torch.library.opcheck."""

import contextlib

import pytest
import torch

import cudnn_stand_in
import resfast
from conftest import available_backends
from op_samples import SAMPLES
from resfast.ops import registry
from resfast.ops.conv_engines import cudnn_fused
from utils import assert_close

OPS = registry.OPS


def _backends(op):
    """(backend, device) pairs to compare with the reference; for the
    convolution ops, the triton backend once per engine ("triton/split")."""
    pairs = []
    for name, device in available_backends():
        if name == "triton" and op.engines:
            pairs += [(f"triton/{engine}", device) for engine in op.engines]
        elif name != "reference":
            pairs.append((name, device))
    return pairs


@contextlib.contextmanager
def _using(backend):
    name, _, engine = backend.partition("/")
    with resfast.backend(name), resfast.ops.conv_impl(engine or "auto"), _cudnn_graphs(engine):
        yield


def _cudnn_graphs(engine):
    """Without a GPU, the cudnn engine's graphs run in the torch stand-in."""
    if engine != "cudnn" or torch.cuda.is_available():
        return contextlib.nullcontext()
    return cudnn_fused.graph_backend(cudnn_stand_in.Backend())


def test_every_op_has_an_entry_and_samples():
    assert registry.compiled_schemas() == set(OPS)
    assert set(SAMPLES) == set(OPS), "tests/op_samples.py: a generator per op"
    for op in OPS.values():
        assert not op.missing(), f"{op.name}: {op.missing()}"


def _engine_takes(backend, sample, op):
    """Whether a forced convolution engine can run the sample: the triton
    engine's implicit GEMMs are 2-D and take 1x1x1 stride-1 3-D convolutions
    only (every 3-D 1x1x1 sample has stride 1; tests/test_volumes.py checks
    that the engine refuses the others); the cudnn engine's graphs take
    per-channel parameters, one group, and a backward with the weight
    gradient, with every pointer 16-byte aligned (tests/test_cudnn_engine.py
    checks that it refuses the others)."""
    tensors = [a for a in sample.args if isinstance(a, torch.Tensor)]
    if backend == "triton/cudnn":
        args = dict(zip((a.name for a in op.overload._schema.arguments), sample.args))
        if "out" in args:
            tensors.append(args["out"][:, args["out_offset"]:])
        return args["mean"].dim() == 1 and args["groups"] == 1 and args.get("output_mask", [True, True])[1] \
            and all(t.data_ptr() % cudnn_fused.ALIGNMENT == 0 for t in tensors)
    if backend != "triton/triton" or max(t.dim() for t in tensors) < 5:
        return True
    return any(t.dim() == 5 and tuple(t.shape[2:]) == (1, 1, 1) for t in tensors)


def _cases(select=lambda op, sample: True, backends=False):
    cases = []
    for name in sorted(OPS.keys() & SAMPLES.keys()):  # test_every_op_has_an_entry_and_samples: all of them
        for i, sample in enumerate(SAMPLES[name](torch.float32, "cpu")):
            if not select(OPS[name], sample):
                continue
            if backends:
                cases += [pytest.param(name, i, b, d, id=f"{name}-{sample.name}-{b}-{d}") for b, d in
                          _backends(OPS[name]) if _engine_takes(b, sample, OPS[name])]
            else:
                cases.append(pytest.param(name, i, id=f"{name}-{sample.name}"))
    return cases


def _double(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _clone(t):
    return t.clone(memory_format=torch.preserve_format) if isinstance(t, torch.Tensor) else t


def _run(op, args, backend):
    """The op's outputs as a list (its mutated `out` buffer appended, if it has one)."""
    args = [_clone(a) for a in args]
    with _using(backend):
        out = op.overload(*args)
    out = list(out) if isinstance(out, (tuple, list)) else [out]
    mutated = [i for i, a in enumerate(op.overload._schema.arguments) if a.alias_info and a.alias_info.is_write]
    return out + [args[i] for i in mutated]


@pytest.mark.parametrize("name,index,backend,device", _cases(backends=True))
def test_matches_reference(name, index, backend, device, poison_empty):
    op = OPS[name]
    sample = SAMPLES[name](torch.float32, device)[index]
    expected = _run(op, [_double(a) for a in sample.args], "reference")
    actual = _run(op, sample.args, backend)
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        what = f"{name} output {i}"
        if e is None:
            assert a is None, f"{what}: expected None (masked off)"
            continue
        assert a.dtype == (torch.float32 if e.dtype == torch.float64 else e.dtype), f"{what}: dtype {a.dtype}"
        if e.dim() in (4, 5):
            fmt = resfast.ops.kernel_format(e)
            assert a.is_contiguous(memory_format=fmt), f"{what}: expected {fmt}, got strides {a.stride()}"
        assert_close(a, e, torch.float32, what)


def _composite_cases():
    """Composite ops' samples on every backend, the reference one included."""
    cases = []
    for name in sorted(n for n in OPS.keys() & SAMPLES.keys() if OPS[n].composite):
        for i, sample in enumerate(SAMPLES[name](torch.float32, "cpu")):
            cases += [pytest.param(name, i, b, d, id=f"{name}-{sample.name}-{b}-{d}")
                      for b, d in [("reference", "cpu")] + _backends(OPS[name]) if _engine_takes(b, sample, OPS[name])]
    return cases


@pytest.mark.parametrize("name,index,backend,device", _composite_cases())
def test_composites_under_inference_mode(name, index, backend, device):
    """Without autograd (inference mode) the backend switch sees composite
    ops themselves, implicit ones included, and must run them with their
    inner ops switched."""
    op = OPS[name]
    sample = SAMPLES[name](torch.float32, device)[index]
    expected = _run(op, [_double(a) for a in sample.args], "reference")
    with torch.inference_mode():
        actual = _run(op, sample.args, backend)
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        if e is not None:
            assert_close(a, e, torch.float32, f"{name} output {i}")


def _grad_args(sample):
    """Indices of the float tensors gradcheck differentiates."""
    indices = sample.grad_args if sample.grad_args is not None else range(len(sample.args))
    return [i for i in indices if isinstance(sample.args[i], torch.Tensor) and sample.args[i].is_floating_point()]


def _differentiable(op, sample):
    return sample.differentiable and registry.has_kernel(op, "Autograd") and bool(_grad_args(sample))


@pytest.mark.parametrize("name,index", _cases(_differentiable))
def test_gradcheck(name, index):
    op = OPS[name]
    sample = SAMPLES[name](torch.float64, "cpu")[index]
    args, wanted = list(sample.args), _grad_args(sample)
    inputs = [args[i].detach().requires_grad_() for i in wanted]

    def fn(*tensors):
        for i, t in zip(wanted, tensors):
            args[i] = t
        return op.overload(*args)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("name,index", _cases(lambda op, sample: sample.opcheck))
def test_opcheck(name, index):
    """Schema, fake kernel, autograd registration and torch.compile (AOT
    dispatch) consistency."""
    op = OPS[name]
    args = list(SAMPLES[name](torch.float32, "cpu")[index].args)
    if registry.has_kernel(op, "Autograd"):
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                args[i] = a.detach().requires_grad_()
    mutates = any(a.alias_info and a.alias_info.is_write for a in op.overload._schema.arguments)
    # AOT dispatch of an op that writes into its argument needs a functional twin.
    options = dict(test_utils=("test_schema", "test_faketensor")) if mutates else {}
    torch.library.opcheck(op.overload, tuple(args), **options)
