"""The convolutional coupling net's forward + backward: GFLOP/s beside the GEMM peak, and PyTorch's same net.

    python -m benchmarks.bench_conv                       # batch 64, 64 channels, 4 blocks, float32
    python -m benchmarks.bench_conv --threads 2 --repeats 10 --out runs/bench-conv
    python -m benchmarks --sections conv                  # the same, as a section of the suite

The net is the ResNet of a checkerboard coupling (:class:`nflow_np.nn.resnet.ResNet`, ``C + 1`` channels in,
``2C`` out) on ``(C, H, W) = (4, 14, 14)`` and ``(1, 28, 28)`` images, timed in both of its formulations in the
same run (``im2col``: the layers one by one, each convolution im2col + one GEMM; ``shifted``: the whole net on
channel-major frames, ``k²`` accumulating GEMMs per convolution, ``docs/conv.md#the-shifted-gemm-convolution``),
on the active backend and GEMM engine (both named in the table). Per implementation, the median [min, max] of
the step time after a warm-up and:

- ``GFLOP/s``: the convolutions' GEMM work (three products of ``2·C_out·C_in k²·N H W`` FLOPs per conv, the
  useful FLOPs: the shifted GEMMs also compute the ring's columns, which are not counted) over the whole
  step's time; ``% peak``: that over a large square matmul's rate measured in the same run;
- ``GEMMs alone``: the same GEMMs, in the formulation's own shapes (im2col: one product per pass on the
  im2col matrix; shifted: the ``k²`` chunked products on frames, ring columns included), timed by
  themselves, their useful GFLOP/s and % of the peak, the peak timed in alternation with them (one 2048³
  product, then one pass of the GEMMs, ``repeats`` times; the median of the rounds' ratios), so that the
  machine's speed drifting during the section moves both (how well BLAS does on these shapes; in brackets the
  rate of the FLOPs the GEMMs compute, the shifted ring's columns included; the thin first and last
  convolutions' gathers, ``docs/conv.md#thin-convolutions``, are counted the same way), and
  ``step/GEMMs``: what the rest (im2col, col2im, layout, batch norm, ReLU, bias, skip) costs on top;
- ``× torch``: PyTorch's time for the same net (weight-normalised convolutions, batch norm, autograd) over
  nflow_np's, at the same thread count (> 1: nflow_np faster);
- ``im2col`` / ``col2im``: the NumPy reference against ``kernels.conv.numba_cpu`` on a block convolution's input.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np

from nflow_np import gemm
from nflow_np.backend import get_backend
from nflow_np.nn import conv, shifted
from nflow_np.nn.resnet import ResNet
from nflow_np.packaging import kernel_module

from .sections import Settings, attempt, figure, gemm_peak, limit_threads, numba_ready, timed

SHAPES = ((4, 14, 14), (1, 28, 28))
NET = {"batch": 64, "features": 64, "blocks": 4, "kernel_size": 3}
SMOKE_NET = {"batch": 4, "features": 8, "blocks": 1, "kernel_size": 3}
FORMULATIONS = ("im2col", "shifted")


def convolutions(net: ResNet) -> list[conv.Conv2d]:
    return [m for m in net.modules() if isinstance(m, conv.Conv2d)]


def gemm_flops(net: ResNet, batch: int) -> int:
    """FLOPs of the three GEMMs of every convolution (forward, weight gradient, input gradient)."""
    pixels = batch * net.shape[0] * net.shape[1]
    return sum(3 * 2 * c.out_channels * c.in_channels * c.kernel_size**2 * pixels for c in convolutions(net))


def computed_columns(net: ResNet, batch: int, formulation: str) -> float:
    """Columns the GEMMs compute per useful output column: 1 for im2col; the frame's ring included for shifted."""
    if formulation != "shifted":
        return 1.0
    frame = shifted.Frame(batch, net.shape[0], net.shape[1], net.kernel_size)
    return (frame.stop - frame.start) / frame.pixel_count


def gemm_pass(net: ResNet, batch: int, formulation: str) -> Callable[[], object]:
    """One pass of every convolution's three GEMMs by themselves, on arrays of the formulation's shapes."""
    rng = np.random.default_rng(0)
    if formulation == "shifted":
        frame = shifted.Frame(batch, net.shape[0], net.shape[1], net.kernel_size)
        operands = []
        for c in convolutions(net):
            x, d_y, y, d_x = (shifted.new_frame(channels, frame, np.float32)  # aligned, as the step allocates them
                              for channels in (c.in_channels, c.out_channels, c.out_channels, c.in_channels))
            x[...] = rng.standard_normal(x.shape)
            d_y[...] = rng.standard_normal(d_y.shape)
            wk = rng.standard_normal((c.kernel_size, c.kernel_size, c.out_channels, c.in_channels)).astype(np.float32)
            operands.append((x, d_y, wk, y, d_x))

        def run() -> None:
            for x, d_y, wk, y, d_x in operands:
                shifted.conv_forward(x, wk, frame, out=y)
                shifted.conv_backward(d_y, x, wk, frame, d_x=d_x)

        return run
    pixels = batch * net.shape[0] * net.shape[1]
    operands = []
    for c in convolutions(net):
        k = c.in_channels * c.kernel_size**2
        w, cols, d_y = (rng.standard_normal(s).astype(np.float32) for s in ((c.out_channels, k), (k, pixels),
                                                                          (c.out_channels, pixels)))  # fmt: skip
        operands.append((w, cols, d_y))
    return lambda: [(w @ cols, d_y @ cols.T, w.T @ d_y) for w, cols, d_y in operands]


def alternating_share(call: Callable[[], object], repeats: int, flops: float, peak: dict) -> float:
    """``call``'s rate (``flops`` per call) over the 2048³ GEMM's, timed in alternation: the median over rounds.

    ``peak`` is :func:`benchmarks.sections.gemm_peak`'s float32 entry; its engine times the square product.
    """
    n = peak["n"]
    rng = np.random.default_rng(4)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    out = np.empty((n, n), np.float32)
    engine = peak.get("engine") or gemm.get_engine()

    def square() -> float:
        with gemm.using_engine(engine):
            t0 = time.perf_counter()
            gemm.gemm(a, b, out, 0.0)
            return time.perf_counter() - t0

    square()
    call()
    shares = []
    for _ in range(max(3, repeats)):
        t_square = square()
        t0 = time.perf_counter()
        call()
        shares.append((flops / (time.perf_counter() - t0)) / (2 * n**3 / t_square))
    return float(np.median(shares))


def build_net(shape: tuple, net_settings: dict) -> ResNet:
    c, h, w = shape
    net = ResNet(c + 1, 2 * c, (h, w), net_settings["features"], net_settings["blocks"],
                 net_settings["kernel_size"], np.random.default_rng(0), np.float32)  # fmt: skip
    for m in net.modules():
        if hasattr(m, "training"):
            m.training = True  # as in a training step
    return net


def nflow_step(shape: tuple, net_settings: dict, repeats: int,
               formulation: str = "shifted") -> tuple[np.ndarray, ResNet]:  # fmt: skip
    c, h, w = shape
    net = build_net(shape, net_settings)
    net.formulation = formulation
    rng = np.random.default_rng(1)
    x = rng.standard_normal((net_settings["batch"], c + 1, h, w)).astype(np.float32)
    d_y = rng.standard_normal((net_settings["batch"], 2 * c, h, w)).astype(np.float32)
    return timed(lambda: (net.forward(x), net.backward(d_y)), repeats), net
def torch_step(torch: ModuleType, shape: tuple, net_settings: dict, repeats: int) -> np.ndarray:
    """The same ResNet in plain PyTorch (weight-normalised convs, BatchNorm2d in training mode), autograd."""
    from torch import nn
    from torch.nn.utils.parametrizations import weight_norm

    c, h, w = shape
    f, k = net_settings["features"], net_settings["kernel_size"]

    def conv2d(c_in: int, c_out: int) -> nn.Module:
        return weight_norm(nn.Conv2d(c_in, c_out, k, padding=k // 2))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.branch = nn.Sequential(conv2d(f, f), nn.BatchNorm2d(f), nn.ReLU(), conv2d(f, f))

        def forward(self, x: object) -> object:
            return x + self.branch(x)

    net = nn.Sequential(conv2d(c + 1, f), *[Block() for _ in range(net_settings["blocks"])], nn.BatchNorm2d(f),
                        nn.ReLU(), conv2d(f, 2 * c)).train()  # fmt: skip
    x = torch.randn(net_settings["batch"], c + 1, h, w)
    d_y = torch.randn(net_settings["batch"], 2 * c, h, w)

    def step() -> None:
        net.zero_grad(set_to_none=True)
        net(x).backward(d_y)

    return timed(step, repeats)


def im2col_rows(net_settings: dict, shape: tuple, repeats: int) -> list[dict]:
    """The NumPy reference against the Numba kernels on a block convolution's input ``(N, F, H, W)``."""
    _, h, w = shape
    k, f, n = net_settings["kernel_size"], net_settings["features"], net_settings["batch"]
    x = np.random.default_rng(2).standard_normal((n, f, h, w)).astype(np.float32)
    cols = conv.im2col(x, k)
    impls = {"numpy": (conv.im2col, conv.col2im)}
    if numba_ready() is None:
        numba_conv = importlib.import_module(kernel_module("conv.numba_cpu"))  # the name the library imports it by
        impls["numba"] = (numba_conv.im2col, numba_conv.col2im)
    rows = []
    for impl, (forward, adjoint) in impls.items():
        for op, call in (("im2col", lambda f=forward: f(x, k)), ("col2im", lambda a=adjoint: a(cols, x.shape, k))):
            times = timed(call, repeats)
            rows.append({"op": op, "impl": impl, "shape": [n, f, h, w], "ms": figure(1e3 * times),
                         "gbs": figure(2 * cols.nbytes / times / 1e9)})  # fmt: skip
    return rows


def conv_section(s: Settings, torch_ref: ModuleType | None) -> dict:
    """The section of :mod:`benchmarks.suite`; the smoke settings (``gemm_size < 512``) shrink the net."""
    net_settings = SMOKE_NET if s.gemm_size < 512 else NET
    peak = gemm_peak(Settings(**(vars(s) | {"dtypes": ("float32",)})))["float32"]
    torch = None
    if torch_ref is not None:
        import torch
    rows = []
    for shape in SHAPES:
        ours = []
        for formulation in FORMULATIONS:
            def measure(shape: tuple = shape, formulation: str = formulation) -> dict:
                times, net = nflow_step(shape, net_settings, s.repeats, formulation)
                flops = gemm_flops(net, net_settings["batch"])
                gemms = gemm_pass(net, net_settings["batch"], formulation)
                alone = timed(gemms, s.repeats)
                result = {"ms": figure(1e3 * times), "gflops": figure(flops / times / 1e9),
                          "gemm_ms": figure(1e3 * alone), "gemm_gflops": figure(flops / alone / 1e9)}  # fmt: skip
                result["percent_of_peak"] = 100 * result["gflops"]["median"] / peak["gflops"]["median"]
                result["gemm_percent_of_start_peak"] = 100 * result["gemm_gflops"]["median"] / peak["gflops"]["median"]
                result["gemm_percent_of_peak"] = 100 * alternating_share(gemms, s.repeats, flops, peak)
                result["step_over_gemms"] = result["ms"]["median"] / result["gemm_ms"]["median"]
                extra = computed_columns(net, net_settings["batch"], formulation)
                result["computed_over_useful"] = extra
                result["gemm_percent_of_peak_computed"] = result["gemm_percent_of_peak"] * extra
                return result

            row = {"impl": f"nflow_np {formulation}", "formulation": formulation, "shape": list(shape)}
            ours.append(attempt(row | net_settings, measure))
        rows += ours
        if torch is not None:
            def reference(shape: tuple = shape) -> dict:
                return {"ms": figure(1e3 * torch_step(torch, shape, net_settings, s.repeats))}

            theirs = attempt({"impl": "torch", "shape": list(shape)} | net_settings, reference)
            for row in ours:
                if "ms" in row and "ms" in theirs:
                    row["speedup_vs_torch"] = theirs["ms"]["median"] / row["ms"]["median"]
            rows.append(theirs)
    return {"gemm_peak": peak, "backend": get_backend(), "gemm_engine": gemm.get_engine(), "rows": rows,
            "im2col": im2col_rows(net_settings, SHAPES[1], s.repeats)}  # fmt: skip


def conv_table(r: dict) -> str:
    """The section's text table."""
    from .suite import fig, ratio, table

    rows = []
    for row in r["rows"]:
        cells = [row["impl"], "×".join(map(str, row["shape"])), str(row["batch"]), f"{row['features']}/{row['blocks']}"]
        if "error" in row:
            rows.append([*cells, "error", row["error"][:40], "", "", "", "", "", ""])
        elif row["impl"] == "torch":
            rows.append([*cells, fig(row["ms"]), "", "", "", "", "", "", ""])
        else:
            rows.append([*cells, fig(row["ms"]), fig(row["gflops"], digits=1), f"{row['percent_of_peak']:.0f}",
                         f"{row['gemm_percent_of_peak']:.0f} ({row['gemm_percent_of_peak_computed']:.0f})",
                         f"{row['gemm_percent_of_start_peak']:.0f}", ratio(row["step_over_gemms"]),
                         ratio(row.get("speedup_vs_torch")), ""])
    peak = fig(r["gemm_peak"]["gflops"], digits=1)
    title = (f"conv coupling net forward + backward (float32; backend {r.get('backend')}, GEMM engine "
             f"{r.get('gemm_engine')}); GEMM peak ({r['gemm_peak']['n']}³, the best engine: "
             f"{r['gemm_peak'].get('engine', '?')}) {peak} GFLOP/s")  # fmt: skip
    text = table(title, ["impl", "C×H×W", "batch", "F/blocks", "ms", "GFLOP/s", "% peak",
                         "GEMMs % peak, alternating (computed)", "of the peak above", "step/GEMMs", "× torch", ""],
                 rows)  # fmt: skip
    cols = [[row["op"], row["impl"], "×".join(map(str, row["shape"])), fig(row["ms"], digits=3),
             fig(row["gbs"], digits=1)] for row in r["im2col"]]  # fmt: skip
    return text + "\n" + table("im2col / col2im (k = 3)", ["op", "impl", "input", "ms", "GB/s of cols"], cols)
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_conv", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="threads for BLAS, Numba and PyTorch (default: 1)")
    parser.add_argument("--repeats", type=int, default=10, help="repetitions per figure (default: 10)")
    parser.add_argument("--smoke", action="store_true", help="a tiny net: checks that the benchmark runs")
    parser.add_argument("--no-torch", dest="torch", action="store_false", help="leave PyTorch out")
    parser.add_argument("--out", type=Path, help="write results.json here")
    args = parser.parse_args(argv)
    from .suite import torch_reference

    torch_ref = torch_reference() if args.torch else None
    settings = Settings.smoke(repeats=args.repeats) if args.smoke else Settings(repeats=args.repeats)
    settings.threads = args.threads
    with limit_threads(args.threads, torch_ref):
        result = conv_section(settings, torch_ref)
    print(conv_table(result))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
