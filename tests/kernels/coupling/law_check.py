"""Compare a kernel backend's coupling laws with the NumPy reference: inputs, error metric, bounds.

Error metric (per output array, computed in float64)::

    err(kernel, reference) = max_i |kernel_i − reference_i| / magnitude_i

where ``magnitude`` is the sum of the absolute values of the terms of the formula that produced
the entry (e.g. ``|x₂ ⊙ e| + |t|`` for ``z₂ = x₂ ⊙ e + t``; ``|∂L/∂s ⊙ a|`` for
``∂L/∂ŝ = ∂L/∂s ⊙ a ⊙ (1 − g²)``, because near saturation ``1 − g²`` is a difference of
nearly equal numbers in the reference too), and every term with ``e = exp(±s)`` is multiplied by
``1 + |s|``, exp's condition number (an ulp of ``s = a·g`` moves ``e`` by ``|s|`` ulp). Rounding
errors of a correct kernel are a few ulp of that magnitude, whatever cancellation happens; a
wrong index or a missing term is not. Bound: :data:`ULPS` eps of the dtype.

The additive law involves one addition per entry and must match exactly.
"""

from __future__ import annotations

import numpy as np

ULPS = 8
"""Bound in units of the dtype's ``eps`` (2⁻⁵² or 2⁻²³) of the magnitude: the worst error measured
over 3000 random cases is 3.4 eps (docs/kernels.md#accuracy). For float64 that is 1.8e-15, well
inside the 1e-12 the brief asks for."""
FUNCTIONS = ("forward", "inverse", "forward_vjp", "inverse_vjp")


def kernel_laws(table: dict) -> dict:
    """The laws of a kernel module's ``FUSED`` table as a coupling layer calls them (declines run the reference)."""
    from nflow_np import backend
    from nflow_np.flows.coupling_law import AdditiveLaw, AffineLaw

    return {law.name: backend.bind_law(law, table) for law in (AdditiveLaw, AffineLaw)}


def bound(dtype: object) -> float:
    return ULPS * float(np.finfo(dtype).eps)


def draw(
    law: str,
    n: int,
    d2: int,
    dtype: object,
    rng: np.random.Generator,
    *,
    s_hat_scale: float = 1.0,
    x_scale: float = 1.0,
    scale_bound: float = 2.0,
) -> dict[str, np.ndarray | None]:
    """Random inputs of every law function: ``inp`` (x₂ or z₂), ``h``, ``scale``, ``d_out``, ``d_logdet``."""
    width = 2 * d2 if law == "affine" else d2
    h = rng.standard_normal((n, width))
    if law == "affine":
        h[:, :d2] *= s_hat_scale
    return {
        "inp": (x_scale * rng.standard_normal((n, d2))).astype(dtype),
        "h": h.astype(dtype),
        "scale": rng.uniform(-scale_bound, scale_bound, d2).astype(dtype) if law == "affine" else None,
        "d_out": rng.standard_normal((n, d2)).astype(dtype),
        "d_logdet": rng.standard_normal(n).astype(dtype),
    }


def call(law: type, function: str, inputs: dict) -> tuple:
    args = (inputs["inp"], inputs["h"], inputs["scale"])
    if function.endswith("_vjp"):
        args = (*args, inputs["d_out"], inputs["d_logdet"])
    return getattr(law, function)(*args)


def magnitudes(function: str, inputs: dict) -> tuple[np.ndarray, ...]:
    """Per-entry scale of each affine-law output (see the module doc), in float64."""
    inp, h, a = (np.asarray(inputs[k], dtype=np.float64) for k in ("inp", "h", "scale"))
    d_out, d_ld = (np.asarray(inputs[k], dtype=np.float64) for k in ("d_out", "d_logdet"))
    d2 = inp.shape[1]
    g = np.tanh(h[:, :d2])
    s, t = a * g, h[:, d2:]
    logdet = np.abs(s).sum(axis=1)
    with np.errstate(over="ignore", invalid="ignore"):
        return _magnitudes(function, inp, t, a, g, s, d_out, d_ld, logdet)


def _magnitudes(function, inp, t, a, g, s, d_out, d_ld, logdet):
    e, e_inv = np.exp(s) * (1 + np.abs(s)), np.exp(-s) * (1 + np.abs(s))  # with exp's condition number
    if function == "forward":
        return np.abs(inp * e) + np.abs(t), logdet
    if function == "inverse":
        return (np.abs(inp) + np.abs(t)) * e_inv, logdet
    if function == "forward_vjp":
        d_x = np.abs(d_out * e)
        d_s = d_x * np.abs(inp) + np.abs(d_ld)[:, None]
        return d_x, np.hstack([d_s * np.abs(a), np.abs(d_out)]), (d_s * np.abs(g)).sum(axis=0)
    d_z = np.abs(d_out * e_inv)
    d_s = d_z * (np.abs(inp) + np.abs(t)) + np.abs(d_ld)[:, None]
    return d_z, np.hstack([d_s * np.abs(a), d_z]), (d_s * np.abs(g)).sum(axis=0)


def relative_errors(kernel_out: tuple, reference_out: tuple, function: str, inputs: dict) -> list[float]:
    """:func:`magnitudes`-relative error of each affine output (after checking shapes and dtypes)."""
    errors = []
    for got, want, scale in zip(kernel_out, reference_out, magnitudes(function, inputs), strict=True):
        got = np.asarray(got)
        assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        tiny = np.finfo(np.float64).tiny
        errors.append(float(np.max(diff / np.maximum(scale, tiny), initial=0.0)))
    return errors


def assert_matches_reference(kernel_laws: dict, reference_laws: dict, law: str, function: str, inputs: dict) -> None:
    """The kernel's ``law.function`` equals the reference's on ``inputs`` within the stated bound."""
    got = call(kernel_laws[law], function, inputs)
    want = call(reference_laws[law], function, inputs)
    assert len(got) == len(want)
    if law == "additive":
        for g, w in zip(got, want, strict=True):
            if w is None:
                assert g is None
            else:
                assert np.asarray(g).dtype == w.dtype
                np.testing.assert_array_equal(np.asarray(g), w)
        return
    errors = relative_errors(got, want, function, inputs)
    limit = bound(inputs["inp"].dtype)
    assert max(errors) <= limit, f"{law}.{function} {inputs['inp'].dtype} {inputs['inp'].shape}: {errors} > {limit}"
