"""Ready-made models from the papers: NICE (additive couplings + rescaling) and RealNVP (affine)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nflow_np.distributions import BASE_DISTRIBUTIONS
from nflow_np.flows import AdditiveCoupling, AffineCoupling, Rescale, Sequential
from nflow_np.model import FlowModel
from nflow_np.module import as_float_dtype

MODELS = ("realnvp", "nice")


def build_model(
    kind: str,
    dim: int,
    *,
    layers: int = 8,
    hidden: Sequence[int] = (64, 64),
    activation: str = "relu",
    base: str | None = None,
    dtype: object = np.float64,
    seed: int = 0,
) -> FlowModel:
    """Build a NICE or RealNVP model for ``dim``-dimensional data.

    Parameters
    ----------
    kind : {"realnvp", "nice"}
        ``realnvp``: ``layers`` affine couplings (Dinh et al. 2016). ``nice``: ``layers`` additive
        couplings and a final :class:`~nflow_np.flows.Rescale` (Dinh et al. 2014).
    dim : int
        Data dimension (at least 2: a coupling needs two non-empty parts).
    layers : int
        Number of couplings; consecutive couplings alternate the odd/even partition so every
        coordinate is transformed by every other layer.
    hidden : sequence of int
        Hidden widths of each coupling's MLP.
    activation : str
        Activation of the MLPs.
    base : {"normal", "logistic"}, optional
        Base distribution; default normal for RealNVP, logistic for NICE (as in the papers).
    dtype : float32 or float64
    seed : int
        Seeds the initialisation.

    Returns
    -------
    FlowModel
    """
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}; choose from {list(MODELS)}")
    if dim < 2:
        raise ValueError(f"coupling flows need dimension >= 2, got {dim}")
    if layers < 1:
        raise ValueError(f"layers must be at least 1, got {layers}")
    base = base or ("normal" if kind == "realnvp" else "logistic")
    if base not in BASE_DISTRIBUTIONS:
        raise ValueError(f"unknown base distribution {base!r}; choose from {sorted(BASE_DISTRIBUTIONS)}")
    dtype = as_float_dtype(dtype)
    rng = np.random.default_rng(seed)
    coupling = AffineCoupling if kind == "realnvp" else AdditiveCoupling
    flows = [
        coupling(dim, parity=i % 2, hidden=hidden, activation=activation, rng=rng, dtype=dtype)
        for i in range(layers)
    ]
    if kind == "nice":
        flows.append(Rescale(dim, dtype=dtype))
    return FlowModel(Sequential(flows), BASE_DISTRIBUTIONS[base]())
