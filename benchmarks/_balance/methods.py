"""The compared method variants: a registry ``name -> Variant``, the benchmark's extension point.

A variant trains the late-fusion model (:class:`~.models.FusedNet`) with

* ``aux_loss``: ``False`` = plain cross-entropy on the fused logits; ``True`` = the multi-loss
  objective ``CE(fused) + sum_m CE(head_m(h_m))`` with the unimodal linear heads on the LIVE
  encoder outputs (the heads join the optimizer);
* ``context``: ``None`` (no modulation) or a factory ``(parts, config) -> ModulationContext``,
  entered around every ``loss.backward()`` as ``with ctx(features=feats, targets=y)``. Whatever
  ``ctx.classifier_parameters()`` returns that the optimizer does not already train is added to
  it at ``classifier_lr_ratio`` times the model's learning rate; ``ctx.coefficients`` is
  recorded every step.

Adding a method is one decorated factory (see ``EXTENSION POINT`` below)::

    @register("mlb", aux_loss=True, alpha=0.8)
    def _mlb(parts: Parts, config: Config) -> gradmod.ModulationContext:
        return gradmod.ModulationContext(
            parts.model,
            dict(parts.heads),  # the live unimodal heads the multi-loss objective trains
            encoders=parts.encoder_paths(),
            method=gradmod.MLB(alpha=config["alpha"]),
            fusion="head",
        )

The grid is declared here, before anything runs (:data:`CGGM_GRID`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gradmod

from .models import Parts

__all__ = [
    "CGGM_GRID",
    "REFERENCES",
    "VARIANTS",
    "Config",
    "ContextFactory",
    "Variant",
    "register",
]

Config = dict[str, Any]
ContextFactory = Callable[[Parts, Config], gradmod.ModulationContext]

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


#: name -> variant, in table order. ``joint`` and ``multiloss`` are the paired baselines.
VARIANTS: dict[str, Variant] = {}


def _check_name(name: str) -> None:
    if name in VARIANTS or name in REFERENCES or name.startswith("alone:") or "," in name:
        raise ValueError(f"method variant {name!r} is already defined or not a valid name")


def register(
    name: str, *, aux_loss: bool = False, grid: bool = False, **config: Any
) -> Callable[[ContextFactory], ContextFactory]:
    """Decorator: register ``factory`` as variant ``name`` with hyper-parameters ``config``.

    ``config`` is recorded with every run and handed to the factory; ``aux_loss`` selects the
    multi-loss objective; ``grid`` marks a grid point (not run by ``--quick``).
    """
    _check_name(name)

    def add(factory: ContextFactory) -> ContextFactory:
        VARIANTS[name] = Variant(name, aux_loss, factory, dict(config), grid)
        return factory

    return add


def _plain(name: str, *, aux_loss: bool) -> None:
    _check_name(name)
    VARIANTS[name] = Variant(name, aux_loss)


# ------------------------------------------------------------------------------ baselines
_plain("joint", aux_loss=False)  # plain cross-entropy on the fused logits
_plain("multiloss", aux_loss=True)  # + sum_m CE(head_m(h_m)), heads on the live features


# ------------------------------------------------------------------------------ gradmod.CGGM
def cggm(parts: Parts, config: Config) -> gradmod.ModulationContext:
    """gradmod's CGGM; classifiers = the MLPs on detached features, direction loss on the head."""
    return gradmod.ModulationContext(
        parts.model,
        dict(parts.classifiers),
        encoders=parts.encoder_paths(),
        method=gradmod.CGGM(rho=config["rho"], lam=config["lam"]),
        fusion="head",
    )


#: Official defaults first (``cggm``), then the small grid, declared before running.
CGGM_GRID: tuple[tuple[float, float], ...] = ((1.3, 0.2), (1.0, 0.2), (1.3, 0.0), (1.0, 0.0))
for _rho, _lam in CGGM_GRID:
    _default = (_rho, _lam) == (1.3, 0.2)
    _name = "cggm" if _default else f"cggm:rho={_rho:g}:lam={_lam:g}"
    register(_name, grid=not _default, rho=_rho, lam=_lam)(cggm)


# ============================================================================ EXTENSION POINT
# Methods being added to gradmod (OGM-GE, AGM, MLB) and compositions: register one factory each,
# e.g. (uncomment when gradmod ships them; the names of their classes/arguments may differ):
#
# @register("ogm-ge", alpha=0.8)
# def _ogm_ge(parts: Parts, config: Config) -> gradmod.ModulationContext:
#     return gradmod.ModulationContext(
#         parts.model, None, encoders=parts.encoder_paths(),
#         method=gradmod.OGMGE(alpha=config["alpha"]), fusion="head",
#     )
#
# @register("mlb", aux_loss=True, alpha=0.8)          # MLB trains inside the multi-loss objective
# def _mlb(parts: Parts, config: Config) -> gradmod.ModulationContext:
#     return gradmod.ModulationContext(
#         parts.model, dict(parts.heads), encoders=parts.encoder_paths(),
#         method=gradmod.MLB(alpha=config["alpha"]), fusion="head",
#     )
# ==============================================================================================
