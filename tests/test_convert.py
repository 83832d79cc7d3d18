"""resfast.convert: recognised patterns become resfast modules with the same
parameters and buffers and the same outputs; everything else is untouched."""

import copy

import pytest
import timm
import torch
from timm.models.resnetv2 import ResNetV2 as TimmResNetV2
from torch import nn
from torch.nn.utils import prune

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
    assert report.replaced == [Replaced("stem.pool", "MaxPool2d", "resfast MaxPool2d")] + [
        Replaced(b, "PreActBottleneck", "PreActBottleneck", 4 if j == 0 else 3) for b in blocks for j in [int(b[-1])]]
    assert report.units == 16 * 3 + 4
    assert report.skipped == []
    for b in blocks:
        assert type(converted.get_submodule(b)) is resfast.nn.PreActBottleneck
    # Same parameter and buffer names and values: only the blocks' classes changed.
    assert {k: v.shape for k, v in converted.state_dict().items()} == {k: v.shape for k, v in before.items()}
    for k, v in converted.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert type(converted.norm) is type(original.norm) and type(converted.stem) is type(original.stem)
    assert type(converted.stem.pool) is resfast.nn.MaxPool2d
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
    assert [r.replacement for r in report.replaced] == ["resfast MaxPool2d"] + ["PreActBasicBlock"] * 3
    compare_models(converted, original.double(), torch.randn(2, 3, 24, 20), training)

    original = randomize(TimmResNetV2(conv_layer=create_conv2d, norm_layer=BatchNormAct2d, drop_path_rate=0.2,
                                      **cfg)).double()
    converted, _ = resfast.convert(original)
    x = torch.randn(4, 3, 24, 20, dtype=torch.float64)
    torch.manual_seed(3)
    y_ref = original.train()(x)
    torch.manual_seed(3)
    assert_close(converted.train()(x), y_ref, torch.float64, "output with drop_path")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bit_blocks_fuse_std_conv_and_group_norm_act(training):
    """timm's default ResNetV2 blocks (StdConv2d, GroupNormAct): each chain is
    fused with the weight standardised per forward as timm does; a block's
    first pre-activation, shared with its downsample, is left alone."""
    original = randomize(TimmResNetV2(layers=[1, 1], channels=(128, 256), stem_chs=32, num_classes=5))
    before = state(original)
    converted, report = resfast.convert(original)
    assert report.units == 4
    assert [(s.name, s.original) for s in report.skipped] == [("stages.0.blocks.0", "norm1"),
                                                               ("stages.1.blocks.0", "norm1")]
    assert all("feeds 2 consumers (downsample.conv, conv1)" in s.reason for s in report.skipped)
    assert {k: v.shape for k, v in converted.state_dict().items()} == {k: v.shape for k, v in before.items()}
    compare_models(converted.double(), original.double(), torch.randn(2, 3, 32, 32), training, dtype=torch.float64)


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
    assert [(r.name, r.original) for r in report.replaced] == [
        ("features", "1 → 2 → 3"), ("features", "4 → 5 → 6"), ("features.10", "0 → 1 → 2")]
    assert report.units == 3
    assert [(s.name, s.original) for s in report.skipped] == [("features", "7 → 8 → 9")]
    assert "padding_mode='reflect'" in report.skipped[0].reason
    # Same modules, names, parameters and buffers: only the forwards changed.
    assert [type(m) for m in converted.modules()] == [type(m) for m in original.modules()]
    assert converted.state_dict().keys() == before.keys()
    for k, v in converted.state_dict().items():
        assert torch.equal(v, before[k]), k
    compare_models(converted, original, torch.randn(3, 3, 13, 11, dtype=torch.float64), training,
                   dtype=torch.float64)
    changed = any(not torch.equal(v, before[k]) for k, v in original.state_dict().items())
    assert changed == training  # original ran too; its own forward updated its own buffers


def test_inplace_false_leaves_model_untouched_and_inplace_shares():
    original = randomize(Net())
    before = state(original)
    converted, _ = resfast.convert(original)
    converted.train()(torch.randn(2, 3, 9, 9))
    assert "forward" not in original.features.__dict__
    for k, v in original.state_dict().items():
        assert torch.equal(v, before[k]), k

    weight = original.features[1].weight
    same, report = resfast.convert(original, inplace=True)
    assert same is original and "forward" in original.features.__dict__
    assert original.features[1].weight is weight and report.units == 3


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
    modules, and the stem's BatchNorm → ReLU → max pool is fused: same
    state-dict keys, same outputs and gradients."""
    import torchvision

    torch.manual_seed(0)
    ref = randomize(torchvision.models.densenet121(num_classes=10)).double()
    model, report = resfast.convert(ref)
    assert [r.replacement for r in report.replaced] == ["fused unit"] + ["DenseBlock", "Transition"] * 3 + \
        ["DenseBlock"]
    assert report.replaced[0].original == "norm0 → relu0 → pool0"  # the stem, in features' forward
    assert report.replaced[1].name == "features.denseblock1"
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


# ---------------------------------------------------------------- chain fusion by tracing
class Block(nn.Module):
    """Chains between siblings, functional and method activations, a Python
    branch on an optional argument and on self.training."""

    def __init__(self, norm=None):
        super().__init__()
        self.norm1 = norm or nn.BatchNorm2d(6, bias=False)
        self.conv1 = nn.Conv2d(6, 8, 3, padding=1)
        self.norm2 = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 6, 1, bias=False)
        self.scale = 0.5

    def forward(self, x, skip=None):
        if skip is not None:
            x = x + skip
        y = self.conv1(torch.nn.functional.relu(self.norm1(x)))
        if self.training:
            y = y * 2
        return self.conv2(torch.nn.functional.silu(self.norm2(y))) * self.scale + x


def _run(model, args, training, seed=0):
    model.train(training)
    torch.manual_seed(seed)
    return model(*args)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_block_chains_follow_each_call_signature(training):
    original = randomize(Block()).double()
    converted, report = resfast.convert(original)
    assert [r.original for r in report.replaced] == ["norm1 → relu → conv1", "norm2 → silu → conv2"]
    assert type(converted.norm2) is nn.GroupNorm  # a chain's norm is not swapped for resfast's: it is not called
    x, skip = (torch.randn(2, 6, 7, 5, dtype=torch.float64) for _ in range(2))
    for args in [(x,), (x, skip), (x, None), (x,)]:
        assert_close(_run(converted, args, training), _run(original, args, training), torch.float64, f"{len(args)}")
    assert_close(_run(converted, (x,), not training), _run(original, (x,), not training), torch.float64, "mode")
    converted.scale = 3.0  # a plain attribute the forward reads: a new plan, not the traced value
    original.scale = 3.0
    assert_close(_run(converted, (x,), training), _run(original, (x,), training), torch.float64, "attribute")
    compare_models(converted, original, x, training, dtype=torch.float64)
    plans = converted.forward._plans
    assert sum(fn is not False for fn in plans.values()) >= 4


def test_converted_block_keeps_hooks_copies_and_pickles(tmp_path):
    model = nn.Sequential(randomize(Block()), nn.Conv2d(6, 3, 1))
    converted, report = resfast.convert(model)
    assert report.units == 2
    x = torch.randn(2, 6, 5, 5)
    y = converted.eval()(x)
    torch.testing.assert_close(y, model.eval()(x))
    twin = copy.deepcopy(converted)
    assert twin[0].forward._module is twin[0]
    torch.testing.assert_close(twin(x), y)
    torch.save(converted, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    torch.testing.assert_close(loaded(x), y)
    assert loaded[0].forward._module is loaded[0]
    seen = []
    converted[0].register_forward_hook(lambda m, args, out: seen.append(out.shape))
    converted(x)
    assert seen == [torch.Size([2, 6, 5, 5])]


def test_untraceable_and_shared_chains_are_reported():
    class DataDependent(Block):
        def forward(self, x, skip=None):
            if x.sum() > 0:  # a Python branch on a tensor's value: fx cannot trace it
                x = -x
            return super().forward(x)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm2d(4)
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            a = torch.relu(self.norm(x))
            return self.conv(a) + a

    model = nn.Sequential(DataDependent(), nn.Conv2d(6, 4, 1), Shared())
    converted, report = resfast.convert(model)
    assert report.units == 0
    assert [(s.name, s.original) for s in report.skipped] == [("0", "DataDependent"), ("2", "norm → relu")]
    assert "forward not traceable" in report.skipped[0].reason
    assert "feeds 2 consumers (conv, add)" in report.skipped[1].reason
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(converted.eval()(x), model.eval()(x))


def test_norms_without_bias():
    """torch's `bias=False` norms: in the chains, in the drop-in modules."""
    for norm in (nn.BatchNorm2d(6, bias=False), nn.GroupNorm(3, 6, bias=False),
                 resfast.nn.SyncBatchNorm2d(6, bias=False), resfast.nn.GroupNormAct(3, 6, bias=False)):
        assert norm.bias is None and norm.weight is not None
        block = randomize(Block(norm if not isinstance(norm, resfast.nn.GroupNormAct) else nn.GroupNorm(3, 6)))
        converted, report = resfast.convert(block.double())
        assert report.units == 2
        compare_models(converted, block, torch.randn(3, 6, 5, 4, dtype=torch.float64), True, dtype=torch.float64)
        x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
        norm.double()
        reference = nn.functional.group_norm(x, 3, norm.weight) if isinstance(norm, nn.GroupNorm) else \
            nn.functional.batch_norm(x, None, None, norm.weight, None, True)
        if isinstance(norm, resfast.nn.GroupNormAct):
            reference = nn.functional.silu(reference)
        torch.testing.assert_close(norm.train()(x), reference)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_block_rules_take_norms_without_bias(training):
    """torchvision's dense blocks and timm's pre-activation blocks whose norms have no bias."""
    import torchvision
    from timm.layers import BatchNormAct2d, create_conv2d

    models = [torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=5),
              TimmResNetV2(conv_layer=create_conv2d, norm_layer=BatchNormAct2d, layers=[1, 1], channels=(16, 24),
                           stem_chs=8, num_classes=5, basic=True, bottle_ratio=1.0)]
    for original, kinds in zip(models, [{"DenseBlock", "Transition"}, {"PreActBasicBlock"}]):
        for m in original.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.register_parameter("bias", None)
        original = randomize(original).double()
        converted, report = resfast.convert(original)
        assert kinds <= {r.replacement for r in report.replaced}
        compare_models(converted, original, torch.randn(3, 3, 24, 24, dtype=torch.float64), training,
                       dtype=torch.float64)


def test_converted_block_compiles_without_graph_breaks():
    block = randomize(Block())
    converted, _ = resfast.convert(block)
    x = torch.randn(2, 6, 5, 5)
    converted.train()(x)  # the plan for this signature, traced eagerly
    explanation = torch._dynamo.explain(converted)(x)
    assert explanation.graph_break_count == 0
    torch.testing.assert_close(torch.compile(converted)(x), block.train()(x))


def test_hooks_side_effects_and_nesting_are_respected():
    """A chain module with hooks (pruning's) is not fused; a forward that sets
    its own attributes keeps its own forward; nested Sequentials count once."""
    pruned = randomize(Block())
    prune.l1_unstructured(pruned.conv1, "weight", amount=0.5)
    x = torch.randn(2, 6, 5, 5)
    expected = pruned.eval()(x)
    converted, report = resfast.convert(pruned, inplace=True)  # a pruned module does not deepcopy
    assert report.units == 1 and "conv1 has hooks" in report.skipped[0].reason
    torch.testing.assert_close(converted(x), expected)

    class Counting(Block):
        def forward(self, x, skip=None):
            self.calls = getattr(self, "calls", 0) + 1
            return super().forward(x, skip)

    counting = Counting()
    converted, report = resfast.convert(counting)
    assert report.units == 0 and "sets attributes (calls)" in report.skipped[0].reason
    assert "calls" not in counting.__dict__ and "calls" not in converted.__dict__
    converted(x)
    converted(x)
    assert converted.calls == 2

    nested = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.Sequential(nn.BatchNorm2d(4), nn.ReLU()),
                                                             nn.Conv2d(4, 4, 3)))
    converted, report = resfast.convert(nested)
    assert report.units == 1 and [r.name for r in report.replaced] == ["1"]
    assert "forward" not in converted[1][0].__dict__
    again, report = resfast.convert(converted)
    assert report.units == 0 and report.skipped == []


def test_plans_give_way_to_later_hooks_and_modes_and_keep_the_order():
    """Hooks registered after conversion run (the plan steps aside), a
    followed layer's own mode is honoured, and what runs between a norm and
    its conv keeps its order."""
    import torchvision

    original = randomize(torchvision.models.resnet18(num_classes=5)).eval()
    converted, _ = resfast.convert(original)
    x = torch.randn(2, 3, 32, 32)
    seen = []
    converted.layer4[1].conv2.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    torch.testing.assert_close(converted(x), original(x))
    assert len(seen) == 1

    class Ordered(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.act = nn.ReLU()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.inplace = nn.ReLU(inplace=True)

        def forward(self, x, y):
            x = x * 1
            a = self.bn(x)
            b = self.bn(y)  # the shared norm's second call: running statistics in order
            shortcut = self.inplace(x)  # changes the norm's input in place after the norm read it
            return self.conv(self.act(a)) + shortcut + b

    for training in (False, True):
        block = randomize(Ordered()).double()
        converted, report = resfast.convert(block)
        assert report.units == 1
        x, y = (torch.randn(2, 4, 5, 5, dtype=torch.float64) for _ in range(2))
        assert_close(_run(converted, (x, y), training), _run(block, (x, y), training), torch.float64, "output")
        for (name, b), c in zip(converted.named_buffers(), block.buffers()):
            assert torch.allclose(b, c, rtol=1e-12, atol=1e-12), name

    class Keyword(Block):
        def forward(self, x, skip=None):
            return self.conv1(torch.relu(self.norm1(input=x)))

    _, report = resfast.convert(Keyword())
    assert report.units == 0

    layered = nn.Sequential(randomize(nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6))), nn.ReLU(),
                            nn.Conv2d(6, 3, 1))
    converted, report = resfast.convert(layered)
    assert report.units == 1
    converted.train()
    converted[0][1].eval()  # frozen BatchNorm: the fused unit reads the norm's own mode
    layered.train()
    layered[0][1].eval()
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(converted(x), layered(x))
