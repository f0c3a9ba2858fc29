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
