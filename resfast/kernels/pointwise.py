"""The memory-bound passes around a normalisation: act(affine(x)), its
backward's per-channel sums, and the centered-affine input gradient.

x is addressed as (N, HW, C) with strides (sn, shw, sc), which covers both
NC(D)HW- and channels_last(_3d)-contiguous tensors (HW: every spatial position); tiles are [BLOCK_HW, BLOCK_C],
wide in channels for channels_last and tall in pixels for NCHW. Parameters
(mean, scale, shift, coefficients) are float32, per channel (C,) or per
(sample, channel) (N, C): the kernels index them at n * PN + c with PN = 0
or C. GroupNorm uses them with (N, C) parameters, the split convolution path
(resfast/ops/conv_engines) with either.
"""
import torch
import triton
import triton.language as tl

from resfast.ops.layout import spatial_numel

from ._common import activation_code, assert_launchable, config_for, empty_like_format, is_channels_last, launch, \
    multiprocessor_count, ship

# [BLOCK_HW, BLOCK_C] tiles: wide in channels for channels_last, tall in
# pixels for NCHW.
TILE_CONFIGS = [
    dict(BLOCK_HW=32, BLOCK_C=64, num_warps=4, num_stages=2),
    dict(BLOCK_HW=256, BLOCK_C=4, num_warps=4, num_stages=2),
]


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.where(z < 0.0, 0.0, z)  # NaN passes through, as in torch.relu
    elif ACT == 2:
        z = z * tl.sigmoid(z)
    elif ACT == 3:
        z = tl.where(z < 0.0, 0.0, tl.where(z > 6.0, 6.0, z))  # torch's hardtanh(z, 0, 6)
    return z


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 1:
        d = tl.where(z <= 0.0, 0.0, 1.0)  # torch's threshold_backward: 1 at NaN
    elif ACT == 2:
        s = tl.sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    elif ACT == 3:
        d = tl.where((z <= 0.0) | (z >= 6.0), 0.0, 1.0)  # hardtanh_backward: 1 at NaN
    else:
        d = tl.full(z.shape, 1.0, tl.float32)
    return d


def _strides(t):
    """(sample, pixel, channel) strides of a 4-D or 5-D tensor contiguous in
    NC(D)HW or channels_last(_3d). The pixel stride is that of the last
    spatial dim longer than 1: a size-1 dim's stride may be anything."""
    pixel = next((t.stride(d) for d in range(t.dim() - 1, 1, -1) if t.shape[d] > 1), 1)
    return t.stride(0), pixel, t.stride(1)


@triton.jit
def _tile(pid_n, hw, c, HW, C, sn, shw, sc):
    mask = (hw < HW)[:, None] & (c < C)[None, :]
    offs = pid_n.to(tl.int64) * sn + hw.to(tl.int64)[:, None] * shw + c.to(tl.int64)[None, :] * sc
    return offs, mask


@triton.jit
def _load_params(mean_ptr, scale_ptr, shift_ptr, k, mask):
    """The parameters at indices k = n * PN + c."""
    return (tl.load(mean_ptr + k, mask=mask, other=0.0), tl.load(scale_ptr + k, mask=mask, other=0.0),
            tl.load(shift_ptr + k, mask=mask, other=0.0))


@triton.jit
def _affine_act_kernel(
    x_ptr, y_ptr, mean_ptr, scale_ptr, shift_ptr, HW, C, PN, sn, shw, sc, syn, syhw, syc,
    ACT: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # y = act((x - mean) * scale + shift), stored in y's dtype.
    # Pixel tiles on grid axis 0, the one without a 65,535 limit.
    pid_n = tl.program_id(1)
    hw = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs, mask = _tile(pid_n, hw, c, HW, C, sn, shw, sc)
    y_offs, _ = _tile(pid_n, hw, c, HW, C, syn, syhw, syc)
    c_mask = c < C
    mu, s, b = _load_params(mean_ptr, scale_ptr, shift_ptr, pid_n * PN + c, c_mask)
    xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = _act((xv - mu[None, :]) * s[None, :] + b[None, :], ACT)
    tl.store(y_ptr + y_offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _act_grad_sums_kernel(
    x_ptr, gy_ptr, part_ptr, mean_ptr, scale_ptr, shift_ptr, HW, C, PN, HW_PER_PROG, sn, shw, sc, sgn, sghw, sgc,
    ACT: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Per (sample, channel, pixel range): sums of dz = act'(z) * grad_y and of dz * (x - mean).
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mu, s, b = _load_params(mean_ptr, scale_ptr, shift_ptr, pid_n * PN + c, c_mask)
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
def _centered_affine_grad_kernel(
    x_ptr, gy_ptr, gx_ptr, mean_ptr, scale_ptr, shift_ptr, a_ptr, b_ptr, HW, C, PN,
    sn, shw, sc, sgn, sghw, sgc, son, sohw, soc,
    ACT: tl.constexpr, HAS_GY: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grad_x = a + b * (x - mean) [+ act'(z) * grad_y * scale].
    # Pixel tiles on grid axis 0, the one without a 65,535 limit.
    pid_n = tl.program_id(1)
    hw = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs, mask = _tile(pid_n, hw, c, HW, C, sn, shw, sc)
    o_offs, _ = _tile(pid_n, hw, c, HW, C, son, sohw, soc)
    c_mask = c < C
    k = pid_n * PN + c
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


ship(_affine_act_kernel, TILE_CONFIGS)
ship(_act_grad_sums_kernel, TILE_CONFIGS)
ship(_centered_affine_grad_kernel, TILE_CONFIGS)


def _config(kernel, x):
    return config_for(kernel, lambda: TILE_CONFIGS[0] if is_channels_last(x) else TILE_CONFIGS[1])


def pixel_splits(x, cfg):
    """Pixel range per program of a reduction: enough programs for ~4 waves
    over (N, C tiles). Returns (ranges per sample, pixels per range)."""
    n, c, hw = x.shape[0], x.shape[1], spatial_numel(x)
    hw_tiles = triton.cdiv(hw, cfg["BLOCK_HW"])
    base = n * triton.cdiv(c, cfg["BLOCK_C"])
    want = max(1, triton.cdiv(4 * multiprocessor_count(x.device), base))
    per_prog = triton.cdiv(hw_tiles, min(hw_tiles, want)) * cfg["BLOCK_HW"]
    return triton.cdiv(hw, per_prog), per_prog


def _param_stride(x, param):
    """PN: C for (N, C) parameters, 0 for (C,) ones."""
    return x.shape[1] if param.dim() == 2 else 0


def _elementwise_grid(x, cfg):
    return (triton.cdiv(spatial_numel(x), cfg["BLOCK_HW"]), x.shape[0], triton.cdiv(x.shape[1], cfg["BLOCK_C"]))


# Every launcher takes NC(D)HW- or channels_last(_3d)-contiguous tensors and contiguous
# float32 parameters, all (C,) or all (N, C).
def affine_act(x, mean, scale, shift, activation, dtype=None):
    """act((x - mean) * scale + shift) in `dtype` (default x's), laid out like x."""
    assert_launchable(_affine_act_kernel, x, mean, scale, shift)
    cfg = _config(_affine_act_kernel, x)
    c, hw = x.shape[1], spatial_numel(x)
    y = empty_like_format(x, x.shape, dtype or x.dtype)
    launch(_affine_act_kernel)[_elementwise_grid(x, cfg)](x, y, mean, scale, shift, hw, c, _param_stride(x, mean),
                                                          *_strides(x), *_strides(y),
                                                          ACT=activation_code(activation), **cfg)
    return y


def act_grad_sums(grad_y, x, mean, scale, shift, activation):
    """(2, N, S, C) float32 partial sums, over S pixel ranges per sample, of
    dz = act'(z) * grad_y and of dz * (x - mean), z = (x - mean) * scale + shift."""
    assert_launchable(_act_grad_sums_kernel, x, grad_y, mean, scale, shift)
    cfg = _config(_act_grad_sums_kernel, x)
    n, c = x.shape[:2]
    splits, per_prog = pixel_splits(x, cfg)
    part = torch.empty((2, n, splits, c), dtype=torch.float32, device=x.device)
    grid = (n, splits, triton.cdiv(c, cfg["BLOCK_C"]))
    launch(_act_grad_sums_kernel)[grid](x, grad_y, part, mean, scale, shift, spatial_numel(x), c,
                                        _param_stride(x, mean), per_prog, *_strides(x), *_strides(grad_y),
                                        ACT=activation_code(activation), **cfg)
    return part


def centered_affine_grad(x, grad_y, mean, scale, shift, coef_a, coef_b, activation):
    """coef_a + coef_b * (x - mean) [+ act'(z) * grad_y * scale] in x's dtype and layout."""
    assert_launchable(_centered_affine_grad_kernel, x, grad_y, mean, scale, shift, coef_a, coef_b)
    cfg = _config(_centered_affine_grad_kernel, x)
    c, hw = x.shape[1], spatial_numel(x)
    gx = empty_like_format(x, x.shape, x.dtype)
    has_gy = grad_y is not None
    gy = grad_y if has_gy else x
    launch(_centered_affine_grad_kernel)[_elementwise_grid(x, cfg)](
        x, gy, gx, mean, scale, shift, coef_a, coef_b, hw, c, _param_stride(x, mean), *_strides(x), *_strides(gy),
        *_strides(gx), ACT=activation_code(activation), HAS_GY=has_gy, **cfg)
    return gx
