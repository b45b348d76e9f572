"""gradmod-side counterpart of official_ogm_run.py: the SAME official AVClassifier (imported
from OGM_SRC, wrapped in nn.DataParallel as the runner does), the runner's saved initial state
and batches, SGD(lr 1e-3, momentum 0.9, wd 1e-4) + StepLR(70, 0.1), cross-entropy, with the
modulation done by gradmod.OGMGE(alpha, params="conv", ge=False, window=(0, 50)) — the official
"OGM" (deterministic, no GE noise) with the official parameter preset (4-D weights of audio_net /
visual_net) and modulation window, epoch 0. Records per-step scores and coefficients.

    OGM_SRC=<dir> PYTHONPATH=<gradmod checkout> python gradmod_ogm_run.py OFFICIAL.pt OUT.pt [DIAG]

DIAG (diagnostic only, monkeypatched in this process, gradmod's files untouched):
  none  gradmod as shipped (default)
  f32   scores and coefficient in the official float32 arithmetic (main.py:105-124: a Python
        sum of float32 softmax entries, ratio_v = s_v / s_a, 1 - tanh(alpha * relu(ratio)))
        in place of gradmod's float64 scores and 2*sigmoid(-2x)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn as nn


def _official_model(src: str, args):
    # the model modules import only torch; stub nothing
    sys.path.insert(0, src)
    from models.basic_model import AVClassifier  # type: ignore

    return AVClassifier(args)


def _install_f32() -> None:
    from gradmod.methods import _ogm as mo

    real = mo.GF

    class F32:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def true_class_probability(z, y):  # one entry: the official sequential float32 sum
            p = torch.softmax(z.float(), dim=1)
            return torch.stack([sum([p[i][y[i]] for i in range(z.size(0))])])

        @staticmethod
        def ogm_ge_coefficients(scores, *, alpha, form="official"):
            s_a, s_v = scores[0].float(), scores[1].float()
            ratio_v = s_v / s_a
            ratio_a = 1 / ratio_v
            one = torch.ones((), dtype=torch.float32)
            if ratio_v > 1:
                return torch.stack([one, 1 - torch.tanh(alpha * torch.relu(ratio_v))])
            return torch.stack([1 - torch.tanh(alpha * torch.relu(ratio_a)), one])

    mo.GF = F32()


def run(official_path: str, diag: str = "none") -> dict:
    import gradmod

    if diag == "f32":
        _install_f32()

    off = torch.load(official_path, weights_only=False)
    args = argparse.Namespace(**off["args"])
    assert args.modulation == "OGM", "compare against the deterministic official OGM run"
    model = _official_model(os.environ["OGM_SRC"], args)
    model.load_state_dict(off["init"])
    dp = nn.DataParallel(model)
    opt = torch.optim.SGD(dp.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, 70, 0.1)
    ctx = gradmod.ModulationContext(
        dp,
        encoders={"audio": "audio_net", "visual": "visual_net"},  # audio first: concat order
        method=gradmod.OGMGE(
            alpha=args.alpha,
            params="conv",
            ge=False,
            window=(args.modulation_starts, args.modulation_ends),
        ),
        fusion="fusion_module.fc_out",
    )
    ctx.set_epoch(0)
    criterion = nn.CrossEntropyLoss()
    steps = []
    dp.train()
    for spec, image, label in off["train"]:
        opt.zero_grad()
        a, v, out = dp(spec.unsqueeze(1).float(), image.float())
        loss = criterion(out, label)
        with ctx(features={"audio": a, "visual": v}, targets=label):
            loss.backward()
        st = {k.split(".")[-1]: t for k, t in ctx.state_dict().items()}
        steps.append(
            {"scores": st["last_scores"].tolist(), "coefficients": ctx.coefficients.tolist()}
        )
        opt.step()
    sched.step()
    n_mod = sum(len(ps) for ps in ctx.method.targets(ctx._binding).encoders.values())
    return {
        "final": {k: v.clone() for k, v in model.state_dict().items()},
        "trace": steps,
        "modulated_tensors": n_mod,
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = run(sys.argv[1], sys.argv[3] if len(sys.argv) > 3 else "none")
    torch.save(out, sys.argv[2])
    print(f"gradmod modulated {out['modulated_tensors']} encoder tensors")
    for i, s in enumerate(out["trace"]):
        print(f"gradmod step {i}: {s}")
