"""Coupling layers (NICE, RealNVP): ``z₁ = x₁``, ``z₂ = τ(x₂, c(x₁))``.

The Jacobian ``∂z/∂x`` is block lower-triangular with identity top-left block, so
``log|det ∂z/∂x| = log|det ∂z₂/∂x₂|``: the coupling law's log-det. The net ``c`` may be any
function; it never has to be inverted because ``x₁ = z₁`` is available in both directions.

Backward (``docs/flows.md#coupling-layer``), forward direction: the law gives ``∂L/∂x₂`` and
``∂L/∂h``; ``x₁`` reaches the loss directly (``z₁ = x₁``) and through ``h = c(x₁)``, so
``∂L/∂x₁ = d_z₁ + c.backward(∂L/∂h)``. The inverse direction is the same with ``z`` and ``x``
swapped, because ``h = c(z₁)`` there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nflow_np import backend
from nflow_np.flows.base import Flow
from nflow_np.flows.coupling_law import COUPLING_LAWS
from nflow_np.module import as_float_dtype
from nflow_np.nn import ACTIVATIONS, MLP, Layer
from nflow_np.seeding import as_generator
from nflow_np.specs import SpecReader, register_flow


def parity_mask(dim: int, parity: int) -> np.ndarray:
    """NICE's odd/even partition: ``mask[i] = (i % 2 == parity)``; True marks the pass-through ``x₁``."""
    if parity not in (0, 1):
        raise ValueError(f"parity must be 0 or 1, got {parity}")
    return np.arange(dim) % 2 == parity


def _as_index(indices: np.ndarray) -> slice | np.ndarray:
    """A slice when ``indices`` is an arithmetic progression (a view, no copy), else the array."""
    if len(indices) == 1:
        return slice(int(indices[0]), int(indices[0]) + 1)
    steps = np.diff(indices)
    if np.all(steps == steps[0]) and steps[0] > 0:
        return slice(int(indices[0]), int(indices[-1]) + 1, int(steps[0]))
    return indices


@register_flow(None)  # saves as '<law>_coupling', loads as AdditiveCoupling / AffineCoupling
class Coupling(Flow):
    """A coupling layer with a pluggable law (``"additive"`` or ``"affine"``).

    Parameters
    ----------
    dim : int
        Dimension ``D`` of ``x``.
    law : {"additive", "affine"}
        The coupling law ``τ`` (:mod:`nflow_np.flows.coupling_law`).
    mask : array of bool, shape (D,), optional
        True for the pass-through coordinates ``x₁``, False for the transformed ``x₂``. Both parts
        must be non-empty. Default: ``parity_mask(dim, parity)``.
    parity : {0, 1}
        Used when ``mask`` is omitted; stack layers with alternating parity so each coordinate is
        transformed by every other layer.
    hidden : sequence of int
        Hidden widths of the default MLP net ``c: R^{D₁} → R^{out}``.
    rng : numpy.random.Generator, optional
        Initialisation randomness (default: seeded 0).
    activation : str
        Activation of the default net.
    net : Layer, optional
        A ready net to use instead of the default MLP; it must map ``(N, D₁)`` to
        ``(N, law.out_features(D₂))``. Start its last layer at zero for an identity coupling.
    dtype : float32 or float64
    init, last_init : str
        The default net's initialisations (:data:`nflow_np.nn.layers.INITS`): hidden layers
        ``"glorot"`` (or ``"he"`` for ReLUs), last layer ``"zeros"`` so the coupling starts as the
        identity.
    log_scale_bound : float
        Affine law only: the bound ``a`` of the log-scale ``s = a ⊙ tanh(ŝ)``, its starting value
        (``a = 1``: ``|s| ≤ 1`` at the start; ``a = 0`` would freeze ``a`` and ``ŝ``, whose gradients
        vanish together).
    learn_log_scale_bound : bool
        Affine law only: learn ``a`` per transformed coordinate (the default, RealNVP's learned
        scale), or keep it fixed at ``log_scale_bound``, so that no layer ever stretches by more
        than ``exp(a)``. The learned ``a`` is the parameter ``"scale"`` (the key model files have
        always used); :attr:`log_scale_bound` reads it by its honest name either way.
    """

    def __init__(
        self,
        dim: int,
        law: str,
        *,
        mask: np.ndarray | None = None,
        parity: int = 0,
        hidden: Sequence[int] = (64, 64),
        rng: np.random.Generator | None = None,
        activation: str = "relu",
        net: Layer | None = None,
        dtype: object = np.float64,
        init: str = "glorot",
        last_init: str = "zeros",
        log_scale_bound: float = 1.0,
        learn_log_scale_bound: bool = True,
    ) -> None:
        super().__init__(dim)
        if law not in COUPLING_LAWS:
            raise ValueError(f"unknown coupling law {law!r}; choose from {sorted(COUPLING_LAWS)}")
        dtype = as_float_dtype(dtype)
        mask = parity_mask(dim, parity) if mask is None else np.asarray(mask)
        if mask.shape != (dim,) or mask.dtype != bool:
            raise ValueError(f"mask must be a boolean array of shape ({dim},), got {mask.dtype} {mask.shape}")
        if mask.all() or not mask.any():
            raise ValueError("mask must leave both parts non-empty (some True, some False)")
        self.law = law
        self.mask = mask
        self.idx1 = _as_index(np.flatnonzero(mask))
        self.idx2 = _as_index(np.flatnonzero(~mask))
        self.d1, self.d2 = int(mask.sum()), int((~mask).sum())
        out = COUPLING_LAWS[law].out_features(self.d2)
        if net is None:
            rng = as_generator(rng, 0)
            net = MLP([self.d1, *hidden, out], rng, activation=activation, dtype=dtype, init=init, last_init=last_init)
        elif (init, last_init) != ("glorot", "zeros"):
            raise ValueError("init and last_init apply to the default net; initialise a net you pass yourself")
        self.out_features = out
        sizes = getattr(net, "sizes", None)
        if sizes is not None and (sizes[0] != self.d1 or sizes[-1] != out):
            raise ValueError(
                f"net maps {sizes[0]} -> {sizes[-1]} features, but this coupling needs {self.d1} -> {out} "
                f"({self.d1} pass-through coordinates, {law} law on {self.d2})"
            )
        self.net = net
        self.children = {"net": net}
        has_bound = COUPLING_LAWS[law].has_scale
        if not has_bound and (log_scale_bound != 1.0 or not learn_log_scale_bound):
            raise ValueError(f"the {law} law has no log-scale to bound")
        if not (np.isfinite(log_scale_bound) and log_scale_bound > 0):
            raise ValueError(f"log_scale_bound must be a positive number, got {log_scale_bound!r}")
        self.fixed_log_scale_bound = None if learn_log_scale_bound else float(log_scale_bound)
        if has_bound and learn_log_scale_bound:
            self.add_param("scale", np.full(self.d2, log_scale_bound, dtype=dtype))  # the file key since v0.1

    @property
    def log_scale_bound(self) -> np.ndarray | float | None:
        """The bound ``a`` of the affine law's log-scale: the learned array ``(D₂,)``, the fixed value,
        or ``None`` for a law without a scale."""
        return self.params.get("scale", self.fixed_log_scale_bound)

    def _scale(self, like: np.ndarray) -> np.ndarray | None:
        """``a`` as the law takes it, an array ``(D₂,)``; a fixed bound is made from ``like`` (its device, dtype)."""
        if self.fixed_log_scale_bound is None:
            return self.params.get("scale")
        return np.full_like(like, self.fixed_log_scale_bound, shape=self.d2)

    def spec(self, where: str = "flow") -> dict:
        """``{"kind": "<law>_coupling", "mask", "hidden", "activation"}``; the net must be an :class:`MLP`."""
        if type(self.net) is not MLP:
            raise TypeError(f"{where}: cannot save a coupling whose net is a {type(self.net).__name__}; only MLP nets")
        net = self.net.spec()
        spec = {
            "kind": f"{self.law}_coupling",
            "mask": self.mask.tolist(),
            "hidden": net["sizes"][1:-1],
            "activation": net["activation"],
        }
        if self.fixed_log_scale_bound is not None:  # written only when fixed: older files read as learned
            spec["log_scale_bound"] = self.fixed_log_scale_bound
        return spec

    @classmethod
    def from_spec(cls, read: SpecReader) -> Coupling:
        """The coupling of ``read.spec`` with a fresh MLP net (``hidden``, ``activation``)."""
        mask = read.list("mask", bool)
        hidden = read.list("hidden", int, minimum=1)
        activation = read.choice("activation", ACTIVATIONS)
        law = COUPLING_LAWS[cls.spec_law]
        d1 = sum(mask)
        sizes = [d1, *hidden, law.out_features(len(mask) - d1)]
        read.take(sum(n_in * n_out + n_out for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)))
        fixed = {"log_scale_bound": read.real("log_scale_bound"), "learn_log_scale_bound": False} if read.has(
            "log_scale_bound") else {}
        read.take(len(mask) - d1 if law.has_scale and not fixed else 0)
        return cls(len(mask), mask=np.array(mask, dtype=bool), hidden=hidden, activation=activation, dtype=read.dtype,
                   **fixed)

    def _net(self, x1: np.ndarray) -> np.ndarray:
        h = self.net.forward(x1)
        if h.shape != (x1.shape[0], self.out_features):
            raise ValueError(f"the coupling net returned shape {h.shape}; expected {(x1.shape[0], self.out_features)}")
        return h

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x1, x2 = x[:, self.idx1], x[:, self.idx2]
        h = self._net(x1)
        z2, logdet = backend.coupling_law(self.law).forward(x2, h, self._scale(x2))
        z = np.empty_like(x)
        z[:, self.idx1] = x1
        z[:, self.idx2] = z2
        self._remember("forward", x.shape[0], (x2, h))
        return z, logdet

    def _inverse(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z1, z2 = z[:, self.idx1], z[:, self.idx2]
        h = self._net(z1)
        x2, logdet = backend.coupling_law(self.law).inverse(z2, h, self._scale(z2))
        x = np.empty_like(z)
        x[:, self.idx1] = z1
        x[:, self.idx2] = x2
        self._remember("inverse", z.shape[0], (z2, h))
        return x, logdet

    def _reconstruct(self, z: np.ndarray) -> np.ndarray:
        # The inverse evaluates h = c(z₁) = c(x₁), exactly the forward's h (and net cache), so the
        # forward cache (x₂, h) is at hand without a second pass through the net.
        x, _ = self._inverse(z)
        _, (_, h) = self._cache
        self._remember("forward", z.shape[0], (x[:, self.idx2], h))
        return x

    def _backward(self, d_out: np.ndarray, d_logdet: np.ndarray) -> np.ndarray:
        direction, (in2, h) = self._cache
        law = backend.coupling_law(self.law)
        step = law.forward_vjp if direction == "forward" else law.inverse_vjp
        d_in2, d_h, d_scale = step(in2, h, self._scale(in2), d_out[:, self.idx2], d_logdet)
        if d_scale is not None and "scale" in self.grads:  # a fixed bound takes no gradient
            self.grads["scale"] += d_scale
        d_in = np.empty_like(d_out)
        d_in[:, self.idx1] = d_out[:, self.idx1] + self.net.backward(d_h)
        d_in[:, self.idx2] = d_in2
        return d_in


@register_flow("additive_coupling", "mask", "hidden", "activation")
class AdditiveCoupling(Coupling):
    """NICE's additive coupling ``z₂ = x₂ + c(x₁)``: volume preserving, ``logdet = 0``.

    Same parameters as :class:`Coupling` without ``law``.
    """

    spec_law = "additive"

    def __init__(self, dim: int, **kwargs: object) -> None:
        super().__init__(dim, "additive", **kwargs)


@register_flow("affine_coupling", "mask", "hidden", "activation", optional=("log_scale_bound",))
class AffineCoupling(Coupling):
    """RealNVP's affine coupling ``z₂ = x₂ ⊙ exp(s) + t``, ``[ŝ, t] = c(x₁)``, ``s = a ⊙ tanh(ŝ)``.

    ``logdet = Σ_j s_j``; the bound ``a`` on ``s`` (``log_scale_bound``, learned or fixed) is explained
    in :class:`nflow_np.flows.coupling_law.AffineLaw`. Same parameters as :class:`Coupling` without
    ``law``.
    """

    spec_law = "affine"

    def __init__(self, dim: int, **kwargs: object) -> None:
        super().__init__(dim, "affine", **kwargs)
