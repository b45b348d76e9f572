"""Run the OFFICIAL OGM-GE training loop (GeWu-Lab/OGM-GE_CVPR2022, main.py train_epoch) on
CREMA-D-shaped synthetic batches on CPU and record AVClassifier's state before and after, so that
gradmod's OGM / OGM-GE (official parameter preset: 4-D weights of audio_net / visual_net) can be
held against the real code. The official sources are not in this repository: point OGM_SRC at an
extracted copy (main.py, models/, utils/, dataset/ from the fetched mirror).

    OGM_SRC=<dir> python official_ogm_run.py OUT.pt [OGM|OGM_GE|Normal] [alpha]
Runtime shims only: data-loading imports the loop never uses (librosa, cv2, PIL, torchvision,
tensorboard) are stubbed. With modulation OGM the run is deterministic; OGM_GE draws noise from
the global generator, so compare it statistically.
"""

from __future__ import annotations

import argparse
import os
import sys
import types

import torch
import torch.nn as nn


def _stub_unused_imports() -> None:
    for name in (
        "librosa",
        "cv2",
        "PIL",
        "torchvision",
        "torchvision.transforms",
        "torch.utils.tensorboard",
    ):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["PIL"].Image = None  # type: ignore[attr-defined]
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]  # type: ignore[attr-defined]
    sys.modules["torch.utils.tensorboard"].SummaryWriter = object  # type: ignore[attr-defined]


def cremad_batches(n: int = 3, bs: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(bs, 64, 48, generator=g),
            torch.randn(bs, 3, 2, 64, 64, generator=g),
            torch.randint(0, 6, (bs,), generator=g),
        )
        for _ in range(n)
    ]


def run(src: str, modulation: str = "OGM", alpha: float = 0.8, seed: int = 0):
    _stub_unused_imports()
    sys.path.insert(0, src)
    import main as ogm_main  # type: ignore  # the official script, from OGM_SRC
    from models.basic_model import AVClassifier  # type: ignore

    args = argparse.Namespace(
        dataset="CREMAD",
        fusion_method="concat",
        modulation=modulation,
        alpha=alpha,
        modulation_starts=0,
        modulation_ends=50,
        use_tensorboard=False,
    )
    torch.manual_seed(seed)
    model = AVClassifier(args)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    dp = nn.DataParallel(model)
    data = cremad_batches()
    opt = torch.optim.SGD(dp.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, 70, 0.1)
    ogm_main.train_epoch(args, 0, dp, "cpu", data, opt, sched)
    return {
        "args": vars(args),
        "train": data,
        "init": init,
        "final": {k: v.clone() for k, v in model.state_dict().items()},
    }


if __name__ == "__main__":
    src = os.environ.get("OGM_SRC")
    if not src:
        sys.exit("set OGM_SRC to an extracted copy of the official OGM-GE repository")
    mod = sys.argv[2] if len(sys.argv) > 2 else "OGM"
    alpha = float(sys.argv[3]) if len(sys.argv) > 3 else 0.8
    out = run(src, mod, alpha)
    torch.save(out, sys.argv[1] if len(sys.argv) > 1 else "official_ogm_run.pt")
    moved = sum(not torch.equal(out["init"][k], v) for k, v in out["final"].items())
    print(f"official OGM-GE ({mod}, alpha={alpha}): {moved} of {len(out['final'])} tensors moved")
