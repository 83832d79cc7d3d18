"""Malformed input gives a clear Python exception naming the argument, never a
crash or a silent wrong answer."""

import math

import pytest
import torch

import resfast
from conftest import triton_available

F = resfast.ops


def unit_args(c=4, oc=6):
    return dict(running_mean=torch.zeros(c), running_var=torch.ones(c), bn_weight=torch.ones(c),
                bn_bias=torch.zeros(c), training=True, momentum=0.1, eps=1e-5, weight=torch.randn(oc, c, 3, 3))


def call(x, **overrides):
    args = {**unit_args(), **overrides}
    return F.batch_norm_act_conv2d(x, args.pop("running_mean"), args.pop("running_var"), args.pop("bn_weight"),
                                   args.pop("bn_bias"), args.pop("training"), args.pop("momentum"),
                                   args.pop("eps"), args.pop("weight"), **args)


@pytest.mark.parametrize("x, overrides, error, match", [
    (torch.randn(4, 5, 5), {}, ValueError, "x: expected a 4-D"),
    (torch.randint(0, 3, (2, 4, 5, 5)), {}, TypeError, "x: expected one of"),
    (torch.randn(2, 5, 5, 5), {}, ValueError, "weight: expected in_channels/groups = 5"),
    (torch.randn(2, 4, 5, 5), {"weight": torch.randn(6, 4, 3)}, ValueError, "weight: expected a 4-D"),
    (torch.randn(2, 4, 5, 5), {"groups": 3}, ValueError, "groups: expected to divide"),
    (torch.randn(2, 4, 5, 5), {"running_mean": torch.zeros(3)}, ValueError, "running_mean: expected shape"),
    (torch.randn(2, 4, 5, 5), {"bn_weight": torch.ones(5)}, ValueError, "bn_weight: expected shape"),
    (torch.randn(2, 4, 5, 5), {"momentum": math.nan}, ValueError, "momentum: expected a finite number"),
    (torch.randn(2, 4, 5, 5), {"eps": -1.0}, ValueError, "eps: expected a finite number >= 0"),
    (torch.randn(2, 4, 5, 5), {"eps": math.inf}, ValueError, "eps: expected a finite number"),
    (torch.randn(2, 4, 5, 5), {"activation": "gelu"}, ValueError, "activation: expected"),
    (torch.randn(2, 4, 5, 5), {"stride": 0}, ValueError, "stride: expected two positive"),
    (torch.randn(2, 4, 5, 5), {"padding": -1}, ValueError, "padding: expected two non-negative"),
    (torch.randn(2, 4, 2, 2), {}, ValueError, "smaller than the dilated kernel"),
    (torch.randn(1, 4, 1, 1), {"weight": torch.randn(6, 4, 1, 1)}, ValueError,
     "Expected more than 1 value per channel when training"),
    (torch.randn(2, 4, 5, 5), {"running_mean": torch.zeros(4, device="meta")}, ValueError,
     "running_mean: expected a tensor on cpu"),
    (torch.randn(2, 4, 5, 5), {"training": False, "running_mean": None}, ValueError,
     "running_mean, running_var: expected tensors when training=False"),
    (torch.randn(2, 4, 5, 5), {"padding": "same", "weight": torch.randn(6, 4, 2, 2)}, ValueError,
     "padding: 'same' needs symmetric padding"),
])
def test_functional_rejects(x, overrides, error, match):
    with pytest.raises(error, match=match):
        call(x, **overrides)


def test_module_rejects_wrong_channels_and_rank():
    unit = resfast.nn.BNReLUConv2d(4, 6, 3, padding=1)
    with pytest.raises(ValueError, match="weight: expected in_channels/groups = 3"):
        unit(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="x: expected a 4-D"):
        unit(torch.randn(2, 4, 5))


def test_from_modules_rejects_mismatch():
    with pytest.raises(ValueError, match="bn: expected num_features"):
        resfast.nn.BNReLUConv2d.from_modules(torch.nn.BatchNorm2d(3), torch.nn.Conv2d(4, 4, 3))
    with pytest.raises(TypeError, match="bn: expected an nn.BatchNorm2d"):
        resfast.nn.BNReLUConv2d.from_modules(torch.nn.GroupNorm(2, 4), torch.nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match="conv: expected padding_mode='zeros'"):
        resfast.nn.BNReLUConv2d.from_modules(torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 4, 3, padding_mode="reflect"))


def test_registered_ops_reject_bad_arguments():
    """The C++ kernels check their arguments too, for direct torch.ops callers."""
    x = torch.randn(2, 4, 5, 5)
    v = torch.randn(4)
    w = torch.randn(6, 4, 3, 3)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    op = torch.ops.resfast.norm_act_conv2d
    with pytest.raises(ValueError, match="scale: expected shape"):
        op(x, v, torch.randn(3), v, w, None, None, *conv, "relu")
    with pytest.raises(TypeError, match="mean: expected dtype"):
        op(x, v.double(), v, v, w, None, None, *conv, "relu")
    with pytest.raises(ValueError, match="activation: expected"):
        op(x, v, v, v, w, None, None, *conv, "tanh")
    with pytest.raises(TypeError, match="weight: expected dtype"):
        op(x.half(), v, v, v, w, None, None, *conv, "relu")
    with pytest.raises(ValueError, match="residual: expected shape"):
        op(x, v, v, v, w, None, torch.randn(2, 6, 4, 4), *conv, "relu")
    with pytest.raises(ValueError, match="x: expected at least one value per channel"):
        torch.ops.resfast.channel_stats(torch.randn(0, 4, 5, 5))
    with pytest.raises(ValueError, match="batch_invstd: expected shape"):
        op(x, v, v, v, w, None, None, *conv, "relu", torch.ones(3))


def test_backend_switch_rejects():
    with pytest.raises(ValueError, match="backend: expected one of"):
        with resfast.backend("mps"):
            pass
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match="resfast.backend\\('cuda'\\): channel_stats got a tensor on cpu"):
        with resfast.backend("cuda"):
            F.channel_stats(x)


@pytest.mark.skipif(not triton_available(), reason="needs CUDA or TRITON_INTERPRET=1")
def test_triton_backend_rejects_float64():
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with pytest.raises(TypeError, match="x: expected one of float32, float16, bfloat16"):
        with resfast.backend("triton"):
            F.channel_stats(x)
