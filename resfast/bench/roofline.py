"""Device peaks measured on the spot, and the work a case needs, so a GPU
timing can be read as a fraction of what the device can do: FLOP rate
against a large matmul, bytes moved against a large copy."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from resfast.bench.timing import time_interleaved


def measure_peaks(device, dtype, copy_bytes=1 << 30, matmul_size=8192, repeats=10):
    """{"bytes_per_s": copy bandwidth (read + write), "flops_per_s": matmul
    rate in dtype}. The sizes must dwarf the caches (H100 L2: 50 MB)."""
    src = torch.empty(copy_bytes // 4, device=device, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    a = torch.randn(matmul_size, matmul_size, device=device, dtype=dtype)
    b = torch.randn(matmul_size, matmul_size, device=device, dtype=dtype)
    t = time_interleaved({"copy": lambda: dst.copy_(src), "matmul": lambda: a @ b}, device, repeats=repeats)
    return {"bytes_per_s": 2 * src.nbytes / t["copy"]["median"],
            "flops_per_s": 2 * matmul_size**3 / t["matmul"]["median"]}


def step_flops(module, x, training):
    """FLOPs of one step (forward, plus backward when training) as torch's
    flop counter sees them: convolutions and matmuls."""
    with FlopCounterMode(display=False) as counter:
        if training:
            module(x).sum().backward()
            for p in module.parameters():
                p.grad = None
        else:
            with torch.no_grad():
                module(x)
    return counter.get_total_flops()


def step_min_bytes(x, y, training):
    """The least memory traffic of a step: read x and write y; training also
    reads x and the output gradient again and writes x's gradient."""
    forward = x.nbytes + y.nbytes
    return forward + (2 * x.nbytes + y.nbytes if training else 0)
