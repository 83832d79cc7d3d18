"""Validation and launch helpers shared by the Triton kernel launchers."""
import torch
from triton.runtime.jit import JITFunction

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Activation codes understood by the kernels' ACT constexpr.
ACTIVATIONS = {"identity": 0, "relu": 1, "silu": 2}

# Row indices (N*H*W positions) are kept in int32 inside the kernels; only
# memory offsets are widened to int64.
MAX_ROWS = 2**31 - 1


def is_interpreted(kernel):
    """True when `kernel` was decorated under TRITON_INTERPRET (runs on CPU via numpy)."""
    return not isinstance(kernel, JITFunction)


def check_device(kernel, *tensors):
    # Compiled kernels only accept CUDA tensors; the interpreter accepts any.
    if is_interpreted(kernel):
        return
    for t in tensors:
        if t is not None and t.device.type != "cuda":
            raise ValueError(f"Triton kernels need CUDA tensors (got {t.device}); "
                             "set TRITON_INTERPRET=1 to run them on CPU")


def check_activation_tensor(name, t):
    """4-D floating tensor in a dtype the Triton path supports."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D, got shape {tuple(t.shape)}")
    if t.dtype == torch.float64:
        raise ValueError(f"{name} is float64, which the Triton kernels do not support; "
                         "use the reference path for double precision")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")


def channel_vector(name, t, channels):
    """Validated float32 (C,) vector, made contiguous because kernels index it densely."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}")
    if tuple(t.shape) != (channels,):
        raise ValueError(f"{name} must have shape ({channels},), got {tuple(t.shape)}")
    return t.contiguous()


def activation_code(activation):
    try:
        return ACTIVATIONS[activation]
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}") from None


def is_channels_last(t):
    # A tensor that is both (e.g. C == 1 or H == W == 1) counts as NCHW.
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def empty_like_format(ref, shape, dtype):
    """Uninitialised 4-D tensor in `ref`'s memory format (channels_last or NCHW)."""
    fmt = torch.channels_last if is_channels_last(ref) else torch.contiguous_format
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
    # Only used to size split-K; under the interpreter any plausible value works.
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 108
