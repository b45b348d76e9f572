"""gradmod-side counterpart of official_cggm_run.py: the SAME official MSAModel and
ClassifierGuided classes (imported from CGGM_SRC), the runner's saved initial weights and batches,
the official loop's optimizers (Adam 1e-3 / classifier Adam 5e-4), L1 loss and clip 0.8, with the
modulation done by gradmod.CGGM(official=True, rho=1.3, lam=0.2, task="regression") and the
official classifiers as gradmod's classifiers. Records per-step coefficients and the model
gradients right before clipping (the official trace records the same point).

    CGGM_SRC=<dir> PYTHONPATH=<gradmod checkout> python gradmod_cggm_run.py OFFICIAL.pt OUT.pt
"""

from __future__ import annotations

import importlib
import os
import sys
import types

import torch
import torch.nn as nn


def _stub_if_missing(name: str, attrs: dict) -> str | None:
    try:
        importlib.import_module(name)
        return None
    except ImportError:
        mod = types.ModuleType(name)
        for k, v in attrs.items():
            setattr(mod, k, v)
        sys.modules[name] = mod
        return name


def _official_classes(src: str):
    # eval_metrics imports sklearn and einops at module level; neither is used by the model
    # classes' forward, so stub them (only during the import) when the interpreter lacks them.
    stubs = [
        _stub_if_missing("sklearn", {}),
        _stub_if_missing("sklearn.metrics", {"accuracy_score": None, "f1_score": None}),
        _stub_if_missing("einops", {"rearrange": None}),
    ]
    sys.path.insert(0, src)
    from models.msamodel import ClassifierGuided, MSAModel  # type: ignore

    for name in stubs:
        if name is not None:
            del sys.modules[name]
    return MSAModel, ClassifierGuided


def run(official_path: str) -> dict:
    import gradmod

    off = torch.load(official_path, weights_only=False)
    hp = types.SimpleNamespace(**off["hyper"])
    MSAModel, ClassifierGuided = _official_classes(os.environ["CGGM_SRC"])
    model = MSAModel(
        hp.output_dim,
        hp.orig_dim,
        hp.proj_dim,
        hp.num_heads,
        hp.layers,
        hp.relu_dropout,
        hp.embed_dropout,
        hp.res_dropout,
        hp.out_dropout,
        hp.attn_dropout,
    )
    classifier = ClassifierGuided(
        hp.output_dim,
        hp.num_mod,
        hp.proj_dim,
        hp.num_heads,
        hp.cls_layers,
        hp.relu_dropout,
        hp.embed_dropout,
        hp.res_dropout,
        hp.attn_dropout,
    )
    model.load_state_dict(off["model_init"])
    classifier.load_state_dict(off["cls_init"])
    cls_opt = getattr(torch.optim, hp.optim)(classifier.parameters(), lr=hp.cls_lr)
    opt = getattr(torch.optim, hp.optim)(model.parameters(), lr=hp.lr)
    criterion = getattr(nn, hp.criterion)()

    names = ("text", "audio", "vision")
    ctx = gradmod.ModulationContext(
        model,
        {n: classifier.classifers[i] for i, n in enumerate(names)},
        encoders={n: f"encoders.{i}" for i, n in enumerate(names)},
        method=gradmod.CGGM(official=True, rho=hp.rou, lam=hp.lamda, task="regression"),
        fusion="out_layer",
    )
    steps = []
    model.train()
    for batch in off["train"]:
        text, audio, vision, y = batch["text"], batch["audio"], batch["vision"], batch["labels"]
        eval_attr = y.squeeze(-1)
        model.zero_grad()
        preds, hs = model([text, audio, vision])
        loss = criterion(preds, eval_attr)
        cls_opt.zero_grad()
        with ctx(features=dict(zip(names, hs, strict=True)), targets=eval_attr):
            loss.backward()
        st = ctx.state_dict()
        method_state = {k.split(".")[-1]: v for k, v in st.items() if torch.is_tensor(v)}
        steps.append(
            {
                "acc": method_state["previous"].tolist(),
                "B": method_state["last_b"].tolist(),
                "coefficients": ctx.coefficients.tolist(),
                "grads": {
                    n: p.grad.detach().clone()
                    for n, p in model.named_parameters()
                    if p.grad is not None
                },
            }
        )
        cls_opt.step()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp.clip)
        opt.step()
    return {
        "model_final": {n: p.clone() for n, p in model.state_dict().items()},
        "cls_final": {n: p.clone() for n, p in classifier.state_dict().items()},
        "trace": steps,
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    if len(sys.argv) != 3:
        sys.exit("usage: python gradmod_cggm_run.py OFFICIAL.pt OUT.pt")
    out = run(sys.argv[1])
    torch.save(out, sys.argv[2])
    for i, s in enumerate(out["trace"]):
        print(f"gradmod step {i}: acc={s['acc']} B={s['B']}")
