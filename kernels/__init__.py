"""Fused kernels for the coupling laws (Numba CPU, Numba CUDA, CuPy).

This package never imports ``nflow_np``; ``nflow_np.backend`` reaches it lazily, importing a
module only when its backend is selected. The NumPy reference the kernels must match is
``nflow_np.flows.coupling_law``; each backend module exports a ``FUSED`` table of only what it
accelerates (``{"affine.forward": kernel, ...}``, the names ``nflow_np.backend.fused`` takes; a kernel
may return ``NotImplemented`` to leave a call to the reference) and, where a device is needed,
``require_device()``. Design, accuracy and timings:
``docs/kernels.md``.

- :mod:`kernels.numba_cpu`    backend ``"numba"``       (needs numba)
- :mod:`kernels.numba_cuda`   backend ``"numba-cuda"``  (needs numba and a CUDA GPU, or the simulator)
- :mod:`kernels.cupy_kernels` backend ``"cupy"``        (needs cupy and a CUDA GPU; CUDA C in ``cuda/``)
- :mod:`kernels.vecmath`      vectorisable exp/tanh for the Numba CPU kernels
- :mod:`kernels.validation`   argument checks shared by all backends
"""

import importlib as _importlib
import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path

# One import name per checkout (``nflow_np/packaging.py``): where this folder is also installed as
# ``nflow_np_kernels`` (``pip install -e .``), ``import kernels`` yields that package, so that the
# kernels compile, cache and run under one name whichever way a script or test reaches them.
_INSTALLED = "nflow_np_kernels"
if __name__ == "kernels":
    _spec = _util.find_spec(_INSTALLED)
    if _spec is not None and _spec.origin is not None and _Path(_spec.origin).resolve() == _Path(__file__).resolve():
        _sys.modules[__name__] = _importlib.import_module(_INSTALLED)
