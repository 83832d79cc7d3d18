"""Triton kernels and their launchers (plain launchers: the ops, their
argument checks and op-level algebra live in resfast.ops)."""
from . import conv, group_norm, pointwise, stats  # noqa: F401  (every kernel module, so SHIPPED lists every kernel)
from ._common import SHIPPED, forced_configs, recorded_launches  # noqa: F401
