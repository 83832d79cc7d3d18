"""pytest-benchmark cases for the fused unit (`pytest benchmarks --benchmark-only`).

The same cases as `python -m resfast.bench --suite ops`; each case is timed for
eager PyTorch and resfast in training and inference. Ratios worth quoting come
from `python -m resfast.bench`, which interleaves the providers in one loop.
`test_fixed_cost` times a unit too small for its arithmetic to matter
(BN→ReLU→conv3x3 on 1x16x8x8): what resfast's unit costs above eager's there
is its fixed cost per call (goal: at most 10 us).
"""

import copy

import pytest
import torch
from torch import nn

import resfast

from resfast.bench.cases import QUICK_OPS
from resfast.bench.timing import keep_freed_memory, step_fn

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu":
    keep_freed_memory()  # as python -m resfast.bench does
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


def _time_steps(benchmark, module, x, mode, rounds=None):
    """benchmark() of one step of module on x, the GPU synchronised; with
    `rounds`, that many after as many warm-up rounds (pytest-benchmark's own
    calibration times the first, slow calls and can settle on 5 rounds)."""
    run = step_fn(module, x, mode == "training")

    def timed():
        run()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
    if rounds is None:
        benchmark(timed)
    else:
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=rounds)


@pytest.mark.parametrize("case", QUICK_OPS, ids=[c.name for c in QUICK_OPS])
@pytest.mark.parametrize("provider", ["eager", "resfast"])
@pytest.mark.parametrize("mode", ["training", "inference"])
def test_unit(benchmark, case, provider, mode):
    eager, ours, x = case.build(2, DEVICE, DTYPE, channels_last=DEVICE.type == "cuda")
    module = (eager if provider == "eager" else ours).train(mode == "training")
    if mode == "training":
        x = x.requires_grad_()
    _time_steps(benchmark, module, x, mode)


@pytest.mark.parametrize("provider", ["eager", "resfast"])
@pytest.mark.parametrize("mode", ["training", "inference"])
def test_fixed_cost(benchmark, provider, mode):
    unit = resfast.nn.BNReLUConv2d(16, 16, 3, padding=1)
    eager = nn.Sequential(copy.deepcopy(unit.bn), nn.ReLU(inplace=True), copy.deepcopy(unit.conv))
    module = (eager if provider == "eager" else unit).to(DEVICE).train(mode == "training")
    x = torch.randn(1, 16, 8, 8, device=DEVICE, requires_grad=mode == "training")
    _time_steps(benchmark, module, x, mode, rounds=2000)
