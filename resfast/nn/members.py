"""A module's parameters, buffers and children, read where nn.Module keeps them.

nn.Module finds them through `__getattr__`, after an ordinary lookup has
failed: about 1 µs a read on a 2-core EPYC, against 0.05 µs for a read of its
`_parameters`, `_buffers` or `_modules` dict. A fused unit reads a dozen per
call, which at small sizes costs more than its normalisation. The dicts are
where getattr finds them, and where FSDP2 and `torch.func.functional_call`
put their substitutes, unless the module's class defines the name itself:
torch.nn.utils.parametrize and FSDP2 do so by giving the module a class of
their own, so the dicts are read only for the exact classes registered here.
"""

from torch import nn

# Classes whose parameters and buffers are found only in nn.Module's dicts.
_PLAIN = {nn.Conv2d, nn.Conv3d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm}


def plain(cls):
    """Class decorator: cls (an nn.Module subclass that defines no parameter
    or buffer name as a class attribute) may be read through its dicts."""
    _PLAIN.add(cls)
    return cls


def tensor(module: nn.Module, name: str):
    """getattr(module, name) for a registered parameter or buffer (or None
    registered in its place)."""
    if type(module) in _PLAIN:
        params = module._parameters
        return params[name] if name in params else module._buffers[name]
    return getattr(module, name)


def child(module: nn.Module, name: str) -> nn.Module:
    """getattr(module, name) for a submodule of one of resfast's own modules,
    none of which defines a submodule's name as a class attribute."""
    return module._modules[name]


def has_hooks(m: nn.Module) -> bool:
    """Forward or backward hooks (pruning's, quantisation observers'): a
    fused op that reads the module instead of calling it would skip them."""
    return bool(m._forward_pre_hooks or m._forward_hooks or m._backward_hooks or m._backward_pre_hooks)
