"""Batch statistics: BatchNorm's per channel over (N, [D,] H, W) and GroupNorm's
per (sample, group), with their gradients; ops and the channel_stats entry
point."""

import torch

from resfast.ops import registry
from resfast.ops.checks import check_activation_input, triton_input
from resfast.ops.layout import accumulation_dtype, kernel_format, per_element, reduced_dims, spatial_numel

ops = torch.ops.resfast


def _kernels():
    # Imported on first use: the Triton interpreter flag is read when kernels are defined.
    from resfast.kernels import group_norm, pointwise, stats

    return stats, group_norm, pointwise


def _empty_like(x):
    return torch.empty_like(x, memory_format=kernel_format(x))


def _values_per_channel(x):
    return x.shape[0] * spatial_numel(x)


# ---------------------------------------------------------------- channel_stats
# Per-channel mean and biased variance over every dim but C.
channel_stats_op = registry.define("channel_stats", cuda="cpp")


@channel_stats_op.register_check
def _(x):
    check_activation_input(x)
    if _values_per_channel(x) == 0:
        raise ValueError(f"x: expected at least one value per channel, got shape {tuple(x.shape)}")


@channel_stats_op.register_fake
def _(x):
    acc = accumulation_dtype(x.dtype)
    return x.new_empty((x.shape[1],), dtype=acc), x.new_empty((x.shape[1],), dtype=acc)


@channel_stats_op.register_reference
def _(x):
    acc = accumulation_dtype(x.dtype)
    var, mean = torch.var_mean(x.to(torch.float64), dim=reduced_dims(x), unbiased=False)
    return mean.to(acc), var.to(acc)


@channel_stats_op.register_triton
def _(x):
    return _kernels()[0].channel_stats(triton_input(x))


def channel_stats(x):
    """Per-channel mean and biased variance of an (N, C, H, W) or (N, C, D, H, W) tensor over every dim but C."""
    check_activation_input(x)
    return ops.channel_stats(x)


# ---------------------------------------------------------------- channel_stats_backward
# grad_x = (grad_mean + 2 grad_var (x - mean)) / M, M the values per channel.
channel_stats_backward_op = registry.define("channel_stats_backward", cuda="cpp")


def _check_channel_vectors(x, **vectors):
    acc = accumulation_dtype(x.dtype)
    for name, t in vectors.items():
        if t.shape != (x.shape[1],):
            raise ValueError(f"{name}: expected shape ({x.shape[1]},), got {tuple(t.shape)}")
        if t.dtype != acc:
            raise TypeError(f"{name}: expected dtype {acc}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device}, got {t.device}")


@channel_stats_backward_op.register_check
def _(x, mean, grad_mean, grad_var):
    check_activation_input(x)
    _check_channel_vectors(x, mean=mean, grad_mean=grad_mean, grad_var=grad_var)


@channel_stats_backward_op.register_fake
def _(x, mean, grad_mean, grad_var):
    return _empty_like(x)


@channel_stats_backward_op.register_reference
def _(x, mean, grad_mean, grad_var):
    g = per_element(grad_mean, x) + 2 * per_element(grad_var, x) * (x.to(mean.dtype) - per_element(mean, x))
    return (g / _values_per_channel(x)).to(x.dtype).contiguous(memory_format=kernel_format(x))


@channel_stats_backward_op.register_triton
def _(x, mean, grad_mean, grad_var):
    return _kernels()[0].channel_stats_backward(triton_input(x), mean.contiguous(), grad_mean.contiguous(),
                                                grad_var.contiguous())


# ---------------------------------------------------------------- group_stats
# GroupNorm's statistics: per-(sample, group) mean and biased variance, (N, G).
group_stats_op = registry.define("group_stats")


def check_groups(x, num_groups):
    """x is (N, C, H, W) or (N, C, D, H, W) with G = num_groups dividing C and at least one value per group."""
    check_activation_input(x)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0 or \
            x.shape[1] % num_groups:
        raise ValueError(f"num_groups: expected a positive divisor of the {x.shape[1]} channels, got {num_groups!r}")
    if x.shape[0] and not x[0].numel():
        raise ValueError(f"x: expected at least one value per group, got shape {tuple(x.shape)}")


def check_group_vectors(x, num_groups, **vectors):
    """(N, G) statistics of x's accumulation dtype, on x's device."""
    acc = accumulation_dtype(x.dtype)
    for name, t in vectors.items():
        if t.shape != (x.shape[0], num_groups):
            raise ValueError(f"{name}: expected shape ({x.shape[0]}, {num_groups}), got {tuple(t.shape)}")
        if t.dtype != acc:
            raise TypeError(f"{name}: expected dtype {acc}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device}, got {t.device}")


def stats_groups(x, mean):
    """G of a statistics op's (N, G) mean (0 when it is not 2-D: then invalid)."""
    return mean.shape[1] if mean.dim() == 2 else 0


group_stats_op.register_check(check_groups)


@group_stats_op.register_fake
def _(x, num_groups):
    acc = accumulation_dtype(x.dtype)
    shape = (x.shape[0], num_groups)
    return x.new_empty(shape, dtype=acc), x.new_empty(shape, dtype=acc)


def by_group(t, num_groups):
    return t.reshape(t.shape[0], num_groups, -1)


def per_channel(per_group, x):
    """(N, G) values broadcastable against x (N, C, *), each group's value over its channels."""
    return per_element(per_group.repeat_interleave(x.shape[1] // per_group.shape[1], dim=1), x)


@group_stats_op.register_reference
def _(x, num_groups):
    acc = accumulation_dtype(x.dtype)
    var, mean = torch.var_mean(by_group(x.to(torch.float64), num_groups), dim=2, unbiased=False)
    return mean.to(acc), var.to(acc)


@group_stats_op.register_triton
def _(x, num_groups):
    return _kernels()[1].group_stats(triton_input(x), num_groups)


# ---------------------------------------------------------------- group_stats_backward
group_stats_backward_op = registry.define("group_stats_backward")


@group_stats_backward_op.register_check
def _(x, mean, grad_mean, grad_var):
    groups = stats_groups(x, mean)
    check_groups(x, groups)
    check_group_vectors(x, groups, mean=mean, grad_mean=grad_mean, grad_var=grad_var)


@group_stats_backward_op.register_fake
def _(x, mean, grad_mean, grad_var):
    return _empty_like(x)


@group_stats_backward_op.register_reference
def _(x, mean, grad_mean, grad_var):
    count = x[0].numel() // mean.shape[1]
    centered = x.to(mean.dtype) - per_channel(mean, x)
    g = (per_channel(grad_mean, x) + 2 * per_channel(grad_var, x) * centered) / count
    return g.to(x.dtype).contiguous(memory_format=kernel_format(x))


def _spread(per_group, channels):
    return per_group.repeat_interleave(channels // per_group.shape[1], dim=1).contiguous()


def group_stats_input_grad(x, mean, grad_mean, grad_var):
    """The Triton group_stats_backward: a + b (x - mean) with per-(sample,
    channel) coefficients, in one pass."""
    count = x[0].numel() // mean.shape[1]
    c = x.shape[1]
    mean_c = _spread(mean, c)
    return _kernels()[2].centered_affine_grad(x, None, mean_c, mean_c, mean_c, _spread(grad_mean / count, c),
                                              _spread(2 * grad_var / count, c), "identity")


@group_stats_backward_op.register_triton
def _(x, mean, grad_mean, grad_var):
    return group_stats_input_grad(triton_input(x), mean.contiguous(), grad_mean, grad_var)
