"""Non-finite inputs propagate as in eager PyTorch (running statistics
included), and results are bitwise reproducible run to run."""

import copy

import pytest
import torch

import resfast
from conftest import available_backends
from utils import randomize

BACKENDS = available_backends()


def unit_and_eager(groups):
    unit = randomize(resfast.nn.BNReLUConv2d(4, 4, 3, padding=1, groups=groups, bias=True))
    eager = torch.nn.Sequential(copy.deepcopy(unit.bn), torch.nn.ReLU(), copy.deepcopy(unit.conv))
    return unit, eager


def poisoned_input(kind):
    x = torch.randn(2, 4, 6, 5)
    x[1, 1, 2, 3] = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}[kind]
    x[0, 2, 0, 0] = -float("inf") if kind == "inf" else x[0, 2, 0, 0]
    return x


def assert_same_nonfinite(actual, expected, name, exact_kind=True):
    """Non-finite exactly where eager's are (and, with exact_kind, the same
    NaN / +-Inf), finite values close."""
    assert torch.equal(torch.isfinite(actual), torch.isfinite(expected)), f"{name}: non-finite pattern differs"
    if exact_kind:
        assert torch.equal(torch.isnan(actual), torch.isnan(expected)), f"{name}: NaN pattern differs"
    finite = torch.isfinite(expected)
    torch.testing.assert_close(actual[finite], expected[finite], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("groups", [1, 4], ids=["dense", "depthwise"])
def test_nonfinite_input_propagates_like_eager(backend, device, kind, training, groups):
    unit, eager = unit_and_eager(groups)
    unit.train(training).to(device)
    eager.train(training).to(device)
    x = poisoned_input(kind).to(device)
    with resfast.backend(backend):
        y = unit(x)
    y_ref = eager(x)
    assert_same_nonfinite(y, y_ref, "output")
    for (name, b), b_ref in zip(unit.bn.named_buffers(), eager[0].buffers()):
        if b.is_floating_point():
            # The channels an infinity reaches are spoilt as in eager, but their
            # running mean may be NaN where eager's is +-Inf: the statistics
            # pass merges moments (Welford/Chan; inf - inf), eager sums.
            assert_same_nonfinite(b, b_ref, name, exact_kind=kind == "nan")
        else:
            assert torch.equal(b, b_ref), name


def _step(model, x, backend):
    x = x.clone().requires_grad_()
    with resfast.backend(backend):
        y = model(x)
        y.backward(torch.ones_like(y))
    return [y, x.grad] + [p.grad for p in model.parameters()] + list(model.buffers())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bitwise_reproducible_under_deterministic_algorithms(backend, device):
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        block = randomize(resfast.nn.PreActBottleneck(8, 16, stride=2))
        x = torch.randn(3, 8, 9, 7)
        if backend == "triton":
            block = resfast.nn.BNReLUConv2d(8, 16, 3, padding=1)  # the interpreter is slow
            x = torch.randn(2, 8, 5, 6)
        runs = [_step(copy.deepcopy(block).to(device), x.to(device), backend) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(prev)
    for i, (a, b) in enumerate(zip(*runs)):
        assert torch.equal(a, b), f"tensor {i} differs between runs"
