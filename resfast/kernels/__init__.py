"""Triton kernels (plain launchers; op registration lives in resfast.ops)."""
from .conv import (
    norm_act_conv2d_backward_input,
    norm_act_conv2d_backward_weight,
    norm_act_conv2d_forward,
)
from .stats import channel_stats, channel_stats_backward

__all__ = [
    "channel_stats",
    "channel_stats_backward",
    "norm_act_conv2d_backward_input",
    "norm_act_conv2d_backward_weight",
    "norm_act_conv2d_forward",
]
