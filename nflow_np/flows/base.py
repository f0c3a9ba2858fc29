"""The flow protocol: :class:`Flow`, and :class:`Sequential` and :class:`Inverse` built on it alone.

Convention (stated once, used everywhere): **forward is data → noise**, ``z = f(x)``, as in the
lecture's ``log p(x) = log p(f(x)) + log|det ∂f/∂x|``. Every flow returns its log-determinant
with its output, per sample:

- ``forward(x) -> (z, logdet)`` with ``logdet[n] = log|det ∂z/∂x|`` at row ``n``;
- ``inverse(z) -> (x, logdet)`` with ``logdet[n] = log|det ∂x/∂z| = −log|det ∂z/∂x|``;
- ``backward(d_out, d_logdet) -> d_in``: back-propagates through the *last* call, whichever
  direction it was. ``d_out = ∂L/∂(output)``, ``d_logdet = ∂L/∂(logdet)`` of shape ``(N,)``; it
  returns ``∂L/∂(input)`` and adds every parameter's gradient to ``grads``.

The public methods check their input (shape, dtype, finiteness), call the unchecked ``_forward`` /
``_inverse`` / ``_backward`` that subclasses implement (containers call those directly, so a deep
stack validates once, at its entry), and check the result once at the exit: an input so large that
some layer overflows raises :class:`~nflow_np.validation.NonFiniteError` naming the row.

Arrays: the same code runs on NumPy and on device (CuPy) arrays; make arrays from the input
(``np.zeros_like(x, shape=n)``), never from scratch, so they land on its device
(``docs/kernels.md#gpu-backends``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nflow_np import grad_mode
from nflow_np.allocator import keep_freed_memory
from nflow_np.flows import memory
from nflow_np.flows.memory import MEMORY_MODES, REMEASURE_EVERY, anchor_every_for, check_memory_options
from nflow_np.module import Module
from nflow_np.specs import SpecReader, register_flow, to_spec
from nflow_np.validation import check_batch, check_result, is_array_of

__all__ = ["MEMORY_MODES", "REMEASURE_EVERY", "Flow", "Inverse", "Sequential", "anchor_every_for"]


class Flow(Module):
    """A bijection of ``R^dim`` with a tractable log-determinant.

    A subclass owes (and nothing else; the public methods and containers do the rest):

    1. ``__init__``: ``super().__init__(dim)``; trainable arrays through ``self.add_param(name, array)``
       (their gradients appear in ``self.grads`` under the same name); sub-flows in ``self.children``.
    2. ``_forward(x) -> (z, logdet)`` and ``_inverse(z) -> (x, logdet)`` on ``(N, dim)`` arrays that
       are already checked, ``logdet: (N,)``; each ends with ``self._remember(direction, N, data)``,
       ``data`` being what the backward pass of that call needs. Never modify the input.
    3. ``_backward(d_out, d_logdet) -> d_in`` for the last call (``direction, data = self._cache``):
       return ``∂L/∂input``, *add* ``∂L/∂θ`` to ``self.grads[name]``, leave ``d_out``/``d_logdet`` alone.
    4. Optionally: ``invertible_in_backward = False`` when ``_inverse`` is not exact in floating point
       (see below); ``_reconstruct`` for a cheaper recomputation; ``cache_attributes`` naming every
       attribute beyond ``_cache`` that holds arrays for the backward pass.

    Prove it with :mod:`nflow_np.gradcheck` (gradients and log-det against finite differences); the
    test suite does so for every layer of its registry (README, "How to add a layer").
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
        check_batch(x, "x", self.dim, self.dtype, self.array_module)
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
        check_batch(z, "z", self.dim, self.dtype, self.array_module)
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
        xp = self.array_module
        if not is_array_of(d_out, xp) or d_out.shape != (n, self.dim):
            shape = getattr(d_out, "shape", type(d_out).__name__)
            raise ValueError(f"d_out must have shape {(n, self.dim)} like the last output, got {shape}")
        if d_logdet is None:
            d_logdet = np.zeros_like(d_out, shape=n)
        elif not is_array_of(d_logdet, xp) or d_logdet.shape != (n,):
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
        """Store what ``_backward`` needs: the direction of the call, its batch size, data (nothing under no_grad)."""
        self._cache = (direction, data) if grad_mode.is_grad_enabled() else None
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


@register_flow("sequential", "flows")
class Sequential(Flow):
    """Composition ``f = f_K ∘ … ∘ f_1``: forward applies ``f_1`` first, inverse ``f_K⁻¹`` first.

    ``log|det ∂z/∂x| = Σ_k log|det ∂f_k/∂f_{k−1}|`` (chain rule and ``det(AB) = det A det B``).
    Because the total log-det is a plain sum, every layer receives the same ``d_logdet``; ``d_out``
    is passed back through the layers in the reverse order of the call (``docs/flows.md#sequential``).

    Parameters
    ----------
    flows : sequence of Flow
    memory : {"store", "invert"}
        ``"store"``: every layer keeps its cache (activation memory grows linearly with ``K``).
        ``"invert"``: caches are freed during the forward pass and the backward pass recomputes
        each input from its output (:mod:`nflow_np.flows.memory`, ``docs/memory.md``). The inverse
        direction always stores.
    anchor_every : int, optional
        ``memory="invert"`` only: store the input of every ``anchor_every``-th layer. Default: only
        the first layer's (the caller holds it anyway), unless ``tolerance`` is given.
    tolerance : float, optional
        ``memory="invert"`` only: choose ``anchor_every`` at the first forward call and every
        :data:`REMEASURE_EVERY` calls after it, by measuring :meth:`reconstruction_errors` on that
        call's batch (one extra forward and inverse pass), as the longest run of inversions whose
        relative error stays within ``tolerance`` (:func:`~nflow_np.flows.memory.anchor_every_for`).
        The measuring pass calls fallback layers' forward once more (a training-mode BatchNorm's
        running averages see that batch twice; a Dequantize draws noise twice).
    """

    def __init__(
        self,
        flows: Sequence[Flow],
        memory: str = "store",
        anchor_every: int | None = None,
        tolerance: float | None = None,
    ) -> None:
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
        self.set_memory(memory, anchor_every, tolerance)

    def spec(self, where: str = "flow") -> dict:
        """``{"kind": "sequential", "flows": [...]}`` (the memory mode is a run setting, not saved)."""
        return {"kind": "sequential", "flows": [to_spec(f, f"{where}.flows[{i}]") for i, f in enumerate(self.flows)]}

    @classmethod
    def from_spec(cls, read: SpecReader) -> Sequential:
        return cls(read.flows("flows"))

    def set_memory(self, memory: str, anchor_every: int | None = None, tolerance: float | None = None) -> None:
        """Switch the memory mode (see the class doc); takes effect at the next forward call."""
        check_memory_options(memory, anchor_every, tolerance)
        if memory == "invert":
            keep_freed_memory()  # freeing layer by layer would otherwise page-fault every step (allocator.py)
        self.memory = memory
        self.anchor_every = None if anchor_every is None else int(anchor_every)
        self.tolerance = tolerance
        self._forwards = 0
        self._cache = None

    @property
    def invertible_in_backward(self) -> bool:
        return all(flow.invertible_in_backward for flow in self.flows)

    def __len__(self) -> int:
        return len(self.flows)

    def __getitem__(self, index: int) -> Flow:
        return self.flows[index]

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = grad_mode.is_grad_enabled()
        if self.memory == "invert" and keep:
            return memory.forward_invert(self, x, REMEASURE_EVERY)
        logdet = np.zeros_like(x, shape=x.shape[0])
        for flow in self.flows:
            x, layer_logdet = flow._forward(x)
            logdet += layer_logdet
            if not keep:
                flow.free_caches()  # no_grad: nothing kept, the next layer reuses the freed memory
        self._remember("forward", x.shape[0])
        return x, logdet

    def _inverse(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = grad_mode.is_grad_enabled()
        logdet = np.zeros_like(z, shape=z.shape[0])
        for flow in reversed(self.flows):
            z, layer_logdet = flow._inverse(z)
            logdet += layer_logdet
            if not keep:
                flow.free_caches()
        self._remember("inverse", z.shape[0])
        return z, logdet

    def _backward(self, d_out: np.ndarray, d_logdet: np.ndarray) -> np.ndarray:
        direction, data = self._cache
        if data is not None:  # a memory="invert" forward call
            return memory.backward_invert(self, d_out, d_logdet)
        order = reversed(self.flows) if direction == "forward" else self.flows
        for flow in order:
            d_out = flow._backward(d_out, d_logdet)
        return d_out

    def reconstruction_errors(self, x: np.ndarray) -> np.ndarray:
        """Relative error of each input recomputed by inversion on the batch ``x``, shape ``(K,)``
        (:func:`nflow_np.flows.memory.reconstruction_errors`)."""
        return memory.reconstruction_errors(self.flows, x)


@register_flow("inverse", "flow")
class Inverse(Flow):
    """The flow ``f⁻¹``: its forward is ``f.inverse`` and its inverse ``f.forward``.

    Useful to turn a noise → data layer into a data → noise one, or to train in the sampling
    direction. The wrapped flow's parameters appear under the prefix ``flow.``.
    """

    def __init__(self, flow: Flow) -> None:
        super().__init__(flow.dim)
        self.flow = flow
        self.children = {"flow": flow}

    def spec(self, where: str = "flow") -> dict:
        """``{"kind": "inverse", "flow"}``."""
        return {"kind": "inverse", "flow": to_spec(self.flow, f"{where}.flow")}

    @classmethod
    def from_spec(cls, read: SpecReader) -> Inverse:
        return cls(read.flow("flow"))

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._remember("forward", x.shape[0])
        return self.flow._inverse(x)

    def _inverse(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._remember("inverse", z.shape[0])
        return self.flow._forward(z)

    def _backward(self, d_out: np.ndarray, d_logdet: np.ndarray) -> np.ndarray:
        return self.flow._backward(d_out, d_logdet)

    @property
    def invertible_in_backward(self) -> bool:
        return self.flow.invertible_in_backward
