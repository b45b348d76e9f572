"""gradmod: balanced multimodal learning for PyTorch, as drop-in gradient modulation.

When one network learns from several modalities, the fastest-learning modality dominates and
the others' encoders stay under-trained. gradmod multiplies each modality encoder's gradients
by a per-step coefficient chosen by a published method, inside your own training loop::

    import gradmod

    heads = {"audio": nn.Linear(32, 5), "video": nn.Linear(32, 5)}  # one unimodal head each
    ctx = gradmod.ModulationContext(model, heads)  # encoders model.audio, model.video
    optimizer = torch.optim.Adam([*model.parameters(), *ctx.classifier_parameters()])
    for xa, xv, y in loader:
        feats = {"audio": model.audio(xa), "video": model.video(xv)}
        loss = loss_fn(model.head(torch.cat([feats["audio"], feats["video"]], 1)), y)
        with ctx(features=feats, targets=y):
            loss.backward()
        optimizer.step()             # any optimizer
        optimizer.zero_grad()

* ``gradmod.balanced()`` (:func:`balanced`) — the recommended configuration and the default
  ``method=``: ``MLB(alpha=0.8)``, unimodal heads in the objective with balancing coefficients.
* :class:`ModulationContext` — the engine: explicit modality groups, validation that reports
  every problem at once, pre-accumulation hooks that exist only inside the ``with`` block,
  method state that advances only when the block exits cleanly.
* Methods, switched with ``method=``: :class:`MLB`, :class:`MultiLoss`, :class:`CGGM`
  (``official=True`` for parity with the authors' code), :class:`OGMGE`, :class:`OPM`
  (drops the dominant modality's features in the forward: ``ctx.prepare``), :class:`AGM`,
  :class:`InfoReg` (a proximal pull on the prime modality during the prime learning window),
  :class:`MMPareto` (gradient integration without conflict), and
  :class:`Fixed` (your own constants or schedule: with ``act="update"``, modality-specific
  learning rates).
* :mod:`gradmod.functional` — the pure math (coefficient rules, improvement-rate scaling,
  cosine direction loss, Shapley responses, metrics), usable on its own.
* :class:`Monitor` — opt-in diagnostics: per block the coefficients, the method's scores and
  each modality's encoder gradient norm before and after modulation (``monitor=``); export to
  a dict, pandas or TensorBoard, and :mod:`gradmod.plot` draws the traces (matplotlib extra).
* Errors: :class:`ConfigurationError` (at construction), :class:`StepError` (a step's
  inputs), :class:`ContextError` (nested, concurrent or conflicting blocks); all are
  :class:`GradmodError`.
"""

from . import functional
from ._context import Act, Mode, ModulationContext
from ._errors import ConfigurationError, ContextError, GradmodError, StepError
from ._recommended import balanced
from .methods import (
    AGM,
    CGGM,
    MLB,
    OGMGE,
    OPM,
    Binding,
    Fixed,
    GradHook,
    InfoReg,
    Injection,
    Method,
    MMPareto,
    MultiLoss,
    Needs,
    Prepared,
    Step,
    StepPlan,
    Targets,
)
from .monitor import Monitor

__version__ = "0.1.0"

__all__ = [
    "AGM",
    "Act",
    "CGGM",
    "Fixed",
    "InfoReg",
    "MLB",
    "MMPareto",
    "OGMGE",
    "OPM",
    "MultiLoss",
    "Binding",
    "ConfigurationError",
    "ContextError",
    "GradHook",
    "GradmodError",
    "Injection",
    "Method",
    "Mode",
    "ModulationContext",
    "Needs",
    "Prepared",
    "Monitor",
    "Step",
    "StepError",
    "StepPlan",
    "Targets",
    "__version__",
    "balanced",
    "functional",
]
