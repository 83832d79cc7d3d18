"""resfast's op layer: the registered ops (torch.ops.resfast.*), their fake and
autograd registrations, the backend switch, and the functional API."""

from resfast._extension import load as _load_extension

_load_extension()

from resfast.ops import library  # noqa: E402,F401  (registers fake and Triton kernels)
from resfast.ops import dense  # noqa: E402,F401
from resfast.ops.backend import BACKENDS, backend  # noqa: E402
from resfast.ops.cpu_isa import available_cpu_isas, cpu_isa, hardware_isa, use_cpu_isa  # noqa: E402
from resfast.ops.functional import (  # noqa: E402
    NormAffine,
    affine_act_conv2d,
    batch_norm_act_conv2d,
    batch_norm_affine,
    channel_stats,
    conv_padding,
    drop_path,
    group_norm,
    group_norm_affine,
    norm_act_conv2d,
    norm_act_conv2d_into,
    norm_act_conv2d_stats,
)
from resfast.ops.distributed import sync_batch_norm_affine, sync_world_size  # noqa: E402

__all__ = ["BACKENDS", "NormAffine", "affine_act_conv2d", "available_cpu_isas", "backend", "batch_norm_act_conv2d",
           "batch_norm_affine", "channel_stats", "conv_padding", "cpu_isa", "drop_path", "group_norm",
           "group_norm_affine", "hardware_isa", "norm_act_conv2d", "norm_act_conv2d_into", "norm_act_conv2d_stats",
           "sync_batch_norm_affine", "sync_world_size", "use_cpu_isa"]
