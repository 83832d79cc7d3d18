"""What the Triton launchers share: the shipped-config table, launch-time
assertions (arguments are checked by the ops layer, resfast.ops, before any
launcher runs), and layout and dot-precision helpers."""

import contextlib
from typing import NamedTuple

import torch
from torch.library import wrap_triton
from triton.runtime.jit import JITFunction

from resfast.activations import activation_code  # noqa: F401  (the kernels' ACT constexpr)


class Shipped(NamedTuple):
    """A kernel's configurations (launch keyword arguments: BLOCK_* tiles,
    num_warps, num_stages) and whether it is meant to run on tensor cores."""

    kernel: object
    configs: list
    tensor_cores: bool


# kernel name -> Shipped: every kernel a launcher starts, with every config it
# may pick. tests/test_triton_aot.py compiles each for sm_80 and sm_90, and the
# interpreter tests force each one (forced_configs).
SHIPPED: dict = {}
_forced: dict = {}


def ship(kernel, configs, tensor_cores=False):
    SHIPPED[kernel.__name__] = Shipped(kernel, list(configs), tensor_cores)
    return configs


def config_for(kernel, heuristic):
    """The config a launcher starts `kernel` with: the forced one, if any,
    else its heuristic's choice (a zero-argument function)."""
    return _forced.get(kernel.__name__) or heuristic()


@contextlib.contextmanager
def forced_configs(configs: dict):
    """Launch the named kernels ({kernel name: config}) with the given
    configs inside the block, whatever the launchers' heuristics pick."""
    saved = dict(_forced)
    _forced.update(configs)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(saved)


def is_interpreted(kernel):
    """True when `kernel` was decorated under TRITON_INTERPRET (runs on CPU via numpy)."""
    return not isinstance(kernel, JITFunction)


_recording_launches = False


@contextlib.contextmanager
def recorded_launches():
    """Inside the block, launches are wrapped with torch.library.wrap_triton,
    so that a trace (torch.compile's AOT dispatch, make_fx) records them as
    graph nodes Inductor can see into and optimise, instead of running them.
    Outside it they launch directly, without the wrapper's dispatch."""
    global _recording_launches
    saved, _recording_launches = _recording_launches, True
    try:
        yield
    finally:
        _recording_launches = saved


def launch(kernel):
    """`kernel`, to be indexed by its grid and called (see recorded_launches;
    the interpreter's kernels cannot be wrapped)."""
    return wrap_triton(kernel) if _recording_launches and not is_interpreted(kernel) else kernel


def assert_launchable(kernel, *tensors):
    # Compiled kernels run on CUDA tensors (meta ones stand in for them when
    # only the launch arguments are wanted); the interpreter takes any.
    assert is_interpreted(kernel) or all(t is None or t.device.type in ("cuda", "meta") for t in tensors), \
        f"{kernel.__name__}: compiled Triton kernels need CUDA tensors"


def _channels_last_format(t):
    return torch.channels_last if t.dim() == 4 else torch.channels_last_3d


def is_channels_last(t):
    # A 4-D or 5-D tensor that is both (e.g. C == 1 or H == W == 1) counts as NC(D)HW.
    return t.dim() in (4, 5) and t.is_contiguous(memory_format=_channels_last_format(t)) and not t.is_contiguous()


def empty_like_format(ref, shape, dtype):
    """Uninitialised 4-D or 5-D tensor in `ref`'s memory format (channels_last(_3d) or NC(D)HW)."""
    fmt = _channels_last_format(ref) if is_channels_last(ref) else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=ref.device, memory_format=fmt)


def dot_options(kernel, dot_dtype):
    """PREC / UPCAST_BF16 constexprs for the kernels' tl.dot on `dot_dtype` operands.

    PREC: fp32 follows cuDNN's TF32 switch so results match what F.conv2d would
    give; the interpreter always uses exact fp32 because numpy has no TF32. The
    value is ignored for 16-bit operands.
    UPCAST_BF16: the Triton interpreter multiplies bf16 tiles as their raw
    uint16 storage, so there the (exactly representable) bf16 operands are
    widened to fp32 first; compiled kernels never take that path.
    """
    interpreted = is_interpreted(kernel)
    exact = dot_dtype == torch.float32 and (interpreted or not torch.backends.cudnn.allow_tf32)
    return dict(PREC="ieee" if exact else "tf32",
                UPCAST_BF16=interpreted and dot_dtype == torch.bfloat16)


def multiprocessor_count(device):
    # Only used to size grids; under the interpreter, for meta tensors and for
    # fake CUDA tensors traced without a GPU any plausible value works.
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 108
