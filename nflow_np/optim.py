"""Optimizers written by hand: SGD with momentum, Adam(W), RMSprop; weight decay, global-norm clipping.

They walk :meth:`nflow_np.module.Module.trainable_parameters` (frozen parameters and buffers are
never touched) and update the parameter arrays in place, so they work for any module. Their state
(step count and moment estimates, keyed by the parameters' qualified names) is a flat
``dict[str, numpy.ndarray]`` that ``numpy.savez`` can store.

**Parameter groups**: ``groups=[{"params": ["flow.0.*"], "lr": 1e-4, "weight_decay": 0.0}, ...]``
gives the parameters whose qualified names match a group's shell-style patterns that group's
learning rate and weight decay; every other parameter is in the default group, with the
constructor's ``lr`` and ``weight_decay``. A schedule sets :attr:`Optimizer.lr_scale`, which
multiplies every group's rate, so a cosine decay keeps the ratios between groups. Derivations:
``docs/training.md``.

Length: about 450 lines: four optimizers (SGD, Adam, AdamW, RMSprop), their parameter groups,
gradient clipping and the step divided between processes (:attr:`Optimizer.partition`), each update
with its derivation beside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

import numpy as np

from nflow_np import backend, threads
from nflow_np.backend import array_module, to_host
from nflow_np.module import Module


def global_grad_norm(module: Module) -> float:
    """``‖g‖₂`` over all gradients of the trainable (not frozen) parameters of ``module`` taken together."""
    total = 0.0
    for _, _, grad in module.trainable_parameters():
        total += float(np.vdot(grad, grad))
    return float(np.sqrt(total))


def clip_grad_norm(module: Module, max_norm: float) -> float:
    """Rescale all gradients in place so their global norm is at most ``max_norm``.

    ``g ← g · min(1, max_norm / ‖g‖)``: the direction of the step is kept, only its length is
    capped. Frozen parameters are left out (their gradients are not used). Returns the norm before clipping.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    norm = global_grad_norm(module)
    if norm > max_norm:
        factor = max_norm / norm
        for _, _, grad in module.trainable_parameters():
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

    Each line is rounded to the parameters' dtype in this order; ``kernels/adam/numba_cpu.py`` does the
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


def rmsprop_update(
    param: np.ndarray,
    grad: np.ndarray,
    mean_square: np.ndarray,
    velocity: np.ndarray,
    *,
    lr: float,
    alpha: float,
    eps: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """One RMSprop update of ``param``, ``mean_square`` and ``velocity`` in place (``docs/training.md#rmsprop``).

    ``g ← g + λθ``;  ``s ← αs + (1 − α)g²``;  ``b ← μb + g / (√s + ε)``;  ``θ ← θ − η b``
    (``μ = 0``: ``θ ← θ − η g / (√s + ε)``; ``velocity`` is then left at zero).

    Parameters
    ----------
    param, grad, mean_square, velocity : arrays of one shape and dtype
    lr, alpha, eps, momentum, weight_decay : float
        ``η``, ``α``, ``ε``, ``μ``, ``λ``.
    """
    g = grad + param.dtype.type(weight_decay) * param if weight_decay else grad
    mean_square *= alpha
    mean_square += (1 - alpha) * (g * g)
    direction = g / (np.sqrt(mean_square) + eps)
    if momentum:
        velocity *= momentum
        velocity += direction
        direction = velocity
    param -= param.dtype.type(lr) * direction


class Optimizer:
    """Common state handling: parameter groups, the step counter, per-parameter buffers, save and restore.

    Parameters
    ----------
    module : Module
    lr : float
        Learning rate of the default group.
    weight_decay : float
        Weight decay of the default group.
    groups : sequence of mapping, optional
        ``{"params": pattern or patterns, "lr": float, "weight_decay": float}`` (``lr`` and
        ``weight_decay`` optional: the default group's). Patterns are shell-style over qualified
        parameter names (``"flow.0.*"``, ``"*.scale"``); each must match a parameter, and no
        parameter may be in two groups.

    Attributes
    ----------
    groups : list of dict
        ``{"params": patterns, "names": qualified names, "lr", "weight_decay"}``; ``groups[0]`` is the
        default group (the parameters no other group takes).
    lr_scale : float
        Factor on every group's learning rate, set by a schedule (1: none).
    """

    _buffers: tuple[str, ...] = ()

    def __init__(
        self, module: Module, lr: float, weight_decay: float, groups: Sequence[Mapping] | None = None
    ) -> None:
        self.module = module
        names = [name for name, _, _ in module.named_parameters()]
        self.groups = [{"params": ("*",), "names": [], "lr": float(lr), "weight_decay": float(weight_decay)}]
        self.groups += [_group(spec, names, lr, weight_decay, k + 1) for k, spec in enumerate(groups or ())]
        for group in self.groups:
            if not group["lr"] > 0:
                raise ValueError(f"learning rate must be positive, got {group['lr']}")
            if group["weight_decay"] < 0:
                raise ValueError(f"weight_decay must be non-negative, got {group['weight_decay']}")
        owner: dict[str, int] = {}
        for k, group in enumerate(self.groups[1:], 1):
            for name in group["names"]:
                if name in owner:
                    raise ValueError(f"parameter {name!r} is in groups {owner[name]} and {k}")
                owner[name] = k
        self.groups[0]["names"] = [name for name in names if name not in owner]
        self.lr_scale = 1.0
        self.step_count = 0
        self.partition: Any = None
        """``None`` (every element), or, while :func:`nflow_np.distributed.training` shares the step between
        processes, an object with ``slices`` (``{name: slice}`` of the flattened parameters this process
        updates) and ``done()`` (run after the update)."""
        self.state: dict[str, dict[str, np.ndarray]] = {
            buffer: {name: np.zeros_like(value) for name, value, _ in module.named_parameters()}
            for buffer in self._buffers
        }

    @property
    def lr(self) -> float:
        """The default group's learning rate (what the constructor's ``lr`` set)."""
        return self.groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self.groups[0]["lr"] = float(value)

    @property
    def weight_decay(self) -> float:
        """The default group's weight decay."""
        return self.groups[0]["weight_decay"]

    def step(self) -> None:
        """Apply one update using the gradients currently in ``grads`` (frozen parameters skipped).

        With a :attr:`partition` only the elements it names are updated (every update is elementwise,
        so each element gets the bits the whole update gives it), then ``partition.done()`` runs.
        """
        self.step_count += 1
        trainable = {name: (param, grad) for name, param, grad in self.module.trainable_parameters()}
        part = self.partition
        with threads.compute("train"):  # thread plan and flush-to-zero (Adam's moments underflow)
            for group in self.groups:
                lr = group["lr"] * self.lr_scale
                for name in group["names"]:
                    if name in trainable and (part is None or name in part.slices):
                        param, grad = trainable[name]
                        state = {buffer: arrays[name] for buffer, arrays in self.state.items()}
                        if part is not None:  # this process's elements: flat views of contiguous arrays
                            where = part.slices[name]
                            param, grad = param.reshape(-1)[where], grad.reshape(-1)[where]
                            state = {buffer: value.reshape(-1)[where] for buffer, value in state.items()}
                        self._update(param, grad, state, lr, group["weight_decay"])
        if part is not None:
            part.done()

    def _update(
        self, param: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray], lr: float, weight_decay: float
    ) -> None:
        """Update ``param`` and its ``state`` arrays (``{buffer: array}``, shaped like it) in place."""
        raise NotImplementedError

    def group_config(self) -> list[dict]:
        """The groups other than the default one, JSON-ready: ``params`` (patterns), ``lr``, ``weight_decay``."""
        return [{key: list(g[key]) if key == "params" else g[key] for key in ("params", "lr", "weight_decay")}
                for g in self.groups[1:]]

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat copy of the state: ``"step"``, ``"lr"`` and ``"<buffer>/<parameter name>"`` arrays."""
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


def _group(spec: Mapping, names: list[str], lr: float, weight_decay: float, index: int) -> dict:
    """Check one entry of ``groups`` and resolve its patterns to the parameter names they match."""
    unknown = sorted(set(spec) - {"params", "lr", "weight_decay"})
    if unknown or "params" not in spec:
        raise ValueError(f"group {index} must have 'params' and may have 'lr', 'weight_decay'; got {sorted(spec)}")
    patterns = (spec["params"],) if isinstance(spec["params"], str) else tuple(spec["params"])
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"group {index}: params must be a name pattern or a list of them, got {spec['params']!r}")
    unmatched = [p for p in patterns if not any(fnmatchcase(name, p) for name in names)]
    if unmatched:
        raise ValueError(f"group {index}: no parameter matches {unmatched}; parameters: {names}")
    return {
        "params": patterns,
        "names": [name for name in names if any(fnmatchcase(name, p) for p in patterns)],
        "lr": float(spec.get("lr", lr)),
        "weight_decay": float(spec.get("weight_decay", weight_decay)),
    }


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
    groups : sequence of mapping, optional
        Parameter groups with their own ``lr`` / ``weight_decay`` (:class:`Optimizer`).
    """

    _buffers = ("velocity",)

    def __init__(
        self,
        module: Module,
        lr: float = 1e-2,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        groups: Sequence[Mapping] | None = None,
    ) -> None:
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        super().__init__(module, lr, weight_decay, groups)

    def _update(
        self, param: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray], lr: float, weight_decay: float
    ) -> None:
        g = grad + weight_decay * param if weight_decay else grad
        velocity = state["velocity"]
        velocity *= self.momentum
        velocity += g
        param -= param.dtype.type(lr) * velocity


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
    groups : sequence of mapping, optional
        Parameter groups with their own ``lr`` / ``weight_decay`` (:class:`Optimizer`).
    """

    _buffers = ("m", "v")

    def __init__(
        self,
        module: Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        groups: Sequence[Mapping] | None = None,
    ) -> None:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)
        super().__init__(module, lr, weight_decay, groups)

    def _update(
        self, param: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray], lr: float, weight_decay: float
    ) -> None:
        t = self.step_count
        backend.fused("adam_update", adam_update)(
            param,
            grad,
            state["m"],
            state["v"],
            beta1=self.beta1,
            beta2=self.beta2,
            eps=self.eps,
            step_size=lr / (1 - self.beta1**t),
            bias2=1 - self.beta2**t,
            decay=1 - lr * weight_decay,
        )


class RMSprop(Optimizer):
    """RMSprop (Tieleman & Hinton 2012), the optimiser of Rezende & Mohamed's VI paper; optional momentum.

    Each coordinate's step is divided by a running root mean square of its gradients
    (``docs/training.md#rmsprop`` derives it):
    ``g ← g + λθ``;  ``s ← αs + (1 − α)g²``;  ``b ← μb + g / (√s + ε)``;  ``θ ← θ − η b``.
    With ``μ = 0``: ``θ ← θ − η g / (√s + ε)``. No bias correction: ``s`` starts at 0, so the first
    steps are larger than ``η`` (by ``1/√(1 − α)`` at the first), as in the original and in PyTorch.

    Parameters
    ----------
    module : Module
    lr : float
        ``η``.
    alpha : float
        ``α`` in [0, 1): decay of the running mean of ``g²``.
    eps : float
        ``ε > 0``, added to ``√s``.
    momentum : float
        ``μ`` in [0, 1).
    weight_decay : float
        ``λ ≥ 0``, L2 (added to the gradient, as in SGD).
    groups : sequence of mapping, optional
        Parameter groups with their own ``lr`` / ``weight_decay`` (:class:`Optimizer`).
    """

    _buffers = ("mean_square", "velocity")

    def __init__(
        self,
        module: Module,
        lr: float = 1e-3,
        alpha: float = 0.99,
        eps: float = 1e-8,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        groups: Sequence[Mapping] | None = None,
    ) -> None:
        if not 0 <= alpha < 1:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.alpha, self.eps, self.momentum = float(alpha), float(eps), float(momentum)
        super().__init__(module, lr, weight_decay, groups)

    def _update(
        self, param: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray], lr: float, weight_decay: float
    ) -> None:
        rmsprop_update(
            param,
            grad,
            state["mean_square"],
            state["velocity"],
            lr=lr,
            alpha=self.alpha,
            eps=self.eps,
            momentum=self.momentum,
            weight_decay=weight_decay,
        )
