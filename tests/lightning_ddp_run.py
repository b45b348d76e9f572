"""Run by tests/test_lightning.py: ``python lightning_ddp_run.py OUTDIR``.

A ``lightning.Trainer(strategy="ddp", devices=2)`` on the CPU (Lightning re-runs this script for
rank 1), once per method, with the heads inside the LightningModule; then, in the same
processes and process group, the hand-written plain loop under torch's DDP on the rank's shard
(the batches Lightning's distributed sampler gave it, replayed). Each rank writes
``OUTDIR/rank<r>.json``: per method the max parameter difference between the two runs, how far
training moved the parameters, and a digest of the Lightning run's parameters.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _lightning_common import (
    METHODS,
    Net,
    callback,
    context_args,
    dataset,
    loader,
    max_diff,
    method_of,
)
from torch import nn

import gradmod

warnings.filterwarnings("ignore")


class Recording(Net):
    """Keeps the batches Lightning's distributed sampler gave this rank, for the replay."""

    def __init__(self, method: str) -> None:
        super().__init__(method)
        self.seen: list[list[torch.Tensor]] = []

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.seen.append([t.clone() for t in batch])
        return super().training_step(batch, batch_idx)


def plain_ddp(name: str, seen: list[list[torch.Tensor]], per_epoch: int) -> Net:
    net = Net(name)
    heads = dict(net.heads.items()) if name != "ogm-ge" else None
    if heads is not None:
        owned = {id(p) for h in heads.values() for p in h.parameters()}
        names = [n for n, p in net.named_parameters() if id(p) in owned]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(net, names)
    ddp = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    args = context_args(name)
    ctx = gradmod.ModulationContext(
        ddp,
        heads,
        method=method_of(name),
        optimizer=opt if args.pop("act") == "update" else None,
        **args,  # type: ignore[arg-type]
    )
    for i, (xa, xb, y) in enumerate(seen):
        if i % per_epoch == 0:
            ctx.set_epoch(i // per_epoch)
        logits, feats = ddp(xa, xb)
        loss = F.cross_entropy(logits, y)
        with ctx(feats, y):
            loss.backward()
        opt.step()
        opt.zero_grad()
    ctx.close()
    return net


def main() -> None:
    out = Path(sys.argv[1])
    results = {}
    for name in METHODS:
        net = Recording(name)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            max_epochs=2,
            callbacks=[callback(name)],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(net, loader(dataset()))
        ref = plain_ddp(name, net.seen, per_epoch=len(net.seen) // 2)
        blob = b"".join(p.detach().numpy().tobytes() for p in net.parameters())
        results[name] = {
            "diff": max_diff(net, ref),
            "moved": max_diff(net, Net(name)),
            "digest": hashlib.sha256(blob).hexdigest(),
        }
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
