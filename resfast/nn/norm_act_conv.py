"""BNReLUConv2d: the fused pre-activation unit as a drop-in module."""

import torch
from torch import nn

from resfast import ops

# The BatchNorm modules whose parameters and buffers the fused units use
# (SyncBatchNorm2d is an nn.BatchNorm2d).
BATCH_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


def batch_norm_args(bn: nn.BatchNorm2d, training: bool):
    """What nn.BatchNorm2d.forward passes to F.batch_norm (running statistics,
    weight, bias, whether to use batch statistics, momentum factor, eps), with
    its num_batches_tracked and cumulative-average bookkeeping. Call once per
    forward: it counts the batch."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = training or (bn.running_mean is None and bn.running_var is None)
    keep_running = not training or bn.track_running_stats
    return (bn.running_mean if keep_running else None, bn.running_var if keep_running else None,
            bn.weight, bn.bias, use_batch_stats, factor, bn.eps)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training-mode statistics are computed over every
    process of `process_group` (default: the world), as nn.SyncBatchNorm's
    are, and which, unlike nn.SyncBatchNorm, DistributedDataParallel accepts
    on the CPU. Inside the fused units it only holds parameters, buffers and
    the group; called on its own it normalises like nn.SyncBatchNorm."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not sync_process_group(self, self.training)[0]:
            return super().forward(x)
        mean, scale, shift, _ = batch_norm_affine(x, self, True)
        return ((x.to(mean.dtype) - mean[:, None, None]) * scale[:, None, None] + shift[:, None, None]).to(x.dtype)


def sync_process_group(bn: nn.Module, training: bool):
    """(True, bn's process group) when bn is an nn.SyncBatchNorm or
    SyncBatchNorm2d whose statistics are shared in this forward (training,
    more than one process), else (False, None): nn.SyncBatchNorm's own rule."""
    if isinstance(bn, (nn.SyncBatchNorm, SyncBatchNorm2d)) and training and \
            ops.sync_world_size(bn.process_group) > 1:
        return True, bn.process_group
    return False, None


def check_conv_module(conv: nn.Conv2d):
    if not isinstance(conv, nn.Conv2d) or type(conv).forward is not nn.Conv2d.forward:
        raise TypeError(f"conv: expected a plain nn.Conv2d, got {type(conv).__name__}")
    if conv.padding_mode != "zeros":
        raise ValueError(f"conv: expected padding_mode='zeros', got {conv.padding_mode!r}")


class NormActConvUnit(nn.Module):
    """Base of the fused norm -> act -> conv units: holds a normalisation
    module (attribute `norm_attr`) and an nn.Conv2d `conv`, whose parameters
    and buffers it uses as they are, so state dicts match the unfused modules.
    Subclasses set the class attributes below and define forward."""

    norm_attr: str  # the norm submodule's attribute (and state-dict) name
    norm_types: tuple  # the norm module types accepted
    norm_description: str  # the accepted types, in words, for errors
    channels_attr: str  # the norm module's attribute holding its channel count
    default_activation: str

    def _adopt(self, norm, conv, activation):
        if not isinstance(norm, self.norm_types):
            raise TypeError(f"{self.norm_attr}: expected {self.norm_description}, got {type(norm).__name__}")
        check_conv_module(conv)
        channels = getattr(norm, self.channels_attr)
        if channels != conv.in_channels:
            raise ValueError(f"{self.norm_attr}: expected {self.channels_attr} = conv.in_channels = "
                             f"{conv.in_channels}, got {channels}")
        ops.functional.check_activation(activation)
        setattr(self, self.norm_attr, norm)
        self.conv = conv
        self.activation = activation
        self._padding = ops.conv_padding(conv.padding, conv.kernel_size, conv.dilation)

    @classmethod
    def from_modules(cls, norm: nn.Module, conv: nn.Conv2d, activation: str | None = None):
        """A unit that takes over `norm` and `conv` (their parameters and
        buffers are shared, not copied); activation defaults to the class's."""
        unit = cls.__new__(cls)
        nn.Module.__init__(unit)
        unit._adopt(norm, conv, cls.default_activation if activation is None else activation)
        return unit

    def extra_repr(self):
        return f"activation={self.activation!r}"


class BNReLUConv2d(NormActConvUnit):
    """conv(relu(bn(x))) with the normalised activation never stored.

    Holds an `nn.BatchNorm2d` (`bn`) and an `nn.Conv2d` (`conv`) for their
    parameters and buffers, so state dicts match `nn.Sequential(bn, ReLU, conv)`
    keyed `bn.*` / `conv.*`; the forward runs one fused resfast op instead of
    calling them. `forward(x, residual=None)` adds `residual` to the output in
    the convolution's epilogue. With a `process_group` (or after
    `resfast.nn.convert_sync_batchnorm`) `bn` is a `SyncBatchNorm2d` and
    training-mode statistics are shared across the group's processes.
    """

    norm_attr, norm_types, channels_attr, default_activation = "bn", BATCH_NORMS, "num_features", "relu"
    norm_description = "an nn.BatchNorm2d or nn.SyncBatchNorm"

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=False,
                 eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, activation="relu", process_group=None,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if process_group is None:
            bn = nn.BatchNorm2d(in_channels, eps, momentum, affine, track_running_stats, **factory)
        else:
            bn = SyncBatchNorm2d(in_channels, eps, momentum, affine, track_running_stats, process_group, **factory)
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, **factory)
        self._adopt(bn, conv, activation)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        conv = self.conv
        if sync_process_group(self.bn, self.training)[0]:
            return norm_conv(x, batch_norm_affine(x, self.bn, self.training), conv, residual, self.activation)
        return ops.batch_norm_act_conv2d(x, *batch_norm_args(self.bn, self.training), conv.weight, conv.bias, conv.stride,
                                         self._padding, conv.dilation, conv.groups, self.activation, residual)


def norm_conv(x: torch.Tensor, affine: "ops.NormAffine", conv: nn.Conv2d, residual=None, activation="relu",
              output_stats=False):
    """conv(act(normalised x)) + residual, one fused op, with conv's
    parameters; with output_stats, also the output's per-channel (mean, var)
    from the epilogue: (y, (mean, var))."""
    out = ops.affine_act_conv2d(x, affine, conv.weight, conv.bias, residual, conv.stride,
                                ops.conv_padding(conv.padding, conv.kernel_size, conv.dilation), conv.dilation,
                                conv.groups, activation, output_stats=output_stats)
    return (out[0], out[1:]) if output_stats else out


def batch_norm_affine(x: torch.Tensor, bn: nn.Module, training: bool, batch_stats=None) -> "ops.NormAffine":
    """bn's normalisation of x (one statistics pass, or x's batch_stats when
    its producer computed them; running statistics updated), with statistics
    shared across processes when bn is a synced nn.SyncBatchNorm (which then
    gathers its own). Call once per forward: it counts the batch."""
    sync, group = sync_process_group(bn, training)
    running_mean, running_var, weight, bias, use_batch, factor, eps = batch_norm_args(bn, training)
    if sync:
        return ops.sync_batch_norm_affine(x, running_mean, running_var, weight, bias, factor, eps, group)
    return ops.batch_norm_affine(x, running_mean, running_var, weight, bias, use_batch, factor, eps,
                                 batch_stats=batch_stats)


def norm_affines(parts, norm: nn.Module, training: bool) -> list:
    """`norm` (an nn.BatchNorm2d, nn.SyncBatchNorm or nn.GroupNorm) of the channel concatenation
    of `parts`, as one NormAffine per part and without concatenating: BatchNorm
    statistics are per channel, GroupNorm's per group, and no group may
    straddle two parts. Running statistics are updated through views of the
    module's buffers; a BatchNorm counts the batch once."""
    widths = [p.shape[1] for p in parts]
    if isinstance(norm, BATCH_NORMS):
        channels = norm.num_features
    elif isinstance(norm, nn.GroupNorm):
        channels = norm.num_channels
    else:
        raise TypeError(f"norm: expected an nn.BatchNorm2d, nn.SyncBatchNorm or nn.GroupNorm, "
                        f"got {type(norm).__name__}")
    if sum(widths) != channels:
        raise ValueError(f"input: expected {channels} channels in all, got {widths}")
    starts = [sum(widths[:i]) for i in range(len(widths))]

    def part(t, start, width):
        return None if t is None else t[start:start + width]

    if isinstance(norm, BATCH_NORMS):
        sync, group = sync_process_group(norm, training)
        running_mean, running_var, weight, bias, use_batch, factor, eps = batch_norm_args(norm, training)
        if sync:
            return [ops.sync_batch_norm_affine(x, part(running_mean, s, w), part(running_var, s, w),
                                               part(weight, s, w), part(bias, s, w), factor, eps, group)
                    for x, s, w in zip(parts, starts, widths)]
        return [ops.batch_norm_affine(x, part(running_mean, s, w), part(running_var, s, w), part(weight, s, w),
                                      part(bias, s, w), use_batch, factor, eps)
                for x, s, w in zip(parts, starts, widths)]
    group_size = norm.num_channels // norm.num_groups
    if any(w % group_size for w in widths):
        raise ValueError(f"input: each part's channels {widths} must hold whole groups of {group_size} channels")
    return [ops.group_norm_affine(x, w // group_size, part(norm.weight, s, w), part(norm.bias, s, w), norm.eps)
            for x, s, w in zip(parts, starts, widths)]


def norm_conv_parts(parts, affines, conv: nn.Conv2d, activation, residual=None):
    """conv(act(normalised concatenation of parts)) + residual, never
    concatenated: each part is a slice of the convolution's input channels,
    and each partial sum reaches the next part's convolution as its residual,
    added in the epilogue."""
    if len(parts) > 1 and conv.groups != 1:
        raise ValueError(f"conv: a split input needs groups=1, got {conv.groups}")
    # One split, not a slice per part: the slices' backward would zero-fill
    # and copy a whole weight-sized gradient for each part.
    weights = conv.weight.split([x.shape[1] for x in parts], dim=1) if len(parts) > 1 else (conv.weight,)
    y = residual
    for i, (x, affine, weight) in enumerate(zip(parts, affines, weights)):
        bias = conv.bias if i == len(parts) - 1 else None
        y = ops.affine_act_conv2d(x, affine, weight, bias, y, conv.stride,
                                  ops.conv_padding(conv.padding, conv.kernel_size, conv.dilation), conv.dilation,
                                  conv.groups, activation)
    return y


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """nn.SyncBatchNorm.convert_sync_batchnorm for resfast models: every
    nn.BatchNorm2d and nn.SyncBatchNorm (exactly those types; subclasses with
    their own forward are left alone), inside the fused units too, becomes a
    SyncBatchNorm2d sharing its parameters and buffers, so training-mode
    statistics are computed over all processes of `process_group` (default:
    the world), under DistributedDataParallel on the CPU as well as on CUDA.
    Converts in place; returns the module (a new one if `module` itself is a
    BatchNorm)."""
    if type(module) in (nn.BatchNorm2d, nn.SyncBatchNorm):
        bn = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats, process_group, device="meta")
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(bn, name, getattr(module, name))
        return bn.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group))
    return module
