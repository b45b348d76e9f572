from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))

torch.set_num_threads(1)
# CI draws the same examples on every run (a clean clone has no example database); the
# "thorough" profile (HYPOTHESIS_PROFILE=thorough) searches 2000 fresh ones per property.
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
