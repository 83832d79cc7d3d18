"""Ahead-of-time compilation of every shipped Triton kernel config for sm_80 and sm_90, no GPU needed.

Every op of the registry with a Triton implementation is called on meta
tensors at representative shapes (AOT_SAMPLES: a channels_last ResNet layer,
a U-Net GroupNorm) with Triton's launch intercepted, once per config of each
kernel it launches (resfast.kernels.forced_configs), so the exact argument
list its launchers pass is recorded. The arguments are then specialised the
way Triton's JIT does (ints equal to 1 become constexprs, 16-divisible ints
and pointers get divisibility hints) and compiled with triton.compile for
each target. The compilation runs in a subprocess without TRITON_INTERPRET
because under the interpreter @triton.jit yields objects that cannot be
compiled.

A second subprocess traces each of those ops as torch.compile's AOT dispatch
does, on fake CUDA tensors (no GPU needed), and checks that the graph holds
their Triton launches (wrap_triton) rather than an opaque call of the op.

Run directly to print results as JSON lines:  python tests/test_triton_aot.py 90 (or: trace)
"""
import json
import os
import subprocess
import sys
import time
import traceback

import pytest
import torch
import triton

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Per-block shared memory opt-in limits: A100 (sm_80) 163 KB, H100 (sm_90) 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                torch.int32: "i32", torch.int64: "i64"}
bf16, fp32, CL = torch.bfloat16, torch.float32, torch.channels_last


def _meta(shape, dtype=fp32, layout=CL):
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=layout)


def _unit(x_dtype=bf16, w_dtype=bf16, n=32, c=64, hw=56, oc=64, groups=1, kernel=3, stride=1):
    """A fused unit's inputs: the representative fast-path layer is a ResNet
    3x3, 64 channels, 56x56, batch 32, channels_last."""
    x = _meta((n, c, hw, hw), x_dtype)
    vec = _meta((c,), layout=torch.contiguous_format)
    w = _meta((oc, c // groups, kernel, kernel), w_dtype)
    pad = kernel // 2
    out_hw = (hw + 2 * pad - kernel) // stride + 1
    conv = ([stride, stride], [pad, pad], [1, 1], groups)
    return x, vec, w, _meta((n, oc, out_hw, out_hw), w_dtype), conv


def _forward(x_dtype, w_dtype, **shape):
    x, vec, w, _, conv = _unit(x_dtype, w_dtype, **shape)
    return (x, vec, vec, vec, w, _meta((w.shape[0],), w_dtype, torch.contiguous_format), None, *conv, "silu")


def _forward_into_slice():
    """The dense-block store: into a channel slice of a wider buffer, with statistics."""
    x, vec, w, y, conv = _unit()
    out = _meta((y.shape[0], y.shape[1] + 48, *y.shape[2:]), bf16)
    return (x, vec, vec, vec, w, None, None, *conv, "relu", out, 16, True)


def _backward(mask, **shape):
    x, vec, w, grad_out, conv = _unit(**shape)
    return (grad_out, x, vec, vec, vec, w, *conv, "silu", None, mask)


def _stats_x():
    return _unit()[0]


# GroupNorm at a U-Net / diffusion shape: 256 channels, 32 groups, 32x32, batch 16.
def _gn_x(dtype=bf16):
    return _meta((16, 256, 32, 32), dtype)


def _gn_nc(groups=32):
    return _meta((16, groups), layout=torch.contiguous_format)


_GN_AFFINE = (_meta((256,), bf16, torch.contiguous_format), _meta((256,), bf16, torch.contiguous_format))

# Depthwise at batch 1: C_G = OC_G = N = 1 become constexprs under JIT
# specialisation; only the config the heuristic picks for such layers (the
# smallest) is compiled.
DEPTHWISE = dict(n=1, c=32, hw=7, oc=32, groups=32)

# op -> [(sample name, arguments, compile every config of every kernel it launches)]
AOT_SAMPLES = {
    "norm_act_conv2d": [
        ("bf16", lambda: _forward(bf16, bf16), True),
        ("fp32", lambda: _forward(fp32, fp32), True),
        ("fp32x-bf16w", lambda: _forward(fp32, bf16), True),
        ("depthwise", lambda: _forward(bf16, bf16, **DEPTHWISE), False),
    ],
    "norm_act_conv2d_into": [("slice-stats-bf16", _forward_into_slice, True)],
    "norm_act_conv2d_stats": [("bf16", lambda: _forward(bf16, bf16), True)],
    "norm_act_conv2d_backward": [
        ("input-bf16-s2", lambda: _backward([True, False], stride=2), True),
        ("weight-bf16", lambda: _backward([False, True]), True),
        ("depthwise", lambda: _backward([True, True], **DEPTHWISE), False),
    ],
    "channel_stats": [("bf16", lambda: (_stats_x(),), True)],
    "channel_stats_backward": [("bf16", lambda: (_stats_x(), *[_meta((64,), layout=torch.contiguous_format)] * 3),
                                True)],
    "group_stats": [("bf16", lambda: (_gn_x(), 32), True)],
    "group_stats_backward": [("bf16", lambda: (_gn_x(), _gn_nc(), _gn_nc(), _gn_nc()), True)],
    "group_norm": [("bf16", lambda: (_gn_x(), 32, *_GN_AFFINE, 1e-5, "silu"), True),
                   ("fp32", lambda: (_gn_x(fp32), 32, None, None, 1e-5, "silu"), True)],
    "group_norm_backward": [("bf16", lambda: (_gn_x(), _gn_x(), _gn_nc(), _gn_nc(), *_GN_AFFINE, "silu",
                                              [True, True, True]), True)],
}


def aot_cases():
    """(op name, sample label, make_args, every config?, engine) for every AOT
    sample, once per engine with Triton kernels of its own for the
    convolution ops (the cudnn engine's are the split engine's)."""
    from resfast.ops.registry import OPS

    for name, samples in AOT_SAMPLES.items():
        for sample, make_args, every_config in samples:
            for engine in [e for e in OPS[name].engines if e != "cudnn"] or (None,):
                yield name, f"{name}-{sample}" + (f"-{engine}" if engine else ""), make_args, every_config, engine


def _engine(engine):
    import resfast

    return resfast.ops.conv_impl(engine or "auto")


def _record_launches(op, args, engine):
    """Call the op's Triton implementation (with the given convolution
    engine) with kernel launches intercepted; returns [(kernel, args, kwargs)]."""
    from triton.runtime.jit import JITFunction

    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    saved = JITFunction.run
    JITFunction.run = record
    try:
        with _engine(engine):
            op.triton(*args)
    finally:
        JITFunction.run = saved
    return launches


def launches_to_compile():
    """Yield (sample label, kernel, config index, args, kwargs) for every
    kernel launch of every AOT sample: under every config of the kernel, or the
    heuristic's only."""
    import resfast  # noqa: F401  (loads the registry)
    from resfast.kernels import SHIPPED, forced_configs
    from resfast.ops.registry import OPS

    for name, label, make_args, every_config, engine in aot_cases():
        launched = _record_launches(OPS[name], make_args(), engine)
        for kernel_name in dict.fromkeys(k.__name__ for k, _, _ in launched):
            shipped = SHIPPED[kernel_name]
            configs = list(enumerate(shipped.configs)) if every_config else [(None, None)]
            for idx, config in configs:
                with forced_configs({kernel_name: config} if config else {}):
                    runs = [r for r in _record_launches(OPS[name], make_args(), engine)
                            if r[0].__name__ == kernel_name]
                for kernel, args, kwargs in runs[:1]:
                    if idx is None:
                        idx = next(i for i, c in enumerate(shipped.configs)
                                   if all(kwargs.get(k) == v for k, v in c.items()))
                    yield label, kernel, idx, args, kwargs


def _specialise(kernel, args, kwargs):
    """(signature, constexprs, attrs, options) as Triton's JIT would build for these arguments."""
    values = dict(zip(kernel.arg_names, args), **kwargs)
    options = {k: values.pop(k) for k in ("num_warps", "num_stages")}
    signature, constexprs, attrs = {}, {}, {}
    divisible = [["tt.divisibility", 16]]
    for i, param in enumerate(kernel.params):
        name = kernel.arg_names[i]
        v = values[name]
        if param.is_constexpr or (type(v) is int and v == 1):
            signature[name] = "constexpr"
            constexprs[name] = v
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + TRITON_DTYPE[v.dtype]
            attrs[(i,)] = divisible  # allocator pointers are 16-byte aligned
        elif type(v) is int:
            signature[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = divisible
        elif type(v) is float:
            signature[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: unexpected argument {name}={v!r}")
    return signature, constexprs, attrs, options


def compile_all(arch):
    """Yield one result dict per (op sample, kernel, config) for compute capability `arch`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    done = {}  # one compile per distinct specialisation, whichever samples launch it
    for sample, kernel, idx, args, kwargs in launches_to_compile():
        result = dict(arch=arch, sample=sample, kernel=kernel.__name__, config=idx)
        start = time.time()
        try:
            signature, constexprs, attrs, options = _specialise(kernel, args, kwargs)
            spec = json.dumps([kernel.__name__, signature, constexprs, options, sorted(map(str, attrs))], default=str)
            if spec not in done:
                src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
                compiled = triton.compile(src, target=target, options=options)
                ptx = compiled.asm["ptx"]
                done[spec] = dict(shared=compiled.metadata.shared, wgmma="wgmma" in ptx, mma_sync="mma.sync" in ptx)
            result.update(done[spec])
        except Exception:
            result["error"] = traceback.format_exc()
        result["seconds"] = round(time.time() - start, 2)
        yield result


@pytest.fixture(scope="module")
def compiled():
    """Compile for both targets in parallel subprocesses; {(arch, variant, config): result}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    procs = {arch: subprocess.Popen([sys.executable, os.path.abspath(__file__), str(arch)],
                                    cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for arch in SHARED_LIMIT}
    results = {}
    for arch, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"sm_{arch} compile subprocess failed:\n{err[-4000:]}"
        for line in out.splitlines():
            r = json.loads(line)
            results.setdefault((r["arch"], r["sample"]), []).append(r)
    return results


CASES = [(arch, label) for arch in SHARED_LIMIT for _, label, _, _, _ in aot_cases()]


@pytest.mark.parametrize("arch,sample", CASES, ids=[f"sm{a}-{s}" for a, s in CASES])
def test_aot_compile(compiled, arch, sample):
    from resfast.kernels import SHIPPED

    results = compiled.get((arch, sample), [])
    assert results, f"{sample} launched no Triton kernel"
    for r in results:
        what = f"{r['kernel']} config {r['config']} ({sample}, sm_{arch})"
        assert "error" not in r, f"{what}:\n{r['error']}"
        assert r["shared"] <= SHARED_LIMIT[arch], f"{what} needs {r['shared']} B shared memory > {SHARED_LIMIT[arch]} B"
        if SHIPPED[r["kernel"]].tensor_cores:
            # wgmma needs >= 64-row tiles per warpgroup; smaller tiles fall back to mma.sync.
            assert r["mma_sync"] or (arch >= 90 and r["wgmma"]), f"{what} emitted no tensor-core MMA"


def test_every_triton_op_and_shipped_config_is_compiled(compiled):
    """The registry's Triton implementations all have AOT samples, and every
    config of every shipped kernel was compiled for both targets."""
    from resfast.kernels import SHIPPED
    from resfast.ops.registry import OPS

    assert set(AOT_SAMPLES) == {name for name, op in OPS.items() if op.triton is not None}
    for arch in SHARED_LIMIT:
        done = {(r["kernel"], r["config"]) for (a, _), rs in compiled.items() if a == arch for r in rs}
        wanted = {(name, i) for name, shipped in SHIPPED.items() for i in range(len(shipped.configs))}
        assert wanted <= done, f"sm_{arch}: never compiled {sorted(wanted - done)}"


def traced_launches():
    """Yield {"sample", "launches", "opaque"} for every AOT sample of an op whose
    CUDA tensors the Python implementation serves: the number of Triton
    launches in its AOT forward graph, and whether the op itself is still a node."""
    from torch._functorch.aot_autograd import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode

    from resfast.ops.registry import OPS

    def on_fake_cuda(a):
        if not isinstance(a, torch.Tensor):
            return a
        return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="cuda")

    for name, label, make_args, _, engine in aot_cases():
        op = OPS[name]
        if op.cuda != "triton":
            continue
        graphs = []

        def keep(gm, inputs):
            graphs.append(gm)
            return gm

        with FakeTensorMode(), _engine(engine):
            args = [on_fake_cuda(a) for a in make_args()]
            aot_function(lambda *a: op.overload(*a), fw_compiler=keep)(*args)
        targets = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
        yield dict(sample=label, launches=sum("triton_kernel_wrapper" in t for t in targets),
                   opaque=any(f"resfast.{name}" in t for t in targets))


@pytest.fixture(scope="module")
def traced():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "trace"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"tracing subprocess failed:\n{done.stderr[-4000:]}"
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.skipif(not torch.cuda.is_available() and tuple(map(int, triton.__version__.split(".")[:2])) < (3, 8),
                    reason="tracing Triton launches without a GPU needs triton >= 3.8 (3.6 asks for the driver)")
def test_aot_dispatch_sees_the_triton_launches(traced):
    """What torch.library.triton_op gives: under torch.compile Inductor sees
    the Triton kernels of every op the Python implementation serves on CUDA."""
    assert traced, "no op traced"
    for r in traced:
        assert r["launches"] > 0 and not r["opaque"], r


if __name__ == "__main__":
    results = traced_launches() if sys.argv[1] == "trace" else compile_all(int(sys.argv[1]))
    for res in results:
        print(json.dumps(res), flush=True)
