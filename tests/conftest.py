"""Pytest configuration: make ``from helpers import ...`` and ``import nflow_np`` work from any test file."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from threadpoolctl import threadpool_limits

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

for path in (str(TESTS_DIR), str(REPO_ROOT)):
    if path not in sys.path:
        sys.path.insert(0, path)

# The tests' GEMMs are tiny: one BLAS thread is faster, and it keeps a split GEMM from stalling
# while another process holds the second core (the suite's wall time then stays predictable).
_BLAS_LIMIT = threadpool_limits(limits=1, user_api="blas")

# Hypothesis draws the same examples on every run, so a CI run reproduces the run that was checked
# here (the suite is a proof, not a lottery). `HYPOTHESIS_PROFILE=explore pytest` draws fresh examples
# to hunt for new counterexamples.
settings.register_profile("reproducible", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "reproducible"))


@pytest.fixture
def reference_backend() -> Iterator[None]:
    """Run the test on the NumPy reference backend, then restore the one before.

    The suite otherwise runs on the default backend (``"auto"``: numba when it imports), which is
    what users get; tests *of the reference* ask for it explicitly with this fixture.
    """
    from nflow_np import backend

    with backend.using("numpy"):
        yield
