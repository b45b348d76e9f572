"""A context's engine, built from its resolved configuration (:func:`gradmod._config.configure`):
the update level, the block wiring, the watch over the encoder parameters and the parameters
each block checks for another context."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from ._config import Config
from ._update import UpdateLevel
from ._validate import ParameterWatch, slot_list
from ._wiring import Wiring

if TYPE_CHECKING:
    from ._context import ModulationContext

__all__ = ["Parts", "build"]


class Parts(NamedTuple):
    """What :func:`build` makes of a configuration."""

    update: UpdateLevel | None  # the update level (act="update"), else None
    wiring: Wiring  # each block's hooks (and the coefficient tensor they read)
    watch: ParameterWatch  # the encoder parameters changed since construction
    members: list[nn.Parameter]  # every group parameter, checked for another context


def build(cfg: Config, optimizer: torch.optim.Optimizer | None, owner: ModulationContext) -> Parts:
    """The engine of ``owner``, built from its configuration. The update level reads ``owner``
    (whether its block is open, its ``grad_scaler``) through a weak reference: no reference
    cycle keeps a dropped context attached to the optimizer."""
    names, targets = cfg.binding.names, cfg.targets
    update = None
    if cfg.act == "update":
        assert optimizer is not None
        me = weakref.ref(owner)
        update = UpdateLevel(
            optimizer,
            [targets.encoders.get(n, []) for n in names],
            names,
            active=lambda: (c := me()) is not None and c._plan is not None,
            scaler=lambda: None if (c := me()) is None else c.grad_scaler,
        )
    wiring = Wiring(cfg.binding, targets, cfg.needs, cfg.mode, update=update is not None)
    hooked = (
        [t for ts in targets.encoders.values() for t in ts]
        if cfg.needs.level == "encoders" and cfg.mode == "parameter" and cfg.act == "gradient"
        else []
    )  # tensors that get a parameter hook: they must keep requiring grad
    groups = cfg.binding.groups
    watch = ParameterWatch(slot_list(cfg.root, cfg.slots, groups), cfg.skipped, hooked)
    # Where no parameter hook holds the encoders (feature mode, response-level methods, the
    # update level), each group is held by a pass-through marker on its first parameter (one
    # call per modality and backward); every group parameter is checked for another context
    # on entering.
    members = [p for ps in groups.values() for p in ps]
    return Parts(update, wiring, watch, members)
