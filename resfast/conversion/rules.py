"""resfast.convert's block rules: known blocks that become resfast's own
modules (which do more than fuse each chain: a dense block on one buffer, a
pre-activation shared by two convolutions), and nn.GroupNorm and
nn.MaxPool2d on resfast's kernels. Each rule maps a module to a Replacement or returns None; a rule that
recognises a block it cannot map exactly raises Unsupported (reported), or
returns None when chain fusion (resfast.conversion.chains) covers it instead
(timm's pre-activation blocks)."""

import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from resfast.conversion.units import Unsupported
from resfast.nn import DenseBlock, GroupNorm, MaxPool2d, PreActBasicBlock, PreActBottleneck, Projection, Transition


@dataclass
class Replacement:
    """A rule's result: the module to put in place of the matched one, and
    what it replaced, as (name relative to the matched module, original
    description, new type) triples."""

    module: nn.Module
    parts: list


Rule = Callable[[nn.Module], Optional[Replacement]]


def _type_name(m):
    return type(m).__name__


def _is_plain_conv(m):
    return type(m) is nn.Conv2d and m.padding_mode == "zeros"


def _plain_batch_norm(norm, where):
    """timm's BatchNormAct2d with a ReLU as an nn.BatchNorm2d sharing its
    parameters and buffers (the fused units apply the ReLU)."""
    from timm.layers import BatchNormAct2d

    if type(norm) is not BatchNormAct2d:
        raise Unsupported(f"{where} is a {_type_name(norm)}, not timm's BatchNormAct2d")
    if type(norm.act) is not nn.ReLU or type(norm.drop) is not nn.Identity:
        raise Unsupported(f"{where} applies {_type_name(norm.act)} and {_type_name(norm.drop)}, not ReLU alone")
    bn = nn.BatchNorm2d(norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats,
                        device="meta", bias=norm.bias is not None)
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        setattr(bn, name, getattr(norm, name))
    return bn.train(norm.training)


def _timm_preact_block(block: nn.Module) -> Optional[Replacement]:
    """timm's ResNetV2 PreActBottleneck / PreActBasic with BatchNormAct2d(ReLU)
    norms and plain convolutions (resnetv2_50's conv_layer=create_conv2d,
    norm_layer=BatchNormAct2d) → resfast's PreActBottleneck / PreActBasicBlock.
    Other blocks (StdConv2d and GroupNormAct: the BiT models) are left to
    chain fusion."""
    try:
        return _timm_preact_as_resfast(block)
    except Unsupported:
        return None


def _timm_preact_as_resfast(block):
    try:
        from timm.layers import DropPath
        from timm.models import resnetv2 as timm_resnetv2
    except ImportError:
        return None
    kinds = {timm_resnetv2.PreActBottleneck: (PreActBottleneck, 3), timm_resnetv2.PreActBasic: (PreActBasicBlock, 2)}
    if type(block) not in kinds:
        return None
    cls, stages = kinds[type(block)]
    modules = {}
    for i in range(1, stages + 1):
        conv = getattr(block, f"conv{i}")
        if not _is_plain_conv(conv):
            raise Unsupported(f"conv{i} is a {_type_name(conv)}, not a plain nn.Conv2d")
        modules[f"norm{i}"] = _plain_batch_norm(getattr(block, f"norm{i}"), f"norm{i}")
        modules[f"conv{i}"] = conv
    downsample = block.downsample
    if downsample is not None:
        if type(downsample) is not timm_resnetv2.DownsampleConv or type(downsample.norm) is not nn.Identity or \
                not _is_plain_conv(downsample.conv):
            raise Unsupported(f"downsample is a {_type_name(downsample)} that is not a pre-activation 1x1 conv")
        downsample = Projection.from_conv(downsample.conv)
    if type(block.drop_path) is nn.Identity:
        rate = 0.0
    elif type(block.drop_path) is DropPath and block.drop_path.scale_by_keep:
        rate = float(block.drop_path.drop_prob)
    else:
        raise Unsupported(f"drop_path is a {_type_name(block.drop_path)} resfast does not reproduce")
    new = cls.from_modules(downsample, rate, **modules).train(block.training)
    return Replacement(new, [("", type(block).__name__, cls.__name__)])


def _adopt(new, old, names):
    """new with old's submodules `names` in place of its own (shared, not copied)."""
    for name in names:
        setattr(new, name, getattr(old, name))
    return new.train(old.training)


def _dense_geometry(conv1, conv2=None):
    """What resfast's DenseLayer / Transition assume of the convolutions:
    conv1 1x1, conv2 3x3 with padding 1, stride 1, no bias, no groups."""
    def shaped(conv, k, p):
        return (type(conv) is nn.Conv2d and conv.kernel_size == (k, k) and conv.stride == (1, 1)
                and conv.padding == (p, p) and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is None
                and conv.padding_mode == "zeros")
    return shaped(conv1, 1, 0) and (conv2 is None or shaped(conv2, 3, 1))


def _check_plain(module, names, where):
    for name in names:
        m = getattr(module, name)
        expected = nn.BatchNorm2d if name.startswith("norm") else nn.Conv2d
        if type(m) is not expected or (expected is nn.Conv2d and not _is_plain_conv(m)):
            raise Unsupported(f"{where}{name} is a {_type_name(m)}, not a plain {expected.__name__}")


def _torchvision_densenet(module: nn.Module) -> Optional[Replacement]:
    """torchvision's DenseNet _DenseBlock and _Transition → resfast's
    DenseBlock (one feature buffer, no torch.cat) and Transition (the fused
    BN→ReLU→conv1x1 unit and a pool that saves only shapes), holding the same
    modules."""
    try:
        from torchvision.models import densenet as tv
    except ImportError:
        return None
    layer_modules = ("norm1", "conv1", "norm2", "conv2")
    if type(module) is tv._DenseBlock:
        layers = list(module.values())
        for name, layer in module.items():
            if type(layer) is not tv._DenseLayer:
                raise Unsupported(f"{name} is a {_type_name(layer)}, not torchvision's _DenseLayer")
            _check_plain(layer, layer_modules, f"{name}.")
            if type(layer.relu1) is not nn.ReLU or type(layer.relu2) is not nn.ReLU:
                raise Unsupported(f"{name} uses another activation than ReLU")
            if not _dense_geometry(layer.conv1, layer.conv2):
                raise Unsupported(f"{name}'s convolutions are not DenseNet's 1x1 and 3x3 (stride 1, no bias)")
        first = layers[0]
        growth = first.conv2.out_channels
        if {layer.drop_rate for layer in layers} != {first.drop_rate} or first.conv1.out_channels % growth:
            raise Unsupported("layers differ in drop_rate or width")
        with torch.device("meta"):
            new = DenseBlock(len(layers), first.norm1.num_features, first.conv1.out_channels // growth, growth,
                             float(first.drop_rate))
        for (name, old), layer in zip(module.items(), new.children()):
            _adopt(layer, old, layer_modules)
        return Replacement(new.train(module.training), [("", "_DenseBlock", "DenseBlock")])
    if type(module) is tv._Transition:
        _check_plain(module, ("norm", "conv"), "")
        pool = module.pool
        if type(module.relu) is not nn.ReLU or type(pool) is not nn.AvgPool2d or pool.kernel_size not in (2, (2, 2)) \
                or pool.stride not in (2, (2, 2)) or pool.padding not in (0, (0, 0)) or pool.ceil_mode \
                or not _dense_geometry(module.conv):
            raise Unsupported("not BatchNorm → ReLU → conv1x1 → AvgPool2d(2, 2)")
        with torch.device("meta"):
            new = Transition(module.norm.num_features, module.conv.out_channels)
        return Replacement(_adopt(new, module, ("norm", "conv")), [("", "_Transition", "Transition")])
    return None


def _timm_densenet(module: nn.Module) -> Optional[Replacement]:
    """timm's DenseNet DenseBlock and DenseTransition with BatchNormAct2d(ReLU)
    norms → resfast's DenseBlock and Transition, as for torchvision's (the
    norms become nn.BatchNorm2ds sharing their parameters and buffers; the
    state-dict keys are the same). Other variants (another activation, an
    anti-aliasing pool) are left to chain fusion."""
    timm_densenet = sys.modules.get("timm.models.densenet")
    if timm_densenet is None or type(module) not in (timm_densenet.DenseBlock, timm_densenet.DenseTransition):
        return None
    try:
        if type(module) is timm_densenet.DenseTransition:
            pool = module.pool
            if not _dense_geometry(module.conv) or type(pool) is not nn.AvgPool2d or \
                    pool.kernel_size not in (2, (2, 2)) or pool.stride not in (2, (2, 2)) or \
                    pool.padding not in (0, (0, 0)) or pool.ceil_mode:
                return None
            norm = _plain_batch_norm(module.norm, "norm")
            with torch.device("meta"):
                new = Transition(norm.num_features, module.conv.out_channels)
            new.norm, new.conv = norm, module.conv
            return Replacement(new.train(module.training), [("", "DenseTransition", "Transition")])
        layers = list(module.values())
        if any(type(layer) is not timm_densenet.DenseLayer for layer in layers):
            return None
        first = layers[0]
        growth = first.conv2.out_channels
        if {layer.drop_rate for layer in layers} != {first.drop_rate} or first.conv1.out_channels % growth or \
                not all(_dense_geometry(layer.conv1, layer.conv2) for layer in layers):
            return None
        norms = [(_plain_batch_norm(layer.norm1, "norm1"), _plain_batch_norm(layer.norm2, "norm2"))
                 for layer in layers]
    except Unsupported:
        return None
    with torch.device("meta"):
        new = DenseBlock(len(layers), first.norm1.num_features, first.conv1.out_channels // growth, growth,
                         float(first.drop_rate))
    for old, layer, (norm1, norm2) in zip(layers, new.children(), norms):
        layer.norm1, layer.conv1, layer.norm2, layer.conv2 = norm1, old.conv1, norm2, old.conv2
    return Replacement(new.train(module.training), [("", "DenseBlock", "DenseBlock")])


def _group_norm(module: nn.Module) -> Optional[Replacement]:
    """nn.GroupNorm → resfast.nn.GroupNorm (a subclass with the same
    parameters), on resfast's kernels."""
    if type(module) is not nn.GroupNorm:
        return None
    with torch.device("meta"):
        new = GroupNorm(module.num_groups, module.num_channels, module.eps, module.affine)
    new.weight, new.bias = module.weight, module.bias
    return Replacement(new.train(module.training), [("", "GroupNorm", "resfast GroupNorm")])


def _max_pool(module: nn.Module) -> Optional[Replacement]:
    """nn.MaxPool2d (one no fused chain ends in) → resfast.nn.MaxPool2d: no
    indices kept for backward, resfast's NCHW CPU loop."""
    if type(module) is not nn.MaxPool2d or module.return_indices:
        return None
    new = MaxPool2d(module.kernel_size, module.stride, module.padding, module.dilation, ceil_mode=module.ceil_mode)
    return Replacement(new.train(module.training), [("", "MaxPool2d", "resfast MaxPool2d")])


RULES: list = [_timm_preact_block, _torchvision_densenet, _timm_densenet, _group_norm, _max_pool]
