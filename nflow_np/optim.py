"""Optimizers written by hand: SGD with momentum and Adam, weight decay, global-norm clipping.

They walk :meth:`nflow_np.module.Module.named_parameters` and update the parameter arrays in
place, so they work for any module. Their state (step count and moment estimates, keyed by the
parameters' qualified names) is a flat ``dict[str, numpy.ndarray]`` that ``numpy.savez`` can store.
"""

from __future__ import annotations

import numpy as np

from nflow_np import backend, threads
from nflow_np.backend import array_module, to_host
from nflow_np.module import Module


def global_grad_norm(module: Module) -> float:
    """``‖g‖₂`` over all gradients of ``module`` taken together."""
    total = 0.0
    for _, _, grad in module.named_parameters():
        total += float(np.vdot(grad, grad))
    return float(np.sqrt(total))


def clip_grad_norm(module: Module, max_norm: float) -> float:
    """Rescale all gradients in place so their global norm is at most ``max_norm``.

    ``g ← g · min(1, max_norm / ‖g‖)``: the direction of the step is kept, only its length is
    capped. Returns the norm before clipping.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    norm = global_grad_norm(module)
    if norm > max_norm:
        factor = max_norm / norm
        for _, _, grad in module.named_parameters():
            grad *= grad.dtype.type(factor)
    return norm


def adam_update(
    param: np.ndarray,
    grad: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    step_size: float,
    bias2: float,
    decay: float,
) -> None:
    """One Adam update of ``param``, ``m`` and ``v`` in place: the reference the fused kernels match.

    ``θ ← θ · decay``;  ``m ← β₁m + (1 − β₁)g``;  ``v ← β₂v + (1 − β₂)g²``;
    ``θ ← θ − η̂ · m / (√(v / b₂) + ε)``, with ``η̂ = η / (1 − β₁ᵗ)`` and ``b₂ = 1 − β₂ᵗ`` the bias
    corrections (dividing ``m`` by ``1 − β₁ᵗ`` is folded into the step size).

    Each line is rounded to the parameters' dtype in this order; ``kernels.numba_optim`` does the
    same operations in one pass and gives the same bits.

    Parameters
    ----------
    param, grad, m, v : arrays of one shape and dtype
    beta1, beta2, eps : float
    step_size : float
        ``η / (1 − β₁ᵗ)``.
    bias2 : float
        ``1 − β₂ᵗ``.
    decay : float
        ``1 − ηλ`` for decoupled weight decay, ``1.0`` for none.
    """
    if decay != 1.0:
        param *= param.dtype.type(decay)
    m *= beta1
    m += (1 - beta1) * grad
    v *= beta2
    v += (1 - beta2) * (grad * grad)
    denominator = np.sqrt(v / bias2)
    denominator += eps
    param -= param.dtype.type(step_size) * (m / denominator)


class Optimizer:
    """Common state handling: the step counter, per-parameter buffers, save and restore."""

    _buffers: tuple[str, ...] = ()

    def __init__(self, module: Module, lr: float, weight_decay: float) -> None:
        if not lr > 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay}")
        self.module = module
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.step_count = 0
        self.state: dict[str, dict[str, np.ndarray]] = {
            buffer: {name: np.zeros_like(value) for name, value, _ in module.named_parameters()}
            for buffer in self._buffers
        }

    def step(self) -> None:
        """Apply one update using the gradients currently in ``grads``."""
        self.step_count += 1
        with threads.compute("train"):  # thread plan and flush-to-zero (Adam's moments underflow)
            for name, param, grad in self.module.named_parameters():
                self._update(name, param, grad)

    def _update(self, name: str, param: np.ndarray, grad: np.ndarray) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat copy of the state: ``"step"`` and ``"<buffer>/<parameter name>"`` arrays."""
        flat = {"step": np.array(self.step_count, dtype=np.int64), "lr": np.array(self.lr)}
        for buffer, arrays in self.state.items():
            for name, value in arrays.items():
                flat[f"{buffer}/{name}"] = to_host(value, copy=True)
        return flat

    def load_state_dict(self, flat: dict[str, np.ndarray]) -> None:
        """Restore a state saved by :meth:`state_dict`; checks every key and shape before writing."""
        expected = {"step", "lr"} | {f"{b}/{n}" for b, arrays in self.state.items() for n in arrays}
        if set(flat) != expected:
            missing, unexpected = sorted(expected - set(flat)), sorted(set(flat) - expected)
            raise ValueError(f"optimizer state does not match: missing {missing}, unexpected {unexpected}")
        for buffer, arrays in self.state.items():
            for name, value in arrays.items():
                if np.shape(flat[f"{buffer}/{name}"]) != value.shape:
                    raise ValueError(f"optimizer state {buffer}/{name} has the wrong shape")
        self.step_count = int(flat["step"])
        self.lr = float(flat["lr"])
        for buffer, arrays in self.state.items():
            for name, value in arrays.items():
                value[...] = array_module(value).asarray(flat[f"{buffer}/{name}"])


class SGD(Optimizer):
    """SGD with (heavy-ball) momentum and L2 weight decay.

    ``g ← g + λθ``;  ``v ← μv + g``;  ``θ ← θ − η v``  (``μ = 0`` is plain SGD).

    Parameters
    ----------
    module : Module
    lr : float
        ``η``.
    momentum : float
        ``μ`` in [0, 1).
    weight_decay : float
        ``λ ≥ 0``.
    """

    _buffers = ("velocity",)

    def __init__(self, module: Module, lr: float = 1e-2, momentum: float = 0.9, weight_decay: float = 0.0) -> None:
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        super().__init__(module, lr, weight_decay)

    def _update(self, name: str, param: np.ndarray, grad: np.ndarray) -> None:
        g = grad + self.weight_decay * param if self.weight_decay else grad
        velocity = self.state["velocity"][name]
        velocity *= self.momentum
        velocity += g
        param -= param.dtype.type(self.lr) * velocity


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015) with decoupled weight decay (AdamW, Loshchilov & Hutter 2019).

    With ``t`` the step count:
    ``m ← β₁m + (1 − β₁)g``;  ``v ← β₂v + (1 − β₂)g²``;
    ``θ ← θ − η (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε) − ηλθ``.
    The decay acts on ``θ`` directly rather than through ``g``, so it is not rescaled by ``√v``.

    Parameters
    ----------
    module : Module
    lr : float
        ``η``.
    betas : tuple of float
        ``(β₁, β₂)``, each in [0, 1).
    eps : float
        ``ε``, keeps the step finite where ``v ≈ 0``.
    weight_decay : float
        ``λ ≥ 0``.
    """

    _buffers = ("m", "v")

    def __init__(
        self,
        module: Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)
        super().__init__(module, lr, weight_decay)

    def _update(self, name: str, param: np.ndarray, grad: np.ndarray) -> None:
        t = self.step_count
        backend.fused("adam_update", adam_update)(
            param,
            grad,
            self.state["m"][name],
            self.state["v"][name],
            beta1=self.beta1,
            beta2=self.beta2,
            eps=self.eps,
            step_size=self.lr / (1 - self.beta1**t),
            bias2=1 - self.beta2**t,
            decay=1 - self.lr * self.weight_decay,
        )
