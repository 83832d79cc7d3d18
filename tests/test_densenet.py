"""DenseNet's blocks and models against torchvision's, the zero-copy
concatenation, and the activation memory of DenseNet-264."""

import copy

import pytest
import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

import resfast
from conftest import triton_device
from resfast.bench.timing import saved_activation_bytes
from utils import assert_close, compare_models, randomize

TINY = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=5)


def tiny_pair(**overrides):
    cfg = {**TINY, **overrides}
    ours = randomize(resfast.models.DenseNet(**cfg))
    ref = torchvision.models.DenseNet(**cfg)
    ref.load_state_dict(ours.state_dict())
    return ours, ref.double()


def test_state_dict_matches_torchvision():
    ours = resfast.models.densenet121()
    ref = torchvision.models.densenet121()
    theirs = ref.state_dict()
    assert list(ours.state_dict()) == list(theirs)
    assert all(ours.state_dict()[k].shape == v.shape for k, v in theirs.items())
    ours.load_state_dict(theirs, strict=True)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_tiny_densenet_matches_torchvision(backend, training, channels_last):
    ours, ref = tiny_pair()
    x = torch.randn(3, 3, 29, 30) * 1.5 + 0.3  # odd sizes: the transition's pool floors
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    compare_models(ours, ref, x, training, backend)


def test_tiny_densenet_float64_two_steps_momentum_none():
    """Exact in float64; momentum=None (cumulative average) over two batches."""
    ours, ref = tiny_pair()
    for m in list(ours.modules()) + list(ref.modules()):
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    ours.double()
    for _ in range(2):
        x = torch.randn(2, 3, 24, 20, dtype=torch.float64)
        compare_models(ours, ref, x, True, "auto", dtype=torch.float64)
    assert ours.features.denseblock2.denselayer2.norm1.num_batches_tracked.item() == 2


def test_dense_block_triton_interpreter():
    block = randomize(resfast.nn.DenseBlock(2, 4, bn_size=2, growth_rate=4))
    ref = torchvision.models.densenet._DenseBlock(2, 4, bn_size=2, growth_rate=4, drop_rate=0)
    ref.load_state_dict(block.state_dict())
    x = torch.randn(2, 4, 5, 6).contiguous(memory_format=torch.channels_last)
    compare_models(block.to(triton_device()), ref.double(), x.to(triton_device()), True, "triton")


def test_transition_odd_sizes_eval_and_train():
    t = randomize(resfast.nn.Transition(6, 3))
    ref = torchvision.models.densenet._Transition(6, 3)
    ref.load_state_dict(t.state_dict())
    for training in (True, False):
        compare_models(t, ref.double(), torch.randn(2, 6, 7, 9), training, "auto")


def test_dropout_matches_torchvision_stream():
    """Same seed, same noise: dropout consumes the random stream as F.dropout does."""
    ours, ref = tiny_pair(drop_rate=0.3)
    ref.float()
    x = torch.randn(2, 3, 24, 24)
    torch.manual_seed(1)
    y = ours.train()(x)
    torch.manual_seed(1)
    y_ref = ref.train()(x)
    assert_close(y, y_ref, torch.float32, "output with dropout")
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for (name, p), p_ref in zip(ours.named_parameters(), ref.parameters()):
        assert_close(p.grad, p_ref.grad, torch.float32, f"grad {name}", tol=1e-3)


class _CopiesInto(TorchDispatchMode):
    """Records cat calls and copies/scatters whose destination lies in `storage`."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__
        if "cat" in name or "slice_scatter" in name:
            self.calls.append((name, None))
        elif name.startswith("copy_") or name.startswith("copy."):
            dst = args[0]
            self.calls.append((name, (dst.untyped_storage().data_ptr(), dst.storage_offset(), dst.stride(),
                                      tuple(dst.shape))))
        return func(*args, **kwargs)


@pytest.mark.parametrize("channels_last", [False, True])
def test_concatenation_is_zero_copy(channels_last):
    block = randomize(resfast.nn.DenseBlock(3, 5, bn_size=2, growth_rate=4)).train()
    x = torch.randn(2, 5, 6, 7).requires_grad_()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with _CopiesInto() as mode:
        y = block(x)
    assert not [c for c in mode.calls if c[1] is None], f"concatenation ops in the forward: {mode.calls}"
    buf_copies = [c for c in mode.calls if c[1][0] == y.untyped_storage().data_ptr()]
    # The block's input is the only thing copied into its buffer: its first 5 channels.
    assert len(buf_copies) == 1 and buf_copies[0][1][3] == (2, 5, 6, 7), buf_copies
    # And the output is the buffer itself, holding the layers' features.
    assert y.shape == (2, 17, 6, 7)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_layers_store_into_the_buffer():
    """Each layer's conv epilogue is handed the block's buffer and its slice."""
    block = randomize(resfast.nn.DenseBlock(3, 5, bn_size=2, growth_rate=4)).train()
    stores = []

    class Stores(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.resfast.norm_act_conv2d_into.default:
                stores.append((args[12].untyped_storage().data_ptr(), args[12].shape[1], args[13]))
            return func(*args, **(kwargs or {}))

    with Stores():
        y = block(torch.randn(2, 5, 4, 4))
    into_buffer = [(width, offset) for ptr, width, offset in stores if ptr == y.untyped_storage().data_ptr()]
    assert into_buffer == [(17, 5), (17, 9), (17, 13)], stores


def test_compile_fullgraph_tiny_densenet():
    ours, _ = tiny_pair()
    twin = copy.deepcopy(ours)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 24, 24)
    y = ours.train()(x)
    y_c = compiled.train()(x)
    assert_close(y_c, y, torch.float32, "compiled output")
    y.sum().backward()
    y_c.sum().backward()
    for (name, p), p_c in zip(ours.named_parameters(), twin.parameters()):
        assert_close(p_c.grad, p.grad, torch.float32, f"compiled grad {name}")
    for (name, b), b_c in zip(ours.named_buffers(), twin.buffers()):
        assert torch.allclose(b_c.double(), b.double(), rtol=1e-5, atol=1e-6), name


def test_densenet121_from_torchvision_state_dict():
    ref = torchvision.models.densenet121()
    randomize(ref)
    ours = resfast.models.densenet121()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    for training in (False, True):
        ours.train(training)
        ref.train(training)
        with torch.no_grad():
            assert_close(ours(x), ref(x), torch.float32, f"densenet121 output (training={training})")
    for (name, b), b_ref in zip(ours.named_buffers(), ref.buffers()):
        assert torch.allclose(b.double(), b_ref.double(), rtol=1e-4, atol=1e-5), name


def test_densenet264_activation_memory():
    """docs/DESIGN.md §5 count, against torchvision's eager and memory_efficient
    models at the same input: <= 0.15x and <= 0.6x."""
    x = torch.randn(1, 3, 64, 64)  # the ratios hardly move with size: 0.13 and 0.51 at 64 and 224
    ours = resfast.models.densenet264(num_classes=10).train()
    ref = torchvision.models.DenseNet(32, (6, 12, 64, 48), 64, num_classes=10)
    ours.load_state_dict(ref.state_dict(), strict=True)
    saved = saved_activation_bytes(ours, x)
    ratios = {}
    for efficient in (False, True):
        ref = torchvision.models.DenseNet(32, (6, 12, 64, 48), 64, num_classes=10, memory_efficient=efficient)
        ratios[efficient] = saved / saved_activation_bytes(ref.train(), x)
    assert ratios[False] <= 0.15, ratios
    assert ratios[True] <= 0.6, ratios
