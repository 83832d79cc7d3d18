"""A torch stand-in for nvidia-cudnn-frontend's graphs, so that the cudnn
engine (resfast/ops/conv_engines/cudnn_fused.py) runs end to end on the CPU:
the same graph builders (cudnn_graphs.py) against the subset of
`cudnn.pygraph`'s API they use, evaluated with torch ops as cuDNN defines
them (float32 compute, the activated input rounded to the I/O type before
the convolution reads it). Executing checks that every buffer has the shape,
strides and dtype its graph tensor was given, as cuDNN requires."""

import torch
import torch.nn.functional as F


class Tensor:
    def __init__(self, name, evaluate=None, dim=None, stride=None, data_type=None):
        self.name, self.evaluate = name, evaluate
        self.dim, self.stride, self.data_type, self.is_output = dim, stride, data_type, False

    def set_output(self, on):
        self.is_output = on
        return self

    def set_dim(self, dim):
        self.dim = list(dim)
        return self

    def set_stride(self, stride):
        self.stride = list(stride)
        return self

    def set_data_type(self, dtype):
        self.data_type = dtype
        return self


def _conv(t):
    return F.conv2d if t.dim() == 4 else F.conv3d


def _check_buffer(t, buffer):
    if t.dim is not None:
        assert list(buffer.shape) == t.dim, f"{t.name}: graph tensor of shape {t.dim}, buffer {tuple(buffer.shape)}"
    if t.stride is not None:  # the strides of size-1 dimensions are free
        pairs = [(a, b) for a, b, n in zip(buffer.stride(), t.stride, buffer.shape) if n > 1]
        assert all(a == b for a, b in pairs), f"{t.name}: graph strides {t.stride}, buffer {buffer.stride()}"
    if t.data_type is not None:
        assert buffer.dtype == t.data_type, f"{t.name}: graph dtype {t.data_type}, buffer {buffer.dtype}"
    if t.evaluate is not None:
        assert t.is_output, f"{t.name}: written but not marked as an output"


class Graph:
    def __init__(self, io_dtype):
        self.io_dtype = io_dtype
        self.compute = torch.promote_types(io_dtype, torch.float32)
        self.nodes = []  # the op names, in order

    def tensor(self, name, dim, stride, data_type):
        return Tensor(name, dim=list(dim), stride=list(stride), data_type=data_type)

    def _op(self, kind, name, evaluate):
        self.nodes.append(kind)
        return Tensor(name, evaluate)

    def scale(self, name, input, scale):
        return self._op("scale", name, lambda v: v(input) * v(scale))

    def bias(self, name, input, bias):
        return self._op("bias", name, lambda v: v(input) + v(bias))

    def add(self, name, a, b):
        return self._op("add", name, lambda v: v(a) + v(b))

    def relu(self, name, input, upper_clip=None):
        return self._op("relu", name, lambda v: v(input).clamp(0, upper_clip))

    def swish(self, name, input):
        return self._op("swish", name, lambda v: F.silu(v(input)))

    def conv_fprop(self, name, image, weight, padding, stride, dilation):
        def evaluate(v):
            a = v(image).to(self.io_dtype).to(self.compute)
            return _conv(a)(a, v(weight), None, stride, padding, dilation)

        return self._op("conv_fprop", name, evaluate)

    def conv_wgrad(self, name, image, loss, padding, stride, dilation):
        def evaluate(v):
            a = v(image).to(self.io_dtype).to(self.compute)
            grad = torch.nn.grad.conv2d_weight if a.dim() == 4 else torch.nn.grad.conv3d_weight
            return grad(a, out.dim, v(loss), stride, padding, dilation)

        out = self._op("conv_wgrad", name, evaluate)
        return out

    def genstats(self, name, input):
        self.nodes.append("genstats")

        def sums(power):
            def evaluate(v):
                y = v(input)
                return (y ** power).sum([d for d in range(y.dim()) if d != 1], keepdim=True)

            return Tensor(f"{name}_{power}", evaluate)

        return sums(1), sums(2)

    def run(self, pack):
        """Evaluates the graph's outputs into their buffers in `pack`."""
        memo = {}

        def value(t):
            if t not in memo:
                memo[t] = pack[t].to(self.compute) if t.evaluate is None else t.evaluate(value)
            return memo[t]

        for t, buffer in pack.items():
            _check_buffer(t, buffer)
        for t, buffer in pack.items():
            if t.evaluate is not None:
                buffer.copy_(value(t).reshape(buffer.shape))


class Backend:
    """cudnn_fused.graph_backend's argument: graphs from this module, every
    plan accepted unless `refuse` says why not."""

    def __init__(self, refuse=None):
        self.refuse, self.graphs, self.executed = refuse, [], 0

    def graph(self, device, io_dtype):
        self.graphs.append(Graph(io_dtype))
        return self.graphs[-1]

    def plan(self, graph, device, deterministic):
        return self.refuse

    def execute(self, graph, pack, device):
        graph.run(pack)
        self.executed += 1
