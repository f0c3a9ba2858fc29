"""The flow protocol, composition and inversion.

Convention (stated once, used everywhere): **forward is data → noise**, ``z = f(x)``, as in the
lecture's ``log p(x) = log p(f(x)) + log|det ∂f/∂x|``. Every flow returns its log-determinant
with its output, per sample:

- ``forward(x) -> (z, logdet)`` with ``logdet[n] = log|det ∂z/∂x|`` at row ``n``;
- ``inverse(z) -> (x, logdet)`` with ``logdet[n] = log|det ∂x/∂z| = −log|det ∂z/∂x|``;
- ``backward(d_out, d_logdet) -> d_in``: back-propagates through the *last* call, whichever
  direction it was. ``d_out = ∂L/∂(output)``, ``d_logdet = ∂L/∂(logdet)`` of shape ``(N,)``; it
  returns ``∂L/∂(input)`` and adds every parameter's gradient to ``grads``.

The public methods check their input (shape, dtype, finiteness) and then call the unchecked
``_forward`` / ``_inverse`` / ``_backward`` that subclasses implement and that containers such as
:class:`Sequential` call directly, so a deep stack validates once, at its entry. They also check
their result once, at the exit: an input so large that some layer overflows raises
:class:`~nflow_np.validation.NonFiniteError` naming the row, instead of returning a silent Inf/NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nflow_np.module import Module
from nflow_np.validation import check_batch, check_result


class Flow(Module):
    """A bijection of ``R^dim`` with a tractable log-determinant.

    Subclasses implement ``_forward``, ``_inverse`` and ``_backward``; ``_forward``/``_inverse``
    store ``self._cache = (direction, data)`` for ``_backward``.
    """

    invertible_in_backward: bool = True
    """Whether :class:`Sequential`'s ``memory="invert"`` mode may recompute this layer's input from
    its output with ``_inverse`` (``docs/memory.md``). ``False`` for a layer whose inverse is not
    exact in floating point (an iterative solve), draws randomness, or needs batch statistics: the
    Sequential then keeps its cache and stores its input instead."""

    cache_attributes = ("_cache",)

    def __init__(self, dim: int) -> None:
        super().__init__()
        if int(dim) < 1:
            raise ValueError(f"a flow needs a positive dimension, got {dim}")
        self.dim = int(dim)
        self._cache: tuple[str, object] | None = None

    # -- public, checked -------------------------------------------------------------------
    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map data to noise.

        Parameters
        ----------
        x : numpy.ndarray, shape (N, dim)

        Returns
        -------
        z : numpy.ndarray, shape (N, dim)
        logdet : numpy.ndarray, shape (N,)
            ``log|det ∂z/∂x|`` per row.

        Raises
        ------
        NonFiniteError
            A row of ``z`` or ``logdet`` overflowed (the input is too large for this flow and dtype).
        """
        check_batch(x, "x", self.dim, self.dtype)
        z, logdet = self._forward(x)
        check_result(z, f"{type(self).__name__}.forward", x)
        check_result(logdet, f"{type(self).__name__}.forward (log-det)", x)
        return z, logdet

    def inverse(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map noise to data.

        Parameters
        ----------
        z : numpy.ndarray, shape (N, dim)

        Returns
        -------
        x : numpy.ndarray, shape (N, dim)
        logdet : numpy.ndarray, shape (N,)
            ``log|det ∂x/∂z|`` per row.

        Raises
        ------
        NonFiniteError
            A row of ``x`` or ``logdet`` overflowed (the input is too large for this flow and dtype).
        """
        check_batch(z, "z", self.dim, self.dtype)
        x, logdet = self._inverse(z)
        check_result(x, f"{type(self).__name__}.inverse", z)
        check_result(logdet, f"{type(self).__name__}.inverse (log-det)", z)
        return x, logdet

    def backward(self, d_out: np.ndarray, d_logdet: np.ndarray | None = None) -> np.ndarray:
        """Back-propagate through the last ``forward`` or ``inverse`` call.

        Parameters
        ----------
        d_out : numpy.ndarray, shape (N, dim)
            Gradient of the loss w.r.t. that call's output.
        d_logdet : numpy.ndarray, shape (N,), optional
            Gradient of the loss w.r.t. that call's log-det (zero if omitted).

        Returns
        -------
        numpy.ndarray, shape (N, dim)
            Gradient of the loss w.r.t. that call's input. Parameter gradients are accumulated.
        """
        if self._cache is None:
            raise RuntimeError("backward called before forward or inverse")
        n = self._batch_size()
        if not isinstance(d_out, np.ndarray) or d_out.shape != (n, self.dim):
            shape = getattr(d_out, "shape", type(d_out).__name__)
            raise ValueError(f"d_out must have shape {(n, self.dim)} like the last output, got {shape}")
        if d_logdet is None:
            d_logdet = np.zeros(n, dtype=d_out.dtype)
        elif not isinstance(d_logdet, np.ndarray) or d_logdet.shape != (n,):
            shape = getattr(d_logdet, "shape", type(d_logdet).__name__)
            raise ValueError(f"d_logdet must have shape {(n,)}, got {shape}")
        return self._backward(d_out, d_logdet)

    def _batch_size(self) -> int:
        return self._n

    # -- implemented by subclasses ---------------------------------------------------------
    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _inverse(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _backward(self, d_out: np.ndarray, d_logdet: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _remember(self, direction: str, n: int, data: object = None) -> None:
        """Store what ``_backward`` needs: the direction of the call, its batch size, data."""
        self._cache = (direction, data)
        self._n = n

    def _reconstruct(self, z: np.ndarray) -> np.ndarray:
        """The input ``x = f⁻¹(z)`` of a forward call whose output was ``z``, leaving the cache that
        ``_forward(x)`` leaves, so that ``_backward`` can follow (``memory="invert"``, ``docs/memory.md``).

        This default inverts and then runs the forward again; a layer whose inverse computes what its
        forward cache holds overrides it to skip the second pass.
        """
        x, _ = self._inverse(z)
        self._forward(x)
        return x


class Sequential(Flow):
    """Composition ``f = f_K ∘ … ∘ f_1``: forward applies ``f_1`` first, inverse ``f_K⁻¹`` first.

    ``log|det ∂z/∂x| = Σ_k log|det ∂f_k/∂f_{k−1}|`` (chain rule and ``det(AB) = det A det B``).
    Because the total log-det is a plain sum, every layer receives the same ``d_logdet``; ``d_out``
    is passed back through the layers in the reverse order of the call (``docs/flows.md#sequential``).
    """

    def __init__(self, flows: Sequence[Flow]) -> None:
        flows = list(flows)
        if not flows:
            raise ValueError("Sequential needs at least one flow")
        dims = {flow.dim for flow in flows}
        if len(dims) != 1:
            raise ValueError(f"all flows of a Sequential must share one dimension, got {sorted(dims)}")
        seen: set[int] = set()
        for flow in flows:
            for module in flow.modules():
                if id(module) in seen:
                    # One instance holds one cache and one set of parameters: used twice, its
                    # backward would see only the last call and an optimizer would step it twice.
                    raise ValueError(
                        f"the same {type(module).__name__} instance appears twice in this Sequential; "
                        "build a separate layer for each position"
                    )
                seen.add(id(module))
        super().__init__(flows[0].dim)
        self.flows = flows
        self.children = {str(i): flow for i, flow in enumerate(flows)}

    def __len__(self) -> int:
        return len(self.flows)

    def __getitem__(self, index: int) -> Flow:
        return self.flows[index]

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logdet = np.zeros(x.shape[0], dtype=x.dtype)
        for flow in self.flows:
            x, layer_logdet = flow._forward(x)
            logdet += layer_logdet
        self._remember("forward", x.shape[0])
        return x, logdet

    def _inverse(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logdet = np.zeros(z.shape[0], dtype=z.dtype)
        for flow in reversed(self.flows):
            z, layer_logdet = flow._inverse(z)
            logdet += layer_logdet
        self._remember("inverse", z.shape[0])
        return z, logdet

    def _backward(self, d_out: np.ndarray, d_logdet: np.ndarray) -> np.ndarray:
        direction, _ = self._cache
        order = reversed(self.flows) if direction == "forward" else self.flows
        for flow in order:
            d_out = flow._backward(d_out, d_logdet)
        return d_out


class Inverse(Flow):
    """The flow ``f⁻¹``: its forward is ``f.inverse`` and its inverse ``f.forward``.

    Useful to turn a noise → data layer into a data → noise one, or to train in the sampling
    direction. The wrapped flow's parameters appear under the prefix ``flow.``.
    """

    def __init__(self, flow: Flow) -> None:
        super().__init__(flow.dim)
        self.flow = flow
        self.children = {"flow": flow}

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._remember("forward", x.shape[0])
        return self.flow._inverse(x)

    def _inverse(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._remember("inverse", z.shape[0])
        return self.flow._forward(z)

    def _backward(self, d_out: np.ndarray, d_logdet: np.ndarray) -> np.ndarray:
        return self.flow._backward(d_out, d_logdet)
