"""OGM-GE, AGM, MLB and plain multi-loss through the hook engine, against float64 references.

Every reference is computed here, on float64 CPU copies of the model, by plain autograd and the
rules written out in ``_refs.py``; gradmod runs in the suite's device and dtype.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Mapping, Sequence

import pytest
import torch
import torch.nn.functional as F
from _models import hook_count
from _refs import agm_k, agm_score, cosine, mlb_gated_k, mlb_k, ogm_k, shapley, softmax_true
from settings import ATOL, DEVICE, DTYPE, RTOL
from torch import Tensor, nn

import gradmod

F64 = torch.float64
FEAT, CLASSES = 4, 3
ALL_DIMS = {"a": 5, "b": 4, "c": 3, "d": 2, "e": 2}


class LinNet(nn.Module):
    """MLP encoders ``enc.<name>``, concatenation, one linear fusion head ``head``."""

    def __init__(self, names: Sequence[str], *, out: int = CLASSES) -> None:
        super().__init__()
        self.names = tuple(names)
        self.enc = nn.ModuleDict(
            {
                n: nn.Sequential(nn.Linear(ALL_DIMS[n], 6), nn.Tanh(), nn.Linear(6, FEAT))
                for n in self.names
            }
        )
        self.head = nn.Linear(FEAT * len(self.names), out)

    def features(self, xs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {n: self.enc[n](xs[n]) for n in self.names}

    def fuse(self, feats: Mapping[str, Tensor]) -> Tensor:
        return self.head(torch.cat([feats[n] for n in self.names], dim=1))


def make(names: Sequence[str] = ("a", "b", "c"), out: int = CLASSES, seed: int = 0) -> LinNet:
    torch.manual_seed(seed)
    return LinNet(names, out=out).to(DEVICE, DTYPE)


def linear_heads(names: Sequence[str], out: int = CLASSES) -> dict[str, nn.Module]:
    torch.manual_seed(5)
    return {n: nn.Linear(FEAT, out).to(DEVICE, DTYPE) for n in names}


def deep_heads(names: Sequence[str]) -> dict[str, nn.Module]:
    """Heads ending in a [CLASSES, FEAT * M] weight, the fusion head's shape (direction loss)."""
    torch.manual_seed(6)
    m = len(names)
    return {
        n: nn.Sequential(nn.Linear(FEAT, FEAT * m), nn.Tanh(), nn.Linear(FEAT * m, CLASSES)).to(
            DEVICE, DTYPE
        )
        for n in names
    }


def data(names: Sequence[str], n: int = 24, seed: int = 3, regression: bool = False):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    xs = {k: torch.randn(n, ALL_DIMS[k], generator=g, dtype=F64) for k in names}
    if regression:
        y = torch.randn(n, 1, generator=g, dtype=F64)
    else:
        y = torch.randint(0, CLASSES, (n,), generator=g)
    return xs, y


def dev(xs: Mapping[str, Tensor], y: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    yy = y.to(DEVICE, DTYPE) if y.is_floating_point() else y.to(DEVICE)
    return {k: v.to(DEVICE, DTYPE) for k, v in xs.items()}, yy


def f64(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).to("cpu", F64)


def close(actual: Tensor | None, expected: Tensor, what: str) -> None:
    assert actual is not None, what
    torch.testing.assert_close(
        actual.detach().to("cpu", F64), expected.to(F64), rtol=RTOL, atol=ATOL, msg=what
    )


def enc_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "enc" else None


def ctx_for(
    model: LinNet,
    method: gradmod.Method,
    heads: Mapping[str, nn.Module] | None = None,
    **kw: object,
) -> gradmod.ModulationContext:
    return gradmod.ModulationContext(
        model,
        dict(heads) if heads is not None else None,
        encoders={n: f"enc.{n}" for n in model.names},
        method=method,
        **kw,  # type: ignore[arg-type]
    )


def all_tensors(model: nn.Module, heads: Mapping[str, nn.Module] | None = None) -> list[Tensor]:
    return [*model.parameters(), *(p for h in (heads or {}).values() for p in h.parameters())]


# ================================================================ multi-loss and MLB
def multiloss_reference(
    model: LinNet,
    heads: Mapping[str, nn.Module],
    xs: Mapping[str, Tensor],
    y: Tensor,
    *,
    alpha: float | None,
    official: bool,
    direction: float = 0.0,
    regression: bool = False,
) -> tuple[list[float], dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """k, model gradients and head gradients of one MLB (alpha given) or multi-loss step."""
    m64 = f64(model)
    h64 = {n: f64(h) for n, h in heads.items()}
    names = model.names
    feats = m64.features(xs)  # type: ignore[operator]
    out = m64.fuse(feats)  # type: ignore[operator]
    if regression:
        loss = F.mse_loss(out, y)
        uni = [F.mse_loss(h64[n](feats[n]), y) for n in names]
        scores = [float(((h64[n](feats[n]) - y) ** 2).mean().detach()) for n in names]
    else:
        loss = F.cross_entropy(out, y)
        uni = [F.cross_entropy(h64[n](feats[n]), y) for n in names]
        scores = [sum(softmax_true(h64[n](feats[n]), y)) / len(y) for n in names]
    k = mlb_k(scores, alpha, higher=not regression) if alpha is not None else [1.0] * len(names)
    (loss + sum(uni)).backward()
    kk = dict(zip(names, k, strict=True))
    grads = {}
    for pn, p in m64.named_parameters():
        g = p.grad.clone()
        if enc_of(pn) is not None:
            g = g * kk[enc_of(pn)]  # type: ignore[index]
        grads[pn] = g
    if direction:
        u = m64.head.weight.detach().clone().requires_grad_(True)  # type: ignore[union-attr]
        terms = [
            abs(km) - km * cosine(u, list(h64[n].parameters())[-2].detach())
            for km, n in zip(k, names, strict=True)
        ]
        (g_u,) = torch.autograd.grad(direction * torch.stack(terms).mean(), u)
        grads["head.weight"] = grads["head.weight"] + g_u
    if official:
        w = grads["head.weight"]
        grads["head.weight"] = torch.cat(
            [blk * kk[n] for blk, n in zip(w.split(FEAT, dim=1), names, strict=True)], dim=1
        )
    head_grads = {
        n: {pn: p.grad * (kk[n] if official else 1.0) for pn, p in h64[n].named_parameters()}
        for n in names
    }
    return k, grads, head_grads


@pytest.mark.parametrize(
    "variant", ["multiloss", "mlb", "mlb-official", "mlb+direction", "mlb-regression"]
)
@pytest.mark.parametrize("mode", ["parameter", "feature"])
def test_multiloss_and_mlb_match_naive_reference(variant: str, mode: str) -> None:
    names = ("a", "b", "c")
    regression = variant == "mlb-regression"
    model = make(names, out=1 if regression else CLASSES)
    heads = (
        deep_heads(names)
        if variant == "mlb+direction"
        else linear_heads(names, out=1 if regression else CLASSES)
    )
    alpha = None if variant == "multiloss" else 0.8
    official = variant == "mlb-official"
    direction = 0.2 if variant == "mlb+direction" else 0.0
    if alpha is None:
        method: gradmod.Method = gradmod.MultiLoss()
    else:
        method = gradmod.MLB(
            alpha=alpha,
            scale="official" if official else "encoder",
            direction=direction,
            task="regression" if regression else "classification",
        )
    fusion = "head" if (official or direction) else None
    ctx = ctx_for(model, method, heads, mode=mode, fusion=fusion)
    opt = torch.optim.SGD([*model.parameters(), *ctx.classifier_parameters()], lr=0.3)
    for step in range(2):  # a second step after an update: nothing cached from the first
        xs, y = data(names, seed=10 + step, regression=regression)
        k_ref, g_ref, h_ref = multiloss_reference(
            model,
            heads,
            xs,
            y,
            alpha=alpha,
            official=official,
            direction=direction,
            regression=regression,
        )
        xd, yd = dev(xs, y)
        feats = model.features(xd)
        out = model.fuse(feats)
        loss = F.mse_loss(out, yd) if regression else F.cross_entropy(out, yd)
        with ctx(features=feats, targets=yd):
            loss.backward()
        close(ctx.coefficients, torch.tensor(k_ref, dtype=F64), f"{step} k")
        for pn, p in model.named_parameters():
            close(p.grad, g_ref[pn], f"step {step} {pn}")
        for n in names:
            for pn, p in heads[n].named_parameters():
                close(p.grad, h_ref[n][pn], f"step {step} heads[{n}].{pn}")
        if alpha is not None:  # the data is not degenerate: the modalities differ
            assert max(k_ref) - min(k_ref) > 1e-3
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("form", ["soft-labels", "per-frame"])
def test_multiloss_leaves_the_targets_form_to_its_loss(form: str) -> None:
    """Targets that cross_entropy takes (soft labels [B, C]; per-frame indices [B, T] with
    head outputs [B, C, T]) are the heads' loss's to check: taken, with one entry per sample;
    the heads' gradients are those of that loss (plain autograd, float64)."""
    names = ("a", "b")
    model = make(names).to(F64)
    width = model.enc["a"][-1].out_features
    frames = 5

    class PerFrame(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(width, CLASSES * frames)

        def forward(self, x: Tensor) -> Tensor:
            return self.lin(x).view(x.shape[0], CLASSES, frames)

    heads: dict[str, nn.Module] = {
        n: (nn.Linear(width, CLASSES) if form == "soft-labels" else PerFrame()).to(DEVICE, F64)
        for n in names
    }
    twins = copy.deepcopy(heads)
    ctx = ctx_for(model, gradmod.MultiLoss(), heads)
    xs, y = dev(*data(names))
    g = torch.Generator().manual_seed(2)
    if form == "soft-labels":
        t = torch.softmax(torch.randn(y.shape[0], CLASSES, generator=g, dtype=F64), 1)
    else:
        t = torch.randint(0, CLASSES, (y.shape[0], frames), generator=g)
    t = t.to(DEVICE)
    feats = model.features({k: v.to(F64) for k, v in xs.items()})
    with ctx(features=feats, targets=t):
        sum(f.sum() for f in feats.values()).backward()
    for n in names:
        F.cross_entropy(twins[n](feats[n].detach()), t).backward()
        for p, q in zip(heads[n].parameters(), twins[n].parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
    again = model.features({k: v.to(F64) for k, v in xs.items()})
    with (
        pytest.raises(gradmod.StepError, match="one entry per sample"),
        ctx(features=again, targets=t[:-1]),
    ):
        pass  # pragma: no cover


def test_multiloss_refuses_a_feature_outside_the_loss() -> None:
    names = ("a", "b")
    model, heads = make(names), linear_heads(names)
    ctx = ctx_for(model, gradmod.MultiLoss(), heads)
    xs, y = dev(*data(names))
    feats = model.features(xs)
    loss = F.cross_entropy(model.head(torch.cat([feats["a"], feats["a"]], 1)), y)  # b unused
    lost = pytest.raises(gradmod.StepError, match=r"features\['b'\] \(unimodal loss\) received no")
    with lost, ctx(features=feats, targets=y):
        loss.backward()
    assert hook_count(all_tensors(model, heads)) == 0
    # nothing of the lost step was applied: no head gradient, no state change
    assert all(p.grad is None for h in heads.values() for p in h.parameters())
    assert int(ctx.method.steps) == 0  # type: ignore[arg-type]


def test_multiloss_needs_live_features() -> None:
    names = ("a", "b")
    model, heads = make(names), linear_heads(names)
    ctx = ctx_for(model, gradmod.MLB(), heads)
    xs, y = dev(*data(names))
    feats = {n: f.detach() for n, f in model.features(xs).items()}
    with pytest.raises(gradmod.StepError, match="not attached to the autograd graph"):
        ctx(features=feats, targets=y).__enter__()
    assert int(ctx.method.steps) == 0 and hook_count(all_tensors(model, heads)) == 0


def test_mlb_configuration_errors() -> None:
    names = ("a", "b")
    model = make(names)
    with pytest.raises(gradmod.ConfigurationError) as ei:
        ctx_for(model, gradmod.MLB(scale="official", direction=0.1))
    problems = ei.value.problems
    assert any("needs one unimodal classifier" in p for p in problems)
    with pytest.raises(gradmod.ConfigurationError) as ei:
        ctx_for(model, gradmod.MLB(scale="official", direction=0.1), linear_heads(names))
    problems = ei.value.problems
    assert len(problems) == 2, problems
    assert any("one nn.Linear over the concatenated features" in p for p in problems)
    assert any("direction loss needs the fusion head" in p for p in problems)
    with pytest.raises(ValueError, match="alpha"):
        gradmod.MLB(alpha=0)
    with pytest.raises(ValueError, match="scale"):
        gradmod.MLB(scale="all")  # type: ignore[arg-type]


@pytest.mark.parametrize("gate", ["boost", "both"])
def test_gated_mlb_reads_chance_off_the_batch_labels(gate: str) -> None:
    """Chance = sum_c pi_c^2 estimated without bias from the batch's label counts (imbalanced
    here): sum n_c (n_c - 1) / (n (n - 1)); the gate as specified (``_refs.mlb_gated_k``), the
    heads' scores from a float64 loop."""
    names = ("a", "b", "c")
    model, heads = make(names), linear_heads(names)
    ctx = ctx_for(model, gradmod.MLB(alpha=0.8, gate=gate), heads)  # type: ignore[arg-type]
    xs, _ = data(names)
    y = torch.tensor([0] * 14 + [1] * 7 + [2] * 3)
    head_opt = torch.optim.Adam([p for h in heads.values() for p in h.parameters()], lr=0.05)
    with torch.no_grad():
        fixed = model.features(dev(xs, y)[0])
    for _ in range(30):  # heads above chance (untrained heads score ~1/3 < chance ~0.44)
        loss = sum(F.cross_entropy(heads[n](fixed[n]), y.to(DEVICE)) for n in names)
        head_opt.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        head_opt.step()
    m64, h64 = f64(model), {n: f64(h) for n, h in heads.items()}
    feats64 = m64.features(xs)  # type: ignore[operator]
    scores = [sum(softmax_true(h64[n](feats64[n]).detach(), y)) / len(y) for n in names]
    n = len(y)
    chance = sum(c * (c - 1) for c in (14, 7, 3)) / (n * (n - 1))  # unbiased sum of pi_c^2
    xd, yd = dev(xs, y)
    feats = model.features(xd)
    with ctx(features=feats, targets=yd):
        F.cross_entropy(model.fuse(feats), yd).backward()
    close(ctx.coefficients, torch.tensor(mlb_gated_k(scores, 0.8, chance, gate)), "k")
    plain = gradmod.functional.mlb_coefficients(torch.tensor(scores, dtype=F64), alpha=0.8)
    assert float((plain - ctx.coefficients.cpu()).abs().max()) > 1e-3  # the gate acted


def test_mlb_official_width_mismatch_is_a_step_error_before_anything() -> None:
    names = ("a", "b")
    model, heads = make(names), linear_heads(names)
    ctx = ctx_for(model, gradmod.MLB(scale="official"), heads, fusion="head")
    xs, y = dev(*data(names))
    feats = model.features(xs)
    feats["b"] = feats["b"][:, :2]
    with pytest.raises(gradmod.StepError, match="add up to 6"):
        ctx(features=feats, targets=y).__enter__()
    assert int(ctx.method.steps) == 0


# ======================================================================== OGM-GE
def ogm_reference(
    model: LinNet,
    xs: Mapping[str, Tensor],
    y: Tensor,
    alpha: float,
    sum_heads=None,  # type: ignore[no-untyped-def]
) -> tuple[list[float], dict[str, Tensor]]:
    m64 = f64(model)
    names = model.names
    feats = m64.features(xs)  # type: ignore[operator]
    if not sum_heads:
        w, b = m64.head.weight, m64.head.bias  # type: ignore[union-attr]
        z = {
            n: feats[n] @ w[:, i * FEAT : (i + 1) * FEAT].T + b / len(names)
            for i, n in enumerate(names)
        }
        out = m64.fuse(feats)  # type: ignore[operator]
    else:
        z = {n: m64.parts[n](feats[n]) for n in names}  # type: ignore[index]
        out = sum(z.values())
    scores = [sum(softmax_true(z[n].detach(), y)) for n in names]
    k = ogm_k(scores, alpha)
    F.cross_entropy(out, y).backward()
    kk = dict(zip(names, k, strict=True))
    grads = {
        pn: p.grad * (kk[enc_of(pn)] if enc_of(pn) else 1.0)  # type: ignore[index]
        for pn, p in m64.named_parameters()
        if p.grad is not None
    }
    return k, grads


@pytest.mark.parametrize("names", [("a", "b"), ("a", "b", "c")], ids=["M2", "M3"])
@pytest.mark.parametrize("mode", ["parameter", "feature"])
def test_ogm_without_noise_matches_naive_reference(names: tuple[str, ...], mode: str) -> None:
    model = make(names)
    ctx = ctx_for(model, gradmod.OGMGE(alpha=0.8, ge=False), fusion="head", mode=mode)
    xs, y = data(names)
    k_ref, g_ref = ogm_reference(model, xs, y, 0.8)
    xd, yd = dev(xs, y)
    feats = model.features(xd)
    with ctx(features=feats, targets=yd):
        F.cross_entropy(model.fuse(feats), yd).backward()
    close(ctx.coefficients, torch.tensor(k_ref, dtype=F64), "k")
    assert sum(k < 1 for k in k_ref) >= 1  # someone is slowed
    for pn, p in model.named_parameters():
        close(p.grad, g_ref[pn], pn)


class SumNet(LinNet):
    """A "sum" fusion head: one linear per modality, logits added."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__(names)
        self.parts = nn.ModuleDict({n: nn.Linear(FEAT, CLASSES) for n in names})

    def fuse(self, feats: Mapping[str, Tensor]) -> Tensor:
        return sum(self.parts[n](feats[n]) for n in self.names)  # type: ignore[return-value]


def test_ogm_sum_head_reads_its_parts() -> None:
    names = ("a", "b", "c")
    torch.manual_seed(0)
    model = SumNet(names).to(DEVICE, DTYPE)
    parts = dict(model.parts)
    ctx = ctx_for(model, gradmod.OGMGE(alpha=0.5, ge=False), parts)  # type: ignore[arg-type]
    assert ctx.classifier_parameters() == []  # the parts belong to the model
    xs, y = data(names)
    k_ref, g_ref = ogm_reference(model, xs, y, 0.5, sum_heads=True)
    xd, yd = dev(xs, y)
    feats = model.features(xd)
    with ctx(features=feats, targets=yd):
        F.cross_entropy(model.fuse(feats), yd).backward()
    close(ctx.coefficients, torch.tensor(k_ref, dtype=F64), "k")
    for pn, p in model.named_parameters():
        if pn.startswith("head."):
            assert p.grad is None  # the unused concat head
            continue
        close(p.grad, g_ref[pn], pn)


@pytest.mark.parametrize("method", ["ogm", "opm"])
def test_sum_head_parts_read_bf16_features_from_autocast(method: str) -> None:
    """bfloat16 features (an autocast forward) and float32 parts of a sum head: each part reads
    its feature cast to its own dtype, as ``nn.Linear`` fusion heads do (was a dtype error)."""
    if torch.float32 != DTYPE:
        pytest.skip("autocast over a float32 model")
    names = ("a", "b", "c")
    torch.manual_seed(0)
    model = SumNet(names).to(DEVICE, DTYPE)
    parts = dict(model.parts)
    m: gradmod.Method = gradmod.OGMGE(alpha=0.5, ge=False) if method == "ogm" else gradmod.OPM()
    ctx = ctx_for(model, m, parts)  # type: ignore[arg-type]
    xs, y = data(names)
    xd, yd = dev(xs, y)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        feats = model.features(xd)
    assert all(f.dtype == torch.bfloat16 for f in feats.values())
    # by hand: each part on its feature in float32, the summed true-class probabilities
    with torch.no_grad():
        s = [sum(softmax_true(parts[n](feats[n].float()).double().cpu(), y)) for n in names]
    fused = ctx.prepare(feats, yd) if method == "opm" else feats
    with ctx(features=feats, targets=yd):
        F.cross_entropy(model.fuse({n: f.float() for n, f in fused.items()}), yd).backward()
    got = ctx.scores["true_class_probability_sum"].cpu()
    torch.testing.assert_close(got, torch.tensor(s, dtype=F64), rtol=1e-6, atol=1e-6)
    if method == "ogm":
        close(ctx.coefficients, torch.tensor(ogm_k(s, 0.5), dtype=F64), "k")


class WideNet(LinNet):
    """Two wide encoders, so that noise statistics over one weight are tight."""

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.names = ("a", "b")
        self.enc = nn.ModuleDict(
            {n: nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, FEAT)) for n in "ab"}
        )
        self.head = nn.Linear(2 * FEAT, CLASSES)


def wide_batch(seed: int = 0) -> tuple[dict[str, Tensor], Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = {n: torch.randn(32, 64, generator=g, dtype=F64) for n in "ab"}
    xs["a"] = xs["a"] * 3.0  # modality a dominates
    return dev(xs, torch.randint(0, CLASSES, (32,), generator=g))


def wide_step(
    model: WideNet,
    ctx: gradmod.ModulationContext | None,
    batches: int = 1,
    scaler=None,  # type: ignore[no-untyped-def]
) -> list[dict[str, Tensor]]:
    """``batches`` micro-batches of the same data; returns the grads after each backward."""
    xs, y = wide_batch()
    after = []
    for i in range(batches):
        feats = model.features(xs)
        loss = F.cross_entropy(model.fuse(feats), y)
        if scaler is not None:
            loss = scaler.scale(loss)
        if ctx is None:
            loss.backward()
        else:
            with ctx(features=feats, targets=y, boundary=i == batches - 1):
                loss.backward()
        after.append({pn: p.grad.detach().clone() for pn, p in model.named_parameters()})
    return after


def wide() -> tuple[WideNet, WideNet]:
    torch.manual_seed(0)
    model = WideNet().to(DEVICE, DTYPE)
    return model, copy.deepcopy(model)


def noise_of(model: WideNet, twin: WideNet, ctx: gradmod.ModulationContext, batches: int = 1):  # type: ignore[no-untyped-def]
    """Noise = gradmod's gradient minus k * the plain gradient of the twin, per tensor."""
    got = wide_step(model, ctx, batches)[-1]
    plain = wide_step(twin, None, batches)[-1]
    k = dict(zip(ctx.names, ctx.coefficients.tolist(), strict=True))
    return (
        {
            pn: (got[pn].double() - plain[pn].double() * k[enc_of(pn)], plain[pn].double())  # type: ignore[index]
            for pn in got
            if enc_of(pn)
        },
        got,
        plain,
    )


def test_ge_noise_statistics_with_a_fixed_seed() -> None:
    model, twin = wide()
    ctx = ctx_for(model, gradmod.OGMGE(alpha=0.5, seed=1234), fusion="head")
    noises, got, plain = noise_of(model, twin, ctx)
    k = ctx.coefficients.tolist()
    assert k[0] < 1 and k[1] == 1.0  # a dominates and is slowed; GE applies to both
    checked = 0
    for pn, (noise, g) in noises.items():
        n = noise.numel()
        expected_std = float(g.std()) + 1e-8
        if n >= 1000:
            assert abs(float(noise.mean())) < 5 * expected_std / math.sqrt(n), pn
            assert float(noise.std()) == pytest.approx(expected_std, rel=0.06), pn
            checked += 1
        # the noise is never larger than ~6 std anywhere
        assert float(noise.abs().max()) < 7 * expected_std + 1e-6, pn
    assert checked == 4
    # parameters outside the encoders: untouched
    torch.testing.assert_close(got["head.weight"], plain["head.weight"], rtol=0, atol=0)


def test_ge_noise_is_reproducible_and_seeded() -> None:
    runs = []
    for seed in (7, 7, 8):
        model, _ = wide()
        ctx = ctx_for(model, gradmod.OGMGE(alpha=0.5, seed=seed), fusion="head")
        runs.append(wide_step(model, ctx)[-1])
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not torch.equal(runs[0]["enc.a.0.weight"], runs[2]["enc.a.0.weight"])
    # different tensors and different steps draw different noise
    model, _ = wide()
    ctx = ctx_for(model, gradmod.OGMGE(alpha=0.5, seed=7), fusion="head")
    first = wide_step(model, ctx)[-1]
    model.zero_grad()
    second = wide_step(model, ctx)[-1]
    assert not torch.equal(first["enc.a.0.weight"], second["enc.a.0.weight"])


def test_ge_noise_is_the_documented_draw_whatever_the_hook_order() -> None:
    """Recomputed from the documented rule: modality m's noise is ONE standard normal draw from
    a generator seeded by hash((seed, optimizer step, m)) % 2**63, laid out over its tensors in
    parameter order, each slice times (std(g) + 1e-8). The layout, not the order in which the
    hooks fire, decides each tensor's slice."""
    model, twin = wide()
    ctx = ctx_for(model, gradmod.OGMGE(alpha=0.5, seed=21), fusion="head")
    noises, _, _ = noise_of(model, twin, ctx)
    dtype = DTYPE if DTYPE in (torch.float16, torch.bfloat16) else torch.float32
    for m, name in enumerate(ctx.names):
        params = [(pn, p) for pn, p in model.named_parameters() if enc_of(pn) == name]
        gen = torch.Generator(device=DEVICE).manual_seed(hash((21, 1, m)) % 2**63)
        total = sum(p.numel() for _, p in params)
        flat = torch.randn(total, generator=gen, device=DEVICE, dtype=dtype).double()
        start = 0
        for pn, p in params:
            noise, g = noises[pn]
            z = flat[start : start + p.numel()].view(p.shape)
            start += p.numel()
            expected = z * (float(g.std()) + 1e-8)
            # got - k * plain: the roundings of k * g, of the sum and of the noise's own dtype
            rel = max(RTOL, 1e-6)
            tol = (float(g.abs().max()) + float(expected.abs().max())) * rel * 4
            assert float((noise - expected).abs().max()) <= tol + ATOL, pn


def test_ge_noise_once_per_optimizer_step_with_the_accumulated_std() -> None:
    model, twin = wide()
    ctx = ctx_for(model, gradmod.OGMGE(alpha=0.5, seed=3), fusion="head")
    xs_grads = wide_step(copy.deepcopy(twin), None, 1)[-1]
    noises, _, _ = noise_of(model, twin, ctx, batches=2)
    # after the first micro-batch (boundary=False): k * g exactly, no noise yet
    model2, _ = wide()
    ctx2 = ctx_for(model2, gradmod.OGMGE(alpha=0.5, seed=3), fusion="head")
    first = wide_step(model2, ctx2, 2)[0]
    k = dict(zip(ctx2.names, ctx2.coefficients.tolist(), strict=True))
    for pn, g in first.items():
        if enc_of(pn):
            close(g, xs_grads[pn].double() * k[enc_of(pn)], pn)  # type: ignore[index]
    # the two micro-batches are identical, so the accumulated unscaled gradient is 2g and the
    # noise's std is std(2g) (noise per micro-batch would give sqrt(2) std(g))
    for pn, (noise, g2) in noises.items():
        if noise.numel() >= 1000:
            assert float(noise.std()) == pytest.approx(float(g2.std()) + 1e-8, rel=0.06), pn
            assert float(g2.std()) == pytest.approx(
                2 * float(xs_grads[pn].double().std()), rel=1e-5
            )


@pytest.mark.skipif(torch.bfloat16 == DTYPE, reason="GradScaler scales float16/32 losses")
def test_ge_noise_with_grad_scaler_equals_the_run_without() -> None:
    results = []
    for use in (False, True):
        model, _ = wide()
        scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**12) if use else None
        ctx = ctx_for(model, gradmod.OGMGE(alpha=0.5, seed=5), fusion="head", grad_scaler=scaler)
        got = wide_step(model, ctx, 1, scaler=scaler)[-1]
        if scaler is not None:
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            scaler.unscale_(opt)
            got = {pn: p.grad.detach().clone() for pn, p in model.named_parameters()}
        results.append(got)
    for pn in results[0]:
        # a power-of-two scale commutes with every rounding: equal bit for bit
        assert torch.equal(results[0][pn], results[1][pn]), pn


def test_ogm_window_outside_is_plain_training() -> None:
    model, twin = wide()
    method = gradmod.OGMGE(alpha=0.5, window=(0, 50))
    ctx = ctx_for(model, method, fusion="head")
    ctx.set_epoch(51)
    got = wide_step(model, ctx)[-1]
    plain = wide_step(twin, None)[-1]
    assert ctx.coefficients.tolist() == [1.0, 1.0]
    assert all(torch.equal(got[k], plain[k]) for k in got)
    ctx.set_epoch(50)  # inclusive
    model.zero_grad()
    wide_step(model, ctx)
    assert ctx.coefficients.tolist()[0] < 1
    assert int(method.noise_steps) == 1


class ConvNet(nn.Module):
    """Modality a: conv encoder; b: MLP; linear fusion head."""

    def __init__(self) -> None:
        super().__init__()
        self.names = ("a", "b")
        self.enc = nn.ModuleDict(
            {
                "a": nn.Sequential(
                    nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, FEAT)
                ),
                "b": nn.Sequential(nn.Conv2d(1, 1, 2), nn.Flatten(), nn.Linear(25, FEAT)),
            }
        )
        self.head = nn.Linear(2 * FEAT, CLASSES)

    def forward(self, xs: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        feats = {n: self.enc[n](xs[n]) for n in self.names}
        return self.head(torch.cat([feats["a"], feats["b"]], 1)), feats


def test_ogm_conv_preset_modulates_only_4d_weights() -> None:
    torch.manual_seed(0)
    model = ConvNet().to(DEVICE, DTYPE)
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    xs = {n: torch.randn(16, 1, 6, 6, generator=g, dtype=F64) for n in "ab"}
    xd, yd = dev(xs, torch.randint(0, CLASSES, (16,), generator=g))
    ctx = gradmod.ModulationContext(
        model,
        encoders={"a": "enc.a", "b": "enc.b"},
        method=gradmod.OGMGE(alpha=2.0, ge=False, params="conv"),
        fusion="head",
    )
    logits, feats = model(xd)
    with ctx(features=feats, targets=yd):
        F.cross_entropy(logits, yd).backward()
    logits, _ = twin(xd)
    F.cross_entropy(logits, yd).backward()
    k = dict(zip(ctx.names, ctx.coefficients.tolist(), strict=True))
    assert min(k.values()) < 1
    for (pn, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        factor = k[pn.split(".")[1]] if (p.dim() == 4) else 1.0
        close(p.grad, q.grad.double() * factor, pn)


def test_ogm_configuration_errors() -> None:
    names = ("a", "b")
    model = make(names)
    with pytest.raises(gradmod.ConfigurationError) as ei:
        ctx_for(model, gradmod.OGMGE(params="conv"), mode="feature")
    problems = ei.value.problems
    assert any("pass fusion= one nn.Linear" in p and "got nothing" in p for p in problems)
    assert any("noise is drawn per parameter tensor" in p for p in problems)
    assert sum("selects no tensor of encoders" in p for p in problems) == 2
    assert sum("modulates only part of it" in p for p in problems) == 2
    assert len(problems) == 6, problems

    class Deep(LinNet):
        def __init__(self) -> None:
            super().__init__(names)
            self.head = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))  # type: ignore[assignment]

    with pytest.raises(gradmod.ConfigurationError, match="got Sequential"):
        ctx_for(Deep(), gradmod.OGMGE(), fusion="head")
    with pytest.raises(ValueError, match="window"):
        gradmod.OGMGE(window=(5, 2))


# ============================================================================ AGM
def agm_reference(
    model: LinNet,
    xs: Mapping[str, Tensor],
    y: Tensor,
    s_bar: list[float],
    alpha: float,
    official: bool,
) -> tuple[list[float], list[float], dict[str, Tensor]]:
    """Official (lihong2303/AGM_ICCV2023): CREMAD_main.py (M = 2) floors p at 1e-8 and caps the
    exponent at 10; URFunny_main.py (M = 3) has no floor and caps at 7. gradmod's default: the
    1e-8 floor and the exponent clamped to [-1, 1]."""
    m64 = f64(model)
    names = model.names
    feats = m64.features(xs)  # type: ignore[operator]
    phi = shapley(m64.fuse, feats)  # type: ignore[arg-type]
    floor = 1e-8 if not official or len(names) == 2 else 0.0
    s = [agm_score(phi[n].detach(), y, floor) for n in names]
    if official:
        k = agm_k(s, s_bar, alpha, 10.0 if len(names) == 2 else 7.0)
    else:
        k = agm_k(s, s_bar, alpha, 1.0, lower=-1.0)
    # the gradient reaching phi_m is k_m times dL/d(output): the forward value is unchanged
    out = sum(km * phi[n] + (1 - km) * phi[n].detach() for km, n in zip(k, names, strict=True))
    F.cross_entropy(out, y).backward()  # type: ignore[arg-type]
    return s, k, {pn: p.grad.clone() for pn, p in m64.named_parameters()}


@pytest.mark.parametrize("official", [False, True], ids=["default", "official"])
@pytest.mark.parametrize("names", [("a", "b"), ("a", "b", "c")], ids=["M2", "M3"])
def test_agm_matches_naive_reference_over_steps(names: tuple[str, ...], official: bool) -> None:
    alpha = 1.5
    model = make(names)
    ctx = ctx_for(model, gradmod.AGM(alpha=alpha, official=official))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    history: list[list[float]] = []
    for step in range(3):
        xs, y = data(names, seed=20 + step)
        s_bar = (
            [sum(col) / len(history) for col in zip(*history, strict=True)]
            if history
            else [0.0] * len(names)
        )
        s, k_ref, g_ref = agm_reference(model, xs, y, s_bar, alpha, official)
        history.append(s)
        xd, yd = dev(xs, y)
        phi = gradmod.functional.shapley_responses(
            model.fuse, model.features(xd), module=model.head
        )
        with ctx(features=phi, targets=yd):
            F.cross_entropy(sum(phi.values()), yd).backward()  # type: ignore[arg-type]
        close(ctx.coefficients, torch.tensor(k_ref, dtype=F64), f"step {step} k")
        assert max(k_ref) - min(k_ref) > 1e-3
        for pn, p in model.named_parameters():
            close(p.grad, g_ref[pn], f"step {step} {pn}")
        opt.step()
        opt.zero_grad()
    close(ctx.method.running_scores(), torch.tensor(history, dtype=F64).mean(0), "running mean")  # type: ignore[operator]


def test_agm_configuration_errors() -> None:
    model = make(("a", "b", "c", "d", "e"))
    with pytest.raises(gradmod.ConfigurationError, match="AGM needs 2 to 4 modalities; got 5"):
        ctx_for(model, gradmod.AGM())
    model = make(("a", "b"))
    with pytest.raises(gradmod.ConfigurationError) as ei:
        ctx_for(model, gradmod.AGM(), linear_heads(("a", "b")), mode="parameter")
    problems = ei.value.problems
    assert len(problems) == 2
    assert any("mode='parameter' does not apply" in p for p in problems)
    assert any("AGM uses no unimodal classifiers" in p for p in problems)


@pytest.mark.parametrize(
    ("kw", "m", "top"),
    [
        ({"alpha": 1000.0}, 2, 1000.0),
        ({"alpha": 50.0, "cap": 2.0}, 3, 100.0),
        ({"alpha": 9.0, "official": True}, 2, 90.0),  # official cap 10 for two modalities
        ({"alpha": 12.0, "official": True}, 3, None),  # 7 for three: e^84 fits float32
        ({"alpha": 88.0}, 2, None),
        ({"alpha": 1.5, "official": True}, 3, None),
    ],
)
def test_agm_refuses_coefficients_beyond_float32(
    kw: dict[str, object], m: int, top: float | None
) -> None:
    """k <= e^(alpha * cap) (cap: cap=, 1 by default, the official 10 or 7 by M) must be a
    float32 number, ln(float32 max) = 88.72, where float32 gradients are scaled; a float64
    model takes any alpha."""
    names = ("a", "b", "c")[:m]
    if top is not None and torch.float64 == DTYPE:
        pytest.skip("a float64 model takes any alpha")
    if top is None:
        assert math.log(torch.finfo(torch.float32).max) > 88.0
        ctx_for(make(names), gradmod.AGM(**kw))  # type: ignore[arg-type]
        return
    assert top > math.log(torch.finfo(torch.float32).max)
    with pytest.raises(gradmod.ConfigurationError, match=f"alpha \\* cap = {top:g}"):
        ctx_for(make(names), gradmod.AGM(**kw))  # type: ignore[arg-type]
    torch.manual_seed(0)
    wide = LinNet(names).to(DEVICE, torch.float64)
    ctx_for(wide, gradmod.AGM(**kw))  # type: ignore[arg-type]


# ================================================================= shared properties
def build_method(kind: str, names: Sequence[str]) -> tuple[LinNet, gradmod.ModulationContext]:
    model = make(names)
    if kind == "mlb":
        return model, ctx_for(model, gradmod.MLB(alpha=0.8), linear_heads(names))
    if kind == "multiloss+direction":
        return model, ctx_for(
            model, gradmod.MultiLoss(direction=0.3), deep_heads(names), fusion="head"
        )
    if kind == "ogm-ge":
        return model, ctx_for(model, gradmod.OGMGE(alpha=0.5, seed=11), fusion="head")
    return model, ctx_for(model, gradmod.AGM(alpha=1.2))


def run_step(
    model: LinNet, ctx: gradmod.ModulationContext, seed: int, *, raise_in_block: bool = False
) -> None:
    xs, y = dev(*data(model.names, seed=seed))
    feats = model.features(xs)
    if isinstance(ctx.method, gradmod.AGM):
        feats = gradmod.functional.shapley_responses(model.fuse, feats)
        out = sum(feats.values())
    else:
        out = model.fuse(feats)
    with ctx(features=feats, targets=y):
        if raise_in_block:
            raise KeyError("in the block")
        F.cross_entropy(out, y).backward()  # type: ignore[arg-type]


KINDS = ["mlb", "multiloss+direction", "ogm-ge", "agm"]


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_gives_identical_next_step(kind: str) -> None:
    names = ("a", "b", "c")
    model, ctx = build_method(kind, names)
    opt = torch.optim.SGD(all_tensors(model, ctx._binding.classifiers), lr=0.2)
    for s in range(3):
        run_step(model, ctx, seed=s)
        opt.step()
        opt.zero_grad()
    buf = io.BytesIO()
    torch.save(
        {
            "ctx": ctx.state_dict(),
            "model": model.state_dict(),
            "heads": {n: h.state_dict() for n, h in (ctx._binding.classifiers or {}).items()},
        },
        buf,
    )
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    run_step(model, ctx, seed=99)
    expect_k = ctx.coefficients
    expect_g = {pn: p.grad.clone() for pn, p in model.named_parameters()}

    model2, ctx2 = build_method(kind, names)  # fresh objects, state from the checkpoint
    model2.load_state_dict(saved["model"])
    for n, h in (ctx2._binding.classifiers or {}).items():
        h.load_state_dict(saved["heads"][n])
    ctx2.load_state_dict(saved["ctx"])
    run_step(model2, ctx2, seed=99)
    assert torch.equal(ctx2.coefficients, expect_k)
    for pn, p in model2.named_parameters():
        assert torch.equal(p.grad, expect_g[pn]), pn


@pytest.mark.parametrize("kind", KINDS)
def test_no_hook_survives_the_block_or_an_exception(kind: str) -> None:
    model, ctx = build_method(kind, ("a", "b", "c"))
    tensors = all_tensors(model, ctx._binding.classifiers)
    run_step(model, ctx, seed=0)
    assert hook_count(tensors) == 0
    grads = {pn: p.grad.clone() for pn, p in model.named_parameters()}
    with pytest.raises(KeyError, match="in the block"):
        run_step(model, ctx, seed=1, raise_in_block=True)
    assert hook_count(tensors) == 0
    # the failed step added nothing (heads' gradients land only after a clean block)
    assert all(torch.equal(p.grad, grads[pn]) for pn, p in model.named_parameters())
    run_step(model, ctx, seed=2)  # and the context is usable again
    assert hook_count(tensors) == 0


@pytest.mark.parametrize("kind", ["mlb", "agm"])
def test_method_coefficients_follow_the_modality_order(kind: str) -> None:
    names = ("a", "b", "c")
    model, ctx = build_method(kind, names)
    run_step(model, ctx, seed=4)
    k = dict(zip(ctx.names, ctx.coefficients.tolist(), strict=True))
    model.zero_grad()
    heads = ctx._binding.classifiers
    order = {"c": "enc.c", "a": "enc.a", "b": "enc.b"}
    method = gradmod.MLB(alpha=0.8) if kind == "mlb" else gradmod.AGM(alpha=1.2)
    permuted = gradmod.ModulationContext(
        model, {n: heads[n] for n in order} if heads else None, encoders=order, method=method
    )
    run_step(model, permuted, seed=4)
    kp = dict(zip(permuted.names, permuted.coefficients.tolist(), strict=True))
    assert permuted.names == ("c", "a", "b")
    for n in names:
        assert kp[n] == pytest.approx(k[n], rel=1e-9, abs=1e-12)


def test_balanced_is_the_measured_mlb_configuration() -> None:
    method = gradmod.balanced()
    assert isinstance(method, gradmod.MLB)
    assert (method.alpha, method.scale, method.beta, method.direction, method.gate) == (
        0.8,
        "encoder",
        None,
        0.0,
        None,
    )
    assert gradmod.balanced(task="regression", alpha=1.0).task == "regression"
    # it runs as any method: the step matches the MLB reference
    names = ("a", "b", "c")
    model, heads = make(names), linear_heads(names)
    ctx = ctx_for(model, method, heads)
    xs, y = data(names)
    k_ref, g_ref, _ = multiloss_reference(model, heads, xs, y, alpha=0.8, official=False)
    xd, yd = dev(xs, y)
    feats = model.features(xd)
    with ctx(features=feats, targets=yd):
        F.cross_entropy(model.fuse(feats), yd).backward()
    close(ctx.coefficients, torch.tensor(k_ref, dtype=F64), "k")
    for pn, p in model.named_parameters():
        close(p.grad, g_ref[pn], pn)
