"""Pre-activation blocks and ResNet-v2 models against timm's ResNetV2 with the
same weights (timm's blocks are plain torch.nn: BatchNormAct2d and Conv2d)."""

import pytest
import torch
from timm.layers import BatchNormAct2d, create_conv2d
from timm.models.resnetv2 import ResNetV2 as TimmResNetV2

import resfast
from conftest import available_backends
from resfast.bench.timing import saved_activation_bytes
from utils import assert_close, assert_within_twice_torch_error, compare_models, randomize

BACKENDS = available_backends()

# A small pre-activation ResNet that exercises every block kind: stride-1 and
# stride-2 projections, identity shortcuts, and 4 stages.
SMALL = dict(layers=[1, 2, 1, 1], channels=(32, 48, 64, 96), stem_chs=16, num_classes=10)
SMALL_BASIC = dict(layers=[1, 2, 1, 1], channels=(16, 24, 32, 48), stem_chs=16, num_classes=10, basic=True,
                   bottle_ratio=1.0)


def timm_model(**cfg):
    return TimmResNetV2(conv_layer=create_conv2d, norm_layer=BatchNormAct2d, **cfg)


def pair(cfg, dtype=torch.float32):
    ref = randomize(timm_model(**cfg))
    ours = resfast.models.ResNetV2(**cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.to(dtype), ref.double()


@pytest.mark.parametrize("backend,device", [b for b in BACKENDS if b[0] != "triton"])
@pytest.mark.parametrize("cfg", [SMALL, SMALL_BASIC], ids=["bottleneck", "basic"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_small_model_matches_timm(backend, device, cfg, training, channels_last):
    ours, ref = pair(cfg)
    x = torch.randn(2, 3, 40, 44)
    if channels_last:
        ours = ours.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    compare_models(ours.to(device), ref, x.to(device), training, backend)


@pytest.mark.skipif(not any(b == "triton" for b, _ in BACKENDS), reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("engine", ["split", "triton"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_tiny_model_triton_matches_timm(training, engine):
    cfg = dict(layers=[1, 1], channels=(16, 32), stem_chs=8, num_classes=5)
    ours, ref = pair(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours = ours.to(device, memory_format=torch.channels_last)
    x = torch.randn(2, 3, 20, 18).contiguous(memory_format=torch.channels_last)
    with resfast.ops.conv_impl(engine):
        compare_models(ours, ref, x.to(device), training, backend="triton")


def test_stochastic_depth_matches_timm():
    """Same seed, same per-sample masks: drop_path rises linearly over depth
    and is the identity in eval mode."""
    cfg = dict(SMALL, drop_path_rate=0.3)
    ours, ref = pair(cfg)
    rates = [b.drop_path_rate for s in ours.stages for b in s.blocks]
    assert rates[0] == 0 and abs(rates[-1] - 0.3) < 1e-6 and rates == sorted(rates)
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(5)
    y_ref = ref.train()(x.double())
    torch.manual_seed(5)
    y = ours.train()(x)
    assert_close(y, y_ref, torch.float32, "train logits with drop_path")
    compare_models(ours, ref, x, training=False, grads=False)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_grouped_bottleneck_matches_timm_block(training):
    from functools import partial

    from timm.models.resnetv2 import DownsampleConv, PreActBottleneck

    ref = randomize(PreActBottleneck(32, 64, stride=2, groups=4, conv_layer=create_conv2d, norm_layer=BatchNormAct2d,
                                     proj_layer=partial(DownsampleConv, preact=True)))
    ours = resfast.nn.PreActBottleneck(32, 64, stride=2, groups=4)
    ours.load_state_dict(ref.state_dict(), strict=True)
    compare_models(ours, ref.double(), torch.randn(2, 32, 9, 11), training)


def test_resnext_width_rule():
    block = resfast.nn.PreActBottleneck(64, 256, stride=2, groups=32, width_per_group=4)
    assert block.conv2.groups == 32 and block.conv2.in_channels == 128  # torchvision's ResNeXt-50 32x4d


@pytest.mark.parametrize("name", ["resnet18v2", "resnet34v2", "resnet50v2", "resnet101v2", "resnet152v2"])
def test_timm_checkpoints_load_strict(name):
    import timm

    timm_name = {"resnet18v2": "resnetv2_18", "resnet34v2": "resnetv2_34", "resnet50v2": "resnetv2_50",
                 "resnet101v2": "resnetv2_101", "resnet152v2": "resnetv2_152"}[name]
    state = timm.create_model(timm_name, pretrained=False).state_dict()
    getattr(resfast.models, name)().load_state_dict(state, strict=True)


def calibrate(model, x):
    """Running statistics of x's activations, as a trained checkpoint has:
    with random ones, eval-mode activations explode over 200 layers."""
    momenta = {m: m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    for m in momenta:
        m.momentum = 1.0
    with torch.no_grad():
        model.train()(x)
    for m, momentum in momenta.items():
        m.momentum = momentum
    return model


def resnet200_pair():
    ref = calibrate(randomize(timm_model(layers=[3, 24, 36, 3])), torch.randn(4, 3, 64, 64))
    ours = resfast.models.resnet200v2()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def run(model, x, g, training):
    model.train(training)
    x = x.clone().requires_grad_()
    y = model(x)
    y.backward(g.to(y.dtype))
    return y.detach().double(), x.grad.double()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_resnet200_matches_timm(training):
    """200 layers amplify rounding: the rule is our float32 error against
    float64 timm at most twice timm's own float32 error (and within 1e-4 when
    timm's is smaller than that)."""
    torch.manual_seed(2)
    ours, ref = resnet200_pair()
    assert abs(sum(p.numel() for p in ours.parameters()) / 1e6 - 64.67) < 0.01
    ref32 = resnet200_pair()[1]
    ref32.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    g = torch.randn(2, 1000, dtype=torch.float64)
    y64, gx64 = run(ref.double(), x.double(), g, training)
    y32, gx32 = run(ref32, x, g, training)
    y, gx = run(ours, x, g, training)
    for name, ours_v, timm_v, exact in (("logits", y, y32, y64), ("grad input", gx, gx32, gx64)):
        assert_within_twice_torch_error(ours_v, timm_v, exact, name, floor=1e-4)
    for (name, b), b_ref in zip(ours.named_buffers(), ref32.buffers()):
        if b.is_floating_point():
            assert_close(b, b_ref, torch.float32, name, tol=1e-3)


def test_resnet200_activation_memory_at_most_052x_timm():
    ours, ref = resnet200_pair()
    x = torch.randn(1, 3, 224, 224, requires_grad=True)
    theirs = saved_activation_bytes(ref.float().train(), x)
    mine = saved_activation_bytes(ours.train(), x)
    assert 200 * 2**20 < theirs < 270 * 2**20, f"timm saved {theirs / 2**20:.0f} MiB (docs/DESIGN.md says 235)"
    assert mine <= 0.52 * theirs, f"resfast saved {mine / 2**20:.1f} MiB vs timm {theirs / 2**20:.1f} MiB"


def test_training_takes_batch_statistics_from_the_epilogues():
    """In training, every BatchNorm inside the stages gets its statistics from
    the previous convolution's epilogue: one statistics pass (the first
    block's input) per forward, however deep the model."""
    from torch._C import DispatchKey
    from torch.utils._python_dispatch import TorchDispatchMode

    from resfast.ops import registry

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            self.counts[name] = self.counts.get(name, 0) + 1
            if func.namespace == "resfast" and registry.OPS[name].composite:
                with self:  # count the ops inside composite ones (batch_norm_affine's statistics pass)
                    return func._op_dk(DispatchKey.CompositeExplicitAutograd, *args, **(kwargs or {}))
            return func(*args, **(kwargs or {}))

    ours, _ = pair(SMALL)
    x = torch.randn(2, 3, 32, 32)
    with CountOps() as train_ops:
        ours.train()(x)
    assert train_ops.counts.get("channel_stats") == 1, train_ops.counts
    assert train_ops.counts.get("norm_act_conv2d_stats", 0) >= 3 * sum(SMALL["layers"]) - 1, train_ops.counts
    with CountOps() as eval_ops:
        ours.eval()(x)
    assert "channel_stats" not in eval_ops.counts and "norm_act_conv2d_stats" not in eval_ops.counts
