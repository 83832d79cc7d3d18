"""Markdown tables from `python -m resfast.bench --json` results, and the
README's measured section rebuilt from them (never edited by hand):

    python -m resfast.bench.report benchmarks/results/*.json --readme README.md

and several runs of one suite merged into their medians:

    python -m resfast.bench.report run1.json run2.json run3.json --merge out.json
"""

import argparse
import copy
import json
import re
import statistics
import sys

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
# What results written before the step was recorded back-propagated.
_SUM_STEP = "forward, then backward of the output's sum"


def _ms(times, name):
    return f"{times[name]['median'] * 1e3:.2f}" if name in times else "n/a"


def _roofline_cells(r):
    peak = f"{r['peak_bytes_resfast'] / 2**20:.0f}" if "peak_bytes_resfast" in r else "n/a"
    return f" {peak} | {100 * r['flop_fraction']:.1f}% | {100 * r['bandwidth_fraction']:.1f}% |"


def _vs_conv_cell(r):
    return f" {r['vs_conv']['resfast']:.2f} / {r['vs_conv']['eager']:.2f} |" if "vs_conv" in r else " n/a |"


def table(result, source):
    env = result["environment"]
    roofline = "peaks" in env
    extra_head = " peak MiB | FLOP rate / peak | min. traffic / copy bandwidth |" if roofline else ""
    machine = f"{env['device']}" + (f", {env['cores']} cores, {env['isa']}" if "isa" in env else "")
    vs_conv = any("vs_conv" in r for row in result["cases"] for r in row["results"].values())
    lines = [
        f"**{machine}**, {env['dtype']}, {'channels_last' if env['channels_last'] else 'NCHW'}, "
        f"torch {env['torch']}, triton {env['triton']}, {env['threads']} threads, {env['date'][:10]} "
        f"(`{source}`); training step: {env.get('training_step', _SUM_STEP)}"
        + (f"; {env['malloc']}" if env.get("malloc") else "")
        + (f"; median of {len(env['runs'])} runs" if env.get("runs") else ""),
        "",
        "| case | batch | mode | eager ms | torch.compile ms | resfast ms | vs eager | vs compile | saved activations vs eager |"
        + (" resfast / eager time over the bare conv's |" if vs_conv else "") + extra_head,
        "|---|---:|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if vs_conv else "") +
        ("---:|---:|---:|" if roofline else ""),
    ]
    for row in result["cases"]:
        for mode, r in row["results"].items():
            t = r["seconds"]
            vs_compile = f"{r['speedup_vs_compile']:.2f}x" if "speedup_vs_compile" in r else "n/a"
            lines.append(f"| {row['config']['case']} | {row['config']['batch']} | {mode} | {_ms(t, 'eager')} | "
                         f"{_ms(t, 'compile')} | {_ms(t, 'resfast')} | {r['speedup_vs_eager']:.2f}x | {vs_compile} | "
                         f"{row['saved_ratio']:.2f}x |" + (_vs_conv_cell(r) if vs_conv else "")
                         + (_roofline_cells(r) if roofline else ""))
    return "\n".join(lines)


def merge(results):
    """Runs of the same suite on one machine merged: per case and mode, each
    provider's median time (the runs' medians in `run_medians`; quartiles of
    one run would not describe the merge, so none are kept) and every other
    number the median of the runs' values (each run's ratios come from
    interleaved timings, so they are the steadier quantity)."""
    first = results[0]
    for r in results[1:]:
        for key in ("device", "dtype", "channels_last", "threads", "torch"):
            if r["environment"].get(key) != first["environment"].get(key):
                raise SystemExit(f"--merge: the runs differ in {key}: {first['environment'].get(key)!r} and "
                                 f"{r['environment'].get(key)!r}")
        if [c["config"] for c in r["cases"]] != [c["config"] for c in first["cases"]]:
            raise SystemExit("--merge: the runs differ in their cases")
        if [sorted(c["results"]) for c in r["cases"]] != [sorted(c["results"]) for c in first["cases"]]:
            raise SystemExit("--merge: the runs differ in the modes they measured")
    merged = copy.deepcopy(first)
    for i, row in enumerate(merged["cases"]):
        rows = [r["cases"][i] for r in results]
        row["saved_ratio"] = statistics.median(r["saved_ratio"] for r in rows)
        for mode, entry in row["results"].items():
            entries = [r["results"][mode] for r in rows]
            for name in entry["seconds"]:
                medians = [e["seconds"][name]["median"] for e in entries]
                entry["seconds"][name] = {"median": statistics.median(medians), "run_medians": medians}
            for key, value in entry.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    entry[key] = statistics.median(e[key] for e in entries)
                elif key == "vs_conv":
                    entry[key] = {k: statistics.median(e[key][k] for e in entries) for k in value}
    merged["environment"]["runs"] = [r["environment"]["date"] for r in results]
    return merged


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("results", nargs="+")
    p.add_argument("--readme", help="replace the README section between the bench markers")
    p.add_argument("--merge", metavar="OUT", help="write the results' medians (runs of one suite) to OUT instead")
    args = p.parse_args(argv)
    if args.merge:
        runs = []
        for path in args.results:
            with open(path) as f:
                runs.append(json.load(f))
        with open(args.merge, "w") as f:
            json.dump(merge(runs), f, indent=1)
        return
    results = []
    for path in args.results:
        with open(path) as f:
            result = json.load(f)
        if "cases" not in result:  # another benchmark's JSON (benchmarks/results holds several kinds)
            print(f"resfast.bench.report: {path}: not a resfast.bench result, skipped", file=sys.stderr)
            continue
        results.append((result, path))
    # Newest first; each run (machine, day) keeps its own table.
    results.sort(key=lambda r: r[0]["environment"]["date"], reverse=True)
    tables = [table(result, path) for result, path in results]
    text = ("Medians of interleaved runs; speedups are eager (or compiled) time over resfast time. "
            "Saved activations: bytes kept for backward by one training forward (docs/DESIGN.md §5).\n\n"
            + "\n\n".join(tables))
    if args.readme:
        with open(args.readme) as f:
            readme = f.read()
        if BEGIN not in readme or END not in readme:
            raise SystemExit(f"{args.readme}: no {BEGIN} ... {END} section to replace")
        readme = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{text}\n{END}", readme,
                        flags=re.S)
        with open(args.readme, "w") as f:
            f.write(readme)
    else:
        print(text)


if __name__ == "__main__":
    main()
