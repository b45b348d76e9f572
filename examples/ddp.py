"""The recommended configuration under DistributedDataParallel, launched by torchrun (gloo, CPU):

    torchrun --nproc_per_node=2 examples/ddp.py
    python examples/ddp.py                        # the same training in one process

Every rank holds the same seeded data set and trains on its shard of each global batch. DDP
averages the model's gradients; gradmod all-reduces what it needs itself (the heads' scores,
so every rank uses the same coefficients, and the heads' gradients). With equal shards and a
mean loss, the average of the ranks' gradients is the full batch's gradient: two processes train
as one does, up to float rounding (tests/test_torchrun.py checks it, with --save).
"""

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import gradmod

parser = argparse.ArgumentParser(description="gradmod under DDP (run it with torchrun)")
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--save", type=Path, help="write each rank's final state to SAVE/rank<r>.pt")
args = parser.parse_args()

# torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; a plain `python` run sets none
# and gets a process group of one (in-memory store), so the code below is the same in both.
if "WORLD_SIZE" in os.environ:
    dist.init_process_group("gloo")  # "nccl" on GPUs
else:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
rank, world = dist.get_rank(), dist.get_world_size()
BATCH = 64  # the global batch: each rank takes BATCH // world samples of it
assert BATCH % world == 0, "equal shards: the DDP average is then the full batch's gradient"


class LateFusion(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(20, 32), nn.ReLU())
        self.video = nn.Sequential(nn.Linear(30, 32), nn.ReLU())
        self.head = nn.Linear(64, 5)

    def forward(self, xa, xv):
        feats = {"audio": self.audio(xa), "video": self.video(xv)}
        return self.head(torch.cat([feats["audio"], feats["video"]], dim=1)), feats


def dataset(n, seed):
    """The same samples on every rank (seeded): audio shows the class clearly, video faintly."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 5, (n,), generator=g)
    xa = torch.randn(n, 20, generator=g) + F.pad(3.0 * F.one_hot(y, 5), (0, 15))
    xv = torch.randn(n, 30, generator=g) + F.pad(0.5 * F.one_hot(y, 5), (0, 25))
    return TensorDataset(xa, xv, y)


train, test = dataset(512, seed=1), dataset(1000, seed=2)  # 512 = 8 global batches of 64
# The sampler deals each rank its shard (the same shuffle on every rank, a new one each epoch).
sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=0)
loader = DataLoader(train, batch_size=BATCH // world, sampler=sampler)

torch.manual_seed(0)  # the same initial weights everywhere (DDP would broadcast rank 0's anyway)
model = LateFusion()
# The unimodal heads stay OUTSIDE the DDP module: gradmod runs them inside backward, after
# DDP's forward, and all-reduces their gradients itself.
heads = {m: nn.Linear(32, 5) for m in ("audio", "video")}
ddp_model = DDP(model)
head_params = [p for h in heads.values() for p in h.parameters()]
optimizer = torch.optim.Adam([*model.parameters(), *head_params], lr=1e-2)
# The recommended configuration, on the DDP module (gradmod looks through the wrapper):
# gradmod.balanced() on the update level. The coefficients come from the heads' scores summed
# over all ranks, so every rank scales its update identically and the ranks stay identical.
ctx = gradmod.ModulationContext(ddp_model, heads, optimizer=optimizer)

for epoch in range(args.epochs):
    sampler.set_epoch(epoch)
    for xa, xv, y in loader:
        logits, feats = ddp_model(xa, xv)
        loss = F.cross_entropy(logits, y)  # this rank's mean: DDP averages over the ranks
        with ctx(features=feats, targets=y):
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if rank == 0:  # every rank holds the same model: one of them evaluates it
        with torch.no_grad():
            xa, xv, y = test.tensors
            acc = (model(xa, xv)[0].argmax(1) == y).float().mean().item()
        k = {n: round(c, 3) for n, c in zip(ctx.names, ctx.coefficients.tolist(), strict=True)}
        print(f"epoch {epoch}: k = {k}, test accuracy {acc:.3f} ({world} process(es))")

if args.save is not None:
    args.save.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "heads": {m: h.state_dict() for m, h in heads.items()},
        "coefficients": ctx.coefficients,
    }
    torch.save(state, args.save / f"rank{rank}.pt")
dist.destroy_process_group()
