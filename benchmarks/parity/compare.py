"""Compare an official run (official_trace.py output) with a gradmod counterpart run, tensor by
tensor: max abs / max relative difference of the final parameters, tensors matching to 1e-6 and
1e-4 (max abs diff <= tol), the worst tensors, and per-step coefficients (and, where both sides
recorded them, per-step pre-clip gradients).

    python compare.py cggm OFFICIAL.pt GRADMOD.pt
    python compare.py ogm  OFFICIAL.pt GRADMOD.pt
"""

from __future__ import annotations

import sys

import torch

SKIP = ("._float_tensor", ".version")  # CGGM: an uninitialised dtype-carrier buffer; a constant


def kbias_masked(a: dict, embed: int = 40) -> dict:
    """Copies with the key-bias slice of every in_proj_bias zeroed: its gradient is
    mathematically 0 (softmax is invariant to a constant key bias), so Adam turns float noise
    there into lr-sized steps on both sides."""
    out = {}
    for k, v in a.items():
        if k.endswith("in_proj_bias"):
            v = v.clone()
            v[embed : 2 * embed] = 0
        out[k] = v
    return out


def table(a: dict, b: dict, label: str, show: int = 6, floats_only: bool = True) -> dict:
    rows = []
    for k, va in a.items():
        if k.endswith(SKIP):
            continue
        vb = b[k]
        if floats_only and not va.is_floating_point():
            same = torch.equal(va, vb)
            rows.append(
                (k, 0.0 if same else float("inf"), 0.0 if same else float("inf"), va.numel())
            )
            continue
        d = (va.double() - vb.double()).abs()
        mad = float(d.max()) if d.numel() else 0.0
        rel = float((d / va.double().abs().clamp_min(1e-12)).max()) if d.numel() else 0.0
        rows.append((k, mad, rel, va.numel()))
    n = len(rows)
    m6 = sum(r[1] <= 1e-6 for r in rows)
    m4 = sum(r[1] <= 1e-4 for r in rows)
    exact = sum(r[1] == 0 for r in rows)
    worst = sorted(rows, key=lambda r: -r[1])[:show]
    mad = max(r[1] for r in rows)
    print(
        f"[{label}] {n} tensors: bit-identical {exact}, |diff|<=1e-6: {m6}, |diff|<=1e-4: {m4}; "
        f"max abs diff {mad:.3e}, max rel diff {max(r[2] for r in rows):.3e}"
    )
    for k, a_, r_, ne in worst:
        print(f"    {k:60s} abs {a_:.3e} rel {r_:.3e} (numel {ne})")
    return {"n": n, "exact": exact, "m6": m6, "m4": m4, "max_abs": mad}


def moved(init: dict, final: dict) -> float:
    return max(
        float((final[k].double() - v.double()).abs().max())
        for k, v in init.items()
        if v.is_floating_point() and v.numel()
    )


def cggm(off: dict, gm: dict) -> None:
    print(
        f"largest official parameter move over the run: {moved(off['model_init'], off['model_final']):.3e}"
    )
    table(off["model_final"], gm["model_final"], "model final")
    table(off["cls_final"], gm["cls_final"], "classifiers final")
    table(
        kbias_masked(off["model_final"]),
        kbias_masked(gm["model_final"]),
        "model final, key-bias slices excluded",
        show=3,
    )
    table(
        kbias_masked(off["cls_final"]),
        kbias_masked(gm["cls_final"]),
        "classifiers final, key-bias slices excluded",
        show=3,
    )
    for i, (so, sg) in enumerate(zip(off["trace"], gm["trace"], strict=True)):
        print(f"step {i}: acc official {so['acc']} gradmod {sg['acc']}")
        print(f"        B official {so['B']}")
        print(f"        B gradmod  {sg['B']}")
        if "grads" in so and "grads" in sg:
            table(so["grads"], sg["grads"], f"step {i} pre-clip grads", show=4)


def ogm(off: dict, gm: dict) -> None:
    print(f"largest official parameter move over the run: {moved(off['init'], off['final']):.3e}")
    table(off["final"], gm["final"], "model final (params + BN buffers)")
    for i, (so, sg) in enumerate(zip(off["trace"], gm["trace"], strict=True)):
        print(
            f"step {i}: official s_a={so['score_a']:.8f} s_v={so['score_v']:.8f} "
            f"k_a={so['coeff_a']:.8f} k_v={so['coeff_v']:.8f}"
        )
        print(
            f"        gradmod  s_a={sg['scores'][0]:.8f} s_v={sg['scores'][1]:.8f} "
            f"k_a={sg['coefficients'][0]:.8f} k_v={sg['coefficients'][1]:.8f}"
        )


if __name__ == "__main__":
    which = sys.argv[1]
    off = torch.load(sys.argv[2], weights_only=False)
    gm = torch.load(sys.argv[3], weights_only=False)
    (cggm if which == "cggm" else ogm)(off, gm)
