"""gradmod: balanced multimodal learning for PyTorch, as drop-in gradient modulation.

When one network learns from several modalities, the fastest-learning modality dominates and
the others' encoders stay under-trained. gradmod multiplies each modality encoder's gradients
by a per-step coefficient chosen by a published method, inside your own training loop::

    import gradmod

    ctx = gradmod.ModulationContext(
        model,                      # your model: encoders at model.audio and model.video
        classifiers,                # {"audio": clf_a, "video": clf_v}: unimodal heads
        method=gradmod.CGGM(rho=1.3, lam=0.2),
        fusion="head",              # fusion head for CGGM's direction loss (or None)
    )
    for xa, xv, y in loader:
        feats = {"audio": model.audio(xa), "video": model.video(xv)}
        loss = loss_fn(model.head(torch.cat([feats["audio"], feats["video"]], 1)), y)
        with ctx(features=feats, targets=y):
            loss.backward()
        optimizer.step()             # any optimizer; include ctx.classifier_parameters()
        optimizer.zero_grad()

* :class:`ModulationContext` — the engine: explicit modality groups, validation that reports
  every problem at once, pre-accumulation hooks that exist only inside the ``with`` block.
* :class:`CGGM` — classifier-guided gradient modulation (NeurIPS 2024), safe by default,
  with ``official=True`` for parity with the authors' code.
* :mod:`gradmod.functional` — the pure math (improvement-rate scaling, cosine direction loss,
  metrics), usable on its own.
"""

from . import functional
from ._context import Mode, ModulationContext
from ._errors import ConfigurationError, GradmodError, StepError
from ._recommended import balanced
from .methods import (
    AGM,
    CGGM,
    MLB,
    OGMGE,
    Binding,
    Injection,
    Method,
    MultiLoss,
    Step,
    StepPlan,
    Targets,
)

__version__ = "0.1.0"

__all__ = [
    "AGM",
    "CGGM",
    "MLB",
    "OGMGE",
    "MultiLoss",
    "Binding",
    "ConfigurationError",
    "GradmodError",
    "Injection",
    "Method",
    "Mode",
    "ModulationContext",
    "Step",
    "StepError",
    "StepPlan",
    "Targets",
    "__version__",
    "balanced",
    "functional",
]
