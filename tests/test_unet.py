"""U-Net against a plain torch.nn reference with the same module tree
(resfast.bench.references.EagerUNet), which concatenates its skips with
torch.cat and runs norm, activation and conv as separate modules."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import resfast
from conftest import available_backends
from resfast.bench.timing import saved_activation_bytes
from resfast.bench.references import EagerUNet as RefUNet
from utils import compare_models, randomize

BACKENDS = [b for b in available_backends() if b[0] != "triton"]
SMALL = dict(in_channels=3, out_channels=2, widths=(8, 16, 32), num_groups=4)


def pair(**cfg):
    ref = randomize(RefUNet(**cfg)).double()
    ours = resfast.models.UNet(**cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("norm,upsample", [("group", "transpose"), ("batch", "interpolate")])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_small_unet_matches_reference(backend, device, norm, upsample, training, channels_last):
    ours, ref = pair(**SMALL, norm=norm, upsample=upsample)
    x = torch.randn(2, 3, 20, 24)
    if channels_last:
        ours = ours.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    compare_models(ours.to(device), ref, x.to(device), training, backend)


@pytest.mark.parametrize("norm,upsample", [("group", "transpose"), ("batch", "transpose"), ("group", "interpolate")])
def test_odd_input_size_gives_same_size_output(norm, upsample):
    ours, ref = pair(in_channels=3, out_channels=3, widths=(8, 16, 16, 32), num_groups=4, norm=norm,
                     upsample=upsample)
    x = torch.randn(1, 3, 97, 131)
    compare_models(ours, ref, x, training=True)
    assert ours(x).shape == (1, 3, 97, 131)


def test_valid_padding_crops_like_the_original():
    ours, ref = pair(**SMALL, padding="valid")
    x = torch.randn(1, 3, 92, 92)
    compare_models(ours, ref, x, training=True)
    assert ours(x).shape == (1, 2, 48, 48)


def test_channels_last_in_channels_last_out():
    ours = resfast.models.UNet(**SMALL).to(memory_format=torch.channels_last)
    y = ours(torch.randn(2, 3, 17, 19).contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last) and y.shape == (2, 2, 17, 19)


class FeatureMapCats(TorchDispatchMode):
    """Records the shapes of the cat results that are feature maps: not
    shaped like one of `parameters` (a split weight's gradient is assembled
    by a cat), nor vectors (a concatenation's per-channel statistics)."""

    def __init__(self, parameters):
        super().__init__()
        self.parameter_shapes = {tuple(p.shape) for p in parameters}
        self.cats = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ == "cat" and out.dim() > 2 and tuple(out.shape) not in self.parameter_shapes:
            self.cats.append(tuple(out.shape))
        return out


def test_skips_are_never_concatenated_where_larger_than_the_weight():
    """Forward and backward run without concatenating feature maps at levels
    whose maps outweigh their convolution's weight (the reference, which
    concatenates everywhere, proves the detector sees one)."""
    ours, ref = pair(**SMALL)
    x = torch.randn(2, 3, 20, 24, requires_grad=True)
    for model, expect_cat in ((ref.float(), True), (ours, False)):
        with FeatureMapCats(model.parameters()) as seen:
            model.train()(x).sum().backward()
        assert bool(seen.cats) == expect_cat, seen.cats


# Widths and a size at which the deepest decoder level's maps (1x32x8x8) are
# smaller than its 3x3 weight (16x32x3x3) and are concatenated; the level
# above (1x16x16x16 against 8x16x3x3) keeps its parts.
JOINING = dict(in_channels=3, out_channels=2, widths=(8, 16, 64), num_groups=4)


def test_small_maps_are_concatenated_once_per_block():
    ours, _ = pair(**JOINING)
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    with FeatureMapCats(ours.parameters()) as seen:
        ours.train()(x).sum().backward()
    assert seen.cats == [(1, 32, 8, 8)]
    with FeatureMapCats(ours.parameters()) as seen, torch.no_grad():
        ours(x)
    assert sorted(seen.cats) == [(1, 16, 16, 16), (1, 32, 8, 8)]  # without autograd, every level


@pytest.mark.parametrize("norm", ["group", "batch"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_concatenated_levels_match_reference(norm, training):
    ours, ref = pair(**JOINING, norm=norm)
    x = torch.randn(1, 3, 16, 16)
    compare_models(ours, ref, x, training)
    with torch.no_grad():
        y, y_ref = ours(x), ref(x.double())
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("norm", ["group", "batch"])
def test_activation_memory_at_most_06x_reference(norm, channels_last):
    cfg = dict(in_channels=3, out_channels=2, widths=(16, 32, 64, 128), num_groups=8, norm=norm)
    ours, ref = pair(**cfg)
    x = torch.randn(2, 3, 64, 64)
    if channels_last:
        ours, ref = ours.to(memory_format=torch.channels_last), ref.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    theirs = saved_activation_bytes(ref.float().train(), x)
    mine = saved_activation_bytes(ours.train(), x)
    assert mine <= 0.6 * theirs, f"resfast saved {mine / 2**20:.2f} MiB vs reference {theirs / 2**20:.2f} MiB"


def test_default_config_is_the_classic_unet():
    model = resfast.models.UNet()
    assert [b.conv2.out_channels for b in model.encoder] == [64, 128, 256, 512, 1024]
    assert [lvl.block.conv2.out_channels for lvl in model.decoder] == [512, 256, 128, 64]
    model.load_state_dict(RefUNet(3, 1, (64, 128, 256, 512, 1024)).state_dict(), strict=True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(widths=(8,)), "widths"),
    (dict(norm="layer"), "norm"),
    (dict(upsample="pixelshuffle"), "upsample"),
    (dict(padding="reflect"), "padding"),
    (dict(widths=(8, 12), num_groups=8), "num_groups"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resfast.models.UNet(**kwargs)


def test_block_rejects_wrong_parts():
    block = resfast.nn.PreActResBlock((4, 4), 4, num_groups=2)
    with pytest.raises(ValueError, match="input: expected parts of"):
        block(torch.randn(1, 4, 5, 5))


def test_block_rejects_groups_straddling_its_parts():
    """At construction, whether or not a forward would concatenate the parts."""
    with pytest.raises(ValueError, match="in_chs: each part's channels"):
        resfast.nn.PreActResBlock((8, 8), 8, num_groups=1)
    with pytest.raises(ValueError, match="in_chs: each part's channels"):
        resfast.models.UNet(in_channels=3, out_channels=2, widths=(8, 16, 64), num_groups=1)
