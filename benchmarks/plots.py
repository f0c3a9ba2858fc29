"""Plots of the benchmark suite's results (matplotlib's Agg canvas; no display needed).

:func:`plot_summary` draws the table as bars (one panel per section that ran), :func:`plot_batch_sweep`
the training-step time against batch size. Error bars span the min and max of the repetitions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

COLOURS = {"numpy": "tab:blue", "numba": "tab:orange", "numba (law)": "tab:olive", "torch": "tab:red",
           "nflow_np": "tab:blue", "GEMMs alone": "tab:gray"}


def _bars(axes: object, groups: list[str], series: dict[str, list[dict | None]], scale: float = 1.0) -> None:
    """Grouped bars: ``series[name][i]`` is a figure (median, min, max) for ``groups[i]``, or None."""
    width = 0.8 / max(len(series), 1)
    for k, (name, figures) in enumerate(series.items()):
        x = np.arange(len(groups)) + (k - (len(series) - 1) / 2) * width
        keep = [i for i, f in enumerate(figures) if f is not None]
        med = np.array([figures[i]["median"] for i in keep]) * scale
        low = med - np.array([figures[i]["min"] for i in keep]) * scale
        high = np.array([figures[i]["max"] for i in keep]) * scale - med
        axes.bar(x[keep], med, width, yerr=[low, high], capsize=2, label=name, color=COLOURS.get(name))
    axes.set_xticks(np.arange(len(groups)), groups, fontsize=8)
    axes.legend(fontsize=7)
    axes.grid(axis="y", alpha=0.3)


def _series(rows: list[dict], groups: list[tuple], key: str, group_of: callable, impl: str = "impl") -> dict:
    names = list(dict.fromkeys(row[impl] for row in rows if key in row))
    found = {(row[impl], group_of(row)): row[key] for row in rows if key in row}
    return {name: [found.get((name, g)) for g in groups] for name in names}


def plot_summary(results: dict, path: Path) -> list[str]:
    """Bar charts of the sections in ``results``; returns ``[path.name]``, or ``[]`` when nothing was measured."""
    sec = results["sections"]
    panels = [name for name in ("train", "sample", "kernels", "mlp", "nice-mnist") if name in sec]
    if not panels:
        return []
    columns = min(len(panels), 2)
    lines = -(-len(panels) // columns)
    fig = Figure(figsize=(7 * columns, 4.5 * lines))
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(lines, columns)).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, name in zip(axes, panels, strict=False):
        rows = sec[name]["rows"]
        if name == "train":
            groups = list(dict.fromkeys(row["dtype"] for row in rows))
            _bars(ax, groups, _series(rows, groups, "ms", lambda r: r["dtype"]))
            ax.set(ylabel="ms per step", title=f"training step, batch {rows[0]['batch']}")
        elif name == "sample":
            groups = list(dict.fromkeys((row["op"], row["dtype"]) for row in rows))
            _bars(ax, [f"{op}\n{dtype}" for op, dtype in groups],
                  _series(rows, groups, "samples_per_s", lambda r: (r["op"], r["dtype"])), scale=1e-3)
            ax.set(ylabel="thousand samples / s", title=f"log_prob and sample, batch {rows[0]['batch']}")
        elif name == "kernels":
            groups = list(dict.fromkeys((row["op"], row["dtype"], row["D2"]) for row in rows))
            _bars(ax, [f"{'fwd' if op == 'forward' else 'bwd'} {dtype}\nD2 = {d2}" for op, dtype, d2 in groups],
                  _series(rows, groups, "gbs", lambda r: (r["op"], r["dtype"], r["D2"]), impl="backend"))
            ax.axhline(sec[name]["copy_gbs"]["median"], color="k", linestyle="--", linewidth=1, label="copy")
            ax.legend(fontsize=7)
            ax.set(ylabel="GB/s", title=f"affine coupling law, N = {rows[0]['N']}")
        elif name == "nice-mnist":
            _bars(ax, ["float32"], _series(rows, ["float32"], "steps_per_s", lambda r: "float32"))
            ax.set(ylabel="steps / s", title=f"NICE on MNIST, batch {sec[name]['model']['batch']}")
        else:
            groups = list(dict.fromkeys((row["dtype"], tuple(row["sizes"])) for row in rows))
            _bars(ax, [f"{dtype}\n{s[0]}→{s[1]}→…" for dtype, s in groups],
                  _series(rows, groups, "gflops", lambda r: (r["dtype"], tuple(r["sizes"]))))
            for k, (dtype, _) in enumerate(groups):
                peak = sec[name]["gemm_peak"][dtype]["gflops"]["median"]
                ax.hlines(peak, k - 0.45, k + 0.45, color="k", linestyle="--", linewidth=1)
            ax.set(ylabel="GFLOP/s (dashes: GEMM peak)", title=f"MLP forward + backward, batch {rows[0]['batch']}")
    info = results["machine"]
    kernels = ", ".join(f"{b['internal_api']} {b['architecture']}" for b in info.get("blas", []))
    flags = " ".join(f for f in info.get("flags", []) if f.startswith(("avx512f", "amx")))
    fig.suptitle(f"{info['cpu']} ({flags or 'no AVX-512'}; BLAS {kernels}), {info['threads']} thread(s); "
                 "median, bars min–max", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return [path.name]


def plot_batch_sweep(results: dict, path: Path) -> list[str]:
    """Training-step ms against batch size per implementation and dtype; ``[]`` without a train section."""
    if "train" not in results["sections"]:
        return []
    sweep = results["sections"]["train"]["batch_sweep"]
    batches = np.array(sweep["batches"])
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for s in sweep["series"]:
        if "ms" not in s:  # that implementation failed (the table says why)
            continue
        med = np.array([f["median"] for f in s["ms"]])
        err = [med - [f["min"] for f in s["ms"]], [f["max"] for f in s["ms"]] - med]
        style = "-" if s["dtype"] == "float32" else "--"
        ax.errorbar(batches, med, yerr=err, fmt="o" + style, capsize=2, color=COLOURS.get(s["impl"]),
                    label=f"{s['impl']} {s['dtype']}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set(xlabel="batch size", ylabel="ms per training step", title="RealNVP training step against batch size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return [path.name]
