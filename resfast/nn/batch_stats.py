"""Batch statistics handed from a block to the next beside the activation.

In training, a block's last fused convolution can return its output's
per-channel (mean, biased variance) from the epilogue; the next block's
BatchNorm then needs no statistics pass. Blocks are called through
nn.Module.__call__ (so forward hooks, FSDP2's pre/post-forward hooks and
checkpoint wrappers see them) and forward takes and returns plain tensors,
so the statistics travel beside them: `record(y, stats)` files them under
y's memory, and `lookup(x)` finds them for x when x is y or an alias of it
with the same values: FSDP2 and full backward hooks pass a block's inputs
through autograd functions that return aliases, not the same object.

A lookup matches only while the recorded tensor is alive (its memory cannot
have been reused) and unchanged (its version counter, which aliases share,
has not moved), and gives None otherwise: the caller then makes its own
statistics pass, so a miss costs time, never correctness. A hook that
replaces a block's output, an in-place change, a dtype cast and a copy all
miss. Under torch.compile the hand-off is off (both sides), so compiled and
eager blocks mix freely.
"""

import weakref

import torch

_RECORDS: dict = {}


def _key(t: torch.Tensor):
    # get_device(): an int, where t.device builds an object per call.
    return (t.data_ptr(), t.shape, t.stride(), t.dtype, t.get_device())


def _active(t) -> bool:
    # Plain tensors with a version counter (inference tensors have none);
    # checked after is_compiling, which dynamo folds to True.
    return (not torch.compiler.is_compiling() and isinstance(t, torch.Tensor) and type(t) is torch.Tensor
            and not t.is_inference())


def _forget(ref, key):
    if _RECORDS.get(key, (None,))[0] is ref:
        del _RECORDS[key]


def record(y: torch.Tensor, stats) -> None:
    """File y's batch statistics (mean, var), computed from y's current values."""
    if stats is None or not _active(y):
        return
    key = _key(y)
    _RECORDS[key] = (weakref.ref(y, lambda ref, key=key: _forget(ref, key)), y._version, stats)


def lookup(x: torch.Tensor):
    """The statistics recorded for x's values, or None."""
    if not _RECORDS or not _active(x):
        return None
    found = _RECORDS.get(_key(x))
    if found is None:
        return None
    ref, version, stats = found
    return stats if ref() is not None and x._version == version else None
