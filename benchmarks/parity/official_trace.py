"""Run the OFFICIAL runners (official_cggm_run.py, official_ogm_run.py) unchanged and
record, per training step, the official code's own local variables (coefficients, metrics and,
for CGGM, every model gradient right before clipping) with a line tracer. Tracing reads locals
only; the computation is the runner's, so the final parameters equal the plain runner's output.

    CGGM_SRC=<dir> python official_trace.py cggm OUT.pt [N_STEPS (default 4, the runner's)]
    OGM_SRC=<dir>  python official_trace.py ogm  OUT.pt [OGM|OGM_GE|Normal] [alpha]
TOOLS_DIR (default: this folder) locates the runners.
"""

from __future__ import annotations

import importlib.util
import linecache
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TOOLS = os.environ.get("TOOLS_DIR", HERE)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(TOOLS, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def _tracer(func: str, file_end: str, on_line):
    def local(frame, event, arg):
        if event == "line":
            text = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
            on_line(text, frame.f_locals, frame.f_lineno)
        return local

    def glob(frame, event, arg):
        if frame.f_code.co_name == func and frame.f_code.co_filename.endswith(file_end):
            return local
        return None

    return glob


def trace_cggm(out_path: str, n_train: int = 4) -> None:
    runner = _load("official_cggm_run")
    steps: list[dict] = []

    def on_line(text, loc, lineno):
        if text.startswith("cls_optimizer.step()"):  # msatrain.py:124, after coeff / l_gm / scaling
            steps.append(
                {
                    "acc": [float(a) for a in loc["acc2"]],
                    "diff": [float(d) for d in loc["diff"]],
                    "B": [float(c) for c in loc["coeff"]],
                    "cos": [float(c) for c in loc["llist"]],
                    "l_gm": float(loc["l_gm"]),
                }
            )
        elif text.startswith("torch.nn.utils.clip_grad_norm_"):  # :126, modulated, unclipped
            model = loc["model"]
            steps[-1]["grads"] = {
                n: p.grad.detach().clone()
                for n, p in model.named_parameters()
                if p.grad is not None
            }

    sys.settrace(_tracer("train", os.path.join("src", "msatrain.py"), on_line))
    try:
        out = runner.run(os.environ["CGGM_SRC"], n_train=n_train)
    finally:
        sys.settrace(None)
    out["trace"] = steps
    torch.save(out, out_path)
    for i, s in enumerate(steps):
        print(f"official step {i}: acc={s['acc']} B={s['B']} l_gm={s['l_gm']:.6g}")


def trace_ogm(out_path: str, modulation: str, alpha: float) -> None:
    runner = _load("official_ogm_run")
    steps: list[dict] = []

    def on_line(text, loc, lineno):
        if text == "optimizer.step()" and "coeff_a" in loc:  # main.py:153
            steps.append(
                {
                    "score_a": float(loc["score_a"]),
                    "score_v": float(loc["score_v"]),
                    "coeff_a": float(loc["coeff_a"]),
                    "coeff_v": float(loc["coeff_v"]),
                }
            )

    sys.settrace(_tracer("train_epoch", "main.py", on_line))
    try:
        out = runner.run(os.environ["OGM_SRC"], modulation, alpha)
    finally:
        sys.settrace(None)
    out["trace"] = steps
    torch.save(out, out_path)
    for i, s in enumerate(steps):
        print(f"official step {i}: {s}")


if __name__ == "__main__":
    which, path = sys.argv[1], sys.argv[2]
    if which == "cggm":
        trace_cggm(path, int(sys.argv[3]) if len(sys.argv) > 3 else 4)
    else:
        mod = sys.argv[3] if len(sys.argv) > 3 else "OGM"
        alpha = float(sys.argv[4]) if len(sys.argv) > 4 else 0.8
        trace_ogm(path, mod, alpha)
