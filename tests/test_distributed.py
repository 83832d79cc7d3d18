"""Synchronised BatchNorm: a DistributedDataParallel step on 2 gloo processes
with B samples each equals one process on the 2B samples (outputs,
gradients, running statistics)."""

import os
import tempfile

import torch
import torch.distributed as dist
from torch import nn

import resfast
from ranks import init, run_ranks
from utils import assert_close, randomize

WORLD = 2
BATCH = 3  # per process


def small_model():
    torch.manual_seed(1)
    model = nn.Sequential(
        resfast.nn.BNReLUConv2d(4, 8, 3, padding=1),
        resfast.nn.PreActBottleneck(8, 16, stride=2),
        resfast.nn.BNReLUConv2d(16, 6, 1, bias=True),
        nn.BatchNorm2d(6),  # a BatchNorm on its own, as ResNetV2's final norm
    )
    return randomize(model).double()


def data():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(WORLD * BATCH, 4, 9, 7, generator=g, dtype=torch.float64) * 2 + 0.5
    grad = torch.randn(WORLD * BATCH, 6, 5, 4, generator=g, dtype=torch.float64)
    return x, grad


def step(model, x, grad, steps=2):
    """Forward and backward `steps` times (so running statistics and the
    gradients accumulate), returning the last output and the input gradient."""
    for _ in range(steps):
        x = x.detach().requires_grad_()
        y = model(x)
        y.backward(grad)
    return y.detach(), x.grad


def _worker(rank, world, port, out_dir):
    init(rank, world, port)
    try:
        torch.set_num_threads(1)
        model = resfast.nn.convert_sync_batchnorm(small_model())
        ddp = nn.parallel.DistributedDataParallel(model)
        x, grad = data()
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        y, grad_x = step(ddp, x[rows], grad[rows])
        torch.save({"y": y, "grad_x": grad_x, "state": model.state_dict(),
                    "grads": {n: p.grad for n, p in model.named_parameters()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_step_matches_single_process():
    with tempfile.TemporaryDirectory() as out_dir:
        run_ranks(_worker, WORLD, out_dir)
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]

    model = small_model()
    x, grad = data()
    y, grad_x = step(model, x, grad)
    tol = 1e-10
    assert_close(torch.cat([r["y"] for r in ranks]), y, torch.float64, "output", tol)
    # Each rank's input gradient includes the other rank's loss through the shared statistics.
    assert_close(torch.cat([r["grad_x"] for r in ranks]), grad_x, torch.float64, "grad input", tol)
    # A bias followed by a training-mode BatchNorm has a zero gradient, computed
    # as a sum that cancels: measure it against its module's weight gradient.
    params = dict(model.named_parameters())
    floor = {name: params[name.rpartition(".")[0] + ".weight"].grad.abs().max().item() for name in params}
    for r in ranks:
        # DDP averages gradients over ranks; the single process summed the losses.
        for name, p in params.items():
            assert_close(r["grads"][name] * WORLD, p.grad, torch.float64, f"grad {name}", tol, floor=floor[name])
        for name, b in model.state_dict().items():
            if b.is_floating_point():
                assert_close(r["state"][name], b, torch.float64, name, tol)
            else:
                assert torch.equal(r["state"][name], b), name


def test_single_process_sync_is_local_batch_norm():
    """Without an initialised process group a converted model is the local model."""
    model = small_model()
    synced = resfast.nn.convert_sync_batchnorm(small_model())
    bns = [m for m in synced.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 6 and all(type(m) is resfast.nn.SyncBatchNorm2d for m in bns)
    x, grad = data()
    y, grad_x = step(model, x, grad)
    y_sync, grad_x_sync = step(synced, x, grad)
    assert torch.equal(y_sync, y) and torch.equal(grad_x_sync, grad_x)
    for (name, a), b in zip(synced.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_process_group_argument_builds_sync_batchnorm():
    group = object()  # stands for a ProcessGroup: only stored until a synced forward
    unit = resfast.nn.BNReLUConv2d(4, 6, 3, process_group=group)
    assert isinstance(unit.bn, resfast.nn.SyncBatchNorm2d) and unit.bn.process_group is group
    assert list(unit.state_dict()) == list(resfast.nn.BNReLUConv2d(4, 6, 3).state_dict())
