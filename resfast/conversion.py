"""resfast.convert (defined here, in resfast.conversion): swap recognised patterns of an existing model for resfast's
fused modules, carrying over the same parameters and buffers.

A rule is a function `rule(module) -> Replacement | None`, tried on every
module, outermost first, in the order of RULES; the first that returns a
Replacement wins and its result is not searched further. A rule that
recognises a pattern it cannot map exactly raises `Unsupported(reason)`: the
module is left as it is and the reason reported. To support a new pattern,
write one such function and add it to RULES (`register_rule`).
"""

import copy
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from resfast.nn import BNReLUConv2d, DenseBlock, GroupNorm, PreActBasicBlock, PreActBottleneck, Projection, Transition


class Unsupported(Exception):
    """A recognised pattern that cannot be converted exactly; the message says why."""


@dataclass
class Replaced:
    """`name` (qualified, "" for the model itself), of type `original`, became `replacement`."""

    name: str
    original: str
    replacement: str


@dataclass
class Skipped:
    name: str
    original: str
    reason: str


@dataclass
class Report:
    """What resfast.convert did: `replaced` lists each replacement, `skipped`
    each recognised pattern left unconverted, with the reason."""

    replaced: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def __str__(self):
        lines = [f"replaced {len(self.replaced)} module(s)"]
        lines += [f"  {r.name or '<model>'}: {r.original} -> {r.replacement}" for r in self.replaced]
        if self.skipped:
            lines.append(f"left {len(self.skipped)} recognised module(s) unconverted")
            lines += [f"  {s.name or '<model>'}: {s.original} ({s.reason})" for s in self.skipped]
        return "\n".join(lines)


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


# ---------------------------------------------------------------- rules
def _is_plain_conv(m):
    return type(m) is nn.Conv2d and m.padding_mode == "zeros"


def _bn_relu_conv_chains(seq: nn.Module) -> Optional[Replacement]:
    """BatchNorm2d → ReLU → Conv2d runs inside an nn.Sequential become
    BNReLUConv2d units at the BatchNorm's index, the ReLU and Conv2d slots
    nn.Identity, so every other index keeps its meaning."""
    if type(seq) is not nn.Sequential:
        return None
    children = list(seq.named_children())
    matches = []
    i = 0
    while i + 2 < len(children):
        (bn_name, bn), (_, relu), (_, conv) = children[i:i + 3]
        if type(bn) is nn.BatchNorm2d and type(relu) is nn.ReLU and _is_plain_conv(conv) and \
                bn.num_features == conv.in_channels:
            matches.append(i)
            i += 3
        else:
            i += 1
    if not matches:
        return None
    out = nn.Sequential()
    parts = []
    replaced = {}
    for i in matches:
        (bn_name, bn), (relu_name, _), (conv_name, conv) = children[i:i + 3]
        replaced[bn_name] = BNReLUConv2d.from_modules(bn, conv)
        replaced[relu_name] = replaced[conv_name] = nn.Identity()
        parts.append((bn_name, f"BatchNorm2d+ReLU+Conv2d ({bn_name}, {relu_name}, {conv_name})", "BNReLUConv2d"))
    for name, child in children:
        out.add_module(name, replaced.get(name, child))
    return Replacement(out.train(seq.training), parts)


def _plain_batch_norm(norm, where):
    """timm's BatchNormAct2d with a ReLU as an nn.BatchNorm2d sharing its
    parameters and buffers (the fused units apply the ReLU)."""
    from timm.layers import BatchNormAct2d

    if type(norm) is not BatchNormAct2d:
        raise Unsupported(f"{where} is a {_type_name(norm)}, not timm's BatchNormAct2d")
    if type(norm.act) is not nn.ReLU or type(norm.drop) is not nn.Identity:
        raise Unsupported(f"{where} applies {_type_name(norm.act)} and {_type_name(norm.drop)}, not ReLU alone")
    bn = nn.BatchNorm2d(norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats,
                        device="meta")
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        setattr(bn, name, getattr(norm, name))
    return bn.train(norm.training)


def _timm_preact_block(block: nn.Module) -> Optional[Replacement]:
    """timm's ResNetV2 PreActBottleneck / PreActBasic with BatchNormAct2d(ReLU)
    norms and plain convolutions (resnetv2_50's conv_layer=create_conv2d,
    norm_layer=BatchNormAct2d) → resfast's PreActBottleneck / PreActBasicBlock.
    StdConv2d and GroupNormAct blocks (the BiT models) are reported, not
    converted."""
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
                or pool.stride not in (2, (2, 2)) or pool.padding not in (0, (0, 0)) or pool.ceil_mode:
            raise Unsupported("not BatchNorm → ReLU → conv1x1 → AvgPool2d(2, 2)")
        with torch.device("meta"):
            new = Transition(module.norm.num_features, module.conv.out_channels)
        return Replacement(_adopt(new, module, ("norm", "conv")), [("", "_Transition", "Transition")])
    return None


def _group_norm(module: nn.Module) -> Optional[Replacement]:
    """nn.GroupNorm → resfast.nn.GroupNorm (a subclass with the same
    parameters), on resfast's kernels."""
    if type(module) is not nn.GroupNorm:
        return None
    with torch.device("meta"):
        new = GroupNorm(module.num_groups, module.num_channels, module.eps, module.affine)
    new.weight, new.bias = module.weight, module.bias
    return Replacement(new.train(module.training), [("", "GroupNorm", "resfast GroupNorm")])


RULES: list = [_timm_preact_block, _torchvision_densenet, _group_norm, _bn_relu_conv_chains]


def register_rule(rule: Rule, first: bool = False):
    """Add a rule (see the module docstring) to those resfast.convert tries."""
    RULES.insert(0, rule) if first else RULES.append(rule)


# ---------------------------------------------------------------- the walk
def _is_resfast(m):
    return type(m).__module__.split(".")[0] == "resfast"


def _convert(module, name, report):
    if _is_resfast(module):
        return module  # already fused: its submodules are parameter holders
    for rule in RULES:
        try:
            result = rule(module)
        except Unsupported as e:
            report.skipped.append(Skipped(name, _type_name(module), str(e)))
            break
        if result is not None:
            for rel, original, new in result.parts:
                full = ".".join(p for p in (name, rel) if p)
                report.replaced.append(Replaced(full, original, new))
            module = result.module
            break
    if _is_resfast(module):
        return module
    for child_name, child in list(module.named_children()):
        new = _convert(child, f"{name}.{child_name}" if name else child_name, report)
        if new is not child:
            setattr(module, child_name, new)
    return module


def convert(model: nn.Module, inplace: bool = False):
    """`model` with the patterns resfast recognises replaced by its fused
    modules, holding the same parameters and buffers (state dict keys change
    only where a module's structure does, e.g. `3.weight` → `3.bn.weight` for
    a BatchNorm→ReLU→Conv2d chain in an nn.Sequential). Anything not
    recognised is left untouched.

    Recognised: timm ResNetV2 pre-activation blocks (BatchNormAct2d with ReLU,
    plain convolutions), torchvision DenseNet dense blocks and transitions,
    nn.GroupNorm, and BatchNorm2d → ReLU → Conv2d runs in an nn.Sequential. With inplace=False (default) the model is copied first and
    never modified.

    Returns (converted model, Report): `report.replaced` lists (name,
    original, replacement) for each replacement, `report.skipped` each
    recognised pattern that could not be mapped exactly and why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = Report()
    return _convert(model, "", report), report
