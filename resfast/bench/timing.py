"""Side-by-side timing: providers run interleaved, warmed up, medians reported."""

import ctypes
import statistics
import time

import torch


def default_malloc():
    """glibc's malloc left as a user's process has it (see keep_freed_memory)."""
    return "glibc malloc defaults (large blocks mapped and unmapped per allocation)"


def keep_freed_memory():
    """Make glibc's malloc serve every allocation from its heap and keep what
    is freed, instead of mapping large blocks anew for each allocation and
    unmapping them on free. By default every step page-faults its
    activations afresh: on this benchmark's VM that cost more than the
    convolutions (one 1x1 unit's forward took 21 to 93 ms instead of 5) and
    swamped every ratio, eager's and resfast's alike. PyTorch's CPU tuning
    guide suggests a caching malloc (jemalloc, tcmalloc) for the same reason.
    Returns the setting, for the results, or None without glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    m_trim_threshold, m_mmap_max = -1, -4
    if not (mallopt(m_mmap_max, 0) and mallopt(m_trim_threshold, 2**31 - 1)):
        return None
    return "glibc malloc: no mmap, no trim (freed memory kept for reuse)"


def _timer(device):
    if device.type == "cuda":
        def measure(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def measure(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return measure


def time_interleaved(fns: dict, device, warmup=2, repeats=10, warmup_seconds=0.3, min_seconds=0.0,
                     max_repeats=1000):
    """Seconds per call of each fn: {name: {"median", "q25", "q75", "runs"}}.

    Each fn first runs `warmup` times and for at least `warmup_seconds`
    (first calls allocate, build oneDNN primitives and fault pages in: a
    first case measured its first calls otherwise). Then each repeat runs
    every fn once in turn, so drift in machine load hits all of them alike
    and their ratios stay meaningful: `repeats` rounds, and more (up to
    `max_repeats`) until the rounds took `min_seconds`. On a shared 2-core
    VM five rounds of a 20 ms model put its median 10% off the median of a
    second's worth of rounds."""
    measure = _timer(device)
    for name, fn in fns.items():
        start, runs = time.perf_counter(), 0
        while runs < warmup or time.perf_counter() - start < warmup_seconds:
            fn()
            runs += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    samples = {name: [] for name in fns}
    start, rounds = time.perf_counter(), 0
    while rounds < repeats or (time.perf_counter() - start < min_seconds and rounds < max_repeats):
        for name, fn in fns.items():
            samples[name].append(measure(fn))
        rounds += 1
    out = {}
    for name, s in samples.items():
        q = statistics.quantiles(s, n=4) if len(s) > 1 else [s[0]] * 3
        out[name] = {"median": statistics.median(s), "q25": q[0], "q75": q[2], "runs": len(s)}
    return out


# What a training step back-propagates, recorded with every result.
TRAINING_STEP = "forward, then backward of a fixed random gradient of the output"


def step_fn(module, x, training):
    """One inference forward (no_grad) or one training step (TRAINING_STEP,
    gradients cleared first), as a no-argument callable. The output gradient
    is dense, as a layer inside a network receives; the broadcast gradient
    of `output.sum()` would time a case no real network has."""
    if training:
        grad = None

        def run():
            nonlocal grad
            for p in module.parameters():
                p.grad = None
            y = module(x)
            if grad is None:
                # Seeded, so every provider of a case back-propagates the same values.
                grad = torch.empty_like(y).normal_(generator=torch.Generator(y.device).manual_seed(0))
            y.backward(grad)
    else:
        def run():
            with torch.no_grad():
                module(x)
    return run


def saved_activation_bytes(model, *inputs):
    """Bytes of the unique storages saved for backward by one training forward,
    parameters excluded (docs/DESIGN.md §5)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*inputs)
    return sum(seen.values())
