"""Make ``from law_check import ...`` work in the kernel tests (the suite's own conftest adds ``tests/``).

There is deliberately no ``__init__.py`` here: ``tests/kernels`` (and its folders) must not shadow the top-level
``kernels`` package that these tests import.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
