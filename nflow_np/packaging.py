"""Where the repository's sibling packages ``kernels/`` and ``benchmarks/`` are imported from.

In the repository they are the folders beside ``nflow_np/`` and are imported as ``kernels`` and
``benchmarks`` (what the tests and ``python -m benchmarks`` use). Installed (``pip install .``) they
are ``nflow_np_kernels`` and ``nflow_np_benchmarks`` (``setup.py``'s ``package_dir``), so that they can
never shadow the PyPI packages named ``kernels`` or ``benchmarks``, nor be shadowed by them. Each
package imports its own modules relatively, so it works under either name.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
INSTALLED_NAMES = {"kernels": "nflow_np_kernels", "benchmarks": "nflow_np_benchmarks"}


def _resolves_here(import_name: str, folder: str) -> bool:
    """Whether the top-level lookup of ``import_name`` finds this checkout's folder ``folder``."""
    try:
        spec = importlib.util.find_spec(import_name)  # a top-level lookup: nothing is imported
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin is not None and Path(spec.origin).resolve().parent == _ROOT / folder


def sibling_package(name: str) -> str:
    """The one import name of the repository folder ``name`` (``"kernels"`` or ``"benchmarks"``) here.

    The installed name whenever it finds this checkout's folder (an editable install), else ``name``
    itself when that finds this checkout's folder (the repository on ``sys.path``, nothing installed),
    else the installed name. One name per checkout matters: Numba's on-disk cache sits beside each
    source file and records the module's import name, so a kernel compiled as ``kernels.coupling.numba_cpu``
    fails to load in a process that knows only ``nflow_np_kernels.coupling.numba_cpu`` (``kernels/__init__.py``
    makes ``import kernels`` yield the installed package for the same reason).
    """
    installed = INSTALLED_NAMES[name]
    if _resolves_here(installed, name) or not _resolves_here(name, name):
        return installed
    return name


def kernel_module(module: str) -> str:
    """The full import name of the kernel module ``module`` (``"<operation>.<backend module>"``).

    E.g. ``kernel_module("coupling.numba_cpu")`` is ``"kernels.coupling.numba_cpu"`` in the repository,
    ``"nflow_np_kernels.coupling.numba_cpu"`` installed.
    """
    return f"{sibling_package('kernels')}.{module}"


_Spec = importlib.machinery.ModuleSpec


class _OtherName(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of a sibling package's other name (and its modules) return the modules of the one name.

    Numba's cache, written by an earlier run under the other name (before ``pip install -e .``, or
    from a script that reached the folder by ``sys.path``), then rebuilds its compiled functions from
    the same module objects, and a test's ``import kernels.coupling.numba_cpu`` is the module the library runs.
    """

    def __init__(self, other: str, canonical: str) -> None:
        self.other, self.canonical = other, canonical
        self.specs: dict[str, _Spec] = {}

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> _Spec | None:
        if fullname != self.other and not fullname.startswith(self.other + "."):
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: _Spec) -> object:
        module = importlib.import_module(self.canonical + spec.name[len(self.other):])
        self.specs[module.__name__] = module.__spec__  # the import system overwrites it next
        return module

    def exec_module(self, module: object) -> None:
        """Nothing to run (the module ran under its one name); give it back its own spec."""
        module.__spec__ = self.specs.pop(module.__name__)


def _alias_other_names() -> None:
    """In a checkout, make each sibling's other name an alias of its one name, unless it is another package's."""
    for folder, installed in INSTALLED_NAMES.items():
        if not (_ROOT / folder).is_dir():  # installed from a wheel: one name only, nothing to alias
            continue
        canonical = sibling_package(folder)
        other = installed if canonical == folder else folder
        found = importlib.machinery.PathFinder.find_spec(other)  # sys.path only: no finder of ours answers
        if found is None or (found.origin is not None and Path(found.origin).resolve().parent == _ROOT / folder):
            sys.meta_path.insert(0, _OtherName(other, canonical))


_alias_other_names()
