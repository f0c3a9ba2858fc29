"""Adam's (and AdamW's) whole parameter update in one pass over memory.

Reference (the specification; pointer only, this package never imports it):
``nflow_np/optim.py``, function ``adam_update``; fused under ``"adam_update"``.

- ``numba_cpu``  backend ``"numba"``: the reference's bits

Tests: ``tests/kernels/adam/test_numba_cpu.py``. Design and timings: ``docs/kernels.md#fused-adam``.
"""
