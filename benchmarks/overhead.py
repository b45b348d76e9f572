"""Overhead of gradient modulation on a full training step, as paired ratios against a plain step.

    python benchmarks/overhead.py                      # both models, default repetitions
    python benchmarks/overhead.py --quick              # fast sanity run
    python benchmarks/overhead.py --models mlp --reps 1000 --warmup 50
    python benchmarks/overhead.py --models transformer --variants param,param+monitor

Every variant trains its own copy of the same model (identical initialisation) with Adam. One
timed sample is ``--inner`` full training steps (forward + loss + backward + optimizer step +
zero_grad) of one variant, timed with ``time.perf_counter``. The variants are interleaved: each
repetition times every variant once, in a freshly shuffled order, on the same batch, so slow
phases of a shared machine hit all variants alike. Each repetition gives one paired ratio
``variant / plain``; the table reports the median ratio with its interquartile range.

Variants:

* ``plain``: no modulation at all; a second, identical plain copy is timed too (A/A control):
  its ratio is the noise floor of the table.
* ``gradmod parameter``: ``ModulationContext(mode="parameter")`` entered around every backward.
* ``gradmod feature``: ``ModulationContext(mode="feature")``.
* ``official-style loop``: what the seed repositories do after ``backward()``: scan
  ``model.named_parameters()``, match modalities by substring of the name and do
  ``param.grad *= coeff`` (a Python float) per parameter.
* ``update level, fast path``: ``ModulationContext(act="update")`` with one Adam param group per
  modality: each group's learning rate is scaled for the step and restored (no copy).
* ``update level, general path``: the same with ONE param group for the whole model: the
  encoders' parameters are copied before each step and moved back by a ``foreach`` lerp after
  it (its extra memory, one copy of the modulated parameters, is printed under the table).
* ``CGGM full``: ``gradmod.CGGM`` with unimodal classifiers and the direction loss: the METHOD's
  cost (M extra classifier forwards/backwards and the direction-loss gradient), not the engine's.
* ``OGM-GE full``: ``gradmod.OGMGE`` (parameter mode): unimodal logits from the linear head's
  column blocks, and the GE noise (a std and a seeded ``randn`` per encoder tensor per step).
* ``MLB full``: ``gradmod.MLB`` with one linear head per modality (feature mode): the heads'
  forward/backward and the injection of their loss gradients into the live features.
* ``AGM full``: ``gradmod.AGM`` on Shapley responses computed by masking FEATURES (2^M - 1 passes
  of the fusion head only), gradmod's recommended use.
* ``AGM, official input masking``: the same, but masking INPUTS and running the whole model
  2^M - 1 times, as the official code does: what AGM costs when used as published.
* ``... + Monitor``: the parameter-mode, feature-mode and update-level (fast path) rows again,
  with a :class:`gradmod.Monitor` given to the context (every block recorded: coefficients and
  both gradient norms of every encoder tensor). Each is also paired with its row without the
  monitor ("monitor cost" lines under the table: the median of the per-repetition ratio
  on / off, with its ~95 % CI).

* ``... hand-written``: MLB, OGM-GE, CGGM and AGM written inline in the training step as the
  official scripts do, in plain torch (no gradmod call in the step), each computing what its
  gradmod row computes (gradmod's defaults; where they differ from the official arithmetic the
  hand-written row follows the default, and its docstring says where). MLB: the heads' losses
  added to the loss, the coefficients computed inline and every encoder gradient multiplied by
  ``k_m`` after backward; OGM-GE: logits off the head's column blocks, coefficients and GE
  noise inline after backward, with gradmod's documented random stream; CGGM: the classifiers
  on the detached features, their accuracy improvements, B and the direction loss inline (the
  classifiers' losses and the direction loss join the fused loss: one backward), every encoder
  gradient multiplied by ``rho * B_m`` after backward; AGM: the six masked head passes, the
  three Shapley responses written out, scores and coefficients inline, and a tensor hook on
  each response. Each is paired with gradmod's full step of the same method ("gradmod /
  hand-written" lines: the median of the per-repetition ratio, with its ~95 % CI); the test
  suite checks that both compute the same gradients.
* ``OGM-GE without noise``: ``gradmod.OGMGE(ge=False)``, the OGM-GE full row without its GE
  noise, paired with it ("OGM-GE noise cost" line: the median of the per-repetition ratio
  full / without noise, with its ~95 % CI): the noise's own cost, measured in one run.
* ``floor, ...``: the bare mechanism of each mode with the engine rows' coefficients, without a
  context (no checks, claims or state): parameter mode, one ``torch._foreach_mul_`` over the
  encoder gradients after backward; feature mode, a ``k.mul`` hook on each feature. What the
  modulation itself costs on this machine, below which no implementation of the mode goes.
  ``floor, parameter mode with gradmod's mechanism`` adds what the engine's deferred scaling
  does around that multiply, and nothing else: a claim in each encoder parameter's
  hook dict (set before backward, removed after), and the ``foreach`` queued with autograd's
  engine by the first claimed gradient (a callback that re-queues it, so that it runs when
  the backward ends). The gap between it and the engine row is the block's checks and
  bookkeeping.
  ``floor, GE noise`` is a plain step that also draws one standard normal number per encoder
  element after backward (a seeded generator per modality, a buffer kept across steps): what
  drawing OGM-GE's noise costs inside the step, with no std, scaling or hook.

``--variants`` times a subset (short keys, see ``--help``; ``plain`` is always timed, as the
reference of every ratio).

The gradmod engine rows (both modes and both update paths) use :class:`FixedCoefficients`, a method whose per-step work matches
the official loop (the same cheaply varying coefficients, precomputed as ``[M]`` tensors, no
classifiers), so they measure the hook engine alone against the official loop.

Also printed: a distribution-free ~95 % confidence interval of each median ratio.
"""

from __future__ import annotations

import argparse
import collections
import copy
import gc
import itertools
import math
import operator
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradmod
from gradmod import Binding, Step, StepPlan

__all__ = ["MODELS", "VARIANTS", "FixedCoefficients", "main"]

N_CLASSES = 10
NAMES = ("m0", "m1", "m2")
PATHS = {n: f"encoders.{i}" for i, n in enumerate(NAMES)}

PLAIN = "plain"
CONTROL = "plain, 2nd copy (A/A noise control)"
PARAM = "gradmod parameter mode"
FEATURE = "gradmod feature mode"
OFFICIAL = "official-style loop (named_parameters + substring, grad *= float)"
UPDATE_FAST = "gradmod update level, fast path (a param group per modality: lr scaled)"
UPDATE_GENERAL = "gradmod update level, general path (one param group: copy + foreach lerp)"
CGGM_FULL = "CGGM full (METHOD cost: +3 MLP classifiers, direction loss; parameter mode)"
OGM_FULL = "OGM-GE full (METHOD cost: logits off the head, GE noise on every tensor)"
MLB_FULL = "MLB full (METHOD cost: +3 linear heads on the live features; feature mode)"
AGM_FULL = "AGM full (METHOD cost: 2^M-1 = 7 fusion-head passes for the responses)"
AGM_INPUT = "AGM, official input masking (METHOD cost: 7 full-model forwards)"
PARAM_MON = "gradmod parameter mode + Monitor"
FEATURE_MON = "gradmod feature mode + Monitor"
UPDATE_FAST_MON = "gradmod update level, fast path + Monitor"
MLB_HAND = (
    "MLB hand-written (heads' losses and coefficients inline, encoder grads *= k after backward)"
)
OGM_HAND = "OGM-GE hand-written (logits, coefficients and GE noise inline after backward)"
CGGM_HAND = (
    "CGGM hand-written (classifiers, improvements and direction loss inline, "
    "encoder grads *= rho*B after backward)"
)
AGM_HAND = (
    "AGM hand-written (7 head passes, Shapley responses and coefficients inline, tensor hooks)"
)
OGM_NONOISE = "OGM-GE without noise (ge=False: logits off the head, coefficients only)"
FLOOR_PARAM = "floor, parameter mode: encoder grads *= k after backward (one foreach, nothing else)"
FLOOR_FEATURE = "floor, feature mode: a k.mul hook on each feature (register_hook, nothing else)"
FLOOR_CLAIMS = (
    "floor, parameter mode with gradmod's mechanism: a claim in each encoder parameter's hook "
    "dict, the foreach queued at the end of backward (no checks)"
)
FLOOR_NOISE = (
    "floor, GE noise: a plain step plus one seeded normal draw per modality into a kept buffer "
    "(as many numbers as encoder elements, nothing else)"
)
VARIANTS = (
    PLAIN,
    CONTROL,
    PARAM,
    FEATURE,
    OFFICIAL,
    UPDATE_FAST,
    UPDATE_GENERAL,
    CGGM_FULL,
    OGM_FULL,
    MLB_FULL,
    AGM_FULL,
    AGM_INPUT,
    PARAM_MON,
    FEATURE_MON,
    UPDATE_FAST_MON,
    MLB_HAND,
    OGM_HAND,
    CGGM_HAND,
    AGM_HAND,
    OGM_NONOISE,
    FLOOR_PARAM,
    FLOOR_FEATURE,
    FLOOR_CLAIMS,
    FLOOR_NOISE,
)
#: The key of the "floor, ... gradmod's mechanism" row's claims in a hook dict.
CLAIM = "overhead.claim"
#: ``--variants`` keys.
KEYS = dict(
    zip(
        (
            "plain",
            "control",
            "param",
            "feature",
            "official",
            "update-fast",
            "update-general",
            "cggm",
            "ogm",
            "mlb",
            "agm",
            "agm-input",
            "param+monitor",
            "feature+monitor",
            "update-fast+monitor",
            "mlb-hand",
            "ogm-hand",
            "cggm-hand",
            "agm-hand",
            "ogm-nonoise",
            "floor-param",
            "floor-feature",
            "floor-claims",
            "floor-noise",
        ),
        VARIANTS,
        strict=True,
    )
)
#: Rows timed with a Monitor, and the row without it that each is paired with.
MONITORED = {PARAM_MON: PARAM, FEATURE_MON: FEATURE, UPDATE_FAST_MON: UPDATE_FAST}
#: gradmod's full step of a method, and the hand-written equivalent it is paired with.
HANDWRITTEN = {MLB_FULL: MLB_HAND, OGM_FULL: OGM_HAND, CGGM_FULL: CGGM_HAND, AGM_FULL: AGM_HAND}
#: OGM-GE's full row, and the same row without its GE noise (the noise's own cost).
NOISE = {OGM_FULL: OGM_NONOISE}
#: The settings both sides of each pair use.
MLB_ALPHA = 0.8
OGM_ALPHA = 0.5
OGM_SEED = 0
CGGM_RHO = 1.3
CGGM_LAM = 0.2
AGM_ALPHA = 1.0


# ------------------------------------------------------------------------------ coefficients
CYCLE = 5


def coefficient_values(step: int, m: int) -> list[float]:
    """The cheaply varying coefficients of step ``step``: same formula for gradmod and the loop."""
    return [1.0 + 0.01 * ((step + i) % CYCLE - 2) for i in range(m)]


class FixedCoefficients(gradmod.Method):
    """A method with no classifiers whose coefficients vary cheaply from step to step.

    It cycles through :data:`CYCLE` precomputed ``[M]`` tensors (built on first use), the
    tensor counterpart of the Python floats the official-style loop computes, so that a row
    using it measures the hook engine alone, not the cost of building a tensor.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counter = [0]  # a plain list: nn.Module.__setattr__ would cost more than the rest
        self.table: list[Tensor] = []

    def plan(self, binding: Binding, step: Step) -> StepPlan:
        if not self.table:
            m = len(binding.names)
            self.table = [
                torch.tensor(coefficient_values(s, m), device=binding.device) for s in range(CYCLE)
            ]
        self.counter[0] += 1
        return StepPlan(self.table[self.counter[0] % CYCLE])


# ------------------------------------------------------------------------------------ models
class MultiModalNet(nn.Module):
    """Three encoders (``encoders.0..2``), concatenated features, one linear head."""

    def __init__(self, encoders: Sequence[nn.Module], feat_dim: int) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.head = nn.Linear(feat_dim * len(encoders), N_CLASSES)

    def forward(self, xs: Sequence[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        feats = {n: enc(x) for n, enc, x in zip(NAMES, self.encoders, xs, strict=True)}
        return self.head(torch.cat(list(feats.values()), dim=1)), feats


class TokenEncoder(nn.Module):
    """Input projection, ``nn.TransformerEncoder``, mean pooling over the sequence."""

    def __init__(self, in_dim: int, d_model: int, layers: int, heads: int, ff: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=ff, dropout=0.1, batch_first=True
        )
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(self.proj(x)).mean(dim=1)


def mlp_encoder(in_dim: int, hidden: int, out: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, out),
    )


@dataclass
class ModelSpec:
    """A model and the shape of its batches."""

    name: str
    build: Callable[[], MultiModalNet]
    batch: int
    input_shapes: list[tuple[int, ...]]  # per modality, without the batch dimension
    describe: str
    reps: int  # default repetitions
    warmup: int  # default warm-up repetitions
    inner: int  # default steps per timed sample


def build_spec(name: str, args: argparse.Namespace) -> ModelSpec:
    if name == "mlp":
        dims = (32, 64, 128)
        h, out = args.mlp_hidden, args.mlp_out
        return ModelSpec(
            name,
            lambda: MultiModalNet([mlp_encoder(d, h, out) for d in dims], out),
            args.mlp_batch,
            [(d,) for d in dims],
            f"3 MLP encoders {list(dims)}->{h}->{h}->{out}, concat, linear head; "
            f"batch {args.mlp_batch}",
            reps=300,
            warmup=20,
            inner=5,
        )
    if name == "transformer":
        dims = (40, 64, 128)
        d, layers, ff, seq = args.tf_d_model, args.tf_layers, args.tf_ff, args.tf_seq
        heads = max(1, d // 64)
        return ModelSpec(
            name,
            lambda: MultiModalNet([TokenEncoder(i, d, layers, heads, ff) for i in dims], d),
            args.tf_batch,
            [(seq, i) for i in dims],
            f"3 nn.TransformerEncoder encoders (inputs {list(dims)}, d_model {d}, {layers} "
            f"layers, {heads} heads, ff {ff}), mean pool, concat, linear head; batch "
            f"{args.tf_batch} x seq {seq}",
            reps=70,
            warmup=3,
            inner=1,
        )
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


MODELS = ("mlp", "transformer")


# ---------------------------------------------------------------------------------- variants
Batch = tuple[list[Tensor], Tensor]
MakeOpt = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def adam(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer of every variant."""
    return torch.optim.Adam(params, lr=1e-4)


@dataclass
class Variant:
    name: str
    step: Callable[[Batch], None]
    times: list[float] = field(default_factory=list)


def make_variants(
    base: MultiModalNet, device: torch.device, selected: Sequence[str] = VARIANTS
) -> list[Variant]:
    """One independent copy of ``base`` (same initialisation) per selected variant, each with
    Adam, in the order of :data:`VARIANTS`."""

    def fresh() -> MultiModalNet:
        return copy.deepcopy(base).to(device)

    # (1) plain, and a second plain copy whose ratio shows the noise floor
    def plain_step() -> Callable[[Batch], None]:
        model = fresh()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step(batch: Batch) -> None:
            xs, y = batch
            logits, _ = model(xs)
            F.cross_entropy(logits, y).backward()
            opt.step()
            opt.zero_grad()

        return step

    # (4) the seed repositories' loop
    def official_step() -> Callable[[Batch], None]:
        m_off = fresh()
        opt_off = torch.optim.Adam(m_off.parameters(), lr=1e-4)
        keys = list(PATHS.values())
        counter = [0]

        def official(batch: Batch) -> None:
            xs, y = batch
            logits, _ = m_off(xs)
            F.cross_entropy(logits, y).backward()
            counter[0] += 1
            coeffs = coefficient_values(counter[0], len(keys))
            for name, param in m_off.named_parameters():
                if param.grad is None:
                    continue
                for key, c in zip(keys, coeffs, strict=True):
                    if key in name:
                        param.grad *= c
                        break
            opt_off.step()
            opt_off.zero_grad()

        return official

    # (5) the full method: CGGM with classifiers and the direction loss
    def cggm_step() -> Callable[[Batch], None]:
        return method_step(
            fresh(),
            gradmod.CGGM(rho=CGGM_RHO, lam=CGGM_LAM),
            heads=cggm_classifiers(base.head.in_features, device),
            fusion="head",
        )

    feat_dim = base.head.in_features // len(NAMES)

    def mlb_heads() -> dict[str, nn.Module]:
        """The unimodal heads of both MLB rows: the same initialisation (seeded)."""
        torch.manual_seed(1)
        return {n: nn.Linear(feat_dim, N_CLASSES).to(device) for n in NAMES}

    builders: dict[str, Callable[[], Callable[[Batch], None]]] = {
        PLAIN: plain_step,
        CONTROL: plain_step,
        # the engine alone, with the engine-only method
        PARAM: lambda: method_step(fresh(), FixedCoefficients(), mode="parameter"),
        FEATURE: lambda: method_step(fresh(), FixedCoefficients(), mode="feature"),
        OFFICIAL: official_step,
        UPDATE_FAST: lambda: method_step(fresh(), FixedCoefficients(), update="fast"),
        UPDATE_GENERAL: lambda: method_step(fresh(), FixedCoefficients(), update="general"),
        CGGM_FULL: cggm_step,
        OGM_FULL: lambda: method_step(
            fresh(), gradmod.OGMGE(alpha=OGM_ALPHA, seed=OGM_SEED), fusion="head"
        ),
        MLB_FULL: lambda: method_step(
            fresh(), gradmod.MLB(alpha=MLB_ALPHA), heads=mlb_heads(), mode="feature"
        ),
        AGM_FULL: lambda: agm_step(fresh(), inputs_masked=False),
        AGM_INPUT: lambda: agm_step(fresh(), inputs_masked=True),
        # the engine with a Monitor recording every block
        PARAM_MON: lambda: method_step(
            fresh(), FixedCoefficients(), mode="parameter", monitor=True
        ),
        FEATURE_MON: lambda: method_step(
            fresh(), FixedCoefficients(), mode="feature", monitor=True
        ),
        UPDATE_FAST_MON: lambda: method_step(
            fresh(), FixedCoefficients(), update="fast", monitor=True
        ),
        # what the official scripts write inline, paired with gradmod's full step
        MLB_HAND: lambda: mlb_hand_step(fresh(), mlb_heads()),
        OGM_HAND: lambda: ogm_hand_step(fresh()),
        CGGM_HAND: lambda: cggm_hand_step(fresh(), cggm_classifiers(base.head.in_features, device)),
        AGM_HAND: lambda: agm_hand_step(fresh()),
        # the OGM-GE full row without its noise, paired with it ("noise cost" line)
        OGM_NONOISE: lambda: method_step(
            fresh(), gradmod.OGMGE(alpha=OGM_ALPHA, seed=OGM_SEED, ge=False), fusion="head"
        ),
        # the bare mechanism of each mode, without a context
        FLOOR_PARAM: lambda: floor_step(fresh(), device, mode="parameter"),
        FLOOR_FEATURE: lambda: floor_step(fresh(), device, mode="feature"),
        FLOOR_CLAIMS: lambda: floor_step(fresh(), device, mode="claims"),
        FLOOR_NOISE: lambda: floor_step(fresh(), device, mode="noise"),
    }
    return [Variant(name, builders[name]()) for name in VARIANTS if name in selected]


def method_step(
    model: MultiModalNet,
    method: gradmod.Method,
    *,
    heads: dict[str, nn.Module] | None = None,
    fusion: str | None = None,
    mode: gradmod.Mode | None = None,
    update: str | None = None,
    monitor: bool = False,
    make_opt: MakeOpt | None = None,
) -> Callable[[Batch], None]:
    """A training step of ``method`` with its own optimizer (heads included).

    ``update``: ``None`` (gradient level), ``"fast"`` (update level, one param group per
    modality) or ``"general"`` (update level, one param group for the whole model).
    ``monitor``: give the context a :class:`gradmod.Monitor` (its records are cleared every
    1000 blocks, so a long run does not grow memory). ``make_opt``: builds the optimizer of
    the gradient level from its parameters (default: :func:`adam`; the tests record gradients).
    """
    mon = gradmod.Monitor() if monitor else None
    new_opt = make_opt or adam
    if update is None:
        ctx = gradmod.ModulationContext(
            model, heads, encoders=PATHS, method=method, fusion=fusion, mode=mode, monitor=mon
        )
        opt = new_opt([*model.parameters(), *ctx.classifier_parameters()])
    else:
        if update == "fast":
            encs = [model.get_submodule(p) for p in PATHS.values()]
            ids = {id(q) for e in encs for q in e.parameters()}
            rest = [q for q in model.parameters() if id(q) not in ids]
            groups = [{"params": list(e.parameters())} for e in encs] + [{"params": rest}]
        else:
            groups = [{"params": list(model.parameters())}]
        opt = torch.optim.Adam(groups, lr=1e-4)
        ctx = gradmod.ModulationContext(
            model, heads, encoders=PATHS, method=method, act="update", optimizer=opt, monitor=mon
        )

    def step(batch: Batch) -> None:
        xs, y = batch
        logits, feats = model(xs)
        loss = F.cross_entropy(logits, y)
        with ctx(features=feats, targets=y):
            loss.backward()
        opt.step()
        opt.zero_grad()
        if mon is not None and len(mon) >= 1000:
            mon.clear()

    return step


def cggm_classifiers(fused: int, device: torch.device) -> dict[str, nn.Module]:
    """The unimodal classifiers of both CGGM rows: the same initialisation (seeded).

    The direction loss compares each classifier's last weight matrix with the fusion head's,
    so each classifier ends in a layer of the head's shape (as in the official code).
    """
    torch.manual_seed(2)
    return {
        n: nn.Sequential(
            nn.Linear(fused // len(NAMES), fused), nn.ReLU(), nn.Linear(fused, N_CLASSES)
        ).to(device)
        for n in NAMES
    }


def floor_step(
    model: MultiModalNet, device: torch.device, *, mode: str, make_opt: MakeOpt = adam
) -> Callable[[Batch], None]:
    """The least work of each mode, with the engine rows' coefficients and nothing else (no
    checks, no claims, no state): parameter mode, every encoder gradient multiplied by its
    modality's factor after backward in one ``torch._foreach_mul_``; feature mode, a
    ``k_m.mul`` hook on each feature, registered and removed with ``register_hook``. A lower
    bound on what either mode can cost on this machine. ``mode="claims"``: parameter mode as
    the engine's deferred scaling does it (a claim per encoder parameter, the multiply queued
    at the end of backward), without any check. ``mode="noise"``: no modulation; after
    backward, one draw of standard normal numbers per modality, from a generator seeded per
    step, into a buffer kept across steps (no allocation): the least that drawing OGM-GE's GE
    noise (one number per encoder element) costs on this machine, inside the step."""
    opt = make_opt(list(model.parameters()))
    encoders = [list(model.get_submodule(PATHS[n]).parameters()) for n in NAMES]
    # mode "noise": one kept buffer per modality
    buffers = [torch.empty(sum(p.numel() for p in ps), device=device) for ps in encoders]
    gen = torch.Generator(device=device)
    table = [
        list(torch.tensor(coefficient_values(s, len(NAMES)), device=device).unbind())
        for s in range(CYCLE)
    ]
    counter = [0]
    # mode "claims": what the engine's deferred scaling puts around the multiply
    flat = [p for ps in encoders for p in ps]
    factors: list[Tensor] = []
    queued = [False]
    engine = torch.autograd.Variable._execution_engine  # type: ignore[attr-defined]

    def scale() -> None:
        torch._foreach_mul_([p.grad for p in flat], factors)

    def requeue() -> None:
        engine.queue_callback(scale)

    def trigger(grad: Tensor) -> None:
        if not queued[0]:
            queued[0] = True
            engine.queue_callback(requeue)

    claims = [trigger] * len(flat)  # whichever gradient arrives first queues the multiply
    dicts: list[dict[object, Callable[[Tensor], None]]] = []
    if mode == "claims":
        for p in flat:  # the hook dict, as gradmod creates it
            p.register_hook(lambda g: g).remove()
        dicts = [p._backward_hooks for p in flat]
    put = type(dicts[0]).setdefault if dicts else dict.setdefault  # an OrderedDict's own

    def step(batch: Batch) -> None:
        xs, y = batch
        logits, feats = model(xs)
        loss = F.cross_entropy(logits, y)
        counter[0] += 1
        k = table[counter[0] % CYCLE]
        if mode == "feature":
            handles = [feats[n].register_hook(km.mul) for n, km in zip(NAMES, k, strict=True)]
            loss.backward()
            for h in handles:
                h.remove()
        elif mode == "claims":
            factors[:] = [km for ps, km in zip(encoders, k, strict=True) for _ in ps]
            queued[0] = False
            collections.deque(map(put, dicts, itertools.repeat(CLAIM), claims), 0)
            loss.backward()
            collections.deque(map(operator.methodcaller("pop", CLAIM, None), dicts), 0)
        elif mode == "noise":
            loss.backward()
            for m, buf in enumerate(buffers):
                gen.manual_seed(hash((OGM_SEED, counter[0], m)) % 2**63)
                buf.normal_(generator=gen)
        else:
            loss.backward()
            pairs = [(p.grad, km) for ps, km in zip(encoders, k, strict=True) for p in ps]
            torch._foreach_mul_(
                [g for g, _ in pairs if g is not None], [km for g, km in pairs if g is not None]
            )
        opt.step()
        opt.zero_grad()

    return step


def agm_step(
    model: MultiModalNet,
    *,
    inputs_masked: bool,
    method: gradmod.AGM | None = None,
    make_opt: MakeOpt = adam,
) -> Callable[[Batch], None]:
    """AGM on Shapley responses over masked features (head passes) or inputs (full passes).

    ``method``: the AGM instance (default ``AGM(alpha=AGM_ALPHA)``; the tests read its state).
    """
    method = method if method is not None else gradmod.AGM(alpha=AGM_ALPHA)
    ctx = gradmod.ModulationContext(model, encoders=PATHS, method=method)
    opt = make_opt(list(model.parameters()))

    def fuse(feats: dict[str, Tensor]) -> Tensor:
        return model.head(torch.cat([feats[n] for n in NAMES], dim=1))

    def full(xs: dict[str, Tensor]) -> Tensor:
        return model([xs[n] for n in NAMES])[0]

    def step(batch: Batch) -> None:
        xs, y = batch
        if inputs_masked:
            phi = gradmod.functional.shapley_responses(
                full, dict(zip(NAMES, xs, strict=True)), module=model
            )
        else:
            _, feats = model(xs)
            phi = gradmod.functional.shapley_responses(fuse, feats, module=model.head)
        loss = F.cross_entropy(sum(phi.values()), y)  # type: ignore[arg-type]
        with ctx(features=phi, targets=y):
            loss.backward()
        opt.step()
        opt.zero_grad()

    return step


def backward_scale_step(
    loss: Tensor,
    encoders: list[list[nn.Parameter]],
    k: Sequence[float] | Sequence[Tensor],
    opt: torch.optim.Optimizer,
) -> None:
    """What the official scripts do after their forward: backward, every encoder gradient
    multiplied by its modality's factor (``grad *= k``, a Python float or a 0-d tensor), the
    optimizer step and ``zero_grad`` (the hand-written MLB and CGGM rows)."""
    loss.backward()
    for ps, km in zip(encoders, k, strict=True):
        for p in ps:
            if p.grad is not None:
                p.grad *= km
    opt.step()
    opt.zero_grad()


def mlb_hand_step(
    model: MultiModalNet,
    heads: dict[str, nn.Module],
    *,
    alpha: float = MLB_ALPHA,
    make_opt: MakeOpt = adam,
) -> Callable[[Batch], None]:
    """MLB written inline, as the official scripts do: the unimodal heads' losses added to the
    fused loss, the coefficients :math:`k_m = 1 + \\tanh(\\alpha(r_m - 1))` from the heads' mean
    true-class probabilities, and every encoder gradient multiplied by ``k_m`` after backward
    (exact here: the gradients are zeroed, set to ``None``, after every step)."""
    opt = make_opt([*model.parameters(), *(p for h in heads.values() for p in h.parameters())])
    encoders = [list(model.get_submodule(PATHS[n]).parameters()) for n in NAMES]
    m = len(NAMES)

    def step(batch: Batch) -> None:
        xs, y = batch
        logits, feats = model(xs)
        outs = [heads[n](feats[n]) for n in NAMES]
        loss = F.cross_entropy(logits, y) + sum(F.cross_entropy(o, y) for o in outs)
        with torch.no_grad():
            s = torch.stack([F.softmax(o, 1).gather(1, y[:, None]).mean() for o in outs])
            s = s.double()
            r = (s.sum() - s) / (m - 1) / s
            k = (1 + torch.tanh(alpha * (r - 1))).tolist()
        backward_scale_step(loss, encoders, k, opt)

    return step


def ogm_hand_step(
    model: MultiModalNet,
    *,
    alpha: float = OGM_ALPHA,
    seed: int = OGM_SEED,
    make_opt: MakeOpt = adam,
) -> Callable[[Batch], None]:
    """OGM-GE written inline after backward, as the official scripts do: unimodal logits from
    the linear head's column blocks, summed true-class probabilities, ratio to the others'
    mean, :math:`k = 1 - \\tanh(\\alpha \\rho)` for the dominant modality, and every encoder
    gradient replaced by ``k g + N(0, (std(g) + 1e-8)^2)``. The noise is gradmod's documented
    stream (one draw per modality from a generator seeded by ``(seed, step, modality)``, sliced
    in parameter order), so that both rows compute the same gradients."""
    opt = make_opt(list(model.parameters()))
    encoders = [list(model.get_submodule(PATHS[n]).parameters()) for n in NAMES]
    sizes = [sum(p.numel() for p in ps) for ps in encoders]
    m = len(NAMES)
    gen = torch.Generator(device=model.head.weight.device)
    counter = [0]

    def step(batch: Batch) -> None:
        xs, y = batch
        logits, feats = model(xs)
        F.cross_entropy(logits, y).backward()
        counter[0] += 1
        with torch.no_grad():
            w, b = model.head.weight, model.head.bias
            blocks = w.split([feats[n].shape[1] for n in NAMES], dim=1)
            z = [feats[n] @ wm.T + b / m for n, wm in zip(NAMES, blocks, strict=True)]
            s = torch.stack([F.softmax(zm, 1).gather(1, y[:, None]).sum() for zm in z]).double()
            rho = s / ((s.sum() - s) / (m - 1))
            k = torch.where(rho > 1, 1 - torch.tanh(alpha * rho), torch.ones_like(rho))
            for i, ps in enumerate(encoders):
                gen.manual_seed(hash((seed, counter[0], i)) % 2**63)
                noise = torch.randn(sizes[i], generator=gen, device=gen.device)
                start = 0
                for p in ps:
                    g = p.grad
                    assert g is not None
                    zp = noise[start : start + g.numel()].view_as(g)
                    start += g.numel()
                    p.grad = g * k[i] + zp * (g.std() + 1e-8)
        opt.step()
        opt.zero_grad()

    return step


def cggm_hand_step(
    model: MultiModalNet,
    classifiers: dict[str, nn.Module],
    *,
    rho: float = CGGM_RHO,
    lam: float = CGGM_LAM,
    make_opt: MakeOpt = adam,
) -> Callable[[Batch], None]:
    r"""CGGM written inline, in the official scripts' style, computing gradmod's DEFAULT
    arithmetic (that of the ``cggm`` row, ``CGGM(rho, lam)``), not ``official=True``.

    The official ``msatrain.py`` runs the classifiers on the detached encoder outputs, takes
    each one's batch accuracy, its improvement :math:`\Delta_m` over the previous step and
    :math:`B_m = (S - \Delta_m)/S` with :math:`S = \sum\Delta + 10^{-8}`, multiplies every
    encoder gradient by :math:`\rho B_m` after backward, and adds :math:`\lambda L_{gm}`
    (:math:`L_{gm} = \frac1M\sum_m (|B_m| - B_m\cos(u, v_m))`, :math:`u` the fusion head's
    weight, :math:`v_m` classifier ``m``'s last weight) to the NEXT step's loss. This row keeps
    that structure (detached classifier inputs, accuracies, grads scaled after backward, the
    cosine of the flattened last weight matrices) but computes what the ``cggm`` row computes:
    gradmod's documented default (README, "CGGM"): :math:`\Delta^+ = \max(\Delta, 0)`,
    :math:`B = (S^+ - \Delta^+)/S^+` with every :math:`B_m = (M-1)/M` when
    :math:`S^+ = \sum\Delta^+ \le 10^{-6}`, and the direction loss of THIS step (this step's
    :math:`B`, :math:`v_m` constant) differentiated at this step's weights. So the classifiers
    run before backward, and their losses and :math:`\lambda L_{gm}` join the fused loss: one
    backward. The default is the pair's side because it is what the ``cggm`` row times (and the
    README reports); ``CGGM(official=True)`` would pair with the official script's arithmetic
    instead (the previous step's loss, kept as a graph), at the same cost in kind. No gradient
    clipping on either side (the official script's ``clip_grad_norm_`` belongs to its loop,
    not to the method; no row of this benchmark clips). Scores and :math:`B` in float64, as
    gradmod's.
    """
    opt = make_opt(
        [*model.parameters(), *(p for c in classifiers.values() for p in c.parameters())]
    )
    encoders = [list(model.get_submodule(PATHS[n]).parameters()) for n in NAMES]
    clfs = [classifiers[n] for n in NAMES]
    # each classifier's last weight matrix (the official code's 'out_layer.weight')
    heads_w = [[p for p in c.parameters() if p.dim() >= 2][-1] for c in clfs]
    u = model.head.weight
    m = len(NAMES)
    previous = torch.zeros(m, dtype=torch.float64, device=u.device)  # accuracies, step t-1

    def step(batch: Batch) -> None:
        xs, y = batch
        logits, feats = model(xs)
        outs = [c(feats[n].detach()) for n, c in zip(NAMES, clfs, strict=True)]
        with torch.no_grad():
            acc = torch.stack([(o.argmax(1) == y).double().mean() for o in outs])
            delta = (acc - previous).clamp_min(0.0)
            total = delta.sum()
            b = torch.where(
                total > 1e-6,
                (total - delta) / total.clamp_min(1e-6),
                torch.full_like(delta, (m - 1) / m),
            )
            previous.copy_(acc)
            bw = b.to(u.dtype)
            k = (rho * b).to(u.dtype).unbind()
        flat_u = u.flatten()
        cos = torch.stack(
            [F.cosine_similarity(flat_u, v.detach().flatten(), dim=0) for v in heads_w]
        )
        l_gm = (bw.abs() - bw * cos).mean()
        loss = F.cross_entropy(logits, y) + sum(F.cross_entropy(o, y) for o in outs) + lam * l_gm
        backward_scale_step(loss, encoders, k, opt)

    return step


def agm_hand_step(
    model: MultiModalNet, *, alpha: float = AGM_ALPHA, make_opt: MakeOpt = adam
) -> Callable[[Batch], None]:
    r"""AGM written inline, as the official three-modality script (URFunny) does, computing
    gradmod's DEFAULT rule (that of the ``agm`` row, ``AGM(alpha)``), not ``official=True``.

    As officially: the fusion head on every coalition of the features, missing ones zeroed
    (the six masked passes in eval mode), each modality's Shapley response written out for
    three modalities (the empty coalition worth 0), :math:`s_m` the mean negative
    log-likelihood of response ``m``, :math:`r_m = e^{\text{mean}_{j\ne m}s_j - s_m}`,
    :math:`\bar r_m` the same from the running means of the previous steps (0 at the first),
    :math:`k_m = e^{\alpha(\bar r_m - r_m)}` and the gradient flowing into response ``m``
    multiplied by :math:`k_m` (a tensor hook, where the official model has a module backward
    hook). gradmod's default differs from the official rule in two documented places (README,
    "AGM"), written here as gradmod computes them: the exponent's argument clamped to
    :math:`[-1, 1]` (official: :math:`\le 7` only) and the score floored,
    :math:`-\log\max(p, 10^{-8})` (official, three modalities: no floor). The default is the
    pair's side because it is what the ``agm`` row times; the difference in cost is one clamp.
    Scores in float64, as gradmod's. The forward is the ``agm`` row's (``model(xs)``, whose
    fused logits are unused, then the head passes), so both rows do the same model work.
    """
    opt = make_opt(list(model.parameters()))
    head = model.head
    assert len(NAMES) == 3, "the Shapley responses below are written out for three modalities"
    running = torch.zeros(3, dtype=torch.float64, device=head.weight.device)
    counter = [0]
    log_floor = math.log(1e-8)

    def step(batch: Batch) -> None:
        xs, y = batch
        _, feats = model(xs)
        a, v, t = (feats[n] for n in NAMES)
        za, zv, zt = torch.zeros_like(a), torch.zeros_like(v), torch.zeros_like(t)
        full = head(torch.cat([a, v, t], 1))
        head.eval()
        no_a = head(torch.cat([za, v, t], 1))
        no_v = head(torch.cat([a, zv, t], 1))
        no_t = head(torch.cat([a, v, zt], 1))
        only_a = head(torch.cat([a, zv, zt], 1))
        only_v = head(torch.cat([za, v, zt], 1))
        only_t = head(torch.cat([za, zv, t], 1))
        head.train()
        phi = [
            (full - no_a + only_a) / 3 + (no_t - only_v + no_v - only_t) / 6,
            (full - no_v + only_v) / 3 + (no_t - only_a + no_a - only_t) / 6,
            (full - no_t + only_t) / 3 + (no_v - only_a + no_a - only_v) / 6,
        ]
        with torch.no_grad():
            s = torch.stack(
                [
                    -F.log_softmax(p.double(), 1).gather(1, y[:, None]).clamp_min(log_floor).mean()
                    for p in phi
                ]
            )
            r = torch.exp((s.sum() - s) / 2 - s)
            r_bar = torch.exp((running.sum() - running) / 2 - running)
            k = torch.exp(alpha * (r_bar - r).clamp(-1.0, 1.0)).to(phi[0].dtype).unbind()
            counter[0] += 1
            running.mul_((counter[0] - 1) / counter[0]).add_(s / counter[0])
        for p, km in zip(phi, k, strict=True):
            p.register_hook(lambda g, km=km: g * km)
        F.cross_entropy(phi[0] + phi[1] + phi[2], y).backward()
        opt.step()
        opt.zero_grad()

    return step


# ---------------------------------------------------------------------------------- measuring
def quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def median_ci(xs: Sequence[float]) -> tuple[float, float]:
    """Distribution-free ~95 % confidence interval of the median (order statistics)."""
    v = sorted(xs)
    n = len(v)
    half = 0.98 * math.sqrt(n)  # 1.96 * sqrt(n) / 2: normal approximation of Binomial(n, 1/2)
    lo = max(0, math.floor(n / 2 - half))
    hi = min(n - 1, math.ceil(n / 2 + half) - 1)
    return v[lo], v[hi]


@dataclass
class Row:
    variant: str
    median_ms: float
    ratio: float
    q1: float
    q3: float
    ci: tuple[float, float]

    @property
    def overhead_pct(self) -> float:
        return (self.ratio - 1.0) * 100.0


def run_model(
    spec: ModelSpec,
    *,
    reps: int,
    warmup: int,
    inner: int,
    n_batches: int,
    device: torch.device,
    rng: random.Random,
    selected: Sequence[str] = VARIANTS,
) -> tuple[list[Row], int, float, list[str]]:
    torch.manual_seed(0)
    base = spec.build()
    n_params = sum(p.numel() for p in base.parameters())
    variants = make_variants(base, device, selected)
    batches: list[Batch] = [
        (
            [torch.randn(spec.batch, *s, device=device) for s in spec.input_shapes],
            torch.randint(0, N_CLASSES, (spec.batch,), device=device),
        )
        for _ in range(n_batches)
    ]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def sample(v: Variant, r: int) -> float:
        sync()
        t0 = time.perf_counter()
        for k in range(inner):
            v.step(batches[(r * inner + k) % n_batches])
        sync()
        return (time.perf_counter() - t0) / inner

    order = list(variants)
    for r in range(warmup):
        rng.shuffle(order)
        for v in order:
            sample(v, r)
    gc.collect()
    t_start = time.perf_counter()
    for r in range(reps):
        rng.shuffle(order)
        for v in order:
            v.times.append(sample(v, r))
    elapsed = time.perf_counter() - t_start

    plain = variants[0].times
    rows = []
    for v in variants:
        ratios = [t / p for t, p in zip(v.times, plain, strict=True)]
        q1, med, q3 = quartiles(ratios)
        ci = median_ci(ratios)
        rows.append(Row(v.name, statistics.median(v.times) * 1e3, med, q1, q3, ci))
    lines = monitor_lines(variants) + hand_lines(variants) + noise_lines(variants)
    return rows, n_params, elapsed, lines


def paired(times: dict[str, list[float]], a: str, b: str) -> str | None:
    """``a`` against ``b``, paired per repetition: the median ratio, its change in percent and
    its ~95 % CI, formatted; ``None`` if either was not timed."""
    if a not in times or b not in times:
        return None
    ratios = [x / y for x, y in zip(times[a], times[b], strict=True)]
    lo, hi = median_ci(ratios)
    med = statistics.median(ratios)
    return f"{med:.4f} ({(med - 1) * 100:+.2f} %), 95 % CI [{lo:.4f}, {hi:.4f}]"


def monitor_lines(variants: Sequence[Variant]) -> list[str]:
    """The Monitor's own cost: each monitored row paired with the same row without it."""
    times = {v.name: v.times for v in variants}
    return [
        f"monitor cost, {off.split(' (')[0]}: on / off {line}"
        for on, off in MONITORED.items()
        if (line := paired(times, on, off)) is not None
    ]


def hand_lines(variants: Sequence[Variant]) -> list[str]:
    """gradmod's full step of a method against its hand-written equivalent, paired per
    repetition (the median of gradmod / hand, with its ~95 % CI)."""
    times = {v.name: v.times for v in variants}
    return [
        f"gradmod / hand-written, {full.split(' (')[0]}: {line}"
        for full, hand in HANDWRITTEN.items()
        if (line := paired(times, full, hand)) is not None
    ]


def noise_lines(variants: Sequence[Variant]) -> list[str]:
    """OGM-GE's noise's own cost: the full row paired with the same row without the noise
    (the median of full / without noise per repetition, with its ~95 % CI)."""
    times = {v.name: v.times for v in variants}
    return [
        f"{full.split(' ')[0]} noise cost: {full.split(' (')[0]} / {quiet.split(' (')[0]} {line}"
        for full, quiet in NOISE.items()
        if (line := paired(times, full, quiet)) is not None
    ]


def copy_line(spec: ModelSpec) -> str:
    """The update level's extra memory: none on the fast path, one copy of the encoders'
    parameters (the modulated tensors) on the general path, held during ``optimizer.step()``."""
    torch.manual_seed(0)
    model = spec.build()
    params = [p for path in PATHS.values() for p in model.get_submodule(path).parameters()]
    mib = sum(p.numel() * p.element_size() for p in params) / 2**20
    return (
        "update level, extra memory: fast path none; general path one copy of the modulated "
        f"parameters during the step, {len(params)} tensors, {mib:.2f} MiB"
    )


def markdown(rows: Sequence[Row]) -> str:
    lines = [
        "| variant | median step (ms) | ratio vs plain (median [IQR]) | overhead % |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.variant} | {row.median_ms:.3f} | "
            f"{row.ratio:.4f} [{row.q1:.4f}, {row.q3:.4f}] | {row.overhead_pct:+.2f} |"
        )
    return "\n".join(lines)


def ci_line(rows: Sequence[Row]) -> str:
    parts = [f"{r.variant.split(' (')[0]} [{r.ci[0]:.4f}, {r.ci[1]:.4f}]" for r in rows[1:]]
    return "95 % CI of the median ratio: " + "; ".join(parts)


def source_info() -> str:
    """Where gradmod was imported from, and its git revision when it is a checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(gradmod.__file__)))
    info = f"gradmod {gradmod.__version__} from {root}"
    try:
        rev = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "gradmod"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return info
    if rev.returncode == 0:
        info += (
            f" (git {rev.stdout.strip()}{', gradmod/ modified' if dirty.stdout.strip() else ''})"
        )
    return info


def machine_info() -> str:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (
        f"{platform.platform()}; CPU {cpu}; {os.cpu_count()} logical cores; "
        f"load average {load}; Python {platform.python_version()}"
    )


# -------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--models", default="mlp,transformer", help="comma-separated: mlp,transformer")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default per model)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed repetitions (default per model)"
    )
    p.add_argument("--inner", type=int, default=None, help="steps per timed sample")
    p.add_argument("--quick", action="store_true", help="few repetitions: a sanity run")
    p.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated subset to time (plain is always timed): {', '.join(KEYS)}",
    )
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled orders")
    p.add_argument("--batches", type=int, default=4, help="distinct batches, cycled")
    p.add_argument("--mlp-hidden", type=int, default=128)
    p.add_argument("--mlp-out", type=int, default=64)
    p.add_argument("--mlp-batch", type=int, default=64)
    p.add_argument("--tf-d-model", type=int, default=256)
    p.add_argument("--tf-layers", type=int, default=3)
    p.add_argument("--tf-ff", type=int, default=1536)
    p.add_argument("--tf-seq", type=int, default=32)
    p.add_argument("--tf-batch", type=int, default=16)
    args = p.parse_args(argv)
    if args.variants is not None:
        keys = [k.strip() for k in args.variants.split(",") if k.strip()]
        unknown = [k for k in keys if k not in KEYS]
        if unknown:
            p.error(f"--variants: unknown {unknown}; choose from {', '.join(KEYS)}")
        args.selected = [PLAIN, *(KEYS[k] for k in keys if KEYS[k] != PLAIN)]
    else:
        args.selected = list(VARIANTS)
    for name in ("reps", "warmup", "inner"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            p.error(f"--{name} must be at least {0 if name == 'warmup' else 1}; got {value}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, list[Row]]:
    """Run the benchmark, print one Markdown table per model, return the rows per model."""
    args = parse_args(argv)
    device = torch.device(args.device)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if argv is None:
        cmd = " ".join(["python", *sys.argv])
    else:
        cmd = f"main([{', '.join(repr(a) for a in argv)}])"
    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    results: dict[str, list[Row]] = {}
    try:
        print(f"command: {cmd}")
        print(
            f"torch {torch.__version__}; threads {torch.get_num_threads()} "
            f"(torch.set_num_threads); device {device}"
        )
        print(source_info())
        print(f"machine: {machine_info()}")
        rng = random.Random(args.seed)
        t_all = time.perf_counter()
        for name in names:
            spec = build_spec(name, args)
            reps = args.reps if args.reps is not None else (5 if args.quick else spec.reps)
            warmup = args.warmup if args.warmup is not None else (1 if args.quick else spec.warmup)
            inner = args.inner if args.inner is not None else spec.inner
            rows, n_params, elapsed, mon_lines = run_model(
                spec,
                reps=reps,
                warmup=warmup,
                inner=inner,
                n_batches=max(1, args.batches),
                device=device,
                rng=rng,
                selected=args.selected,
            )
            results[name] = rows
            print()
            print(f"### {name}: {n_params:,} parameters")
            print(f"{spec.describe}; Adam")
            print(
                f"{reps} interleaved repetitions x {inner} step(s) per sample, {warmup} warm-up; "
                f"timed part {elapsed:.1f} s"
            )
            print()
            print(markdown(rows))
            print()
            print(ci_line(rows))
            for line in mon_lines:
                print(line)
            if UPDATE_GENERAL in args.selected:
                print(copy_line(spec))
        print()
        print(f"total wall time {time.perf_counter() - t_all:.1f} s")
    finally:
        torch.set_num_threads(old_threads)
    return results


if __name__ == "__main__":
    main()
