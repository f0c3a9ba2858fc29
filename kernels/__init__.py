"""Fused kernels, one folder per operation: each replaces one NumPy reference function of ``nflow_np``.

This package never imports ``nflow_np``; ``nflow_np.backend`` reaches it lazily, importing a
module only when its backend is selected. Each folder is one operation; its ``__init__`` names the
NumPy reference (the specification, in ``nflow_np``) and the tests that hold the kernels to it, and
holds one module per backend. Each backend module exports a ``FUSED`` table of only what it
accelerates (``{"affine.forward": kernel, ...}``, the names ``nflow_np.backend.fused`` takes; a kernel
may return ``NotImplemented`` to leave a call to the reference) and, where a device is needed,
``require_device()``. Design, accuracy and timings: ``docs/kernels.md``.

- :mod:`kernels.coupling`         the coupling laws' elementwise transform and its VJPs:
  ``numba_cpu`` (backend ``"numba"``), ``numba_cuda`` (``"numba-cuda"``), ``cupy_kernels``
  (``"cupy"``, CUDA C in ``coupling/cuda/``), ``gpu_laws`` (the two GPU modules' shared wrapper),
  ``validation`` (argument checks shared by the three)
- :mod:`kernels.bias_activation`  a hidden layer's bias + activation and its backward: ``numba_cpu``
- :mod:`kernels.adam`             Adam's update in one pass: ``numba_cpu``
- :mod:`kernels.conv`             im2col / col2im of the convolutional nets: ``numba_cpu`` (not wired to
  a backend: ``docs/conv.md#speed``)
- :mod:`kernels.common`           what several operations share: ``vecmath`` (vectorisable exp/tanh
  for the Numba CPU kernels)

Tests mirror the folders: ``tests/kernels/<operation>/``; ``tests/kernels/test_backend.py`` proves the
seam (``nflow_np.backend``) that picks a backend's modules.
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
