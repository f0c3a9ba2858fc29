"""Variational inference with normalizing flows (Rezende & Mohamed 2015, §4 and §6.1).

Goal: fit ``q_K`` to an unnormalised target ``p̃(z) = exp(−U(z))`` by minimising the reverse KL.

Direction: the library's one convention holds here too. A flow's **forward** maps the data side
to the noise side, ``z₀ = f(z_K)`` (target space → base space), and its **inverse** draws samples:
base draws ``z₀ ~ q₀ = N(0, I)`` are pushed to the target by ``z_K = f⁻¹(z₀) = g_K ∘ … ∘ g_1(z₀)``
(:func:`push_to_target`). :func:`make_vi_flow` builds ``f = Inverse(Sequential([g_1 … g_K]))`` so
that the sampling direction runs each layer's own ``_forward``: for
:class:`~nflow_np.flows.planar.Planar` and :class:`~nflow_np.flows.radial.Radial` that is the
paper's closed-form map ``g_k``; a coupling layer's ``_forward`` is just as good a bijection. By
the change of variables,

    log q_K(z_K) = log q₀(z₀) − Σ_k log|det ∂g_k/∂z_{k−1}| = log q₀(z₀) − logdet,

with ``logdet = log|det ∂f⁻¹/∂z₀|`` the sum the flow's inverse returns. The density of ``q_K`` at
an arbitrary point ``y`` runs the flow forward, ``f(y)`` (:func:`log_q`); for planar and radial
layers that is their numerical solve.

Free energy (the negative ELBO; ``log Z`` does not depend on the flow)::

    F = E_{q₀}[log q₀(z₀) − logdet(z₀) + β U(z_K)] = KL(q_K ‖ p) − log Z    (β = 1)

estimated on a batch ``z₀⁽¹⁾ … z₀⁽ᴺ⁾`` by the sample mean. With the draws held fixed this is a
deterministic function of the parameters (the reparametrisation trick), and its gradient is one
backward pass through the flow with (``docs/vi.md#the-free-energy-and-its-gradient``)

    ∂F̂/∂z_K[n] = β ∇U(z_K[n]) / N,     ∂F̂/∂logdet[n] = −1/N,

while ``log q₀(z₀)`` does not depend on the parameters. Annealing (the paper's §6.1) multiplies
``U`` by ``β_t = min(1, β₀ + t/T)`` that rises from ``β₀ = 0.01`` to 1 over ``T = 10 000`` steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
from tqdm.auto import tqdm

from nflow_np import distributed
from nflow_np.distributions import DiagonalNormal, StandardNormal
from nflow_np.flows.base import Flow, Inverse, Sequential
from nflow_np.flows.coupling import AdditiveCoupling, AffineCoupling
from nflow_np.flows.planar import Planar
from nflow_np.flows.radial import Radial
from nflow_np.module import as_float_dtype
from nflow_np.optim import Adam, Optimizer
from nflow_np.seeding import as_generator
from nflow_np.targets import Energy
from nflow_np.train import NonFiniteLossError, cosine_lr, train_step
from nflow_np.validation import check_batch

BASE = StandardNormal()
"""``q₀ = N(0, I)``, the paper's initial density; every function takes ``base=`` another one, e.g.
:class:`~nflow_np.distributions.DiagonalNormal` (``log q₀`` does not depend on the flow's parameters,
so the gradient of the free energy is the same formula for any fixed base)."""

Base = StandardNormal | DiagonalNormal
"""A base ``q₀``: ``log_prob(z)`` and ``sample(n, dim, rng, dtype)``."""


def _evaluate_energy(energy: Energy, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Call a target and check what it returns: ``U: (N,)`` and ``∇U: (N, D)``, finite."""
    result = energy(z)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError("a target must return a pair (U(z), grad U(z)); got " + type(result).__name__)
    value, grad = (np.asarray(part) for part in result)
    if value.shape != (z.shape[0],) or grad.shape != z.shape:
        raise ValueError(
            f"a target given z of shape {z.shape} must return U of shape {(z.shape[0],)} and grad U of shape "
            f"{z.shape}; got {value.shape} and {grad.shape}"
        )
    if not (np.isfinite(value).all() and np.isfinite(grad).all()):
        raise NonFiniteLossError("the target returned a non-finite U(z) or grad U(z) at the flow's samples")
    return value, grad


def push_to_target(flow: Flow, z0: np.ndarray, base: Base = BASE) -> tuple[np.ndarray, np.ndarray]:
    """``z_K = f⁻¹(z₀)`` (the flow's inverse: base → target) and ``log q_K(z_K) = log q₀(z₀) − logdet``.

    Shapes (N, D) and (N,); ``logdet = log|det ∂f⁻¹/∂z₀|``.
    """
    check_batch(z0, "z0", flow.dim, flow.dtype)
    z_k, logdet = flow._inverse(z0)
    return z_k, base.log_prob(z0) - logdet


def log_q(flow: Flow, y: np.ndarray, base: Base = BASE) -> np.ndarray:
    """``log q_K(y) = log q₀(f(y)) + log|det ∂f/∂y|`` at arbitrary points ``y: (N, D)``; shape (N,).

    Runs the flow forward (target → base); for planar and radial layers that is the numerical solve.
    """
    check_batch(y, "y", flow.dim, flow.dtype)
    z0, logdet = flow._forward(y)
    return base.log_prob(z0) + logdet


def sample(flow: Flow, n: int, rng: np.random.Generator, base: Base = BASE) -> tuple[np.ndarray, np.ndarray]:
    """``n`` draws ``z_K ~ q_K`` with their ``log q_K(z_K)``; shapes (n, D) and (n,)."""
    if int(n) < 1:
        raise ValueError(f"n must be a positive number of samples, got {n}")
    return push_to_target(flow, base.sample(int(n), flow.dim, as_generator(rng), flow.dtype or np.float64), base)


def free_energy(flow: Flow, energy: Energy, z0: np.ndarray, beta: float = 1.0, base: Base = BASE) -> float:
    """``F̂ = (1/N) Σ_n [log q₀(z₀⁽ⁿ⁾) − logdet⁽ⁿ⁾ + β U(z_K⁽ⁿ⁾)]`` for fixed base draws ``z0: (N, D)``."""
    z_k, log_q_k = push_to_target(flow, z0, base)
    value, _ = _evaluate_energy(energy, z_k)
    return float(np.mean(log_q_k + beta * value))


def free_energy_and_backward(flow: Flow, energy: Energy, z0: np.ndarray, beta: float = 1.0, base: Base = BASE) -> float:
    """:func:`free_energy` and its gradient, **added** to every parameter's ``grads``.

    One inverse pass of the flow on ``z0`` (:func:`push_to_target`) and its backward pass with
    ``d_z_K = β ∇U(z_K)/N`` and ``d_logdet = −1/N`` (module docstring).

    Returns
    -------
    float
        ``F̂`` at the current parameters.
    """
    z_k, log_q_k = push_to_target(flow, z0, base)
    value, grad = _evaluate_energy(energy, z_k)
    n = z0.shape[0]
    d_z_k = (grad * (beta / n)).astype(z0.dtype, copy=False)
    flow._backward(d_z_k, np.full(n, -1.0 / n, dtype=z0.dtype))  # log q₀(z₀) does not depend on θ
    return float(np.mean(log_q_k + beta * value))


def annealing_beta(step: int, anneal_steps: int | None, beta0: float = 0.01) -> float:
    """``β_t = min(1, β₀ + t/T)`` with ``T = anneal_steps``; always 1 when ``anneal_steps`` is None or 0."""
    if not anneal_steps:
        return 1.0
    return min(1.0, beta0 + step / anneal_steps)


@dataclass
class VIResult:
    """What :func:`fit_vi` did.

    Attributes
    ----------
    history : list of dict
        Every ``log_every`` steps: ``step``, ``beta``, ``free_energy`` (mean of the annealed ``F̂``
        over the steps since the previous entry), ``seconds``.
    steps : int
    seconds : float
        Wall-clock time of the optimisation loop.
    """

    history: list[dict] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else math.inf


def fit_vi(
    flow: Flow,
    energy: Energy,
    *,
    steps: int = 10000,
    batch_size: int = 500,
    optimizer: Optimizer | None = None,
    anneal_steps: int | None = 10000,
    beta0: float = 0.01,
    lr_schedule: str = "cosine",
    decay_start: int | None = None,
    clip_norm: float | None = None,
    seed: int = 0,
    log_every: int = 100,
    progress: bool = False,
    base: Base = BASE,
    comm: object = None,
) -> VIResult:
    """Minimise the free energy of ``q_K`` (``N(0, I)`` pushed by the flow's inverse) w.r.t. ``p̃ = exp(−U)``.

    Every step draws a fresh batch ``z₀ ~ N(0, I)`` and takes one optimizer step
    (:func:`nflow_np.train.train_step`) on :func:`free_energy_and_backward` with ``β = annealing_beta(step)``.

    Parameters
    ----------
    flow : Flow
        Trained in place, in its own dtype (float32 or float64).
    energy : callable
        ``energy(z) -> (U(z), ∇U(z))``, e.g. a :class:`~nflow_np.targets.Target`.
    steps : int
        Optimizer steps.
    batch_size : int
        Base draws per step (the paper's and the issue's 500 by default).
    optimizer : Optimizer, optional
        Default ``Adam(flow, lr=5e-3)``; the paper's is RMSprop (:class:`~nflow_np.optim.RMSprop`).
    anneal_steps : int or None
        ``T`` of the annealing schedule; ``None`` trains on ``U`` itself from the first step.
    beta0 : float
        ``β₀`` of the annealing schedule.
    lr_schedule : {"constant", "cosine"}
        ``cosine`` holds the learning rate until ``decay_start`` and then decays it to 0 at
        ``steps`` along a half cosine (:func:`nflow_np.train.cosine_lr`).
    decay_start : int, optional
        Step where the cosine decay begins; default: when annealing ends (``anneal_steps``, capped
        at ``steps``), so the learning rate is still high while the target changes.
    clip_norm : float, optional
        Clip the global gradient norm before each step.
    seed : int
        Seeds the base draws.
    log_every : int
        Steps between :attr:`VIResult.history` entries.
    progress : bool
        Show a tqdm bar (rank 0 only).
    base : StandardNormal or DiagonalNormal
        ``q₀``, fixed during training (default ``N(0, I)``, the paper's).
    comm : mpi4py communicator or "auto", optional
        Data-parallel over its ranks (:mod:`nflow_np.distributed`): every rank draws the same ``z₀``,
        computes its shard, and the gradients are summed in rank order before the same step on every rank.

    Returns
    -------
    VIResult

    Raises
    ------
    NonFiniteLossError
        A non-finite free energy or gradient; the flow keeps the parameters of the last good step.
    """
    if int(steps) < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
    if anneal_steps is not None and anneal_steps < 0:
        raise ValueError(f"anneal_steps must be non-negative or None, got {anneal_steps}")
    if decay_start is None:
        decay_start = min(anneal_steps or 0, steps)
    if not 0 <= decay_start <= steps:
        raise ValueError(f"decay_start must lie in [0, steps = {steps}], got {decay_start}")
    comm = distributed.resolve(comm)
    dtype = as_float_dtype(flow.dtype or np.float64)
    optimizer = Adam(flow, lr=5e-3) if optimizer is None else optimizer
    base_scale = optimizer.lr_scale
    rng = np.random.default_rng(seed)
    result = VIResult()
    running, count = 0.0, 0
    start = time.perf_counter()
    bar = tqdm(total=steps, disable=not (progress and distributed.is_root(comm)), desc="vi", unit="step", leave=False)
    try:
        with distributed.training(comm, flow, optimizer):  # a node's ranks share θ and divide the update
            for step in range(steps):
                beta = annealing_beta(step, anneal_steps, beta0)
                if lr_schedule == "cosine" and step >= decay_start:
                    optimizer.lr_scale = cosine_lr(base_scale, step - decay_start, steps - decay_start)
                z0 = base.sample(batch_size, flow.dim, rng, dtype)
                try:
                    free_energy_at_beta = partial(free_energy_and_backward, flow, energy, beta=beta, base=base)
                    sharded = partial(distributed.backward, comm, flow, loss_and_backward=free_energy_at_beta)
                    loss = train_step(flow, optimizer, z0, clip=clip_norm, loss_and_backward=sharded)
                except NonFiniteLossError as error:
                    if error.norm is None:
                        raise  # the target's own complaint, raised inside the loss
                    raise NonFiniteLossError(
                        f"non-finite free energy ({error.loss}) or gradient norm ({error.norm}) at step {step + 1}; "
                        "the flow holds the parameters of the previous step. Try a lower learning rate or gradient "
                        "clipping.",
                        error.loss, error.norm,
                    ) from None
                result.steps += 1
                running, count = running + loss, count + 1
                if result.steps % log_every == 0 or result.steps == steps:
                    result.history.append(
                        {
                            "step": result.steps,
                            "beta": beta,
                            "free_energy": running / count,
                            "seconds": time.perf_counter() - start,
                        }
                    )
                    running, count = 0.0, 0
                    bar.set_postfix(F=f"{result.history[-1]['free_energy']:.4f}", beta=f"{beta:.3f}", refresh=False)
                bar.update(1)
    finally:
        bar.close()
        optimizer.lr_scale = base_scale
    result.seconds = time.perf_counter() - start
    return result


@dataclass(frozen=True)
class KLEstimate:
    """Monte Carlo estimate of the free energy and of ``KL(q_K‖p) = F + log Z`` (nats).

    ``stderr`` is the standard error of both (they differ by the constant ``log Z``).
    """

    free_energy: float
    stderr: float
    kl: float | None
    samples: int


def estimate_kl(
    flow: Flow,
    energy: Energy,
    log_z: float | None = None,
    *,
    samples: int = 10000,
    rng: np.random.Generator | None = None,
    batch_size: int = 10000,
    base: Base = BASE,
) -> KLEstimate:
    """``F = E_q[log q_K(z) + U(z)]`` over ``samples`` fresh draws, its standard error, and ``F + log Z``.

    Parameters
    ----------
    flow, energy
        As in :func:`fit_vi`.
    log_z : float, optional
        ``log Z`` of the target; without it ``kl`` is ``None``.
    samples : int
        Number of draws ``z_K ~ q_K``.
    rng : numpy.random.Generator, optional
        Source of the draws (default: seeded 1); keep it apart from training's.
    batch_size : int
        Draws per pass, to bound memory.
    base : StandardNormal or DiagonalNormal
        The ``q₀`` the flow was trained from.
    """
    if int(samples) < 2:
        raise ValueError(f"samples must be at least 2 for a standard error, got {samples}")
    rng = as_generator(rng, 1)
    values = []
    for start in range(0, samples, batch_size):
        z_k, log_q_k = sample(flow, min(batch_size, samples - start), rng, base)
        value, _ = _evaluate_energy(energy, z_k)
        values.append(log_q_k.astype(np.float64) + value)
    values = np.concatenate(values)
    mean = float(values.mean())
    stderr = float(values.std(ddof=1) / np.sqrt(values.size))
    return KLEstimate(mean, stderr, None if log_z is None else mean + log_z, values.size)


FLOW_KINDS = ("planar", "radial", "affine", "additive")
"""Layer kinds :func:`make_vi_flow` stacks."""


def make_vi_flow(
    kind: str,
    dim: int,
    layers: int,
    *,
    rng: np.random.Generator | None = None,
    dtype: object = np.float64,
    hidden: Sequence[int] = (32, 32),
) -> Inverse:
    """A flow ``f = Inverse(Sequential([g_1 … g_K]))`` of ``layers`` layers of one kind, for :func:`fit_vi`.

    Its inverse, the sampling map ``f⁻¹ = g_K ∘ … ∘ g_1``, runs each layer's ``_forward`` (module
    docstring). ``planar`` and ``radial`` use their default initialisations; ``affine`` and
    ``additive`` are coupling layers with alternating parity (they need ``dim ≥ 2``) and tanh MLPs
    of widths ``hidden``. The layers are ``flow.flow.flows``; parameters are named ``flow.<k>.<name>``.
    """
    if kind not in FLOW_KINDS:
        raise ValueError(f"unknown flow kind {kind!r}; choose from {', '.join(FLOW_KINDS)}")
    if int(layers) < 1:
        raise ValueError(f"layers must be at least 1, got {layers}")
    rng = as_generator(rng, 0)
    if kind == "planar":
        flows = [Planar(dim, rng=rng, dtype=dtype) for _ in range(layers)]
    elif kind == "radial":
        flows = [Radial(dim, rng=rng, dtype=dtype) for _ in range(layers)]
    else:
        if dim < 2:
            raise ValueError(f"coupling layers need dim >= 2, got {dim}")
        layer = AffineCoupling if kind == "affine" else AdditiveCoupling
        flows = [
            layer(dim, parity=k % 2, hidden=hidden, rng=rng, activation="tanh", dtype=dtype) for k in range(layers)
        ]
    return Inverse(Sequential(flows))
