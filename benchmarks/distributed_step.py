"""Time of one data-parallel training step of a resfast model on 2 gloo
processes on this machine (one thread each): FSDP2 (fully_shard per block and
on the root) against DDP, both with SyncBatchNorm2d. A report, not a target:
on a CPU the collectives are gloo over loopback.

    python benchmarks/distributed_step.py [--model resnet18v2] [--steps 10] [--json PATH]
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import resfast  # noqa: E402
from ranks import init, run_ranks  # noqa: E402
from resfast.bench.__main__ import cpu_name  # noqa: E402

WORLD = 2
BLOCKS = (resfast.nn.PreActBasicBlock, resfast.nn.PreActBottleneck, resfast.nn.DenseBlock, resfast.nn.Transition,
          resfast.nn.PreActResBlock)


def _worker(rank, world, port, model_name, mode, steps, batch, size, out_path):
    from torch.distributed.fsdp import fully_shard

    init(rank, world, port)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = resfast.nn.convert_sync_batchnorm(getattr(resfast.models, model_name)(num_classes=10))
        if mode == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
        else:
            for block in [m for m in model.modules() if isinstance(m, BLOCKS)]:
                fully_shard(block)
            wrapped = fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x = torch.randn(batch, 3, size, size)
        times = []
        for step in range(steps + 2):  # two warm-up steps
            dist.barrier()
            start = time.perf_counter()
            wrapped(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            dist.barrier()
            if step >= 2:
                times.append(time.perf_counter() - start)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(times, f)
    finally:
        dist.destroy_process_group()


def main(argv):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="resnet18v2")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8, help="per process")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--json")
    args = p.parse_args(argv)
    results = {}
    for mode in ("ddp", "fsdp2"):
        out_path = f"/tmp/resfast-distributed-{mode}.json"
        run_ranks(_worker, WORLD, args.model, mode, args.steps, args.batch, args.size, out_path)
        with open(out_path) as f:
            times = json.load(f)
        results[mode] = {"median_s": statistics.median(times), "q25_s": statistics.quantiles(times, n=4)[0],
                         "q75_s": statistics.quantiles(times, n=4)[2], "steps": len(times)}
        print(f"{mode:6s} {args.model} batch {args.batch}x{WORLD} @{args.size}: "
              f"{results[mode]['median_s'] * 1e3:.1f} ms per step (median of {len(times)})")
    print(f"FSDP2 / DDP: {results['fsdp2']['median_s'] / results['ddp']['median_s']:.2f}")
    if args.json:
        env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "torch": torch.__version__, "cpu": cpu_name(),
               "processes": WORLD, "threads_per_process": 1, "backend": "gloo"}
        with open(args.json, "w") as f:
            json.dump({"environment": env, "config": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
