import os

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors in the interpreter; the flag
# must be set before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import resfast  # noqa: E402


def triton_available():
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends():
    """(backend, device) pairs this machine can run: the registered kernels
    ("auto") per device, the reference, and the Triton implementations."""
    pairs = [("auto", "cpu"), ("reference", "cpu")]
    if triton_available():
        pairs.append(("triton", "cuda" if torch.cuda.is_available() else "cpu"))
    if torch.cuda.is_available():
        pairs.append(("auto", "cuda"))
    return pairs


@pytest.fixture
def poison_empty():
    """torch.empty (in Python and in C++ kernels) returns NaN-filled memory, so an
    element a kernel forgets to write shows up as NaN."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = prev_fill
    torch.use_deterministic_algorithms(prev_det)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def triton_device():
    """Where the triton backend runs: the GPU, else CPU tensors in the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _triton_tensors_on_the_gpu(request):
    """With a GPU, a test parametrized with the triton backend creates its
    tensors there (the backend needs the interpreter for CPU tensors)."""
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend", "") if callspec else ""
    if isinstance(backend, str) and backend.startswith("triton") and torch.cuda.is_available():
        with torch.device("cuda"):
            yield
    else:
        yield


@pytest.fixture(autouse=True)
def _exact_float32():
    """float32 on CUDA compared as float32: TF32 (cuDNN's default for
    convolutions, and the Triton dots that follow it) would need tolerances
    of its own."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def fresh_conv_choices(tmp_path, monkeypatch):
    """No convolution-engine decision carried in or out of the test: a cache
    directory of its own, no forced engine, the in-memory choices forgotten."""
    from resfast.ops.conv_engines import selection

    monkeypatch.setenv("RESFAST_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("RESFAST_CONV_IMPL", raising=False)
    selection.forget()
    yield
    selection.forget()
