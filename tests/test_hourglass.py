"""Stacked hourglass against a plain torch.nn reference with the same module
tree (timm's pre-activation bottlenecks, nn.BatchNorm2d/ReLU/Conv2d heads)."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, create_conv2d
from timm.models.resnetv2 import DownsampleConv, PreActBottleneck
from torch import nn

import resfast
from conftest import available_backends
from utils import compare_models, randomize

BACKENDS = [b for b in available_backends() if b[0] != "triton"]


def ref_residual(in_chs, out_chs):
    proj = partial(DownsampleConv, preact=True) if in_chs != out_chs else None
    return PreActBottleneck(in_chs, out_chs, bottle_ratio=0.5, conv_layer=create_conv2d, norm_layer=BatchNormAct2d,
                            proj_layer=proj)


def ref_residuals(chs, count):
    return nn.Sequential(*(ref_residual(chs, chs) for _ in range(count)))


class RefStem(nn.Module):
    def __init__(self, in_chans, channels):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
        self.res1, self.res2, self.res3 = ref_residual(64, 128), ref_residual(128, 128), ref_residual(128, channels)

    def forward(self, x):
        x = F.max_pool2d(self.res1(self.conv(x)), 2, ceil_mode=True)
        return self.res3(self.res2(x))


class RefHourglass(nn.Module):
    def __init__(self, depth, channels, num_blocks):
        super().__init__()
        self.skip = ref_residuals(channels, num_blocks)
        self.down = ref_residuals(channels, num_blocks)
        self.inner = RefHourglass(depth - 1, channels, num_blocks) if depth > 1 else ref_residuals(channels, num_blocks)
        self.up = ref_residuals(channels, num_blocks)

    def forward(self, x):
        low = self.up(self.inner(self.down(F.max_pool2d(x, 2, ceil_mode=True))))
        return self.skip(x) + F.interpolate(low, size=x.shape[-2:], mode="nearest")


class RefUnit(nn.Module):
    def __init__(self, in_chs, out_chs):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(in_chs), nn.Conv2d(in_chs, out_chs, 1, bias=False)

    def forward(self, x):
        return self.conv(F.relu(self.bn(x)))


class RefHead(nn.Module):
    def __init__(self, channels, num_joints, remap):
        super().__init__()
        self.fc = RefUnit(channels, channels)
        self.norm = nn.BatchNorm2d(channels)
        self.score = nn.Conv2d(channels, num_joints, 1)
        self.fc_remap = nn.Conv2d(channels, channels, 1) if remap else None
        self.score_remap = nn.Conv2d(num_joints, channels, 1) if remap else None

    def forward(self, x, y):
        a = F.relu(self.norm(self.fc(y)))
        heatmaps = self.score(a)
        if self.fc_remap is None:
            return heatmaps, None
        return heatmaps, x + self.fc_remap(a) + self.score_remap(heatmaps)


class RefStackedHourglass(nn.Module):
    def __init__(self, num_stacks, channels, num_joints, depth, num_blocks=1, in_chans=3):
        super().__init__()
        self.stem = RefStem(in_chans, channels)
        self.hourglasses = nn.ModuleList(RefHourglass(depth, channels, num_blocks) for _ in range(num_stacks))
        self.features = nn.ModuleList(ref_residuals(channels, num_blocks) for _ in range(num_stacks))
        self.heads = nn.ModuleList(RefHead(channels, num_joints, i < num_stacks - 1) for i in range(num_stacks))

    def forward(self, x):
        x = self.stem(x)
        outs = []
        for hourglass, features, head in zip(self.hourglasses, self.features, self.heads):
            out, x = head(x, features(hourglass(x)))
            outs.append(out)
        return outs


SMALL = dict(num_stacks=2, channels=32, num_joints=5, depth=2)


def pair(**cfg):
    ref = randomize(RefStackedHourglass(**cfg)).double()
    ours = resfast.models.StackedHourglass(**cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_small_hourglass_matches_reference(backend, device, training, channels_last):
    ours, ref = pair(**SMALL)
    x = torch.randn(2, 3, 36, 44)
    if channels_last:
        ours = ours.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    compare_models(ours.to(device), ref, x.to(device), training, backend)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_odd_input_size(training):
    """97x131: every pool rounds up and every upsampling returns to the skip's size."""
    ours, ref = pair(num_stacks=2, channels=16, num_joints=3, depth=3)
    x = torch.randn(1, 3, 97, 131)
    compare_models(ours, ref, x, training)
    heatmaps = ours(x)
    assert [tuple(h.shape) for h in heatmaps] == [(1, 3, 25, 33)] * 2


def test_channels_last_in_channels_last_out():
    ours = resfast.models.StackedHourglass(num_stacks=1, channels=16, num_joints=3, depth=2)
    ours = ours.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    (heatmaps,) = ours(x)
    assert heatmaps.is_contiguous(memory_format=torch.channels_last)


def test_default_config_structure():
    model = resfast.models.StackedHourglass()
    assert len(model.hourglasses) == 8 and len(model.heads) == 8
    assert model.heads[-1].fc_remap is None and model.heads[0].fc_remap is not None
    ref = RefStackedHourglass(8, 256, 16, 4)
    model.load_state_dict(ref.state_dict(), strict=True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_stacks=0), "num_stacks"),
    (dict(channels=33), "channels"),
    (dict(depth=0), "depth"),
    (dict(num_joints=2.5), "num_joints"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resfast.models.StackedHourglass(**kwargs)
