
import importlib as _importlib
import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path

# One import name per checkout (``nflow_np/packaging.py``): where this folder is also installed as
# ``nflow_np_benchmarks`` (``pip install -e .``), ``import benchmarks`` yields that package, so that a test that
# patches ``benchmarks.suite`` patches the module ``nflow bench`` runs.
_INSTALLED = "nflow_np_benchmarks"
if __name__ == "benchmarks":
    _spec = _util.find_spec(_INSTALLED)
    if _spec is not None and _spec.origin is not None and _Path(_spec.origin).resolve() == _Path(__file__).resolve():
        _sys.modules[__name__] = _importlib.import_module(_INSTALLED)
