"""resfast's models call their blocks through nn.Module.__call__, so what
PyTorch builds on it sees them: forward and backward hooks, feature
extraction, activation checkpointing wrappers and per-block torch.compile."""

import pytest
import torch
from torch import nn

import resfast
from resfast.bench.timing import saved_activation_bytes
from utils import assert_close, randomize

BLOCKS = (resfast.nn.PreActBasicBlock, resfast.nn.PreActBottleneck, resfast.nn.DenseBlock, resfast.nn.Transition,
          resfast.nn.PreActResBlock, resfast.models.unet.DecoderLevel)

MODELS = {
    "resnet50v2": (lambda: resfast.models.resnet50v2(num_classes=5), (2, 3, 64, 64), 16),
    "densenet121": (lambda: resfast.models.densenet121(num_classes=5), (2, 3, 32, 32), 7),
    "unet": (lambda: resfast.models.UNet(3, 2, widths=(8, 16, 32), num_groups=4), (2, 3, 16, 16), 5),
    "hourglass": (lambda: resfast.models.StackedHourglass(num_stacks=1, channels=16, num_joints=3, depth=1),
                  (2, 3, 32, 32), 8),
}


def blocks_of(model):
    return [m for m in model.modules() if isinstance(m, BLOCKS)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(MODELS))
def test_hooks_fire_once_per_pass_on_every_block(name, training):
    make, shape, count = MODELS[name]
    model = randomize(make()).train(training)
    blocks = blocks_of(model)
    assert len(blocks) >= count
    forward, backward = {}, {}
    for b in blocks:
        b.register_forward_hook(lambda m, args, out: forward.__setitem__(m, forward.get(m, 0) + 1))
        b.register_full_backward_hook(lambda m, gin, gout: backward.__setitem__(m, backward.get(m, 0) + 1))
    x = torch.randn(shape, requires_grad=True)
    y = model(x)
    (y[-1] if isinstance(y, list) else y).square().sum().backward()
    assert [forward.get(b, 0) for b in blocks] == [1] * len(blocks)
    assert [backward.get(b, 0) for b in blocks] == [1] * len(blocks)


def test_a_forward_hook_that_replaces_an_output_is_honoured():
    """The batch statistics handed from block to block belong to the output
    the block returned: a hook's replacement gets its own."""
    model = randomize(resfast.models.resnet18v2(num_classes=5))
    reference = randomize(resfast.models.resnet18v2(num_classes=5))
    reference.load_state_dict(model.state_dict())
    block = model.stages[0].blocks[0]
    block.register_forward_hook(lambda m, args, out: out * 2 + 1)
    scaled = reference.stages[0].blocks[0]
    scaled.forward = (lambda f: (lambda x: f(x) * 2 + 1))(scaled.forward)
    x = torch.randn(2, 3, 32, 32)
    assert_close(model(x), reference(x), torch.float32, "output with the hook")


def test_feature_extractor_returns_block_outputs():
    from torchvision.models.feature_extraction import create_feature_extractor

    model = randomize(resfast.models.resnet50v2(num_classes=5)).eval()
    outputs = {}
    for name in ("stages.0.blocks.2", "stages.2.blocks.5"):
        model.get_submodule(name).register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out))
    x = torch.randn(2, 3, 64, 64)
    model(x)
    # resfast's fused blocks are leaves of the trace: their arguments are checked in Python.
    extractor = create_feature_extractor(model, return_nodes=list(outputs),
                                         tracer_kwargs={"leaf_modules": list(BLOCKS)})
    features = extractor(x)
    for name, out in outputs.items():
        assert torch.equal(features[name], out), name


@pytest.mark.parametrize("wrap", ["checkpoint_wrapper", "torch.utils.checkpoint"])
def test_checkpointed_blocks_save_less_and_give_the_same_gradients(wrap):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    class Checkpointed(nn.Module):
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, x):
            return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)

    plain = randomize(resfast.models.resnet50v2(num_classes=5))
    wrapped = randomize(resfast.models.resnet50v2(num_classes=5))
    wrapped.load_state_dict(plain.state_dict())
    for stage in wrapped.stages:
        for i, block in enumerate(stage.blocks):
            stage.blocks[i] = checkpoint_wrapper(block) if wrap == "checkpoint_wrapper" else Checkpointed(block)
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    # Checkpointed, a block keeps its input alone; fused, it keeps its input
    # and its two bottleneck activations (a quarter of the width each).
    saved, saved_plain = saved_activation_bytes(wrapped.train(), x), saved_activation_bytes(plain.train(), x)
    assert saved < 0.8 * saved_plain, (saved, saved_plain)
    grad = torch.randn(2, 5)
    grads = []
    for model in (plain, wrapped):
        model.zero_grad()
        xi = x.detach().requires_grad_()
        model(xi).backward(grad)
        grads.append([xi.grad] + [p.grad for p in model.parameters()])
    for i, (a, b) in enumerate(zip(*grads)):
        assert_close(b, a, torch.float32, f"gradient {i}")


def test_blocks_compile_one_by_one():
    """block.compile() on every block: the same outputs, gradients and
    running statistics as eager (the batch statistics hand-off is off inside
    compiled blocks, so each makes its own statistics pass)."""
    eager = randomize(resfast.models.ResNetV2([2, 1], channels=(16, 32), basic=True, num_classes=5, stem_chs=8))
    compiled = randomize(resfast.models.ResNetV2([2, 1], channels=(16, 32), basic=True, num_classes=5, stem_chs=8))
    compiled.load_state_dict(eager.state_dict())
    for block in blocks_of(compiled):
        block.compile()
    x = torch.randn(2, 3, 32, 32)
    grad = torch.randn(2, 5)
    results = []
    for model in (eager, compiled):
        xi = x.clone().requires_grad_()
        y = model.train()(xi)
        y.backward(grad)
        results.append([y, xi.grad] + [p.grad for p in model.parameters()] + list(model.buffers()))
    for i, (a, b) in enumerate(zip(*results)):
        if a.is_floating_point():
            assert_close(b, a, torch.float32, f"result {i}")
        else:
            assert torch.equal(a, b)
