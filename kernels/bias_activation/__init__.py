"""A hidden layer's bias + activation and its backward, fused into one pass each.

Reference (the specification; pointer only, this package never imports it):
``nflow_np/nn/bias_activation.py``, functions ``forward`` and ``backward``; fused under
``"bias_activation"`` and ``"bias_activation_backward"``.

- ``numba_cpu``  backend ``"numba"``

Tests: ``tests/kernels/bias_activation/test_numba_cpu.py``. Design and timings:
``docs/kernels.md#fused-bias--activation``.
"""
