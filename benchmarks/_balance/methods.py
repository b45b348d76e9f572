"""The compared method variants: a registry ``name -> Variant``, the benchmark's extension point.

A variant trains the late-fusion model (:class:`~.models.FusedNet`) with

* ``aux_loss``: ``False`` = plain cross-entropy on the fused logits; ``True`` = the multi-loss
  objective ``CE(fused) + sum_m CE(head_m(h_m))`` with the unimodal linear heads on the LIVE
  encoder outputs (the heads join the optimizer);
* ``context``: ``None`` (no modulation) or a factory
  ``(parts, config, optimizer) -> ModulationContext``, entered around every ``loss.backward()``
  as ``with ctx(features=feats, targets=y)``. The optimizer already holds the trained network
  (one param group); whatever ``ctx.classifier_parameters()`` returns that it does not train is
  added to it afterwards at ``classifier_lr_ratio`` times the model's learning rate;
  ``ctx.coefficients`` is recorded every step. ``config["act"] == "update"`` (the ``@update``
  variants, :func:`at_update`) puts the coefficients on the encoders' updates.

Adding a method is one decorated factory::

    @register("mlb:alpha=1", heads="linear", alpha=1.0)
    def _mlb(parts: Parts, config: Config, opt: Optimizer) -> gradmod.ModulationContext:
        return gradmod.ModulationContext(
            parts.model,
            dict(parts.heads),  # the live unimodal heads; gradmod adds their loss
            encoders=parts.encoder_paths(),
            method=gradmod.MLB(alpha=config["alpha"]),
            fusion="head",
            **level(config, opt),  # act= and optimizer= of the @update variants
        )

The grids are declared here, before anything runs (:data:`CGGM_GRID`, :data:`OGM_GRID`,
:data:`AGM_GRID`, and the ``mlb:*`` points).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from torch.optim import Optimizer

import gradmod

from .models import Parts

__all__ = [
    "AGM_GRID",
    "CGGM_GRID",
    "OGM_GRID",
    "REFERENCES",
    "VARIANTS",
    "Config",
    "ContextFactory",
    "Variant",
    "at_update",
    "gradient_form",
    "level",
    "register",
]

Config = dict[str, Any]
ContextFactory = Callable[[Parts, Config, Optimizer], gradmod.ModulationContext]

#: Runs that are not registry variants: each modality alone, and the probability ensemble of
#: the ``alone`` models (no training). Always run: the ensemble and the probe gaps need them.
REFERENCES = ("alone", "ensemble")


@dataclass(frozen=True)
class Variant:
    """One compared training method (a row of the tables)."""

    name: str
    aux_loss: bool = False
    context: ContextFactory | None = None
    config: Config = field(default_factory=dict)
    grid: bool = False  # a grid point (left out of ``--quick`` unless named in ``--methods``)
    heads: str | None = None  # unimodal heads the network trains: None, "linear" or "mlp"
    responses: bool = False  # train on AGM's Shapley responses (their sum is the fused output)


#: name -> variant, in table order. ``joint`` and ``multiloss`` are the paired baselines.
VARIANTS: dict[str, Variant] = {}


def _check_name(name: str) -> None:
    if name in VARIANTS or name in REFERENCES or name.startswith("alone:") or "," in name:
        raise ValueError(f"method variant {name!r} is already defined or not a valid name")


def register(
    name: str,
    *,
    aux_loss: bool = False,
    grid: bool = False,
    heads: str | None = None,
    responses: bool = False,
    **config: Any,
) -> Callable[[ContextFactory], ContextFactory]:
    """Decorator: register ``factory`` as variant ``name`` with hyper-parameters ``config``.

    ``config`` is recorded with every run and handed to the factory; ``aux_loss`` selects the
    hand-written multi-loss objective; ``grid`` marks a grid point (not run by ``--quick``);
    ``heads`` puts unimodal heads in the trained network (gradmod's MultiLoss/MLB train them);
    ``responses`` trains on Shapley responses (AGM).
    """
    _check_name(name)

    def add(factory: ContextFactory) -> ContextFactory:
        VARIANTS[name] = Variant(name, aux_loss, factory, dict(config), grid, heads, responses)
        return factory

    return add


def level(config: Config, opt: Optimizer) -> dict[str, Any]:
    """The context's ``act=`` (and ``optimizer=`` at the update level) for ``config``."""
    if config.get("act", "gradient") == "update":
        return {"act": "update", "optimizer": opt}
    return {}


#: Suffix of the update-level form of a variant.
UPDATE = "@update"


def at_update(name: str, *, grid: bool = True) -> None:
    """Register ``<name>@update``: variant ``name`` with its coefficients on the updates."""
    base = VARIANTS[name]
    new = name + UPDATE
    _check_name(new)
    VARIANTS[new] = replace(base, name=new, config={**base.config, "act": "update"}, grid=grid)


def gradient_form(name: str) -> str | None:
    """``name`` without ``@update`` (its gradient-level form), or ``None``."""
    return name[: -len(UPDATE)] if name.endswith(UPDATE) else None


def _plain(name: str, *, aux_loss: bool) -> None:
    _check_name(name)
    VARIANTS[name] = Variant(name, aux_loss)


# ------------------------------------------------------------------------------ baselines
_plain("joint", aux_loss=False)  # plain cross-entropy on the fused logits
_plain("multiloss", aux_loss=True)  # + sum_m CE(head_m(h_m)), heads on the live features


# ------------------------------------------------------------------------------ gradmod.CGGM
def cggm(parts: Parts, config: Config, opt: Optimizer) -> gradmod.ModulationContext:
    """gradmod's CGGM; classifiers = the MLPs on detached features, direction loss on the head."""
    return gradmod.ModulationContext(
        parts.model,
        dict(parts.classifiers),
        encoders=parts.encoder_paths(),
        method=gradmod.CGGM(rho=config["rho"], lam=config["lam"]),
        fusion="head",
        **level(config, opt),
    )


#: Official defaults first (``cggm``), then the small grid, declared before running.
CGGM_GRID: tuple[tuple[float, float], ...] = ((1.3, 0.2), (1.0, 0.2), (1.3, 0.0), (1.0, 0.0))
for _rho, _lam in CGGM_GRID:
    _default = (_rho, _lam) == (1.3, 0.2)
    _name = "cggm" if _default else f"cggm:rho={_rho:g}:lam={_lam:g}"
    register(_name, grid=not _default, rho=_rho, lam=_lam)(cggm)


# ------------------------------------------------------------------------- gradmod.OGMGE
def ogm_ge(parts: Parts, config: Config, opt: Optimizer) -> gradmod.ModulationContext:
    """Unimodal logits read off the linear fused head; GE noise; the first half of training."""
    return gradmod.ModulationContext(
        parts.model,
        encoders=parts.encoder_paths(),
        method=gradmod.OGMGE(alpha=config["alpha"], window=config["window"], seed=0),
        fusion="head",
        **level(config, opt),
    )


#: gradmod's default alpha (official VGGSound), then CREMA-D's; the official window is epochs
#: 0-50 of 100, here epochs 0-10 of 20 (``set_epoch`` counts from 0).
OGM_GRID: tuple[float, ...] = (0.1, 0.8)
for _alpha in OGM_GRID:
    _name = "ogm-ge" if _alpha == 0.1 else f"ogm-ge:alpha={_alpha:g}"
    register(_name, grid=_alpha != 0.1, alpha=_alpha, window=(0, 10))(ogm_ge)


# ------------------------------------------------- gradmod.OPM and the TPAMI OGM "plus" form
def opm(parts: Parts, config: Config, opt: Optimizer) -> gradmod.ModulationContext:
    """OPM (TPAMI 2024): the dominant modality's features dropped in the forward (the training
    loop fuses ``ctx.prepare(feats, y)``); scores read off the linear fused head."""
    return gradmod.ModulationContext(
        parts.model,
        encoders=parts.encoder_paths(),
        method=gradmod.OPM(
            q_base=config["q_base"], lam=config["lam"], p_exe=config["p_exe"], seed=0
        ),
        fusion="head",
        **level(config, opt),
    )


# the official values (no warm-up: the official 6 of 100 epochs have no counterpart here)
register("opm", q_base=0.5, lam=0.5, p_exe=0.7)(opm)


def ogm_tpami(parts: Parts, config: Config, opt: Optimizer) -> gradmod.ModulationContext:
    """The TPAMI 2024 OGM's "plus" form: the weak encoder's gradient times ``boost``. (Its
    default form is OGM-GE's rule up to exact ties: ``ogm-ge:alpha=0.8`` measures it.)"""
    return gradmod.ModulationContext(
        parts.model,
        encoders=parts.encoder_paths(),
        method=gradmod.OGMGE(
            form="tpami", boost=config["boost"], alpha=1.0, window=config["window"], seed=0
        ),
        fusion="head",
        **level(config, opt),
    )


register("ogm-tpami-plus", grid=True, boost=4.0, window=(0, 10))(ogm_tpami)


# ---------------------------------------------------------------------------- gradmod.AGM
def agm(parts: Parts, config: Config, opt: Optimizer) -> gradmod.ModulationContext:
    """AGM on the Shapley responses of the fused head (features of absent modalities zeroed)."""
    return gradmod.ModulationContext(
        parts.model, encoders=parts.encoder_paths(), method=gradmod.AGM(alpha=config["alpha"])
    )


AGM_GRID: tuple[float, ...] = (1.0, 1.5)  # official default, CREMA-D
for _alpha in AGM_GRID:
    _name = "agm" if _alpha == 1.0 else f"agm:alpha={_alpha:g}"
    register(_name, grid=_alpha != 1.0, responses=True, alpha=_alpha)(agm)


# ------------------------------------------------------------------------- gradmod.InfoReg
def inforeg(parts: Parts, config: Config, opt: Optimizer) -> gradmod.ModulationContext:
    """Unimodal logits (and their cross-entropies) off the linear fused head; the leading
    modality pulled toward its epoch-start weights while the acquisition window is open."""
    method = (
        gradmod.methods.REGISTRY["inforeg-official"].make(len(parts.encoder_paths()))
        if config.get("official")
        else gradmod.InfoReg()
    )
    return gradmod.ModulationContext(
        parts.model, encoders=parts.encoder_paths(), method=method, fusion="head"
    )


# gradmod's defaults (one strength 0.95, each modality gated by its own rate, mean scores);
# the official preset (0.95 / 0.1 by modality order, the first modality's rate, summed scores)
# as a grid point. Gradient level only: InfoReg refuses act='update'. The window counts epochs
# from set_epoch (official trace window: 10 of 50 epochs, here of 20).
register("inforeg")(inforeg)
register("inforeg:official", grid=True, official=True)(inforeg)


# --------------------------------------------------------------- gradmod.MultiLoss and MLB
def gradmod_multiloss(parts: Parts, config: Config, opt: Optimizer) -> gradmod.ModulationContext:
    """gradmod's multi-loss: the heads' loss gradients injected into the live features."""
    heads = parts.classifiers if config.get("mlp_heads") else parts.heads
    direction = config.get("direction", 0.0)
    if "alpha" in config:
        method: gradmod.Method = gradmod.MLB(
            alpha=config["alpha"],
            scale=config["scale"],
            direction=direction,
            gate=config.get("gate"),
        )
    else:
        method = gradmod.MultiLoss(direction=direction)
    return gradmod.ModulationContext(
        parts.model,
        dict(heads),
        encoders=parts.encoder_paths(),
        method=method,
        fusion="head",
        **level(config, opt),
    )


# the same objective as "multiloss", computed by gradmod: a check of the injection
register("multiloss:gradmod", grid=True, heads="linear")(gradmod_multiloss)
# MLB's official configuration (alpha 0.8 on CREMA-D/AVE; encoder + head + fusion slice scaled)
register("mlb", heads="linear", alpha=0.8, scale="official")(gradmod_multiloss)


@register("balanced", heads="linear", recommended="gradmod.balanced()")
def _balanced(parts: Parts, config: Config, opt: Optimizer) -> gradmod.ModulationContext:
    """gradmod's recommended configuration (MLB, alpha 0.8, encoder scaling), by its name;
    recommended on the update level (``balanced@update``)."""
    return gradmod.ModulationContext(
        parts.model,
        dict(parts.heads),
        encoders=parts.encoder_paths(),
        method=gradmod.balanced(),
        **level(config, opt),
    )


register("mlb:alpha=2", grid=True, heads="linear", alpha=2.0, scale="official")(gradmod_multiloss)
# compositions with CGGM's direction loss: heads shaped like CGGM's classifiers (their last
# weight has the fused head's shape), on the live features
register("multiloss+direction", heads="mlp", mlp_heads=True, direction=0.2)(gradmod_multiloss)
register("mlb+direction", heads="mlp", mlp_heads=True, alpha=0.8, scale="official", direction=0.2)(
    gradmod_multiloss
)


# MLB on the encoders with gradmod's chance gate, on boosts only or on both sides: measured
# against the recommendation (MLB without the gate) and not adopted (docs/benchmark.md)
for _gate in ("boost", "both"):
    register(
        f"mlb:gate={_gate}", grid=True, heads="linear", alpha=0.8, scale="encoder", gate=_gate
    )(gradmod_multiloss)


# ------------------------------------------------------------------------ gradmod.MMPareto
def mmpareto(parts: Parts, config: Config, opt: Optimizer) -> gradmod.ModulationContext:
    """MMPareto: the live linear heads' unimodal gradients integrated with the fused loss's on
    each encoder (gradient level only: the rule has no per-modality update)."""
    return gradmod.ModulationContext(
        parts.model,
        dict(parts.heads),
        encoders=parts.encoder_paths(),
        method=gradmod.MMPareto(rescale=config["rescale"], policy=config["policy"]),
    )


# gradmod's default (one magnitude per encoder, safe at cancelling tensors), then the official
# arithmetic (per-tensor magnitude) as a grid point
register("mmpareto", heads="linear", rescale="encoder", policy="safe")(mmpareto)
register("mmpareto:official", grid=True, heads="linear", rescale="tensor", policy="official")(
    mmpareto
)


# ------------------------------------------------------------------------- the update level
# Each coefficient method's update form (AGM has none: its coefficients scale responses that
# reach the fused head too; MLB's official scaling of a fused-head column block neither). The
# recommended configuration's is part of --quick; the others are grid points (full runs).
at_update("balanced", grid=False)
# OPM has none: its coefficients are ones (it acts in the forward).
for _name in (
    "cggm",
    "ogm-ge",
    "ogm-ge:alpha=0.8",
    "ogm-tpami-plus",
    "mlb:gate=boost",
    "mlb:gate=both",
):
    at_update(_name)
