"""torch.compile traces the resfast ops (fake kernels, registered autograd)
without graph breaks, and the compiled unit matches eager resfast."""

import copy
import functools

import pytest
import torch
from timm.models.resnetv2 import DownsampleConv

import resfast
from utils import assert_close, randomize


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


def _compiled_step_matches_eager(model, x, backend):
    """torch.compile(fullgraph=True) of a copy of model: forward and backward
    give eager resfast's outputs, gradients and buffers."""
    torch._dynamo.reset()
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = model(xa), compiled(xb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert_close(yb, ya, torch.float32, "compiled output")
    assert_close(xb.grad, xa.grad, torch.float32, "compiled grad x")
    # Compiled code reorders float32 reductions: a small gradient's error is
    # measured against the model's largest.
    floor = max(q.grad.abs().max().item() for q in model.parameters())
    for (name, p), q in zip(compiled_model.named_parameters(), model.parameters()):
        assert_close(p.grad, q.grad, torch.float32, f"compiled grad {name}", floor=floor)
    for (name, b), c in zip(compiled_model.named_buffers(), model.buffers()):
        assert torch.allclose(b.float(), c.float(), rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_inductor_block_matches_eager(training):
    """The inductor backend (C++ codegen on the CPU) around the resfast ops."""
    block = randomize(resfast.nn.PreActBottleneck(8, 16, stride=2)).train(training)
    _compiled_step_matches_eager(block, torch.randn(2, 8, 9, 9), "inductor")


MODELS = {
    "resnet50v2": (lambda: resfast.models.resnet50v2(channels=(16, 32, 64, 128), stem_chs=8, num_classes=5),
                   (2, 3, 32, 32)),
    "unet-group": (lambda: resfast.models.UNet(3, 2, widths=(8, 16, 32), num_groups=4), (2, 3, 16, 16)),
    "unet-batch": (lambda: resfast.models.UNet(3, 2, widths=(8, 16), norm="batch"), (2, 3, 12, 12)),
    "densenet": (lambda: resfast.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16,
                                                 num_classes=5), (2, 3, 32, 32)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_models_trace_fullgraph(name):
    """Whole models trace without graph breaks (aot_eager: dynamo and AOT
    autograd through the fake kernels and registered autograd, no codegen)."""
    build, shape = MODELS[name]
    _compiled_step_matches_eager(randomize(build()).train(), torch.randn(shape), "aot_eager")


@pytest.mark.parametrize("name", ["resnet50v2", "unet-group", "densenet"])
def test_models_inductor(name):
    """Inductor's generated code for whole models (about 40 s each here)."""
    build, shape = MODELS[name]
    _compiled_step_matches_eager(randomize(build()).train(), torch.randn(shape), "inductor")


def test_autocast_dtypes_match_torch_modules():
    """Under CPU autocast (bfloat16) the fused modules return what the torch
    modules they replace return, and their parameters and buffers stay float32."""
    from timm.layers import BatchNormAct2d, create_conv2d
    from timm.models.resnetv2 import PreActBottleneck as TimmBottleneck

    unit = resfast.nn.BNReLUConv2d(8, 16, 3, padding=1, bias=True)
    eager_unit = torch.nn.Sequential(unit.bn, torch.nn.ReLU(), unit.conv)
    block = resfast.nn.PreActBottleneck(8, 16, stride=2)
    timm_block = TimmBottleneck(8, 16, stride=2, conv_layer=create_conv2d, norm_layer=BatchNormAct2d,
                                proj_layer=functools.partial(DownsampleConv, preact=True))
    timm_block.load_state_dict(block.state_dict())
    for ours, theirs in ((unit, eager_unit), (block, timm_block)):
        for training in (True, False):
            ours.train(training)
            theirs.train(training)
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(2, 8, 9, 9, dtype=dtype)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y, y_ref = ours(x), theirs(x)
                assert y.dtype == y_ref.dtype, (type(ours).__name__, training, dtype)
                y.float().sum().backward()
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in ours.parameters())
        assert all(b.dtype in (torch.float32, torch.int64) for b in ours.buffers())
