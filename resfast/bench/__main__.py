"""`python -m resfast.bench`: resfast against eager PyTorch and torch.compile
on this machine's best device. Prints a table; --json writes full results."""

import argparse
import datetime
import json
import os
import platform
import sys

import torch

import resfast
from resfast.bench.cases import QUICK_SUITES, SUITES
from resfast.bench.roofline import measure_peaks, step_flops, step_min_bytes
from resfast.bench.timing import TRAINING_STEP, default_malloc, keep_freed_memory, saved_activation_bytes, step_fn, \
    time_interleaved

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="resfast-bench", description=__doc__)
    p.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on for CUDA, off for CPU")
    p.add_argument("--quick", action="store_true", help="small batch and fewer cases")
    p.add_argument("--compile-mode", default=None, help="torch.compile's mode, e.g. max-autotune (default: its own)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time torch.compile of the eager module")
    p.add_argument("--repeats", type=int, default=None, help="rounds of interleaved calls at least")
    p.add_argument("--min-seconds", type=float, default=1.0,
                   help="more rounds, until they took this long (default: %(default)s)")
    p.add_argument("--default-malloc", action="store_true",
                   help="on the CPU, leave glibc's malloc as it is (default: keep freed memory, see the README)")
    p.add_argument("--roofline", action=argparse.BooleanOptionalAction, default=None,
                   help="report FLOP rate and bandwidth as fractions of measured peaks (default: on for CUDA)")
    p.add_argument("--filter", metavar="TEXT", help="only the cases whose name contains TEXT")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot", metavar="PATH", help="PNG bar chart of speedups and memory ratios (matplotlib)")
    return p.parse_args(argv)


def _compiled(eager, mode):
    # A fresh dynamo cache per case: the cases share forward code objects, and
    # past the recompile limit dynamo would silently run them eagerly.
    torch._dynamo.reset()
    try:
        compiled = torch.compile(eager, mode=mode)
        return compiled, None
    except Exception as e:  # noqa: BLE001  (reported, not hidden)
        return None, f"{type(e).__name__}: {e}"


def run_case(case, args, device, dtype, channels_last, batch, peaks=None):
    eager, ours, x = case.build(batch, device, dtype, channels_last)
    bare = case.bare_conv(eager)
    row = {"config": case.config(batch), "results": {}}
    x_train = x.detach().requires_grad_()
    row["saved_bytes"] = {"eager": saved_activation_bytes(eager.train(), x_train),
                          "resfast": saved_activation_bytes(ours.train(), x_train)}
    row["saved_ratio"] = row["saved_bytes"]["resfast"] / row["saved_bytes"]["eager"]
    if not args.compile:
        compiled, compile_error = None, "disabled by --no-compile"
    elif args.quick and (case in QUICK_SUITES["models"] or case in QUICK_SUITES["volumes"]):
        # Compiling a whole ResNet-200, DenseNet-264 or 3-D U-Net takes minutes on a CPU.
        compiled, compile_error = None, "not compiled for whole models with --quick"
    else:
        compiled, compile_error = _compiled(eager, args.compile_mode)
    for mode, training in (("inference", False), ("training", True)):
        for m in (eager, ours):
            m.train(training)
        xin = x_train if training else x
        fns = {"eager": step_fn(eager, xin, training), "resfast": step_fn(ours, xin, training)}
        if compiled is not None:
            fns["compile"] = step_fn(compiled, xin, training)
        if bare is not None:
            fns["conv"] = step_fn(bare.train(training), xin, training)
        try:
            times = time_interleaved(fns, device, repeats=args.repeats, min_seconds=args.min_seconds)
        except Exception as e:  # noqa: BLE001  (torch.compile can fail at first call)
            if "compile" not in fns:
                raise
            compile_error = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            compiled = None
            fns.pop("compile")
            times = time_interleaved(fns, device, repeats=args.repeats, min_seconds=args.min_seconds)
        entry = {"seconds": times, "speedup_vs_eager": times["eager"]["median"] / times["resfast"]["median"]}
        if "conv" in times:
            # The limit: the unit's convolution alone, normalisation and activation for free.
            entry["vs_conv"] = {name: times[name]["median"] / times["conv"]["median"] for name in ("eager", "resfast")}
        if "compile" in times:
            entry["speedup_vs_compile"] = times["compile"]["median"] / times["resfast"]["median"]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            fns["resfast"]()
            entry["peak_bytes_resfast"] = torch.cuda.max_memory_allocated(device)
        if peaks is not None:
            entry.update(_roofline(eager, ours, xin, training, times["resfast"]["median"], peaks))
        row["results"][mode] = entry
    row["compile_error"] = compile_error
    return row


def _roofline(eager, ours, x, training, seconds, peaks):
    """resfast's achieved FLOP rate and minimum memory traffic per second as
    fractions of the device's measured peaks (the eager module counts the
    work: resfast does the same convolutions)."""
    with torch.no_grad():
        y = ours(x)
    flops = step_flops(eager, x, training)
    return {"flops": flops, "flop_fraction": flops / seconds / peaks["flops_per_s"],
            "bandwidth_fraction": step_min_bytes(x, y, training) / seconds / peaks["bytes_per_s"]}


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device):
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "resfast": resfast.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
           "threads": torch.get_num_threads(), "training_step": TRAINING_STEP}
    if device.type == "cpu":
        env.update(cores=os.cpu_count(), isa=resfast.ops.cpu_isa())
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def print_table(rows, env):
    machine = env["device"] + (f", {env['cores']} cores, {env['isa']}, {env['threads']} threads" if "isa" in env else "")
    print(f"resfast {env['resfast']} | torch {env['torch']} | {machine} | {env['date']}")
    roofline = "peaks" in env
    header = f"{'case':28} {'batch':>5} {'mode':10} {'eager ms':>9} {'compile ms':>10} {'resfast ms':>10} {'vs eager':>9} " \
             f"{'vs compile':>10} {'saved mem':>9} {'vs conv':>11}" + \
             (f" {'peak MiB':>9} {'FLOP %':>7} {'BW %':>6}" if roofline else "")
    print(header)
    print("-" * len(header))
    for row in rows:
        for mode, r in row["results"].items():
            s = r["seconds"]
            comp = f"{s['compile']['median'] * 1e3:10.2f}" if "compile" in s else f"{'n/a':>10}"
            vs_comp = f"{r['speedup_vs_compile']:9.2f}x" if "speedup_vs_compile" in r else f"{'n/a':>10}"
            print(f"{row['config']['case']:28} {row['config']['batch']:5} {mode:10} {s['eager']['median'] * 1e3:9.2f} {comp} "
                  f"{s['resfast']['median'] * 1e3:10.2f} {r['speedup_vs_eager']:8.2f}x {vs_comp} "
                  f"{row['saved_ratio']:8.2f}x {_vs_conv(r):>11}" + (_roofline_columns(r) if roofline else ""))
    errors = {row["compile_error"] for row in rows if row["compile_error"]}
    for e in errors:
        print(f"torch.compile not timed: {e}")


def _vs_conv(r):
    """resfast / eager time over the bare convolution's, for unit cases."""
    return f"{r['vs_conv']['resfast']:.2f}/{r['vs_conv']['eager']:.2f}" if "vs_conv" in r else "n/a"


def _roofline_columns(r):
    peak = f"{r['peak_bytes_resfast'] / 2**20:9.0f}" if "peak_bytes_resfast" in r else f"{'n/a':>9}"
    return f" {peak} {100 * r['flop_fraction']:6.1f}% {100 * r['bandwidth_fraction']:5.1f}%"


def _progress(cases):
    """A tqdm bar on stderr, or one line per case without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        for i, case in enumerate(cases, 1):
            print(f"[{i}/{len(cases)}] {case.name}", file=sys.stderr, flush=True)
            yield case
        return
    with tqdm(cases, desc="resfast-bench", unit="case", file=sys.stderr) as bar:
        for case in bar:
            bar.set_postfix_str(case.name)
            yield case


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("resfast-bench: --device cuda requested but CUDA is not available")
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    if args.repeats is None:
        args.repeats = 5 if args.quick else (50 if device.type == "cuda" else 15)
    suites = QUICK_SUITES if args.quick else SUITES
    names = list(suites) if args.suite == "all" else [args.suite]
    cases = [c for n in names for c in suites[n] if args.filter is None or args.filter in c.name]
    if not cases:
        sys.exit(f"resfast-bench: no case matches --filter {args.filter!r}")
    env = environment(device)
    if device.type == "cpu":
        env["malloc"] = default_malloc() if args.default_malloc else keep_freed_memory()
    peaks = None
    if device.type == "cuda" if args.roofline is None else args.roofline:
        # Smaller probes on a CPU, where an 8192^3 matmul takes seconds.
        sizes = {} if device.type == "cuda" else {"copy_bytes": 1 << 28, "matmul_size": 2048, "repeats": 3}
        peaks = measure_peaks(device, dtype, **sizes)
        env["peaks"] = peaks
    rows = []
    for case in _progress(cases):
        batch = args.batch_size or case.default_batch(device.type, args.quick)
        try:
            rows.append(run_case(case, args, device, dtype, channels_last, batch, peaks))
        except ImportError as e:  # a case's reference library (monai) is not installed
            print(f"resfast-bench: {case.name} skipped: {e}", file=sys.stderr)
    env.update(dtype=str(dtype).replace("torch.", ""), channels_last=channels_last, quick=args.quick,
               compile_mode=args.compile_mode or "default")
    env["conv_choices"] = resfast.ops.conv_choices()
    print_table(rows, env)
    if env["conv_choices"]:
        print("\nconvolution engines chosen (resfast.ops.conv_choices):")
        for key, choice in env["conv_choices"].items():
            timings = ", ".join(f"{name} {t * 1e6:.0f} us" if isinstance(t, float) else f"{name}: {t}"
                                for name, t in choice["candidates"].items())
            print(f"  {key}: {choice['choice']} ({timings})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "cases": rows}, f, indent=2)
    if args.plot:
        from resfast.bench.plot import plot

        plot(rows, env, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
