"""torch.compile traces the resfast ops (fake kernels, registered autograd)
without graph breaks, and the compiled unit matches eager resfast."""

import pytest
import torch

import resfast
from utils import assert_close


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiled_unit_matches_eager_fullgraph(training):
    torch._dynamo.reset()
    unit = resfast.nn.BNReLUConv2d(4, 6, 3, padding=1, bias=True).train(training)
    compiled_unit = resfast.nn.BNReLUConv2d(4, 6, 3, padding=1, bias=True).train(training)
    compiled_unit.load_state_dict(unit.state_dict())
    compiled = torch.compile(compiled_unit, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 7, 7)
    for _ in range(2):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = unit(xa), compiled(xb)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        assert_close(yb, ya, torch.float32, "compiled output")
        assert_close(xb.grad, xa.grad, torch.float32, "compiled grad x")
    assert_close(compiled_unit.conv.weight.grad, unit.conv.weight.grad, torch.float32, "compiled grad weight")
    assert_close(compiled_unit.bn.running_var, unit.bn.running_var, torch.float32, "compiled running_var")
    assert compiled_unit.bn.num_batches_tracked.item() == unit.bn.num_batches_tracked.item()
