"""Which engine runs a fused-convolution call, decided per shape.

Every engine computes the same thing with the same memory contract (only x
and the per-channel vectors kept for backward). The choice is keyed by the
call (calls.key: op, shapes, dtypes, layout, parameter kind, convolution
arguments, optional parts, GPU architecture) and made once, on the first
call, by measurement (as torch.backends.cudnn.benchmark does): every engine
that can run the call runs it; one whose result disagrees with the split
engine's beyond its dtype's tolerance is dropped with a warning naming it;
the fastest of the rest is kept, in memory and in a JSON file
(RESFAST_CACHE_DIR, default ~/.cache/resfast) stamped with the resfast,
torch, Triton, cuDNN and cuDNN frontend versions and the device, so a file
from another setup is ignored (with a warning) and rewritten.

Only CUDA calls outside graph capture and tracing are measured; others take
a decision already made, else the split engine. RESFAST_CONV_IMPL
(split|triton|cudnn|auto) or `conv_impl(name)` force one engine; under
torch.use_deterministic_algorithms(True) only deterministic engines are
considered. `conv_choices()` shows every decision with its timings.
"""

import contextlib
import importlib.metadata
import json
import os
import tempfile
import warnings
from typing import NamedTuple

import torch

from resfast.ops.conv_engines import calls, cudnn_fused, fused, split

ENGINES = {engine.NAME: engine for engine in (split, fused, cudnn_fused)}
DEFAULT = split.NAME
NAMES = ("auto", *ENGINES)
# Timed runs per engine in a measurement, after one untimed run.
REPEATS = 5
# Largest error tolerated against the split engine, relative to its result's
# largest magnitude, by dtype (TF32 and reduced-precision dots round).
TOLERANCE = {torch.float32: 5e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2, torch.float64: 1e-9}


class Decision(NamedTuple):
    choice: str
    # engine -> seconds per call, or why it was not used
    candidates: dict


_decisions: dict = {}
_forced = None
_timer = None
_loaded = False


@contextlib.contextmanager
def conv_impl(name: str):
    """Run the fused convolutions inside the block with the named engine
    ("split", "triton", "cudnn"), or let the measurement choose ("auto")."""
    global _forced
    if name not in NAMES:
        raise ValueError(f"conv_impl: expected one of {', '.join(map(repr, NAMES))}, got {name!r}")
    saved, _forced = _forced, name
    try:
        yield
    finally:
        _forced = saved


@contextlib.contextmanager
def timer(measure):
    """Measure with `measure(fn) -> seconds per call` inside the block, on
    any device (for tests: the default times CUDA calls only)."""
    global _timer
    saved, _timer = _timer, measure
    try:
        yield
    finally:
        _timer = saved


def conv_choices() -> dict:
    """{call key: {"choice": engine, "candidates": {engine: seconds or reason}}}
    for every decision made or loaded in this process."""
    return {k: {"choice": d.choice, "candidates": dict(d.candidates)} for k, d in _decisions.items()}


def _requested():
    name = _forced or os.environ.get("RESFAST_CONV_IMPL", "auto")
    if name not in NAMES:
        raise ValueError(f"RESFAST_CONV_IMPL: expected one of {', '.join(NAMES)}, got {name!r}")
    return name


def cuda_seconds(fn, repeats=REPEATS, warmup=1):
    """Mean seconds per call of fn on the current CUDA stream, after `warmup`
    calls (CUDA events around `repeats` calls, one synchronisation)."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats / 1e3


def _measurable_timer(call):
    """How to time this call's engines now, or None: not while tracing or
    capturing a CUDA graph, and on CUDA only unless a timer was given."""
    x = call.x
    if type(x) is not torch.Tensor or torch.compiler.is_compiling():
        return None
    if _timer is not None:
        return _timer
    if x.device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        return cuda_seconds
    return None


def _tensors(result):
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for r in result for t in _tensors(r)]
    return []


def _disagreement(result, reference, dtype):
    """The worst relative error of result against reference beyond the
    tolerance of the call's dtype, as a message; None when they agree."""
    for i, (a, b) in enumerate(zip(_tensors(result), _tensors(reference))):
        if not b.numel():
            continue
        a, b = a.double(), b.double()
        scale, err = b.abs().max().item(), (a - b).abs().max().item()
        if not err <= TOLERANCE[dtype] * max(scale, 1e-30):
            return f"output {i}: max error {err:.3g} against {scale:.3g}"
    return None


def _scratch(call):
    """The call with a copy of the buffer it writes into (measurements must
    not write the caller's)."""
    if isinstance(call, calls.Forward) and call.out is not None:
        return call._replace(out=call.out.clone(memory_format=torch.preserve_format))
    return call


def _measure(call, candidates, run, measure):
    scratch = _scratch(call)
    outcome = {}
    reference = run(ENGINES[DEFAULT], scratch) if DEFAULT in candidates else None
    for name in candidates:
        engine = ENGINES[name]
        result = reference if name == DEFAULT else run(engine, _scratch(call))
        problem = None if reference is None or name == DEFAULT else _disagreement(result, reference,
                                                                                  call.weight.dtype)
        if problem is not None:
            warnings.warn(f"resfast: the {name} convolution engine disagrees with the split engine for "
                          f"{calls.key(call)} ({problem}); it is not used for this shape", stacklevel=4)
            outcome[name] = f"disagrees with split: {problem}"
            continue
        outcome[name] = measure(lambda engine=engine: run(engine, scratch))
    timed = {n: s for n, s in outcome.items() if isinstance(s, float)}
    return Decision(min(timed, key=timed.get), outcome)


def choose(call, run):
    """The engine that runs `call` (run(engine, call) runs it)."""
    requested = _requested()
    deterministic = torch.are_deterministic_algorithms_enabled()
    if requested != "auto":
        engine = ENGINES[requested]
        reason = engine.unsupported(call)
        if reason is None and deterministic and not engine.DETERMINISTIC:
            reason = "it is not deterministic and torch.use_deterministic_algorithms(True) is set"
        if reason is not None:
            raise ValueError(f"conv_impl / RESFAST_CONV_IMPL={requested}: the {requested} engine cannot run "
                             f"{calls.key(call)}: {reason}")
        return engine
    key = calls.key(call)
    _load_once()
    decision = _decisions.get(key)
    if decision is not None and decision.choice in ENGINES:
        chosen = ENGINES[decision.choice]
        if chosen.unsupported(call) is None and (chosen.DETERMINISTIC or not deterministic):
            return chosen
    candidates = {name: e.unsupported(call) for name, e in ENGINES.items()}
    if deterministic:
        candidates.update({name: "not deterministic" for name, e in ENGINES.items()
                           if candidates[name] is None and not e.DETERMINISTIC})
    usable = [name for name, reason in candidates.items() if reason is None]
    if not usable:
        raise ValueError(f"no convolution engine can run {key}: " +
                         "; ".join(f"{name}: {reason}" for name, reason in candidates.items()))
    measure = _measurable_timer(call)
    if measure is None or len(usable) == 1:
        return ENGINES[DEFAULT] if DEFAULT in usable else ENGINES[usable[0]]
    decision = _measure(call, usable, run, measure)
    decision.candidates.update({n: r for n, r in candidates.items() if r is not None})
    _decisions[key] = decision
    _save()
    return ENGINES[decision.choice]


def forward(call: calls.Forward):
    return choose(call, lambda engine, c: engine.forward(c)).forward(call)


def backward(call: calls.Backward):
    return choose(call, lambda engine, c: engine.backward(c)).backward(call)


# ---------------------------------------------------------------- the file
def cache_path() -> str:
    folder = os.environ.get("RESFAST_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "resfast")
    return os.path.join(folder, "conv-choices.json")


def environment() -> dict:
    """What the decisions depend on beyond the call: the versions and the device."""
    import triton

    import resfast

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    try:  # whether the cudnn engine is a candidate at all
        frontend = importlib.metadata.version("nvidia-cudnn-frontend")
    except importlib.metadata.PackageNotFoundError:
        frontend = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"resfast": resfast.__version__, "torch": torch.__version__, "triton": triton.__version__,
            "cudnn": cudnn, "cudnn_frontend": frontend, "device": device}


def _load_once():
    global _loaded
    if _loaded:
        return
    _loaded = True
    path = cache_path()
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            data = json.load(f)
        stamp, choices = data["environment"], data["choices"]
        loaded = {k: Decision(str(v["choice"]), dict(v["candidates"])) for k, v in choices.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        warnings.warn(f"resfast: ignoring the unreadable convolution choices in {path} ({type(e).__name__}: {e}); "
                      "it is rewritten with new measurements", stacklevel=4)
        return
    if stamp != environment():
        warnings.warn(f"resfast: ignoring the convolution choices in {path}, measured with {stamp} (now "
                      f"{environment()}); it is rewritten with new measurements", stacklevel=4)
        return
    for k, d in loaded.items():
        _decisions.setdefault(k, d)


def _save():
    path = cache_path()
    data = {"environment": environment(), "choices": conv_choices()}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), delete=False, suffix=".tmp") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(f.name, path)
    except OSError as e:
        warnings.warn(f"resfast: could not save the convolution choices to {path}: {e}", stacklevel=4)


def forget():
    """Drop the decisions held in memory (the file is read again on the next call)."""
    global _loaded
    _decisions.clear()
    _loaded = False
