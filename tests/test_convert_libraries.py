"""resfast.convert on the models people train, from torchvision, timm,
diffusers, MONAI and segmentation_models_pytorch: the chains it fuses, the
state dict it keeps, and outputs, gradients and buffers against the original
model in float64."""

import pytest
import torch

import resfast
from utils import assert_close, assert_param_grads_close, compare_models, randomize

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")


def converted_copy(original, units, skipped=0):
    """The converted model, checked to hold the original's state dict under the same keys, both ways."""
    converted, report = resfast.convert(original)
    assert report.units == units, str(report)
    assert len(report.skipped) == skipped, str(report)
    converted.load_state_dict(original.state_dict(), strict=True)
    original.load_state_dict(converted.state_dict(), strict=True)
    return converted


def compare_outputs(ours, ref, inputs, training, output=lambda y: y):
    """Both models (float64) on the same inputs and output gradient: outputs,
    parameter gradients and buffers."""
    ours.train(training)
    ref.train(training)
    ys = []
    for model in (ref, ours):
        torch.manual_seed(0)
        ys.append(output(model(*inputs)))
    grad = torch.randn_like(ys[0])
    for y in ys:
        y.backward(grad)
    assert_close(ys[1], ys[0], torch.float64, "output", TOL)
    assert_param_grads_close(ours, ref, torch.float64, TOL)
    ref_buffers = dict(ref.named_buffers())
    for name, b in ours.named_buffers():
        assert torch.equal(b, ref_buffers[name]) or torch.allclose(b, ref_buffers[name], rtol=1e-12), name


# Deep randomised models with training-mode BatchNorm over batches of 2 (the
# last stages see 1x1 maps) amplify float64 rounding to about 1e-9.
TOL = 1e-8
TRAINING = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])


# ---------------------------------------------------------------- torchvision
@TRAINING
@pytest.mark.parametrize("name, units", [("resnet18", 9), ("resnext50_32x4d", 33), ("regnet_y_400mf", 16),
                                         ("efficientnet_b0", 15)])
def test_torchvision(name, units, training):
    """Post-activation blocks (bn1→relu→conv2), the stem's bn1→relu→maxpool,
    grouped and depthwise convolutions, chains across Conv2dNormActivation
    boundaries."""
    torch.manual_seed(0)
    original = randomize(getattr(torchvision.models, name)(num_classes=5)).double()
    converted = converted_copy(original, units)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)  # batch 4: the last stage's BatchNorms see 1x1 maps
    if name == "efficientnet_b0":  # stochastic depth and dropout: the same draws on both sides
        compare_outputs(converted, original, (x,), training)
    else:
        compare_models(converted, original, x, training, dtype=torch.float64, tol=TOL)


@TRAINING
def test_torchvision_mobilenet_v2_relu6(training):
    """Inverted residuals: BatchNorm → ReLU6 → depthwise and pointwise convolutions."""
    torch.manual_seed(0)
    original = randomize(torchvision.models.mobilenet_v2(num_classes=5)).double()
    converted = converted_copy(original, 33)
    compare_outputs(converted, original, (torch.randn(4, 3, 32, 32, dtype=torch.float64),), training)


# ---------------------------------------------------------------- timm
@TRAINING
@pytest.mark.parametrize("name, units", [("resnet26t", 19), ("resnetv2_50d_gn", 46), ("densenet121", 120),
                                         ("dla34", 14), ("regnetx_002", 26)])
def test_timm(name, units, training):
    """regnetx: chains across timm's ConvNormAct layers."""
    torch.manual_seed(0)
    original = randomize(timm.create_model(name, num_classes=5)).double()
    converted = converted_copy(original, units, skipped=4 if name == "resnetv2_50d_gn" else 0)
    if name == "densenet121":  # dense blocks on one buffer, transitions with the fused unit
        assert type(converted.features.denseblock1) is resfast.nn.DenseBlock
        assert type(converted.features.transition1) is resfast.nn.Transition
    compare_models(converted, original, torch.randn(4, 3, 32, 32, dtype=torch.float64), training,
                   dtype=torch.float64, tol=TOL)


# ---------------------------------------------------------------- diffusers
@TRAINING
def test_diffusers_unet2d(training):
    """ResnetBlock2D: norm1→SiLU→conv1 and norm2→SiLU→dropout(0)→conv2 with the
    time-embedding add before norm2, output_scale_factor, conv_shortcut."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    original = randomize(diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1)).double()
    converted = converted_copy(original, 16, skipped=1)
    inputs = (torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.tensor([10, 500]))
    compare_outputs(converted, original, inputs, training, output=lambda y: y.sample)


@TRAINING
def test_diffusers_autoencoder(training):
    """AutoencoderKL: its encoder's and decoder's ResnetBlock2Ds (no time
    embedding: temb is None) and the conv_norm_out → conv_act → conv_out tails."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    original = randomize(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32), norm_num_groups=8, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1)).double()
    converted = converted_copy(original, 22)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    compare_outputs(converted, original, (x,), training, output=lambda y: y.sample)


def test_diffusers_dropout_is_reported():
    pytest.importorskip("diffusers")
    from diffusers.models.resnet import ResnetBlock2D

    block = ResnetBlock2D(in_channels=16, out_channels=16, temb_channels=8, groups=8, dropout=0.1)
    _, report = resfast.convert(block)
    assert report.units == 1
    assert [s.original for s in report.skipped] == ["norm2 → nonlinearity → dropout → conv2"]
    assert "Dropout(p=0.1)" in report.skipped[0].reason


# ---------------------------------------------------------------- MONAI, segmentation_models_pytorch
@TRAINING
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_monai_segresnet(spatial_dims, training):
    """Pre-activation ResBlocks, GroupNorm(8) → ReLU → conv, on images and (MONAI's default) volumes."""
    monai = pytest.importorskip("monai")
    torch.manual_seed(0)
    original = randomize(monai.networks.nets.SegResNet(spatial_dims=spatial_dims, init_filters=8, in_channels=3,
                                                       out_channels=2)).double()
    converted = converted_copy(original, 25)
    x = torch.randn(2, 3, *([16] * spatial_dims), dtype=torch.float64)
    compare_models(converted, original, x, training, dtype=torch.float64, tol=TOL)


@TRAINING
def test_monai_basic_unet_max_pools(training):
    """InstanceNorm and LeakyReLU (not fused): only its max pools become resfast's."""
    monai = pytest.importorskip("monai")
    torch.manual_seed(0)
    original = randomize(monai.networks.nets.BasicUNet(spatial_dims=2, in_channels=3, out_channels=2,
                                                       features=(4, 4, 8, 8, 16, 4))).double()
    converted, report = resfast.convert(original)
    assert [r.replacement for r in report.replaced] == ["resfast MaxPool2d"] * 4, str(report)
    compare_models(converted, original, torch.randn(2, 3, 32, 32, dtype=torch.float64), training,
                   dtype=torch.float64, tol=TOL)


@TRAINING
def test_smp_unet(training):
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    original = randomize(smp.Unet("resnet18", encoder_weights=None, classes=2, decoder_channels=(32, 16, 16, 8, 8)))
    converted = converted_copy(original.double(), 13)
    compare_models(converted, original, torch.randn(2, 3, 32, 32, dtype=torch.float64), training,
                   dtype=torch.float64, tol=TOL)


def test_saved_ratio_is_measured_on_copies():
    original = torchvision.models.resnet18(num_classes=5)
    before = {k: v.clone() for k, v in original.state_dict().items()}
    converted, report = resfast.convert(original, example_inputs=torch.randn(2, 3, 32, 32))
    assert 0.5 < report.saved_ratio < 0.95
    assert "saved activations" in str(report)
    for k, v in original.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in converted.state_dict().items():
        assert torch.equal(v, before[k]), k
