"""Per-channel batch statistics (mean, biased variance) over (N, H, W) and their gradient
(5-D tensors as their (N, C, D*H, W) views).

Each program folds its rows into (count, mean, M2) with Chan's parallel update,
computing every tile's M2 around the tile's own mean. Unlike sum / sum-of-squares
this does not cancel catastrophically when |mean| >> std (e.g. 1e4 + N(0, 1)).
The per-program partials are merged with the same formula in float64 by torch,
in a fixed order, so the result is deterministic (no atomics).
"""
import torch
import triton
import triton.language as tl

from ._common import launch, assert_launchable, config_for, empty_like_format, multiprocessor_count, ship

# Tall tiles when rows are the contiguous direction (NCHW), wide tiles when
# channels are (channels_last).
STATS_CONFIGS = [
    dict(BLOCK_M=256, BLOCK_C=8, num_warps=4, num_stages=2),
    dict(BLOCK_M=32, BLOCK_C=64, num_warps=4, num_stages=2),
]


@triton.jit
def _merge_tile_moments(count, mean, m2, xv, mask):
    """Chan et al.'s merge of a (rows, columns) tile's per-column moments into
    the running (count, mean, m2); xv is zero where mask is off, and a tile
    with no values in a column leaves that column's moments as they were."""
    t_count = tl.sum(mask.to(tl.float32), axis=0)
    t_mean = tl.sum(xv, axis=0) / tl.maximum(t_count, 1.0)
    d = tl.where(mask, xv - t_mean[None, :], 0.0)
    t_m2 = tl.sum(d * d, axis=0)
    new_count = count + t_count
    frac = t_count / tl.maximum(new_count, 1.0)
    delta = t_mean - mean
    return new_count, mean + delta * frac, m2 + t_m2 + delta * delta * count * frac


@triton.jit
def _row_offsets(rows, HW, W, sxn, sxh, sxw):
    n = rows // HW
    hw = rows - n * HW
    h = hw // W
    w = hw - h * W
    return n.to(tl.int64) * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw


@triton.jit
def _stats_partial_kernel(
    x_ptr, part_ptr, M, C, HW, W, ITERS,
    sxn, sxc, sxh, sxw,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    x_col = c.to(tl.int64) * sxc

    count = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for it in range(0, ITERS):
        rows = (pid_m * ITERS + it) * BLOCK_M + tl.arange(0, BLOCK_M)
        r_mask = rows < M
        mask = r_mask[:, None] & c_mask[None, :]
        x_ptrs = x_ptr + _row_offsets(rows, HW, W, sxn, sxh, sxw)[:, None] + x_col[None, :]
        xv = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        count, mean, m2 = _merge_tile_moments(count, mean, m2, xv, mask)

    # part_ptr is a contiguous fp32 (3, num_pid_m, C) buffer: count, mean, M2.
    plane = tl.num_programs(0).to(tl.int64) * C
    p_ptrs = part_ptr + pid_m.to(tl.int64) * C + c
    tl.store(p_ptrs, count, mask=c_mask)
    tl.store(p_ptrs + plane, mean, mask=c_mask)
    tl.store(p_ptrs + 2 * plane, m2, mask=c_mask)


@triton.jit
def _stats_backward_kernel(
    x_ptr, mean_ptr, gmean_ptr, gvar_ptr, gx_ptr, inv_m, M, C, HW, W,
    sxn, sxc, sxh, sxw,
    sgn, sgc, sgh, sgw,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mask = (rows < M)[:, None] & c_mask[None, :]
    c64 = c.to(tl.int64)
    x_ptrs = x_ptr + _row_offsets(rows, HW, W, sxn, sxh, sxw)[:, None] + (c64 * sxc)[None, :]
    xv = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    mu = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
    gm = tl.load(gmean_ptr + c, mask=c_mask, other=0.0) * inv_m
    gv = tl.load(gvar_ptr + c, mask=c_mask, other=0.0) * (2.0 * inv_m)
    gx = gm[None, :] + gv[None, :] * (xv - mu[None, :])
    gx_ptrs = gx_ptr + _row_offsets(rows, HW, W, sgn, sgh, sgw)[:, None] + (c64 * sgc)[None, :]
    tl.store(gx_ptrs, gx.to(gx_ptr.dtype.element_ty), mask=mask)


ship(_stats_partial_kernel, STATS_CONFIGS)
ship(_stats_backward_kernel, STATS_CONFIGS)


def _config(kernel, x):
    # Tile along whichever of rows / channels is contiguous in memory.
    return config_for(kernel, lambda: STATS_CONFIGS[1] if x.stride(1) == 1 else STATS_CONFIGS[0])


def _as_4d(x):
    """A 5-D NCDHW- or channels_last_3d-contiguous x as the (N, C, D*H, W) view
    in the matching 4-D layout, which the kernels' row indexing covers."""
    return x.flatten(2, 3) if x.dim() == 5 else x


def channel_stats(x):
    """(mean, var) of x over every dim but C: float32 (C,) each, biased
    variance. x: NC(D)HW- or channels_last(_3d)-contiguous, at least one value
    per channel."""
    assert_launchable(_stats_partial_kernel, x)
    x = _as_4d(x)
    _, C, H, W = x.shape
    M = x.shape[0] * H * W
    cfg = _config(_stats_partial_kernel, x)
    c_tiles = triton.cdiv(C, cfg["BLOCK_C"])
    row_tiles = triton.cdiv(M, cfg["BLOCK_M"])
    # Enough programs for ~4 waves; each keeps folding tiles in registers
    # beyond that, which keeps the partial buffer small.
    want_programs = triton.cdiv(4 * multiprocessor_count(x.device), c_tiles)
    iters = triton.cdiv(row_tiles, min(row_tiles, want_programs))
    grid = (triton.cdiv(row_tiles, iters), c_tiles)
    partials = torch.empty((3, grid[0], C), dtype=torch.float32, device=x.device)
    launch(_stats_partial_kernel)[grid](x, partials, M, C, H * W, W, iters, *x.stride(), **cfg)
    count, mean_p, m2_p = partials.double().unbind(0)
    mean = (count * mean_p).sum(dim=0) / M
    m2 = m2_p.sum(dim=0) + (count * (mean_p - mean) ** 2).sum(dim=0)
    return mean.float(), (m2 / M).float()


def channel_stats_backward(x, mean, grad_mean, grad_var):
    """grad_x = grad_mean/M + grad_var * 2 (x - mean)/M, in x's dtype and memory
    format; mean, grad_mean, grad_var: contiguous float32 (C,)."""
    assert_launchable(_stats_backward_kernel, x, mean, grad_mean, grad_var)
    shape, x = x.shape, _as_4d(x)
    _, C, H, W = x.shape
    grad_x = empty_like_format(x, x.shape, x.dtype)
    M = x.shape[0] * H * W
    if grad_x.numel() == 0:
        return grad_x.view(shape)
    cfg = _config(_stats_backward_kernel, x)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(C, cfg["BLOCK_C"]))
    launch(_stats_backward_kernel)[grid](x, mean, grad_mean, grad_var, grad_x, 1.0 / M, M, C, H * W, W,
                                 *x.stride(), *grad_x.stride(), **cfg)
    return grad_x.view(shape)
