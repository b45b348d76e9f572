"""Device and dtype of the suite, chosen by environment variables.

    GRADMOD_TEST_DEVICE=cuda GRADMOD_TEST_DTYPE=float64 pytest

runs the same tests on CUDA in float64. Defaults: cpu, float32. References are always computed
in float64 on the CPU, inside the tests themselves.
"""

from __future__ import annotations

import os

import torch

DEVICE = torch.device(os.environ.get("GRADMOD_TEST_DEVICE", "cpu"))
DTYPE: torch.dtype = getattr(torch, os.environ.get("GRADMOD_TEST_DTYPE", "float32"))

if DEVICE.type == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("GRADMOD_TEST_DEVICE=cuda but CUDA is not available")

#: Tolerances for comparing DTYPE results with float64 references.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[DTYPE]
ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2e-2}[DTYPE]
