"""Run the OFFICIAL CGGM training code (zrguo/CGGM, src/msatrain.py) on MOSI-shaped synthetic
batches and record the model's and classifiers' parameters before and after, so that gradmod's
official-parity mode can be held against the real thing. The official code is not part of this
repository: point CGGM_SRC at an extracted copy of it (git archive of the fetched mirror).

    CGGM_SRC=<dir> python official_cggm_run.py OUT.pt
Runtime shims only (the official sources are untouched): ReduceLROnPlateau's removed `verbose`
argument is dropped. Dropouts are 0 and batch_size ≤ 10 so the run is deterministic on CPU and
no DataParallel wrapper is built.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def mosi_batches(n: int, bs: int, seed: int, seq: int = 6):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "text": torch.randn(bs, seq, 300, generator=g),
            "audio": torch.randn(bs, seq, 5, generator=g),
            "vision": torch.randn(bs, seq, 20, generator=g),
            "labels": torch.randn(bs, 1, 1, generator=g) * 2,
        }
        for _ in range(n)
    ]


def hyper(**over):
    hp = argparse.Namespace(
        dataset="mosi",
        modulation="cggm",
        attn_dropout=0.0,
        relu_dropout=0.0,
        embed_dropout=0.0,
        res_dropout=0.0,
        out_dropout=0.0,
        nlevels=3,
        cls_layers=2,
        num_heads=5,
        proj_dim=40,
        batch_size=8,
        clip=0.8,
        lr=1e-3,
        cls_lr=5e-4,
        optim="Adam",
        num_epochs=1,
        when=10,
        rou=1.3,
        lamda=0.2,
        orig_dim=[300, 5, 20],
        layers=3,
        use_cuda=False,
        output_dim=1,
        criterion="L1Loss",
        num_mod=3,
    )
    for k, v in over.items():
        setattr(hp, k, v)
    return hp


def run(src: str, n_train: int = 4, seed: int = 0):
    sys.path.insert(0, src)
    from src import msatrain  # type: ignore  # the official module, from CGGM_SRC

    made: dict = {}
    orig_model, orig_cls, orig_sched = (
        msatrain.MSAModel,
        msatrain.ClassifierGuided,
        msatrain.ReduceLROnPlateau,
    )

    def model_factory(*a, **k):
        m = orig_model(*a, **k)
        made["model"], made["model_init"] = m, {n: p.clone() for n, p in m.state_dict().items()}
        return m

    def cls_factory(*a, **k):
        c = orig_cls(*a, **k)
        made["cls"], made["cls_init"] = c, {n: p.clone() for n, p in c.state_dict().items()}
        return c

    msatrain.MSAModel, msatrain.ClassifierGuided = model_factory, cls_factory
    msatrain.ReduceLROnPlateau = lambda *a, verbose=None, **k: orig_sched(*a, **k)
    hp = hyper()
    tr, va, te = mosi_batches(n_train, 8, 1), mosi_batches(2, 8, 2), mosi_batches(2, 8, 3)
    hp.n_train, hp.n_valid, hp.n_test = len(tr), len(va), len(te)
    torch.manual_seed(seed)
    msatrain.initiate(hp, tr, va, te)
    return {
        "hyper": vars(hp),
        "train": tr,
        "model_init": made["model_init"],
        "cls_init": made["cls_init"],
        "model_final": {n: p.clone() for n, p in made["model"].state_dict().items()},
        "cls_final": {n: p.clone() for n, p in made["cls"].state_dict().items()},
    }


if __name__ == "__main__":
    src = os.environ.get("CGGM_SRC")
    if not src:
        sys.exit("set CGGM_SRC to an extracted copy of the official CGGM repository")
    out = run(src)
    torch.save(out, sys.argv[1] if len(sys.argv) > 1 else "official_cggm_run.pt")
    moved = sum(not torch.equal(out["model_init"][k], v) for k, v in out["model_final"].items())
    print(
        f"official CGGM: {moved} of {len(out['model_final'])} model tensors moved in {len(out['train'])} steps"
    )
