"""Image flows: masks for couplings, ``Squeeze`` and RealNVP's multi-scale factor-out.

**How images meet the row protocol.** Every flow works on rows ``x: (N, D)``. An image batch
``(N, C, H, W)`` is passed as its C-order flattening ``x.reshape(N, C·H·W)`` (a view, no copy): the
pixel ``(c, h, w)`` is column ``(c·H + h)·W + w``. Layers that care about the image structure keep an
explicit ``shape = (C, H, W)`` and reshape rows to images internally; the rest of the library
(couplings, ``Sequential``, the model, ``fit``) never sees a 4-D array. Only
:class:`nflow_np.image_models.ImageFlowModel` turns ``(N, C, H, W)`` into rows at the boundary.

- :func:`checkerboard_mask`, :func:`channel_mask`: boolean masks over the ``C·H·W`` columns for a
  :class:`~nflow_np.flows.coupling.Coupling` (True = passed through, fed to the coupling net).
- :class:`Squeeze`: space-to-depth, ``(C, H, W) → (4C, H/2, W/2)``; a permutation, log-det 0.
- :class:`FactorOut`: after a scale, the first part of the coordinates goes on through a further
  flow and the rest is "factored out" to the base distribution: the identity on those coordinates.

Derivations: ``docs/images.md``. RealNVP: Dinh, Sohl-Dickstein, Bengio 2016 (arXiv 1605.08803), §3.4–3.6.
"""

from __future__ import annotations

import numpy as np

from nflow_np.flows.base import Flow
from nflow_np.specs import MAX_DIM, SpecReader, register_flow, to_spec

Shape = tuple[int, int, int]


def check_shape(shape: object) -> Shape:
    """Return ``shape`` as a ``(C, H, W)`` tuple of positive ints, or raise ``ValueError``."""
    try:
        values = tuple(shape)
    except TypeError:
        raise ValueError(f"an image shape must be (C, H, W), got {shape!r}") from None
    if len(values) != 3 or any(isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1 for v in values):
        raise ValueError(f"an image shape must be three positive integers (C, H, W), got {shape!r}")
    return tuple(int(v) for v in values)


def checkerboard_mask(shape: Shape, parity: int) -> np.ndarray:
    """RealNVP's checkerboard mask: ``mask[c, h, w] = ((h + w) % 2 == parity)``, flattened to ``(C·H·W,)``.

    Every channel gets the same pattern, so a coupling with this mask transforms the "white"
    squares given the "black" ones (or the other way round for the other parity).
    """
    c, h, w = check_shape(shape)
    if parity not in (0, 1):
        raise ValueError(f"parity must be 0 or 1, got {parity}")
    if h * w < 2:
        raise ValueError(f"a checkerboard needs at least two pixels per channel, got shape {shape}")
    board = (np.arange(h)[:, None] + np.arange(w)[None, :]) % 2 == parity
    return np.broadcast_to(board, (c, h, w)).reshape(-1).copy()


def channel_mask(shape: Shape, parity: int) -> np.ndarray:
    """RealNVP's channel-wise mask: the first ``C/2`` channels (parity 0) or the last ``C/2`` (parity 1).

    In C order each half of the channels is one contiguous block of columns, so the coupling's
    index sets are slices (views, no gather).
    """
    c, h, w = check_shape(shape)
    if parity not in (0, 1):
        raise ValueError(f"parity must be 0 or 1, got {parity}")
    if c % 2:
        raise ValueError(f"a channel-wise mask needs an even number of channels, got shape {shape}")
    first_half = np.arange(c) < c // 2
    return np.repeat(first_half == (parity == 0), h * w)


@register_flow("squeeze", "shape")
class Squeeze(Flow):
    """Space-to-depth: each 2×2 block of a channel becomes 4 channels (RealNVP §3.6).

    ``shape = (C, H, W)`` with ``H, W`` even; output shape ``(4C, H/2, W/2)``:

    forward  ``z[4c + 2i + j, h, w] = x[c, 2h + i, 2w + j]``  (``i, j ∈ {0, 1}``),  ``logdet = 0``
    inverse  ``x[c, 2h + i, 2w + j] = z[4c + 2i + j, h, w]``,                     ``logdet = 0``

    It only moves entries, so its Jacobian is a permutation matrix (``|det| = 1``), and the
    backward pass of each direction is the other direction applied to the gradient:
    ``∂L/∂x = squeeze⁻¹(d_z)``, ``∂L/∂z = squeeze(d_x)``. No parameters. Rows in and out are
    C-order flattenings of ``(C, H, W)`` and ``(4C, H/2, W/2)`` images respectively.

    Parameters
    ----------
    shape : (C, H, W)
        Shape of the input image; ``H`` and ``W`` must be even.
    """

    def __init__(self, shape: Shape) -> None:
        c, h, w = check_shape(shape)
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze needs an even height and width, got shape {shape}")
        super().__init__(c * h * w)
        self.shape = (c, h, w)
        self.out_shape = (4 * c, h // 2, w // 2)

    def spec(self, where: str = "flow") -> dict:
        """``{"kind": "squeeze", "shape": [C, H, W]}``."""
        return {"kind": "squeeze", "shape": list(self.shape)}

    @classmethod
    def from_spec(cls, read: SpecReader) -> Squeeze:
        return cls(tuple(read.list("shape", int, minimum=1, maximum=MAX_DIM)))

    def squeeze(self, x: np.ndarray) -> np.ndarray:
        """Rows of ``(C, H, W)`` images → rows of ``(4C, H/2, W/2)`` images."""
        c, h, w = self.shape
        blocks = x.reshape(-1, c, h // 2, 2, w // 2, 2)  # n, c, h, i, w, j
        # .copy() before the reshape: one copy, as the reshape of a transpose makes anyway, but never a view
        # of x (with H = W = 2 the transpose is contiguous and the reshape alone would alias the input)
        return blocks.transpose(0, 1, 3, 5, 2, 4).copy().reshape(x.shape[0], -1)  # n, c, i, j, h, w

    def unsqueeze(self, z: np.ndarray) -> np.ndarray:
        """Rows of ``(4C, H/2, W/2)`` images → rows of ``(C, H, W)`` images (inverse of :meth:`squeeze`)."""
        c, h, w = self.shape
        blocks = z.reshape(-1, c, 2, 2, h // 2, w // 2)  # n, c, i, j, h, w
        return blocks.transpose(0, 1, 4, 2, 5, 3).copy().reshape(z.shape[0], -1)  # n, c, h, i, w, j (as above)

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._remember("forward", x.shape[0])
        return self.squeeze(x), np.zeros_like(x, shape=x.shape[0])

    def _inverse(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._remember("inverse", z.shape[0])
        return self.unsqueeze(z), np.zeros_like(z, shape=z.shape[0])

    def _backward(self, d_out: np.ndarray, d_logdet: np.ndarray) -> np.ndarray:
        direction, _ = self._cache
        return self.unsqueeze(d_out) if direction == "forward" else self.squeeze(d_out)


@register_flow("factor_out", "dim", "flow")
class FactorOut(Flow):
    """Multi-scale factor-out (RealNVP §3.6): ``flow`` acts on the first ``k`` coordinates only.

    With ``x = [x_a, x_b]``, ``x_a`` the first ``k = flow.dim`` columns:

    forward  ``z = [f(x_a), x_b]``,     ``logdet = log|det ∂f/∂x_a|``
    inverse  ``x = [f⁻¹(z_a), z_b]``,   ``logdet = log|det ∂f⁻¹/∂z_a|``

    The Jacobian is block diagonal ``diag(∂f/∂x_a, I)``, so the log-det is the inner flow's. The
    factored-out ``x_b`` become coordinates of ``z`` as they are: the base distribution of the model
    scores them (``log p(x) = log p_Z([f(x_a), x_b]) + logdet`` with a factorised ``p_Z``), and
    sampling draws them from ``p_Z`` with the rest. That is RealNVP's "half of the dimensions are
    factored out to the base distribution after each scale", written as one bijection of ``R^D``, so
    ``log_prob``, ``sample``, ``encode`` and ``decode`` of an ordinary
    :class:`~nflow_np.model.FlowModel` handle the factored parts with no special case.

    Backward: ``∂L/∂x_a = f.backward(d_z_a, d_logdet)``, ``∂L/∂x_b = d_z_b``.

    The inner flow gets a C-contiguous copy of the first ``k`` columns (``.copy()``, which works on
    device arrays too; ``np.ascontiguousarray`` would try to convert a CuPy array to NumPy).

    Parameters
    ----------
    dim : int
        Dimension ``D`` of the whole input.
    flow : Flow
        The flow applied to the first ``flow.dim < D`` coordinates.
    """

    @property
    def invertible_in_backward(self) -> bool:
        return self.flow.invertible_in_backward

    def __init__(self, dim: int, flow: Flow) -> None:
        super().__init__(dim)
        if not 1 <= flow.dim < self.dim:
            raise ValueError(f"FactorOut's inner flow must work on 1 to {self.dim - 1} coordinates, got {flow.dim}")
        self.flow = flow
        self.keep = flow.dim
        self.children = {"flow": flow}

    def spec(self, where: str = "flow") -> dict:
        """``{"kind": "factor_out", "dim", "flow"}``."""
        return {"kind": "factor_out", "dim": self.dim, "flow": to_spec(self.flow, f"{where}.flow")}

    @classmethod
    def from_spec(cls, read: SpecReader) -> FactorOut:
        dim = read.dim()
        return cls(dim, read.flow("flow"))

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z_a, logdet = self.flow._forward(x[:, : self.keep].copy())
        z = np.empty_like(x)
        z[:, : self.keep] = z_a
        z[:, self.keep :] = x[:, self.keep :]
        self._remember("forward", x.shape[0])
        return z, logdet

    def _inverse(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x_a, logdet = self.flow._inverse(z[:, : self.keep].copy())
        x = np.empty_like(z)
        x[:, : self.keep] = x_a
        x[:, self.keep :] = z[:, self.keep :]
        self._remember("inverse", z.shape[0])
        return x, logdet

    def _backward(self, d_out: np.ndarray, d_logdet: np.ndarray) -> np.ndarray:
        d_in = np.empty_like(d_out)
        d_in[:, : self.keep] = self.flow._backward(d_out[:, : self.keep].copy(), d_logdet)
        d_in[:, self.keep :] = d_out[:, self.keep :]
        return d_in
