"""Volumes: the 3-D fused units (BNReLUConv3d, GNActConv3d), GroupNorm on
5-D input and the 3-D U-Net against torch's BatchNorm3d / GroupNorm ->
activation -> Conv3d, NCDHW and channels_last_3d. The ops' own 5-D samples
are in tests/op_samples.py (every backend, gradcheck, opcheck)."""

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

import resfast
from resfast.bench.references import EagerUNet
from resfast.bench.timing import saved_activation_bytes
from utils import assert_within_twice_torch_error, compare_models, max_rel_error, randomize

CL3D = torch.channels_last_3d
ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "identity": nn.Identity}

# (in, out, kernel, stride, padding, groups, spatial): odd sizes; the 1x1x1
# case has enough positions for the CPU's chunked GEMM path.
CONVS = {
    "k3": (4, 6, 3, 1, 1, 1, (5, 7, 6)),
    "k1-chunked": (6, 5, 1, 1, 0, 1, (4, 5, 6)),
    "k3s2-g2": (4, 6, 3, 2, 1, 2, (7, 5, 6)),
}


def eager_twin(unit, norm_name, activation):
    """nn.Sequential(norm, act, conv) with the unit's state-dict keys."""
    norm = getattr(unit, norm_name)
    conv = unit.conv
    eager_norm = (nn.BatchNorm3d(norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats)
                  if norm_name == "bn" else nn.GroupNorm(norm.num_groups, norm.num_channels, norm.eps, norm.affine))
    eager_conv = nn.Conv3d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                           conv.dilation, conv.groups, conv.bias is not None)
    twin = nn.Sequential(OrderedDict([(norm_name, eager_norm), ("act", ACTIVATIONS[activation]()),
                                      ("conv", eager_conv)]))
    twin.load_state_dict(unit.state_dict(), strict=True)
    return twin


def bn_unit(case, activation="relu"):
    cin, cout, k, s, p, g, _ = CONVS[case]
    return randomize(resfast.nn.BNReLUConv3d(cin, cout, k, s, p, groups=g, bias=True, activation=activation))


def gn_unit(case, activation="silu"):
    cin, cout, k, s, p, g, _ = CONVS[case]
    return randomize(resfast.nn.GNActConv3d(cin, cout, k, s, p, groups=g, num_groups=2, activation=activation))


def volume(case, n=2, layout="ncdhw"):
    cin, *_, spatial = CONVS[case]
    x = torch.randn(n, cin, *spatial) * 1.5 + 0.3
    return x.contiguous(memory_format=CL3D) if layout == "cl" else x


@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(CONVS))
def test_bn_relu_conv3d_matches_torch(case, training, layout):
    unit = bn_unit(case)
    twin = eager_twin(unit, "bn", "relu").double()
    if layout == "cl":
        unit = unit.to(memory_format=CL3D)
    compare_models(unit, twin, volume(case, layout=layout), training)
    assert unit.bn.num_batches_tracked.item() == twin.bn.num_batches_tracked.item()


@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("case", list(CONVS))
def test_gn_act_conv3d_matches_torch(case, activation, layout):
    unit = gn_unit(case, activation)
    twin = eager_twin(unit, "norm", activation).double()
    compare_models(unit, twin, volume(case, layout=layout), training=True)


# Float32 rounding of sums over 10^4-10^5 terms: the floor of the twice-torch rule here.
FLOOR = 1e-5


@pytest.mark.parametrize("norm", ["bn", "norm"])
def test_odd_volume_within_twice_torch_float32_error(norm):
    """33x47x29, training, a dense output gradient: our float32 error against
    float64 torch at most twice torch's own float32 error."""
    unit = resfast.nn.BNReLUConv3d(4, 5, 3, padding=1) if norm == "bn" else \
        resfast.nn.GNActConv3d(4, 5, 3, padding=1, num_groups=2, activation="relu")
    randomize(unit)
    twin32 = eager_twin(unit, norm, "relu")
    twin64 = eager_twin(unit, norm, "relu").double()
    x = torch.randn(1, 4, 33, 47, 29) * 2 + 1
    g = torch.randn(1, 5, 33, 47, 29, dtype=torch.float64)
    results = []
    for model, dtype in ((unit, torch.float32), (twin32, torch.float32), (twin64, torch.float64)):
        xin = x.to(dtype, copy=True).requires_grad_()
        y = model(xin)
        y.backward(g.to(dtype))
        results.append([y.detach(), xin.grad, getattr(model, norm).weight.grad, model.conv.weight.grad])
    for name, ours, eager32, exact in zip(("output", "grad x", "grad norm weight", "grad conv weight"), *results):
        assert_within_twice_torch_error(ours, eager32, exact, name, FLOOR)


def test_units_save_only_their_input():
    """Training saves x (and per-channel vectors): not the normalised or
    activated volume, which eager's BatchNorm3d -> ReLU -> Conv3d keeps."""
    unit = bn_unit("k3").train()
    x = volume("k3", layout="cl")
    mine = saved_activation_bytes(unit, x)
    assert x.nbytes <= mine <= x.nbytes + 4096
    assert saved_activation_bytes(eager_twin(unit, "bn", "relu").train(), x) >= 2 * x.nbytes


def test_channels_last_3d_in_channels_last_3d_out():
    for unit in (bn_unit("k3"), gn_unit("k3s2-g2")):
        x = volume("k3" if isinstance(unit, resfast.nn.BNReLUConv3d) else "k3s2-g2", layout="cl")
        assert unit(x).is_contiguous(memory_format=CL3D)
        assert unit(x.contiguous()).is_contiguous()


@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
def test_group_norm_modules_on_volumes(layout):
    x = volume("k3", layout=layout).requires_grad_()
    for ours, eager in ((resfast.nn.GroupNorm(2, 4), nn.GroupNorm(2, 4)),
                        (resfast.nn.GroupNormAct(2, 4, activation="silu"), nn.Sequential(nn.GroupNorm(2, 4),
                                                                                         nn.SiLU()))):
        randomize(ours)
        eager.load_state_dict({k if isinstance(eager, nn.GroupNorm) else f"0.{k}": v
                               for k, v in ours.state_dict().items()})
        eager.double()
        x_ref = x.detach().double().requires_grad_()
        y, y_ref = ours(x), eager(x_ref)
        assert y.is_contiguous(memory_format=CL3D if layout == "cl" else torch.contiguous_format)
        assert max_rel_error(y.detach(), y_ref.detach()) < 1e-5
        g = torch.randn_like(y_ref)
        (grad,), (grad_ref,) = torch.autograd.grad(y, x, g.float()), torch.autograd.grad(y_ref, x_ref, g)
        assert max_rel_error(grad, grad_ref) < 1e-5


UNET = dict(in_channels=2, out_channels=3, widths=(8, 16, 32), num_groups=4, spatial_dims=3)


@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("norm,upsample", [("group", "transpose"), ("batch", "interpolate")])
def test_unet3d_matches_reference(norm, upsample, training, layout):
    cfg = dict(UNET, norm=norm, upsample=upsample)
    ref = randomize(EagerUNet(**cfg)).double()
    ours = resfast.models.UNet(**cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 2, 9, 12, 11)  # odd: padded upsampling
    if layout == "cl":
        ours, x = ours.to(memory_format=CL3D), x.contiguous(memory_format=CL3D)
    compare_models(ours, ref, x, training)
    y = ours(x)
    assert y.shape == (2, 3, 9, 12, 11)
    assert y.is_contiguous(memory_format=CL3D if layout == "cl" else torch.contiguous_format)


def test_unet3d_valid_padding_crops_like_the_original():
    cfg = dict(UNET, widths=(4, 8), padding="valid")
    ref = randomize(EagerUNet(**cfg)).double()
    ours = resfast.models.UNet(**cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 2, 28, 28, 28)
    compare_models(ours, ref, x, training=True)
    assert ours(x).shape == (1, 3, 10, 10, 10)  # 28 - 2 (stem) - 4 - 8 (pooled level) - 4


def test_unet3d_saved_activations_at_most_040x_eager():
    """The issue's model: a GroupNorm U-Net, widths 32-256, 4 levels (at 32^3
    here; the ratio does not depend on the size, the bench measures 64^3)."""
    cfg = dict(in_channels=1, out_channels=2, widths=(32, 64, 128, 256), num_groups=8, spatial_dims=3)
    ref = EagerUNet(**cfg)
    ours = resfast.models.UNet(**cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 1, 32, 32, 32)
    eager, mine = saved_activation_bytes(ref.train(), x), saved_activation_bytes(ours.train(), x)
    assert mine <= 0.40 * eager, f"resfast saved {mine / 2**20:.1f} MiB vs eager {eager / 2**20:.1f} MiB"


def test_bad_volume_inputs():
    unit = resfast.nn.BNReLUConv3d(4, 6, 3, padding=1)
    with pytest.raises(ValueError, match=r"x: expected a 5-D \(N, C, D, H, W\) tensor for BNReLUConv3d, got 4-D"):
        unit(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="x: expected 4 channels for GNActConv3d"):
        resfast.nn.GNActConv3d(4, 6, 3, num_groups=2)(torch.randn(2, 3, 5, 5, 5))
    with pytest.raises(TypeError, match="bn: expected an nn.BatchNorm3d"):
        resfast.nn.BNReLUConv3d.from_modules(nn.BatchNorm2d(4), nn.Conv3d(4, 4, 3))
    with pytest.raises(TypeError, match="conv: expected a plain nn.Conv3d"):
        resfast.nn.BNReLUConv3d.from_modules(nn.BatchNorm3d(4), nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match=r"x: expected a 5-D \(N, C, D, H, W\) tensor for a 3-D UNet"):
        resfast.models.UNet(**UNET)(torch.randn(1, 2, 8, 8))
    x, vec = torch.randn(2, 4, 5, 5, 5), torch.rand(4) + 0.5
    with pytest.raises(ValueError, match=r"weight: expected a 5-D \(out_channels, in_channels/groups, kD, kH, kW\)"):
        resfast.ops.norm_act_conv2d(x, vec, vec, vec, torch.randn(6, 4, 3, 3))
    with pytest.raises(ValueError, match="stride: expected three positive integers"):
        resfast.ops.norm_act_conv2d(x, vec, vec, vec, torch.randn(6, 4, 3, 3, 3), stride=(1, 1))
    with pytest.raises(ValueError, match="x: expected a 4-D .* or 5-D"):
        resfast.ops.norm_act_conv2d(torch.randn(2, 4, 5, 5, 5, 5), vec, vec, vec, torch.randn(6, 4, 3, 3, 3))
    with pytest.raises(ValueError, match="spatial_dims: expected 2"):
        resfast.models.UNet(spatial_dims=1)


def test_triton_engine_refuses_volumes():
    """The implicit-GEMM kernels are 2-D: forcing them on a 3-D call names why;
    the split engine runs it (its pointwise kernels and ATen's conv3d)."""
    pytest.importorskip("triton")
    import os
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("Triton kernels need a GPU or the interpreter")
    x, vec = volume("k3"), torch.rand(4) + 0.5
    weight = torch.randn(6, 4, 3, 3, 3)
    with resfast.backend("triton"):
        with resfast.ops.conv_impl("triton"), pytest.raises(ValueError, match="3-D convolution other than 1x1x1"):
            resfast.ops.norm_act_conv2d(x, vec, vec, vec, weight, padding=1)
        with resfast.ops.conv_impl("auto"):
            y = resfast.ops.norm_act_conv2d(x, vec, vec, vec, weight, padding=1)
    expected = resfast.ops.norm_act_conv2d(x, vec, vec, vec, weight, padding=1)
    assert max_rel_error(y, expected.double()) < 1e-5


class PlainUNet3d(nn.Module):
    """A 3-D U-Net as users write one with torch.nn: post-activation
    Conv3d → norm → ReLU blocks, torch.cat skips, a norm → ReLU → 1x1x1 head."""

    def __init__(self, norm="group", widths=(8, 16)):
        super().__init__()

        def norm_layer(c):
            return nn.GroupNorm(4, c) if norm == "group" else nn.BatchNorm3d(c)

        def block(cin, cout):
            return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1), norm_layer(cout), nn.ReLU(inplace=True),
                                 nn.Conv3d(cout, cout, 3, padding=1), norm_layer(cout), nn.ReLU(inplace=True))

        self.down = block(1, widths[0])
        self.bottom = block(widths[0], widths[1])
        self.up = nn.ConvTranspose3d(widths[1], widths[0], 2, stride=2)
        self.decode = block(2 * widths[0], widths[0])
        self.head = nn.Sequential(norm_layer(widths[0]), nn.ReLU(), nn.Conv3d(widths[0], 2, 1))

    def forward(self, x):
        skip = self.down(x)
        y = self.up(self.bottom(nn.functional.max_pool3d(skip, 2)))
        return self.head(self.decode(torch.cat([skip, y], 1)))


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_convert_plain_unet3d_within_twice_torch_float32_error(norm):
    """resfast.convert fuses each block's norm → ReLU → Conv3d and the head;
    converted in float32, outputs and gradients against the original in
    float64 at most twice the original's own float32 error."""
    torch.manual_seed(0)
    original = randomize(PlainUNet3d(norm))
    converted, report = resfast.convert(original)
    assert report.units == 4, str(report)
    converted.load_state_dict(original.state_dict(), strict=True)
    exact = copy.deepcopy(original).double()
    x = torch.randn(2, 1, 12, 10, 14)
    g = torch.randn(2, 2, 12, 10, 14, dtype=torch.float64)
    results = []
    for model, dtype in ((converted, torch.float32), (original, torch.float32), (exact, torch.float64)):
        xin = x.to(dtype, copy=True).requires_grad_()
        y = model.train()(xin)
        y.backward(g.to(dtype))
        results.append([y.detach(), xin.grad] + [p.grad for p in model.parameters()])
    names = ["output", "grad x"] + [f"grad {name}" for name, _ in original.named_parameters()]
    for name, ours, eager32, expected in zip(names, *results):
        assert_within_twice_torch_error(ours, eager32, expected, name, FLOOR)


def test_convert_monai_segresnet3d_saved_activations():
    """MONAI's SegResNet (3-D, its default): 25 fused GroupNorm → ReLU →
    Conv3d units. Each ResBlock keeps its input and its first convolution's
    output, the least a block whose two normalisations follow convolutions
    can keep without recomputing one: 0.55x the original's saved bytes."""
    monai = pytest.importorskip("monai")
    torch.manual_seed(0)
    original = randomize(monai.networks.nets.SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=2))
    converted, report = resfast.convert(original, example_inputs=torch.randn(1, 1, 32, 32, 32))
    assert report.units == 25 and not report.skipped, str(report)
    assert report.saved_ratio <= 0.56, str(report)


def test_convert_refuses_a_batch_norm_of_the_other_rank():
    """nn.BatchNorm2d rejects the 5-D input an nn.Conv3d takes: such a chain is
    reported, not fused into a unit that would accept it."""
    model = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv3d(4, 4, 3))
    converted, report = resfast.convert(model)
    assert report.units == 0
    assert [s.reason for s in report.skipped] == ["BatchNorm2d feeds a 3-D convolution Conv3d"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rank", [4, 5])
def test_backward_with_gradients_in_the_other_layout(rank, dtype):
    """The CPU backward converts between NC(D)HW and channels_last(_3d) in
    tiles (csrc/cpu/layout_copy.cpp): 2-, 4- and 8-byte elements, an output
    gradient in the other layout than x, odd sizes; against the reference."""
    spatial = (5, 7, 6)[-(rank - 2):]
    cl = torch.channels_last if rank == 4 else CL3D
    x = (torch.randn(2, 19, *spatial) * 1.5 + 0.3).to(dtype)  # 19 channels: a partial tile of 16
    weight = (torch.randn(17, 19, *([3] * (rank - 2))) * 0.1).to(dtype)
    mean, scale, shift = torch.randn(19).double(), torch.rand(19).double() + 0.5, torch.randn(19).double()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    args = [t.to(acc) for t in (mean, scale, shift)]
    stride = padding = dilation = [1] * (rank - 2)
    for x_layout, grad_layout in ((torch.contiguous_format, cl), (cl, torch.contiguous_format)):
        xin = x.contiguous(memory_format=x_layout)
        grad = torch.randn(2, 17, *spatial).to(dtype).contiguous(memory_format=grad_layout)
        call = (grad, xin, *args, weight, stride, padding, dilation, 1, "relu", None, [True, True])
        with resfast.backend("reference"):
            expected = torch.ops.resfast.norm_act_conv2d_backward(*[t.double() if isinstance(t, torch.Tensor) else t
                                                                   for t in call])
        actual = torch.ops.resfast.norm_act_conv2d_backward(*call)
        for name, a, e in zip(("grad x", "grad scale", "grad shift", "grad weight"), actual, expected):
            tol = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float64: 1e-12}[dtype]
            assert max_rel_error(a, e) < tol, f"{name}: {max_rel_error(a, e):.2e}"
        assert actual[0].is_contiguous(memory_format=x_layout)


def test_sync_batch_norm_for_volumes():
    """convert_sync_batchnorm gives volumes' BatchNorm3d a SyncBatchNorm3d
    (inside BNReLUConv3d too); with one process it normalises as before."""
    unit = bn_unit("k3")
    twin = eager_twin(unit, "bn", "relu")
    model = resfast.nn.convert_sync_batchnorm(nn.Sequential(unit, nn.BatchNorm3d(6)))
    assert type(model[0].bn) is resfast.nn.SyncBatchNorm3d and type(model[1]) is resfast.nn.SyncBatchNorm3d
    x = volume("k3")
    assert max_rel_error(model[0](x).detach(), twin.double()(x.double()).detach()) < 1e-5
    with pytest.raises(ValueError, match="expected 5D input"):
        model[1](torch.randn(2, 6, 4, 4))


def test_dense_block_rejects_volumes():
    with pytest.raises(ValueError, match=r"x: expected a 4-D \(N, C, H, W\) tensor for a dense block"):
        resfast.nn.DenseBlock(2, 4, 2, 4)(torch.randn(1, 4, 3, 3, 3))
    with pytest.raises(ValueError, match="input: expected 5-D parts for a 3-D block"):
        resfast.nn.PreActResBlock(4, 4, num_groups=2, spatial_dims=3)(torch.randn(1, 4, 6, 6))
