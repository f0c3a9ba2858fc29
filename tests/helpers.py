"""The test suite's shared machinery: one gradient check, one log-det check, one registry of flows.

Every flow layer is proven by the same two helpers:

- :func:`check_flow_gradients` compares the hand-written backward pass (w.r.t. the input *and* every
  parameter) to central finite differences of a random linear loss, in float64;
- :func:`check_logdet` compares the returned log-determinant to ``np.linalg.slogdet`` of the
  finite-difference Jacobian of the map.

:data:`FLOW_CASES` lists one factory per kind of layer (and per composition of layers); the tests in
``tests/flows/test_flows.py`` are parametrised over it, so a new layer is proven by adding it here.

Error metric (used for every gradient comparison, see :func:`relative_error`)::

    err(a, n) = max_i |a_i − n_i| / max(max_i |n_i|, floor),    floor = FD_FLOOR · S

computed per array (the input gradient, and each parameter separately), so a wrong gradient in a
small array is not hidden behind a large one. ``S = 1 + Σ|A ⊙ out| + Σ|b ⊙ logdet|`` is the size of
the terms of the loss: the round-off of central differences with ``eps = 1e-6`` is about
``1e-16 · S / eps ≈ 1e-10 · S`` per entry (measured: at most 5e-10 · S over all registered flows),
so an array whose true gradient is below ``FD_FLOOR · S`` (1 % of the loss's size) is checked
against the absolute tolerance ``GRAD_RTOL · FD_FLOOR · S = 1e-8 · S`` instead of relatively.
Everything else must agree to :data:`GRAD_RTOL` relative.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from nflow_np import (
    AdditiveCoupling,
    AffineCoupling,
    Flow,
    Inverse,
    Permutation,
    Planar,
    Radial,
    Rescale,
    Reverse,
    Sequential,
)
from nflow_np.flows.coupling import parity_mask
from nflow_np.flows.normalization import ActNorm, BatchNorm
from nflow_np.flows.preprocessing import Scale
from nflow_np.module import Module
from nflow_np.nn import MLP, Layer

GRAD_RTOL = 1e-6
"""Largest accepted :func:`relative_error` between an analytic and a numerical gradient."""

LOGDET_ATOL = 1e-6
"""Largest accepted ``|logdet − log|det J_fd||`` (log-dets are O(1), so absolute is relative)."""

FD_FLOOR = 1e-2
"""Floor of the denominator of :func:`relative_error`, as a fraction of the loss's size ``S``."""

FD_EPS = 1e-6
"""Step of the central differences."""


# -- finite differences ------------------------------------------------------------------------


def numerical_gradient(f: Callable[[], float], array: np.ndarray, eps: float = FD_EPS) -> np.ndarray:
    """Central-difference gradient (five-point stencil) of a scalar function w.r.t. every entry of ``array``.

    Each entry is perturbed *in place* (``f`` must read ``array`` itself, e.g. a parameter or the
    input it closes over) and restored exactly afterwards.

    Parameters
    ----------
    f : callable () -> float
        The scalar function; called ``4 * array.size`` times.
    array : numpy.ndarray, float64
        The array to differentiate w.r.t.; modified during the call, unchanged after it.
    eps : float
        Step: ``∂f/∂a_i ≈ (−f(a_i + 2eps) + 8f(a_i + eps) − 8f(a_i − eps) + f(a_i − 2eps)) / (12 eps)``.

    Returns
    -------
    numpy.ndarray
        Same shape as ``array``, float64.
    """
    if array.dtype != np.float64:
        raise TypeError(f"finite differences need float64, got {array.dtype}")
    grad = np.zeros(array.shape, dtype=np.float64)
    for index in np.ndindex(array.shape):
        old = array[index]
        values = []
        for step in (2 * eps, eps, -eps, -2 * eps):
            array[index] = old + step
            values.append(f())
        array[index] = old
        # fourth-order central difference: truncation O(eps⁴ f⁽⁵⁾) instead of O(eps² f‴), which matters
        # where the loss curves sharply (planar flows near wᵀû = −1); the rounding term is unchanged
        grad[index] = (-values[0] + 8 * values[1] - 8 * values[2] + values[3]) / (12 * eps)
    return grad


def numerical_jacobian(
    fn: Callable[[np.ndarray], np.ndarray], x_row: np.ndarray, eps: float = FD_EPS
) -> np.ndarray:
    """Central-difference Jacobian ``J[i, j] = ∂out_i / ∂x_j`` of a map of one row.

    Parameters
    ----------
    fn : callable
        Maps an array of shape ``(1, D)`` to an array of shape ``(1, D)``.
    x_row : numpy.ndarray, shape (D,), float64
        The point.
    eps : float
        Step of the central differences.

    Returns
    -------
    numpy.ndarray, shape (D, D)
    """
    x_row = np.asarray(x_row, dtype=np.float64)
    dim = x_row.shape[0]
    jacobian = np.zeros((dim, dim))
    for j in range(dim):
        step = np.zeros(dim)
        step[j] = eps
        plus = fn((x_row + step)[None, :])[0]
        minus = fn((x_row - step)[None, :])[0]
        jacobian[:, j] = (plus - minus) / (2 * eps)
    return jacobian


def relative_error(analytic: np.ndarray, numeric: np.ndarray, floor: float = 1e-12) -> float:
    """``max|a − n| / max(max|n|, floor)``: the error metric of every gradient check.

    Parameters
    ----------
    analytic, numeric : numpy.ndarray
        Same shape.
    floor : float
        Smallest denominator: below it the error is absolute (scaled by ``1 / floor``), so that
        finite-difference round-off on a tiny true gradient is not mistaken for a relative error.
        The gradient checks pass ``FD_FLOOR · S`` (see the module docstring).

    Returns
    -------
    float
        ``inf`` if the shapes differ or ``analytic`` is not finite.
    """
    analytic = np.asarray(analytic, dtype=np.float64)
    numeric = np.asarray(numeric, dtype=np.float64)
    if analytic.shape != numeric.shape or not np.isfinite(analytic).all():
        return float("inf")
    if analytic.size == 0:
        return 0.0
    return float(np.max(np.abs(analytic - numeric)) / max(float(np.max(np.abs(numeric))), floor))


def assert_gradients_match(
    analytic: dict[str, np.ndarray], numeric: dict[str, np.ndarray], floor: float, what: str
) -> None:
    """Raise ``AssertionError`` listing every array whose :func:`relative_error` exceeds ``GRAD_RTOL``.

    Parameters
    ----------
    analytic, numeric : dict[str, numpy.ndarray]
        Gradients under the same names (``"input"``, parameter names...).
    floor : float
        Passed to :func:`relative_error`.
    what : str
        Describes the check in the failure message.
    """
    assert analytic.keys() == numeric.keys(), f"{what}: names differ {analytic.keys()} vs {numeric.keys()}"
    errors = {name: relative_error(analytic[name], numeric[name], floor) for name in numeric}
    bad = {name: err for name, err in errors.items() if not err <= GRAD_RTOL}
    assert not bad, f"{what}: gradient mismatch (relative error > {GRAD_RTOL}): {bad}"


# -- gradient checks ---------------------------------------------------------------------------


def _require_float64(module: Module, x: np.ndarray) -> None:
    if x.dtype != np.float64 or module.dtype not in (None, np.float64):
        raise TypeError("gradient checks run in float64: build the module and the input in float64")


def check_flow_gradients(flow: Flow, x: np.ndarray, direction: str, rng: np.random.Generator) -> None:
    """Check a flow's backward pass in one direction against central differences.

    The loss is a random linear function of both outputs, ``L = Σ A ⊙ out + Σ b ⊙ logdet`` with
    ``A, b ~ N(0, 1)``, so its gradient w.r.t. ``(out, logdet)`` is exactly ``(A, b)``. After
    ``zero_grad`` and one call in ``direction``, ``flow.backward(A, b)`` must return ``∂L/∂input`` and
    leave ``∂L/∂θ`` in ``grads`` for every parameter of :meth:`~nflow_np.module.Module.named_parameters`.
    Also checked: the backward pass leaves ``A`` and ``b`` untouched, and the grads have the shapes and
    dtypes of their parameters.

    Parameters
    ----------
    flow : Flow
        Built in float64 (or parameter-free).
    x : numpy.ndarray, shape (N, flow.dim), float64
        The input of the call (data for ``"forward"``, noise for ``"inverse"``).
    direction : {"forward", "inverse"}
    rng : numpy.random.Generator
        Draws ``A`` and ``b``.

    Raises
    ------
    AssertionError
        Any gradient with :func:`relative_error` (floor ``FD_FLOOR · S``) above :data:`GRAD_RTOL`.
    """
    _require_float64(flow, x)
    if direction not in ("forward", "inverse"):
        raise ValueError(f"direction must be 'forward' or 'inverse', got {direction!r}")
    call = flow.forward if direction == "forward" else flow.inverse
    x = x.copy()
    out, logdet = call(x)
    weight_out = rng.standard_normal(out.shape)
    weight_logdet = rng.standard_normal(logdet.shape)

    def loss() -> float:
        out, logdet = call(x)
        return float(np.sum(weight_out * out) + np.sum(weight_logdet * logdet))

    flow.zero_grad()
    call(x)
    d_out, d_logdet = weight_out.copy(), weight_logdet.copy()
    analytic = {"input": flow.backward(d_out, d_logdet)}
    assert np.array_equal(d_out, weight_out) and np.array_equal(d_logdet, weight_logdet), (
        "backward modified the caller's d_out/d_logdet"
    )
    before = {}
    for name, param, grad in flow.named_parameters():
        assert grad.shape == param.shape and grad.dtype == param.dtype, f"grad {name!r} unlike its param"
        analytic[name] = grad.copy()
        before[name] = param.copy()

    numeric = {"input": numerical_gradient(loss, x)}
    for name, param, _ in flow.named_parameters():
        numeric[name] = numerical_gradient(loss, param)
    for name, param, _ in flow.named_parameters():
        assert np.array_equal(param, before[name]), f"parameter {name!r} not restored"
    size = 1.0 + float(np.sum(np.abs(weight_out * out)) + np.sum(np.abs(weight_logdet * logdet)))
    assert_gradients_match(analytic, numeric, FD_FLOOR * size, f"{type(flow).__name__} {direction}")


def check_layer_gradients(layer: Layer, x: np.ndarray, rng: np.random.Generator) -> None:
    """Check an ``nn`` layer's backward pass against central differences.

    Same as :func:`check_flow_gradients` without a log-det: ``L = Σ A ⊙ layer(x)``, ``A ~ N(0, 1)``;
    ``layer.backward(A)`` must return ``∂L/∂x`` and leave ``∂L/∂θ`` in ``grads``.

    Parameters
    ----------
    layer : Layer
        Built in float64 (or parameter-free).
    x : numpy.ndarray, shape (N, D_in), float64
    rng : numpy.random.Generator
        Draws ``A``.

    Raises
    ------
    AssertionError
        Any gradient with :func:`relative_error` (floor ``FD_FLOOR · S``, ``S = 1 + Σ|A ⊙ y|``) above
        :data:`GRAD_RTOL`.
    """
    _require_float64(layer, x)
    x = x.copy()
    weight = rng.standard_normal(layer.forward(x).shape)

    def loss() -> float:
        return float(np.sum(weight * layer.forward(x)))

    layer.zero_grad()
    layer.forward(x)
    d_y = weight.copy()
    analytic = {"input": layer.backward(d_y)}
    assert np.array_equal(d_y, weight), "backward modified the caller's d_y"
    for name, param, grad in layer.named_parameters():
        assert grad.shape == param.shape and grad.dtype == param.dtype, f"grad {name!r} unlike its param"
        analytic[name] = grad.copy()
    numeric = {"input": numerical_gradient(loss, x)}
    for name, param, _ in layer.named_parameters():
        numeric[name] = numerical_gradient(loss, param)
    size = 1.0 + float(np.sum(np.abs(weight * layer.forward(x))))
    assert_gradients_match(analytic, numeric, FD_FLOOR * size, type(layer).__name__)


# -- log-det check -----------------------------------------------------------------------------


def check_logdet(flow: Flow, x: np.ndarray, direction: str, rows: int = 3, atol: float = LOGDET_ATOL) -> None:
    """Check the returned log-det against ``slogdet`` of the finite-difference Jacobian.

    For each of the first ``rows`` rows of ``x``: ``log|det J|`` of the central-difference Jacobian of
    the map (``forward`` or ``inverse``) at that row must equal the log-det the flow returns for that
    row, both when the row is passed alone and inside the whole batch (rows are independent), within
    ``atol`` (default :data:`LOGDET_ATOL`).

    Parameters
    ----------
    flow : Flow
        Built in float64 (or parameter-free).
    x : numpy.ndarray, shape (N, flow.dim), float64
    direction : {"forward", "inverse"}
    rows : int
        How many rows to check (each costs ``2 * dim`` calls).
    atol : float
        Accepted error; a nearly singular map needs more, since the differences' round-off in
        ``log|det J|`` is divided by the smallest singular value.

    Raises
    ------
    AssertionError
        A log-det off by more than ``atol``, or a singular Jacobian.
    """
    _require_float64(flow, x)
    call = flow.forward if direction == "forward" else flow.inverse
    _, batch_logdet = call(x)
    for n in range(min(rows, x.shape[0])):
        jacobian = numerical_jacobian(lambda row: call(row)[0], x[n])
        sign, log_abs_det = np.linalg.slogdet(jacobian)
        assert sign != 0, f"{direction}: singular Jacobian at row {n}"
        _, row_logdet = call(x[n : n + 1])
        assert abs(row_logdet[0] - log_abs_det) <= atol, (
            f"{type(flow).__name__} {direction}: logdet {row_logdet[0]!r} "
            f"but log|det J| = {log_abs_det!r} at row {n}"
        )
        assert abs(batch_logdet[n] - log_abs_det) <= atol, (
            f"{type(flow).__name__} {direction}: batched logdet {batch_logdet[n]!r} differs from "
            f"log|det J| = {log_abs_det!r} at row {n}"
        )


# -- the registry of flows ---------------------------------------------------------------------


def randomise(module: Module, rng: np.random.Generator, std: float = 0.5) -> Module:
    """Overwrite every parameter and buffer of ``module`` in place with ``N(0, std²)`` draws; return ``module``.

    Zero-initialised last layers (and ``scale = 1``) would make many gradients vanish or coincide and
    hide bugs; every registered flow is randomised so that nothing sits at its initial value.
    """
    for _, param in module.named_state():
        param[...] = rng.normal(0.0, std, size=param.shape)
    return module


def random_mask(dim: int, rng: np.random.Generator) -> np.ndarray:
    """A random boolean mask of shape ``(dim,)`` with both parts non-empty (``dim ≥ 2``)."""
    mask = np.zeros(dim, dtype=bool)
    mask[rng.choice(dim, size=int(rng.integers(1, dim)), replace=False)] = True
    return mask


HIDDEN = (6, 5)
"""Hidden widths of the registry's coupling nets: small, so finite differences stay fast."""


def _additive(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    return randomise(AdditiveCoupling(dim, parity=0, hidden=HIDDEN, rng=rng, dtype=dtype), rng)


def _affine_parity0(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    return randomise(AffineCoupling(dim, parity=0, hidden=HIDDEN, rng=rng, dtype=dtype), rng)


def _affine_parity1(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    flow = AffineCoupling(dim, parity=1, hidden=HIDDEN, rng=rng, activation="tanh", dtype=dtype)
    return randomise(flow, rng)


def _affine_random_mask(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    flow = AffineCoupling(
        dim, mask=random_mask(dim, rng), hidden=HIDDEN, rng=rng, activation="leaky_relu", dtype=dtype
    )
    return randomise(flow, rng)


def _affine_user_net(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    mask = parity_mask(dim, 1)
    d1, d2 = int(mask.sum()), int((~mask).sum())
    net = MLP([d1, 7, 2 * d2], rng, activation="tanh", dtype=dtype, zero_last=False)
    return randomise(AffineCoupling(dim, mask=mask, net=net, dtype=dtype), rng)


def _rescale(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    return randomise(Rescale(dim, dtype=dtype), rng)


def _permutation(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    return Permutation.random(dim, rng)


def _reverse(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    return Reverse(dim)


def _sequential(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    flows = [
        AffineCoupling(dim, parity=0, hidden=HIDDEN, rng=rng, dtype=dtype),
        Permutation.random(dim, rng),
        AdditiveCoupling(dim, parity=1, hidden=HIDDEN, rng=rng, activation="tanh", dtype=dtype),
        Rescale(dim, dtype=dtype),
        Reverse(dim),
        AffineCoupling(dim, mask=random_mask(dim, rng), hidden=HIDDEN, rng=rng, dtype=dtype),
    ]
    return randomise(Sequential(flows), rng)


def _inverse_affine(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    return randomise(Inverse(AffineCoupling(dim, parity=1, hidden=HIDDEN, rng=rng, dtype=dtype)), rng)


def _inverse_sequential(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    flows = [
        AffineCoupling(dim, parity=1, hidden=HIDDEN, rng=rng, activation="tanh", dtype=dtype),
        Inverse(Rescale(dim, dtype=dtype)),
        Reverse(dim),
        AdditiveCoupling(dim, mask=random_mask(dim, rng), hidden=HIDDEN, rng=rng, dtype=dtype),
        Inverse(AffineCoupling(dim, parity=0, hidden=HIDDEN, rng=rng, dtype=dtype)),
    ]
    return randomise(Inverse(Sequential(flows)), rng)


def _planar(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    return randomise(Planar(dim, rng=rng, dtype=dtype), rng)


def _radial(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    return randomise(Radial(dim, rng=rng, dtype=dtype), rng)


def _batch_norm(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    """Evaluation mode (training mode couples the rows of a batch: ``tests/flows/test_normalization.py``),
    per channel when ``dim`` is even (two channels of ``dim / 2`` pixels), else per coordinate."""
    flow = randomise(BatchNorm(dim, dtype=dtype, channels=2 if dim % 2 == 0 else None), rng)
    flow.buffers["running_var"][...] = rng.uniform(0.25, 4.0, size=flow.buffers["running_var"].shape)
    return flow


def _act_norm(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    """Initialised already, so the checks see a fixed map (the data-dependent start is tested apart)."""
    flow = randomise(ActNorm(dim, dtype=dtype), rng)
    flow.initialized = True
    return flow


def _scale(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    return Scale(dim, float(rng.choice([-1.0, 1.0]) * rng.uniform(0.25, 4.0)))


FlowFactory = Callable[[int, np.random.Generator, object], Flow]

FLOW_CASES: list[tuple[str, FlowFactory]] = [
    ("additive_coupling", _additive),
    ("affine_coupling_parity0", _affine_parity0),
    ("affine_coupling_parity1", _affine_parity1),
    ("affine_coupling_random_mask", _affine_random_mask),
    ("affine_coupling_user_net", _affine_user_net),
    ("rescale", _rescale),
    ("permutation", _permutation),
    ("reverse", _reverse),
    ("sequential", _sequential),
    ("inverse_affine_coupling", _inverse_affine),
    ("inverse_sequential", _inverse_sequential),
    ("planar", _planar),
    ("radial", _radial),
    ("batch_norm_eval", _batch_norm),
    ("act_norm", _act_norm),
    ("scale", _scale),
]
"""``(name, factory(dim, rng, dtype) -> Flow)`` for every kind of flow layer, all parameters random.

Every factory accepts any ``dim ≥ 2`` and builds its flow in ``dtype``.
"""
