"""The reference's law functions, built over a GPU module's four fused operations.

``kernels.coupling.numba_cuda`` and ``kernels.coupling.cupy_kernels`` differ only in how they launch their kernels;
the ``FUSED`` table that gives those kernels the signatures of ``nflow_np.flows.coupling_law`` is
the same and is made here once. ``sign`` is ``+1`` for the forward pass and ``−1`` for the inverse.

Arrays (the choice, for both modules): a law returns the kind of array it was given.

- Device arrays (CuPy, or anything with ``__cuda_array_interface__``): the kernels read and write them
  where they are, with no host copy. This is the fast path: a model moved with ``to_device()`` passes
  nothing else (``docs/kernels.md#gpu-backends``).
- NumPy arrays (a model left on the host, the CUDA simulator, the law tests): copied to the device and
  the results back on every call. Kept rather than refused, because it is correct and lets the same
  law tests run with NumPy inputs; it is slower than the CPU backends, so it is for checking, not speed.

All arrays of one call must be of one kind (the library guarantees it: a model's parameters and its
data are on one device).
"""

from __future__ import annotations

from collections.abc import Callable


def fused_table(
    additive: Callable,
    additive_backward: Callable,
    affine: Callable,
    affine_backward: Callable,
) -> dict[str, Callable]:
    """The ``FUSED`` table of a GPU module: each law function of the reference, calling the given operations.

    Parameters
    ----------
    additive : callable
        ``additive(inp, h, scale, sign) -> (out, logdet)``.
    additive_backward : callable
        ``additive_backward(d_out, sign, check_args) -> (d_inp, d_h, None)``; ``check_args`` is the
        reference's argument tuple ``(inp, h, scale, d_out, d_logdet)``, for validation.
    affine : callable
        ``affine(inp, h, scale, sign) -> (out, logdet)``.
    affine_backward : callable
        ``affine_backward(inp, h, scale, d_out, d_logdet, sign) -> (d_inp, d_h, d_scale)``.
    """
    return {
        "additive.forward": lambda x2, h, scale: additive(x2, h, scale, 1.0),
        "additive.inverse": lambda z2, h, scale: additive(z2, h, scale, -1.0),
        "additive.forward_vjp": lambda x2, h, scale, d_z2, d_logdet: additive_backward(
            d_z2, 1.0, (x2, h, scale, d_z2, d_logdet)
        ),
        "additive.inverse_vjp": lambda z2, h, scale, d_x2, d_logdet: additive_backward(
            d_x2, -1.0, (z2, h, scale, d_x2, d_logdet)
        ),
        "affine.forward": lambda x2, h, scale: affine(x2, h, scale, 1.0),
        "affine.inverse": lambda z2, h, scale: affine(z2, h, scale, -1.0),
        "affine.forward_vjp": lambda x2, h, scale, d_z2, d_logdet: affine_backward(x2, h, scale, d_z2, d_logdet, 1.0),
        "affine.inverse_vjp": lambda z2, h, scale, d_x2, d_logdet: affine_backward(z2, h, scale, d_x2, d_logdet, -1.0),
    }
