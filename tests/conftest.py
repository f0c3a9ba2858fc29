"""Pytest configuration: make ``from helpers import ...`` and ``import nflow_np`` work from any test file."""

from __future__ import annotations

import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

for path in (str(TESTS_DIR), str(REPO_ROOT)):
    if path not in sys.path:
        sys.path.insert(0, path)
