"""resfast.convert: recognised patterns become resfast modules with the same
parameters and buffers and the same outputs; everything else is untouched."""

import pytest
import timm
import torch
from timm.models.resnetv2 import ResNetV2 as TimmResNetV2
from torch import nn

import resfast
from resfast.conversion import Replaced
from utils import assert_close, compare_models, randomize


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_timm_resnetv2_50(training):
    original = randomize(timm.create_model("resnetv2_50", num_classes=10))
    before = state(original)
    converted, report = resfast.convert(original)
    blocks = [f"stages.{i}.blocks.{j}" for i, n in enumerate([3, 4, 6, 3]) for j in range(n)]
    assert report.replaced == [Replaced(b, "PreActBottleneck", "PreActBottleneck") for b in blocks]
    assert report.skipped == []
    for b in blocks:
        assert type(converted.get_submodule(b)) is resfast.nn.PreActBottleneck
    # Same parameter and buffer names and values: only the blocks' classes changed.
    assert {k: v.shape for k, v in converted.state_dict().items()} == {k: v.shape for k, v in before.items()}
    for k, v in converted.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert type(converted.norm) is type(original.norm) and type(converted.stem) is type(original.stem)
    # float64 and 64x64 (the last stage sees 2x2 maps): 50 randomised layers with
    # training-mode BatchNorm over batches of 2 amplify fp32 rounding far past its tolerance.
    # Eval gradients are covered by the basic-block test below; outputs suffice here (time).
    compare_models(converted.double(), original.double(), torch.randn(2, 3, 64, 64), training, dtype=torch.float64,
                   grads=training)
    # inplace=False: the user's model keeps its own modules and tensors.
    assert type(original.stages[0].blocks[0]) is timm.models.resnetv2.PreActBottleneck
    assert converted.stages[0].blocks[0].norm1.weight is not original.stages[0].blocks[0].norm1.weight


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_timm_basic_blocks_with_drop_path(training):
    from timm.layers import BatchNormAct2d, create_conv2d

    cfg = dict(layers=[1, 2], channels=(16, 24), stem_chs=8, num_classes=5, basic=True,
               bottle_ratio=1.0)
    original = randomize(TimmResNetV2(conv_layer=create_conv2d, norm_layer=BatchNormAct2d, **cfg))
    converted, report = resfast.convert(original)
    assert [r.replacement for r in report.replaced] == ["PreActBasicBlock"] * 3
    compare_models(converted, original.double(), torch.randn(2, 3, 24, 20), training)

    original = randomize(TimmResNetV2(conv_layer=create_conv2d, norm_layer=BatchNormAct2d, drop_path_rate=0.2,
                                      **cfg)).double()
    converted, _ = resfast.convert(original)
    x = torch.randn(4, 3, 24, 20, dtype=torch.float64)
    torch.manual_seed(3)
    y_ref = original.train()(x)
    torch.manual_seed(3)
    assert_close(converted.train()(x), y_ref, torch.float64, "output with drop_path")


def test_bit_blocks_are_reported_not_converted():
    """timm's default ResNetV2 block layers (StdConv2d, GroupNormAct) have no exact resfast mapping yet."""
    original = TimmResNetV2(layers=[1, 1], channels=(128, 256), stem_chs=32, num_classes=5)
    converted, report = resfast.convert(original)
    assert report.replaced == []
    assert [(s.name, s.original) for s in report.skipped] == [("stages.0.blocks.0", "PreActBottleneck"),
                                                               ("stages.1.blocks.0", "PreActBottleneck")]
    assert all("StdConv2d" in s.reason for s in report.skipped)
    assert "StdConv2d" in str(report)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(converted.eval()(x), original.eval()(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3),
            nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1, stride=2),
            nn.BatchNorm2d(12), nn.ReLU(inplace=True), nn.Conv2d(12, 6, 1, bias=True),
            nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect"),  # not fusable
            nn.Sequential(nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, padding="same", dilation=2)),
            nn.BatchNorm2d(4),
        )
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_sequential_bn_relu_conv_chains(training):
    original = randomize(Net()).double()
    before = state(original)
    converted, report = resfast.convert(original)
    assert [(r.name, r.replacement) for r in report.replaced] == [
        ("features.1", "BNReLUConv2d"), ("features.4", "BNReLUConv2d"), ("features.10.0", "BNReLUConv2d")]
    assert report.replaced[0].original == "BatchNorm2d+ReLU+Conv2d (1, 2, 3)"
    f = converted.features
    assert [type(m).__name__ for m in f] == [
        "Conv2d", "BNReLUConv2d", "Identity", "Identity", "BNReLUConv2d", "Identity", "Identity",
        "BatchNorm2d", "ReLU", "Conv2d", "Sequential", "BatchNorm2d"]
    assert f[9].padding_mode == "reflect" and type(converted.head) is nn.Linear

    # The same parameters, in the same order, under the new names.
    ours = list(converted.named_parameters())
    theirs = list(original.named_parameters())
    assert len(ours) == len(theirs)
    for (name, p), (_, q) in zip(ours, theirs):
        assert torch.equal(p, q), name

    converted.train(training)
    original.train(training)
    x = torch.randn(3, 3, 13, 11, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = original(xa), converted(xb)
    assert_close(yb, ya, torch.float64, "output")
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert_close(xb.grad, xa.grad, torch.float64, "grad input")
    for (name, p), (_, q) in zip(converted.named_parameters(), original.named_parameters()):
        assert_close(p.grad, q.grad, torch.float64, f"grad {name}", floor=1.0)
    for (name, b), (_, c) in zip(converted.named_buffers(), original.named_buffers()):
        assert torch.allclose(b, c, rtol=1e-12, atol=1e-12), name
    changed = any(not torch.equal(v, before[k]) for k, v in original.state_dict().items())
    assert changed == training  # original ran too; its own forward updated its own buffers


def test_inplace_false_leaves_model_untouched_and_inplace_shares():
    original = randomize(Net())
    before = state(original)
    converted, _ = resfast.convert(original)
    converted.train()(torch.randn(2, 3, 9, 9))
    assert type(original.features[1]) is nn.BatchNorm2d
    for k, v in original.state_dict().items():
        assert torch.equal(v, before[k]), k

    same, report = resfast.convert(original, inplace=True)
    assert same is original and type(original.features[1]) is resfast.nn.BNReLUConv2d
    assert original.features[1].bn.weight is not None and len(report.replaced) == 3


def test_unrecognised_model_is_returned_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
    converted, report = resfast.convert(model)
    assert report.replaced == [] and report.skipped == []
    assert [type(m) for m in converted] == [nn.Conv2d, nn.ReLU, nn.BatchNorm2d]
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        resfast.convert("resnet")


def test_rules_are_extensible():
    from resfast import conversion

    def gelu_to_silu(m):
        if type(m) is nn.GELU:
            return conversion.Replacement(nn.SiLU(), [("", "GELU", "SiLU")])
        return None

    conversion.register_rule(gelu_to_silu)
    try:
        converted, report = resfast.convert(nn.Sequential(nn.Conv2d(3, 3, 1), nn.GELU()))
    finally:
        conversion.RULES.remove(gelu_to_silu)
    assert type(converted[1]) is nn.SiLU and report.replaced == [Replaced("1", "GELU", "SiLU")]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torchvision_densenet121(training):
    """Dense blocks and transitions become resfast's, holding the same
    modules: same state-dict keys, same outputs and gradients."""
    import torchvision

    torch.manual_seed(0)
    ref = randomize(torchvision.models.densenet121(num_classes=10)).double()
    model, report = resfast.convert(ref)
    assert [r.replacement for r in report.replaced] == ["DenseBlock", "Transition"] * 3 + ["DenseBlock"]
    assert report.replaced[0].name == "features.denseblock1"
    assert model.state_dict().keys() == ref.state_dict().keys()
    assert type(model.features.denseblock2).__module__.startswith("resfast")
    # 121 layers of batch-2 BatchNorm amplify float64 rounding to ~1e-9.
    compare_models(model, ref, torch.randn(2, 3, 40, 40, dtype=torch.float64), training, dtype=torch.float64, tol=1e-7)


def test_group_norm_is_converted():
    ref = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8), nn.SiLU())
    model, report = resfast.convert(ref)
    assert type(model[1]) is resfast.nn.GroupNorm and model[1].weight is not ref[1].weight
    assert [(r.name, r.replacement) for r in report.replaced] == [("1", "resfast GroupNorm")]
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(model(x), ref(x))
