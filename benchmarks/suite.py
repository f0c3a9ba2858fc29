"""The benchmark suite: ``python -m benchmarks`` (or ``nflow bench``) prints a table and writes JSON and plots.

    python -m benchmarks                                # everything; a few minutes on 2 cores
    python -m benchmarks --quick                        # smaller N, 3 repeats: under a minute
    python -m benchmarks --sections train sample --threads 2 --out runs/bench-2t
    python -m benchmarks --sections nice-mnist --nice-steps 5000   # the long-run check (~10 min)

Sections (``--sections``; docstrings in :mod:`benchmarks.sections` and :mod:`benchmarks.subnormal`):

- ``kernels``: the affine coupling law's forward and backward (N = 65,536 rows, D₂ = 32 and 392) per
  backend, ms and GB/s, beside the copy bandwidth measured in the same run;
- ``mlp``: forward + backward of a coupling net (batch 512) as GFLOP/s and % of a large GEMM's rate;
- ``train``: a RealNVP training step (64-d, 8 couplings, 256-256 nets, batch 512, Adam) per backend
  and dtype: ms, steps/s, peak MiB, and the ratio to the step's GEMMs timed alone; step time
  against batch size (64 … 4096);
- ``sample``: ``log_prob`` and ``sample`` throughput at batch 8,192, and each call's peak resident memory
  (the same measure for PyTorch);
- ``subnormal``: a float32 NICE step on normal vs subnormal-range numbers (data, weights, Adam moments) and a
  GEMM with a subnormal operand, in nflow_np's flush mode and with it off;
- ``threads``: every BLAS/Numba split per operation, and 1 thread / n / the default beside a busy process
  spinning on the last core (:mod:`benchmarks.speed_sections`);
- ``nice-mnist``: NICE on MNIST-5000 (4 couplings, nets 392→500×4→392, batch 100, Adam) steps/s against
  PyTorch's same model; ``--nice-steps 5000`` adds the step time after 5,000 steps against after 100;
- ``conv``: a convolutional coupling net's forward + backward (:mod:`benchmarks.bench_conv`).

The header and ``results.json["machine"]`` say which machine it ran on (:mod:`benchmarks.machine`): CPU model,
vector flags (AVX-512, AMX), cores, the BLAS and the kernel it chose, the flush mode and the thread plans.

Where PyTorch is installed, the same model in plain PyTorch (:mod:`benchmarks.torch_reference`) is timed
in the same run with the same thread count (BLAS via threadpoolctl, Numba, PyTorch all get ``--threads``),
and ``× torch`` is its time over nflow_np's (> 1: nflow_np faster). Every figure is the median of
``--repeats`` repetitions after a warm-up (and JIT compilation) with [min, max] beside it (the batch-size
sweep takes half as many, the GEMM peak at least 5; the JSON gives each figure's count ``n``). The load
average before and after is printed: on a shared machine other processes' work shows up in these numbers.

Writes ``OUT/results.json``, ``OUT/table.txt`` and, unless ``--no-plots``, ``OUT/summary.png`` and
``OUT/batch-sweep.png`` (default ``OUT = runs/bench``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from nflow_np import gemm

from . import machine as machine_info
from . import sections
from .bench_conv import conv_section, conv_table
from .sections import Settings
from .speed_sections import EARLY, nice_mnist, threads_section
from .subnormal import subnormal

SECTIONS = ("kernels", "mlp", "train", "sample", "subnormal", "threads", "nice-mnist", "conv")


def torch_reference() -> ModuleType | None:
    """:mod:`benchmarks.torch_reference`, or ``None`` where PyTorch does not import (it is optional)."""
    try:
        return importlib.import_module(".torch_reference", __package__)
    except ImportError:
        return None


def machine(threads: int, torch_ref: ModuleType | None) -> dict:
    """The machine (:func:`benchmarks.machine.describe`) and the library versions and thread count of this run."""
    info = machine_info.describe(threads, torch_ref.VERSION if torch_ref is not None else None)
    numba = info.pop("numba")
    blas = [b | {"default_threads": b["threads_now"]} for b in info.pop("blas")]
    return info | {"numba": numba["version"] if numba else None, "numba_config": numba, "blas": blas,
                   "numba_status": sections.numba_ready() or "ok"}


# -- the table ------------------------------------------------------------------------------------------------------
def fig(f: dict, scale: float = 1.0, digits: int = 2) -> str:
    """``median [min, max]``."""
    m, lo, hi = (f[k] * scale for k in ("median", "min", "max"))
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def ratio(value: float | None) -> str:
    """Two decimals, or an empty cell."""
    return "" if value is None else f"{value:.2f}"


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    """A right-aligned text table under ``title``."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines) + "\n"


def kernels_table(r: dict) -> str:
    """The coupling-law rows: ms and GB/s per backend, % of the copy bandwidth."""
    rows = []
    for row in r["rows"]:
        cells = [row["op"], row["dtype"], str(row["N"]), str(row["D2"]), row["backend"]]
        if "error" in row:
            rows.append([*cells, "error", row["error"][:40], ""])
            continue
        rows.append([*cells, fig(row["ms"], digits=3), fig(row["gbs"], digits=1), f"{row['percent_of_copy']:.0f}"])
    threads = f"; numba on {r['numba_threads']} threads (its default)" if r.get("numba_threads") else ""
    title = (f"coupling law (affine), copy bandwidth {fig(r['copy_gbs'], digits=1)} GB/s "
             f"(numpy.copyto of {r['copy_bytes'] // 2**20} MiB, read + write){threads}")
    return table(title, ["op", "dtype", "N", "D2", "backend", "ms", "GB/s", "% copy"], rows)


def mlp_table(r: dict) -> str:
    """The MLP rows: ms, GFLOP/s and % of the GEMM peak."""
    peaks = ", ".join(f"{d} {fig(p['gflops'], digits=1)} ({p.get('engine', '?')})" for d, p in r["gemm_peak"].items())
    rows = [[row["impl"], row["dtype"], "→".join(map(str, row["sizes"])), str(row["batch"]),
             *([fig(row["ms"], digits=3), fig(row["gflops"], digits=1), f"{row['percent_of_peak']:.0f}"]
               if "ms" in row else ["error", row["error"][:40], ""])] for row in r["rows"]]
    n = next(iter(r["gemm_peak"].values()))["n"]
    title = f"MLP forward + backward (ReLU); GEMM peak ({n}³ matmul) GFLOP/s: {peaks}"
    return table(title, ["impl", "dtype", "widths", "batch", "ms", "GFLOP/s", "% peak"], rows)


def train_table(r: dict) -> str:
    """The training-step rows, then the batch-size sweep."""
    m = r["model"]
    rows = []
    for row in r["rows"]:
        if "error" in row:
            rows.append([row["impl"], row["dtype"], str(row["batch"]), "error", row["error"][:40], "", "", ""])
            continue
        memory = f"{row['peak_mib']:.1f}" if "peak_mib" in row else ""
        steps = fig(row["steps_per_s"], digits=1) if "steps_per_s" in row else f"{fig(row['gflops'], digits=1)} GFLOP/s"
        rows.append([row["impl"], row["dtype"], str(row["batch"]), fig(row["ms"]), steps, memory,
                     ratio(row.get("step_over_gemms")), ratio(row.get("speedup_vs_torch"))])
    title = (f"training step: {m['kind']} D={m['dim']}, {m['layers']} couplings, nets {m['hidden']}, "
             f"{m['optimizer']}")
    columns = ["impl", "dtype", "batch", "ms", "steps/s", "peak MiB", "step/GEMMs (target ≤ 1.15)", "× torch"]
    text = table(title, columns, rows)
    sweep = r["batch_sweep"]
    rows = [[s["impl"], s["dtype"], *(f"{f['median']:.2f}" for f in s["ms"])] if "ms" in s
            else [s["impl"], s["dtype"], "error", *[""] * (len(sweep["batches"]) - 1)] for s in sweep["series"]]
    return text + "\n" + table("training step ms (median) against batch size", ["impl", "dtype",
                                                                               *map(str, sweep["batches"])], rows)


def sample_table(r: dict) -> str:
    """The log_prob and sample rows: ms, thousands of samples per second, peak resident MiB."""
    rows = [[row["op"], row["impl"], row["dtype"], str(row["batch"]), fig(row["ms"]),
             fig(row["samples_per_s"], 1e-3, 1), ratio(row.get("peak_rss_mib")), ratio(row.get("speedup_vs_torch"))]
            if "ms" in row else [row["op"], row["impl"], row["dtype"], str(row["batch"]), "error", row["error"][:40],
                                 "", ""]
            for row in r["rows"]]
    columns = ["op", "impl", "dtype", "batch", "ms", "k samples/s", "peak RSS MiB", "× torch"]
    return table("log_prob and sample", columns, rows)


def subnormal_table(r: dict) -> str:
    """The subnormal rows: ms and slowdown against the normal case."""
    share = "subnormal_share_of_{}"
    kinds = ("data", "net_weights", "adam_moments")
    rows = [[row["case"], row["mode"], fig(row["ms"], digits=3), f"{row['slowdown']:.2f}",
             *(f"{row[share.format(k)]:.2f}" if share.format(k) in row else "" for k in kinds)]
            for row in r["rows"]]

    def flags(found: dict) -> str:
        return ", ".join(f"{k.upper()} {'on' if v else 'off'}" for k, v in found.items())

    title = (f"float32 subnormals (outside library calls: {flags(r['flush_flags'])}; inside, the library mode: "
             f"{flags(r['library_flush_flags'])}; target × normal ≤ 1.05 in the library mode)")
    return table(title, ["case", "mode", "ms", "× normal", "subnormal: data", "weights", "Adam moments"], rows)


def threads_table(r: dict) -> str:
    """The split sweep on the quiet machine, then 1 / n / default threads beside a busy core."""
    rows = [[row["case"], row["op"], str(row["threads"]), str(row.get("blas", "")), str(row.get("numba", "")),
             fig(row["ms"]) if "ms" in row else "error " + row["error"][:30], ratio(row.get("default_over_one"))]
            for row in r["rows"]]
    columns = ["case", "op", "threads", "BLAS", "Numba", "ms", "default / 1 thread (target ≤ 1)"]
    return table(f"thread splits at n = {r['n']} (RealNVP benchmark model, float32)", columns, rows)


def nice_table(r: dict) -> str:
    """The nice-mnist rows (steps/s, × torch) and the long run's late/early step time."""
    m = r["model"]
    rows = [[row["impl"], fig(row["ms"]), fig(row["steps_per_s"], digits=1), ratio(row.get("speedup_vs_torch"))]
            if "ms" in row else [row["impl"], "error", row["error"][:40], ""] for row in r["rows"]]
    title = (f"nice-mnist: NICE, {m['couplings']} couplings, nets 392→{'×'.join(map(str, m['hidden']))}→392, "
             f"batch {m['batch']}, MNIST-5000 training split ({m['rows']} rows), {m['optimizer']} "
             "(target × torch ≥ 1.2)")
    text = table(title, ["impl", "ms", "steps/s", "× torch"], rows)
    if "long_run" in r:
        run = r["long_run"]
        text += (f"after {run['steps']} steps: {fig(run['late_ms'])} ms per step vs {fig(run['early_ms'])} at steps "
                 f"{EARLY[0]}–{EARLY[1] - 1}: ratio {run['late_over_early']:.3f} (target ≤ 1.05); subnormal share "
                 f"of net weights {run['subnormal_share_of_weights']:.2g}, of Adam's state "
                 f"{run['subnormal_share_of_adam_state']:.2g}\n")
    return text


def errors_note(result: dict) -> str:
    """One line per implementation that failed in this section, with the whole (first line of the) error."""
    failed = [*result.get("rows", []), *result.get("batch_sweep", {}).get("series", [])]
    return "".join(f"  ! {' '.join(str(v) for k, v in row.items() if k != 'error')}: {row['error']}\n"
                   for row in failed if "error" in row)


def header(info: dict, settings: dict, load: tuple[float, ...]) -> str:
    """The table's first lines: machine, versions, BLAS, flush mode, threads, load average before the run."""
    return (f"nflow_np benchmarks{' (quick)' if settings['quick'] else ''}: {info['cpu']}, {info['cores']} cores, "
            f"{info['threads']} thread(s) per library\n{machine_info.header_lines(info)}python {info['python']}, "
            f"numpy {info['numpy']}, numba {info['numba']} ({info['numba_status']}), torch {info['torch']}\n"
            f"load average before: {' '.join(f'{x:.2f}' for x in load)}; figures: median [min, max] of "
            f"{settings['repeats']} repetitions after warm-up\n")


RUNNERS: dict[str, tuple[Callable[..., dict], Callable[[dict], str], bool]] = {
    # section: (measure, format, takes the PyTorch reference)
    "kernels": (sections.kernels, kernels_table, True),
    "mlp": (sections.mlp, mlp_table, True),
    "train": (sections.train, train_table, True),
    "sample": (sections.sample, sample_table, True),
    "subnormal": (subnormal, subnormal_table, False),
    "threads": (threads_section, threads_table, False),
    "nice-mnist": (nice_mnist, nice_table, True),
    "conv": (conv_section, conv_table, True),  # benchmarks/bench_conv.py
}


def run(settings: Settings, chosen: list[str], quick: bool, torch_ref: ModuleType | None,
        echo: Callable[[str], None] = print) -> tuple[dict, str]:
    """Run the ``chosen`` sections; return the JSON-ready results and the text table."""
    start = time.perf_counter()
    load = os.getloadavg()
    info = machine(settings.threads, torch_ref)
    results = {"settings": {"quick": quick, "sections": chosen} | vars(settings), "machine": info,
               "load_average": {"before": load}}
    text = header(info, results["settings"], load)
    echo(text)
    results["sections"] = {}
    with sections.limit_threads(settings.threads, torch_ref):
        for name in chosen:
            measure, form, uses_torch = RUNNERS[name]
            began = time.perf_counter()
            result = measure(settings, torch_ref) if uses_torch else measure(settings)
            result["wall_s"] = time.perf_counter() - began  # JIT compilation and warm-up included
            results["sections"][name] = result
            block = form(result) + errors_note(result)
            echo(block)
            text += "\n" + block
    load_after = os.getloadavg()
    results["load_average"]["after"] = load_after
    results["wall_s"] = time.perf_counter() - start
    walls = ", ".join(f"{name} {result['wall_s']:.0f} s" for name, result in results["sections"].items())
    footer = (f"load average after: {' '.join(f'{x:.2f}' for x in load_after)}; {results['wall_s']:.0f} s in all "
              f"({walls})\n")
    echo(footer)
    return results, text + "\n" + footer


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m benchmarks`` (and ``nflow bench``)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller N and fewer repeats: under a minute")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="output folder (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="threads for BLAS, Numba and PyTorch (default: 1)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to run")
    parser.add_argument("--repeats", type=int, help="repetitions per figure (default: 10, --quick 3)")
    parser.add_argument("--nice-steps", type=int, default=0,
                        help="nice-mnist: also train this many steps (≥ 240; 5000 for the issue's check) and compare "
                        "the step time at the end with the one after 100 steps (default: 0, skipped)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    parser.add_argument("--no-torch", dest="torch", action="store_false", help="leave PyTorch out even if installed")
    parser.add_argument("--gemm", choices=("auto", *gemm.ENGINES), default="auto",
                        help="the GEMM engine (nflow_np.gemm; default: %(default)s, MKL on Intel CPUs where installed)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tests/test_benchmarks.py: tiny
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the suite with ``argv`` (default ``sys.argv[1:]``); return the exit code (0, or 2 for bad arguments).

    Parameters
    ----------
    argv : list of str, optional

    Returns
    -------
    int
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help or a bad argument: argparse has printed why
        return exit_.code if isinstance(exit_.code, int) else 0
    if args.threads < 1 or (args.repeats is not None and args.repeats < 1):
        print("python -m benchmarks: error: --threads and --repeats must be positive", file=sys.stderr)
        return 2
    try:
        gemm.set_engine(args.gemm)
    except ValueError as error:
        print(f"python -m benchmarks: error: --gemm: {error}", file=sys.stderr)
        return 2
    if args.nice_steps and args.nice_steps < 2 * EARLY[1]:
        print(f"python -m benchmarks: error: --nice-steps must be 0 or at least {2 * EARLY[1]}", file=sys.stderr)
        return 2
    overrides = {"threads": args.threads, "nice_steps": args.nice_steps} | (
        {"repeats": args.repeats} if args.repeats else {})
    if args.smoke:
        settings = Settings.smoke(**overrides)
    else:
        settings = Settings.quick(**overrides) if args.quick else Settings(**overrides)
    torch_ref = torch_reference() if args.torch else None
    chosen = [name for name in SECTIONS if name in args.sections]
    results, text = run(settings, chosen, args.quick or args.smoke, torch_ref)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "table.txt").write_text(text)
    files = ["results.json", "table.txt"]
    if args.plots:
        from .plots import plot_batch_sweep, plot_summary

        files += plot_summary(results, args.out / "summary.png")
        files += plot_batch_sweep(results, args.out / "batch-sweep.png")
    print(f"wrote {', '.join(files)} to {args.out}")
    return 0
