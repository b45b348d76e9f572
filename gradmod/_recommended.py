"""gradmod's recommended configuration."""

from __future__ import annotations

from typing import Any

from .methods import MLB

__all__ = ["balanced"]


def balanced(**overrides: Any) -> MLB:
    """gradmod's recommended balancing method: ``MLB(alpha=0.8, scale="encoder", gate="both")``,
    best used on the update level (give the context your optimizer).

    Multi-loss training (a unimodal head per modality on the live encoder output, its loss
    added) with MLB's coefficients — the weak modality sped up, the strong one slowed — and
    gradmod's chance gate: a head that does not beat chance is not boosted, and a modality is
    not slowed for others that have nothing to learn, so a modality with nothing to give costs
    nothing. With ``optimizer=`` the context puts the coefficients on each modality's update,
    where Adam/AdamW cannot cancel them::

        optimizer = torch.optim.Adam([*model.parameters(), *heads_parameters], lr=1e-3)
        ctx = gradmod.ModulationContext(model, heads, optimizer=optimizer)  # the update level

    The choice and its measurements (``benchmarks/balance.py``, Adam and SGD, every setting,
    paired with joint training and plain multi-loss) are in the README and
    ``docs/benchmark.md``. Keyword arguments override the defaults; ``task="regression"`` drops
    the gate (a regression head has no chance level).
    """
    config: dict[str, Any] = {"alpha": 0.8, "scale": "encoder", "gate": "both"}
    config.update(overrides)
    if config.get("task") == "regression" and "gate" not in overrides:
        config["gate"] = None
    return MLB(**config)
