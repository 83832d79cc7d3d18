"""The cuDNN graphs of the `cudnn` engine, written once against the graph API
of nvidia-cudnn-frontend's `cudnn.pygraph` (and of anything that offers the
same methods: the tests run these builders against a torch stand-in).

- forward: scale -> bias -> act -> conv_fprop [-> bias] [-> + residual],
  with genstats (per-channel sum and sum of squares) of the stored output:
  NVIDIA's "ConvBNfprop" pattern, with the epilogue adds when asked;
- weight gradient: scale -> bias -> act -> conv_wgrad ("ConvBNwgrad").

The normalisation enters as one per-channel scale and bias: the unit's
(x - mean) * scale + shift is x * scale + (shift - mean * scale), folded in
float32 by the engine. Each builder returns {name: graph tensor} for the
engine's variant pack."""

import torch


def _vector(g, name, channels, rank, dtype):
    """A per-channel vector as the graph broadcasts it: (1, C, 1, ...)."""
    return g.tensor(name=name, dim=[1, channels] + [1] * (rank - 2), stride=[channels, 1] + [channels] * (rank - 2),
                    data_type=dtype)


def _like(g, name, t):
    return g.tensor(name=name, dim=list(t.shape), stride=list(t.stride()), data_type=t.dtype)


def _activated_input(g, x, activation):
    """act(x * scale + bias) as a virtual tensor, and the tensors it reads."""
    tensors = {"x": _like(g, "x", x), "scale": _vector(g, "scale", x.shape[1], x.dim(), torch.float32),
               "bias": _vector(g, "bias", x.shape[1], x.dim(), torch.float32)}
    z = g.bias(name="shift", input=g.scale(name="normalise", input=tensors["x"], scale=tensors["scale"]),
               bias=tensors["bias"])
    if activation == "relu":
        z = g.relu(name="relu", input=z)
    elif activation == "relu6":
        z = g.relu(name="relu6", input=z, upper_clip=6.0)
    elif activation == "silu":
        z = g.swish(name="silu", input=z)
    return z, tensors


def _conv_args(call):
    return dict(padding=list(call.padding), stride=list(call.stride), dilation=list(call.dilation))


def forward(g, call, y):
    """The forward graph of a calls.Forward storing into y (a fresh output or
    the channel slice of call.out, whose strides the graph takes)."""
    a, tensors = _activated_input(g, call.x, call.activation)
    tensors["weight"] = _like(g, "weight", call.weight)
    out = g.conv_fprop(name="conv", image=a, weight=tensors["weight"], **_conv_args(call))
    if call.bias is not None:
        tensors["conv_bias"] = _vector(g, "conv_bias", call.weight.shape[0], y.dim(), call.bias.dtype)
        out = g.bias(name="conv_bias_add", input=out, bias=tensors["conv_bias"])
    if call.residual is not None:
        tensors["residual"] = _like(g, "residual", call.residual)
        out = g.add(name="residual_add", a=out, b=tensors["residual"])
    out.set_output(True).set_dim(list(y.shape)).set_stride(list(y.stride())).set_data_type(y.dtype)
    tensors["y"] = out
    if call.compute_stats:
        total, total_sq = g.genstats(name="stats", input=out)
        for name, t in (("sum", total), ("sum_sq", total_sq)):
            t.set_output(True).set_data_type(torch.float32)
            tensors[name] = t
    return tensors


def weight_grad(g, call, grad_weight):
    """The weight-gradient graph of a calls.Backward, writing grad_weight."""
    a, tensors = _activated_input(g, call.x, call.activation)
    tensors["grad_out"] = _like(g, "grad_out", call.grad_out)
    out = g.conv_wgrad(name="wgrad", image=a, loss=tensors["grad_out"], **_conv_args(call))
    out.set_output(True).set_dim(list(grad_weight.shape)).set_stride(list(grad_weight.stride()))
    out.set_data_type(grad_weight.dtype)
    tensors["grad_weight"] = out
    return tensors
