"""The arguments of one fused-convolution call, as every engine takes them,
and the key a per-shape choice is filed under."""

from typing import NamedTuple, Optional

import torch

from resfast.ops.checks import TRITON_DTYPES
from resfast.ops.layout import CHANNELS_LAST, conv_output_size, kernel_format


class Forward(NamedTuple):
    """norm_act_conv2d and its variants: with `out`, the result is stored into
    out[:, out_offset:out_offset + C_out]; with compute_stats, the stored
    values' per-channel (mean, biased variance) are returned too."""

    x: torch.Tensor
    mean: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    residual: Optional[torch.Tensor]
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    activation: str
    out: Optional[torch.Tensor] = None
    out_offset: int = 0
    compute_stats: bool = False

    def output_shape(self):
        return (self.x.shape[0], self.weight.shape[0],
                *conv_output_size(self.x, self.weight, self.stride, self.padding, self.dilation))

    def fresh_output(self):
        """An uninitialised output laid out like x."""
        return torch.empty(self.output_shape(), dtype=self.weight.dtype, device=self.x.device,
                           memory_format=kernel_format(self.x))

    def destination(self):
        """Where the result goes: the channel slice of out, or None (a fresh tensor)."""
        if self.out is None:
            return None
        return self.out[:, self.out_offset:self.out_offset + self.weight.shape[0]]


class Backward(NamedTuple):
    """norm_act_conv2d_backward: (grad_x, grad_scale, grad_shift, grad_weight)."""

    grad_out: torch.Tensor
    x: torch.Tensor
    mean: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    weight: torch.Tensor
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    activation: str
    batch_invstd: Optional[torch.Tensor]
    output_mask: tuple


def _layout(t):
    return "cl" if kernel_format(t) in CHANNELS_LAST else "nchw"


def _dtype(t):
    return str(t.dtype).replace("torch.", "")


def _device(t):
    if t.device.type != "cuda":
        return t.device.type
    major, minor = torch.cuda.get_device_capability(t.device)
    return f"sm{major}{minor}"


def key(call) -> str:
    """What a choice among engines depends on: the op, shapes, dtypes,
    layout, parameter kind, convolution arguments, optional parts, and the
    device (its architecture on CUDA). A string, for the JSON cache."""
    x, w = call.x, call.weight
    parts = ["fwd" if isinstance(call, Forward) else "bwd", "x" + "x".join(map(str, x.shape)), _dtype(x), _layout(x),
             "w" + "x".join(map(str, w.shape)), _dtype(w), "per-sample" if call.mean.dim() == 2 else "per-channel",
             "s" + "x".join(map(str, call.stride)), "p" + "x".join(map(str, call.padding)),
             "d" + "x".join(map(str, call.dilation)), f"g{call.groups}", call.activation]
    if isinstance(call, Forward):
        parts += [name for name, on in (("bias", call.bias is not None), ("residual", call.residual is not None),
                                        ("into", call.out is not None), ("stats", call.compute_stats)) if on]
    else:
        parts += ["mask" + "".join("1" if m else "0" for m in call.output_mask)]
        if call.batch_invstd is not None:
            parts.append("batch-stats")
    parts.append(_device(x))
    return "-".join(parts)


def unsupported_by_triton(call):
    """Why Triton kernels cannot take the call (its dtypes), or None: the rule
    of every engine that launches them."""
    if call.x.dtype not in TRITON_DTYPES or call.weight.dtype not in TRITON_DTYPES:
        return f"dtype {call.x.dtype}"
    return None
