"""Data-parallel training of resfast models with PyTorch's own engines, on 2
gloo processes: one FSDP2 step (fully_shard on every block, then the root;
with and without resharding after forward) and one DDP step, each with B
samples per process, equal one single-process step on the 2B samples: the
loss, every parameter after an SGD step, and the buffers."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import nn

import resfast
from ranks import init, run_ranks
from utils import assert_close, randomize

WORLD = 2
BATCH = 2  # per process
LR = 0.1
BLOCKS = (resfast.nn.PreActBasicBlock, resfast.nn.PreActBottleneck, resfast.nn.DenseBlock, resfast.nn.Transition,
          resfast.nn.PreActResBlock)


def _converted_torchvision_densenet():
    from torchvision.models import DenseNet

    return resfast.convert(DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=5))[0]


MODELS = {
    "resnet18v2": (lambda: resfast.models.resnet18v2(num_classes=5), (3, 32, 32)),
    "densenet121": (lambda: resfast.models.densenet121(num_classes=5), (3, 32, 32)),
    "unet-gn": (lambda: resfast.models.UNet(3, 2, widths=(8, 16, 32), num_groups=4), (3, 16, 16)),
    "torchvision-densenet-converted": (_converted_torchvision_densenet, (3, 24, 24)),
}


def build(name, dtype=torch.float64):
    torch.manual_seed(1)
    make, _ = MODELS[name]
    return randomize(make()).to(dtype)


def data(name, dtype=torch.float64):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(WORLD * BATCH, *MODELS[name][1], generator=g, dtype=torch.float64) * 2 + 0.5
    with torch.no_grad():
        out_shape = build(name).eval()(x[:1]).shape[1:]
    grad = torch.randn(WORLD * BATCH, *out_shape, generator=g, dtype=torch.float64)
    return x.to(dtype), grad.to(dtype)


def sgd_step(model, x, grad, loss_scale):
    """One training step of loss = sum(y * grad) * loss_scale; returns the loss."""
    loss = (model(x) * grad).sum() * loss_scale
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=LR).step()
    return loss.detach()


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


MODES = ("fsdp", "fsdp-keep-unsharded", "ddp")


def _step(rank, name, mode, dtype):
    """One data-parallel step of a fresh model; what it leaves, for the test."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = resfast.nn.convert_sync_batchnorm(build(name, dtype))
    if mode == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model)
    else:
        options = dict(reshard_after_forward=mode == "fsdp")
        if dtype == torch.float32:  # the float32 model under a bfloat16 policy
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in [m for m in model.modules() if isinstance(m, BLOCKS)]:
            fully_shard(block, **options)
        wrapped = fully_shard(model, **options)
    x, grad = data(name, dtype)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    loss = sgd_step(wrapped, x[rows], grad[rows], 1.0)
    dist.all_reduce(loss)  # the losses summed over ranks: the single process's loss
    params = {n: _full(p).detach() for n, p in model.named_parameters()}
    return {"loss": loss, "params": params, "buffers": dict(model.named_buffers())}


def _worker(rank, world, port, out_dir, name, modes, dtype):
    init(rank, world, port)
    try:
        torch.set_num_threads(1)
        dtype = torch.float32 if dtype == "bf16" else torch.float64
        results = {mode: _step(rank, name, mode, dtype) for mode in modes}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run(name, modes, dtype="fp64"):
    """{mode: [each rank's results]}, all modes in one pair of processes."""
    with tempfile.TemporaryDirectory() as out_dir:
        run_ranks(_worker, WORLD, out_dir, name, modes, dtype)
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]
    return {mode: [r[mode] for r in ranks] for mode in modes}


@pytest.mark.parametrize("name", list(MODELS))
def test_data_parallel_step_matches_single_process(name):
    results = run(name, MODES)
    model = build(name)
    x, grad = data(name)
    # DDP and FSDP2 average gradients over ranks; the single process takes
    # the mean of the per-rank losses.
    loss = sgd_step(model, x, grad, 1.0 / WORLD)
    tol = 1e-9
    for mode, ranks in results.items():
        for r in ranks:
            assert_close(r["loss"] / WORLD, loss, torch.float64, f"{mode}: loss", tol)
            for n, p in model.named_parameters():
                assert_close(r["params"][n], p, torch.float64, f"{mode}: {n} after the step", tol)
            for n, b in model.named_buffers():
                if b.is_floating_point():
                    assert_close(r["buffers"][n], b, torch.float64, f"{mode}: {n}", tol)
                else:
                    assert torch.equal(r["buffers"][n], b), f"{mode}: {n}"


def test_fsdp_bfloat16_parameters_keep_float32_statistics():
    """MixedPrecisionPolicy(param_dtype=bfloat16): the norms' statistics and
    running buffers stay float32, and the step follows the float32 one."""
    ranks = run("resnet18v2", ("fsdp",), "bf16")["fsdp"]
    model = build("resnet18v2", torch.float32)
    x, grad = data("resnet18v2", torch.float32)
    loss = sgd_step(model, x, grad, 1.0 / WORLD)
    for r in ranks:
        assert_close(r["loss"] / WORLD, loss, torch.bfloat16, "loss", tol=5e-2)
        for n, b in model.named_buffers():
            assert r["buffers"][n].dtype == b.dtype, n
            if b.is_floating_point():
                assert_close(r["buffers"][n], b, torch.bfloat16, n, tol=5e-2)
