"""GroupNorm's per-(sample, group) statistics, channels_last first (its
elementwise passes are the per-(sample, channel) kernels of pointwise.py).

x is addressed as (N, HW, C) with strides (sn, shw, sc), which covers both
NC(D)HW- and channels_last(_3d)-contiguous tensors (HW: every spatial position); tiles are [BLOCK_HW, BLOCK_C] with
channels contiguous in the channels_last configs.

The reduction is split over many programs per (sample, group): a program
reduces a range of HW_PER_PROG pixels for BLOCK_C channels, writing per-channel
partials; torch then folds the partials of a group in float64 in a fixed order
(deterministic, no atomics). Partials are (count, mean, M2) per tile, merged
with Chan's formula, so a large mean does not cancel the variance.
"""
import torch
import triton
import triton.language as tl

from resfast.ops.layout import spatial_numel

from ._common import assert_launchable, config_for, is_channels_last, launch, ship
from .pointwise import TILE_CONFIGS as GN_CONFIGS, _strides, _tile, pixel_splits
from .stats import _merge_tile_moments


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


ship(_gn_stats_partial_kernel, GN_CONFIGS)


def launch_stats_partials(x):
    """(4, N, S, C) float32 per-channel (count, pivot, mean - pivot, M2) of S
    pixel ranges per sample; x NC(D)HW- or channels_last(_3d)-contiguous."""
    assert_launchable(_gn_stats_partial_kernel, x)
    cfg = config_for(_gn_stats_partial_kernel, lambda: GN_CONFIGS[0] if is_channels_last(x) else GN_CONFIGS[1])
    n, c = x.shape[:2]
    splits, per_prog = pixel_splits(x, cfg)
    part = torch.empty((4, n, splits, c), dtype=torch.float32, device=x.device)
    grid = (n, splits, triton.cdiv(c, cfg["BLOCK_C"]))
    launch(_gn_stats_partial_kernel)[grid](x, part, spatial_numel(x), c, per_prog, *_strides(x), **cfg)
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
