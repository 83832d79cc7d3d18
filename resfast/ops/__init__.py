"""resfast's op layer: the registered ops (torch.ops.resfast.*), declared with
their checks, fake, reference and Triton implementations in one registry
(registry.py) by the op-family modules, the backend switch, and the
functional entry points."""

from resfast._extension import load as _load_extension

_load_extension()

from resfast.ops import registry  # noqa: E402
# The op families declare their ops in the registry as they are imported.
from resfast.ops.backend import BACKENDS, backend  # noqa: E402
from resfast.ops.batch_norm import batch_norm_act_conv2d, batch_norm_affine, update_running_stats  # noqa: E402
from resfast.ops.conv_engines import conv_choices, conv_impl  # noqa: E402
from resfast.ops.cpu_isa import available_cpu_isas, cpu_isa, hardware_isa, use_cpu_isa  # noqa: E402
from resfast.ops.dense import DenseBlockStats, DenseLayerParams, dense_block  # noqa: E402
from resfast.ops.distributed import sync_batch_norm_affine, sync_world_size  # noqa: E402
from resfast.ops.drop_path import drop_path  # noqa: E402
from resfast.ops.group_normalization import group_norm, group_norm_affine  # noqa: E402
from resfast.ops.layout import kernel_format  # noqa: E402
from resfast.ops.norm_act_conv import (  # noqa: E402
    NormAffine,
    affine_act_conv2d,
    conv_padding,
    norm_act_conv2d,
    norm_act_conv2d_into,
    norm_act_conv2d_stats,
)
from resfast.ops.norm_act_pool import max_pool2d, norm_act_max_pool2d  # noqa: E402
from resfast.ops.statistics import channel_stats  # noqa: E402

registry.finalize()

__all__ = ["BACKENDS", "DenseBlockStats", "DenseLayerParams", "NormAffine", "affine_act_conv2d", "available_cpu_isas",
           "backend", "batch_norm_act_conv2d", "batch_norm_affine", "channel_stats", "conv_choices", "conv_impl",
           "conv_padding", "cpu_isa",
           "dense_block", "drop_path", "group_norm", "group_norm_affine", "hardware_isa", "kernel_format", "max_pool2d",
           "norm_act_conv2d", "norm_act_conv2d_into", "norm_act_conv2d_stats", "norm_act_max_pool2d",
           "sync_batch_norm_affine", "sync_world_size", "update_running_stats", "use_cpu_isa"]
