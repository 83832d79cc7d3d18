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

from resfast.ops.layout import spatial_numel

from ._common import assert_launchable, config_for, empty_like_format, is_channels_last, launch, multiprocessor_count, \
    ship
from .pointwise import _strides, pixel_splits

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


@triton.jit
def _store_output_kernel(
    y_ptr, r_ptr, o_ptr, part_ptr, HW, C, HW_PER_PROG,
    syn, syhw, syc, srn, srhw, src, son, sohw, soc,
    HAS_RESIDUAL: tl.constexpr, STATS: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # out = y (+ residual) in out's dtype, and per (sample, pixel range) the
    # moments of the stored values. Tensors are addressed as (N, HW, C).
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    c64 = c.to(tl.int64)
    count = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for start in range(pid_s * HW_PER_PROG, tl.minimum((pid_s + 1) * HW_PER_PROG, HW), BLOCK_HW):
        hw = (start + tl.arange(0, BLOCK_HW)).to(tl.int64)
        mask = (hw < HW)[:, None] & c_mask[None, :]
        v = tl.load(y_ptr + pid_n.to(tl.int64) * syn + hw[:, None] * syhw + c64[None, :] * syc, mask=mask,
                    other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            v += tl.load(r_ptr + pid_n.to(tl.int64) * srn + hw[:, None] * srhw + c64[None, :] * src, mask=mask,
                         other=0.0).to(tl.float32)
        stored = v.to(o_ptr.dtype.element_ty)
        tl.store(o_ptr + pid_n.to(tl.int64) * son + hw[:, None] * sohw + c64[None, :] * soc, stored, mask=mask)
        if STATS:
            count, mean, m2 = _merge_tile_moments(count, mean, m2, tl.where(mask, stored.to(tl.float32), 0.0),
                                                  mask)
    if STATS:
        # part_ptr is a contiguous fp32 (3, N * S, C) buffer: count, mean, M2.
        plane = tl.num_programs(0).to(tl.int64) * tl.num_programs(1) * C
        p_ptrs = part_ptr + (pid_n.to(tl.int64) * tl.num_programs(1) + pid_s) * C + c
        tl.store(p_ptrs, count, mask=c_mask)
        tl.store(p_ptrs + plane, mean, mask=c_mask)
        tl.store(p_ptrs + 2 * plane, m2, mask=c_mask)


# [BLOCK_HW, BLOCK_C] tiles, as the pointwise kernels': wide in channels for
# channels_last, tall in pixels for NCHW.
STORE_CONFIGS = [
    dict(BLOCK_HW=32, BLOCK_C=64, num_warps=4, num_stages=2),
    dict(BLOCK_HW=256, BLOCK_C=4, num_warps=4, num_stages=2),
]

ship(_stats_partial_kernel, STATS_CONFIGS)
ship(_stats_backward_kernel, STATS_CONFIGS)
ship(_store_output_kernel, STORE_CONFIGS)


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
    return _merged(partials, M)


def _merged(partials, count_total):
    """(mean, var) float32 from (3, P, C) partial (count, mean, M2), merged
    in float64 in a fixed order."""
    count, mean_p, m2_p = partials.double().unbind(0)
    mean = (count * mean_p).sum(dim=0) / count_total
    m2 = m2_p.sum(dim=0) + (count * (mean_p - mean) ** 2).sum(dim=0)
    return mean.float(), (m2 / count_total).float()


def _layout_strides(t, like):
    """t and its (sample, pixel, channel) strides, t copied into like's
    layout first if it is in neither dense one."""
    fmt = torch.channels_last if like.dim() == 4 else torch.channels_last_3d
    if not (t.is_contiguous() or t.is_contiguous(memory_format=fmt)):
        t = t.contiguous(memory_format=fmt if is_channels_last(like) else torch.contiguous_format)
    return t, _strides(t)


def store_output(y, residual, out, compute_stats):
    """out = y (+ residual), and out's per-channel (mean, biased var) as
    float32 when compute_stats (else None), in one pass. out may be y itself
    (in place) or a channel slice of a wider NC(D)HW- or channels_last-
    contiguous buffer; y and residual are read in either dense layout."""
    assert_launchable(_store_output_kernel, y, residual, out)
    y, y_strides = _layout_strides(y, out)
    r_strides = (0, 0, 0)
    if residual is not None:
        residual, r_strides = _layout_strides(residual, out)
    out_strides = _strides(out)  # a channel slice of a dense buffer has strides of its own kind
    n, c = out.shape[:2]
    # Wide tiles where channels are contiguous, a channel slice of a channels_last buffer included.
    wide = out.stride(1) == 1 and out.shape[1] > 1
    cfg = config_for(_store_output_kernel, lambda: STORE_CONFIGS[0] if wide else STORE_CONFIGS[1])
    splits, per_prog = pixel_splits(out, cfg)
    partials = torch.empty((3, n * splits, c) if compute_stats else (1,), dtype=torch.float32, device=out.device)
    grid = (n, splits, triton.cdiv(c, cfg["BLOCK_C"]))
    launch(_store_output_kernel)[grid](y, y if residual is None else residual, out, partials, spatial_numel(out), c,
                                       per_prog, *y_strides, *r_strides, *out_strides,
                                       HAS_RESIDUAL=residual is not None, STATS=compute_stats, **cfg)
    return _merged(partials, n * spatial_numel(out)) if compute_stats else None


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
