"""The backend switch: `with resfast.backend("triton"): ...` runs every resfast
op in the block through one implementation family.

- "auto" (default): the kernels registered for the tensors' device: C++ on the
  CPU; on CUDA, CUDA C++ for memory-bound ops and Triton for convolutions.
- "cpu" / "cuda": the same registered kernels, refusing tensors of another device.
- "triton": the Triton kernels for every op; on CPU tensors this needs
  TRITON_INTERPRET=1 (the Triton interpreter, for tests).
- "reference": plain torch ops (resfast/ops/reference.py), the test oracle.

The switch is a TorchDispatchMode below autograd, so the registered autograd
formulas and the backward ops they call go through the chosen backend too.
"""

import contextlib
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from resfast.ops.composite import COMPOSITES

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")


def _implementations(name):
    if name == "reference":
        from resfast.ops import reference

        return reference.IMPLS
    if name == "triton":
        from resfast.ops import triton_impl

        return triton_impl.IMPLS
    return None


class _BackendMode(TorchDispatchMode):
    def __init__(self, name):
        super().__init__()
        self.name = name
        self.impls = _implementations(name)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "resfast":
            return func(*args, **kwargs)
        op_name = func._schema.name.split("::", 1)[1]
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if self.name in ("cpu", "cuda"):
            for t in tensors:
                if t.device.type != self.name:
                    raise ValueError(f"resfast.backend({self.name!r}): {op_name} got a tensor on {t.device}")
            return func(*args, **kwargs)
        if self.name == "triton" and any(t.device.type == "cpu" for t in tensors):
            if os.environ.get("TRITON_INTERPRET") != "1":
                raise RuntimeError("resfast.backend('triton') on CPU tensors needs TRITON_INTERPRET=1 set before "
                                   "triton is imported")
        if op_name in COMPOSITES:
            return COMPOSITES[op_name](self.impls, *args, **kwargs)
        return self.impls[op_name](*args, **kwargs)


@contextlib.contextmanager
def backend(name: str):
    """Run the resfast ops inside the block with the named backend."""
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(map(repr, BACKENDS))}, got {name!r}")
    if name == "auto":
        yield
        return
    with _BackendMode(name):
        yield
