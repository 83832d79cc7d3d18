"""pytest-benchmark cases for the fused unit (`pytest benchmarks --benchmark-only`).

The same cases as `python -m resfast.bench --suite ops`; each case is timed for
eager PyTorch and resfast in training and inference. Ratios worth quoting come
from `python -m resfast.bench`, which interleaves the providers in one loop.
"""

import pytest
import torch

from resfast.bench.cases import QUICK_OPS
from resfast.bench.timing import keep_freed_memory, step_fn

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu":
    keep_freed_memory()  # as python -m resfast.bench does
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


@pytest.mark.parametrize("case", QUICK_OPS, ids=[c.name for c in QUICK_OPS])
@pytest.mark.parametrize("provider", ["eager", "resfast"])
@pytest.mark.parametrize("mode", ["training", "inference"])
def test_unit(benchmark, case, provider, mode):
    eager, ours, x = case.build(2, DEVICE, DTYPE, channels_last=DEVICE.type == "cuda")
    module = (eager if provider == "eager" else ours).train(mode == "training")
    if mode == "training":
        x = x.requires_grad_()
    run = step_fn(module, x, mode == "training")
    if DEVICE.type == "cuda":
        def timed():
            run()
            torch.cuda.synchronize()
        benchmark(timed)
    else:
        benchmark(run)
