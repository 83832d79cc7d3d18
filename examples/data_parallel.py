"""Data-parallel training of a resfast model with PyTorch's engines: FSDP2
(fully_shard per block, then the root) or DDP, with synchronised BatchNorm.

    torchrun --nproc-per-node 2 examples/data_parallel.py [--ddp]

On the CPU this uses gloo; with GPUs, NCCL (one GPU per process).
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import resfast

# The modules a resfast model is sharded by: each one's parameters are
# gathered just before its forward and freed after it.
BLOCKS = (resfast.nn.PreActBasicBlock, resfast.nn.PreActBottleneck, resfast.nn.DenseBlock, resfast.nn.Transition,
          resfast.nn.PreActResBlock)

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
device = torch.device("cuda", dist.get_rank() % torch.cuda.device_count()) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)
torch.manual_seed(0)

# Every BatchNorm (inside the fused units too) normalises with statistics over all processes.
model = resfast.nn.convert_sync_batchnorm(resfast.models.resnet18v2(num_classes=10)).to(device)
if "--ddp" in sys.argv:
    model = torch.nn.parallel.DistributedDataParallel(model)
else:
    for block in [m for m in model.modules() if isinstance(m, BLOCKS)]:
        fully_shard(block)
    fully_shard(model)
opt = torch.optim.SGD(model.parameters(), lr=0.01)

for step in range(3):
    x = torch.randn(8, 3, 64, 64, device=device)  # this process's share of the batch
    labels = torch.randint(0, 10, (8,), device=device)
    loss = torch.nn.functional.cross_entropy(model(x), labels)
    loss.backward()
    opt.step()
    opt.zero_grad()
    if dist.get_rank() == 0:
        print(f"step {step}: loss {loss.item():.3f}")
dist.destroy_process_group()
