"""Where the repository's sibling packages ``kernels/`` and ``benchmarks/`` are imported from.

In the repository they are the folders beside ``nflow_np/`` and are imported as ``kernels`` and
``benchmarks`` (what the tests and ``python -m benchmarks`` use). Installed (``pip install .``) they
are ``nflow_np_kernels`` and ``nflow_np_benchmarks`` (``setup.py``'s ``package_dir``), so that they can
never shadow the PyPI packages named ``kernels`` or ``benchmarks``, nor be shadowed by them. Each
package imports its own modules relatively, so it works under either name.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
INSTALLED_NAMES = {"kernels": "nflow_np_kernels", "benchmarks": "nflow_np_benchmarks"}


def sibling_package(name: str) -> str:
    """The import name of the repository folder ``name`` (``"kernels"`` or ``"benchmarks"``) here.

    ``name`` itself when the module that name finds is this checkout's folder (never another
    distribution's package of that name); otherwise the installed name.
    """
    try:
        spec = importlib.util.find_spec(name)  # a top-level lookup: nothing is imported
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin is not None and Path(spec.origin).resolve().parent == _ROOT / name:
        return name
    return INSTALLED_NAMES[name]


def kernel_module(module: str) -> str:
    """The full import name of the kernel module ``module``, e.g. ``"kernels.numba_cpu"`` in the repository."""
    return f"{sibling_package('kernels')}.{module}"
