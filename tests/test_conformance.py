"""The conformance suite: every registered method and preset (``gradmod.methods.REGISTRY``)
against the engine's guarantees, without listing any method by hand.

For each registry entry and each way it can be used (gradient level in parameter and feature
mode, update level — a combination the method refuses at construction is skipped, with the
refusal checked to be a ``ConfigurationError``):

* finite coefficients, one per modality, finite scores and state;
* the plan is applied exactly: a float64 reference built from the protocol's documented
  semantics (``StepPlan``: encoder gradients times ``k_m`` — or the method's transform, or
  replaced by the method's combine of them —, injections added before scaling, accumulated
  gradients added after, extra hooks applied),
  on a deep copy of the method's state, by plain autograd;
* ``state_dict`` round trip and exact resume;
* gradient accumulation: hooks act before accumulation (two accumulated blocks equal the sum
  of the same blocks run one at a time);
* a ``GradScaler`` (power-of-two scale, inside the block) gives bit-identical training;
* DDP on 2 gloo processes equals the single-process full batch (one launch for all entries);
* ``torch.compile``d encoders give the eager result;
* no hook is left behind, also when the block raises.

A method that acts in the forward (``Needs(forward=True)``) is run as documented: its features
go through ``ctx.prepare`` before fusion, and the reference fuses what a deep copy of it
prepares, handing the carry to its plan.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

import gradmod
from gradmod.methods import REGISTRY

F64 = torch.float64
FEAT, CLASSES, HID = 4, 3, 6
DIMS = {"a": 5, "b": 4, "c": 3}
ENTRIES = sorted(REGISTRY)
USES = ["gradient/parameter", "gradient/feature", "update"]


class Net(nn.Module):
    """MLP encoders ``enc.<name>`` and a linear fusion head on their concatenation."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.names = names
        self.enc = nn.ModuleDict(
            {
                n: nn.Sequential(nn.Linear(DIMS[n], HID), nn.Tanh(), nn.Linear(HID, FEAT))
                for n in names
            }
        )
        self.head = nn.Linear(FEAT * len(names), CLASSES)

    def features(self, xs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {n: self.enc[n](xs[n]) for n in self.names}

    def fuse(self, feats: Mapping[str, Tensor]) -> Tensor:
        return self.head(torch.cat([feats[n] for n in self.names], dim=1))


class Run:
    """A model, heads, optimizer and context for one registry entry and use."""

    def __init__(self, name: str, use: str, m: int = 3, dtype: torch.dtype = torch.float32) -> None:
        torch.manual_seed(0)
        self.names = tuple("abc"[:m])
        self.method = REGISTRY[name].make(m)
        self.needs = self.method.needs()
        self.model = Net(self.names).to(dtype)
        self.heads: dict[str, nn.Module] | None = None
        if self.needs.classifiers == "required":  # ending in the fusion weight's shape
            self.heads = {
                n: nn.Sequential(
                    nn.Linear(FEAT, FEAT * m), nn.Tanh(), nn.Linear(FEAT * m, CLASSES)
                ).to(dtype)
                for n in self.names
            }
        params = [*self.model.parameters()]
        params += [p for h in (self.heads or {}).values() for p in h.parameters()]
        self.opt = torch.optim.Adam(
            [{"params": list(self.model.enc[n].parameters())} for n in self.names]
            + [{"params": [*self.model.head.parameters()]}]
            + [{"params": [p for h in (self.heads or {}).values() for p in h.parameters()]}],
            lr=1e-2,
        )
        assert len(params) == sum(len(g["params"]) for g in self.opt.param_groups)
        kw: dict[str, Any] = {"encoders": {n: f"enc.{n}" for n in self.names}}
        if self.needs.fusion != "unused":
            kw["fusion"] = "head"
        if use == "update":
            kw["optimizer"] = self.opt
        elif self.needs.level == "encoders":
            kw["mode"] = use.split("/")[1]
        elif use != "gradient/parameter":  # responses take no mode: one gradient-level use
            pytest.skip("a response-level method has one gradient-level use")
        try:
            self.ctx = gradmod.ModulationContext(self.model, self.heads, method=self.method, **kw)
        except gradmod.ConfigurationError as e:
            assert e.problems  # refused with reasons, at construction
            pytest.skip(f"{name} refuses {use}: {e.problems[0]}")
        self.ctx.set_epoch(0)  # as a training loop does: methods may count epochs

    def tensors(self) -> list[Tensor]:
        return [
            *self.model.parameters(),
            *(p for h in (self.heads or {}).values() for p in h.parameters()),
        ]

    def inputs(self, seed: int, n: int = 12) -> tuple[dict[str, Tensor], Tensor]:
        g = torch.Generator().manual_seed(seed)
        dtype = next(self.model.parameters()).dtype
        xs = {k: torch.randn(n, DIMS[k], generator=g, dtype=F64).to(dtype) for k in self.names}
        y = torch.randint(0, CLASSES, (n,), generator=g)
        xs["a"][:, 0] += y.to(dtype)  # modality a is informative: coefficients move off 1
        return xs, y

    def loss_and_features(
        self, xs: Mapping[str, Tensor], y: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        feats = self.model.features(xs)
        if self.needs.level == "responses":
            feats = gradmod.functional.shapley_responses(self.model.fuse, feats)
            out = sum(feats.values())
        elif self.needs.forward:  # the method acts in the forward: fuse what it prepared
            out = self.model.fuse(self.ctx.prepare(feats, y))
        else:
            out = self.model.fuse(feats)
        return F.cross_entropy(out, y), feats  # type: ignore[arg-type]

    def block(
        self,
        xs: Mapping[str, Tensor],
        y: Tensor,
        *,
        boundary: bool = True,
        weight: float | None = None,
        scaler: torch.amp.GradScaler | None = None,
        divide: float = 1.0,
    ) -> None:
        loss, feats = self.loss_and_features(xs, y)
        loss = loss / divide
        with self.ctx(feats, y, boundary=boundary, weight=weight):
            (scaler.scale(loss) if scaler is not None else loss).backward()

    def train(self, seeds: range, scaler: torch.amp.GradScaler | None = None) -> None:
        for s in seeds:
            self.block(*self.inputs(s), scaler=scaler)
            if scaler is not None:
                scaler.step(self.opt)
                scaler.update()
            else:
                self.opt.step()
            self.opt.zero_grad()


def cases() -> Iterator[Any]:
    for name in ENTRIES:
        for use in USES:
            yield pytest.param(name, use, id=f"{name}-{use}")


CASES = list(cases())


def no_hooks(tensors: list[Tensor]) -> bool:
    return all(not (t._backward_hooks or {}) for t in tensors)


def assert_untouched(run: Run, tensors: list[Tensor], state: Mapping[str, Any]) -> None:
    """A refused block: no gradient, no hook, the method's state as it was."""
    assert all(t.grad is None for t in tensors)
    assert no_hooks(tensors)
    for key, v in run.ctx.state_dict().items():
        if isinstance(v, Tensor):
            assert torch.equal(v, state[key]), key


# ----------------------------------------------------------------------------------- checks
@pytest.mark.parametrize(("name", "use"), CASES)
def test_coefficients_scores_and_state_are_finite(name: str, use: str) -> None:
    run = Run(name, use)
    for s in range(3):
        run.train(range(s, s + 1))
        k = run.ctx.coefficients
        assert k.shape == (3,) and bool(torch.isfinite(k).all())
        assert all(bool(torch.isfinite(v).all()) for v in run.ctx.scores.values())
    for key, v in run.ctx.state_dict().items():
        if isinstance(v, Tensor) and v.is_floating_point():
            assert bool(torch.isfinite(v).all()), key
    assert no_hooks(run.tensors())


@pytest.mark.parametrize(("name", "use"), CASES)
def test_the_plan_is_applied_exactly(name: str, use: str) -> None:
    """Float64: the engine's gradients equal the protocol's semantics applied by hand to the plan
    that a deep copy of the method (same state) makes for the same step (with ``weight=``)."""
    run = Run(name, use, dtype=F64)
    run.train(range(2))  # some state first
    xs, y = run.inputs(7)
    shadow = copy.deepcopy((run.model, run.heads, run.method))
    model, heads, method = shadow
    # the engine's result (a loss divided by 2, the method's own gradients by weight=0.5)
    run.block(xs, y, weight=0.5, divide=2.0)
    got = [t.grad.clone() if t.grad is not None else None for t in run.tensors()]
    # the reference: plain autograd of the surrogate, then the plan's documented operations
    binding = run.ctx._binding
    mapping = {
        id(a): b
        for a, b in zip(
            run.tensors(),
            [*model.parameters(), *(p for h in (heads or {}).values() for p in h.parameters())],
            strict=True,
        )
    }
    ref_binding = gradmod.Binding(
        binding.names,
        {n: [mapping[id(p)] for p in ps] for n, ps in binding.groups.items()},
        dict(heads) if heads is not None else None,
        model.head if binding.fusion_module is not None else None,
        mapping[id(binding.fusion)] if binding.fusion is not None else None,
        binding.mode,
        binding.device,
        binding.act,
    )
    feats = model.features(xs)
    step = gradmod.Step(feats, y, lambda t: t, True, lambda: None, weight=0.5)
    if run.needs.level == "responses":
        feats = gradmod.functional.shapley_responses(model.fuse, feats)
        step = gradmod.Step(feats, y, lambda t: t, True, lambda: None, weight=0.5)
        loss = F.cross_entropy(sum(feats.values()), y)  # type: ignore[arg-type]
    elif run.needs.forward:  # the forward the method prepares, its carry to the plan
        prepared = method.prepare(ref_binding, step)
        loss = F.cross_entropy(model.fuse(prepared.features), y)
        step = dataclasses.replace(step, carry=prepared.carry)
    else:
        loss = F.cross_entropy(model.fuse(feats), y)
    plan = method.plan(ref_binding, step)
    k = plan.coefficients.detach()
    act_on_grads = use != "update"
    # 1. the user's loss plus each injection <g, t>, differentiated w.r.t. every tensor; for
    #    response-level methods the responses' gradient is scaled by k_m before it flows on
    surrogate = loss / 2 + sum((0.5 * inj.grad.detach() * inj.tensor).sum() for inj in plan.inject)
    leaves = [*model.parameters(), *(p for h in (heads or {}).values() for p in h.parameters())]
    if run.needs.level == "responses":
        scaled = {n: f for n, f in feats.items()}
        gouts = torch.autograd.grad(surrogate, list(scaled.values()), retain_graph=True)
        grads = torch.autograd.grad(
            list(scaled.values()),
            leaves,
            grad_outputs=[g * k[i] for i, g in enumerate(gouts)],
            allow_unused=True,
        )
    elif act_on_grads and run.ctx.mode == "feature":
        gouts = torch.autograd.grad(surrogate, list(feats.values()), retain_graph=True)
        enc = {id(p) for ps in ref_binding.groups.values() for p in ps}
        direct = torch.autograd.grad(surrogate, leaves, allow_unused=True, retain_graph=True)
        through = torch.autograd.grad(
            list(feats.values()),
            leaves,
            grad_outputs=[g * k[i] for i, g in enumerate(gouts)],
            allow_unused=True,
        )
        grads = tuple(
            t if id(p) in enc else d for p, d, t in zip(leaves, direct, through, strict=True)
        )
    else:
        grads = torch.autograd.grad(surrogate, leaves, allow_unused=True)
    want = [g.clone() if g is not None else None for g in grads]
    index = {id(p): i for i, p in enumerate(leaves)}
    # 2. parameter mode: each selected encoder tensor times k_m (or the method's transform),
    #    or, with a combine, modality m's gradients replaced by combine(m, their gradients)
    if plan.combine is not None:
        for m, n in enumerate(binding.names):
            js = [index[id(mapping[id(t)])] for t in run.ctx._targets.encoders.get(n, ())]
            g_m = [want[j] if want[j] is not None else torch.zeros_like(leaves[j]) for j in js]
            for j, c in zip(js, plan.combine(m, g_m), strict=True):
                want[j] = c
    elif run.needs.level == "encoders" and run.ctx.mode == "parameter":
        for m, n in enumerate(binding.names):
            for i, t in enumerate(run.ctx._targets.encoders.get(n, ())):
                j = index[id(mapping[id(t)])]
                g = want[j]
                assert g is not None
                if plan.transform is not None:
                    want[j] = plan.transform(
                        k[m] if act_on_grads else torch.ones_like(k[m]), m, i, g
                    )
                elif act_on_grads:
                    want[j] = (g * k[m]).to(g.dtype)
    # 3. extra hooks, then the accumulated gradients
    for h in plan.hooks:
        j = index[id(h.tensor)]
        assert want[j] is not None
        want[j] = h.fn(want[j])  # type: ignore[arg-type]
    for t, g in plan.accumulate:
        j = index[id(t)]
        want[j] = 0.5 * g if want[j] is None else want[j] + 0.5 * g
    for w, g in zip(want, got, strict=True):
        if w is None:
            assert g is None or not g.any()
        else:
            assert g is not None
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("name", "use"), CASES)
def test_state_dict_round_trip_and_exact_resume(name: str, use: str) -> None:
    run = Run(name, use)
    run.train(range(2))
    saved = copy.deepcopy(
        (
            run.ctx.state_dict(),
            run.model.state_dict(),
            {n: h.state_dict() for n, h in (run.heads or {}).items()},
            run.opt.state_dict(),
        )
    )
    run.train(range(2, 4))
    resumed = Run(name, use)
    ctx_state, model_state, head_state, opt_state = saved
    resumed.model.load_state_dict(model_state)
    for n, h in (resumed.heads or {}).items():
        h.load_state_dict(head_state[n])
    resumed.opt.load_state_dict(opt_state)
    resumed.ctx.load_state_dict(ctx_state)
    resumed.train(range(2, 4))
    for a, b in zip(run.tensors(), resumed.tensors(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(run.ctx.coefficients, resumed.ctx.coefficients)


@pytest.mark.parametrize(("name", "use"), CASES)
def test_accumulated_blocks_equal_the_blocks_one_at_a_time(name: str, use: str) -> None:
    run, other = Run(name, use), Run(name, use)
    run.train(range(1))
    other.train(range(1))  # the same state
    halves = [run.inputs(s, n=6) for s in (11, 12)]
    for i, (xs, y) in enumerate(halves):
        run.block(xs, y, boundary=i == 1, weight=0.5, divide=2.0)
    summed: list[Tensor | None] = [None] * len(other.tensors())
    for i, (xs, y) in enumerate(halves):
        other.block(xs, y, boundary=i == 1, weight=0.5, divide=2.0)
        for j, t in enumerate(other.tensors()):
            if t.grad is not None:
                summed[j] = t.grad.clone() if summed[j] is None else summed[j] + t.grad  # type: ignore[operator]
                t.grad = None
    for t, s in zip(run.tensors(), summed, strict=True):
        if s is None:
            assert t.grad is None
        else:
            assert t.grad is not None
            torch.testing.assert_close(t.grad, s, rtol=1e-6, atol=1e-7)
    assert no_hooks(run.tensors()) and no_hooks(other.tensors())


@pytest.mark.parametrize(("name", "use"), CASES)
def test_a_grad_scaler_changes_nothing(name: str, use: str) -> None:
    """Power-of-two scale, ``scaler.scale(loss).backward()`` inside the block: the trained
    parameters are bit-identical to the run without a scaler."""
    plain, scaled = Run(name, use), Run(name, use)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10**6)
    scaled.ctx.grad_scaler = scaler
    plain.train(range(3))
    scaled.train(range(3), scaler=scaler)
    assert scaler.get_scale() == 2.0**10  # no step was skipped
    for a, b in zip(plain.tensors(), scaled.tensors(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("name", "use"), CASES)
def test_compiled_encoders_give_the_eager_result(name: str, use: str) -> None:
    eager, compiled = Run(name, use), Run(name, use)
    for n in compiled.names:
        compiled.model.enc[n].compile(backend="aot_eager")
    eager.train(range(2))
    compiled.train(range(2))
    for a, b in zip(eager.tensors(), compiled.tensors(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert no_hooks(compiled.tensors())


@pytest.mark.parametrize(("name", "use"), CASES)
def test_no_hook_left_behind_when_the_block_raises(name: str, use: str) -> None:
    run = Run(name, use)
    run.train(range(1))
    state = copy.deepcopy(run.ctx.state_dict())
    xs, y = run.inputs(5)
    _, feats = run.loss_and_features(xs, y)
    with pytest.raises(KeyError), run.ctx(feats, y):
        raise KeyError("inside the block")
    assert no_hooks(run.tensors())
    for key, v in run.ctx.state_dict().items():
        if isinstance(v, Tensor):
            assert torch.equal(v, state[key]), key
    run.train(range(1, 2))  # and the context still works
    assert no_hooks(run.tensors())


@pytest.mark.parametrize(("name", "use"), [c for c in CASES if c.values[1] == USES[0]])
def test_a_negative_class_index_is_refused_before_anything_or_used_as_its_loss_says(
    name: str, use: str
) -> None:
    """Targets holding ``cross_entropy``'s ``ignore_index`` (-100): a method whose scores read
    every sample's class refuses them with a ``StepError`` before any gradient, hook or state
    changes; one that accepts them trains on with finite coefficients and state."""
    run = Run(name, use)
    run.train(range(1))
    state = copy.deepcopy(run.ctx.state_dict())
    xs, y = run.inputs(5)
    y[2] = -100
    tensors = run.tensors()
    try:
        loss, feats = run.loss_and_features(xs, y)  # cross_entropy ignores the sample
        with run.ctx(feats, y):
            loss.backward()
    except gradmod.StepError as e:
        assert "-100" in str(e) and "drop the ignored samples" in str(e)
        assert_untouched(run, tensors, state)
        return
    assert bool(torch.isfinite(run.ctx.coefficients).all())
    for key, v in run.ctx.state_dict().items():
        if isinstance(v, Tensor) and v.is_floating_point():
            assert bool(torch.isfinite(v).all()), key


@pytest.mark.parametrize(("name", "use"), [c for c in CASES if c.values[1] == USES[0]])
def test_targets_of_another_length_are_refused_before_anything(name: str, use: str) -> None:
    """Targets one sample short of the features: every method that reads them refuses them with
    a ``StepError`` naming the shape it needs, before any gradient, hook or state changes."""
    run = Run(name, use)
    run.train(range(1))
    state = copy.deepcopy(run.ctx.state_dict())
    xs, y = run.inputs(5)
    tensors = run.tensors()
    loss, feats = run.loss_and_features(xs, y)
    try:
        with run.ctx(feats, y[:-1]):
            loss.backward()
    except gradmod.StepError as e:
        assert "[12" in str(e), str(e)  # the shape it needs: [12] or [12, ...]
        assert_untouched(run, tensors, state)
        return
    # accepted: the method does not read the targets (gradmod.Fixed), and trained on
    assert type(run.method).__name__ == "Fixed", f"{name} took a short batch of targets"
    assert bool(torch.isfinite(run.ctx.coefficients).all())


@pytest.mark.parametrize(("name", "use"), [c for c in CASES if c.values[1] == USES[0]])
def test_set_epoch_takes_integers_and_refuses_the_rest(name: str, use: str) -> None:
    """``set_epoch`` of the context and of the method: any integer >= 0 (NumPy's, a 0-d tensor),
    and a ``ValueError`` for a bool, a float, a string or a negative number, with the state
    as it was."""
    import numpy as np

    run = Run(name, use)
    run.ctx.set_epoch(np.int64(3))
    run.ctx.set_epoch(torch.tensor(4))
    state = copy.deepcopy(run.ctx.state_dict())
    for bad in (True, -1, 2.7, "3"):
        for target in (run.ctx, run.method):
            with pytest.raises(ValueError, match="epoch must be an integer >= 0"):
                target.set_epoch(bad)  # type: ignore[arg-type]
    for key, v in run.ctx.state_dict().items():
        if isinstance(v, Tensor):
            assert torch.equal(v, state[key]), key
    if "epoch" in state:
        assert int(state["epoch"]) == 4


# ------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world: int, path: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results: dict[str, dict[str, Tensor]] = {}
    try:
        for name in ENTRIES:
            for use in ("gradient/parameter", "update"):
                try:
                    run = Run(name, use)
                except pytest.skip.Exception:
                    continue
                for s in range(3):
                    xs, y = run.inputs(s)
                    half = slice(rank * 6, rank * 6 + 6)
                    run.block({k: v[half] for k, v in xs.items()}, y[half])
                    for t in run.tensors():  # the DDP average of the two halves
                        if t.grad is not None:
                            dist.all_reduce(t.grad)
                            t.grad /= world
                    run.opt.step()
                    run.opt.zero_grad()
                results[f"{name}/{use}"] = {
                    str(i): t.detach().clone() for i, t in enumerate(run.tensors())
                }
    finally:
        torch.save(results, f"{out}.{rank}")
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_the_full_batch() -> None:
    """Each rank runs half of every batch (gradients averaged over the ranks, as DDP does);
    gradmod's scores, metrics and head gradients are global: the result equals the
    single-process full batch (except where a method's randomness is local by design: OGM-GE's
    noise, whose std is the local gradient's, and a forward-acting method's per-rank draws
    (OPM's masks); then the ranks still agree bit for bit)."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res")
        mp.spawn(_ddp_worker, args=(2, os.path.join(d, "rdv"), out), nprocs=2, join=True)
        ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) >= len(ENTRIES)
    for key, tensors in ranks[0].items():
        for i, t in tensors.items():
            assert torch.equal(t, ranks[1][key][i]), (key, i)
        name, use = key.split("/", 1)
        needs = REGISTRY[name].make(3).needs()
        if needs.transforms_gradients or needs.forward:
            continue
        single = Run(name, use)
        single.train(range(3))
        for i, t in enumerate(single.tensors()):
            torch.testing.assert_close(tensors[str(i)], t.detach(), rtol=1e-5, atol=1e-6, msg=key)
