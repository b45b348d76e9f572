"""OPM: on-the-fly prediction modulation (Wei, Hu, Du, Wen, TPAMI 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import functional as GF
from .._protocol import (
    Binding,
    Injection,
    Method,
    Needs,
    Prepared,
    Step,
    StepPlan,
    class_index_problem,
    coefficient_dtype,
    epoch_number,
)
from ._args import check_args
from ._heads import logits_problems, unimodal_logits
from ._registry import register

__all__ = ["OPM"]

_SEED_SPACE = 2**63
_DECISION = -1  # the rank slot of the execute decision's seed: the same on every rank


def _integer(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class _Drawn:
    """What one prepared forward decided (``Step.carry`` of its block)."""

    scores: Tensor  # [M] global summed true-class probabilities
    drop_probability: Tensor  # [M]
    kept: Tensor  # [M] fraction of this rank's samples that kept each modality
    lost: Tensor  # [M] long, samples of this rank whose features were zeroed
    executed: Tensor  # 0-d bool
    leak: dict[str, Tensor] | None  # theta_gradient: d(theta^2/2)/d features, per modality
    ok: Tensor  # 0-d bool: every score is finite (else a neutral step: nothing dropped)


@register(
    "opm",
    presets={
        "opm-official": (
            lambda m: OPM(theta_gradient=True),
            "OPM with the official code's gradient of theta into the scores",
        ),
        "opm-unbiased": (
            lambda m: OPM(rescale="per_modality", p_exe=1.0),
            "OPM as inverted dropout per modality on every step (kept features unbiased)",
        ),
    },
)
class OPM(Method):
    r"""On-the-fly prediction modulation: drop the dominant modality's features in the forward.

    Every training forward, before fusion (``ctx.prepare``): the scores :math:`s_m` are OGM-GE's
    (summed true-class probabilities of the unimodal logits read off the fusion head, or of the
    per-modality parts of a "sum" head given as ``classifiers``), summed over ranks; the
    dropping probability is :math:`q_m = \min(1, q_{base}(1 + \lambda\tanh(\rho_m - 1)))` for
    a dominant modality (:math:`\rho_m > 1`), else 0
    (:func:`gradmod.functional.opm_drop_probability`). With probability ``p_exe`` the step
    drops: each sample's features of modality ``m`` are zeroed with probability :math:`q_m`,
    and what is kept is rescaled (:func:`gradmod.functional.opm_drop`). The coefficients are
    ones: OPM changes the forward, not the gradients' scale (the gradient reaching
    ``features[m]`` is the incoming one times the mask and the factor).

    Randomness: the execute decision is drawn from a generator seeded by ``(seed, step,
    micro)``, identical on every rank; the masks from one seeded by ``(seed, step, micro,
    rank)``: independent per rank. ``step`` counts the optimizer steps (blocks with
    ``boundary=True``) and ``micro`` the earlier micro-batches of the current accumulation
    window; both are in the state, so a resumed run draws the same masks, and a block that
    raises is redone with the same draws. Under DDP, q and the decision are global, the masks
    per rank (a DDP run is not the single-process run on the full batch).

    Args:
        q_base: :math:`q_{base} \in [0, 1]` (official 0.5).
        lam: :math:`\lambda \ge 0` (official 0.5).
        p_exe: probability that a step drops at all (official 0.7).
        rescale: ``"shared"`` (official: :math:`1/(1-\theta)` for every modality, with
            :math:`\theta` the width-weighted mean q), ``"per_modality"`` (inverted dropout,
            :math:`1/(1-q_m)`) or ``"none"`` (see :func:`gradmod.functional.opm_feature_scale`).
        window: ``(first, last)`` epochs, inclusive (``last`` ``None``: open), in which OPM
            drops; ``None`` (default): always. The official code drops from epoch 6 on (its
            warm-up): ``window=(6, None)``. Set the epoch with ``ctx.set_epoch``.
        theta_gradient: reproduce the official ``custom_autograd``, whose backward returns
            :math:`\theta` as the gradient of :math:`\theta`: with the scores taken from the
            live features, the encoders then also receive :math:`\nabla(\theta^2/2)` on every
            executed step (added to the features' gradients; the loss-scale and ``weight=``
            apply). gradmod's default (``False``) treats q and :math:`\theta` as constants.
        seed: seed of the draws.

    State (``state_dict``): ``steps``, ``micro``, ``epoch``, ``executed_steps``, ``skipped``
    (steps whose scores were not finite, e.g. a NaN batch: nothing dropped, ``last_scores``
    kept, zeros before any finite step), per modality ``last_scores``, ``last_drop_probability`` and ``dropped`` (samples of
    this rank whose features were zeroed, summed over the run).
    """

    steps: Tensor
    micro: Tensor
    epoch: Tensor
    executed_steps: Tensor
    skipped: Tensor
    last_scores: Tensor
    last_drop_probability: Tensor
    dropped: Tensor

    def __init__(
        self,
        *,
        q_base: float = 0.5,
        lam: float = 0.5,
        p_exe: float = 0.7,
        rescale: GF.Rescale = "shared",
        window: tuple[int, int | None] | None = None,
        theta_gradient: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        choices = []
        if rescale not in ("shared", "per_modality", "none"):
            choices.append(
                f"OPM: rescale must be 'shared', 'per_modality' or 'none'; got {rescale!r}"
            )
        if window is not None and not (
            isinstance(window, tuple | list)
            and len(window) == 2
            and _integer(window[0])
            and (window[1] is None or _integer(window[1]))
            and 0 <= window[0] <= (window[0] if window[1] is None else window[1])
        ):
            choices.append(
                "OPM: window must be (first, last) epochs with 0 <= first <= last (last may be "
                f"None: open), or None; got {window!r}"
            )
        if not isinstance(seed, int) or isinstance(seed, bool):
            choices.append(f"OPM: seed must be an integer; got {seed!r}")
        check_args(
            "OPM",
            [
                ("q_base", q_base, 0.0, True, 1.0),
                ("lam", lam, 0.0, True, None),
                ("p_exe", p_exe, 0.0, True, 1.0),
            ],
            choices,
        )
        self.q_base, self.lam, self.p_exe = float(q_base), float(lam), float(p_exe)
        self.rescale: GF.Rescale = rescale
        self.window = None if window is None else (int(window[0]), window[1])
        self.theta_gradient = bool(theta_gradient)
        self.seed = int(seed)
        for name in ("steps", "micro", "epoch", "executed_steps", "skipped"):
            self.register_buffer(name, torch.zeros((), dtype=torch.long))
        self.register_buffer("last_scores", torch.zeros(0))
        self.register_buffer("last_drop_probability", torch.zeros(0))
        self.register_buffer("dropped", torch.zeros(0, dtype=torch.long))
        self._generators: dict[tuple[torch.device, str], torch.Generator] = {}

    def needs(self) -> Needs:
        return Needs(
            classifiers="optional",
            injects_into_features=self.theta_gradient,
            per_modality_state=("last_scores", "last_drop_probability", "dropped"),
            fusion="reads",
            forward=True,
        )

    def extra_repr(self) -> str:
        return (
            f"q_base={self.q_base}, lam={self.lam}, p_exe={self.p_exe}, "
            f"rescale={self.rescale!r}, window={self.window}, "
            f"theta_gradient={self.theta_gradient}"
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch_number("OPM", epoch))

    def reset(self) -> None:
        for name in ("steps", "micro", "epoch", "executed_steps", "skipped"):
            getattr(self, name).zero_()
        device = self.steps.device
        self.last_scores = torch.zeros(0, device=device)
        self.last_drop_probability = torch.zeros(0, device=device)
        self.dropped = torch.zeros(0, dtype=torch.long, device=device)

    def check(self, binding: Binding) -> list[str]:
        return logits_problems("OPM", binding)

    def check_step(self, binding: Binding, step: Step) -> list[str]:
        first = next(iter(step.features.values()), None)
        batch = int(first.shape[0]) if isinstance(first, Tensor) and first.dim() else None
        return class_index_problem("OPM", step.targets, batch)

    def in_window(self) -> bool:
        """Whether the current epoch lies in the dropping window."""
        if self.window is None:
            return True
        first, last = self.window
        e = int(self.epoch)
        return first <= e and (last is None or e <= last)

    # ------------------------------------------------------------------------------ forward
    def _generator(self, device: torch.device, slot: str, key: tuple[int, ...]) -> torch.Generator:
        """The generator of ``slot`` on ``device``, seeded by ``key``."""
        gen = self._generators.get((device, slot))
        if gen is None:
            gen = self._generators[(device, slot)] = torch.Generator(device=device)
        return gen.manual_seed(hash(key) % _SEED_SPACE)

    def prepare(self, binding: Binding, step: Step) -> Prepared:
        names = binding.names
        feats = [step.features[n] for n in names]
        device = feats[0].device
        dtype = coefficient_dtype(binding.device)
        live = self.theta_gradient
        logits = unimodal_logits("OPM", binding, feats, live=live)
        with torch.set_grad_enabled(live):
            local = torch.stack(
                [GF.true_class_probability(z.to(dtype), step.targets).sum() for z in logits]
            )
            # global sums; under theta_gradient the gradient flows through the local part
            total = step.reduce(local.detach().to(binding.device)).to(local.device)
            scores = local + (total - local.detach())
            ok = torch.isfinite(scores.detach()).all()  # else neutral: nothing dropped
            active = self.in_window()
            q = self._drop_probability(scores) if active else torch.zeros_like(scores)
            q = torch.where(ok, q, torch.zeros_like(q))
        key = (self.seed, int(self.steps), int(self.micro))
        drop = GF.opm_drop(
            feats,
            q.detach().to(device),
            generator=self._generator(device, "masks", (*key, step.rank)),
            p_exe=self.p_exe if active else 0.0,
            execute_generator=self._generator(device, "execute", (*key, _DECISION)),
            rescale=self.rescale,
        )
        leak = None
        if live:
            dims = [f[0].numel() for f in feats]
            theta = torch.stack([q[i] * (d / sum(dims)) for i, d in enumerate(dims)]).sum()
            # the official backward returns theta as theta's gradient: the gradient of
            # theta^2 / 2, on executed steps; DDP averages over ranks what the full batch sums
            half = 0.5 * theta.square() * step.world
            wanted = [f for f in feats if f.requires_grad]
            grads = (
                torch.autograd.grad(half, wanted, allow_unused=True) if half.requires_grad else ()
            )
            by_id = {id(f): g for f, g in zip(wanted, grads, strict=True) if g is not None}
            leak = {}
            for n, f in zip(names, feats, strict=True):
                g = by_id.get(id(f), torch.zeros_like(f))
                g = torch.where(ok.to(g.device), g, torch.zeros_like(g))
                leak[n] = (g * drop.executed.to(g.dtype)).detach()
        drawn = _Drawn(
            scores=scores.detach(),
            drop_probability=q.detach(),
            kept=drop.keep.to(dtype).mean(dim=1).to(binding.device),
            lost=(~drop.keep).sum(dim=1),
            executed=drop.executed,
            leak=leak,
            ok=ok,
        )
        return Prepared(dict(zip(names, drop.features, strict=True)), drawn)

    def _drop_probability(self, scores: Tensor) -> Tensor:
        """q from the scores; differentiable through the scores when ``theta_gradient`` (the
        official ``calcu_q`` keeps the graph), else detached."""
        if not self.theta_gradient:
            return GF.opm_drop_probability(scores, q_base=self.q_base, lam=self.lam)
        q0 = GF.opm_drop_probability(scores.detach(), q_base=self.q_base, lam=self.lam)
        dominant = q0 > 0
        rho = GF.one_vs_others_ratio(scores)
        q = self.q_base * (1.0 + self.lam * torch.tanh(torch.where(dominant, rho - 1.0, 0.0)))
        q = torch.where(dominant, q, torch.zeros_like(q))
        return torch.where(q > 1.0, q.detach().clamp(max=1.0), q)  # clip: no gradient beyond

    # --------------------------------------------------------------------------------- step
    def plan(self, binding: Binding, step: Step) -> StepPlan:
        dtype = coefficient_dtype(binding.device)
        m = len(binding.names)
        k = torch.ones(m, dtype=dtype, device=binding.device)
        drawn: _Drawn | None = step.carry
        boundary = step.boundary

        def commit() -> None:
            with torch.no_grad():
                if drawn is not None:
                    ok = drawn.ok
                    before = (
                        self.last_scores.to(drawn.scores)
                        if self.last_scores.shape == drawn.scores.shape
                        else torch.zeros_like(drawn.scores)
                    )
                    self.last_scores = torch.where(ok, drawn.scores, before)
                    self.skipped = self.skipped.to(ok.device) + (~ok).to(self.skipped.dtype)
                    self.last_drop_probability = drawn.drop_probability.clone()
                    lost = drawn.lost
                    before = (
                        self.dropped.to(lost.device)
                        if self.dropped.shape == lost.shape
                        else torch.zeros_like(lost)
                    )
                    self.dropped = before + lost
                    self.executed_steps = self.executed_steps.to(lost.device) + drawn.executed.to(
                        torch.long
                    )
                if boundary:
                    self.steps += 1
                    self.micro.zero_()
                else:
                    self.micro += 1

        if drawn is None:  # not a training forward: nothing was dropped
            return StepPlan(k, commit=commit)
        inject = []
        if drawn.leak is not None:
            inject = [
                Injection(step.features[n], drawn.leak[n], f"features[{n!r}] (OPM's theta)")
                for n in binding.names
            ]
        return StepPlan(
            k,
            inject=inject,
            commit=commit,
            scores={
                "true_class_probability_sum": drawn.scores,
                "drop_probability": drawn.drop_probability,
                "kept_fraction": drawn.kept,
            },
        )
