"""DenseNet's modules (torchvision's _DenseLayer, _DenseBlock, _Transition)
with their parameter names, so state dicts load key for key; a dense block
runs as one fused function over a single preallocated feature buffer."""

import torch
import torch.nn.functional as F
from torch import nn

from resfast import ops
from resfast.nn.batch_norm import batch_norm_args, bn_affine, sync_process_group
from resfast.nn.members import child, tensor
from resfast.nn.norm_conv import batch_norm_conv, norm_conv


class DenseLayer(nn.Module):
    """BN -> ReLU -> conv1x1 (bn_size * growth_rate channels) -> BN -> ReLU ->
    conv3x3 (growth_rate channels) -> dropout. Run alone, it returns the new
    features of its input; inside a DenseBlock it writes them into the
    block's buffer instead."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int = 4, drop_rate: float = 0.0):
        super().__init__()
        width = bn_size * growth_rate
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.conv1 = nn.Conv2d(num_input_features, width, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = batch_norm_conv(self.norm1, self.conv1, x, self.training)
        y = batch_norm_conv(self.norm2, self.conv2, y, self.training)
        return F.dropout(y, self.drop_rate, self.training) if self.drop_rate > 0 else y

    def params(self, use_batch_stats: bool) -> "ops.DenseLayerParams":
        norm1, norm2 = child(self, "norm1"), child(self, "norm2")
        conv1_weight, conv2_weight = tensor(child(self, "conv1"), "weight"), tensor(child(self, "conv2"), "weight")
        running = () if use_batch_stats else (tensor(norm1, "running_mean"), tensor(norm1, "running_var"),
                                              tensor(norm2, "running_mean"), tensor(norm2, "running_var"))
        return ops.DenseLayerParams(*_affine(norm1, conv1_weight), conv1_weight, *_affine(norm2, conv2_weight),
                                    conv2_weight, *running)


def _affine(bn: nn.BatchNorm2d, like: torch.Tensor):
    """bn's (weight, bias), with the identity's ones and zeros where bn has
    none (affine=False, bias=False): the dense block op takes both."""
    def vector(t, value):
        return torch.full((bn.num_features,), value, dtype=like.dtype, device=like.device) if t is None else t
    return vector(tensor(bn, "weight"), 1.0), vector(tensor(bn, "bias"), 0.0)


class DenseBlock(nn.Module):
    """num_layers DenseLayers, each adding growth_rate channels; returns the
    concatenation [x, new_1, ..., new_L], built in place in one buffer
    (no torch.cat, no copies of the layers' outputs). Parameters and buffers
    are named like torchvision's (`denselayer1.norm1.weight`, ...)."""

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int = 4, growth_rate: int = 32,
                 drop_rate: float = 0.0):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers: expected a positive number of layers, got {num_layers}")
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}",
                            DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Each layer as it stands, perhaps wrapped (a checkpoint wrapper forwards attribute reads).
        layers = list(self.children())
        norms = [bn for layer in layers for bn in (layer.norm1, layer.norm2)]
        # torch's bookkeeping per BatchNorm (counts the batch, momentum=None).
        args = [batch_norm_args(bn, self.training) for bn in norms]
        use_batch = {a[4] for a in args}
        if len(use_batch) != 1:
            raise ValueError("DenseBlock: all BatchNorms of a block must use batch statistics alike (same "
                             "training mode and track_running_stats)")
        use_batch_stats = use_batch.pop()
        groups = {sync_process_group(bn, self.training) for bn in norms}
        if len(groups) != 1:
            raise ValueError("DenseBlock: all BatchNorms of a block must be synchronised alike (same type and "
                             "process group)")
        sync, group = groups.pop()
        buf, stats = ops.dense_block(
            x, [layer.params(use_batch_stats) for layer in layers], use_batch_stats,
            [norm.eps for norm in norms[0::2]], [norm.eps for norm in norms[1::2]],
            layers[0].drop_rate, self.training, group, sync)
        if stats is not None and self.training:
            count = stats.count
            growth = layers[0].conv2.out_channels
            # Each norm's batch statistics, in the order of `norms`: norm1 over the first c_in buffer channels.
            batch = [pair for i in range(len(layers)) for pair in (
                (stats.mean[:x.shape[1] + i * growth], stats.var[:x.shape[1] + i * growth]),
                (stats.bottleneck_mean[i], stats.bottleneck_var[i]))]
            for (running_mean, running_var, *_, factor, _), (mean, var) in zip(args, batch):
                if running_mean is not None:
                    ops.update_running_stats(running_mean, running_var, mean, var, count, factor)
        return buf


class _AvgPool2x2(torch.autograd.Function):
    """F.avg_pool2d(y, 2), saving only y's shape and layout for backward
    (autograd's avg_pool2d keeps y itself alive)."""

    @staticmethod
    def forward(ctx, y):
        ctx.shape, ctx.format = y.shape, ops.kernel_format(y)
        return F.avg_pool2d(y, 2)

    @staticmethod
    def backward(ctx, grad):
        # avg_pool2d_backward reads only its `self` argument's shape and layout.
        like = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.format)
        return torch.ops.aten.avg_pool2d_backward(grad, like, [2, 2], [2, 2], [0, 0], False, True, None)


class Transition(nn.Module):
    """BN -> ReLU -> conv1x1 -> 2x2 average pool: the fused unit, then a pool
    that keeps nothing but shapes for backward. Only the input is saved.

    (The 1x1 convolution and the pool are both linear, so together they are
    one 2x2, stride-2 convolution, which an earlier version ran; but ATen's
    CPU convolution takes 2.6x longer for it, forward and backward, over
    DenseNet-264's three transitions at 224x224.)"""

    def __init__(self, num_input_features: int, num_output_features: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm, conv = child(self, "norm"), child(self, "conv")
        return _AvgPool2x2.apply(norm_conv(x, bn_affine(norm, x, self.training), conv))
