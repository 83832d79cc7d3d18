"""GroupNorm (+ activation) and its per-(sample, group) statistics, channels_last first.

x is addressed as (N, HW, C) with strides (sn, shw, sc), which covers both
NCHW- and channels_last-contiguous tensors; tiles are [BLOCK_HW, BLOCK_C] with
channels contiguous in the channels_last configs.

Every reduction is split over many programs per (sample, group): a program
reduces a range of HW_PER_PROG pixels for BLOCK_C channels, writing per-channel
partials; torch then folds the partials of a group in float64 in a fixed order
(deterministic, no atomics). Statistics partials are (count, mean, M2) per
tile, merged with Chan's formula, so a large mean does not cancel the variance.
The elementwise passes take per-(sample, channel) (N, C) float32 parameters.
"""
import torch
import triton
import triton.language as tl

from ._common import activation_code, check_activation_tensor, check_device, empty_like_format, \
    is_channels_last, multiprocessor_count
from .conv import _act, _act_grad
from .stats import _merge_tile_moments

# [BLOCK_HW, BLOCK_C] tiles: wide in channels for channels_last, tall in
# pixels for NCHW. tests/test_triton_aot.py compiles every entry.
GN_CONFIGS = [
    dict(BLOCK_HW=32, BLOCK_C=64, num_warps=4, num_stages=2),
    dict(BLOCK_HW=256, BLOCK_C=4, num_warps=4, num_stages=2),
]


def _pick_config(x):
    return GN_CONFIGS[0] if is_channels_last(x) else GN_CONFIGS[1]


def _launch_options(cfg):
    return dict(BLOCK_HW=cfg["BLOCK_HW"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"])


def _strides(t):
    """(sample, pixel, channel) strides of a 4-D tensor contiguous in NCHW or channels_last."""
    return t.stride(0), t.stride(3), t.stride(1)


@triton.jit
def _tile(pid_n, hw, c, HW, C, sn, shw, sc):
    mask = (hw < HW)[:, None] & (c < C)[None, :]
    offs = pid_n.to(tl.int64) * sn + hw.to(tl.int64)[:, None] * shw + c.to(tl.int64)[None, :] * sc
    return offs, mask


@triton.jit
def _gn_stats_partial_kernel(
    x_ptr, part_ptr, HW, C, HW_PER_PROG, sn, shw, sc,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    # Moments of x - pivot, pivot = the range's first value of each channel:
    # a float32 mean of 1e4 would be off by 5e-4, and so the variance across
    # a group's channels; shifted values stay small and exact.
    first = pid_s * HW_PER_PROG
    pivot = tl.load(x_ptr + pid_n.to(tl.int64) * sn + first.to(tl.int64) * shw + c.to(tl.int64) * sc,
                    mask=c_mask, other=0.0).to(tl.float32)
    count = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for start in range(first, tl.minimum(first + HW_PER_PROG, HW), BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        offs, mask = _tile(pid_n, hw, c, HW, C, sn, shw, sc)
        xv = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - pivot[None, :], 0.0)
        count, mean, m2 = _merge_tile_moments(count, mean, m2, xv, mask)
    # part_ptr: contiguous fp32 (4, N, S, C): count, pivot, mean - pivot, M2.
    plane = tl.num_programs(0).to(tl.int64) * tl.num_programs(1) * C
    p = part_ptr + (pid_n.to(tl.int64) * tl.num_programs(1) + pid_s) * C + c
    tl.store(p, count, mask=c_mask)
    tl.store(p + plane, pivot, mask=c_mask)
    tl.store(p + 2 * plane, mean, mask=c_mask)
    tl.store(p + 3 * plane, m2, mask=c_mask)


@triton.jit
def _gn_apply_kernel(
    x_ptr, y_ptr, mean_ptr, scale_ptr, shift_ptr, HW, C, sn, shw, sc, syn, syhw, syc,
    ACT: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_n = tl.program_id(0)
    hw = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs, mask = _tile(pid_n, hw, c, HW, C, sn, shw, sc)
    y_offs, _ = _tile(pid_n, hw, c, HW, C, syn, syhw, syc)
    c_mask = c < C
    k = pid_n * C + c
    mu = tl.load(mean_ptr + k, mask=c_mask, other=0.0)
    s = tl.load(scale_ptr + k, mask=c_mask, other=0.0)
    b = tl.load(shift_ptr + k, mask=c_mask, other=0.0)
    xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = _act((xv - mu[None, :]) * s[None, :] + b[None, :], ACT)
    tl.store(y_ptr + y_offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_backward_partial_kernel(
    x_ptr, gy_ptr, part_ptr, mean_ptr, scale_ptr, shift_ptr, HW, C, HW_PER_PROG, sn, shw, sc, sgn, sghw, sgc,
    ACT: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    k = pid_n * C + c
    mu = tl.load(mean_ptr + k, mask=c_mask, other=0.0)
    s = tl.load(scale_ptr + k, mask=c_mask, other=0.0)
    b = tl.load(shift_ptr + k, mask=c_mask, other=0.0)
    sum_dz = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_dz_x = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for start in range(pid_s * HW_PER_PROG, tl.minimum((pid_s + 1) * HW_PER_PROG, HW), BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        offs, mask = _tile(pid_n, hw, c, HW, C, sn, shw, sc)
        g_offs, _ = _tile(pid_n, hw, c, HW, C, sgn, sghw, sgc)
        xc = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mu[None, :]
        gy = tl.load(gy_ptr + g_offs, mask=mask, other=0.0).to(tl.float32)
        dz = tl.where(mask, gy * _act_grad(xc * s[None, :] + b[None, :], ACT), 0.0)
        sum_dz += tl.sum(dz, axis=0)
        sum_dz_x += tl.sum(dz * xc, axis=0)
    # part_ptr: contiguous fp32 (2, N, S, C).
    plane = tl.num_programs(0).to(tl.int64) * tl.num_programs(1) * C
    p = part_ptr + (pid_n.to(tl.int64) * tl.num_programs(1) + pid_s) * C + c
    tl.store(p, sum_dz, mask=c_mask)
    tl.store(p + plane, sum_dz_x, mask=c_mask)


@triton.jit
def _gn_input_grad_kernel(
    x_ptr, gy_ptr, gx_ptr, mean_ptr, scale_ptr, shift_ptr, a_ptr, b_ptr, HW, C,
    sn, shw, sc, sgn, sghw, sgc, son, sohw, soc,
    ACT: tl.constexpr, HAS_GY: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grad_x = a + b * (x - mean) [+ act'(z) * grad_y * scale], per-(n, c) a, b, mean, scale, shift.
    pid_n = tl.program_id(0)
    hw = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs, mask = _tile(pid_n, hw, c, HW, C, sn, shw, sc)
    o_offs, _ = _tile(pid_n, hw, c, HW, C, son, sohw, soc)
    c_mask = c < C
    k = pid_n * C + c
    mu = tl.load(mean_ptr + k, mask=c_mask, other=0.0)
    ca = tl.load(a_ptr + k, mask=c_mask, other=0.0)
    cb = tl.load(b_ptr + k, mask=c_mask, other=0.0)
    xc = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mu[None, :]
    g = ca[None, :] + cb[None, :] * xc
    if HAS_GY:
        s = tl.load(scale_ptr + k, mask=c_mask, other=0.0)
        b = tl.load(shift_ptr + k, mask=c_mask, other=0.0)
        g_offs, _ = _tile(pid_n, hw, c, HW, C, sgn, sghw, sgc)
        gy = tl.load(gy_ptr + g_offs, mask=mask, other=0.0).to(tl.float32)
        g += gy * _act_grad(xc * s[None, :] + b[None, :], ACT) * s[None, :]
    tl.store(gx_ptr + o_offs, g.to(gx_ptr.dtype.element_ty), mask=mask)


def _splits(x, cfg):
    """Pixel range per program: enough programs for ~4 waves over (N, C tiles)."""
    n, c, h, w = x.shape
    hw_tiles = triton.cdiv(h * w, cfg["BLOCK_HW"])
    base = n * triton.cdiv(c, cfg["BLOCK_C"])
    want = max(1, triton.cdiv(4 * multiprocessor_count(x.device), base))
    per_prog = triton.cdiv(hw_tiles, min(hw_tiles, want)) * cfg["BLOCK_HW"]
    return triton.cdiv(h * w, per_prog), per_prog


def _check(x):
    check_activation_tensor("x", x)
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError("x: expected an NCHW- or channels_last-contiguous tensor")


def launch_stats_partials(x, cfg=None):
    """(4, N, S, C) float32 per-channel (count, pivot, mean - pivot, M2) of S pixel ranges per sample."""
    _check(x)
    check_device(_gn_stats_partial_kernel, x)
    cfg = cfg or _pick_config(x)
    n, c, h, w = x.shape
    splits, per_prog = _splits(x, cfg)
    part = torch.empty((4, n, splits, c), dtype=torch.float32, device=x.device)
    grid = (n, splits, triton.cdiv(c, cfg["BLOCK_C"]))
    _gn_stats_partial_kernel[grid](x, part, h * w, c, per_prog, *_strides(x), **_launch_options(cfg))
    return part


def group_stats(x, num_groups):
    """(N, G) float32 mean and biased variance of each (sample, group)."""
    n, c = x.shape[:2]
    count, pivot, offset, m2_p = launch_stats_partials(x).double().reshape(4, n, -1, num_groups, c // num_groups) \
        .permute(0, 1, 3, 2, 4).reshape(4, n, num_groups, -1).unbind(0)
    mean_p = pivot + offset
    total = count.sum(2)
    mean = (count * mean_p).sum(2) / total
    m2 = m2_p.sum(2) + (count * (mean_p - mean[:, :, None]) ** 2).sum(2)
    return mean.float(), (m2 / total).float()


def _per_channel(per_group, channels):
    return per_group.repeat_interleave(channels // per_group.shape[1], dim=1).contiguous()


def apply(x, mean_c, scale_c, shift_c, activation, cfg=None):
    """act((x - mean) * scale + shift) with (N, C) float32 parameters, laid out like x."""
    _check(x)
    check_device(_gn_apply_kernel, x)
    cfg = cfg or _pick_config(x)
    n, c, h, w = x.shape
    y = empty_like_format(x, x.shape, x.dtype)
    grid = (n, triton.cdiv(h * w, cfg["BLOCK_HW"]), triton.cdiv(c, cfg["BLOCK_C"]))
    _gn_apply_kernel[grid](x, y, mean_c, scale_c, shift_c, h * w, c, *_strides(x), *_strides(y),
                           ACT=activation_code(activation), **_launch_options(cfg))
    return y


def launch_backward_partials(grad_y, x, mean_c, scale_c, shift_c, activation, cfg=None):
    """(2, N, S, C) float32 partial sums of dz = act'(z) * grad_y and of dz * (x - mean)."""
    _check(x)
    check_device(_gn_backward_partial_kernel, x, grad_y)
    cfg = cfg or _pick_config(x)
    n, c, h, w = x.shape
    splits, per_prog = _splits(x, cfg)
    part = torch.empty((2, n, splits, c), dtype=torch.float32, device=x.device)
    grid = (n, splits, triton.cdiv(c, cfg["BLOCK_C"]))
    _gn_backward_partial_kernel[grid](x, grad_y, part, mean_c, scale_c, shift_c, h * w, c, per_prog,
                                      *_strides(x), *_strides(grad_y), ACT=activation_code(activation),
                                      **_launch_options(cfg))
    return part


def input_grad(x, grad_y, mean_c, scale_c, shift_c, coef_a, coef_b, activation, cfg=None):
    """coef_a + coef_b * (x - mean) [+ act'(z) * grad_y * scale] in x's dtype and layout."""
    _check(x)
    check_device(_gn_input_grad_kernel, x, grad_y)
    cfg = cfg or _pick_config(x)
    n, c, h, w = x.shape
    gx = empty_like_format(x, x.shape, x.dtype)
    has_gy = grad_y is not None
    gy = grad_y if has_gy else x
    grid = (n, triton.cdiv(h * w, cfg["BLOCK_HW"]), triton.cdiv(c, cfg["BLOCK_C"]))
    _gn_input_grad_kernel[grid](x, gy, gx, mean_c, scale_c, shift_c, coef_a, coef_b, h * w, c, *_strides(x),
                                *_strides(gy), *_strides(gx), ACT=activation_code(activation), HAS_GY=has_gy,
                                **_launch_options(cfg))
    return gx


def group_stats_backward(x, mean, grad_mean, grad_var):
    count = x[0].numel() // mean.shape[1]
    c = x.shape[1]
    mean_c = _per_channel(mean, c)
    coef_a = _per_channel(grad_mean / count, c)
    coef_b = _per_channel(2 * grad_var / count, c)
    return input_grad(x, None, mean_c, mean_c, mean_c, coef_a, coef_b, "identity")


def _channel_params(x, mean, rstd, weight, bias):
    n, c = x.shape[:2]
    mean_c = _per_channel(mean, c)
    scale_c = _per_channel(rstd, c)
    if weight is not None:
        scale_c = (scale_c * weight.float()).contiguous()
    shift_c = (torch.zeros((n, c), dtype=torch.float32, device=x.device) if bias is None
               else bias.float().expand(n, c).contiguous())
    return mean_c, scale_c, shift_c


def group_norm(x, num_groups, weight, bias, eps, activation):
    mean, var = group_stats(x, num_groups)
    rstd = torch.rsqrt(var + eps)
    y = apply(x, *_channel_params(x, mean, rstd, weight, bias), activation)
    return y, mean, rstd


def group_norm_backward(grad_y, x, mean, rstd, weight, bias, activation, output_mask):
    n, c = x.shape[:2]
    groups = mean.shape[1]
    mean_c, scale_c, shift_c = _channel_params(x, mean, rstd, weight, bias)
    sums = launch_backward_partials(grad_y, x, mean_c, scale_c, shift_c, activation).double().sum(2)
    sum_dz, sum_dz_x = sums.unbind(0)  # (N, C) each
    grad_x = grad_weight = grad_bias = None
    if output_mask[1]:
        grad_weight = (sum_dz_x * _per_channel(rstd.double(), c)).sum(0)
        grad_weight = grad_weight.to(torch.float32 if weight is None else weight.dtype)
    if output_mask[2]:
        grad_bias = sum_dz.sum(0).to(torch.float32 if bias is None else bias.dtype)
    if output_mask[0]:
        # grad_x = dz * scale - rstd / M * S1 - (x - mean) * rstd^3 / M * S2 with
        # S1 = sum_c weight * sum(dz), S2 = sum_c weight * sum(dz * (x - mean)).
        w = torch.ones(c, dtype=torch.float64, device=x.device) if weight is None else weight.double()
        s1 = (sum_dz * w).reshape(n, groups, -1).sum(2)
        s2 = (sum_dz_x * w).reshape(n, groups, -1).sum(2)
        count = x[0].numel() // groups
        r = rstd.double()
        coef_a = _per_channel((-r * s1 / count).float(), c)
        coef_b = _per_channel((-r**3 * s2 / count).float(), c)
        grad_x = input_grad(x, grad_y, mean_c, scale_c, shift_c, coef_a, coef_b, activation)
    return grad_x, grad_weight, grad_bias
