"""Pure, typed tensor functions behind gradmod's methods.

Every function is tensor-in/tensor-out, vectorised over modalities, free of host
synchronisation (no ``.item()``, no numpy) and differentiable where it matters, so it can be used
on its own, inside a compiled region, or as the reference that the hook engine is tested against.

* Coefficient rules: :func:`improvement_rate_scale` (CGGM), :func:`ogm_ge_coefficients`
  (OGM-GE), :func:`agm_coefficients` (AGM), :func:`mlb_coefficients` (MLB),
  :func:`ogm_tpami_coefficients` (the revised OGM of the TPAMI 2024 extension).
* OPM (on-the-fly prediction modulation, TPAMI 2024): :func:`opm_drop_probability`,
  :func:`opm_drop` (seeded per-sample feature dropping) and :func:`opm_feature_scale`.
* Scores they read: :func:`true_class_probability`, :func:`clipped_nll`, :func:`correct`,
  :func:`sign_correct` (and their batch means :func:`accuracy`, :func:`sign_accuracy`),
  :func:`one_vs_others_ratio`, :func:`mean_of_others`.
* Directions: :func:`flat_cosine` (lists of tensors, no concatenation) and CGGM's
  :func:`cosine_direction_loss`.
* Gradient integration: :func:`mmpareto_combine` (MMPareto: one encoder's multimodal and
  unimodal gradients into one, per-tensor, no concatenation) and its weights
  :func:`mmpareto_weights`.
* :func:`shapley_responses`: AGM's mono-modal responses of a fused model.
* InfoReg: :func:`fisher_trace` (per-step information amount of each encoder),
  :func:`acquisition_rate` (the prime-learning-window rate), :func:`inforeg_beta` (regulation
  strength per modality), :func:`proximal_gradient` / :func:`proximal_penalty` (the pull toward
  the epoch-start weights).
"""

from ._agm import agm_coefficients
from ._cggm import Policy, improvement_rate_scale
from ._cosine import TensorOrList, cosine_direction_loss, flat_cosine
from ._inforeg import (
    Versus,
    acquisition_rate,
    fisher_trace,
    inforeg_beta,
    proximal_gradient,
    proximal_penalty,
)
from ._metrics import accuracy, correct, sign_accuracy, sign_correct
from ._mlb import Gate, mlb_coefficients
from ._mmpareto import ParetoCombination, ParetoRescale, mmpareto_combine, mmpareto_weights
from ._ogm import OGMForm, ogm_ge_coefficients
from ._opm import (
    OGMVariant,
    OPMDrop,
    Rescale,
    ogm_tpami_coefficients,
    opm_drop,
    opm_drop_probability,
    opm_feature_scale,
)
from ._scores import clipped_nll, mean_of_others, one_vs_others_ratio, true_class_probability
from ._shapley import shapley_responses

__all__ = [
    "Gate",
    "OGMForm",
    "OGMVariant",
    "OPMDrop",
    "ParetoCombination",
    "ParetoRescale",
    "Policy",
    "Rescale",
    "TensorOrList",
    "Versus",
    "accuracy",
    "acquisition_rate",
    "agm_coefficients",
    "clipped_nll",
    "correct",
    "cosine_direction_loss",
    "fisher_trace",
    "flat_cosine",
    "improvement_rate_scale",
    "inforeg_beta",
    "mean_of_others",
    "mlb_coefficients",
    "mmpareto_combine",
    "mmpareto_weights",
    "ogm_ge_coefficients",
    "ogm_tpami_coefficients",
    "one_vs_others_ratio",
    "opm_drop",
    "opm_drop_probability",
    "opm_feature_scale",
    "proximal_gradient",
    "proximal_penalty",
    "shapley_responses",
    "sign_accuracy",
    "sign_correct",
    "true_class_probability",
]
