"""The fused norm -> activation -> conv unit as drop-in modules: the base
class, BNReLUConv2d and BNReLUConv3d."""

import torch
from torch import nn

from resfast import ops
from resfast.activations import check_activation
from resfast.nn import batch_stats
from resfast.nn.members import child
from resfast.nn.batch_norm import BATCH_NORMS, BATCH_NORMS_3D, SyncBatchNorm2d, SyncBatchNorm3d
from resfast.nn.norm_conv import batch_norm_conv, check_conv_module


class NormActConvUnit(nn.Module):
    """Base of the fused norm -> act -> conv units: holds a normalisation
    module (attribute `norm_attr`) and a convolution `conv` (an nn.Conv2d, or
    an nn.Conv3d in the 3-D units), whose parameters and buffers it uses as
    they are, so state dicts match the unfused modules. Subclasses set the
    class attributes below and define forward."""

    norm_attr: str  # the norm submodule's attribute (and state-dict) name
    norm_types: tuple  # the norm module types accepted
    norm_description: str  # the accepted types, in words, for errors
    channels_attr: str  # the norm module's attribute holding its channel count
    default_activation: str
    conv_type: type = nn.Conv2d

    def _adopt(self, norm, conv, activation):
        if not isinstance(norm, self.norm_types):
            raise TypeError(f"{self.norm_attr}: expected {self.norm_description}, got {type(norm).__name__}")
        check_conv_module(conv, self.conv_type)
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
    def from_modules(cls, norm: nn.Module, conv: nn.Module, activation: str | None = None):
        """A unit that takes over `norm` and `conv` (their parameters and
        buffers are shared, not copied); activation defaults to the class's."""
        unit = cls.__new__(cls)
        nn.Module.__init__(unit)
        unit._adopt(norm, conv, cls.default_activation if activation is None else activation)
        return unit

    def check_input(self, x, conv):
        """x has the rank and channels the convolution `conv` (self's) takes:
        named as x's fault, not as a weight error from the op."""
        if not isinstance(x, torch.Tensor):
            return  # the ops name it
        dims = 4 if self.conv_type is nn.Conv2d else 5
        if x.dim() != dims:
            layout = "(N, C, H, W)" if dims == 4 else "(N, C, D, H, W)"
            raise ValueError(f"x: expected a {dims}-D {layout} tensor for {type(self).__name__}, got {x.dim()}-D "
                             f"with shape {tuple(x.shape)}")
        if x.shape[1] != conv.in_channels:
            raise ValueError(f"x: expected {conv.in_channels} channels for {type(self).__name__}, got shape "
                             f"{tuple(x.shape)}")

    def extra_repr(self):
        return f"activation={self.activation!r}"


class _BatchNormActConv(NormActConvUnit):
    """The BatchNorm units of both ranks: construction and forward."""

    norm_attr, channels_attr, default_activation = "bn", "num_features", "relu"

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=False,
                 eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, activation="relu", process_group=None,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        bn = self._batch_norm(in_channels, eps, momentum, affine, track_running_stats, process_group, factory)
        conv = self.conv_type(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                              **factory)
        self._adopt(bn, conv, activation)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        conv = child(self, "conv")
        self.check_input(x, conv)
        training = self.training
        # In training, x's statistics from its producer when it handed them on (resfast.nn.batch_stats).
        x_stats = batch_stats.lookup(x) if training else None
        return batch_norm_conv(child(self, "bn"), conv, x, training, residual, self.activation, x_stats)


class BNReLUConv2d(_BatchNormActConv):
    """conv(relu(bn(x))) with the normalised activation never stored.

    Holds an `nn.BatchNorm2d` (`bn`) and an `nn.Conv2d` (`conv`) for their
    parameters and buffers, so state dicts match `nn.Sequential(bn, ReLU, conv)`
    keyed `bn.*` / `conv.*`; the forward runs one fused resfast op instead of
    calling them. `forward(x, residual=None)` adds `residual` to the output in
    the convolution's epilogue. With a `process_group` (or after
    `resfast.nn.convert_sync_batchnorm`) `bn` is a `SyncBatchNorm2d` and
    training-mode statistics are shared across the group's processes.
    """

    norm_types, norm_description = BATCH_NORMS, "an nn.BatchNorm2d or nn.SyncBatchNorm"

    @staticmethod
    def _batch_norm(channels, eps, momentum, affine, track_running_stats, process_group, factory):
        if process_group is None:
            return nn.BatchNorm2d(channels, eps, momentum, affine, track_running_stats, **factory)
        return SyncBatchNorm2d(channels, eps, momentum, affine, track_running_stats, process_group, **factory)


class BNReLUConv3d(_BatchNormActConv):
    """BNReLUConv2d for volumes: conv3d(relu(bn(x))) on 5-D (N, C, D, H, W)
    input, NCDHW or channels_last_3d, with an `nn.BatchNorm3d` (`bn`; a
    `SyncBatchNorm3d` with a `process_group`) and an `nn.Conv3d` (`conv`),
    state dicts as `nn.Sequential(bn, ReLU, conv)`."""

    norm_types, norm_description = BATCH_NORMS_3D, "an nn.BatchNorm3d or nn.SyncBatchNorm"
    conv_type = nn.Conv3d

    @staticmethod
    def _batch_norm(channels, eps, momentum, affine, track_running_stats, process_group, factory):
        if process_group is None:
            return nn.BatchNorm3d(channels, eps, momentum, affine, track_running_stats, **factory)
        return SyncBatchNorm3d(channels, eps, momentum, affine, track_running_stats, process_group, **factory)
