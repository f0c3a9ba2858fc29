"""Do float32 subnormals cost time here? A NICE training step on normal vs subnormal-range numbers.

float32's smallest normal number is ``2⁻¹²⁶ ≈ 1.18e-38``; below it, down to ``1.4e-45``, lie the
subnormals, which many x86 cores handle with a slow microcode assist unless the FTZ/DAZ flags of
MXCSR flush them to zero (NumPy leaves those flags alone; some libraries built with ``-ffast-math``
set them when loaded). Variants of one float32 step of ``build_model("nice", 64, layers=8,
hidden=(256, 256))`` (:func:`nflow_np.train.train_step`: zero_grad, nll_and_backward, gradient norm,
Adam step), every parameter first moved off its initial value (N(0, 0.01) added) so no net is exactly zero:

- ``normal``: ``x ~ N(0, 1)``;
- ``subnormal data``: the same ``x`` times ``1e-39`` (each net's first GEMM and its weight gradient
  see subnormal inputs);
- ``subnormal weights``: every coupling net's ``W`` and ``b`` times ``1e-39``, so every hidden
  activation and most products of the step are subnormal;
- ``subnormal Adam moments``: Adam's first and second moments all in the subnormal range (the state a
  long run reaches for parameters whose gradients have died out), so the update reads and writes them.

Each variant runs twice: in the ``library`` mode, as nflow_np runs its compute (FTZ/DAZ on every thread
the call uses, :mod:`nflow_np.fpmode`), and ``off`` (``set_flush_denormals(False)``, the IEEE default):
the ratio of each to its own normal case is the figure (target ≤ 1.05 in the library mode). The
micro-figures run inside :func:`nflow_np.threads.compute` in the library mode.

Parameters and the optimizer's state are restored before every timed step (outside the clock), so
every repetition sees the same numbers, and the variants are timed in turn, repetition by
repetition, so that the machine's load drifts across all of them alike. Two micro-figures isolate
where a cost would come from: a GEMM with a subnormal left operand, and an elementwise multiply.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from nflow_np import fpmode, gemm, threads
from nflow_np.architectures import build_model
from nflow_np.optim import Adam
from nflow_np.train import train_step

from .sections import Settings, figure

MODES = {"library": True, "off": False}
"""The two flush settings every case runs under: nflow_np's (FTZ/DAZ on) and the IEEE default."""

SCALE = np.float32(1e-39)
TINY = np.finfo(np.float32).tiny


def subnormal_fraction(arrays: list[np.ndarray]) -> float:
    """Share of the nonzero elements of ``arrays`` that are subnormal."""
    nonzero = sum(int(np.count_nonzero(a)) for a in arrays)
    subnormal = sum(int(np.count_nonzero((a != 0) & (np.abs(a) < TINY))) for a in arrays)
    return subnormal / max(nonzero, 1)


def flush_flags() -> dict[str, bool]:
    """Whether the CPU flushes subnormal inputs (DAZ) or outputs (FTZ) to zero in this process right now."""
    one = np.ones(1, np.float32)
    return {
        "daz": bool((np.full(1, 1e-39, np.float32) * one)[0] == 0),
        "ftz": bool((np.full(1, 1e-38, np.float32) * np.float32(0.5) * one)[0] == 0),
    }


def interleaved(calls: dict[str, Callable[[], None]], repeats: int, before: dict[str, Callable[[], None]]) -> dict:
    """Seconds per call of each of ``calls``, timed in turn; ``before[name]`` runs untimed before each call."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for repeat in range(repeats + 1):
        for name, call in calls.items():
            before[name]()
            t0 = time.perf_counter()
            call()
            elapsed = time.perf_counter() - t0
            if repeat:  # the first round is the warm-up
                times[name].append(elapsed)
    return {name: np.array(values) for name, values in times.items()}


def nice_step_variants(s: Settings) -> dict:
    """Time the four variants of the float32 NICE training step in both modes (module doc)."""
    rng = np.random.default_rng(s.seed)
    model = build_model("nice", s.dim, layers=s.layers, hidden=s.hidden, dtype=np.float32, seed=s.seed)
    for _, param, _ in model.named_parameters():
        param += rng.normal(0.0, 0.01, size=param.shape).astype(np.float32)
    optimizer = Adam(model, lr=s.lr)
    x = rng.standard_normal((s.batch, s.dim)).astype(np.float32)
    variants = ("normal", "subnormal data", "subnormal weights", "subnormal Adam moments")
    data = dict.fromkeys(variants, x) | {"subnormal data": x * SCALE}
    params = {name: param.copy() for name, param, _ in model.named_parameters()}
    tiny_params = {name: value * SCALE if ".net." in f".{name}" else value for name, value in params.items()}
    weights = dict.fromkeys(variants, params) | {"subnormal weights": tiny_params}
    for _ in range(2):  # two steps, so the state holds moments of the right shapes and signs
        train_step(model, optimizer, x)
    normal_state = optimizer.state_dict()
    tiny_state = {key: value * SCALE if "/" in key else value for key, value in normal_state.items()}
    states = dict.fromkeys(variants, normal_state) | {"subnormal Adam moments": tiny_state}

    def restore(variant: str) -> Callable[[], None]:
        def call() -> None:
            for name, param, _ in model.named_parameters():
                np.copyto(param, weights[variant][name])
            optimizer.load_state_dict(states[variant])

        return call

    def step(variant: str, flush: bool) -> Callable[[], None]:
        def call() -> None:
            fpmode.set_flush_denormals(flush)
            try:
                train_step(model, optimizer, data[variant])
            finally:
                fpmode.set_flush_denormals(True)

        return call

    calls = {(v, m): step(v, flush) for v in variants for m, flush in MODES.items()}
    times = interleaved(calls, s.repeats, {key: restore(key[0]) for key in calls})
    rows = []
    for variant, mode in calls:
        nets = [value for name, value in weights[variant].items() if ".net." in f".{name}"]
        moments = [value for key, value in states[variant].items() if "/" in key]
        rows.append({"case": f"NICE step: {variant}", "mode": mode, "ms": figure(1e3 * times[variant, mode]),
                     "subnormal_share_of_data": subnormal_fraction([data[variant]]),
                     "subnormal_share_of_net_weights": subnormal_fraction(nets),
                     "subnormal_share_of_adam_moments": subnormal_fraction(moments),
                     "slowdown": float(np.median(times[variant, mode]) / np.median(times["normal", mode]))})
    return {"model": {"kind": "nice", "dim": s.dim, "layers": s.layers, "hidden": list(s.hidden),
                      "batch": s.batch, "dtype": "float32"}, "rows": rows}


def in_mode(call: Callable[[], object], flush: bool) -> Callable[[], None]:
    """``call`` as library compute (thread plan and flush mode) in the ``library`` mode, plain ``off``."""
    def wrapped() -> None:
        if not flush:
            call()
            return
        with threads.compute("train"):
            call()

    return wrapped


def micro(s: Settings) -> list[dict]:
    """A ``(512, 256) × (256, 256)`` GEMM and a 2²⁰-element multiply, each on normal vs subnormal operands."""
    rng = np.random.default_rng(s.seed)
    a = rng.standard_normal((512, 256)).astype(np.float32)
    b = rng.standard_normal((256, 256)).astype(np.float32)
    gemm_out = np.empty((512, 256), np.float32)
    v = rng.standard_normal(2**20).astype(np.float32)
    mul_out = np.empty_like(v)
    tiny_a, tiny_v = a * SCALE, v * SCALE
    plain = {
        "GEMM (512×256)·(256×256): normal": lambda: gemm.gemm(a, b, gemm_out, 0.0),  # the library's GEMM engine
        "GEMM (512×256)·(256×256): subnormal left operand": lambda: gemm.gemm(tiny_a, b, gemm_out, 0.0),
        "multiply 2^20 elements by 0.5: normal": lambda: np.multiply(v, np.float32(0.5), out=mul_out),
        "multiply 2^20 elements by 0.5: subnormal": lambda: np.multiply(tiny_v, np.float32(0.5), out=mul_out),
    }
    calls = {(name, mode): in_mode(call, flush) for name, call in plain.items() for mode, flush in MODES.items()}
    times = interleaved(calls, 5 * s.repeats, {key: lambda: None for key in calls})
    names = list(plain)
    rows = []
    for i, name in enumerate(names):
        baseline = names[i - i % 2]
        for mode in MODES:
            rows.append({"case": name, "mode": mode, "ms": figure(1e3 * times[name, mode]),
                         "slowdown": float(np.median(times[name, mode]) / np.median(times[baseline, mode]))})
    return rows


def subnormal(s: Settings) -> dict:
    """The NICE step variants and the micro-figures in both modes, with the FTZ/DAZ state outside and inside."""
    result = nice_step_variants(s)
    result["rows"] += micro(s)
    result["flush_flags"] = flush_flags()
    with threads.compute("train"):
        result["library_flush_flags"] = flush_flags()
    result["fpmode"] = fpmode.status()
    return result
