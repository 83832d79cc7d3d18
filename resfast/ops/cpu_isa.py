"""The instruction set the C++ CPU kernels run with.

The extension is compiled for baseline x86-64, and its per-element loops again
for x86-64-v3 (AVX2 + FMA) and x86-64-v4 (AVX-512); each call picks the best
level the CPU supports (csrc/cpu/isa.h). The environment variable
RESFAST_CPU_ISA caps that level at start-up; `use_cpu_isa` caps it inside a
block, which lets the tests run every compiled copy on one machine.
"""

import contextlib

from resfast import _C

CPU_ISAS = ("baseline", "x86-64-v3", "x86-64-v4")


def hardware_isa() -> str:
    """The best level this CPU supports."""
    return _C.hardware_isa()


def cpu_isa() -> str:
    """The level the CPU kernels run at now."""
    return _C.cpu_isa()


def available_cpu_isas() -> tuple[str, ...]:
    """Every level this CPU can run, lowest first."""
    return CPU_ISAS[: CPU_ISAS.index(hardware_isa()) + 1]


@contextlib.contextmanager
def use_cpu_isa(isa: str):
    """Run the CPU kernels inside the block at `isa` (at most hardware_isa()).
    The setting is process-wide, not per thread; an unknown name raises
    ValueError (from the extension, which parses it)."""
    previous = _C.set_cpu_isa(isa)
    try:
        yield
    finally:
        _C.set_cpu_isa(previous)
