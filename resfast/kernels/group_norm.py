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

from ._common import launch, activation_code, assert_launchable, config_for, empty_like_format, is_channels_last, \
    multiprocessor_count, ship
from .conv import _act, _act_grad
from .stats import _merge_tile_moments

# [BLOCK_HW, BLOCK_C] tiles: wide in channels for channels_last, tall in
# pixels for NCHW.
GN_CONFIGS = [
    dict(BLOCK_HW=32, BLOCK_C=64, num_warps=4, num_stages=2),
    dict(BLOCK_HW=256, BLOCK_C=4, num_warps=4, num_stages=2),
]


def _strides(t):
    """(sample, pixel, channel) strides of a 4-D tensor contiguous in NCHW or channels_last."""
    return t.stride(0), t.stride(3), t.stride(1)


@triton.jit
def _tile(pid_n, hw, c, HW, C, sn, shw, sc):
    mask = (hw < HW)[:, None] & (c < C)[None, :]
    offs = pid_n.to(tl.int64) * sn + hw.to(tl.int64)[:, None] * shw + c.to(tl.int64)[None, :] * sc
    return offs, mask


@triton.jit
def _load_params(mean_ptr, scale_ptr, shift_ptr, k, mask):
    """The (N, C) parameters at flat indices k = n * C + c."""
    return (tl.load(mean_ptr + k, mask=mask, other=0.0), tl.load(scale_ptr + k, mask=mask, other=0.0),
            tl.load(shift_ptr + k, mask=mask, other=0.0))


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
    # Pixel tiles on grid axis 0, the one without a 65,535 limit.
    pid_n = tl.program_id(1)
    hw = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs, mask = _tile(pid_n, hw, c, HW, C, sn, shw, sc)
    y_offs, _ = _tile(pid_n, hw, c, HW, C, syn, syhw, syc)
    c_mask = c < C
    k = pid_n * C + c
    mu, s, b = _load_params(mean_ptr, scale_ptr, shift_ptr, k, c_mask)
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
    mu, s, b = _load_params(mean_ptr, scale_ptr, shift_ptr, k, c_mask)
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
    # Pixel tiles on grid axis 0, the one without a 65,535 limit.
    pid_n = tl.program_id(1)
    hw = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)
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


ship(_gn_stats_partial_kernel, GN_CONFIGS)
ship(_gn_apply_kernel, GN_CONFIGS)
ship(_gn_backward_partial_kernel, GN_CONFIGS)
ship(_gn_input_grad_kernel, GN_CONFIGS)


def _config(kernel, x):
    return config_for(kernel, lambda: GN_CONFIGS[0] if is_channels_last(x) else GN_CONFIGS[1])


def _splits(x, cfg):
    """Pixel range per program: enough programs for ~4 waves over (N, C tiles)."""
    n, c, h, w = x.shape
    hw_tiles = triton.cdiv(h * w, cfg["BLOCK_HW"])
    base = n * triton.cdiv(c, cfg["BLOCK_C"])
    want = max(1, triton.cdiv(4 * multiprocessor_count(x.device), base))
    per_prog = triton.cdiv(hw_tiles, min(hw_tiles, want)) * cfg["BLOCK_HW"]
    return triton.cdiv(h * w, per_prog), per_prog


# Every launcher takes NCHW- or channels_last-contiguous tensors and (N, C)
# float32 parameters.
def launch_stats_partials(x):
    """(4, N, S, C) float32 per-channel (count, pivot, mean - pivot, M2) of S pixel ranges per sample."""
    assert_launchable(_gn_stats_partial_kernel, x)
    cfg = _config(_gn_stats_partial_kernel, x)
    n, c, h, w = x.shape
    splits, per_prog = _splits(x, cfg)
    part = torch.empty((4, n, splits, c), dtype=torch.float32, device=x.device)
    grid = (n, splits, triton.cdiv(c, cfg["BLOCK_C"]))
    launch(_gn_stats_partial_kernel)[grid](x, part, h * w, c, per_prog, *_strides(x), **cfg)
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


def _elementwise_grid(x, cfg):
    n, c, h, w = x.shape
    return (triton.cdiv(h * w, cfg["BLOCK_HW"]), n, triton.cdiv(c, cfg["BLOCK_C"]))


def apply(x, mean_c, scale_c, shift_c, activation):
    """act((x - mean) * scale + shift) with (N, C) float32 parameters, laid out like x."""
    assert_launchable(_gn_apply_kernel, x, mean_c, scale_c, shift_c)
    cfg = _config(_gn_apply_kernel, x)
    c, hw = x.shape[1], x.shape[2] * x.shape[3]
    y = empty_like_format(x, x.shape, x.dtype)
    launch(_gn_apply_kernel)[_elementwise_grid(x, cfg)](x, y, mean_c, scale_c, shift_c, hw, c, *_strides(x),
                                                        *_strides(y), ACT=activation_code(activation), **cfg)
    return y


def launch_backward_partials(grad_y, x, mean_c, scale_c, shift_c, activation):
    """(2, N, S, C) float32 partial sums of dz = act'(z) * grad_y and of dz * (x - mean)."""
    assert_launchable(_gn_backward_partial_kernel, x, grad_y, mean_c, scale_c, shift_c)
    cfg = _config(_gn_backward_partial_kernel, x)
    n, c, h, w = x.shape
    splits, per_prog = _splits(x, cfg)
    part = torch.empty((2, n, splits, c), dtype=torch.float32, device=x.device)
    grid = (n, splits, triton.cdiv(c, cfg["BLOCK_C"]))
    launch(_gn_backward_partial_kernel)[grid](x, grad_y, part, mean_c, scale_c, shift_c, h * w, c, per_prog,
                                      *_strides(x), *_strides(grad_y), ACT=activation_code(activation), **cfg)
    return part


def input_grad(x, grad_y, mean_c, scale_c, shift_c, coef_a, coef_b, activation):
    """coef_a + coef_b * (x - mean) [+ act'(z) * grad_y * scale] in x's dtype and layout."""
    assert_launchable(_gn_input_grad_kernel, x, grad_y, mean_c, scale_c, shift_c, coef_a, coef_b)
    cfg = _config(_gn_input_grad_kernel, x)
    c, hw = x.shape[1], x.shape[2] * x.shape[3]
    gx = empty_like_format(x, x.shape, x.dtype)
    has_gy = grad_y is not None
    gy = grad_y if has_gy else x
    launch(_gn_input_grad_kernel)[_elementwise_grid(x, cfg)](x, gy, gx, mean_c, scale_c, shift_c, coef_a, coef_b, hw,
                                                             c, *_strides(x), *_strides(gy), *_strides(gx),
                                                             ACT=activation_code(activation), HAS_GY=has_gy, **cfg)
    return gx
