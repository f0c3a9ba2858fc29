"""The benchmark's RealNVP written in plain PyTorch: the yardstick for nflow_np's training step.

Imported only when PyTorch is installed (``import torch`` below raises ``ImportError`` otherwise, and
the suite leaves the PyTorch columns out). The model is the one ``build_model("realnvp", D, layers=K,
hidden=H)`` builds, written the way a PyTorch user would write it, with autograd for the backward pass:

- ``K`` affine couplings with alternating parity: layer ``k`` passes ``x₁ = x[:, p::2]`` through and
  transforms ``x₂ = x[:, 1−p::2]``, ``p = k mod 2`` (nflow_np's ``parity_mask``);
- the coupling net ``c: D₁ → H… → 2·D₂`` (ReLU), last layer zero-initialised, ``[ŝ, t] = c(x₁)``;
- ``s = a ⊙ tanh(ŝ)`` with a learned ``a`` initialised to 1; ``z₂ = x₂ ⊙ exp(s) + t``, ``logdet = Σ s``;
- standard normal base, ``log p(x) = Σ_i (−z_i²/2 − log(2π)/2) + Σ_k logdet_k``; Adam.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

VERSION = torch.__version__

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def mlp(sizes: Sequence[int], dtype: torch.dtype, zero_last: bool = True) -> nn.Sequential:
    """``Linear → ReLU → … → Linear`` with ``sizes = (D_in, H_1, …, D_out)``; last layer zeroed if asked."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out, dtype=dtype))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    if zero_last:
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
    return nn.Sequential(*layers)


class AffineCoupling(nn.Module):
    """``z₁ = x₁``, ``z₂ = x₂ ⊙ exp(a ⊙ tanh(ŝ)) + t``, ``[ŝ, t] = c(x₁)``; ``x: (N, D)``."""

    def __init__(self, dim: int, parity: int, hidden: Sequence[int], dtype: torch.dtype) -> None:
        super().__init__()
        self.parity = parity
        d1, d2 = len(range(parity, dim, 2)), len(range(1 - parity, dim, 2))
        self.net = mlp([d1, *hidden, 2 * d2], dtype)
        self.scale = nn.Parameter(torch.ones(d2, dtype=dtype))

    def _s_t(self, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s_hat, t = self.net(x1).chunk(2, dim=1)
        return self.scale * torch.tanh(s_hat), t

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, logdet)``, ``logdet: (N,)``."""
        p = self.parity
        x1, x2 = x[:, p::2], x[:, 1 - p :: 2]
        s, t = self._s_t(x1)
        z = torch.empty_like(x)
        z[:, p::2] = x1
        z[:, 1 - p :: 2] = x2 * torch.exp(s) + t
        return z, s.sum(dim=1)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """``x = f⁻¹(z)``: ``x₂ = (z₂ − t) ⊙ exp(−s)``."""
        p = self.parity
        z1, z2 = z[:, p::2], z[:, 1 - p :: 2]
        s, t = self._s_t(z1)
        x = torch.empty_like(z)
        x[:, p::2] = z1
        x[:, 1 - p :: 2] = (z2 - t) * torch.exp(-s)
        return x


class RealNVP(nn.Module):
    """``K`` affine couplings of alternating parity over a standard normal base."""

    def __init__(self, dim: int, layers: int, hidden: Sequence[int], dtype: torch.dtype) -> None:
        super().__init__()
        self.dim = dim
        self.couplings = nn.ModuleList([AffineCoupling(dim, k % 2, hidden, dtype) for k in range(layers)])

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` per row, ``(N,)``."""
        logdet = torch.zeros(x.shape[0], dtype=x.dtype)
        for coupling in self.couplings:
            x, layer_logdet = coupling(x)
            logdet = logdet + layer_logdet
        return -0.5 * (x * x).sum(dim=1) - 0.5 * self.dim * math.log(2 * math.pi) + logdet

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x = f⁻¹(z)``, ``z ~ N(0, I)``: ``(n, D)``."""
        x = torch.randn(n, self.dim, dtype=self.couplings[0].scale.dtype, generator=generator)
        for coupling in reversed(self.couplings):
            x = coupling.inverse(x)
        return x


def set_threads(n: int) -> int:
    """Use ``n`` intra-op threads; returns the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    return previous


def training_step(
    x: np.ndarray, dim: int, layers: int, hidden: Sequence[int], lr: float = 1e-3, seed: int = 0
) -> tuple[RealNVP, Callable[[], None]]:
    """A model and its training step ``zero_grad; loss = −mean log p(x); loss.backward(); Adam step``.

    Parameters
    ----------
    x : numpy.ndarray, shape (N, D)
        The batch (its dtype chooses the model's).
    dim, layers, hidden
        As :func:`nflow_np.architectures.build_model`.
    lr : float
        Adam's learning rate.
    seed : int
        Seeds the initialisation.

    Returns
    -------
    (RealNVP, callable)
    """
    torch.manual_seed(seed)
    model = RealNVP(dim, layers, hidden, _DTYPES[str(x.dtype)])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batch = torch.from_numpy(x)

    def step() -> None:
        optimizer.zero_grad()
        loss = -model.log_prob(batch).mean()
        loss.backward()
        optimizer.step()

    return model, step


def inference_calls(model: RealNVP, x: np.ndarray, seed: int = 0) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(log_prob, sample)`` calls on a batch the size of ``x``, without autograd's bookkeeping."""
    batch = torch.from_numpy(x)
    generator = torch.Generator().manual_seed(seed)

    def log_prob() -> None:
        with torch.inference_mode():
            model.log_prob(batch)

    def sample() -> None:
        with torch.inference_mode():
            model.sample(batch.shape[0], generator)

    return log_prob, sample


def mlp_step(x: np.ndarray, d_y: np.ndarray, sizes: Sequence[int]) -> Callable[[], None]:
    """Forward and backward of an MLP (``x`` requires a gradient, so the input-gradient GEMMs run too)."""
    torch.manual_seed(0)
    net = mlp(sizes, _DTYPES[str(x.dtype)], zero_last=False)
    batch = torch.from_numpy(x).requires_grad_(True)
    d_out = torch.from_numpy(d_y)

    def step() -> None:
        net(batch).backward(d_out)

    return step


# -- the coupling law alone, for the kernels section ---------------------------------------------------------------
def _affine_forward(x2: torch.Tensor, h: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``z₂ = x₂ ⊙ exp(s) + t``, ``logdet = Σ s``, ``s = a ⊙ tanh(ŝ)``: what ``torch.compile`` is given."""
    d2 = x2.shape[1]
    s = a * torch.tanh(h[:, :d2])
    return x2 * torch.exp(s) + h[:, d2:], s.sum(dim=1)


def _affine_backward(
    x2: torch.Tensor, h: torch.Tensor, a: torch.Tensor, d_z2: torch.Tensor, d_logdet: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``∂L/∂x₂``, ``∂L/∂h = [∂L/∂ŝ, ∂L/∂t]``, ``∂L/∂a``, written out (no autograd), as the kernels compute them."""
    d2 = x2.shape[1]
    g = torch.tanh(h[:, :d2])
    d_x2 = d_z2 * torch.exp(a * g)
    d_s = d_x2 * x2 + d_logdet[:, None]
    d_h = torch.cat([d_s * a * (1 - g * g), d_z2], dim=1)
    return d_x2, d_h, (d_s * g).sum(dim=0)


def coupling_law_calls(arrays: dict[str, np.ndarray], compiled: bool) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(forward, backward)`` calls of the affine law on the benchmark's inputs.

    ``compiled=False``: PyTorch's eager ops writing into buffers allocated once (``out=`` and in-place
    ops: no allocation in the timed call), the fastest way to write it without a compiler.
    ``compiled=True``: the same maths through ``torch.compile`` (Inductor's generated C++ loops), fresh
    outputs each call as the compiled graph returns them. Compilation happens at the warm-up call.
    """
    t = {name: torch.from_numpy(value) for name, value in arrays.items()}
    x2, h, a, d_z2, d_logdet = t["x2"], t["h"], t["scale"], t["d_z2"], t["d_logdet"]
    if compiled:
        forward_graph, backward_graph = torch.compile(_affine_forward), torch.compile(_affine_backward)
        return (lambda: forward_graph(x2, h, a)), (lambda: backward_graph(x2, h, a, d_z2, d_logdet))
    n, d2 = x2.shape
    s_hat, shift = h[:, :d2], h[:, d2:]
    s, z2, logdet = torch.empty_like(x2), torch.empty_like(x2), torch.empty(n, dtype=x2.dtype)
    g, d_x2, d_s = torch.empty_like(x2), torch.empty_like(x2), torch.empty_like(x2)
    d_h, d_a = torch.empty_like(h), torch.empty(d2, dtype=x2.dtype)

    def forward() -> None:
        torch.tanh(s_hat, out=s)
        s.mul_(a)
        torch.sum(s, dim=1, out=logdet)
        torch.exp(s, out=z2)
        z2.mul_(x2).add_(shift)

    def backward() -> None:
        torch.tanh(s_hat, out=g)
        torch.mul(g, a, out=d_s)
        torch.exp(d_s, out=d_x2)
        d_x2.mul_(d_z2)  # ∂L/∂x₂ = ∂L/∂z₂ ⊙ exp(s)
        torch.mul(d_x2, x2, out=d_s)
        d_s.add_(d_logdet[:, None])  # ∂L/∂s
        torch.sum(torch.mul(d_s, g, out=s), dim=0, out=d_a)
        torch.mul(g, g, out=s)
        torch.mul(d_s, a, out=d_h[:, :d2]).mul_(s.neg_().add_(1))  # ∂L/∂ŝ = ∂L/∂s ⊙ a ⊙ (1 − g²)
        d_h[:, d2:].copy_(d_z2)  # ∂L/∂t

    return forward, backward


# -- NICE on MNIST, for the nice-mnist row ---------------------------------------------------------------------------
class NICE(nn.Module):
    """``build_nice((1, 28, 28), 256, couplings=K, hidden=H)`` in PyTorch (Dinh et al. 2014).

    Dequantise ``x + u``, ``u ~ U[0, 1)``, scale by ``1/256``; ``K`` additive couplings
    ``z₂ = x₂ + c(x₁)`` with alternating parity (``x₁ = x[:, p::2]``), ReLU nets with a zeroed last
    layer; the diagonal rescaling ``z = x ⊙ exp(σ)``; a standard logistic prior
    ``log p(z) = −Σ (|z| + 2 log(1 + e^{−|z|}))``. ``log p(x) = log p(z) + Σ σ − D log 256``.
    """

    def __init__(self, dim: int, couplings: int, hidden: Sequence[int], dtype: torch.dtype) -> None:
        super().__init__()
        self.dim = dim
        halves = [(len(range(k % 2, dim, 2)), len(range(1 - k % 2, dim, 2))) for k in range(couplings)]
        self.nets = nn.ModuleList([mlp([d1, *hidden, d2], dtype) for d1, d2 in halves])
        self.log_scale = nn.Parameter(torch.zeros(dim, dtype=dtype))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` per row of integer-valued images ``x: (N, D)`` (dequantised here)."""
        x = (x + torch.rand_like(x)) / 256.0
        for k, net in enumerate(self.nets):
            p = k % 2
            x1, x2 = x[:, p::2], x[:, 1 - p :: 2]
            z = torch.empty_like(x)
            z[:, p::2] = x1
            z[:, 1 - p :: 2] = x2 + net(x1)
            x = z
        z = x * torch.exp(self.log_scale)
        a = z.abs()
        prior = -(a + 2 * torch.log1p(torch.exp(-a))).sum(dim=1)
        return prior + self.log_scale.sum() - self.dim * math.log(256.0)


def nice_training_step(
    x: np.ndarray, couplings: int, hidden: Sequence[int], lr: float = 1e-3, seed: int = 0
) -> tuple[NICE, Callable[[np.ndarray], None]]:
    """A NICE model and its step ``step(batch)``: ``−mean log p(batch)``, backward, Adam (``x`` sets D and dtype)."""
    torch.manual_seed(seed)
    model = NICE(x.shape[1], couplings, hidden, _DTYPES[str(x.dtype)])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def step(batch: np.ndarray) -> None:
        optimizer.zero_grad()
        loss = -model.log_prob(torch.from_numpy(batch)).mean()
        loss.backward()
        optimizer.step()

    return model, step
