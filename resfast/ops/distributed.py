"""BatchNorm statistics synchronised across processes (nn.SyncBatchNorm's
semantics) as a NormAffine for the fused convolution.

Each rank computes its local per-channel (mean, biased variance, count) with
one statistics pass; the moments are all-gathered and merged pairwise-stably
(Chan et al.), as torch's batch_norm_gather_stats_with_counts does. The
global mean and variance stay in the autograd graph: the fused op returns
their gradients, which are all-reduced in backward, so every rank's input
gradient includes what the other ranks' losses owe to its samples through the
shared statistics.
"""

import torch
import torch.distributed as dist

from resfast.ops.batch_norm import batch_norm_affine, check_batch_norm_args, update_running_stats
from resfast.ops.layout import accumulation_dtype, kernel_format, spatial_numel
from resfast.ops.norm_act_conv import NormAffine

ops = torch.ops.resfast


def sync_world_size(process_group=None) -> int:
    """Processes sharing statistics; 1 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def _local_moments(x):
    acc = accumulation_dtype(x.dtype)
    if x.numel() == 0:
        zeros = x.new_zeros((x.shape[1],), dtype=acc)
        return zeros, zeros.clone()
    return ops.channel_stats(x)


def gather_moments(mean, var, count, process_group, world_size):
    """Every rank's per-channel (mean, biased var) over `count` values merged:
    (mean, var) over all ranks in mean's dtype, and the total count."""
    c = mean.shape[0]
    # Merged in float64: the counts are exact and the merge is cheap (C values per rank).
    local = torch.cat([mean.double(), var.double(), mean.new_full((1,), count, dtype=torch.float64)])
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local, group=process_group)
    stacked = torch.stack(gathered)
    means, variances, counts = stacked[:, :c], stacked[:, c:2 * c], stacked[:, 2 * c:]
    total = counts.sum()
    global_mean = (means * counts).sum(0) / total
    global_var = ((variances + (means - global_mean) ** 2) * counts).sum(0) / total
    return global_mean.to(mean.dtype), global_var.to(mean.dtype), total.item()


def shared_stats_grad(x, mean, grad_mean, grad_var, total, process_group):
    """x's share of the gradient of statistics over every rank's batch (total
    values): every rank's loss depends on them, so their gradients are summed
    over ranks first."""
    grads = torch.stack([grad_mean, grad_var]).contiguous()
    dist.all_reduce(grads, group=process_group)
    count = x.shape[0] * spatial_numel(x)
    if count == 0:
        return torch.zeros_like(x, memory_format=kernel_format(x))
    # channel_stats_backward divides by the local count; the statistics are over all ranks.
    share = count / total
    return ops.channel_stats_backward(x, mean, (grads[0] * share).contiguous(), (grads[1] * share).contiguous())


class _SyncMoments(torch.autograd.Function):
    """(mean, biased var) of x's channels over every rank's batch."""

    @staticmethod
    def forward(ctx, x, process_group, world_size):
        mean, var = _local_moments(x)
        global_mean, global_var, total = gather_moments(mean, var, x.shape[0] * spatial_numel(x),
                                                        process_group, world_size)
        ctx.process_group, ctx.total = process_group, total
        ctx.save_for_backward(x, global_mean)
        total = torch.tensor(total, dtype=torch.float64)
        ctx.mark_non_differentiable(total)
        return global_mean, global_var, total

    @staticmethod
    def backward(ctx, grad_mean, grad_var, _grad_total):
        x, mean = ctx.saved_tensors
        grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
        grad_var = torch.zeros_like(mean) if grad_var is None else grad_var
        return shared_stats_grad(x, mean, grad_mean, grad_var, ctx.total, ctx.process_group), None, None


def sync_batch_norm_affine(x, running_mean, running_var, bn_weight, bn_bias, momentum, eps, process_group=None):
    """Training-mode BatchNorm of x with statistics over every process of
    `process_group` (default: the world), as a NormAffine whose mean and scale
    carry the statistics' gradient through autograd (batch_invstd is None).
    running_mean / running_var, when given, are updated in place with
    `momentum` and the unbiased variance over the global batch, as
    nn.SyncBatchNorm does. Every rank must call it, in the same order. With a
    single process (or torch.distributed not initialised) it is
    batch_norm_affine(training=True)."""
    check_batch_norm_args(x, running_mean, running_var, bn_weight, bn_bias, True, momentum, eps)
    world_size = sync_world_size(process_group)
    if world_size == 1:
        return batch_norm_affine(x, running_mean, running_var, bn_weight, bn_bias, True, momentum, eps)
    mean, var, total = _SyncMoments.apply(x, process_group, world_size)
    total = total.item()
    if total <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {int(total)} over "
                         f"{world_size} processes for input size {x.size()}")
    if running_mean is not None:
        update_running_stats(running_mean, running_var, mean.detach(), var.detach(), total, momentum)
    acc = mean.dtype
    invstd = torch.rsqrt(var + eps)
    scale = invstd if bn_weight is None else bn_weight.to(acc) * invstd
    shift = torch.zeros_like(mean) if bn_bias is None else bn_bias.to(acc)
    return NormAffine(mean, scale, shift, None)
