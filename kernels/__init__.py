"""Fused kernels for the coupling laws (Numba CPU, Numba CUDA, CuPy).

This package never imports ``nflow_np``; ``nflow_np.backend`` reaches it lazily. The NumPy
reference the kernels must match is ``nflow_np.flows.coupling_law``.
"""
