"""Implicit-GEMM Triton kernels for the fused norm -> activation -> conv2d unit.

The activation a = act((x - mean) * scale + shift) is never stored: the forward
and weight-gradient kernels rebuild it while loading each x tile, and the
input-gradient kernel recomputes z from x in its epilogue for act'(z).

All kernels take explicit strides, so NCHW and channels_last tensors (and any
other strided layout) work; channels_last is the fast path because the GEMM
reduction runs over channels, which are then contiguous.
"""
import functools

import torch
import torch._guards
import triton
import triton.language as tl

from ._common import activation_code, assert_launchable, config_for, dot_options, empty_like_format, \
    is_interpreted, launch, multiprocessor_count, ship
from .pointwise import _act_grad

# Shipped configurations; the launchers pick one with a shape heuristic.
FWD_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=3),
]
# No 128x128 tile here: its main loop would issue ~1,030 FLOP per
# warp-instruction on sm_90, but its epilogue (x reload, act', partial sums)
# on top of the accumulator needs more than 255 registers and spills (56
# bytes with triton 3.8, 320 with 3.6).
DGRAD_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=3),
]
# Weight gradient: BLOCK_M tiles output channels, BLOCK_N input channels and
# BLOCK_K the N*OH*OW positions being reduced.
WGRAD_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=3),
]

# Each weight-gradient split should still loop this many BLOCK_K steps, so the
# partial buffer and its reduction stay small relative to the GEMM work.
_WGRAD_MIN_ITERS_PER_SPLIT = 8


@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr, UPCAST_BF16: tl.constexpr):
    if UPCAST_BF16:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def _mufu(x, OP: tl.constexpr, EMULATED: tl.constexpr):
    """The approximate MUFU ex2 / rcp (a few float32 ulp); EMULATED (the
    interpreter, which runs no PTX): the exact operation in their place."""
    if EMULATED:
        if OP == "ex2":
            return tl.exp2(x)
        return 1.0 / x
    if OP == "ex2":
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _prologue_act(z, ACT: tl.constexpr, SIGMOID: tl.constexpr):
    # Min/max that propagate NaN, as torch's relu and hardtanh do.
    if ACT == 1:
        z = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACT == 2:
        if SIGMOID == "exact":
            z = z * tl.sigmoid(z)
        else:
            # 1 / (1 + 2^(-z log2 e)) for tiles rounded to 16 bits before the
            # MMA anyway: tl.sigmoid's IEEE division costs three times more.
            z = z * _mufu(1.0 + _mufu(z * -1.4426950408889634, "ex2", SIGMOID == "emulated"), "rcp",
                          SIGMOID == "emulated")
    elif ACT == 3:
        z = tl.clamp(z, 0.0, 6.0, propagate_nan=tl.PropagateNan.ALL)
    return z


@triton.jit
def _load_prologue_tile(x_ptrs, mask, row_ok, c, c_mask, mean_ptr, scale_ptr, shift_ptr, out_dtype,
                        ACT: tl.constexpr, CENTERED: tl.constexpr, SIGMOID: tl.constexpr):
    """Load x[rows, c] and return act((x - mean) * scale + shift) in `out_dtype`.

    CENTERED=False: shift is already shift - mean * scale, so one FMA per
    element (for 16-bit dots: see _prologue_options). Rows outside the
    image (conv zero padding, tails) are zeroed *after* the activation,
    padding pads the conv input a, not x; channels past the tail read x = 0
    and meet zero weights.
    """
    sc = tl.load(scale_ptr + c, mask=c_mask, other=0.0)
    sh = tl.load(shift_ptr + c, mask=c_mask, other=0.0)
    xv = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    if CENTERED:
        mu = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
        z = (xv - mu[None, :]) * sc[None, :] + sh[None, :]
    else:
        z = xv * sc[None, :] + sh[None, :]
    a = _prologue_act(z, ACT, SIGMOID)
    return (a * row_ok.to(tl.float32)[:, None]).to(out_dtype)


@triton.jit
def _fwd_kernel(
    x_ptr, mean_ptr, scale_ptr, shift_ptr, w_ptr, bias_ptr, res_ptr, y_ptr, stats_ptr,
    N, C_G, H, W, OC_G, OH, OW, KW, K_ITERS,
    sxn, sxc, sxh, sxw,
    swo, swc, swh, sww,
    srn, src, srh, srw,
    syn, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_STATS: tl.constexpr,
    CENTERED: tl.constexpr, SIGMOID: tl.constexpr, PREC: tl.constexpr, UPCAST_BF16: tl.constexpr,
    IDX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # GEMM view: rows = (n, oh, ow), cols = output channels of group g,
    # reduction = (kh, kw, c) with c innermost. K_ITERS = KH * KW * cdiv(C_G, BLOCK_K)
    # flattens it into one loop so the software pipeliner sees a single loop;
    # (kh, kw, channel block) are carried as counters, not divided out of
    # the iteration index (two integer divisions were a tenth of the loop).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N * OH * OW
    ow = rows % OW
    oh = (rows // OW) % OH
    n = rows // (OW * OH)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_row = n.to(IDX) * sxn + ih0.to(IDX) * sxh + iw0.to(IDX) * sxw

    oc = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    oc_mask = oc < OC_G
    w_col = (g * OC_G + oc).to(IDX) * swo

    ks = tl.arange(0, BLOCK_K)
    c_blocks = tl.cdiv(C_G, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    kh = 0
    kw = 0
    cb = 0
    for it in range(0, K_ITERS):
        ck = cb * BLOCK_K + ks
        ck_mask = ck < C_G
        c = g * C_G + ck
        ih = ih0 + kh * dil_h
        iw = iw0 + kw * dil_w
        in_bounds = row_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        tap_off = (kh * dil_h).to(IDX) * sxh + (kw * dil_w).to(IDX) * sxw
        x_ptrs = x_ptr + (x_row + tap_off)[:, None] + (c.to(IDX) * sxc)[None, :]
        a = _load_prologue_tile(x_ptrs, in_bounds[:, None] & ck_mask[None, :], in_bounds, c, ck_mask,
                                mean_ptr, scale_ptr, shift_ptr, w_ptr.dtype.element_ty, ACT, CENTERED, SIGMOID)
        w_ptrs = w_ptr + w_col[None, :] + (ck.to(IDX) * swc + kh * swh + kw * sww)[:, None]
        wt = tl.load(w_ptrs, mask=ck_mask[:, None] & oc_mask[None, :], other=0.0)
        acc = _mma(a, wt, acc, PREC, UPCAST_BF16)
        cb += 1
        next_tap = cb == c_blocks
        cb = tl.where(next_tap, 0, cb)
        kw = tl.where(next_tap, kw + 1, kw)
        next_row = kw == KW
        kw = tl.where(next_row, 0, kw)
        kh = tl.where(next_row, kh + 1, kh)

    out_mask = row_mask[:, None] & oc_mask[None, :]
    occ = (g * OC_G + oc).to(IDX)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + occ, mask=oc_mask, other=0.0).to(tl.float32)[None, :]
    oh64 = oh.to(IDX)
    ow64 = ow.to(IDX)
    n64 = n.to(IDX)
    if HAS_RES:
        r_ptrs = res_ptr + (n64 * srn + oh64 * srh + ow64 * srw)[:, None] + (occ * src)[None, :]
        acc += tl.load(r_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    # y may be a channel slice of a larger buffer: its strides place the tile.
    y_ptrs = y_ptr + (n64 * syn + oh64 * syh + ow64 * syw)[:, None] + (occ * syc)[None, :]
    out = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptrs, out, mask=out_mask)
    if HAS_STATS:
        # This tile's moments of the stored values, per output channel: mean
        # and sum of squared deviations about it (two-pass over registers),
        # into the (2, num_pid_m, OC) partial buffer the host merges.
        v = tl.where(out_mask, out.to(tl.float32), 0.0)
        count = tl.sum(row_mask.to(tl.float32), axis=0)
        mu = tl.sum(v, axis=0) / count
        d = tl.where(out_mask, v - mu[None, :], 0.0)
        s_ptrs = stats_ptr + pid_m.to(IDX) * OC_G * tl.num_programs(2) + occ
        tl.store(s_ptrs, mu, mask=oc_mask)
        tl.store(s_ptrs + tl.num_programs(0).to(IDX) * OC_G * tl.num_programs(2), tl.sum(d * d, axis=0),
                 mask=oc_mask)


@triton.jit
def _dgrad_kernel(
    go_ptr, x_ptr, mean_ptr, scale_ptr, shift_ptr, w_ptr, gx_ptr, part_ptr, taps_ptr, ntaps_ptr,
    N, C, C_G, H, W, OC_G, OH, OW, HP, WP, MAX_TAPS,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    swo, swc, swh, sww,
    sdn, sdc, sdh, sdw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    ACT: tl.constexpr, PREC: tl.constexpr, UPCAST_BF16: tl.constexpr, IDX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Transposed conv as an implicit GEMM, decomposed by stride phase: program
    # axis 2 enumerates (group, rh, rw) and its rows are the input positions
    # ih = rh + stride_h * i, iw = rw + stride_w * j. Within one phase a tap
    # (kh, kw) either hits every row at an exact output position or none, so
    # only the phase's valid taps (host table) are visited and no MMA work is
    # spent on taps that stride skips.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(2)
    phases = stride_h * stride_w
    g = pid_z // phases
    phase = pid_z - g * phases
    rh = phase // stride_w
    rw = phase - rh * stride_w

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    jp = rows % WP
    ip = (rows // WP) % HP
    n = rows // (WP * HP)
    ih = rh + ip * stride_h
    iw = rw + jp * stride_w
    row_mask = (rows < N * HP * WP) & (ih < H) & (iw < W)
    n64 = n.to(IDX)
    go_row = n64 * sgn + ip.to(IDX) * sgh + jp.to(IDX) * sgw

    ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_mask = ci < C_G
    w_col = ci.to(IDX) * swc

    ks = tl.arange(0, BLOCK_K)
    oc_blocks = tl.cdiv(OC_G, BLOCK_K)
    k_iters = tl.load(ntaps_ptr + phase) * oc_blocks
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # (tap, output-channel block) carried as counters; the host table gives
    # each of the phase's taps as (kh, kw, qh, qw), the output offsets
    # (rh + pad - kh * dil) / stride, so the loop divides nothing.
    t = 0
    ob = 0
    for it in range(0, k_iters):
        entry = taps_ptr + (phase * MAX_TAPS + t) * 4
        kh = tl.load(entry)
        kw = tl.load(entry + 1)
        qh = tl.load(entry + 2)
        qw = tl.load(entry + 3)
        oh = ip + qh
        ow = jp + qw
        valid = row_mask & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        ok = ob * BLOCK_K + ks
        ok_mask = ok < OC_G
        occ = (g * OC_G + ok).to(IDX)
        go_ptrs = (go_ptr + (go_row + qh.to(IDX) * sgh + qw.to(IDX) * sgw)[:, None]
                   + (occ * sgc)[None, :])
        gt = tl.load(go_ptrs, mask=valid[:, None] & ok_mask[None, :], other=0.0)
        w_ptrs = w_ptr + (occ * swo + kh * swh + kw * sww)[:, None] + w_col[None, :]
        wt = tl.load(w_ptrs, mask=ok_mask[:, None] & ci_mask[None, :], other=0.0)
        acc = _mma(gt.to(w_ptr.dtype.element_ty), wt, acc, PREC, UPCAST_BF16)
        ob += 1
        next_tap = ob == oc_blocks
        ob = tl.where(next_tap, 0, ob)
        t = tl.where(next_tap, t + 1, t)

    # Epilogue: chain rule through the activation and the affine norm, plus
    # this tile's per-channel partial sums for grad_scale / grad_shift.
    mask = row_mask[:, None] & ci_mask[None, :]
    c = g * C_G + ci
    c64 = c.to(IDX)
    ih64 = ih.to(IDX)
    iw64 = iw.to(IDX)
    x_ptrs = x_ptr + (n64 * sxn + ih64 * sxh + iw64 * sxw)[:, None] + (c64 * sxc)[None, :]
    xv = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    mu = tl.load(mean_ptr + c, mask=ci_mask, other=0.0)[None, :]
    sc = tl.load(scale_ptr + c, mask=ci_mask, other=0.0)[None, :]
    sh = tl.load(shift_ptr + c, mask=ci_mask, other=0.0)[None, :]
    xc = xv - mu
    dz = tl.where(mask, acc * _act_grad(xc * sc + sh, ACT), 0.0)
    gx_ptrs = gx_ptr + (n64 * sdn + ih64 * sdh + iw64 * sdw)[:, None] + (c64 * sdc)[None, :]
    tl.store(gx_ptrs, (dz * sc).to(gx_ptr.dtype.element_ty), mask=mask)

    # part_ptr is a (2, R, C) fp32 buffer with R = phases * num_pid_m rows.
    num_rows = phases * tl.num_programs(0)
    prow = (phase * tl.num_programs(0) + pid_m).to(IDX)
    p_ptrs = part_ptr + prow * C + c64
    tl.store(p_ptrs, tl.sum(dz * xc, axis=0), mask=ci_mask)
    tl.store(p_ptrs + num_rows.to(IDX) * C, tl.sum(dz, axis=0), mask=ci_mask)


@triton.jit
def _wgrad_kernel(
    go_ptr, x_ptr, mean_ptr, scale_ptr, shift_ptr, part_ptr,
    N, C_G, H, W, OC, OC_G, OH, OW, KH, KW, ITERS_PER_SPLIT, TILES_N,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    ACT: tl.constexpr, CENTERED: tl.constexpr, SIGMOID: tl.constexpr, PREC: tl.constexpr, UPCAST_BF16: tl.constexpr,
    IDX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program: a (BLOCK_M output channels) x (BLOCK_N input channels) tile
    # of one tap (kh, kw) of group g, reduced over one split-K slice of the
    # N*OH*OW positions. Program axis 0 = (split, oc tile, ci tile).
    pid0 = tl.program_id(0)
    tap = tl.program_id(1)
    g = tl.program_id(2)
    tiles = tl.cdiv(OC_G, BLOCK_M) * TILES_N
    split = pid0 // tiles
    tile = pid0 - split * tiles
    pid_m = tile // TILES_N
    pid_n = tile - pid_m * TILES_N
    kh = tap // KW
    kw = tap - kh * KW

    oc = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    oc_mask = oc < OC_G
    go_col = (g * OC_G + oc).to(IDX) * sgc
    ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_mask = ci < C_G
    c = g * C_G + ci
    x_col = c.to(IDX) * sxc

    P = N * OH * OW
    p = split * ITERS_PER_SPLIT * BLOCK_K + tl.arange(0, BLOCK_K)
    # Each lane's position as (row r = n * OH + oh, ow), advanced by BLOCK_K
    # positions per step with a carry instead of divided out of p each step.
    ow = p % OW
    r = p // OW
    step_r = BLOCK_K // OW
    step_w = BLOCK_K - step_r * OW
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(0, ITERS_PER_SPLIT):
        p_mask = p < P
        n = r // OH
        oh = r - n * OH
        n64 = n.to(IDX)
        go_ptrs = (go_ptr + go_col[:, None]
                   + (n64 * sgn + oh.to(IDX) * sgh + ow.to(IDX) * sgw)[None, :])
        gt = tl.load(go_ptrs, mask=oc_mask[:, None] & p_mask[None, :], other=0.0)
        ih = oh * stride_h - pad_h + kh * dil_h
        iw = ow * stride_w - pad_w + kw * dil_w
        in_bounds = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_ptrs = (x_ptr + (n64 * sxn + ih.to(IDX) * sxh + iw.to(IDX) * sxw)[:, None]
                  + x_col[None, :])
        a = _load_prologue_tile(x_ptrs, in_bounds[:, None] & ci_mask[None, :], in_bounds, c, ci_mask,
                                mean_ptr, scale_ptr, shift_ptr, go_ptr.dtype.element_ty, ACT, CENTERED, SIGMOID)
        acc = _mma(gt, a, acc, PREC, UPCAST_BF16)
        p += BLOCK_K
        ow += step_w
        carry = ow >= OW
        ow = tl.where(carry, ow - OW, ow)
        r += step_r + carry.to(tl.int32)

    # part_ptr is a contiguous fp32 (splits, OC, C_G, KH, KW) buffer.
    taps = KH * KW
    base = split.to(IDX) * OC * C_G * taps + tap
    p_ptrs = (part_ptr + base + ((g * OC_G + oc).to(IDX) * C_G * taps)[:, None]
              + (ci.to(IDX) * taps)[None, :])
    tl.store(p_ptrs, acc, mask=oc_mask[:, None] & ci_mask[None, :])


ship(_fwd_kernel, FWD_CONFIGS, tensor_cores=True)
ship(_dgrad_kernel, DGRAD_CONFIGS, tensor_cores=True)
ship(_wgrad_kernel, WGRAD_CONFIGS, tensor_cores=True)


def _gemm_config(kernel, configs, rows, cols, reduction):
    """The forced config, else the first whose tiles are not mostly padding
    for this GEMM shape.

    Configs are ordered largest first; a big tile is only worth it when both
    output dims fill it and the reduction is deep enough to amortise it.
    """
    def heuristic():
        for cfg in configs:
            if cols >= cfg["BLOCK_N"] and rows >= cfg["BLOCK_M"] and reduction >= 2 * cfg["BLOCK_K"]:
                return cfg
        return configs[-1]

    return config_for(kernel, heuristic)


def _conv_geometry(x, weight_shape, out_shape, stride, padding, dilation, groups):
    """The sizes the kernels take. Arguments were checked by the ops layer;
    the output size comes from the output (or its gradient)."""
    N, C, H, W = x.shape
    OC, C_G, KH, KW = weight_shape
    return dict(N=N, C=C, H=H, W=W, OC=OC, C_G=C_G, OC_G=OC // groups, KH=KH, KW=KW, OH=out_shape[2],
                OW=out_shape[3], stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation),
                groups=groups)


def _gemm_weight(weight):
    """Weight with input channels contiguous, copying to channels_last (OHWI) if needed.

    Both kernels that read the weight walk its input channels along a GEMM
    dimension; with OIHW strides (KH*KW apart) every element is a separate
    narrow load that cannot go through the async-copy pipeline. 1x1 OIHW and
    channels_last weights already qualify and are used as is.
    """
    if weight.stride(1) == 1:
        return weight
    return weight.contiguous(memory_format=torch.channels_last)


def _prologue_options(kernel, dot_dtype, mean, scale, shift):
    """The prologue's constexprs and its shift argument. With 16-bit dots,
    whose operand a is rounded to 16 bits, the mean is folded into the shift
    (one FMA per element; its float32 error is far below that rounding) and
    SiLU's sigmoid comes from the approximate MUFU exp2 and reciprocal
    (emulated exactly by the interpreter); float32 dots get x centred
    exactly and tl.sigmoid."""
    centered = dot_dtype == torch.float32
    sigmoid = "exact" if centered else "emulated" if is_interpreted(kernel) else "approx"
    return dict(CENTERED=centered, SIGMOID=sigmoid), shift if centered else torch.addcmul(shift, mean, scale, value=-1)


def _index_dtype(*tensors):
    """IDX: int32 element offsets when every tensor's farthest element is
    below 2**31 (cheaper address arithmetic in every step), else int64."""
    farthest = max(sum((n - 1) * st for n, st in zip(t.shape, t.stride())) for t in tensors if t.numel())
    return tl.int32 if farthest < 2**31 - 1 else tl.int64


def _conv_args(geo):
    sh, sw = geo["stride"]
    ph, pw = geo["padding"]
    dh, dw = geo["dilation"]
    return (sh, sw, ph, pw, dh, dw)


def _channel_moments(partials, rows, block_m):
    """Per-channel (mean, biased variance) from per-row-tile (mean, M2): the
    parallel combination of Chan et al. over all tiles at once, in float64
    and a fixed order."""
    tiles = partials.shape[1]
    counts = torch.full((tiles,), float(block_m), dtype=torch.float64, device=partials.device)
    counts[-1] = rows - block_m * (tiles - 1)
    means, m2 = partials[0].double(), partials[1].double()
    mean = (counts[:, None] * means).sum(dim=0) / rows
    m2_total = m2.sum(dim=0) + (counts[:, None] * (means - mean) ** 2).sum(dim=0)
    return mean.float(), (m2_total / rows).float()


# Every launcher takes x NCHW- or channels_last-contiguous (or any strides:
# the kernels are stride-generic), float32 contiguous (C,) mean/scale/shift,
# and arguments the ops layer has checked.
def norm_act_conv2d_forward(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups,
                            activation, out, compute_stats):
    """out = conv2d(act((x - mean) * scale + shift), weight, bias, ...) (+ residual);
    out may have any strides (a channel slice of a larger buffer). Returns the
    per-channel float32 (mean, biased variance) of the stored values when
    compute_stats, else None."""
    assert_launchable(_fwd_kernel, x, mean, scale, shift, weight, bias, residual, out)
    geo = _conv_geometry(x, weight.shape, out.shape, stride, padding, dilation, groups)
    weight = _gemm_weight(weight)
    rows = geo["N"] * geo["OH"] * geo["OW"]
    if out.numel() == 0:
        return None
    cfg = _gemm_config(_fwd_kernel, FWD_CONFIGS, rows, geo["OC_G"], geo["KH"] * geo["KW"] * geo["C_G"])
    k_iters = geo["KH"] * geo["KW"] * triton.cdiv(geo["C_G"], cfg["BLOCK_K"])
    grid = (triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(geo["OC_G"], cfg["BLOCK_N"]), groups)
    # Never dereferenced when the matching HAS_* flag is off; weight is a
    # read-only tensor of the right dtype, so it is a safe stand-in.
    bias_arg = weight if bias is None else bias.contiguous()
    res_arg = weight if residual is None else residual
    res_strides = residual.stride() if residual is not None else (0, 0, 0, 0)
    # Every (tile, channel) entry is written once.
    stats = (torch.empty((2, grid[0], geo["OC"]), dtype=torch.float32, device=x.device) if compute_stats
             else weight)
    prologue, shift = _prologue_options(_fwd_kernel, weight.dtype, mean, scale, shift)
    launch(_fwd_kernel)[grid](
        x, mean, scale, shift, weight, bias_arg, res_arg, out, stats,
        geo["N"], geo["C_G"], geo["H"], geo["W"], geo["OC_G"], geo["OH"], geo["OW"], geo["KW"],
        k_iters,
        *x.stride(), *weight.stride(), *res_strides, *out.stride(),
        *_conv_args(geo),
        ACT=activation_code(activation), HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        HAS_STATS=compute_stats, **prologue, **dot_options(_fwd_kernel, weight.dtype),
        IDX=_index_dtype(x, weight, out, stats, *[t for t in (residual,) if t is not None]), **cfg,
    )
    return _channel_moments(stats, rows, cfg["BLOCK_M"]) if compute_stats else None


def _phase_tap_table(kh_size, kw_size, stride, padding, dilation):
    """Per stride phase (rh, rw), the taps that land on whole output positions.

    Input row ih = rh + stride*i receives output row oh = i + qh through tap
    kh iff rh + pad - kh*dil = stride*qh, which depends only on rh.
    Returns (table [phases][KH*KW][4] of (kh, kw, qh, qw), counts [phases]) as lists.
    """
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    max_taps = kh_size * kw_size
    table, counts = [], []
    for rh in range(sh):
        khs = [k for k in range(kh_size) if (rh + ph - k * dh) % sh == 0]
        for rw in range(sw):
            kws = [k for k in range(kw_size) if (rw + pw - k * dw) % sw == 0]
            taps = [[kh, kw, (rh + ph - kh * dh) // sh, (rw + pw - kw * dw) // sw] for kh in khs for kw in kws]
            counts.append(len(taps))
            table.append(taps + [[0, 0, 0, 0]] * (max_taps - len(taps)))
    # At least two counts (the extra one never read): a trace constant-folds
    # one-element constants by computing them on the device.
    return table, counts + [0] * (len(counts) == 1)


@functools.lru_cache(maxsize=256)
def _cached_phase_taps(geometry, device):
    table, counts = _phase_tap_table(*geometry)
    return (torch.tensor(table, dtype=torch.int32, device=device),
            torch.tensor(counts, dtype=torch.int32, device=device))


def _phase_taps(kh_size, kw_size, stride, padding, dilation, device):
    """_phase_tap_table as int32 tensors on `device`, built once per geometry;
    while tracing (fake tensors) built afresh, so no fake tensor is cached."""
    geometry = (kh_size, kw_size, stride, padding, dilation)
    if device.type == "meta" or torch._guards.detect_fake_mode() is not None:
        # Host constants, then a copy: what a trace records of them.
        table, counts = _phase_tap_table(*geometry)
        return (torch.tensor(table, dtype=torch.int32).to(device), torch.tensor(counts, dtype=torch.int32).to(device))
    return _cached_phase_taps(geometry, device)


def norm_act_conv2d_backward_input(grad_out, x, mean, scale, shift, weight, stride, padding,
                                   dilation, groups, activation):
    """Returns (grad_x, grad_scale, grad_shift) for the fused unit.

    grad_scale / grad_shift are float32 (C,) sums over (N, H, W) of dz * (x - mean)
    and dz, reduced deterministically from per-tile partials.
    """
    assert_launchable(_dgrad_kernel, grad_out, x, mean, scale, shift, weight)
    geo = _conv_geometry(x, weight.shape, grad_out.shape, stride, padding, dilation, groups)
    weight = _gemm_weight(weight)

    grad_x = empty_like_format(x, x.shape, x.dtype)
    C = geo["C"]
    sh, sw = geo["stride"]
    hp, wp = triton.cdiv(geo["H"], sh), triton.cdiv(geo["W"], sw)
    rows = geo["N"] * hp * wp
    if rows == 0 or C == 0:
        grad_x.zero_()
        zeros = torch.zeros(C, dtype=torch.float32, device=x.device)
        return grad_x, zeros, zeros.clone()
    cfg = _gemm_config(_dgrad_kernel, DGRAD_CONFIGS, rows, geo["C_G"], geo["KH"] * geo["KW"] * geo["OC_G"])
    taps, ntaps = _phase_taps(geo["KH"], geo["KW"], geo["stride"], geo["padding"],
                              geo["dilation"], x.device)
    grid = (triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(geo["C_G"], cfg["BLOCK_N"]),
            groups * sh * sw)
    # Every (row, channel) of the partial buffer is written exactly once.
    partials = torch.empty((2, sh * sw * grid[0], C), dtype=torch.float32, device=x.device)
    launch(_dgrad_kernel)[grid](
        grad_out, x, mean, scale, shift, weight, grad_x, partials, taps, ntaps,
        geo["N"], C, geo["C_G"], geo["H"], geo["W"], geo["OC_G"], geo["OH"], geo["OW"], hp, wp,
        geo["KH"] * geo["KW"],
        *grad_out.stride(), *x.stride(), *weight.stride(), *grad_x.stride(),
        *_conv_args(geo),
        ACT=activation_code(activation), **dot_options(_dgrad_kernel, weight.dtype),
        IDX=_index_dtype(grad_out, x, weight, grad_x, partials), **cfg,
    )
    return grad_x, partials[0].sum(dim=0), partials[1].sum(dim=0)


def _wgrad_splits(base_programs, positions, block_k, device):
    """Split-K factor: enough programs for ~4 waves, but never slices shorter
    than _WGRAD_MIN_ITERS_PER_SPLIT steps. Returns (splits, iters_per_split)."""
    total_iters = triton.cdiv(positions, block_k)
    want = triton.cdiv(4 * multiprocessor_count(device), base_programs)
    splits = max(1, min(want, total_iters // _WGRAD_MIN_ITERS_PER_SPLIT))
    iters = triton.cdiv(total_iters, splits)
    # Recompute so that no split is empty.
    return triton.cdiv(total_iters, iters), iters


def norm_act_conv2d_backward_weight(grad_out, x, mean, scale, shift, weight_shape, stride, padding,
                                    dilation, groups, activation):
    """grad_weight of the fused unit, in grad_out's dtype (= weight dtype), fp32-accumulated."""
    assert_launchable(_wgrad_kernel, grad_out, x, mean, scale, shift)
    weight_shape = tuple(int(s) for s in weight_shape)
    geo = _conv_geometry(x, weight_shape, grad_out.shape, stride, padding, dilation, groups)
    positions = geo["N"] * geo["OH"] * geo["OW"]
    if grad_out.numel() == 0 or geo["C_G"] == 0:
        return torch.zeros(weight_shape, dtype=grad_out.dtype, device=x.device)
    cfg = _gemm_config(_wgrad_kernel, WGRAD_CONFIGS, geo["OC_G"], geo["C_G"], positions)
    tiles_n = triton.cdiv(geo["C_G"], cfg["BLOCK_N"])
    tiles = triton.cdiv(geo["OC_G"], cfg["BLOCK_M"]) * tiles_n
    taps = geo["KH"] * geo["KW"]
    splits, iters = _wgrad_splits(tiles * taps * groups, positions, cfg["BLOCK_K"], x.device)
    partials = torch.empty((splits,) + weight_shape, dtype=torch.float32, device=x.device)
    grid = (splits * tiles, taps, groups)
    prologue, shift = _prologue_options(_wgrad_kernel, grad_out.dtype, mean, scale, shift)
    launch(_wgrad_kernel)[grid](
        grad_out, x, mean, scale, shift, partials,
        geo["N"], geo["C_G"], geo["H"], geo["W"], geo["OC"], geo["OC_G"], geo["OH"], geo["OW"],
        geo["KH"], geo["KW"], iters, tiles_n,
        *grad_out.stride(), *x.stride(),
        *_conv_args(geo),
        ACT=activation_code(activation), **prologue, **dot_options(_wgrad_kernel, grad_out.dtype),
        IDX=_index_dtype(grad_out, x, partials), **cfg,
    )
    return partials.sum(dim=0).to(grad_out.dtype)
