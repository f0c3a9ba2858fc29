"""A flow model: base distribution + flow, fitted by maximum likelihood.

``log p(x) = log p_Z(f(x)) + log|det ∂f/∂x|`` (change of variables); likelihood and latent
representation by ``z = f(x)``, sampling by ``x = f⁻¹(z)``, ``z ~ p_Z``.

Every public method checks its input and its result: a point so far out that its log-density or
its image overflows raises :class:`~nflow_np.validation.NonFiniteError` naming the row, rather than
returning a silent ``-inf`` or NaN (README, "Reliability").

Compute (``docs/numerics.md``): every method runs under :func:`nflow_np.threads.compute`, which
chooses the BLAS and Numba thread counts for the operation and flushes subnormals to zero on those
threads, both put back when the method returns. ``log_prob``, ``encode``, ``decode`` and ``sample``
run in inference mode (:func:`nflow_np.no_grad`): no layer keeps a backward cache, and
``cached_nbytes()`` is 0 when they return. They also pass a large batch through the flow in blocks of
:attr:`FlowModel.inference_rows` rows, so that a block's activations stay in the core's cache
(``docs/numerics.md#inference-in-blocks``): every row's result is the one a whole-batch pass gives,
because in evaluation mode no layer mixes rows; a model with a batch norm in training mode is passed
whole.

Device (``docs/kernels.md#gpu-backends``): after ``model.to_device()`` the parameters are device
(CuPy) arrays. Every method still takes host NumPy data: it is moved to the device once, at the
entry, and results go back where their input was (a host ``x`` gives a host ``log_prob``; a
device ``x`` stays on the device); losses are Python floats.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np

from nflow_np import backend, grad_mode, threads
from nflow_np.distributions import StandardLogistic, StandardNormal
from nflow_np.flows.base import Flow, Sequential
from nflow_np.flows.elementwise import Standardize
from nflow_np.module import Module
from nflow_np.validation import check_batch, check_result

INFERENCE_ROWS = 2048
"""Rows per block of an inference pass on the host (:attr:`FlowModel.inference_rows`'s default).

Chosen by measurement (``docs/numerics.md#inference-in-blocks``): on the benchmark RealNVP at batch
8,192 (Intel Xeon Sapphire Rapids, 1 thread), blocks of 2,048 rows took ``log_prob`` from 298 to
232 ms in float64 and from 129 to 104 ms in float32; 512 and 1,024 rows were within 5 % of that."""


class FlowModel(Module):
    """Density model ``p(x)`` defined by a flow ``f`` (data → noise) and a base ``p_Z``.

    Parameters
    ----------
    flow : Flow
        The bijection ``z = f(x)``.
    base : StandardNormal or StandardLogistic
        The base distribution ``p_Z``.
    memory : {"store", "invert"}, optional
        Memory mode of the training step (:meth:`set_memory`); default: the flow's own.

    Attributes
    ----------
    inference_rows : int or None
        Rows per block of ``log_prob``, ``encode``, ``decode`` and ``sample`` on the host (default
        :data:`INFERENCE_ROWS`); ``None`` passes every batch whole. The results do not depend on it.
    """

    inference_rows: int | None = INFERENCE_ROWS

    def __init__(
        self, flow: Flow, base: StandardNormal | StandardLogistic | None = None, memory: str | None = None
    ) -> None:
        super().__init__()
        self.flow = flow
        self.base = StandardNormal() if base is None else base
        self.dim = flow.dim
        self.children = {"flow": flow}
        if memory is not None:
            self.set_memory(memory)

    def set_memory(self, memory: str, anchor_every: int | None = None, tolerance: float | None = None) -> None:
        """Choose what the training step keeps for its backward pass (``docs/memory.md``).

        ``"store"``: every layer's cache (memory linear in depth); ``"invert"``: only the flow's
        output, each layer's input recomputed by inversion in the backward pass, with the inputs of
        every ``anchor_every``-th layer stored (or ``anchor_every`` chosen from ``tolerance``).
        See :class:`~nflow_np.flows.base.Sequential`, which the flow must be for ``"invert"``.
        """
        if not isinstance(self.flow, Sequential):
            if memory == "store" and anchor_every is None and tolerance is None:
                return  # any other flow stores already
            raise ValueError(f'memory="{memory}" needs a Sequential flow, got {type(self.flow).__name__}')
        self.flow.set_memory(memory, anchor_every, tolerance)

    def _to_model(self, x: object) -> object:
        """``x`` on the parameters' device: a host array is copied there (once), anything else left as it is."""
        xp = self.array_module
        if xp is not None and xp is not np and isinstance(x, np.ndarray):
            return xp.asarray(x)
        return x

    def _check(self, x: np.ndarray, name: str) -> np.ndarray:
        """``x`` moved to the parameters' device and checked."""
        return check_batch(self._to_model(x), name, self.dim, self.dtype, self.array_module)

    @contextlib.contextmanager
    def _inference(self, operation: str) -> Iterator[None]:
        """The block as inference ``operation``: its thread plan and flush mode, no caches kept or left."""
        with threads.compute(operation), grad_mode.no_grad():
            try:
                yield
            finally:
                self.flow.free_caches()

    def _rows_independent(self) -> bool:
        """Whether each output row depends on its input row alone.

        Two kinds of layer mix the rows of a batch: a batch norm in training mode (``training``: it
        normalises by the batch's statistics) and an ActNorm not yet initialised (``initialized``
        False: its first call sets its parameters from the batch).
        """
        return not any(getattr(module, "training", False) or getattr(module, "initialized", True) is False
                       for module in self.modules())

    def _in_blocks(self, pass_: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], x: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
        """``pass_(x)`` (a flow's ``_forward`` or ``_inverse``) computed on blocks of :attr:`inference_rows` rows.

        The blocks' outputs are written into one ``(N, D)`` and one ``(N,)`` array, so the result is
        the whole-batch pass's, row for row. A device array, a batch of at most one block, or a model
        whose rows are not independent (:meth:`_rows_independent`) is passed whole.
        """
        rows = self.inference_rows
        if rows is None or x.shape[0] <= rows or not isinstance(x, np.ndarray) or not self._rows_independent():
            return pass_(x)
        out = np.empty_like(x)
        logdet = np.empty_like(x, shape=x.shape[0])
        for start in range(0, x.shape[0], rows):
            out[start : start + rows], logdet[start : start + rows] = pass_(x[start : start + rows])
        return out, logdet

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        """``log p(x)`` per row (nats), ``x: (N, D)`` → ``(N,)``, on the device of ``x``."""
        with self._inference("log_prob"):
            z, logdet = self._in_blocks(self.flow._forward, self._check(x, "x"))
            return _like(check_result(self.base.log_prob(z) + logdet, "log_prob", x), x)

    def nll(self, x: np.ndarray) -> float:
        """Mean negative log-likelihood of the rows of ``x`` (nats)."""
        return float(-self.log_prob(x).mean())

    def nll_and_backward(self, x: np.ndarray) -> float:
        """Mean NLL of ``x`` and its gradient, added to every parameter's ``grads``.

        ``L = −(1/N) Σ_n [log p_Z(z_n) + logdet_n]``, so the flow is back-propagated with
        ``∂L/∂z_n = −(1/N) ∇ log p_Z(z_n)`` and ``∂L/∂logdet_n = −1/N`` (``docs/model.md``).

        Returns
        -------
        float
            The loss ``L`` before the update.
        """
        with threads.compute("train"), grad_mode.set_grad_enabled(True):
            x = self._check(x, "x")
            z, logdet = self.flow._forward(x)
            n = x.shape[0]
            loss = -(self.base.log_prob(z) + logdet).mean()
            d_z = self.base.grad_log_prob(z)
            d_z *= -1.0 / n
            self.flow._backward(d_z, np.full_like(x, -1.0 / n, shape=n))
            return float(loss)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Latent representation ``z = f(x)``, ``(N, D)``, on the device of ``x``."""
        with self._inference("log_prob"):
            return _like(check_result(self._in_blocks(self.flow._forward, self._check(x, "x"))[0], "encode", x), x)

    def decode(self, z: np.ndarray) -> np.ndarray:
        """Data point ``x = f⁻¹(z)``, ``(N, D)``, on the device of ``z``."""
        with self._inference("sample"):
            return _like(check_result(self._in_blocks(self.flow._inverse, self._check(z, "z"))[0], "decode", z), z)

    def sample(self, n: int, rng: np.random.Generator | None = None, temperature: float = 1.0) -> np.ndarray:
        """Draw ``n`` samples ``x = f⁻¹(T · z)``, ``z ~ p_Z``.

        Parameters
        ----------
        n : int
            Number of samples.
        rng : numpy.random.Generator or a device module's Generator, optional
            Randomness. A NumPy generator draws ``z`` on the host (the same samples on every
            device for a given seed); ``cupy.random.default_rng(seed)`` draws on the GPU. Default:
            a fresh unseeded generator of the parameters' array module.
        temperature : float
            ``T > 0`` scales the base draws; ``T < 1`` trades diversity for typicality.

        Returns
        -------
        array, shape (n, D)
            On the device the draws were made on: host NumPy for a NumPy generator.

        Raises
        ------
        NonFiniteError
            A sample overflowed (a temperature or a model that stretches too far for the dtype).
        """
        if isinstance(n, bool) or not isinstance(n, int | np.integer):
            raise TypeError(f"n must be an integer number of samples, got {n!r}")
        if n < 1:
            raise ValueError(f"n must be a positive number of samples, got {n}")
        if not np.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a positive finite number, got {temperature}")
        xp = self.array_module or backend.array_module()
        rng = xp.random.default_rng() if rng is None else rng
        with self._inference("sample"):
            drawn = self.base.sample(int(n), self.dim, rng, self.dtype)
            z = self._to_model(drawn)
            if temperature != 1.0:
                z *= z.dtype.type(temperature)
            return _like(check_result(self._in_blocks(self.flow._inverse, z)[0], "sample", z), drawn)

    # -- the conventions users bring from scikit-learn, nflows and zuko ---------------------------------

    def __repr__(self) -> str:
        """``FlowModel(dim=2, base=StandardNormal, dtype=float64; 1,234 parameters)`` and the flow's layers below."""
        head = (f"{type(self).__name__}(dim={self.dim}, base={type(self.base).__name__}, dtype={self.dtype}; "
                f"{self.num_parameters():,} parameters)")
        return "\n".join([head, *self.flow._repr_lines("  ", "(flow): ")])

    def score_samples(self, x: np.ndarray) -> np.ndarray:
        """scikit-learn's name for :meth:`log_prob`: ``log p(x)`` per row (nats), ``(N, D)`` → ``(N,)``."""
        return self.log_prob(x)

    def score(self, x: np.ndarray) -> float:
        """scikit-learn's ``score``: the mean log-likelihood per row (nats), ``−nll(x)``."""
        return -self.nll(x)

    def sample_and_log_prob(
        self, n: int, rng: np.random.Generator | int | None = None, temperature: float = 1.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """``n`` samples and their ``log p(x)`` in one pass (nflows' and zuko's ``sample_and_log_prob``).

        ``x = f⁻¹(T·ε)`` as in :meth:`sample` (the same draws for the same ``rng``), and
        ``log p(x) = log p_Z(z) − log|det ∂f⁻¹/∂z|`` at ``z = f(x) = T·ε``: the change of variables read
        along the inverse, without running ``f`` again. It is the model's density at ``x`` (for ``T ≠ 1``
        the draws come from a tempered law, but the value reported is still ``p(x)``).

        Returns
        -------
        x : array, shape (n, D)
        log_prob : array, shape (n,)
        """
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"n must be a positive integer number of samples, got {n!r}")
        if not np.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a positive finite number, got {temperature}")
        xp = self.array_module or backend.array_module()
        rng = xp.random.default_rng() if rng is None else rng
        with self._inference("sample"):
            drawn = self.base.sample(int(n), self.dim, rng, self.dtype)
            z = self._to_model(drawn)
            if temperature != 1.0:
                z *= z.dtype.type(temperature)
            x, logdet_inverse = self._in_blocks(self.flow._inverse, z)
            log_prob = self.base.log_prob(z) - logdet_inverse
            return (_like(check_result(x, "sample", z), drawn),
                    _like(check_result(log_prob, "sample_and_log_prob", z), drawn))


def with_standardization(model: FlowModel, mean: object, std: object) -> FlowModel:
    """``model``, a model of standardised rows ``u = (x − μ)/σ``, as a model of the rows ``x`` themselves.

    The flow of the result is ``Standardize(μ, σ)`` followed by ``model``'s layers (the same objects, not
    copies; the layers of a Sequential flow are spliced in, so their names move up one: ``flow.0`` is the
    standardisation, ``flow.1`` the first layer). Its ``log_prob`` is
    ``log p_X(x) = log p_U((x − μ)/σ) − Σ_j log σ_j`` and its samples are ``x = μ + σ ⊙ u``
    (``docs/data.md#the-density-in-the-users-units``).

    Parameters
    ----------
    model : FlowModel
        The model of ``u``.
    mean, std : array-like, shape (D,)
        ``μ`` (finite) and ``σ`` (finite, positive), cast to the model's dtype.

    Returns
    -------
    FlowModel
        Same base, dtype and device as ``model``; memory mode ``"store"``.
    """
    layer = Standardize(mean, std, dtype=model.dtype or np.float64)
    if layer.dim != model.dim:
        raise ValueError(f"mean and std have {layer.dim} entries but the model has dimension {model.dim}")
    if model.array_module is not None and model.array_module is not np:
        layer.to_device(model.array_module)
    layers = model.flow.flows if isinstance(model.flow, Sequential) else [model.flow]
    return FlowModel(Sequential([layer, *layers]), model.base)


def _like(result: np.ndarray, given: object) -> np.ndarray:
    """``result`` on the host if ``given`` (the caller's input) was a host array, else as it is."""
    return backend.to_host(result) if isinstance(given, np.ndarray) else result
