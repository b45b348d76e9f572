"""CGGM: classifier-guided gradient modulation (Guo et al., NeurIPS 2024)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import functional as GF
from .._groups import last_weight_matrix
from ._base import Binding, Method, Reduce, StepPlan

__all__ = ["CGGM"]

Metric = Callable[[Tensor, Tensor], Tensor]
Loss = Callable[[Tensor, Tensor], Tensor]


def _l1(pred: Tensor, target: Tensor) -> Tensor:
    return F.l1_loss(pred.reshape(target.shape), target.to(pred.dtype))


class CGGM(Method):
    r"""Classifier-guided gradient modulation.

    Every step, each modality's unimodal classifier reads the **detached** output of its
    encoder; its metric :math:`\varepsilon_m` (batch accuracy, or sign accuracy for regression)
    is compared with the previous step's, and the improvements set the encoder factors
    :math:`\rho B_m` (:func:`gradmod.functional.improvement_rate_scale`). The classifiers' own
    loss is back-propagated into their parameters (never into the encoders), so the user's
    optimizer, or a separate one, trains them. With a fusion tensor configured and
    ``lam > 0``, the gradient of :math:`\lambda L_{gm}`
    (:func:`gradmod.functional.cosine_direction_loss`, with :math:`u` the fusion head's last
    weight matrix and :math:`v_m` classifier ``m``'s last weight matrix, :math:`B` constant) is
    added to the fusion weight's gradient during the same backward: the user's loss is not
    edited.

    Args:
        rho: global factor :math:`\rho` (official default 1.3).
        lam: weight :math:`\lambda` of the direction loss (official default 0.2; 0 disables it).
        task: ``"classification"`` (cross-entropy, accuracy) or ``"regression"`` (L1 loss,
            sign accuracy of ``pred > 0`` vs ``target > 0``, as in the official code).
        metric: optional ``metric(outputs, targets)`` returning per-sample scores ``[B]`` (exact
            global value under DDP) or a 0-d batch score (averaged over ranks).
        loss_fn: optional ``loss_fn(outputs, targets)`` that trains the classifiers.
        official: ``False`` (default) is gradmod's safe variant: improvements below zero count
            as zero and a step with no improvement gives every modality :math:`(M-1)/M`, so no
            factor is ever negative, exploding or non-finite; the direction loss uses this
            step's :math:`B`. ``True`` reproduces the official step semantics for parity: the
            ``1e-8``-guarded division (:math:`|B| \approx 10^7` when :math:`\sum\Delta = 0`,
            negative factors possible) and the direction loss of the previous step's :math:`B`
            applied one step late (none at the first step).
        zero_tol: :math:`\sum \Delta^+` at or below this counts as "no improvement" (safe only).

    State (``state_dict``): ``previous`` metric per modality (starts at 0, carries across
    epochs), ``last_b`` (:math:`B` of the last step), ``last_coefficients`` and ``steps``.
    """

    uses_classifiers = True
    previous: Tensor
    last_b: Tensor
    last_coefficients: Tensor
    steps: Tensor

    def __init__(
        self,
        *,
        rho: float = 1.3,
        lam: float = 0.2,
        task: Literal["classification", "regression"] = "classification",
        metric: Metric | None = None,
        loss_fn: Loss | None = None,
        official: bool = False,
        zero_tol: float = 1e-6,
    ) -> None:
        super().__init__()
        if task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression'; got {task!r}")
        if lam < 0:
            raise ValueError(f"lam must be >= 0; got {lam}")
        self.rho = float(rho)
        self.lam = float(lam)
        self.task = task
        self.official = bool(official)
        self.zero_tol = float(zero_tol)
        self.metric: Metric = metric or (
            GF.correct if task == "classification" else GF.sign_correct
        )
        self.loss_fn: Loss = loss_fn or (F.cross_entropy if task == "classification" else _l1)
        self.register_buffer("previous", torch.zeros(0))
        self.register_buffer("last_b", torch.zeros(0))
        self.register_buffer("last_coefficients", torch.zeros(0))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"rho={self.rho}, lam={self.lam}, task={self.task!r}, official={self.official}"

    def reset(self) -> None:
        for name in ("previous", "last_b", "last_coefficients"):
            setattr(self, name, torch.zeros(0, device=self.steps.device))
        self.steps.zero_()

    def check(self, binding: Binding) -> list[str]:
        problems: list[str] = []
        if binding.fusion is None or self.lam == 0 or binding.classifiers is None:
            return problems
        u = binding.fusion
        for name in binding.names:
            clf = binding.classifiers.get(name)
            if clf is None:
                continue
            v = last_weight_matrix(clf)
            if v is None:
                problems.append(
                    f"classifiers[{name!r}] has no weight matrix for CGGM's direction loss"
                )
            elif v.shape != u.shape:
                problems.append(
                    f"CGGM's direction loss compares the fusion head's last weight matrix "
                    f"{tuple(u.shape)} with classifiers[{name!r}]'s last weight matrix "
                    f"{tuple(v.shape)}: end each classifier in a layer of the fusion head's "
                    "shape, or pass fusion=None (or lam=0) to turn the direction loss off"
                )
        return problems

    def _ensure_state(self, m: int, device: torch.device) -> None:
        if self.previous.shape == (m,):
            if self.previous.device != device:
                self.to(device)
            return
        if self.previous.numel() and int(self.steps) > 0:
            raise ValueError(
                f"this CGGM instance holds state for {self.previous.numel()} modalities but is "
                f"used with {m}; call reset() or use a new instance"
            )
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self.previous = torch.zeros(m, device=device, dtype=dtype)
        self.last_b = torch.full((m,), (m - 1) / m, device=device, dtype=dtype)
        self.last_coefficients = torch.ones(m, device=device, dtype=dtype)
        self.steps = self.steps.to(device)

    def plan(
        self,
        binding: Binding,
        features: Mapping[str, Tensor],
        targets: Tensor,
        reduce: Reduce,
    ) -> StepPlan:
        assert binding.classifiers is not None
        names = binding.names
        m = len(names)
        self._ensure_state(m, binding.device)
        classifiers = [binding.classifiers[n] for n in names]

        sums, counts, losses = [], [], []
        with torch.enable_grad():
            for clf, name in zip(classifiers, names, strict=True):
                first = next(clf.parameters(), None)
                h = features[name].detach()
                if first is not None and h.is_floating_point():
                    h = h.to(first.dtype)
                out = clf(h)
                losses.append(self.loss_fn(out, targets))
                with torch.no_grad():
                    score = self.metric(out, targets).to(self.previous.dtype)
                    n = (
                        score.new_tensor(float(score.numel()))
                        if score.dim()
                        else score.new_ones(())
                    )
                    sums.append(score.sum())
                    counts.append(n)
            params = [p for c in classifiers for p in c.parameters() if p.requires_grad]
            grads = (
                torch.autograd.grad(torch.stack(losses).sum(), params, allow_unused=True)
                if params
                else ()
            )
        accumulate: list[tuple[Tensor, Tensor]] = [
            (p, g) for p, g in zip(params, grads, strict=True) if g is not None
        ]

        with torch.no_grad():
            totals = reduce(
                torch.stack([torch.stack(sums), torch.stack(counts)]).to(binding.device)
            )
            metric = totals[0] / totals[1].clamp_min(1.0)
            policy: GF.Policy = "official" if self.official else "safe"
            b = GF.improvement_rate_scale(
                self.previous, metric, rho=1.0, policy=policy, zero_tol=self.zero_tol
            )
            coefficients = self.rho * b

        add_in_backward: list[tuple[Tensor, Tensor]] = []
        use_direction = binding.fusion is not None and self.lam > 0
        if use_direction:
            assert binding.fusion is not None
            # Official: the previous step's B, one step late (a zero loss at the first step).
            b_dir = self.last_b * (self.steps > 0) if self.official else b
            u = binding.fusion.detach().requires_grad_(True)
            vs = [last_weight_matrix(c) for c in classifiers]
            with torch.enable_grad():
                loss = self.lam * GF.cosine_direction_loss(
                    b_dir.detach().to(u.dtype),
                    [v.detach().to(u.dtype) for v in vs if v is not None],
                    u,
                )
                (g_u,) = torch.autograd.grad(loss, u)
            add_in_backward.append((binding.fusion, g_u))

        with torch.no_grad():
            self.previous.copy_(metric)
            self.last_b.copy_(b)
            self.last_coefficients.copy_(coefficients)
            self.steps += 1
        return StepPlan(coefficients, accumulate, add_in_backward)
