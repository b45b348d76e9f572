"""OGM-GE: on-the-fly gradient modulation with generalisation enhancement (Peng et al., 2022)."""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from .. import functional as GF
from .._errors import StepError
from .._protocol import (
    Binding,
    LossScale,
    Method,
    Needs,
    Step,
    StepPlan,
    Targets,
    class_index_problem,
    coefficient_dtype,
    epoch_number,
    finite_step,
)
from ._args import check_args
from ._heads import logits_problems, unimodal_logits
from ._registry import register

__all__ = ["OGMGE"]

ParamFilter = Literal["encoder", "conv"] | Callable[[Tensor], bool]
_SEED_SPACE = 2**63
#: The smallest modality (in elements) whose next noise is drawn ahead on a thread: below it
#: (~1 ms of drawing on one CPU core), starting a thread costs about what it saves.
_DRAW_AHEAD_MIN = 1 << 18
#: The smallest CPU gradient whose std is taken in one pass (:func:`_std_value`).
_ONE_PASS_MIN = 1 << 16


@register(
    "ogm-ge",
    presets={
        "ogm": (lambda m: OGMGE(ge=False), "OGM without the GE noise"),
        "ogm-tpami": (
            lambda m: OGMGE(form="tpami", alpha=0.8, window=(0, 60)),
            "the revised OGM-GE of the TPAMI 2024 code (train_ogm.sh: alpha 0.8, epochs 0-60)",
        ),
        "ogm-tpami-plus": (
            lambda m: OGMGE(form="tpami", boost=4.0, window=(0, 80)),
            "the TPAMI 2024 code's --use_OGM_plus: the weak encoder's gradient times 4",
        ),
    },
)
class OGMGE(Method):
    r"""On-the-fly gradient modulation, with generalisation-enhancement (GE) noise.

    The unimodal logits come from the fusion head itself, no extra heads: for one
    ``nn.Linear`` over the concatenated features (``fusion=``), :math:`z_m = h_m W_m^\top + b/M`
    with :math:`W_m` modality ``m``'s column block (features concatenated in modality order, so
    :math:`\sum_m z_m` is the fused output); for a "sum" head, pass its per-modality parts as
    ``classifiers`` and :math:`z_m` = ``classifiers[m](h_m)``. The summed true-class
    probabilities :math:`s_m` set :math:`k = ` :func:`gradmod.functional.ogm_ge_coefficients`:
    the dominant modality is slowed, the others keep 1.

    GE: every modulated tensor's gradient becomes :math:`k g + \mathcal N(0, (\sigma(g) +
    10^{-8})^2)` with :math:`\sigma` the unbiased std of the **unscaled** gradient (on the CPU
    in one pass for tensors of at least 2^16 elements, within 2e-5 relative), for both
    modalities, inside the window. gradmod adds the noise once per optimizer step: with
    gradient accumulation, the earlier micro-batches (entered with ``boundary=False``) only
    record their unscaled gradients, and the boundary micro-batch adds noise with the std of
    the accumulated unscaled gradient. Under a ``GradScaler`` the std and the ``1e-8`` are
    taken in the scaled space, so after ``unscale_`` the noise is exactly as specified. Each
    modality's noise is drawn at once, for all its tensors, from a generator seeded by
    ``(seed, optimizer step, modality)``, and each tensor takes its fixed slice (in parameter
    order): reproducible, independent of the order in which hooks fire, and identical on
    every DDP rank (so averaging over ranks does not shrink it; its std is then the mean of
    the ranks' local stds, added before DDP's all-reduce).

    Args:
        alpha: :math:`\alpha` (official 0.1 on VGGSound, 0.8 on CREMA-D).
        form: ``"official"`` (default, jump at :math:`\rho = 1`), ``"continuous"``, or
            ``"tpami"``: the revised OGM of the TPAMI 2024 extension
            (:func:`gradmod.functional.ogm_tpami_coefficients`): the official rule with the
            TPAMI code's tie-break (an exact tie slows modality 1, not 0) and its ``boost``
            variant. Its official setting: ``alpha=0.8, window=(6, 60), params="conv"``
            (the window starts after its 6 warm-up epochs), under AdamW.
        boost: ``form="tpami"`` only: the TPAMI code's "plus" variant (``--use_OGM_plus``):
            the dominant modality keeps 1 and the others get ``boost`` (official 4.0) instead
            of slowing the dominant one. ``None`` (default): slow the dominant modality.
        window: ``(first, last)`` epochs, inclusive, in which modulation and noise apply
            (official ``(0, 50)`` of 100 epochs); ``None``: always. Tell the method the epoch
            with :meth:`ModulationContext.set_epoch` (or :meth:`set_epoch`).
        ge: add the GE noise (``False``: plain OGM). Needs ``mode="parameter"``.
        params: which encoder tensors are modulated: ``"encoder"`` (default, all of them),
            ``"conv"`` (4-D weights only, the official code's choice) or a predicate on the
            tensor. Anything but the whole encoder needs ``mode="parameter"``.
        seed: seed of the GE noise.
        draw_ahead: on the CPU, draw the next optimizer step's noise on a background thread
            while the model computes (after each step that drew noise; modalities of at least
            2^18 elements): the same numbers (the same seeded draw), off the step's critical
            path (~10M normal numbers take tens of ms of one core) where a second core is
            free; where the cores share one physical core, the draw slows the step about as
            much either way (README, "Overhead"). It holds one noise buffer per modality
            between steps. ``False``: draw inside backward.

    State (``state_dict``): ``epoch``, ``noise_steps`` (optimizer steps that drew noise),
    ``last_coefficients``, ``last_scores`` and ``steps``.
    """

    epoch: Tensor
    skipped: Tensor
    noise_steps: Tensor
    steps: Tensor
    last_coefficients: Tensor
    last_scores: Tensor

    def __init__(
        self,
        *,
        alpha: float = 0.1,
        form: GF.OGMForm | Literal["tpami"] = "official",
        boost: float | None = None,
        window: tuple[int, int] | None = (0, 50),
        ge: bool = True,
        params: ParamFilter = "encoder",
        seed: int = 0,
        draw_ahead: bool = True,
    ) -> None:
        super().__init__()
        choices = []
        if form not in ("official", "continuous", "tpami"):
            choices.append(f"OGMGE: form must be 'official', 'continuous' or 'tpami'; got {form!r}")
        if boost is not None and form != "tpami":
            choices.append("OGMGE: boost= is the TPAMI variant: pass form='tpami' with it")
        if window is not None and not (
            isinstance(window, tuple | list)
            and len(window) == 2
            and all(isinstance(w, int) and not isinstance(w, bool) for w in window)
            and 0 <= window[0] <= window[1]
        ):
            choices.append(
                "OGMGE: window must be (first, last) integer epochs with 0 <= first <= last, or "
                f"None; got {window!r}"
            )
        if not (params in ("encoder", "conv") or callable(params)):
            choices.append(
                f"OGMGE: params must be 'encoder', 'conv' or a predicate; got {params!r}"
            )
        if not isinstance(seed, int) or isinstance(seed, bool):
            choices.append(f"OGMGE: seed must be an integer; got {seed!r}")
        if not isinstance(draw_ahead, bool):
            choices.append(f"OGMGE: draw_ahead must be True or False; got {draw_ahead!r}")
        bounds = [("alpha", alpha, 0.0, False, None)]
        if boost is not None:
            bounds.append(("boost", boost, 0.0, False, None))
        check_args("OGMGE", bounds, choices)
        self.alpha = float(alpha)
        self.form: GF.OGMForm | Literal["tpami"] = form
        self.boost = None if boost is None else float(boost)
        self.window = None if window is None else (int(window[0]), int(window[1]))
        self.ge = bool(ge)
        self.params = params
        self.seed = int(seed)
        self.draw_ahead = draw_ahead
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))
        self.register_buffer("noise_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_coefficients", torch.zeros(0))
        self.register_buffer("last_scores", torch.zeros(0))
        # Unscaled gradients of the committed earlier micro-batches of the current
        # accumulation window, per (modality, tensor) (not in state_dict: see the README).
        self._pending: dict[tuple[int, int], Tensor] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        self._layouts: tuple[weakref.ref[Binding], _Layout] | None = None
        self._ahead = _DrawsAhead()

    def needs(self) -> Needs:
        return Needs(
            classifiers="optional",
            per_modality_state=("last_coefficients", "last_scores"),
            fusion="reads",
            transforms_gradients=self.ge,
        )

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, form={self.form!r}"
            + (f", boost={self.boost}" if self.boost is not None else "")
            + f", window={self.window}, ge={self.ge}, "
            f"params={self.params if isinstance(self.params, str) else 'custom'!r}"
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch_number("OGMGE", epoch))

    def reset(self) -> None:
        super().reset()  # every buffer emptied (the counters to 0)
        self._pending.clear()
        self._ahead.clear()

    # ------------------------------------------------------------------------ configuration
    def check(self, binding: Binding) -> list[str]:
        problems = logits_problems("OGM-GE", binding)
        if self.ge and binding.mode == "feature":
            problems.append(
                "OGM-GE's noise is drawn per parameter tensor, which feature mode cannot do: use "
                "mode='parameter' (or ge=False)"
            )
        return problems

    def _selected(self, t: Tensor) -> bool:
        if self.params == "encoder":
            return True
        if self.params == "conv":
            return t.dim() == 4
        return bool(self.params(t))

    def targets(self, binding: Binding) -> Targets:
        return Targets(
            {n: [p for p in ps if self._selected(p)] for n, ps in binding.groups.items()}
        )

    # ---------------------------------------------------------------------------------- step
    def in_window(self) -> bool:
        """Whether the current epoch lies in the modulation window."""
        if self.window is None:
            return True
        first, last = self.window
        return first <= int(self.epoch) <= last

    def unimodal_logits(self, binding: Binding, features: list[Tensor]) -> list[Tensor]:
        """:math:`z_m` of every modality, from the fusion head (no gradient)."""
        return unimodal_logits("OGM-GE", binding, features)

    def coefficients(self, scores: Tensor) -> Tensor:
        """This step's factors from the scores (inside the window)."""
        if self.form == "tpami":
            variant: GF.OGMVariant = "slow" if self.boost is None else "boost"
            boost = 4.0 if self.boost is None else self.boost
            return GF.ogm_tpami_coefficients(scores, alpha=self.alpha, variant=variant, boost=boost)
        return GF.ogm_ge_coefficients(scores, alpha=self.alpha, form=self.form)

    def check_step(self, binding: Binding, step: Step) -> list[str]:
        first = next(iter(step.features.values()), None)
        batch = int(first.shape[0]) if isinstance(first, Tensor) and first.dim() else None
        return class_index_problem("OGMGE", step.targets, batch)

    def plan(self, binding: Binding, step: Step) -> StepPlan:
        names = binding.names
        dtype = coefficient_dtype(binding.device)
        logits = self.unimodal_logits(binding, [step.features[n] for n in names])
        with torch.no_grad():
            sums = torch.stack(
                [GF.true_class_probability(z.to(dtype), step.targets).sum() for z in logits]
            )
            scores = step.reduce(sums.to(binding.device))
            active = self.in_window()
            k = self.coefficients(scores) if active else torch.ones_like(scores)
            k, ok = finite_step(k, scores)
        noisy = self.ge and active
        if not noisy:
            self._ahead.clear()
        block = _NoiseBlock(
            self,
            boundary=step.boundary,
            noise_step=int(self.noise_steps) + 1,  # host-side: the counter lives on the host
            loss_scale=step.loss_scale,
            layout=self._layout(binding),
        )

        def commit() -> None:
            block.commit()
            with torch.no_grad():
                before = (
                    self.last_scores.to(scores)
                    if self.last_scores.shape == scores.shape
                    else torch.zeros_like(scores)
                )
                self.last_scores = torch.where(ok, scores, before)
                self.last_coefficients = k.detach().clone()
                self.steps += 1
                # the counters stay on the host, except this one, which follows the scores
                self.skipped = self.skipped.to(ok.device) + (~ok).to(self.skipped.dtype)
                if noisy and step.boundary:
                    self.noise_steps += 1
            if noisy and step.boundary and self.draw_ahead:
                self._draw_next(block.layout, block.devices)

        return StepPlan(
            k,
            transform=block.transform if noisy else None,
            commit=commit,
            scores={"true_class_probability_sum": scores},
        )

    def __getstate__(self) -> dict[str, object]:
        """Copies and pickles leave the layout cache (a weak reference) and the noise drawn
        ahead (a thread) out."""
        state = self.__dict__.copy()
        state["_layouts"] = None
        state["_ahead"] = _DrawsAhead()
        return state

    def _draw_next(self, layout: _Layout, devices: dict[int, torch.device]) -> None:
        """Start drawing the next optimizer step's noise of each large CPU modality."""
        step = int(self.noise_steps) + 1
        wanted = {
            (_seed(self.seed, step, m), device, layout.dtypes[m], layout.totals[m])
            for m, device in devices.items()
            if _drawn_ahead(device, layout.totals[m])
        }
        self._ahead.start(wanted)

    # ------------------------------------------------------------------------------ GE noise
    def _layout(self, binding: Binding) -> _Layout:
        """The noise layout of ``binding``'s modulated tensors (built once per binding)."""
        cached = self._layouts
        if cached is None or cached[0]() is not binding:
            groups = self.targets(binding).encoders
            layout = _Layout([list(groups[n]) for n in binding.names])
            cached = self._layouts = (weakref.ref(binding), layout)
        return cached[1]

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        return gen


class _Layout:
    """Where each modulated tensor's noise lies in its modality's flat buffer: ``offsets[m][i]``
    and ``numels[m][i]`` for tensor ``i`` of modality ``m`` (in :meth:`OGMGE.targets` order),
    ``totals[m]`` the buffer's length and ``dtypes[m]`` the dtype it is drawn in."""

    __slots__ = ("dtypes", "numels", "offsets", "totals")

    def __init__(self, groups: list[list[Tensor]]) -> None:
        self.numels = [[t.numel() for t in ts] for ts in groups]
        self.offsets = [[sum(ns[:i]) for i in range(len(ns))] for ns in self.numels]
        self.totals = [sum(ns) for ns in self.numels]
        self.dtypes = [_noise_dtype(ts) for ts in groups]


def _noise_dtype(tensors: list[Tensor]) -> torch.dtype:
    """The dtype a modality's noise is drawn in: the tensors' own half dtype when they all share
    one (no float32 temporary), else float32 (float64 noise would cost ~4x; the noise is
    rounded to the gradient's dtype either way)."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1 and (only := dtypes.pop()) in (torch.float16, torch.bfloat16):
        return only
    return torch.float32


def _seed(seed: int, noise_step: int, m: int, i: int | None = None) -> int:
    """The seed of modality ``m``'s noise at optimizer step ``noise_step`` (of tensor ``i`` for
    a tensor whose gradient does not have its parameter's size)."""
    key = (seed, noise_step, m) if i is None else (seed, noise_step, m, i)
    return hash(key) % _SEED_SPACE


class _NoiseBlock:
    """The GE noise of one ``with`` block: what its hooks record is staged until the block exits
    cleanly (:meth:`commit`), so a failed micro-batch that is redone counts once.

    At the boundary, the first hook of modality ``m`` draws the noise of ALL its tensors at
    once, from a generator seeded by ``(seed, optimizer step, m)``, into one flat buffer; each
    tensor's hook takes its slice (fixed by the layout, not by the order in which hooks fire)
    and scales it in place by its std. The buffer is dropped when its last slice is used.
    """

    def __init__(
        self,
        method: OGMGE,
        *,
        boundary: bool,
        noise_step: int,
        loss_scale: LossScale,
        layout: _Layout,
    ) -> None:
        self.method = method
        self.boundary = boundary
        self.noise_step = noise_step
        self.loss_scale = loss_scale
        self.layout = layout
        self.staged: dict[tuple[int, int], Tensor] = {}
        self.seen: set[tuple[int, int]] = set()
        self.devices: dict[int, torch.device] = {}  # the device of each modality's buffer
        # per modality: (its noise buffer's slices, how many are still to hand out)
        self.buffers: dict[tuple[int, torch.device], tuple[tuple[Tensor, ...], int]] = {}
        self.host: dict[int, tuple[float, float]] = {}  # per modality: k_m and the loss scale

    def commit(self) -> None:
        pending = self.method._pending
        if self.boundary:  # this backward closed an optimizer step: a new window starts
            pending.clear()
        else:
            pending.update(self.staged)

    def _noise(self, m: int, i: int, grad: Tensor) -> Tensor:
        """Standard normal noise of tensor ``i`` of modality ``m``, shaped like ``grad`` (a
        slice of the modality's buffer, which this block owns and may scale in place)."""
        layout = self.layout
        if i >= len(layout.numels[m]) or layout.numels[m][i] != grad.numel():
            # a gradient of another size than its parameter (never for dense parameters):
            # drawn on its own, seeded by the tensor too
            gen = self.method._generator(grad.device)
            gen.manual_seed(_seed(self.method.seed, self.noise_step, m, i))
            return torch.randn(grad.shape, generator=gen, device=grad.device)
        where = (m, grad.device)  # one buffer per device of a model split across devices
        entry = self.buffers.get(where)
        if entry is None:
            seed = _seed(self.method.seed, self.noise_step, m)
            self.devices.setdefault(m, grad.device)
            key = (seed, grad.device, layout.dtypes[m], layout.totals[m])
            buf = self.method._ahead.take(key) if _drawn_ahead(grad.device, key[3]) else None
            if buf is None:
                gen = self.method._generator(grad.device)
                gen.manual_seed(seed)
                buf = torch.empty(layout.totals[m], device=grad.device, dtype=layout.dtypes[m])
                buf.normal_(generator=gen)
            entry = (buf.split(layout.numels[m]), len(layout.numels[m]))
        slices, left = entry
        if left > 1:
            self.buffers[where] = (slices, left - 1)
        else:  # the last slice: the buffer goes with it
            self.buffers.pop(where, None)
        return slices[i].view(grad.shape)

    def _host(self, m: int, k: Tensor) -> tuple[float, float]:
        """``(k_m, loss scale)`` as host numbers, read once per block (CPU tensors: no sync;
        the scale inside backward, where the loss may have been scaled)."""
        cached = self.host.get(m)
        if cached is None:
            scale = self.loss_scale()
            cached = self.host[m] = (float(k), float(scale) if scale is not None else 1.0)
        return cached

    def transform(self, k: Tensor, m: int, i: int, grad: Tensor) -> Tensor:
        """``k * grad`` plus, at the boundary micro-batch, the GE noise (a gradient hook)."""
        if grad.is_sparse:
            raise StepError(
                "OGM-GE's noise needs dense gradients, but a parameter of modality "
                f"{m} has a sparse one (an embedding with sparse=True): use a dense embedding "
                "or OGMGE(ge=False)"
            )
        key = (m, i)
        if key in self.seen:
            raise StepError(
                "OGM-GE's noise is drawn once per backward, but a second backward ran inside "
                "this block (backward(retain_graph=True) twice): sum the losses and call "
                "backward() once per block, or use one block per micro-batch with "
                "boundary=False on all but the last"
            )
        self.seen.add(key)
        before = self.method._pending.get(key)
        total = grad.detach() if before is None else before + grad.detach()
        if not self.boundary:
            self.staged[key] = total if before is not None else total.clone()
            return (grad * k).to(grad.dtype)
        wide = total if total.dtype in (torch.float32, torch.float64) else total.float()
        noise = self._noise(m, i, grad)
        if grad.device.type == "cpu" and noise.dtype == grad.dtype and grad.dim() > 0:
            # Host numbers on the CPU (nothing to wait for), and in place in the noise (this
            # block's own buffer), which becomes the gradient: no allocation, one or two passes.
            kf, scale = self._host(m, k)
            sigma = _std_value(wide) + 1e-8 * scale
            if kf == 1.0:
                return torch.add(grad, noise, alpha=sigma, out=noise)  # g + sigma * noise
            return torch.add(noise.mul_(sigma), grad, alpha=kf, out=noise)  # + k * g
        if total.numel() > 1:
            std = torch.nan_to_num(wide.std(), nan=0.0, posinf=0.0, neginf=0.0)
        else:  # the unbiased std of one number is undefined: no noise
            std = total.new_zeros((), dtype=torch.float32)
        scale_t = self.loss_scale()  # read inside backward: the loss may be scaled in the block
        sigma_t = std + 1e-8 * (scale_t.to(std.dtype) if scale_t is not None else 1.0)
        if noise.dtype == grad.dtype and grad.dim() > 0:
            return noise.mul_(sigma_t).addcmul_(grad, k)  # sigma * noise + k * g
        out = (grad * k).to(grad.dtype)  # a 0-d gradient times a 0-d factor would promote
        return out.add_((noise * sigma_t.float()).to(grad.dtype))


DrawKey = tuple[int, torch.device, torch.dtype, int]  # seed, device, dtype, length


class _DrawsAhead:
    """Noise buffers drawn on background threads before the step that uses them.

    :meth:`start` draws each ``(seed, device, dtype, length)`` with a generator of its own,
    seeded with ``seed``: the numbers a draw inside backward would give. :meth:`take` waits for
    the one asked for (``None`` if it was not drawn ahead, or failed); what was drawn for
    another step (a reset, a loaded state) is dropped by the next :meth:`start` or
    :meth:`clear`.
    """

    def __init__(self) -> None:
        self._running: dict[DrawKey, tuple[threading.Thread, list[Tensor]]] = {}

    def start(self, keys: set[DrawKey]) -> None:
        self.clear()
        for key in keys:
            box: list[Tensor] = []
            # Not a daemon: the interpreter waits for a draw still running when the script
            # ends (tens of ms) instead of killing the thread inside torch, which aborts the
            # process ("terminate called without an active exception", exit status 134).
            thread = threading.Thread(
                target=_draw, args=(key, box), name="gradmod-ogm-noise", daemon=False
            )
            thread.start()
            self._running[key] = (thread, box)

    def take(self, key: DrawKey) -> Tensor | None:
        entry = self._running.pop(key, None)
        if entry is None:  # not drawn ahead (what was, for another step, goes at the next start)
            return None
        thread, box = entry
        thread.join()
        return box[0] if box else None

    def clear(self) -> None:
        for thread, _ in self._running.values():
            thread.join()
        self._running.clear()


def _drawn_ahead(device: torch.device, length: int) -> bool:
    """Whether a modality's noise is drawn ahead: on the CPU (a GPU draws asynchronously
    anyway), for buffers of at least :data:`_DRAW_AHEAD_MIN` elements."""
    return device.type == "cpu" and length >= _DRAW_AHEAD_MIN


def _draw(key: DrawKey, box: list[Tensor]) -> None:
    """Draw one buffer of standard normal noise into ``box`` (a thread's target)."""
    seed, device, dtype, length = key
    try:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        box.append(torch.empty(length, device=device, dtype=dtype).normal_(generator=gen))
    except Exception:  # out of memory, say: the step draws it again (and reports it)
        return


def _std_value(g: Tensor) -> float:
    r"""The unbiased standard deviation of the CPU tensor ``g`` (float32 or float64), as a
    number; 0 where it is undefined (one element) or not finite.

    For large contiguous tensors in one pass: :math:`s = \sum g` and :math:`q = g \cdot g` (two
    vectorised reductions, ~3x faster than :meth:`Tensor.std`'s), combined in float64 as
    :math:`\sqrt{(q - s^2/n) / (n - 1)}`: within ~1e-5 relative of the two-pass std wherever
    the variance is at least a tenth of the mean square. Where it is not (the mean dominates,
    and the subtraction would cancel digits), and for smaller tensors, :meth:`Tensor.std`.
    """
    n = g.numel()
    if n < 2:
        return 0.0
    if n >= _ONE_PASS_MIN and g.is_contiguous():
        flat = g.view(-1)
        s, q = float(flat.sum()), float(torch.dot(flat, flat))
        var = (q - s * s / n) / (n - 1)
        if var >= 0.1 * q / n and math.isfinite(var):  # False for NaN
            return math.sqrt(var)
    std = float(g.std())
    return std if math.isfinite(std) else 0.0
