"""Every instruction-set copy of the CPU kernels (csrc/cpu/isa.h) that this CPU
can run, against float64 references, at shapes that reach each loop's vector
body and its tail: NCHW planes of 323 values (a whole 256-value block, 16-lane
runs and a remainder) and channels_last rows of 20 channels."""

import os
import subprocess
import sys

import pytest
import torch

import resfast
from resfast.ops import available_cpu_isas, cpu_isa, hardware_isa, use_cpu_isa
from resfast.ops.cpu_isa import CPU_ISAS
from test_bn_relu_conv import compare, make_pair
from test_conv_into import _expected, _inputs
from test_group_norm import check_against_float64
from utils import assert_close

# Every level the extension compiles; those this CPU cannot run are skipped,
# with the reason, rather than left out.
ISAS = [pytest.param(isa, marks=pytest.mark.skipif(isa not in available_cpu_isas(),
                                                   reason=f"this CPU cannot run {isa} (best: {hardware_isa()})"))
        for isa in CPU_ISAS]
CL = torch.channels_last
FORMATS = [torch.contiguous_format, CL]


# bfloat16 with SiLU only: rounding x to bfloat16 moves values across ReLU's
# kink, where the float64 reference's gradient jumps.
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype,activation", [(torch.float32, "silu"), (torch.float32, "relu"),
                                              (torch.bfloat16, "silu")], ids=["f32-silu", "f32-relu", "bf16-silu"])
def test_group_norm(isa, fmt, dtype, activation):
    with use_cpu_isa(isa):
        assert cpu_isa() == isa
        check_against_float64("auto", (2, 20, 17, 19, 4), activation, fmt, dtype=dtype)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_fused_unit_training(isa, channels_last):
    """Statistics, the normalise-activate prologue and the backward's sums."""
    cfg = (20, 6, 3, 1, 1, 1, 1, True, (17, 19))
    unit, ref = make_pair(cfg, "cpu")
    with use_cpu_isa(isa):
        compare(unit, ref, cfg, "auto", "cpu", training=True, channels_last=channels_last)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_epilogue_statistics(isa, channels_last):
    cfg = (4, 20, 3, 1, 1, 1, True, True, (17, 19), 27, 5)
    x, mean, scale, shift, weight, bias, residual, (s, p, g), out, offset = _inputs(cfg, torch.float32, channels_last)
    with use_cpu_isa(isa):
        m, v = resfast.ops.norm_act_conv2d_into(x, mean, scale, shift, weight, out, offset, bias, residual, s, p,
                                                groups=g, compute_stats=True)
    written = out[:, offset:offset + weight.shape[0]]
    assert_close(written, _expected(x, mean, scale, shift, weight, bias, residual, (s, p, g)), torch.float32, "slice")
    var_ref, mean_ref = torch.var_mean(written.double(), dim=(0, 2, 3), unbiased=False)
    assert_close(m, mean_ref, torch.float32, "mean", tol=1e-6, floor=written.abs().max().item())
    assert_close(v, var_ref, torch.float32, "var", tol=1e-6)


def test_level_can_be_lowered_and_is_restored():
    before = cpu_isa()  # hardware_isa() unless RESFAST_CPU_ISA caps it
    assert before in available_cpu_isas()
    with use_cpu_isa("baseline"):
        assert cpu_isa() == "baseline"
    assert cpu_isa() == before
    with pytest.raises(ValueError, match="isa: expected one of"):
        with use_cpu_isa("avx9"):
            pass


def _run_with_env(value):
    env = dict(os.environ, RESFAST_CPU_ISA=value)
    code = "import resfast; print(resfast.ops.cpu_isa())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_environment_variable_caps_the_level():
    done = _run_with_env("baseline")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "baseline"
    bad = _run_with_env("avx9")
    assert bad.returncode != 0 and "RESFAST_CPU_ISA: expected one of" in bad.stderr, bad.stderr


@pytest.mark.parametrize("isa", ISAS)
def test_silu_across_the_exponent_range(isa):
    """SiLU's exp (norm_act_math.h: a polynomial, 2^n built in the exponent
    bits) against float64 for activations in [-80, 80], element by element."""
    z = torch.linspace(-80, 80, 4001, dtype=torch.float64)
    x = z.to(torch.float32).reshape(1, 1, 1, -1)
    ones, zeros = torch.ones(1), torch.zeros(1)
    with use_cpu_isa(isa):
        # identity normalisation: mean 0, scale 1, shift 0; a 1x1 identity convolution.
        y = resfast.ops.norm_act_conv2d(x, zeros, ones, zeros, torch.ones(1, 1, 1, 1), activation="silu")
    z32 = x.double().flatten()
    expected = z32 * torch.sigmoid(z32)
    rel = ((y.double().flatten() - expected).abs() / expected.abs()).max().item()
    assert rel < 2e-6, f"max relative error {rel:.3g}"
