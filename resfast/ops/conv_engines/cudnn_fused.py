"""The `cudnn` engine: cuDNN's runtime-fused graphs (cudnn_graphs.py) through
the optional nvidia-cudnn-frontend package, imported on first use. The
forward is one graph: the normalisation and activation applied as the
convolution reads x, the bias and residual adds and the output statistics
(genstats) in its epilogue, nothing written but the output. The backward's
weight gradient is one graph too (act(z) recomputed as wgrad reads it); the
input gradient is the split engine's (cuDNN's data gradient, then one pass
for act' and the sums, one for grad_x).

A call is a candidate only if cuDNN builds an execution plan for its exact
geometry (shapes, strides, dtypes, 16-byte alignment, GPU): plans, and the
reasons for graphs cuDNN refuses, are kept per geometry. NVIDIA documents
these fusions for fp16 and bf16 channels_last on Ampere and Hopper; cuDNN's
check_support decides the rest. Under torch.use_deterministic_algorithms(True)
plans with nondeterministic reductions are deselected.

Two numerical differences from the other engines, both within the
selection's check against the split engine: the mean is folded into the
bias (x * scale + (shift - mean * scale), in float32), and the variance of
the statistics is E[y^2] - E[y]^2 from genstats' float32 sums."""

import contextlib

import torch

from resfast.ops.conv_engines import calls, cudnn_graphs, split
from resfast.ops.layout import accumulation_dtype, kernel_format, spatial_numel

NAME = "cudnn"
DETERMINISTIC = True  # plans with nondeterministic reductions are deselected in deterministic mode
ALIGNMENT = 16  # bytes: what cuDNN's vectorised kernels assume of every pointer


class CudnnFrontend:
    """Graphs built, planned and run by nvidia-cudnn-frontend on the GPU."""

    def __init__(self, cudnn):
        self.cudnn = cudnn
        self._handles = {}
        self._types = {torch.float16: cudnn.data_type.HALF, torch.bfloat16: cudnn.data_type.BFLOAT16,
                       torch.float32: cudnn.data_type.FLOAT, torch.float64: cudnn.data_type.DOUBLE}

    def _handle(self, device):
        if device not in self._handles:
            with torch.cuda.device(device):
                self._handles[device] = self.cudnn.create_handle()
        return self._handles[device]

    def graph(self, device, io_dtype):
        with torch.cuda.device(device):
            return self.cudnn.pygraph(io_data_type=self._types[io_dtype], intermediate_data_type=self._types[
                torch.float32], compute_data_type=self._types[torch.float32], handle=self._handle(device))

    def plan(self, graph, device, deterministic):
        """Plans the graph; why cuDNN cannot run it, or None."""
        cudnn = self.cudnn
        try:
            with torch.cuda.device(device):
                graph.validate()
                graph.build_operation_graph()
                graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
                if deterministic:
                    graph.deselect_numeric_notes([cudnn.numerical_note.NONDETERMINISTIC])
                graph.check_support()
                graph.build_plans()
        except (cudnn.cudnnGraphNotSupportedError, RuntimeError, ValueError) as e:
            return f"cuDNN has no plan for this graph ({type(e).__name__}: {str(e).strip().splitlines()[0]})"
        return None

    def execute(self, graph, pack, device):
        handle = self._handle(device)
        with torch.cuda.device(device):
            self.cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(device).cuda_stream)
            workspace = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device=device)
            graph.execute(pack, workspace, handle=handle)


_backend = None  # a graph backend given by graph_backend(); else the frontend, on CUDA tensors
_frontend = None
_plans: dict = {}


@contextlib.contextmanager
def graph_backend(backend):
    """Build and run the engine's graphs with `backend` inside the block, on
    any device (for tests: an object with CudnnFrontend's methods)."""
    global _backend
    saved, _backend = _backend, backend
    _plans.clear()
    try:
        yield
    finally:
        _backend = saved
        _plans.clear()


def _graphs_for(x):
    """The backend that runs x's graphs, or why there is none."""
    global _frontend
    if _backend is not None:
        return _backend
    if x.device.type != "cuda":
        return "CUDA tensors only"
    if _frontend is None:
        try:
            import cudnn
        except Exception as e:  # noqa: BLE001  (an optional package that fails to load in any way is absent)
            _frontend = f"nvidia-cudnn-frontend cannot be imported ({type(e).__name__}: {e})"
        else:
            _frontend = CudnnFrontend(cudnn)
    return _frontend


def _static_problem(call):
    """What the graphs cannot express, or None."""
    if call.mean.dim() != 1:
        return "per-sample (GroupNorm) parameters: the graphs take one scale and bias per channel"
    if call.groups != 1:
        return "grouped convolution"
    if isinstance(call, calls.Backward) and not call.output_mask[1]:
        return "no weight gradient asked: the input gradient alone is the split engine's"
    return None


def _geometry(t):
    if t is None:
        return None
    return tuple(t.shape), t.stride(), t.dtype, t.data_ptr() % ALIGNMENT == 0


def _plan(kind, call, written, build):
    """(graph, tensors) for the call's exact geometry, or why there is none."""
    backend = _graphs_for(call.x)
    if isinstance(backend, str):
        return backend
    reads = [getattr(call, name) for name in ("x", "weight", "bias", "residual", "grad_out") if hasattr(call, name)]
    misaligned = [t for t in reads + [written] if t is not None and t.data_ptr() % ALIGNMENT]
    if misaligned:
        return f"a tensor not {ALIGNMENT}-byte aligned (strides {misaligned[0].stride()})"
    deterministic = torch.are_deterministic_algorithms_enabled()
    key = (kind, call.x.device, deterministic, *map(tuple, (call.stride, call.padding, call.dilation)), call.activation,
           call.compute_stats if kind == "forward" else None, *map(_geometry, reads + [written]))
    if key not in _plans:
        graph = backend.graph(call.x.device, call.x.dtype)
        tensors = build(graph)
        problem = backend.plan(graph, call.x.device, deterministic)
        _plans[key] = problem or (graph, tensors)
    return _plans[key]


def _output(call, device=None):
    """Where the forward writes: the slice of call.out, else a fresh output
    (on `device`: "meta" for its geometry alone)."""
    if call.out is not None:
        return call.destination()
    return torch.empty(call.output_shape(), dtype=call.weight.dtype, device=device or call.x.device,
                       memory_format=kernel_format(call.x))


def _weight_grad_buffer(call, device=None):
    return torch.empty(call.weight.shape, dtype=call.weight.dtype, device=device or call.weight.device,
                       memory_format=kernel_format(call.weight))


def unsupported(call):
    """Why the engine cannot run a call, or None (planning its graph if need be)."""
    problem = _static_problem(call)
    if problem is None:
        if isinstance(call, calls.Forward):
            problem = _forward_plan(call, _output(call, "meta"))
        else:
            grad_out = call.grad_out
            if not grad_out.is_contiguous(memory_format=kernel_format(call.x)):  # backward() reads a fresh copy
                grad_out = torch.empty_like(grad_out, device="meta", memory_format=kernel_format(call.x))
            problem = _weight_grad_plan(call._replace(grad_out=grad_out), _weight_grad_buffer(call, "meta"))
    return problem if isinstance(problem, str) else None


def _forward_plan(call, y):
    return _plan("forward", call, y, lambda g: cudnn_graphs.forward(g, call, y))


def _weight_grad_plan(call, grad_weight):
    return _plan("weight_grad", call, grad_weight, lambda g: cudnn_graphs.weight_grad(g, call, grad_weight))


def _vector(t, rank):
    return t.float().reshape([1, -1] + [1] * (rank - 2)).contiguous()


def _normalisation(call):
    """The per-channel scale and bias the graphs apply: (x - mean) * scale +
    shift = x * scale + (shift - mean * scale)."""
    scale, mean, shift = (t.float() for t in (call.scale, call.mean, call.shift))
    rank = call.x.dim()
    return {"x": call.x, "scale": _vector(scale, rank), "bias": _vector(torch.addcmul(shift, mean, scale, value=-1),
                                                                        rank)}


def _run(call, plan, values):
    if isinstance(plan, str):
        raise RuntimeError(f"the cudnn engine cannot run this call: {plan}")
    graph, tensors = plan
    _graphs_for(call.x).execute(graph, {tensors[name]: v for name, v in values.items()}, call.x.device)


def forward(call):
    """(y, stats): y the output (or the written slice of call.out), stats its
    per-channel (mean, var) when call.compute_stats."""
    y = _output(call)
    values = {**_normalisation(call), "weight": call.weight, "y": y}
    if call.bias is not None:
        values["conv_bias"] = _vector(call.bias, y.dim()).to(call.bias.dtype)
    if call.residual is not None:
        values["residual"] = call.residual
    sums = None
    if call.compute_stats:
        sums = torch.empty((2, y.shape[1]), dtype=torch.float32, device=y.device)
        values["sum"], values["sum_sq"] = (_vector(s, y.dim()) for s in sums)
    _run(call, _forward_plan(call, y), values)
    if sums is None:
        return y, None
    count = y.shape[0] * spatial_numel(y)
    mean, mean_sq = (s.reshape(-1) / count for s in (values["sum"], values["sum_sq"]))
    acc = accumulation_dtype(y.dtype)
    return y, (mean.to(acc), (mean_sq - mean * mean).clamp_min_(0).to(acc))


def backward(call):
    grad_weight = _weight_grad_buffer(call)
    grad_out = call.grad_out.contiguous(memory_format=kernel_format(call.x))
    call = call._replace(grad_out=grad_out)
    _run(call, _weight_grad_plan(call, grad_weight),
         {**_normalisation(call), "grad_out": grad_out, "grad_weight": grad_weight})
    if not call.output_mask[0]:
        return None, None, None, grad_weight
    return *split.input_grad(call, split.conv_input_grad(call)), grad_weight
