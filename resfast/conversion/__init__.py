"""resfast.convert: an existing model with resfast's fused units in place of
its normalisation → activation → convolution chains, holding the same
parameters and buffers under the same names.

Two mechanisms, tried on every module from the outermost in:
1. block rules (resfast.conversion.rules): known blocks become resfast's own
   modules, which do more than fuse each chain (torchvision's and timm's dense
   blocks on one buffer, timm's pre-activation blocks);
2. chain fusion (resfast.conversion.chains): the module's forward is traced
   with torch.fx and every chain in it (a BatchNorm2d or 3d / SyncBatchNorm /
   GroupNorm / timm BatchNormAct2d / GroupNormAct, then at most one ReLU,
   ReLU6 or SiLU, then a Conv2d, Conv3d or timm StdConv2d, or a 2-D
   BatchNorm's then an nn.MaxPool2d) whose normalised activation feeds only
   that convolution (or pool) is fused, in a forward generated from the trace.
Modules whose forward cannot be traced are left as they are, and reported.
"""

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from resfast.conversion.chains import FusedForward, default_signature, is_layer, is_plain_sequential, plan_for
from resfast.conversion.rules import RULES, Replacement, Rule
from resfast.conversion.units import Unsupported, conv_kind, norm_kind, pool_kind

__all__ = ["RULES", "Replaced", "Replacement", "Report", "Rule", "Skipped", "Unsupported", "convert",
           "register_rule"]


@dataclass
class Replaced:
    """`name` (qualified, "" for the model itself), of type `original`, became
    `replacement`; for a fused chain, `name` is the module whose forward fuses
    it and `original` the chain's parts."""

    name: str
    original: str
    replacement: str
    units: int = 0  # fused norm → act → conv units it brings


@dataclass
class Skipped:
    name: str
    original: str
    reason: str


@dataclass
class Report:
    """What resfast.convert did: `replaced` lists each replacement and fused
    chain, `skipped` each recognised pattern left alone, with the reason;
    `saved_ratio`, with example inputs, the bytes saved for backward by a
    training forward, converted / original."""

    replaced: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    saved_ratio: float = None

    @property
    def units(self) -> int:
        """Fused units in the converted model: norm → act → conv, and BatchNorm → act → max pool."""
        return sum(r.units for r in self.replaced)

    def __str__(self):
        lines = [f"{self.units} fused unit(s); replaced {len(self.replaced)} module(s) or chain(s)"]
        lines += [f"  {r.name or '<model>'}: {r.original} -> {r.replacement}" for r in self.replaced]
        if self.skipped:
            lines.append(f"left {len(self.skipped)} recognised pattern(s) unconverted")
            lines += [f"  {s.name or '<model>'}: {s.original} ({s.reason})" for s in self.skipped]
        if self.saved_ratio is not None:
            lines.append(f"saved activations: {self.saved_ratio:.2f}x the original's")
        return "\n".join(lines)


def register_rule(rule: Rule, first: bool = False):
    """Add a block rule `rule(module) -> Replacement | None` to those
    resfast.convert tries (the first that returns a Replacement wins; one
    that raises Unsupported(reason) leaves the module alone and reports why)."""
    if first:
        RULES.insert(0, rule)
    else:
        RULES.append(rule)


# ---------------------------------------------------------------- the walk
def _is_resfast(m):
    return type(m).__module__.split(".")[0] == "resfast"


def _qualified(*names):
    return ".".join(n for n in names if n)


def _units_in(module):
    """Fused units in a resfast module a rule put in: each of its convolutions is applied fused."""
    return sum(type(m) is nn.Conv2d for m in module.modules())


def _apply_rules(module, name, report):
    """(module or its replacement, whether a rule decided it)."""
    for rule in RULES:
        try:
            result = rule(module)
        except Unsupported as e:
            report.skipped.append(Skipped(name, type(module).__name__, str(e)))
            return module, True
        if result is not None:
            new = result.module
            for rel, original, replacement in result.parts:
                units = _units_in(new.get_submodule(rel)) if _is_resfast(new.get_submodule(rel)) else 0
                report.replaced.append(Replaced(_qualified(name, rel), original, replacement, units))
            return new, _is_resfast(new)
    return module, False


def _recognised(m, kind):
    try:
        return kind(m) is not None
    except Unsupported:
        return True


def _may_hold_chain(module):
    """Whether module holds (directly or in what its trace follows into) both a
    normalisation and a convolution or max pool."""
    found = set()

    def scan(m):
        for child in m.children():
            if is_plain_sequential(child) or is_layer(child):
                scan(child)
            elif _recognised(child, norm_kind):
                found.add("norm")
            elif _recognised(child, conv_kind) or _recognised(child, pool_kind):
                found.add("end")

    scan(module)
    return found == {"norm", "end"}


def _fuse_chains(module, name, report, fused) -> set:
    """Trace module's forward, fuse its chains; the ids of the Sequentials and layers the trace followed into."""
    # Only modules that may hold a chain are traced: a trace runs the forward's
    # Python (a norm's forward would count a batch).
    if type(module).forward is nn.Module.forward or not _may_hold_chain(module):  # containers: ModuleList...
        return set()
    if "forward" in module.__dict__:
        if not isinstance(module.__dict__["forward"], FusedForward):  # not converted already
            report.skipped.append(Skipped(name, type(module).__name__, "its forward is replaced on the instance"))
        return set()
    signature = default_signature(module)
    if signature is None:
        report.skipped.append(Skipped(name, type(module).__name__,
                                      "its forward's signature (required keyword-only arguments) is not traced"))
        return set()
    scope, plan = plan_for(module, *signature)
    if plan.error is not None:
        report.skipped.append(Skipped(name, type(module).__name__, f"forward not traceable ({plan.error})"))
        return set()
    for parts, reason in plan.skipped:
        report.skipped.append(Skipped(name, " → ".join(parts), reason))
    if plan.chains:
        for chain in plan.chains:
            report.replaced.append(Replaced(name, " → ".join(chain.parts), "fused unit", 1))
            fused.update(id(module.get_submodule(path)) for path in (chain.norm, chain.end))
        forward = FusedForward(module)
        forward.add_plan(signature, scope, plan, torch.is_grad_enabled())
        module.forward = forward
    return plan.followed


def _convert(module, name, report, fused, followed):
    """fused: the ids of modules a fused chain applies (no rule swaps them:
    they are not called); followed: of the Sequentials an enclosing module's
    trace followed into, at any depth (searched there, not traced again)."""
    if _is_resfast(module) or id(module) in fused:
        return module  # already fused: its submodules are parameter holders
    module, decided = _apply_rules(module, name, report)
    if decided:
        return module
    if id(module) not in followed:
        followed = followed | _fuse_chains(module, name, report, fused)
    for child_name, child in list(module.named_children()):
        new = _convert(child, _qualified(name, child_name), report, fused, followed)
        if new is not child:
            setattr(module, child_name, new)
    return module


def _saved_ratio(original, converted, example_inputs):
    """Bytes saved for backward by one training forward on copies of both
    models (copies: the forward updates running statistics), converted / original."""
    from resfast.bench.timing import saved_activation_bytes

    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    sizes = [saved_activation_bytes(copy.deepcopy(m).train(), *inputs) for m in (original, converted)]
    return sizes[1] / sizes[0] if sizes[0] else None


def convert(model: nn.Module, inplace: bool = False, example_inputs=None):
    """`model` with its norm → activation → conv chains fused (see the module
    docstring), holding the same parameters and buffers under the same names:
    the converted model loads the original's state dict with strict=True,
    and its state dict loads into the original. Anything not recognised is
    left untouched. With inplace=False (default) the model is copied first
    and never modified. example_inputs (a tensor or a tuple of the forward's
    arguments): measure the saved activations of a training forward on copies
    of both models (report.saved_ratio).

    Returns (converted model, Report): `report.replaced` lists each
    replacement and fused chain, `report.units` counts the fused units,
    `report.skipped` each recognised pattern left alone and why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    reference = model if example_inputs is not None and not inplace else None
    if example_inputs is not None and inplace:
        reference = copy.deepcopy(model)
    if not inplace:
        model = copy.deepcopy(model)
    report = Report()
    model = _convert(model, "", report, set(), frozenset())
    if reference is not None:
        report.saved_ratio = _saved_ratio(reference, model, example_inputs)
    return model, report
