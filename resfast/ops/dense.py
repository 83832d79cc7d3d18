"""A DenseNet dense block as one differentiable function over one preallocated
feature buffer.

Layer i reads the first c_i channels of the buffer through the fused
prologue (BN1 -> ReLU -> conv1x1, into its bottleneck), and its BN2 -> ReLU ->
conv3x3 epilogue stores the growth_rate new channels straight into the
buffer's next slice, returning their batch statistics. BatchNorm over the
concatenation has, per channel, the statistics of the slice the channel came
from, so every slice's statistics are computed once, when it is written, and
shared by all later layers (each with its own gamma and beta).

Saved for backward: the buffer, each layer's bottleneck output and the
per-channel statistics. The backward walks the layers in reverse, recomputing
the normalised activations inside the fused backward op, and accumulates the
buffer's gradient in one preallocated gradient buffer.

With a process group (synchronised BatchNorm, data-parallel training) every
statistic is merged over the group's ranks as it is computed, and in backward
the statistics' gradients are summed over them before x's share is taken.
"""

from typing import NamedTuple, Optional

import torch

from resfast.ops.checks import check_activation_input
from resfast.ops.distributed import gather_moments, shared_stats_grad, sync_world_size
from resfast.ops.layout import accumulation_dtype, kernel_format

ops = torch.ops.resfast


class DenseLayerParams(NamedTuple):
    """One layer's tensors. The running statistics are read only when the
    block normalises with them (use_batch_stats=False)."""

    norm1_weight: torch.Tensor
    norm1_bias: torch.Tensor
    conv1_weight: torch.Tensor
    norm2_weight: torch.Tensor
    norm2_bias: torch.Tensor
    conv2_weight: torch.Tensor
    norm1_running_mean: Optional[torch.Tensor] = None
    norm1_running_var: Optional[torch.Tensor] = None
    norm2_running_mean: Optional[torch.Tensor] = None
    norm2_running_var: Optional[torch.Tensor] = None


class DenseBlockStats(NamedTuple):
    """Batch statistics of one training forward (biased variances): the
    buffer's channels, and each layer's bottleneck as an (L, C_b) stack, over
    `count` values per channel (all ranks' with a process group)."""

    mean: torch.Tensor
    var: torch.Tensor
    bottleneck_mean: torch.Tensor
    bottleneck_var: torch.Tensor
    count: int


_PARAMS_PER_LAYER = len(DenseLayerParams._fields)
_CONV1 = dict(stride=[1, 1], padding=[0, 0], dilation=[1, 1], groups=1, activation="relu")
_CONV2 = dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1, activation="relu")


def _conv_args(conv):
    return conv["stride"], conv["padding"], conv["dilation"], conv["groups"], conv["activation"]


def _normalisation(x, running_mean, running_var, weight, eps, batch_stats=None):
    """BatchNorm's (mean, scale = weight / sqrt(var + eps)) for x: from
    batch_stats (mean, var) when given, else from the running statistics. One
    op (batch_norm_affine) instead of four tensor calls per norm."""
    if batch_stats is None:
        mean, scale, _, _ = ops.batch_norm_affine(x, running_mean, running_var, weight, None, False, 0.0, eps)
    else:
        mean, scale, _, _ = ops.batch_norm_affine(x, None, None, weight, None, True, 0.0, eps, *batch_stats)
    return mean, scale


class _DenseBlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, num_layers, use_batch_stats, eps1, eps2, drop_rate, training, sync, *flat):
        layers = [DenseLayerParams(*flat[i * _PARAMS_PER_LAYER:(i + 1) * _PARAMS_PER_LAYER])
                  for i in range(num_layers)]
        n, c0, h, w = x.shape
        count, total = n * h * w, float(n * h * w)

        def shared(moments):
            """Local (mean, var) merged over the ranks of `sync`'s group."""
            nonlocal total
            if sync is None:
                return moments
            mean, var, total = gather_moments(*moments, count, *sync)
            return mean, var

        growth = layers[0].conv2_weight.shape[0]
        width = layers[0].conv1_weight.shape[0]
        fmt = kernel_format(x)
        acc = accumulation_dtype(x.dtype)
        buf = torch.empty((n, c0 + num_layers * growth, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
        buf[:, :c0].copy_(x)
        drop = training and drop_rate > 0
        if use_batch_stats:
            mean_all = x.new_empty((buf.shape[1],), dtype=acc)
            var_all = x.new_empty((buf.shape[1],), dtype=acc)
            mean_all[:c0], var_all[:c0] = shared(ops.channel_stats(x))
            bott_mean = x.new_empty((num_layers, width), dtype=acc)
            bott_var = x.new_empty((num_layers, width), dtype=acc)
        bottlenecks, noises = [], []
        for i, p in enumerate(layers):
            c_in = c0 + i * growth
            features = buf.narrow(1, 0, c_in)
            batch1 = (mean_all[:c_in], var_all[:c_in]) if use_batch_stats else None
            mean1, scale1 = _normalisation(features, p.norm1_running_mean, p.norm1_running_var, p.norm1_weight,
                                           eps1[i], batch1)
            bott_args = (features, mean1, scale1, p.norm1_bias, p.conv1_weight, None, None, *_conv_args(_CONV1), None)
            if use_batch_stats:
                bott, m2, v2 = ops.norm_act_conv2d_stats(*bott_args)
                m2, v2 = shared((m2, v2))
                bott_mean[i], bott_var[i] = m2, v2
            else:
                bott = ops.norm_act_conv2d(*bott_args)
            m2, scale2 = _normalisation(bott, p.norm2_running_mean, p.norm2_running_var, p.norm2_weight, eps2[i],
                                        (m2, v2) if use_batch_stats else None)
            mi, vi = ops.norm_act_conv2d_into(bott, m2, scale2, p.norm2_bias, p.conv2_weight, None, None,
                                              *_conv_args(_CONV2), buf, c_in, use_batch_stats and not drop)
            if drop:
                # F.dropout's own recipe (and random stream): a Bernoulli noise
                # tensor of the new features' shape and layout, scaled by 1/(1-p).
                new = buf[:, c_in:c_in + growth]
                noise = torch.empty((n, growth, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
                noise.bernoulli_(1 - drop_rate).div_(1 - drop_rate)
                new.mul_(noise)
                noises.append(noise)
                if use_batch_stats:
                    mi, vi = ops.channel_stats(new)
            if use_batch_stats:
                mi, vi = shared((mi, vi))
                mean_all[c_in:c_in + growth] = mi
                var_all[c_in:c_in + growth] = vi
            bottlenecks.append(bott)

        ctx.num_layers, ctx.use_batch_stats, ctx.eps1, ctx.eps2, ctx.c0 = num_layers, use_batch_stats, eps1, eps2, c0
        ctx.drop, ctx.sync, ctx.total = drop, sync, total
        if use_batch_stats:
            stats = (mean_all, var_all, bott_mean, bott_var)
        else:
            empty = x.new_empty((0,), dtype=acc)
            stats = (empty, empty, empty, empty)
        ctx.save_for_backward(buf, *stats, *bottlenecks, *noises, *flat)
        total = torch.tensor(total, dtype=torch.float64)
        ctx.mark_non_differentiable(*stats, total)
        return (buf, *stats, total)

    @staticmethod
    def backward(ctx, grad_buf_out, *unused_stat_grads):
        sync = ctx.sync

        def unit_backward(grad, x, mean, invstd, weight, bias, conv_weight, conv, batch_invstd):
            """The fused backward; with sync, the statistics' share of x's
            gradient over all ranks' batch added after it."""
            scale = weight * invstd
            grads = ops.norm_act_conv2d_backward(grad, x, mean, scale, bias, conv_weight, *_conv_args(conv),
                                                 None if sync else batch_invstd, [True, True])
            if sync is None or batch_invstd is None:
                return grads
            grad_x, grad_scale, grad_shift, grad_w = grads
            grad_mean, grad_var = -scale * grad_shift, -0.5 * scale * invstd * invstd * grad_scale
            return grad_x + shared_stats_grad(x, mean, grad_mean, grad_var, ctx.total, sync[0]), *grads[1:]

        num_layers, c0 = ctx.num_layers, ctx.c0
        saved = ctx.saved_tensors
        buf, mean_all, var_all, bott_mean, bott_var = saved[:5]
        bottlenecks = saved[5:5 + num_layers]
        rest = saved[5 + num_layers:]
        noises = rest[:num_layers] if ctx.drop else ()
        flat = rest[len(noises):]
        layers = [DenseLayerParams(*flat[i * _PARAMS_PER_LAYER:(i + 1) * _PARAMS_PER_LAYER])
                  for i in range(num_layers)]
        acc = accumulation_dtype(buf.dtype)
        growth = layers[0].conv2_weight.shape[0]
        if ctx.use_batch_stats:
            # Every layer's inverse deviations in a few calls, not three per
            # layer: at small sizes those calls cost as much as the arithmetic.
            invstd_all = {eps: torch.rsqrt(var_all + eps) for eps in set(ctx.eps1)}
            if len(set(ctx.eps2)) == 1:
                bott_invstd = torch.rsqrt(bott_var + ctx.eps2[0])
            else:
                bott_invstd = torch.stack([torch.rsqrt(v + eps) for v, eps in zip(bott_var, ctx.eps2)])
        grad_buf = torch.empty_like(buf, memory_format=kernel_format(buf))
        grad_buf.copy_(grad_buf_out)
        grads = [None] * len(flat)
        for i in reversed(range(num_layers)):
            p, bott = layers[i], bottlenecks[i]
            c_in = c0 + i * growth
            if ctx.use_batch_stats:
                mean1, invstd1 = mean_all.narrow(0, 0, c_in), invstd_all[ctx.eps1[i]].narrow(0, 0, c_in)
                mean2, invstd2 = bott_mean[i], bott_invstd[i]
                batch_invstd1, batch_invstd2 = invstd1, invstd2
            else:
                mean1 = p.norm1_running_mean.to(acc)
                invstd1 = torch.rsqrt(p.norm1_running_var.to(acc) + ctx.eps1[i])
                mean2 = p.norm2_running_mean.to(acc)
                invstd2 = torch.rsqrt(p.norm2_running_var.to(acc) + ctx.eps2[i])
                batch_invstd1 = batch_invstd2 = None
            grad_new = grad_buf.narrow(1, c_in, growth)
            if ctx.drop:
                grad_new = grad_new * noises[i]
            grad_bott, grad_scale2, grad_shift2, grad_w2 = unit_backward(
                grad_new, bott, mean2, invstd2, p.norm2_weight, p.norm2_bias, p.conv2_weight, _CONV2, batch_invstd2)
            grad_in, grad_scale1, grad_shift1, grad_w1 = unit_backward(
                grad_bott, buf.narrow(1, 0, c_in), mean1, invstd1, p.norm1_weight, p.norm1_bias, p.conv1_weight,
                _CONV1, batch_invstd1)
            grad_buf.narrow(1, 0, c_in).add_(grad_in)
            base = i * _PARAMS_PER_LAYER
            grads[base:base + 6] = [(grad_scale1 * invstd1).to(p.norm1_weight.dtype),
                                    grad_shift1.to(p.norm1_bias.dtype), grad_w1,
                                    (grad_scale2 * invstd2).to(p.norm2_weight.dtype),
                                    grad_shift2.to(p.norm2_bias.dtype), grad_w2]
        return (grad_buf.narrow(1, 0, c0), None, None, None, None, None, None, None, *grads)


def dense_block(x: torch.Tensor, layers, use_batch_stats: bool, eps1, eps2, drop_rate: float = 0.0,
                training: bool = False, process_group=None, sync: bool = False):
    """The features of a dense block, [x, new_1, ..., new_L] along channels, in
    one preallocated buffer laid out like x; layer i computes
    conv2(relu(bn2(conv1(relu(bn1(buffer[:, :c_i])))))) with the tensors of
    `layers[i]` (a DenseLayerParams), followed by dropout with `drop_rate`
    when `training`. BatchNorm uses batch statistics when use_batch_stats,
    else each layer's running statistics; eps1/eps2: per-layer epsilons.

    With sync, the batch statistics are over every rank of process_group
    (default: the world), as synchronised BatchNorm's; every rank must call
    it, in the same order.

    Returns (buffer, stats): stats is a DenseBlockStats of the batch statistics
    (for the caller's running-statistics update), or None without batch
    statistics."""
    check_activation_input(x)
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-D (N, C, H, W) tensor for a dense block, got shape {tuple(x.shape)}")
    if not layers:
        raise ValueError("layers: expected at least one dense layer")
    growth = layers[0].conv2_weight.shape[0]
    for i, p in enumerate(layers):
        c_in = x.shape[1] + i * growth
        if p.conv1_weight.shape[1:] != (c_in, 1, 1) or p.conv2_weight.shape[1:] != (p.conv1_weight.shape[0], 3, 3):
            raise ValueError(f"layers[{i}]: expected conv1 (C_b, {c_in}, 1, 1) and conv2 ({growth}, C_b, 3, 3), got "
                             f"{tuple(p.conv1_weight.shape)} and {tuple(p.conv2_weight.shape)}")
        if p.conv2_weight.shape[0] != growth or p.conv1_weight.shape[0] != layers[0].conv1_weight.shape[0]:
            raise ValueError(f"layers[{i}]: every layer needs the same growth rate and bottleneck width")
        if not use_batch_stats and p.norm1_running_mean is None:
            raise ValueError(f"layers[{i}]: running statistics are needed when use_batch_stats=False")
    if use_batch_stats and x.shape[0] * x.shape[2] * x.shape[3] == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate: expected a probability in [0, 1), got {drop_rate!r}")
    flat = [t for p in layers for t in p]
    world_size = sync_world_size(process_group) if sync and use_batch_stats else 1
    group = (process_group, world_size) if world_size > 1 else None
    buf, *stats, total = _DenseBlockFunction.apply(x, len(layers), use_batch_stats, tuple(eps1), tuple(eps2),
                                                   float(drop_rate), training, group, *flat)
    return buf, (DenseBlockStats(*stats, int(total.item())) if use_batch_stats else None)
