"""The coupling laws' elementwise transform, fused: forward, inverse and both VJPs, per backend.

Reference (the specification; pointer only, this package never imports it):
``nflow_np/flows/coupling_law.py``, classes ``AffineLaw`` and ``AdditiveLaw``, methods ``forward``,
``inverse``, ``forward_vjp``, ``inverse_vjp``; fused under ``"affine.forward"`` and so on.

- ``numba_cpu``     backend ``"numba"``: one pass over memory, rows over threads (affine only:
  the additive law is one NumPy pass already)
- ``numba_cuda``    backend ``"numba-cuda"``: ``numba.cuda.jit`` kernels (a GPU, or the simulator)
- ``cupy_kernels``  backend ``"cupy"``: the CUDA C of ``cuda/coupling.cu`` through CuPy's ``RawModule``
- ``gpu_laws``      the ``FUSED`` table both GPU modules build over their four launches
- ``validation``    argument checks shared by the three backends (shapes, one float dtype)

Tests: ``tests/kernels/coupling/`` (``law_check.py`` holds the error metric and bounds;
``test_numba_cpu.py``; ``test_numba_cuda.py`` under the CUDA simulator; ``test_gpu.py`` on a GPU;
``test_ptx.py`` compiles both GPU sources to PTX). Design and accuracy: ``docs/kernels.md``.
"""
