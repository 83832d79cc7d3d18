"""BatchNorm for the fused units: the arguments they take from an
nn.BatchNorm2d (with its bookkeeping), synchronised BatchNorm for
data-parallel training, and the module's normalisation of x as the fused
op's NormAffine."""

import torch
from torch import nn

from resfast import ops
from resfast.nn.members import plain, tensor
from resfast.ops.layout import per_element

# The BatchNorm modules whose parameters and buffers the fused units use
# (SyncBatchNorm2d is an nn.BatchNorm2d), for images and for volumes.
BATCH_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)
BATCH_NORMS_3D = (nn.BatchNorm3d, nn.SyncBatchNorm)


def batch_norm_args(bn: nn.BatchNorm2d, training: bool):
    """What nn.BatchNorm2d.forward passes to F.batch_norm (running statistics,
    weight, bias, whether to use batch statistics, momentum factor, eps), with
    its num_batches_tracked and cumulative-average bookkeeping. Call once per
    forward: it counts the batch."""
    momentum = bn.momentum
    factor = 0.0 if momentum is None else momentum
    running_mean, running_var = tensor(bn, "running_mean"), tensor(bn, "running_var")
    if training and bn.track_running_stats:
        num_batches_tracked = tensor(bn, "num_batches_tracked")
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            factor = 1.0 / float(num_batches_tracked) if momentum is None else momentum
    use_batch_stats = training or (running_mean is None and running_var is None)
    keep_running = not training or bn.track_running_stats
    return (running_mean if keep_running else None, running_var if keep_running else None,
            tensor(bn, "weight"), tensor(bn, "bias"), use_batch_stats, factor, bn.eps)


class _SyncBatchNorm:
    """What SyncBatchNorm2d and SyncBatchNorm3d add to their torch BatchNorm."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None, *, bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         bias=bias)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not sync_process_group(self, self.training)[0]:
            return super().forward(x)
        self._check_input_dim(x)  # the rank the torch BatchNorm requires
        mean, scale, shift, _ = bn_affine(self, x, True)
        return ((x.to(mean.dtype) - per_element(mean, x)) * per_element(scale, x) + per_element(shift, x)).to(x.dtype)


@plain
class SyncBatchNorm2d(_SyncBatchNorm, nn.BatchNorm2d):
    """nn.BatchNorm2d whose training-mode statistics are computed over every
    process of `process_group` (default: the world), as nn.SyncBatchNorm's
    are, and which, unlike nn.SyncBatchNorm, DistributedDataParallel accepts
    on the CPU. Inside the fused units it only holds parameters, buffers and
    the group; called on its own it normalises like nn.SyncBatchNorm."""


@plain
class SyncBatchNorm3d(_SyncBatchNorm, nn.BatchNorm3d):
    """SyncBatchNorm2d for volumes: an nn.BatchNorm3d with a process group."""


def sync_process_group(bn: nn.Module, training: bool):
    """(True, bn's process group) when bn is an nn.SyncBatchNorm or
    SyncBatchNorm2d whose statistics are shared in this forward (training,
    more than one process), else (False, None): nn.SyncBatchNorm's own rule."""
    if isinstance(bn, (nn.SyncBatchNorm, _SyncBatchNorm)) and training and \
            ops.sync_world_size(bn.process_group) > 1:
        return True, bn.process_group
    return False, None


def direct(x, residual=None, weight=None) -> bool:
    """Whether a module's arguments can go to the registered ops as they are
    (they check them in C++): a non-empty floating-point CPU or CUDA tensor,
    no autocast, and a residual of the convolution's dtype."""
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel() > 0):
        return False
    # is_cpu/is_cuda and a literal device type: x.device builds an object per call.
    if x.is_cpu:
        autocast = torch.is_autocast_enabled("cpu")
    elif x.is_cuda:
        autocast = torch.is_autocast_enabled("cuda")
    else:
        return False
    return not autocast and (residual is None or residual.dtype == weight.dtype)


def bn_affine(bn: nn.Module, x: torch.Tensor, training: bool, batch_stats=None) -> "ops.NormAffine":
    """bn's normalisation of x (one statistics pass, or x's batch_stats when
    its producer computed them; running statistics updated), with statistics
    shared across processes when bn is a synced nn.SyncBatchNorm (which then
    gathers its own). Call once per forward: it counts the batch."""
    sync, group = sync_process_group(bn, training)
    running_mean, running_var, weight, bias, use_batch, factor, eps = batch_norm_args(bn, training)
    if sync:
        return ops.sync_batch_norm_affine(x, running_mean, running_var, weight, bias, factor, eps, group)
    return batch_norm_affine(x, running_mean, running_var, weight, bias, use_batch, factor, eps, batch_stats)


def batch_norm_affine(x, running_mean, running_var, weight, bias, training, momentum, eps, batch_stats=None):
    """ops.batch_norm_affine, the op called directly where it can be."""
    if direct(x):
        mean, scale, shift, invstd = torch.ops.resfast.batch_norm_affine(
            x, running_mean, running_var, weight, bias, training, momentum, eps, *(batch_stats or (None, None)))
        return ops.NormAffine(mean, scale, shift, invstd if training else None)
    return ops.batch_norm_affine(x, running_mean, running_var, weight, bias, training, momentum, eps,
                                 batch_stats=batch_stats)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """nn.SyncBatchNorm.convert_sync_batchnorm for resfast models: every
    nn.BatchNorm2d and nn.SyncBatchNorm (exactly those types; subclasses with
    their own forward are left alone), inside the fused units too, becomes a
    SyncBatchNorm2d (an nn.BatchNorm3d a SyncBatchNorm3d) sharing its
    parameters and buffers, so training-mode
    statistics are computed over all processes of `process_group` (default:
    the world), under DistributedDataParallel on the CPU as well as on CUDA.
    Converts in place; returns the module (a new one if `module` itself is a
    BatchNorm)."""
    if type(module) in (nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
        cls = SyncBatchNorm3d if type(module) is nn.BatchNorm3d else SyncBatchNorm2d
        bn = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                 process_group, device="meta", bias=module.bias is not None)
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(bn, name, getattr(module, name))
        return bn.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group))
    return module
