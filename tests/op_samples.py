"""Sample inputs for every op of the registry (resfast/ops/registry.py): one
generator per op, which tests/test_ops.py feeds to the comparison with the
reference on every backend, to gradcheck and to torch.library.opcheck.

A generator takes (dtype, device) and returns Samples: fresh random inputs
(never zeros) covering both layouts, odd sizes, channel slices, per-channel
and per-(sample, channel) parameters, and every optional argument.
"""

from dataclasses import dataclass
from typing import Optional

import torch

CL = torch.channels_last


@dataclass
class Sample:
    name: str
    args: tuple
    # gradcheck-able: the op's value is a function of its inputs (not so when
    # batch_invstd declares mean and scale to be x's own statistics).
    differentiable: bool = True
    opcheck: bool = False  # also run torch.library.opcheck (slow: a few per op)
    # The arguments gradcheck differentiates (indices; None: every float tensor).
    grad_args: Optional[tuple] = None


def _x(shape, dtype, device, layout="nchw"):
    x = torch.randn(shape, dtype=torch.float64, device=device) * 1.5 + 0.3
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL if len(shape) == 4 else torch.channels_last_3d)
    elif layout == "slice":
        # Channels 1.. of a wider tensor: neither contiguous layout.
        wide = torch.randn((shape[0], shape[1] + 2, *shape[2:]), dtype=torch.float64, device=device) * 1.5 + 0.3
        x = wide[:, 1:1 + shape[1]]
    return x.to(dtype)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _vec(shape, dtype, device, low=None):
    v = torch.randn(shape, dtype=torch.float64, device=device)
    if low is not None:
        v = v.abs() + low
    return v.to(_acc(dtype))


def channel_stats(dtype, device):
    return [Sample("nchw", (_x((3, 5, 7, 6), dtype, device),), opcheck=True),
            Sample("cl", (_x((2, 4, 5, 3), dtype, device, "channels_last"),), opcheck=True),
            Sample("slice", (_x((2, 4, 5, 3), dtype, device, "slice"),)),
            Sample("large-mean", (_x((2, 3, 4, 5), dtype, device) + 300,)),
            Sample("5d", (_x((2, 3, 4, 3, 5), dtype, device),)),
            Sample("5d-cl", (_x((2, 4, 3, 5, 3), dtype, device, "channels_last"),)),
            Sample("5d-slice", (_x((1, 3, 4, 2, 3), dtype, device, "slice"),))]


def channel_stats_backward(dtype, device):
    samples = []
    for layout, shape in (("nchw", (2, 6, 5, 7)), ("channels_last", (2, 6, 5, 7)), ("channels_last", (2, 6, 3, 4, 3))):
        x = _x(shape, dtype, device, layout)
        vecs = [_vec(6, dtype, device) for _ in range(3)]
        samples.append(Sample(f"{layout}-{len(shape)}d", (x, *vecs), opcheck=len(shape) == 4))
    return samples


def group_stats(dtype, device):
    return [Sample("nchw", (_x((2, 6, 5, 4), dtype, device), 3), opcheck=True),
            Sample("cl", (_x((2, 6, 5, 4), dtype, device, "channels_last"), 2), opcheck=True),
            Sample("one-group", (_x((3, 4, 3, 3), dtype, device), 1)),
            Sample("per-channel", (_x((2, 4, 3, 5), dtype, device, "channels_last"), 4)),
            Sample("5d-cl", (_x((2, 6, 3, 4, 3), dtype, device, "channels_last"), 3))]


def group_stats_backward(dtype, device):
    samples = []
    for layout, shape in (("nchw", (2, 6, 5, 4)), ("channels_last", (2, 6, 5, 4)), ("channels_last", (2, 6, 3, 2, 3))):
        x = _x(shape, dtype, device, layout)
        samples.append(Sample(f"{layout}-{len(shape)}d", (x, *[_vec((2, 3), dtype, device) for _ in range(3)]),
                              opcheck=len(shape) == 4))
    return samples


def _gn_affine(c, dtype, device):
    return _vec(c, dtype, device, low=0.5).to(dtype), _vec(c, dtype, device).to(dtype)


def group_norm(dtype, device):
    samples = []
    for layout, act, affine, spatial in (("nchw", "silu", True, (5, 4)), ("channels_last", "relu", False, (5, 4)),
                                         ("nchw", "identity", False, (5, 4)), ("channels_last", "silu", True, (5, 4)),
                                         ("nchw", "relu", True, (3, 4, 3)), ("channels_last", "silu", True, (3, 2, 5))):
        x = _x((2, 6, *spatial), dtype, device, layout)
        w, b = _gn_affine(6, dtype, device) if affine else (None, None)
        name = f"{layout}-{act}-{'affine' if affine else 'plain'}" + ("-5d" if len(spatial) == 3 else "")
        samples.append(Sample(name, (x, 3, w, b, 1e-5, act), opcheck=layout == "nchw" and len(spatial) == 2))
    return samples


def _gn_stats(x, groups):
    var, mean = torch.var_mean(x.double().reshape(x.shape[0], groups, -1), dim=2, unbiased=False)
    return mean.to(_acc(x.dtype)), (var + 1e-5).rsqrt().to(_acc(x.dtype))


def group_norm_backward(dtype, device):
    samples = []
    for layout, act, mask, affine, spatial in (("nchw", "silu", [True, True, True], True, (5, 4)),
                                               ("channels_last", "relu", [True, True, False], True, (5, 4)),
                                               ("nchw", "identity", [True, False, False], False, (5, 4)),
                                               ("channels_last", "silu", [False, True, True], False, (5, 4)),
                                               ("channels_last", "relu", [True, True, True], True, (3, 4, 3))):
        x = _x((2, 6, *spatial), dtype, device, layout)
        w, b = _gn_affine(6, dtype, device) if affine else (None, None)
        mean, rstd = _gn_stats(x, 3)
        grad_y = _x(x.shape, dtype, device, layout)
        samples.append(Sample(f"{layout}-{act}-{x.dim()}d", (grad_y, x, mean, rstd, w, b, act, mask),
                              opcheck=layout == "nchw"))
    return samples


def group_norm_affine(dtype, device):
    samples = []
    for layout, affine, spatial in (("nchw", True, (5, 4)), ("channels_last", False, (5, 4)), ("slice", True, (5, 4)),
                                    ("channels_last", True, (3, 4, 3)), ("slice", False, (2, 3, 4))):
        x = _x((2, 6, *spatial), dtype, device, layout)
        w, b = _gn_affine(6, dtype, device) if affine else (None, None)
        # Differentiable with respect to weight and bias only (csrc/ops.cpp).
        samples.append(Sample(f"{layout}-{x.dim()}d", (x, 3, w, b, 1e-5), opcheck=layout != "slice" and x.dim() == 4,
                              grad_args=(2, 3)))
    return samples


# (name, N, C, spatial, OC, kernel, stride, padding, dilation, groups, activation, layout, bias, residual, params)
# spatial: (H, W), or (D, H, W) for a 3-D convolution. params: "channel" (C,)
# BatchNorm-style, "sample" (N, C) GroupNorm-style.
_UNITS = [
    ("k3-nchw-relu", 2, 4, (5, 6), 6, 3, 1, 1, 1, 1, "relu", "nchw", True, True, "channel"),
    ("k1-cl-silu", 2, 5, (4, 3), 7, 1, 1, 0, 1, 1, "silu", "channels_last", False, False, "channel"),
    # Enough positions per sample for the CPU's chunked 1x1 path (two chunks, the last one short).
    ("k1-nchw-relu-chunked", 2, 5, (12, 12), 7, 1, 1, 0, 1, 1, "relu", "nchw", True, True, "channel"),
    ("k1-slice-gn-chunked", 2, 4, (8, 9), 6, 1, 1, 0, 1, 1, "silu", "slice", False, False, "sample"),
    ("k3s2-g2-identity", 1, 4, (7, 5), 6, 3, 2, 1, 1, 2, "identity", "nchw", False, True, "channel"),
    ("k3d2-slice", 2, 4, (6, 6), 3, 3, 1, 2, 2, 1, "relu", "slice", True, False, "channel"),
    ("gn-k3-cl-silu", 2, 4, (5, 4), 6, 3, 1, 1, 1, 1, "silu", "channels_last", True, True, "sample"),
    ("k3-cl-relu6", 2, 4, (5, 4), 6, 3, 1, 1, 1, 1, "relu6", "channels_last", False, True, "channel"),
    # 3-D convolutions: odd sizes, both layouts, a channel slice, the chunked 1x1x1 path (80 positions).
    ("3d-k3-nchw-relu", 2, 4, (3, 5, 4), 5, 3, 1, 1, 1, 1, "relu", "nchw", True, True, "channel"),
    ("3d-k1-cl-gn-chunked", 2, 4, (4, 5, 4), 6, 1, 1, 0, 1, 1, "silu", "channels_last", False, True, "sample"),
    ("3d-k3s2-slice-gn", 1, 4, (5, 3, 6), 4, 3, 2, 1, 1, 2, "identity", "slice", True, False, "sample"),
    ("3d-k3-cl-relu", 2, 3, (4, 3, 5), 4, 3, 1, 1, 1, 1, "relu", "channels_last", False, False, "channel"),
    ("3d-k1-ncdhw-relu", 2, 6, (4, 4, 5), 4, 1, 1, 0, 1, 1, "relu", "nchw", True, True, "channel"),
]
_UNITS_3D = [case for case in _UNITS if len(case[3]) == 3]


def _unit(case, dtype, device):
    (_, n, c, spatial, oc, k, s, p, d, g, act, layout, has_bias, has_res, params) = case
    x = _x((n, c, *spatial), dtype, device, layout)
    shape = (c,) if params == "channel" else (n, c)
    mean, shift = _vec(shape, dtype, device), _vec(shape, dtype, device)
    # Signs mixed, so ReLU clips on both sides of the mean.
    scale = _vec(shape, dtype, device, low=0.5) * torch.where(torch.arange(c, device=device) % 3 == 1, -1.0, 1.0)
    taps = (k,) * len(spatial)
    weight = (torch.randn((oc, c // g, *taps), dtype=torch.float64, device=device) / (k * c ** 0.5)).to(dtype)
    bias = torch.randn(oc, dtype=torch.float64, device=device).to(dtype) if has_bias else None
    out_spatial = tuple((size + 2 * p - d * (k - 1) - 1) // s + 1 for size in spatial)
    out_layout = "channels_last" if layout == "channels_last" else "nchw"
    residual = _x((n, oc, *out_spatial), dtype, device, out_layout) if has_res else None
    dims = len(spatial)
    conv = ([s] * dims, [p] * dims, [d] * dims, g, act)
    return x, mean, scale, shift, weight, bias, residual, conv


def _output_shape(x, weight, conv):
    conv_fn = torch.nn.functional.conv2d if x.dim() == 4 else torch.nn.functional.conv3d
    return conv_fn(x.new_empty(x.shape, device="meta"), weight.new_empty(weight.shape, device="meta"), None,
                   *conv[:4]).shape


def _own_statistics(x, mean, scale, groups=None):
    """(mean, scale, batch_invstd) for a unit normalising x by its own
    statistics, as the ops' contract requires with batch_invstd: per channel
    (mean (C,)), or per (sample, group) spread over channels (mean (N, C)),
    and scale = gamma * batch_invstd with gamma the given scale."""
    xd = x.double()
    if mean.dim() == 1:
        var, own = torch.var_mean(xd, dim=(0, *range(2, x.dim())), unbiased=False)
        invstd = (var + 1e-5).rsqrt()
        spread = invstd
    else:
        var, own = torch.var_mean(xd.reshape(x.shape[0], groups, -1), dim=2, unbiased=False)
        invstd = (var + 1e-5).rsqrt()
        per_group = x.shape[1] // groups
        own, spread = own.repeat_interleave(per_group, 1), invstd.repeat_interleave(per_group, 1)
    acc = mean.dtype
    return own.to(acc), (scale.double() * spread).to(acc), invstd.to(acc)


def norm_act_conv2d(dtype, device):
    samples = []
    for i, case in enumerate(_UNITS):
        x, mean, scale, shift, weight, bias, residual, conv = _unit(case, dtype, device)
        samples.append(Sample(case[0], (x, mean, scale, shift, weight, bias, residual, *conv),
                              opcheck=i < 2 or case is _UNITS_3D[0]))
    x, mean, scale, shift, weight, bias, residual, conv = _unit(_UNITS[0], dtype, device)
    mean, scale, invstd = _own_statistics(x, mean, scale)
    samples.append(Sample("bn-batch-invstd", (x, mean, scale, shift, weight, bias, residual, *conv, invstd),
                          differentiable=False, opcheck=True))
    x, mean, scale, shift, weight, bias, residual, conv = _unit(_UNITS[6], dtype, device)
    mean, scale, invstd = _own_statistics(x, mean, scale, 2)
    samples.append(Sample("gn-batch-invstd", (x, mean, scale, shift, weight, bias, residual, *conv, invstd),
                          differentiable=False))
    for case in (_UNITS_3D[0], _UNITS_3D[1]):
        x, mean, scale, shift, weight, bias, residual, conv = _unit(case, dtype, device)
        mean, scale, invstd = _own_statistics(x, mean, scale, None if mean.dim() == 1 else 2)
        samples.append(Sample(case[0] + "-batch-invstd", (x, mean, scale, shift, weight, bias, residual, *conv,
                                                          invstd), differentiable=False))
    return samples


def norm_act_conv2d_stats(dtype, device):
    samples = []
    for i, case in enumerate(_UNITS[:3] + _UNITS_3D[:2]):
        x, mean, scale, shift, weight, bias, residual, conv = _unit(case, dtype, device)
        samples.append(Sample(case[0], (x, mean, scale, shift, weight, bias, residual, *conv), opcheck=i < 2))
    x, mean, scale, shift, weight, bias, residual, conv = _unit(_UNITS[1], dtype, device)
    mean, scale, invstd = _own_statistics(x, mean, scale)
    samples.append(Sample("batch-invstd", (x, mean, scale, shift, weight, bias, residual, *conv, invstd),
                          differentiable=False))
    return samples


def norm_act_conv2d_into(dtype, device):
    samples = []
    for i, case in enumerate(_UNITS):
        x, mean, scale, shift, weight, bias, residual, conv = _unit(case, dtype, device)
        n, oc, *spatial = _output_shape(x, weight, conv)
        out = _x((n, oc + 5, *spatial), dtype, device, "channels_last" if case[11] == "channels_last" else "nchw")
        samples.append(Sample(case[0], (x, mean, scale, shift, weight, bias, residual, *conv, out, 3, i % 2 == 0),
                              differentiable=False, opcheck=i < 2))
    return samples


def norm_act_conv2d_backward(dtype, device):
    samples = []
    for i, (case, mask, invstd) in enumerate([(_UNITS[0], [True, True], False), (_UNITS[1], [True, False], True),
                                              (_UNITS[2], [False, True], False), (_UNITS[3], [True, True], True),
                                              (_UNITS[4], [True, True], True), (_UNITS_3D[0], [True, True], True),
                                              (_UNITS_3D[1], [True, True], True), (_UNITS_3D[2], [True, False], False),
                                              (_UNITS_3D[3], [False, True], False),
                                              (_UNITS_3D[4], [True, True], True)]):
        x, mean, scale, shift, weight, _, residual, conv = _unit(case, dtype, device)
        y_shape = _output_shape(x, weight, conv)
        grad_out = _x(tuple(y_shape), dtype, device, "channels_last" if case[11] == "channels_last" else "nchw")
        batch_invstd = None
        if invstd:
            mean, scale, batch_invstd = _own_statistics(x, mean, scale, 2)
        samples.append(Sample(f"{case[0]}-{mask}", (grad_out, x, mean, scale, shift, weight, *conv, batch_invstd,
                                                    mask), opcheck=i < 3 or case is _UNITS_3D[0]))
    return samples


def batch_norm_affine(dtype, device):
    samples = []
    for name, layout, training, affine, given, spatial in (
            ("train", "nchw", True, True, False, (4, 6)),
            ("train-cl-plain", "channels_last", True, False, False, (4, 6)),
            ("train-given-stats", "nchw", True, True, True, (4, 6)),
            ("eval", "channels_last", False, True, False, (4, 6)),
            ("train-5d-cl", "channels_last", True, True, False, (3, 4, 2)),
            ("eval-5d", "nchw", False, True, False, (3, 2, 4))):
        x = _x((3, 5, *spatial), dtype, device, layout)
        running = _vec(5, dtype, device), _vec(5, dtype, device, low=0.5)
        w, b = (_vec(5, dtype, device, low=0.5), _vec(5, dtype, device)) if affine else (None, None)
        stats = (None, None)
        if given:
            var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
            stats = mean.to(_acc(dtype)), var.to(_acc(dtype))
        samples.append(Sample(name, (x, *running, w, b, training, 0.1, 1e-5, *stats),
                              opcheck=not given and x.dim() == 4, grad_args=(3, 4)))
    return samples


def batch_norm_act_conv2d(dtype, device):
    samples = []
    for i, (case, training, given) in enumerate(((_UNITS[0], True, False), (_UNITS[1], False, False),
                                                 (_UNITS[2], True, True), (_UNITS_3D[0], True, False),
                                                 (_UNITS_3D[3], False, False), (_UNITS_3D[1], True, True))):
        x, _, _, _, weight, bias, residual, conv = _unit(case, dtype, device)
        c = x.shape[1]
        running = _vec(c, dtype, device), _vec(c, dtype, device, low=0.5)
        affine = _vec(c, dtype, device, low=0.5), _vec(c, dtype, device)
        stats = (None, None)
        if given:
            var, mean = torch.var_mean(x.double(), dim=(0, *range(2, x.dim())), unbiased=False)
            stats = mean.to(_acc(dtype)), var.to(_acc(dtype))
        samples.append(Sample(case[0] + ("-train" if training else "-eval"),
                              (x, *running, *affine, training, 0.1, 1e-5, weight, bias, residual, *conv, *stats),
                              opcheck=i == 0, differentiable=not given))
    return samples


def group_norm_act_conv2d(dtype, device):
    x, _, _, _, weight, bias, residual, conv = _unit(_UNITS[0], dtype, device)
    gn = _gn_affine(x.shape[1], dtype, device)
    x3, _, _, _, weight3, bias3, residual3, conv3 = _unit(_UNITS_3D[1], dtype, device)
    return [Sample("affine", (x, 2, *gn, 1e-5, weight, bias, residual, *conv), opcheck=True),
            Sample("plain", (x, 4, None, None, 1e-5, weight, None, None, *conv)),
            Sample("3d-affine", (x3, 2, *_gn_affine(x3.shape[1], dtype, device), 1e-5, weight3, bias3, residual3,
                                 *conv3))]


# (name, N, C, H, W, kernel, stride, padding, dilation, ceil_mode, activation, layout)
_POOLS = [("stem-relu-nchw", 2, 5, 11, 9, 3, 2, 1, 1, False, "relu", "nchw"),
          ("k2-ceil-relu6-cl", 2, 4, 7, 6, 2, 2, 0, 1, True, "relu6", "channels_last"),
          ("k3-dilated-identity-slice", 1, 3, 9, 8, 3, 1, 1, 2, False, "identity", "slice"),
          ("k3-silu-cl", 2, 4, 8, 7, 3, 2, 1, 1, True, "silu", "channels_last")]


def _pool(case, dtype, device):
    _, n, c, h, w, k, s, p, d, ceil, act, layout = case
    x = _x((n, c, h, w), dtype, device, layout)
    mean, shift = _vec(c, dtype, device), _vec(c, dtype, device)
    scale = _vec(c, dtype, device, low=0.5) * torch.where(torch.arange(c, device=device) % 3 == 1, -1.0, 1.0)
    pooled = torch.nn.functional.max_pool2d(x.new_empty(x.shape, device="meta"), k, s, p, d, ceil)
    return x, mean, scale, shift, ([k, k], [s, s], [p, p], [d, d], ceil, act), pooled.shape


def norm_act_max_pool2d(dtype, device):
    samples = []
    for i, case in enumerate(_POOLS):
        x, mean, scale, shift, pool, _ = _pool(case, dtype, device)
        samples.append(Sample(case[0], (x, mean, scale, shift, *pool), opcheck=i < 2))
        mean, scale, invstd = _own_statistics(x, mean, scale)
        samples.append(Sample(case[0] + "-batch-invstd", (x, mean, scale, shift, *pool, invstd), differentiable=False,
                              opcheck=i == 0))
    return samples


def norm_act_max_pool2d_backward(dtype, device):
    samples = []
    for i, case in enumerate(_POOLS):
        x, mean, scale, shift, pool, shape = _pool(case, dtype, device)
        grad_out = _x(tuple(shape), dtype, device, "channels_last" if case[-1] == "channels_last" else "nchw")
        invstd = None
        if i % 2 == 0:
            mean, scale, invstd = _own_statistics(x, mean, scale)
        samples.append(Sample(case[0], (grad_out, x, mean, scale, shift, *pool, invstd), opcheck=i < 2))
    return samples


SAMPLES = {f.__name__: f for f in (batch_norm_act_conv2d, group_norm_act_conv2d, batch_norm_affine, channel_stats,
                                   channel_stats_backward, group_stats, group_stats_backward, group_norm,
                                   group_norm_backward, group_norm_affine,
                                   norm_act_conv2d, norm_act_conv2d_stats, norm_act_conv2d_into,
                                   norm_act_conv2d_backward, norm_act_max_pool2d, norm_act_max_pool2d_backward)}
