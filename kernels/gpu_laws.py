"""The reference's law classes, built over a GPU module's four fused operations.

``kernels.numba_cuda`` and ``kernels.cupy_kernels`` differ only in how they launch their kernels;
the classes that give those kernels the signatures of ``nflow_np.flows.coupling_law`` are the same
and are made here once. ``sign`` is ``+1`` for the forward pass and ``−1`` for the inverse.

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


def make_laws(
    additive: Callable,
    additive_backward: Callable,
    affine: Callable,
    affine_backward: Callable,
    where: str,
) -> dict[str, type]:
    """``{"additive": AdditiveLaw, "affine": AffineLaw}`` calling the given operations.

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
    where : str
        Names the backend in the classes' docstrings.
    """

    class AdditiveLaw:
        __doc__ = f"NICE's additive law on the GPU ({where}); maths in :mod:`nflow_np.flows.coupling_law`."

        name = "additive"
        has_scale = False

        @staticmethod
        def out_features(d2: int) -> int:
            return d2

        @staticmethod
        def forward(x2, h, scale):
            return additive(x2, h, scale, 1.0)

        @staticmethod
        def inverse(z2, h, scale):
            return additive(z2, h, scale, -1.0)

        @staticmethod
        def backward_forward(x2, h, scale, d_z2, d_logdet):
            return additive_backward(d_z2, 1.0, (x2, h, scale, d_z2, d_logdet))

        @staticmethod
        def backward_inverse(z2, h, scale, d_x2, d_logdet):
            return additive_backward(d_x2, -1.0, (z2, h, scale, d_x2, d_logdet))

    class AffineLaw:
        __doc__ = f"RealNVP's affine law ``s = a ⊙ tanh(ŝ)`` on the GPU ({where})."

        name = "affine"
        has_scale = True

        @staticmethod
        def out_features(d2: int) -> int:
            return 2 * d2

        @staticmethod
        def forward(x2, h, scale):
            return affine(x2, h, scale, 1.0)

        @staticmethod
        def inverse(z2, h, scale):
            return affine(z2, h, scale, -1.0)

        @staticmethod
        def backward_forward(x2, h, scale, d_z2, d_logdet):
            return affine_backward(x2, h, scale, d_z2, d_logdet, 1.0)

        @staticmethod
        def backward_inverse(z2, h, scale, d_x2, d_logdet):
            return affine_backward(z2, h, scale, d_x2, d_logdet, -1.0)

    return {"additive": AdditiveLaw, "affine": AffineLaw}
