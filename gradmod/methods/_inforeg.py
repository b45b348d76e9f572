"""InfoReg: information acquisition regulation (Huang et al., CVPR 2025)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as GF
from .._protocol import (
    Binding,
    Injection,
    Method,
    Needs,
    Step,
    StepPlan,
    class_index_problem,
    coefficient_dtype,
    epoch_number,
    finite_step,
)
from ._args import Check, check_args
from ._heads import fusion_width_problem, unimodal_logits
from ._registry import register

__all__ = ["InfoReg"]

#: Which acquisition rate opens the window of each modality: its own (``"own"``) or the first
#: modality's for every modality (``"first"``, the official code: audio's gates both).
Gate = Literal["own", "first"]
#: How the true-class probabilities of a batch make a score: their mean, or their sum (official).
ScoreReduction = Literal["mean", "sum"]

_NEVER = -1  # ``epoch`` / ``anchor_epoch`` before any set_epoch / anchor


def _sharded(t: Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (FSDP2 / tensor parallel), without importing DTensor."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return isinstance(dtensor, type) and isinstance(t, dtensor)


def _official(m: int) -> InfoReg:
    """The official configuration for ``m`` modalities: the first modality (audio) at 0.95,
    the others (visual) at 0.1, the first modality's rate gating all, summed scores."""
    return InfoReg(strength=(0.95,) + (0.1,) * (m - 1), gate="first", score="sum")


@register(
    "inforeg",
    presets={
        "inforeg-official": (
            _official,
            "InfoReg as the official code: strengths 0.95 / 0.1, audio's rate gates both, "
            "summed scores",
        )
    },
)
class InfoReg(Method):
    r"""Information acquisition regulation: slow the prime modality while it learns fastest.

    During the "prime learning window" (early training, while the information the encoders
    acquire still grows quickly) the modality whose unimodal predictions are best is pulled
    back toward its encoder's weights at the start of the epoch: encoder :math:`m`'s gradient
    gets :math:`\beta_m(\theta_m - \tilde\theta_m)` added, the gradient of the proximal penalty
    :math:`\tfrac{\beta_m}{2}\lVert\theta_m - \tilde\theta_m\rVert^2`. Nothing is rescaled: the
    coefficients are all 1.

    Per step (``docs/methods/inforeg.md`` has the official file:line of each rule):

    * the unimodal logits are read off the fusion head, one ``nn.Linear`` over the features
      concatenated in modality order (``fusion=``): :math:`z_m = h_m W_m^\top + b/M`; their
      cross-entropies join the objective with weight ``weight`` (official 1): gradmod adds
      their gradients to the features inside backward and to the fusion weight and bias after
      it, so your loss stays :math:`\mathrm{CE}(z_\text{fused}, y)`;
    * the score :math:`s_m` is the mean (or, ``score="sum"``, the sum) over the global batch of
      the true-class probability of :math:`z_m`;
    * :math:`\beta = ` :func:`gradmod.functional.inforeg_beta` of the scores and the epoch's
      acquisition rate: :math:`\lambda_m e^{\tanh\delta_m}` for the strict leader
      (:math:`\delta_m > 0`) when its rate exceeds ``threshold``, else 0;
    * the pull :math:`\beta_m(\theta - \tilde\theta)` on every trainable parameter of encoder
      :math:`m`, added after backward (zero at the first step of each epoch, where the anchor
      :math:`\tilde\theta` is taken);
    * after the backward that completes an optimizer step's gradients (``boundary=True``), the
      step's information amount :func:`gradmod.functional.fisher_trace` of each encoder's weight
      tensors (every tensor with 2 or more dimensions: the official ``Conv2d`` / ``Linear``
      weights) is read from the final gradients (pull included, unscaled by a ``GradScaler``'s
      scale; a non-finite step counts 0) and summed over the epoch.

    At every epoch change (:meth:`ModulationContext.set_epoch`, required: a step before the
    first ``set_epoch`` is refused) the epoch's trace is appended to the history, from which
    :func:`gradmod.functional.acquisition_rate` gives the rate that gates the new epoch, and the
    anchor is retaken by the first clean block of the new epoch.

    Args:
        strength: :math:`\lambda \ge 0`, one value for every modality or one per modality.
            Default 0.95 for every modality: the official strength of the modality that leads
            in the official setting (audio on CREMA-D). The official code hard-codes 0.95 for
            audio and 0.1 for visual (preset ``"inforeg-official"``), a per-name choice with no
            meaning for other modalities.
        threshold: :math:`\tau`, the rate above which the window is open (official 0.05).
        window: epochs of the trace's moving sum (official 10).
        gate: ``"own"`` (default): each modality's window is opened by its own rate;
            ``"first"``: by the first modality's rate for every modality (official: audio's
            gates both). The two agree whenever the first modality is the one regulated.
        score: ``"mean"`` (default): mean true-class probability, so the gap :math:`\delta`
            and :math:`\beta` do not depend on the batch size; ``"sum"``: the official batch
            sum (with a batch of 64, :math:`\beta` is near :math:`e\lambda` as soon as one
            modality leads by a few hundredths).
        versus: what the leader's score is compared with for ``M > 2`` (``"runner_up"`` or
            ``"mean"``, see :func:`gradmod.functional.inforeg_beta`); identical for ``M = 2``.
        weight: weight of the unimodal cross-entropies in the objective (official 1; 0 keeps
            only the pull, the scores are still read off the fusion head).

    Use at the gradient level only (``act="update"`` is refused: InfoReg scales nothing, and a
    pull decoupled from the optimizer is not implemented). Under DDP the scores are global
    (sums and counts all-reduced) and the trace is read from the all-reduced gradient, so every
    rank holds the same state; the pull is identical on every rank but travels through
    gradmod's all-reduce of the method's own gradients (one encoder-sized all-reduce per step
    while the window is open; none at the first step of an epoch or once the window is closed).
    Under gradient accumulation every micro-batch decides its own :math:`\beta` and adds its
    pull times ``weight=`` (``weight=1/n`` adds :math:`\beta(\theta-\tilde\theta)` once per
    optimizer step when the micro-batches agree), and the trace is read once, on the
    accumulated gradient of the block with ``boundary=True``.

    State (``state_dict``): ``epoch``, ``anchor_epoch`` and ``anchor`` (the epoch-start weights
    of every encoder parameter, flattened, in their common dtype), ``epoch_trace`` (this epoch's
    trace so far), ``traces`` (``[M, E]``, one column per completed epoch), ``last_beta``,
    ``last_scores``, ``steps`` and ``skipped``.
    """

    epoch: Tensor
    anchor_epoch: Tensor
    anchor: Tensor
    epoch_trace: Tensor
    traces: Tensor
    last_beta: Tensor
    last_scores: Tensor
    steps: Tensor
    skipped: Tensor

    def __init__(
        self,
        *,
        strength: float | Sequence[float] = 0.95,
        threshold: float = 0.05,
        window: int = 10,
        gate: Gate = "own",
        score: ScoreReduction = "mean",
        versus: GF.Versus = "runner_up",
        weight: float = 1.0,
    ) -> None:
        super().__init__()
        strengths = [strength] if isinstance(strength, int | float) else list(strength)
        choices: list[str] = []
        if not strengths:
            choices.append("InfoReg: strength must be a number or a non-empty sequence")
        if gate not in ("own", "first"):
            choices.append(f"InfoReg: gate must be 'own' or 'first'; got {gate!r}")
        if score not in ("mean", "sum"):
            choices.append(f"InfoReg: score must be 'mean' or 'sum'; got {score!r}")
        if versus not in ("runner_up", "mean"):
            choices.append(f"InfoReg: versus must be 'runner_up' or 'mean'; got {versus!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            choices.append(f"InfoReg: window must be an integer >= 1; got {window!r}")
        checks: list[Check] = [
            (f"strength[{i}]", s, 0.0, True, None) for i, s in enumerate(strengths)
        ]
        checks += [("threshold", threshold, None, True, None), ("weight", weight, 0.0, True, None)]
        check_args("InfoReg", checks, choices)
        self.strength: tuple[float, ...] = tuple(float(s) for s in strengths)
        self._strengths: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}
        self.threshold = float(threshold)
        self.window = int(window)
        self.gate: Gate = gate
        self.score: ScoreReduction = score
        self.versus: GF.Versus = versus
        self.weight = float(weight)
        self.register_buffer("epoch", torch.full((), _NEVER, dtype=torch.long))
        self.register_buffer("anchor_epoch", torch.full((), _NEVER, dtype=torch.long))
        self.register_buffer("anchor", torch.zeros(0))
        self.register_buffer("epoch_trace", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("traces", torch.zeros(0, 0, dtype=torch.float64))
        self.register_buffer("last_beta", torch.zeros(0))
        self.register_buffer("last_scores", torch.zeros(0))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped", torch.zeros((), dtype=torch.long))
        # Host-side: whether the window is open for some modality this epoch (None: not known
        # yet; one host read per epoch, after set_epoch or a load).
        self._open: bool | None = None

    # ------------------------------------------------------------------------ configuration
    def needs(self) -> Needs:
        return Needs(
            injects_into_features=self.weight > 0,
            per_modality_state=("epoch_trace", "traces", "last_beta", "last_scores"),
            fusion="changes" if self.weight > 0 else "reads",
        )

    def extra_repr(self) -> str:
        strength = self.strength[0] if len(self.strength) == 1 else list(self.strength)
        return (
            f"strength={strength}, threshold={self.threshold}, window={self.window}, "
            f"gate={self.gate!r}, score={self.score!r}, versus={self.versus!r}, "
            f"weight={self.weight}"
        )

    def check(self, binding: Binding) -> list[str]:
        problems: list[str] = []
        m = len(binding.names)
        if not isinstance(binding.fusion_module, nn.Linear):
            got = type(binding.fusion_module).__name__ if binding.fusion_module else "nothing"
            problems.append(
                "InfoReg reads unimodal logits off the fusion head: pass fusion= one nn.Linear "
                f"over the features concatenated in modality order (got {got})"
            )
        if len(self.strength) not in (1, m):
            problems.append(
                f"InfoReg: strength has {len(self.strength)} values but there are {m} "
                f"modalities ({list(binding.names)}): give one value, or one per modality"
            )
        if binding.act == "update":
            problems.append(
                "InfoReg adds a proximal pull to the encoders' gradients and scales nothing, so "
                "it has no coefficient to put on the updates (a pull decoupled from the "
                "optimizer is not implemented): use act='gradient' (and no optimizer=)"
            )
        if any(_sharded(p) for ps in binding.groups.values() for p in ps):
            problems.append(
                "InfoReg adds its pull to the encoders' parameter gradients and reads them, which "
                "FSDP-sharded (DTensor) parameters do not allow exactly: use "
                "DistributedDataParallel"
            )
        return problems

    def check_step(self, binding: Binding, step: Step) -> list[str]:
        problems: list[str] = []
        if int(self.epoch) < 0:
            problems.append(
                "InfoReg counts epochs (its anchor and its window): call ctx.set_epoch(epoch) "
                "at the start of every epoch, before the first step"
            )
        fusion = binding.fusion_module
        if isinstance(fusion, nn.Linear):
            widths = [int(step.features[n].shape[-1]) for n in binding.names]
            problem = fusion_width_problem("InfoReg", fusion, widths)
            if problem is not None:
                problems.append(problem)
        size = sum(p.numel() for ps in binding.groups.values() for p in ps)
        if int(self.anchor_epoch) >= 0 and self.anchor.numel() != size:
            problems.append(
                f"InfoReg's anchor holds {self.anchor.numel()} values but the encoders have "
                f"{size} parameters: the state belongs to another model (call reset())"
            )
        first = next(iter(step.features.values()), None)
        batch = int(first.shape[0]) if isinstance(first, Tensor) and first.dim() else None
        return problems + class_index_problem("InfoReg", step.targets, batch)

    # ---------------------------------------------------------------------------------- epochs
    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch``: the trace of the epoch that was open (if any) joins the
        history, and the next clean block retakes the anchor. Announcing the current epoch
        again (e.g. after resuming mid-epoch) changes nothing."""
        epoch = epoch_number("InfoReg", epoch)
        if epoch == int(self.epoch):
            return
        with torch.no_grad():
            if int(self.epoch) >= 0 and self.epoch_trace.numel():
                column = self.epoch_trace.unsqueeze(1)
                self.traces = (
                    torch.cat([self.traces.to(column.device), column], dim=1)
                    if self.traces.numel()
                    else column.clone()
                )
                self.epoch_trace = torch.zeros_like(self.epoch_trace)
        self.epoch.fill_(epoch)
        self._open = None

    def reset(self) -> None:
        device = self.steps.device
        self.epoch.fill_(_NEVER)
        self.anchor_epoch.fill_(_NEVER)
        self.anchor = torch.zeros(0, device=device)
        self.epoch_trace = torch.zeros(0, dtype=torch.float64, device=device)
        self.traces = torch.zeros(0, 0, dtype=torch.float64, device=device)
        self.last_beta = torch.zeros(0, device=device)
        self.last_scores = torch.zeros(0, device=device)
        self.steps.zero_()
        self.skipped.zero_()
        self._open = None

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        self._open = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def rate(self, m: int) -> Tensor:
        """The acquisition rate that gates each of ``m`` modalities this epoch, ``[M]`` float64
        (the first modality's for all with ``gate="first"``), from the traces of the completed
        epochs: 1 before any epoch completed."""
        history = self.traces.T if self.traces.numel() else self.traces.new_zeros(0, m)
        k = GF.acquisition_rate(history, window=self.window)
        return k[:1].expand(m) if self.gate == "first" else k

    # ---------------------------------------------------------------------------------- step
    def _ensure_state(self, binding: Binding) -> None:
        m, device = len(binding.names), binding.device
        if self.traces.numel() and self.traces.shape[0] != m:
            raise ValueError(
                f"this InfoReg instance holds traces of {self.traces.shape[0]} modalities but "
                f"is used with {m}; call reset() or use a new instance"
            )
        if self.epoch_trace.shape != (m,) or self.epoch_trace.device != device:
            trace = self.epoch_trace if self.epoch_trace.shape == (m,) else None
            self.epoch_trace = (
                trace.to(device)
                if trace is not None
                else torch.zeros(m, dtype=torch.float64, device=device)
            )
        if self.traces.numel() and self.traces.device != device:
            self.traces = self.traces.to(device)

    def _anchors(self, binding: Binding) -> list[list[Tensor]]:
        """The anchor of every encoder parameter (views of the flat buffer, in the parameter's
        dtype and device)."""
        out: list[list[Tensor]] = []
        offset = 0
        for n in binding.names:
            views = []
            for p in binding.groups[n]:
                v = self.anchor[offset : offset + p.numel()].view(p.shape)
                views.append(v.to(device=p.device, dtype=p.dtype))
                offset += p.numel()
            out.append(views)
        return out

    def _strength(self, m: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The regulation strengths as an ``[m]`` tensor, built once per device and dtype (no
        host-to-device copy per step)."""
        key = (m, device, dtype)
        lam = self._strengths.get(key)
        if lam is None:
            values = self.strength if len(self.strength) == m else self.strength * m
            lam = self._strengths[key] = torch.tensor(values, dtype=dtype, device=device)
        return lam

    def _unimodal(
        self, binding: Binding, step: Step, dtype: torch.dtype
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]], list[Injection]]:
        """Scores ``[M]`` (global), and the unimodal losses' gradients: on the fusion weight
        and bias (accumulated) and on the features (injected)."""
        head = binding.fusion_module
        assert isinstance(head, nn.Linear)
        names, m = binding.names, len(binding.names)
        feats = [step.features[n].detach().to(head.weight.dtype) for n in names]
        train = self.weight > 0
        if train:
            feats = [f.requires_grad_(True) for f in feats]
        with torch.enable_grad() if train else torch.no_grad():
            logits = unimodal_logits("InfoReg", binding, feats, live=train, detach_head=False)
            accumulate: list[tuple[Tensor, Tensor]] = []
            inject: list[Injection] = []
            if train:
                total = torch.stack([F.cross_entropy(z, step.targets) for z in logits]).sum()
                params = [p for p in (head.weight, head.bias) if p is not None and p.requires_grad]
                grads = torch.autograd.grad(total * self.weight, [*params, *feats])
                accumulate = list(zip(params, grads[: len(params)], strict=True))
                inject = [
                    Injection(step.features[n], g, f"features[{n!r}] (unimodal loss)")
                    for n, g in zip(names, grads[len(params) :], strict=True)
                ]
        with torch.no_grad():
            probs = [GF.true_class_probability(z.detach().to(dtype), step.targets) for z in logits]
            sums = torch.stack([p.sum() for p in probs])
            count = sums.new_full((), float(probs[0].numel()))
            totals = step.reduce(torch.cat([sums, count.unsqueeze(0)]).to(binding.device))
            scores = totals[:m] if self.score == "sum" else totals[:m] / totals[m].clamp_min(1.0)
        return scores, accumulate, inject

    def plan(self, binding: Binding, step: Step) -> StepPlan:
        self._ensure_state(binding)
        names, m = binding.names, len(binding.names)
        dtype = coefficient_dtype(binding.device)
        scores, accumulate, inject = self._unimodal(binding, step, dtype)
        epoch = int(self.epoch)
        fresh = int(self.anchor_epoch) != epoch  # the anchor is taken by this block
        with torch.no_grad():
            rate = self.rate(m).to(device=binding.device, dtype=dtype)
            lam = self._strength(m, binding.device, dtype)
            beta = GF.inforeg_beta(
                scores, rate, strength=lam, threshold=self.threshold, versus=self.versus
            )
            ones, ok = finite_step(torch.ones(m, dtype=dtype, device=binding.device), scores)
            beta = torch.where(ok, beta, torch.zeros_like(beta))
        if self._open is None:  # one host read per epoch
            self._open = bool((rate > self.threshold).any())
        if not fresh and self._open:
            for params, anchors, b in zip(
                (binding.groups[n] for n in names), self._anchors(binding), beta, strict=True
            ):
                accumulate.extend(
                    zip(params, GF.proximal_gradient(params, anchors, b), strict=True)
                )
        weights = [[p for p in binding.groups[n] if p.dim() >= 2] for n in names]

        def commit() -> None:
            with torch.no_grad():
                if fresh:
                    flat = [p.detach().reshape(-1) for n in names for p in binding.groups[n]]
                    kind = flat[0].dtype if flat else torch.float32
                    for f in flat:
                        kind = torch.promote_types(kind, f.dtype)
                    self.anchor = (
                        torch.cat([f.to(device=binding.device, dtype=kind) for f in flat])
                        if flat
                        else torch.zeros(0, device=binding.device)
                    )
                    self.anchor_epoch.fill_(epoch)
                if step.boundary:
                    grads = [[p.grad for p in ws if p.grad is not None] for ws in weights]
                    trace = GF.fisher_trace(grads).to(self.epoch_trace.device)
                    scale = step.loss_scale()
                    if scale is not None:
                        trace = trace / scale.to(trace).square()
                    finite = torch.isfinite(trace).all()
                    self.epoch_trace += torch.where(finite, trace, torch.zeros_like(trace))
                self.last_beta = beta.clone()
                self.last_scores = torch.where(
                    ok,
                    scores,
                    self.last_scores.to(scores)
                    if self.last_scores.shape == scores.shape
                    else torch.zeros_like(scores),
                )
                self.steps += 1
                self.skipped = self.skipped.to(ok.device) + (~ok).to(self.skipped.dtype)

        name = "true_class_probability" + ("_sum" if self.score == "sum" else "")
        return StepPlan(
            ones,
            accumulate,
            inject,
            commit=commit,
            scores={name: scores, "beta": beta, "rate": rate},
        )
