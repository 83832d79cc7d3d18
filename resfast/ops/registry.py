"""The op registry: for every op whose schema csrc/ops.cpp defines, all that
resfast registers or derives for it from Python, in one place.

Each op family's module (statistics.py, group_norm.py, norm_act_conv.py)
declares its ops with `define` and attaches, by decorator:
- check: the op-level argument check that runs before every Python kernel of
  the op (the C++ kernels check theirs with TORCH_CHECK, same messages);
- fake: the fake (meta) kernel, for torch.compile and opcheck;
- reference: plain torch ops, the oracle of the tests and of
  resfast.backend("reference");
- triton: the implementation written in Python (Triton kernels, or for the
  convolutions the choice among engines), which serves CUDA tensors unless a
  CUDA C++ kernel does (cuda="cpp"), and every device under
  resfast.backend("triton") (CPU tensors in the Triton interpreter).
A composite op (one C++ kernel for every device, written in terms of other
ops, csrc/composites.cpp) needs none of them: composite="explicit" (a
CompositeExplicitAutograd kernel, with autograd of its own) or "implicit"
(CompositeImplicitAutograd: autograd sees its inner ops).

`finalize` then checks the registry against the compiled schemas and
kernels (an op without an entry, or an entry without its parts, fails at
import) and makes the registrations. The backend switch, the tests (sample
inputs, opcheck, the AOT compile) and docs/DESIGN.md read the same entries.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch._subclasses.functional_tensor import FunctionalTensorMode

from resfast import _C

NAMESPACE = "resfast"
# How CUDA tensors are served: by the op's Python (triton) implementation, or
# by a CUDA C++ kernel of csrc/cuda.
CUDA_KINDS = ("triton", "cpp")


@dataclass
class OpDef:
    name: str
    cuda: str = "triton"
    composite: str = ""  # "", "explicit" or "implicit"
    check: Optional[Callable] = None
    fake: Optional[Callable] = None
    reference: Optional[Callable] = None
    triton: Optional[Callable] = None
    # For the convolution ops: the engines their triton implementation chooses
    # among per shape (resfast/ops/conv_engines).
    engines: tuple = ()

    @property
    def qualname(self) -> str:
        return f"{NAMESPACE}::{self.name}"

    @property
    def overload(self):
        return getattr(torch.ops.resfast, self.name).default

    def register_check(self, fn):
        self.check = fn
        return fn

    def register_fake(self, fn):
        self.fake = fn
        return fn

    def register_reference(self, fn):
        self.reference = fn
        return fn

    def register_triton(self, fn):
        self.triton = fn
        return fn

    def checked(self, impl: Callable) -> Callable:
        """impl run after the op's argument check."""
        check = self.check

        def run(*args, **kwargs):
            check(*args, **kwargs)
            return impl(*args, **kwargs)

        run.__name__ = f"{self.name}_{getattr(impl, '__name__', 'impl')}"
        return run

    def missing(self) -> list:
        parts = ("check", "fake", "reference", "triton")
        if self.composite:
            return [f"{p} (a composite op has none)" for p in parts if getattr(self, p) is not None]
        return [p for p in parts if getattr(self, p) is None]


OPS: dict = {}


COMPOSITE_KEYS = {"explicit": "CompositeExplicitAutograd", "implicit": "CompositeImplicitAutograd"}


def define(name: str, *, cuda: str = "triton", composite: str = "", engines: tuple = ()) -> OpDef:
    """The registry entry of the op resfast::<name>."""
    if name in OPS:
        raise ValueError(f"op {name!r} is defined twice")
    if cuda not in CUDA_KINDS:
        raise ValueError(f"cuda: expected one of {CUDA_KINDS}, got {cuda!r}")
    if composite and composite not in COMPOSITE_KEYS:
        raise ValueError(f"composite: expected one of {tuple(COMPOSITE_KEYS)}, got {composite!r}")
    OPS[name] = OpDef(name, cuda, composite, engines=engines)
    return OPS[name]


def compiled_schemas() -> set:
    prefix = f"{NAMESPACE}::"
    return {n[len(prefix):] for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix)}


def has_kernel(op: OpDef, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op.qualname, dispatch_key)


def _on_device_of_tensors(impl: Callable) -> Callable:
    """impl run on the CUDA device of its first tensor argument: Triton
    launches on the current device otherwise."""

    def run(*args, **kwargs):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        with torch.cuda.device(device):
            return impl(*args, **kwargs)

    return run


def _traced_for_inductor(op: OpDef) -> Callable:
    """A FunctionalTensorMode rule (what torch.library.triton_op registers)
    that decomposes the op into its Python implementation when it runs on
    CUDA tensors, so torch.compile's AOT dispatch sees the Triton launches
    (resfast.kernels.recorded_launches: through wrap_triton) and the torch
    ops around them; anything else is left to the mode."""
    impl = op.checked(op.triton)

    def rule(mode, func, types, args, kwargs):
        from torch._subclasses.fake_tensor import FakeTensor
        from torch._subclasses.functional_tensor import FunctionalTensor

        on_cuda = any(isinstance(a, torch.Tensor) and a.device.type == "cuda" for a in args)
        plain = all(issubclass(t, (FakeTensor, FunctionalTensor)) or t is torch.Tensor for t in types)
        if not (on_cuda and plain):
            return mode.__torch_dispatch__(func, types, args, kwargs)
        from resfast.kernels import recorded_launches

        with mode, recorded_launches():
            return impl(*args, **kwargs)

    return rule


_finalized = False


def finalize():
    """Check every entry against the compiled extension, then register the
    fake kernels and the Python CUDA kernels. Called once, by resfast.ops."""
    global _finalized
    if _finalized:
        return
    schemas = compiled_schemas()
    problems = [f"resfast::{n} has a schema (csrc/ops.cpp) but no registry entry"
                for n in sorted(schemas - OPS.keys())]
    problems += [f"resfast::{n} has a registry entry but no schema in csrc/ops.cpp"
                 for n in sorted(OPS.keys() - schemas)]
    for op in OPS.values():
        problems += [f"{op.qualname}: missing {part}" for part in op.missing()]
        if op.name in schemas:
            native = [COMPOSITE_KEYS[op.composite]] if op.composite else ["CPU"]
            if op.cuda == "cpp" and _C.with_cuda:
                native.append("CUDA")
            problems += [f"{op.qualname}: no {key} kernel is compiled" for key in native if not has_kernel(op, key)]
    if problems:
        raise ImportError("resfast: the op registry does not match the compiled extension:\n  " +
                          "\n  ".join(problems))
    for op in OPS.values():
        if op.composite:
            continue
        torch.library.register_fake(op.qualname, op.fake)
        if op.cuda == "triton":
            torch.library.register_kernel(op.qualname, "cuda", _on_device_of_tensors(op.checked(op.triton)))
            torch.library.register_torch_dispatch(op.qualname, FunctionalTensorMode, _traced_for_inductor(op))
    _finalized = True
