"""The test suite's shared machinery: the registry of flows, the backends under test, and the checks.

The checks are the package's own, :mod:`nflow_np.gradcheck` (central differences in float64 for the
backward pass, ``slogdet`` of the numerical Jacobian for the log-det; its docstring gives the error
metric), re-exported here so every test file imports them from one place.

:data:`CASES` lists one :class:`FlowCase` per kind of layer (and per composition of layers): how to
build it and how to draw valid inputs for it. The property suite (``tests/flow_properties.py``, run
by ``tests/flows/test_flows.py`` over every case and every backend of :data:`BACKENDS`) proves each
one, so a new layer is proven by adding one ``FlowCase(...)`` line here (README, "How to add a layer").
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from conv_cases import CONV_FLOW_CASES

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
from nflow_np.backend import available_backends
from nflow_np.flows import Dequantize, FactorOut, Logit, Squeeze, Standardize
from nflow_np.flows.coupling import parity_mask
from nflow_np.flows.normalization import ActNorm, BatchNorm
from nflow_np.flows.preprocessing import Scale
from nflow_np.gradcheck import (  # noqa: F401 (re-exported: every test file imports the checks from here)
    FD_EPS,
    FD_FLOOR,
    GRAD_RTOL,
    LOGDET_ATOL,
    GradcheckError,
    assert_gradients_match,
    check_flow_gradients,
    check_layer_gradients,
    check_logdet,
    numerical_gradient,
    numerical_jacobian,
    relative_error,
)
from nflow_np.module import Module
from nflow_np.nn import MLP

REFERENCE = "numpy"


def backends_under_test() -> list[str]:
    """``NFLOW_TEST_BACKENDS`` (comma-separated names), else every backend that loads here, reference first."""
    chosen = os.environ.get("NFLOW_TEST_BACKENDS")
    if chosen:
        return [name.strip() for name in chosen.split(",") if name.strip()]
    return available_backends()


BACKENDS = backends_under_test()
"""The backends the property suite proves every layer on (``numpy``, ``numba`` on a CPU machine)."""


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
    flow = AffineCoupling(dim, mask=random_mask(dim, rng), hidden=HIDDEN, rng=rng, activation="leaky_relu", dtype=dtype)
    return randomise(flow, rng)


def _affine_user_net(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    mask = parity_mask(dim, 1)
    d1, d2 = int(mask.sum()), int((~mask).sum())
    net = MLP([d1, 7, 2 * d2], rng, activation="tanh", dtype=dtype, zero_last=False)
    return randomise(AffineCoupling(dim, mask=mask, net=net, dtype=dtype), rng)


def _affine_fixed_bound(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    bound = float(rng.uniform(0.5, 2.0))
    flow = AffineCoupling(
        dim, parity=0, hidden=HIDDEN, rng=rng, dtype=dtype, log_scale_bound=bound, learn_log_scale_bound=False
    )
    return randomise(flow, rng)


def _rescale(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    return randomise(Rescale(dim, dtype=dtype), rng)


def _standardize(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    """Fixed buffers (nothing to randomise): means far from 0, spreads on both sides of 1."""
    return Standardize(rng.normal(0.0, 2.0, dim), rng.uniform(0.25, 4.0, dim), dtype=dtype)


def _standardize_then_coupling(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    """The shape of a model trained on a data file: ``Standardize`` first, a coupling after it."""
    coupling = randomise(AffineCoupling(dim, parity=0, hidden=HIDDEN, rng=rng, dtype=dtype), rng)
    return Sequential([_standardize(dim, rng, dtype), coupling])


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


def _factor_out(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    keep = int(rng.integers(1, dim))
    inner = Rescale(keep, dtype=dtype)
    if keep >= 2:
        inner = Sequential([AffineCoupling(keep, parity=1, hidden=HIDDEN, rng=rng, dtype=dtype), inner])
    return randomise(FactorOut(dim, inner), rng)


IMAGE_SHAPES = ((1, 2, 2), (2, 2, 2), (1, 2, 4), (1, 4, 2), (3, 2, 2))
"""Image shapes for :class:`Squeeze` (even height and width; at most 12 pixels, for cheap differences)."""


def _squeeze(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    """Ignores ``dim``: a Squeeze works in ``C·H·W`` dimensions with ``H, W`` even."""
    return Squeeze(IMAGE_SHAPES[int(rng.integers(len(IMAGE_SHAPES)))])


def _logit(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    return Logit(dim, alpha=float(rng.choice([0.0, 0.05, 0.2])))


class ConstantNoise:
    """Stands in for a Dequantize's generator: ``random(shape, dtype)`` returns ``0.37`` everywhere, so the
    layer is the fixed map ``x ↦ x + 0.37`` that finite differences can see, the same for every row and
    in both precisions. The noise itself (uniform, fresh per call) is tested in ``test_preprocessing.py``."""

    def random(self, shape: tuple[int, ...], dtype: object = np.float64) -> np.ndarray:
        return np.full(shape, 0.37, dtype=dtype)


def _dequantize(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    flow = Dequantize(dim, levels=int(rng.integers(2, 20)))
    flow.rng = ConstantNoise()
    return flow


# -- input samplers ----------------------------------------------------------------------------

Sampler = Callable[[Flow, str, int, np.random.Generator, float], np.ndarray]
"""``sample(flow, direction, n, rng, magnitude) -> (n, flow.dim)`` float64: valid input of a call in
``direction`` (data for ``"forward"``, noise for ``"inverse"``). ``magnitude`` is how large the test
would like the inputs (1, 30, 1e3); a layer with a bounded domain draws from its domain instead."""


def normal_inputs(flow: Flow, direction: str, n: int, rng: np.random.Generator, magnitude: float = 1.0) -> np.ndarray:
    """``magnitude · N(0, I)``: any point of ``R^dim`` is valid."""
    return magnitude * rng.standard_normal((n, flow.dim))


def logit_inputs(flow: Flow, direction: str, n: int, rng: np.random.Generator, magnitude: float = 1.0) -> np.ndarray:
    """Data in ``[0, 1)`` (the logit's domain); noise ``N(0, I)`` (larger ``|z|`` saturates σ(z) in float64)."""
    if direction == "forward":
        return rng.uniform(0.0, 1.0, size=(n, flow.dim))
    return rng.standard_normal((n, flow.dim))


def level_inputs(flow: Flow, direction: str, n: int, rng: np.random.Generator, magnitude: float = 1.0) -> np.ndarray:
    """Data: integer levels ``0 … L−1``; noise: continuous points of ``[0, L)`` for the quantiser."""
    if direction == "forward":
        return rng.integers(0, flow.levels, size=(n, flow.dim)).astype(np.float64)
    return rng.uniform(0.0, flow.levels, size=(n, flow.dim))


FlowFactory = Callable[[int, np.random.Generator, object], Flow]


@dataclass(frozen=True)
class FlowCase:
    """One entry of the registry: a layer the property suite proves.

    Attributes
    ----------
    name : str
        The test id.
    build : callable (dim, rng, dtype) -> Flow
        Builds the flow in ``dtype`` with every parameter random (:func:`randomise`); same ``rng``
        state, same flow. ``dim`` (2 to 6) is a request: a layer with a shape constraint builds the
        nearest it can, and the suite reads ``flow.dim``.
    sample : Sampler
        Valid inputs per direction (default: ``N(0, I)``).
    bijective : bool
        ``False`` for a layer whose inverse is only a left inverse (Dequantize's quantiser): the round
        trip and the log-det are then checked starting from the data side only.
    """

    name: str
    build: FlowFactory
    sample: Sampler = normal_inputs
    bijective: bool = True

    @property
    def directions(self) -> tuple[str, ...]:
        """The directions in which the layer is a change of variables."""
        return ("forward", "inverse") if self.bijective else ("forward",)

    @property
    def on_all_of_r_d(self) -> bool:
        """A bijection of ``R^dim`` for the requested ``dim``, fed ``N(0, I)``: a member of :data:`FLOW_CASES`."""
        return self.sample is normal_inputs and self.bijective and self.build is not _squeeze


CASES: list[FlowCase] = [
    FlowCase("additive_coupling", _additive),
    FlowCase("affine_coupling_parity0", _affine_parity0),
    FlowCase("affine_coupling_parity1", _affine_parity1),
    FlowCase("affine_coupling_random_mask", _affine_random_mask),
    FlowCase("affine_coupling_user_net", _affine_user_net),
    FlowCase("affine_coupling_fixed_bound", _affine_fixed_bound),
    FlowCase("rescale", _rescale),
    FlowCase("standardize", _standardize),
    FlowCase("standardize_then_coupling", _standardize_then_coupling),
    FlowCase("permutation", _permutation),
    FlowCase("reverse", _reverse),
    FlowCase("sequential", _sequential),
    FlowCase("inverse_affine_coupling", _inverse_affine),
    FlowCase("inverse_sequential", _inverse_sequential),
    FlowCase("planar", _planar),
    FlowCase("radial", _radial),
    FlowCase("batch_norm_eval", _batch_norm),
    FlowCase("act_norm", _act_norm),
    FlowCase("scale", _scale),
    FlowCase("factor_out", _factor_out),
    FlowCase("squeeze", _squeeze),
    FlowCase("logit", _logit, sample=logit_inputs),
    FlowCase("dequantize", _dequantize, sample=level_inputs, bijective=False),
    *[FlowCase(name, build) for name, build in CONV_FLOW_CASES],  # tests/conv_cases.py
]
"""Every kind of flow layer of the library (``nflow_np/flows``), each proven by the property suite."""

FLOW_CASES: list[tuple[str, FlowFactory]] = [(case.name, case.build) for case in CASES if case.on_all_of_r_d]
"""``(name, factory(dim, rng, dtype) -> Flow)`` for the cases that are bijections of ``R^dim`` for any
``dim ≥ 2`` fed ``N(0, I)`` inputs: what tests that stack random layers or push extreme inputs draw from."""


def to_format_1(folder: Path) -> Path:
    """Rewrite the model folder ``folder`` as nflow_np before safetensors wrote it: ``model.npz``, format 1."""
    import hashlib
    import io
    import json

    from nflow_np.safetensors_io import decode

    config = json.loads((folder / "model.json").read_text())
    tensors, _ = decode((folder / "model.safetensors").read_bytes())
    buffer = io.BytesIO()
    np.savez(buffer, **tensors)
    del config["weights_file"], config["sha256"]
    config.update(format_version=1, npz_sha256=hashlib.sha256(buffer.getvalue()).hexdigest())
    (folder / "model.npz").write_bytes(buffer.getvalue())
    (folder / "model.json").write_text(json.dumps(config, indent=2))
    (folder / "model.safetensors").unlink()
    return folder
