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

Arrays: the same code runs on NumPy arrays and on device (CuPy) arrays. Inputs must be arrays of
the parameters' module (:attr:`~nflow_np.module.Module.array_module`; a flow without parameters
takes either); arrays are made from the input (``np.zeros_like(x, shape=n)``), never from
scratch, so they land on its device (``docs/kernels.md#gpu-backends``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nflow_np import grad_mode
from nflow_np.allocator import keep_freed_memory
from nflow_np.module import Module
from nflow_np.validation import check_batch, check_result, is_array_of


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


MEMORY_MODES = ("store", "invert")
REMEASURE_EVERY = 100
"""With a ``tolerance``, ``anchor_every`` is chosen again every this many forward calls."""


class Sequential(Flow):
    """Composition ``f = f_K ∘ … ∘ f_1``: forward applies ``f_1`` first, inverse ``f_K⁻¹`` first.

    ``log|det ∂z/∂x| = Σ_k log|det ∂f_k/∂f_{k−1}|`` (chain rule and ``det(AB) = det A det B``).
    Because the total log-det is a plain sum, every layer receives the same ``d_logdet``; ``d_out``
    is passed back through the layers in the reverse order of the call (``docs/flows.md#sequential``).

    Memory of the forward call (``docs/memory.md``):

    - ``memory="store"``: every layer keeps its cache; activation memory grows linearly with ``K``.
    - ``memory="invert"``: each layer's cache is freed as soon as the next layer has run; the
      backward pass walks the layers in reverse, recomputes the input of layer ``k`` from its output,
      ``x_{k−1} = f_k⁻¹(x_k)``, with its cache (:meth:`Flow._reconstruct`), back-propagates through
      it and frees it again. The inputs of layers ``0, k, 2k, …`` (``anchor_every = k``) are stored,
      so no input is reconstructed through more than ``k − 1`` inversions; a layer with
      ``invertible_in_backward = False`` keeps its cache and its input is stored. The inverse
      direction always stores.

    Parameters
    ----------
    flows : sequence of Flow
    memory : {"store", "invert"}
    anchor_every : int, optional
        ``memory="invert"`` only: store the input of every ``anchor_every``-th layer. Default: only
        the first layer's (the caller holds it anyway), unless ``tolerance`` is given.
    tolerance : float, optional
        ``memory="invert"`` only: choose ``anchor_every`` at the first forward call and every
        :data:`REMEASURE_EVERY` calls after it, by measuring :meth:`reconstruction_errors` on that
        call's batch (one extra forward and inverse pass), as the longest run of inversions whose
        relative error stays within ``tolerance`` (:func:`anchor_every_for`). The measuring pass
        calls fallback layers' forward once more (a training-mode BatchNorm's running averages see
        that batch twice; a Dequantize draws noise twice).
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

    def set_memory(self, memory: str, anchor_every: int | None = None, tolerance: float | None = None) -> None:
        """Switch the memory mode (see the class doc); takes effect at the next forward call."""
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
        if anchor_every is not None and (isinstance(anchor_every, bool) or int(anchor_every) < 1):
            raise ValueError(f"anchor_every must be a positive integer, got {anchor_every!r}")
        if tolerance is not None and not (np.isfinite(tolerance) and tolerance > 0):
            raise ValueError(f"tolerance must be a positive number, got {tolerance!r}")
        if anchor_every is not None and tolerance is not None:
            raise ValueError("give anchor_every or tolerance, not both")
        if memory == "store" and (anchor_every is not None or tolerance is not None):
            raise ValueError('anchor_every and tolerance apply to memory="invert" only')
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
            return self._forward_invert(x)
        logdet = np.zeros_like(x, shape=x.shape[0])
        for flow in self.flows:
            x, layer_logdet = flow._forward(x)
            logdet += layer_logdet
            if not keep:
                flow.free_caches()  # no_grad: nothing kept, the next layer reuses the freed memory
        self._remember("forward", x.shape[0])
        return x, logdet

    def _forward_invert(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.tolerance is not None and self._forwards % REMEASURE_EVERY == 0:
            # training changes how well the layers invert (they start as the identity): measure again
            self.anchor_every = anchor_every_for(self.reconstruction_errors(x), self.tolerance)
        self._forwards += 1
        every = self.anchor_every or len(self.flows)
        logdet = np.zeros_like(x, shape=x.shape[0])
        stored: dict[int, np.ndarray] = {}
        for k, flow in enumerate(self.flows):
            exact = flow.invertible_in_backward
            if k % every == 0 or not exact:
                stored[k] = x
            x, layer_logdet = flow._forward(x)
            logdet += layer_logdet
            if exact:
                flow.free_caches()
        self._remember("forward", x.shape[0], (stored, x))
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
        if data is not None:
            return self._backward_invert(d_out, d_logdet)
        order = reversed(self.flows) if direction == "forward" else self.flows
        for flow in order:
            d_out = flow._backward(d_out, d_logdet)
        return d_out

    def _backward_invert(self, d_out: np.ndarray, d_logdet: np.ndarray) -> np.ndarray:
        _, (stored, x) = self._cache
        self._cache = None  # one backward per forward: the stored inputs go as they are used
        for k in reversed(range(len(self.flows))):
            flow = self.flows[k]
            if not flow.invertible_in_backward:
                x = stored.pop(k)  # its cache was kept
            elif k in stored:
                x = stored.pop(k)
                flow._forward(x)
            else:
                x = flow._reconstruct(x)
            d_out = flow._backward(d_out, d_logdet)
            flow.free_caches()
        return d_out

    def reconstruction_errors(self, x: np.ndarray) -> np.ndarray:
        """How far inputs recomputed by inversion drift from the true ones, on the batch ``x``.

        Runs the layers forward keeping every input ``x_k``, then reconstructs them from the output
        with no anchor (as ``memory="invert"`` with ``anchor_every = K``, fallback layers still
        stored) and compares.

        Returns
        -------
        numpy.ndarray, shape (K,)
            ``errors[j] = max|x̂ − x| / max|x|`` for the input of layer ``K − 1 − j``, the one
            reached after ``j + 1`` inversions from the output. Every cache is freed afterwards.
        """
        inputs = []
        for flow in self.flows:
            inputs.append(x)
            x, _ = flow._forward(x)
            flow.free_caches()
        errors = np.zeros(len(self.flows))
        for j, k in enumerate(reversed(range(len(self.flows)))):
            flow = self.flows[k]
            x = inputs[k] if not flow.invertible_in_backward else flow._inverse(x)[0]
            flow.free_caches()
            scale = max(float(np.max(np.abs(inputs[k]))), float(np.finfo(x.dtype).tiny))
            errors[j] = float(np.max(np.abs(x - inputs[k]))) / scale
        return errors


def anchor_every_for(errors: np.ndarray, tolerance: float) -> int:
    """The ``anchor_every`` that keeps reconstruction within ``tolerance``, from measured ``errors``.

    ``errors[j]`` is the relative error after ``j + 1`` inversions (:meth:`Sequential.reconstruction_errors`);
    with ``anchor_every = m`` no input is more than ``m − 1`` inversions from a stored one, so
    ``m = 1 +`` the number of leading entries within ``tolerance`` (all of them: ``m = K``).
    """
    within = 0
    for error in errors:
        if not error <= tolerance:
            break
        within += 1
    return min(within + 1, len(errors))


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

    @property
    def invertible_in_backward(self) -> bool:
        return self.flow.invertible_in_backward
