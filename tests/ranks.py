"""Run a test's worker on several gloo processes on this machine."""

import datetime
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 120


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank, world, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))


def run_ranks(worker, world, *args):
    """worker(rank, world, port, *args) on `world` spawned processes; fails the
    test if one fails or they do not finish in time."""
    ctx = mp.start_processes(worker, args=(world, free_port(), *args), nprocs=world, join=False,
                             start_method="spawn")
    waited = 0
    while not ctx.join(timeout=5):
        waited += 5
        if waited >= 2 * TIMEOUT_S:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers did not finish in {2 * TIMEOUT_S} s")
