"""Plain torch.nn models with the module trees of resfast's, the eager
baselines of the benchmark (and the references of the tests): separate norm,
activation and convolution modules, skips joined with torch.cat."""

import torch
import torch.nn.functional as F
from torch import nn

from resfast.models.unet import DecoderLevel, Upsample
from resfast.nn.preact_res_block import CONVS, make_norm

ACT = {"batch": F.relu, "group": F.silu}


class EagerResBlock(nn.Module):
    def __init__(self, in_chs, out_chs, norm, num_groups, padding, parts=1, spatial_dims=2):
        super().__init__()
        conv = CONVS[spatial_dims]
        self.norm1 = make_norm(norm, in_chs, num_groups, spatial_dims=spatial_dims)
        self.conv1 = conv(in_chs, out_chs, 3, padding=padding, bias=False)
        self.norm2 = make_norm(norm, out_chs, num_groups, spatial_dims=spatial_dims)
        self.conv2 = conv(out_chs, out_chs, 3, padding=padding, bias=False)
        project = in_chs != out_chs or parts > 1
        self.downsample = conv(in_chs, out_chs, 1, bias=False) if project else None
        self.act, self.crop = ACT[norm], 2 if padding == "valid" else 0

    def forward(self, *parts):
        x = torch.cat(parts, 1)
        a = self.act(self.norm1(x))
        shortcut = x if self.downsample is None else self.downsample(a)
        if self.crop:
            shortcut = shortcut[(slice(None), slice(None)) + (slice(2, -2),) * (x.dim() - 2)]
        return self.conv2(self.act(self.norm2(self.conv1(a)))) + shortcut


class EagerDecoderLevel(DecoderLevel):
    """DecoderLevel's forward with an eager block that concatenates."""

    def __init__(self, in_chs, out_chs, norm, num_groups, upsample, padding, spatial_dims=2):
        nn.Module.__init__(self)
        self.up = Upsample(in_chs, out_chs, upsample, spatial_dims=spatial_dims)  # plain torch.nn modules
        self.block = EagerResBlock(2 * out_chs, out_chs, norm, num_groups, padding, parts=2, spatial_dims=spatial_dims)
        self.valid = padding == "valid"


class EagerHead(nn.Module):
    def __init__(self, in_chs, out_chs, norm, num_groups, spatial_dims=2):
        super().__init__()
        self.norm = make_norm(norm, in_chs, num_groups, spatial_dims=spatial_dims)
        self.conv, self.act = CONVS[spatial_dims](in_chs, out_chs, 1), ACT[norm]

    def forward(self, x):
        return self.conv(self.act(self.norm(x)))


class EagerUNet(nn.Module):
    """resfast.models.UNet's eager twin: same arguments, same state_dict."""

    def __init__(self, in_channels=3, out_channels=1, widths=(64, 128, 256, 512, 1024), norm="group", num_groups=32,
                 upsample="transpose", padding="same", spatial_dims=2):
        super().__init__()
        self.stem = CONVS[spatial_dims](in_channels, widths[0], 3, padding=padding, bias=False)
        self.encoder = nn.ModuleList(EagerResBlock(widths[max(i - 1, 0)], w, norm, num_groups, padding,
                                                   spatial_dims=spatial_dims)
                                     for i, w in enumerate(widths))
        self.decoder = nn.ModuleList(EagerDecoderLevel(widths[i + 1], widths[i], norm, num_groups, upsample, padding,
                                                       spatial_dims)
                                     for i in reversed(range(len(widths) - 1)))
        self.head = EagerHead(widths[0], out_channels, norm, num_groups, spatial_dims)
        self.pool = F.max_pool2d if spatial_dims == 2 else F.max_pool3d

    def forward(self, x):
        x = self.stem(x)
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(self.pool(x, 2) if i else x)
            skips.append(x)
        skips.pop()
        for level in self.decoder:
            x = level(x, skips.pop())
        return self.head(x)
