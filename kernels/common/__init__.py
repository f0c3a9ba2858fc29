"""What several kernel folders share.

- ``vecmath``  vectorisable ``exp`` and ``tanh`` for the Numba CPU kernels (``coupling.numba_cpu``,
  ``bias_activation.numba_cpu``); reference ``numpy.exp`` / ``numpy.tanh``, bounds in ulps proven by
  ``tests/kernels/common/test_vecmath.py``; derivation: ``docs/kernels.md#exp-and-tanh``.
"""
