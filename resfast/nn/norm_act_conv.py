"""The fused norm -> activation -> conv unit as drop-in modules: the base
class, and BNReLUConv2d."""

import torch
from torch import nn

from resfast import ops
from resfast.activations import check_activation
from resfast.nn import batch_stats
from resfast.nn.batch_norm import BATCH_NORMS, SyncBatchNorm2d
from resfast.nn.norm_conv import batch_norm_conv, check_conv_module


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
        check_activation(activation)
        setattr(self, self.norm_attr, norm)
        self.conv = conv
        self.activation = activation
        ops.conv_padding(conv.padding, conv.kernel_size, conv.dilation)  # rejects an asymmetric 'same' now

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
        # In training, x's statistics from its producer when it handed them on (resfast.nn.batch_stats).
        x_stats = batch_stats.lookup(x) if self.training else None
        return batch_norm_conv(self.bn, self.conv, x, self.training, residual, self.activation, x_stats)
