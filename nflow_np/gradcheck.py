"""Check a layer's hand-written backward pass and log-determinant against finite differences.

The test suite proves every layer of the library with these functions; use them the same way on
your own layer (``docs/gradcheck.md``)::

    from nflow_np import gradcheck
    rng = np.random.default_rng(0)
    flow = MyFlow(3)                                   # built in float64, parameters away from their init
    x = rng.standard_normal((4, 3))
    gradcheck.check_flow_gradients(flow, x, "forward", rng)   # input and every parameter
    gradcheck.check_logdet(flow, x, "forward")                # logdet vs slogdet of the Jacobian

Each check raises :class:`GradcheckError` (an ``AssertionError``, so pytest reports it as a failed
check) naming every array that disagrees.

**Gradients.** The loss is a random linear function of both outputs, ``L = Σ A ⊙ out + Σ b ⊙ logdet``
with ``A, b ~ N(0, 1)``, so its gradient w.r.t. ``(out, logdet)`` is exactly ``(A, b)``: that is what
``backward`` receives, and it must return ``∂L/∂input`` and leave ``∂L/∂θ`` in ``grads``. The numerical
side differentiates ``L`` by central differences (fourth order) in float64. Error metric, per array (the
input gradient and each parameter separately, so a wrong gradient in a small array is not hidden
behind a large one)::

    err(a, n) = max_i |a_i − n_i| / max(max_i |n_i|, floor),    floor = FD_FLOOR · S

``S = 1 + Σ|A ⊙ out| + Σ|b ⊙ logdet|`` is the size of the terms of the loss: the round-off of central
differences with ``eps = 1e-6`` is about ``1e-16 · S / eps ≈ 1e-10 · S`` per entry (measured: at most
5e-10 · S over all the library's flows), so an array whose true gradient is below ``FD_FLOOR · S``
(1 % of the loss's size) is checked against the absolute tolerance ``GRAD_RTOL · FD_FLOOR · S`` instead.
Everything else must agree to :data:`GRAD_RTOL` relative.

**Log-determinant.** ``log|det J|`` of the central-difference Jacobian of the map at a row (NumPy's
``slogdet``) must equal the log-det the flow returns for that row, alone and inside the batch.

Why float64 only: with ``eps = 1e-6`` the rounding term of a difference quotient is ``ulp / eps``,
``1e-10`` in float64 but ``1e-1`` in float32. Check in float64; the float32 path is the same code.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from nflow_np.module import Module

GRAD_RTOL = 1e-6
"""Largest accepted :func:`relative_error` between an analytic and a numerical gradient."""

LOGDET_ATOL = 1e-6
"""Largest accepted ``|logdet − log|det J_fd||`` (log-dets are O(1), so absolute is relative)."""

FD_FLOOR = 1e-2
"""Floor of the denominator of :func:`relative_error`, as a fraction of the loss's size ``S``."""

FD_EPS = 1e-6
"""Step of the central differences."""


class GradcheckError(AssertionError):
    """A backward pass or a log-det disagrees with finite differences (the message names the arrays)."""


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


def numerical_jacobian(fn: Callable[[np.ndarray], np.ndarray], x_row: np.ndarray, eps: float = FD_EPS) -> np.ndarray:
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
    """Raise :class:`GradcheckError` listing every array whose :func:`relative_error` exceeds ``GRAD_RTOL``.

    Parameters
    ----------
    analytic, numeric : dict[str, numpy.ndarray]
        Gradients under the same names (``"input"``, parameter names...).
    floor : float
        Passed to :func:`relative_error`.
    what : str
        Describes the check in the failure message.
    """
    if analytic.keys() != numeric.keys():
        raise GradcheckError(f"{what}: names differ {analytic.keys()} vs {numeric.keys()}")
    errors = {name: relative_error(analytic[name], numeric[name], floor) for name in numeric}
    bad = {name: err for name, err in errors.items() if not err <= GRAD_RTOL}
    if bad:
        raise GradcheckError(f"{what}: gradient mismatch (relative error > {GRAD_RTOL}): {bad}")


# -- gradient checks ---------------------------------------------------------------------------


def _require_float64(module: Module, x: np.ndarray) -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.float64 or module.dtype not in (None, np.float64):
        raise TypeError("gradient checks run in float64 on the host: build the module and the input in float64")


def _check_grads_like_params(module: Module) -> dict[str, np.ndarray]:
    """Copies of the accumulated gradients, after checking each has its parameter's shape and dtype."""
    grads = {}
    for name, param, grad in module.named_parameters():
        if grad.shape != param.shape or grad.dtype != param.dtype:
            raise GradcheckError(
                f"grad {name!r} has {grad.dtype} {grad.shape}, its parameter {param.dtype} {param.shape}"
            )
        grads[name] = grad.copy()
    return grads


def check_flow_gradients(flow: Module, x: np.ndarray, direction: str, rng: np.random.Generator) -> None:
    """Check a flow's backward pass in one direction against central differences.

    After ``zero_grad`` and one call in ``direction``, ``flow.backward(A, b)`` must return ``∂L/∂input``
    of ``L = Σ A ⊙ out + Σ b ⊙ logdet`` and leave ``∂L/∂θ`` in ``grads`` for every parameter of
    :meth:`~nflow_np.module.Module.named_parameters` (module docstring). Also checked: the backward pass
    leaves ``A`` and ``b`` untouched, and the grads have the shapes and dtypes of their parameters.

    Parameters
    ----------
    flow : Flow
        Built in float64 (or parameter-free), deterministic (fix any noise it draws first).
    x : numpy.ndarray, shape (N, flow.dim), float64
        The input of the call (data for ``"forward"``, noise for ``"inverse"``).
    direction : {"forward", "inverse"}
    rng : numpy.random.Generator
        Draws ``A`` and ``b``.

    Raises
    ------
    GradcheckError
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
    if not (np.array_equal(d_out, weight_out) and np.array_equal(d_logdet, weight_logdet)):
        raise GradcheckError("backward modified the caller's d_out/d_logdet")
    analytic |= _check_grads_like_params(flow)
    before = {name: param.copy() for name, param, _ in flow.named_parameters()}

    numeric = {"input": numerical_gradient(loss, x)}
    for name, param, _ in flow.named_parameters():
        numeric[name] = numerical_gradient(loss, param)
    for name, param, _ in flow.named_parameters():
        if not np.array_equal(param, before[name]):
            raise GradcheckError(f"parameter {name!r} not restored")
    size = 1.0 + float(np.sum(np.abs(weight_out * out)) + np.sum(np.abs(weight_logdet * logdet)))
    assert_gradients_match(analytic, numeric, FD_FLOOR * size, f"{type(flow).__name__} {direction}")


def check_layer_gradients(layer: Module, x: np.ndarray, rng: np.random.Generator) -> None:
    """Check an ``nn`` layer's backward pass against central differences.

    Same as :func:`check_flow_gradients` without a log-det: ``L = Σ A ⊙ layer(x)``, ``A ~ N(0, 1)``;
    ``layer.backward(A)`` must return ``∂L/∂x`` and leave ``∂L/∂θ`` in ``grads``.

    Parameters
    ----------
    layer : nflow_np.nn.Layer
        Built in float64 (or parameter-free).
    x : numpy.ndarray, shape (N, D_in), float64
    rng : numpy.random.Generator
        Draws ``A``.

    Raises
    ------
    GradcheckError
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
    if not np.array_equal(d_y, weight):
        raise GradcheckError("backward modified the caller's d_y")
    analytic |= _check_grads_like_params(layer)
    numeric = {"input": numerical_gradient(loss, x)}
    for name, param, _ in layer.named_parameters():
        numeric[name] = numerical_gradient(loss, param)
    size = 1.0 + float(np.sum(np.abs(weight * layer.forward(x))))
    assert_gradients_match(analytic, numeric, FD_FLOOR * size, type(layer).__name__)


# -- log-det check -----------------------------------------------------------------------------


def check_logdet(flow: Module, x: np.ndarray, direction: str, rows: int = 3, atol: float = LOGDET_ATOL) -> None:
    """Check the returned log-det against ``slogdet`` of the finite-difference Jacobian.

    For each of the first ``rows`` rows of ``x``: ``log|det J|`` of the central-difference Jacobian of
    the map (``forward`` or ``inverse``) at that row must equal the log-det the flow returns for that
    row, both when the row is passed alone and inside the whole batch (rows are independent), within
    ``atol`` (default :data:`LOGDET_ATOL`).

    Parameters
    ----------
    flow : Flow
        Built in float64 (or parameter-free), deterministic.
    x : numpy.ndarray, shape (N, flow.dim), float64
    direction : {"forward", "inverse"}
    rows : int
        How many rows to check (each costs ``2 * dim`` calls).
    atol : float
        Accepted error; a nearly singular map needs more, since the differences' round-off in
        ``log|det J|`` is divided by the smallest singular value.

    Raises
    ------
    GradcheckError
        A log-det off by more than ``atol``, or a singular Jacobian.
    """
    _require_float64(flow, x)
    if direction not in ("forward", "inverse"):
        raise ValueError(f"direction must be 'forward' or 'inverse', got {direction!r}")
    call = flow.forward if direction == "forward" else flow.inverse
    _, batch_logdet = call(x)
    name = type(flow).__name__
    for n in range(min(rows, x.shape[0])):
        jacobian = numerical_jacobian(lambda row: call(row)[0], x[n])
        sign, log_abs_det = np.linalg.slogdet(jacobian)
        if sign == 0:
            raise GradcheckError(f"{name} {direction}: singular Jacobian at row {n}")
        _, row_logdet = call(x[n : n + 1])
        if not abs(row_logdet[0] - log_abs_det) <= atol:
            raise GradcheckError(
                f"{name} {direction}: logdet {row_logdet[0]!r} but log|det J| = {log_abs_det!r} at row {n}"
            )
        if not abs(batch_logdet[n] - log_abs_det) <= atol:
            raise GradcheckError(
                f"{name} {direction}: batched logdet {batch_logdet[n]!r} differs from "
                f"log|det J| = {log_abs_det!r} at row {n}"
            )
