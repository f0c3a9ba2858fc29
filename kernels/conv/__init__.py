"""im2col and col2im for the convolutional coupling nets.

Reference (the specification; pointer only, this package never imports it):
``nflow_np/nn/conv.py``, functions ``im2col`` and ``col2im``; fused under ``"im2col"`` and ``"col2im"``.

- ``numba_cpu``  the reference's bits; in no backend's record (``nflow_np/backend.py``) until it is
  measured faster (``docs/conv.md#speed``)

Tests: ``tests/kernels/conv/test_numba_cpu.py``. Timings: ``python -m benchmarks.bench_conv``.
"""
