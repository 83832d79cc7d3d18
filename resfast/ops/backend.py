"""The backend switch: `with resfast.backend("triton"): ...` runs every resfast
op in the block through one implementation family of the op registry.

- "auto" (default): the kernels registered for the tensors' device: C++ on the
  CPU; on CUDA, CUDA C++ or the Python (Triton) implementation, as each op's
  registry entry says.
- "triton": every op's Python (Triton) implementation, the one CUDA tensors
  get unless a CUDA C++ kernel serves them; on CPU tensors this needs
  TRITON_INTERPRET=1 (the Triton interpreter, for tests).
- "reference": plain torch ops, the test oracle.

The switch is a TorchDispatchMode below autograd, so the registered autograd
formulas and the backward ops they call go through the chosen backend too;
an implementation or composite kernel that calls other resfast ops runs with
the mode active again, so they are switched as well.
"""

import contextlib
import os

import torch
from torch._C import DispatchKey
from torch.utils._python_dispatch import TorchDispatchMode

from resfast.ops.registry import COMPOSITE_KEYS, OPS

BACKENDS = ("auto", "triton", "reference")


class _BackendMode(TorchDispatchMode):
    def __init__(self, name):
        super().__init__()
        self.name = name

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "resfast":
            return func(*args, **kwargs)
        op = OPS[func._schema.name.split("::", 1)[1]]
        if op.composite:
            # Re-entered with the inner ops switched. Implicit composites
            # reach this mode only without autograd (inference mode).
            key = getattr(DispatchKey, COMPOSITE_KEYS[op.composite])
            with self:
                return func._op_dk(key, *args, **kwargs)
        if self.name == "triton" and any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in args):
            if os.environ.get("TRITON_INTERPRET") != "1":
                raise RuntimeError("resfast.backend('triton') on CPU tensors needs TRITON_INTERPRET=1 set before "
                                   "triton is imported")
        impl = op.reference if self.name == "reference" else op.triton
        with self:
            return op.checked(impl)(*args, **kwargs)


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
