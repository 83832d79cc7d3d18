"""Ahead-of-time compilation of every shipped kernel config for sm_80 and sm_90, no GPU needed.

Each launcher is called on meta tensors (a representative channels_last
ResNet layer) with Triton's launch intercepted, so the exact argument list the
launcher would pass is recorded. The arguments are then specialised the way
Triton's JIT does (ints equal to 1 become constexprs, 16-divisible ints and
pointers get divisibility hints) and compiled with triton.compile for each
target. The compilation runs in a subprocess without TRITON_INTERPRET because
under the interpreter @triton.jit yields objects that cannot be compiled.

Run directly to print results as JSON lines:  python tests/test_triton_aot.py 90
"""
import json
import os
import subprocess
import sys
import time
import traceback

import pytest
import torch

from resfast.kernels import conv, stats

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Per-block shared memory opt-in limits: A100 (sm_80) 163 KB, H100 (sm_90) 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                torch.int32: "i32", torch.int64: "i64"}


# Representative fast-path layer: ResNet 3x3, 64 channels, 56x56, batch 32, channels_last.
RESNET = dict(n=32, c=64, hw=56, oc=64, groups=1)
# Depthwise at batch 1: C_G = OC_G = N = 1 become constexprs under JIT specialisation.
DEPTHWISE = dict(n=1, c=32, hw=7, oc=32, groups=32)


def _conv_inputs(x_dtype, w_dtype, n, c, hw, oc, groups, stride=1):
    cl = torch.channels_last
    x = torch.empty((n, c, hw, hw), dtype=x_dtype, device="meta", memory_format=cl)
    vec = torch.empty(c, device="meta")
    w = torch.empty((oc, c // groups, 3, 3), dtype=w_dtype, device="meta")
    out_hw = (hw - 1) // stride + 1  # 3x3, padding 1
    y = torch.empty((n, oc, out_hw, out_hw), dtype=w_dtype, device="meta", memory_format=cl)
    return x, vec, w, y


def _forward(x_dtype, w_dtype, shape=RESNET):
    x, vec, w, y = _conv_inputs(x_dtype, w_dtype, **shape)
    bias = torch.empty(w.shape[0], dtype=w_dtype, device="meta")
    conv.norm_act_conv2d_forward(x, vec, vec, vec, w, bias, y, (1, 1), (1, 1), (1, 1),
                                 shape["groups"], "silu")


def _forward_into_slice(dtype, shape=RESNET):
    """The dense-block store: into a channel slice of a wider buffer, with statistics."""
    x, vec, w, _ = _conv_inputs(dtype, dtype, **shape)
    out = torch.empty((shape["n"], shape["oc"] + 48, shape["hw"], shape["hw"]), dtype=dtype, device="meta",
                      memory_format=torch.channels_last)
    conv.norm_act_conv2d_forward_into(x, vec, vec, vec, w, None, None, (1, 1), (1, 1), (1, 1), shape["groups"],
                                      "relu", out[:, 16:16 + shape["oc"]], True)


def _backward_input(dtype, stride, shape=RESNET):
    x, vec, w, go = _conv_inputs(dtype, dtype, stride=stride, **shape)
    conv.norm_act_conv2d_backward_input(go, x, vec, vec, vec, w, (stride, stride), (1, 1), (1, 1),
                                        shape["groups"], "silu")


def _backward_weight(dtype, shape=RESNET):
    x, vec, w, go = _conv_inputs(dtype, dtype, **shape)
    conv.norm_act_conv2d_backward_weight(go, x, vec, vec, vec, w.shape, (1, 1), (1, 1), (1, 1),
                                         shape["groups"], "silu")


def _stats(dtype):
    x = _conv_inputs(dtype, dtype, **RESNET)[0]
    stats.channel_stats(x)


def _stats_backward(dtype):
    x, vec, _, _ = _conv_inputs(dtype, dtype, **RESNET)
    stats.channel_stats_backward(x, vec, vec, vec)


bf16 = torch.bfloat16
# name -> (configs to compile, launcher call, whether the kernel must use tensor cores).
# The depthwise variants only check that the smallest (the heuristic's pick
# for such layers) compiles under the extra constexpr specialisations.
VARIANTS = {
    "forward-bf16": (conv.FWD_CONFIGS, lambda: _forward(bf16, bf16), True),
    "forward-fp32": (conv.FWD_CONFIGS, lambda: _forward(torch.float32, torch.float32), True),
    "forward-fp32x-bf16w": (conv.FWD_CONFIGS, lambda: _forward(torch.float32, bf16), True),
    "forward_into_slice-stats-bf16": (conv.FWD_CONFIGS, lambda: _forward_into_slice(bf16), True),
    "backward_input-bf16-s2": (conv.DGRAD_CONFIGS, lambda: _backward_input(bf16, 2), True),
    "backward_weight-bf16": (conv.WGRAD_CONFIGS, lambda: _backward_weight(bf16), True),
    "stats-bf16": (stats.STATS_CONFIGS, lambda: _stats(bf16), False),
    "stats_backward-bf16": (stats.STATS_CONFIGS, lambda: _stats_backward(bf16), False),
    "forward-depthwise": (conv.FWD_CONFIGS[-1:], lambda: _forward(bf16, bf16, DEPTHWISE), True),
    "backward_input-depthwise": (conv.DGRAD_CONFIGS[-1:],
                                 lambda: _backward_input(bf16, 1, DEPTHWISE), True),
    "backward_weight-depthwise": (conv.WGRAD_CONFIGS[-1:],
                                  lambda: _backward_weight(bf16, DEPTHWISE), True),
}


def _record_launch(call, config):
    """Run a launcher with kernel launches intercepted; returns [(kernel, args, kwargs)]."""
    from triton.runtime.jit import JITFunction

    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    saved = (JITFunction.run, conv._pick_config, stats._pick_config, conv.check_device,
             stats.check_device)
    JITFunction.run = record
    conv._pick_config = lambda configs, *shape: config
    stats._pick_config = lambda x: config
    # The launchers only accept CUDA tensors once compiled; meta tensors stand in.
    conv.check_device = stats.check_device = lambda *a: None
    try:
        call()
    finally:
        (JITFunction.run, conv._pick_config, stats._pick_config, conv.check_device,
         stats.check_device) = saved
    return launches


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
    """Yield one result dict per (variant, config) for compute capability `arch`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    for variant, (configs, call, _) in VARIANTS.items():
        for idx, config in enumerate(configs):
            result = dict(arch=arch, variant=variant, config=idx)
            start = time.time()
            try:
                (kernel, args, kwargs), = _record_launch(call, config)
                signature, constexprs, attrs, options = _specialise(kernel, args, kwargs)
                src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
                compiled = triton.compile(src, target=target, options=options)
                ptx = compiled.asm["ptx"]
                result.update(kernel=kernel.__name__, shared=compiled.metadata.shared,
                              wgmma="wgmma" in ptx, mma_sync="mma.sync" in ptx)
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
            results[(r["arch"], r["variant"], r["config"])] = r
    return results


CASES = [(arch, variant, idx) for arch in SHARED_LIMIT for variant, (configs, _, _) in VARIANTS.items()
         for idx in range(len(configs))]


@pytest.mark.parametrize("arch,variant,config", CASES,
                         ids=[f"sm{a}-{v}-cfg{i}" for a, v, i in CASES])
def test_aot_compile(compiled, arch, variant, config):
    r = compiled[(arch, variant, config)]
    assert "error" not in r, r["error"]
    assert r["shared"] <= SHARED_LIMIT[arch], (
        f"{r['kernel']} config {VARIANTS[variant][0][config]} needs {r['shared']} B shared memory "
        f"> {SHARED_LIMIT[arch]} B on sm_{arch}")
    if VARIANTS[variant][2]:
        # wgmma needs >= 64-row tiles per warpgroup; smaller tiles fall back to mma.sync.
        uses_tensor_cores = r["mma_sync"] or (arch >= 90 and r["wgmma"])
        assert uses_tensor_cores, f"{r['kernel']} on sm_{arch} emitted no tensor-core MMA"


if __name__ == "__main__":
    for res in compile_all(int(sys.argv[1])):
        print(json.dumps(res), flush=True)
