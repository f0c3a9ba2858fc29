"""Command-line shells for variational inference (``nflow vi``) and the EM baseline (``nflow train --model gmm``).

Thin: :mod:`nflow_np.vi`, :mod:`nflow_np.targets`, :mod:`nflow_np.gmm` and :mod:`nflow_np.vi_plots`
do the work. ``nflow_np.cli`` mounts them with :func:`add_vi_subcommand` and, for the mixture,
:func:`add_gmm_arguments` + :func:`run_gmm_command`::

    nflow vi --target U1 --flow planar --layers 2 8 32 --steps 12000 --anneal-steps 10000
    nflow vi --target U1 U2 U3 U4 --layers 2 8 32 --out runs/vi-figure3
    nflow vi --target mypackage.energies:banana --dim 2        # a user's energy(z) -> (U, grad U)
    nflow train --data two_moons --model gmm --components 1,2,4,8,16,32

Both handlers raise ``ValueError`` for bad input and ``NonFiniteLossError`` if training diverges;
``nflow_np.cli.main`` turns those into exit codes 2 and 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from nflow_np.cli_types import number, positive_ints
from nflow_np.optim import Adam
from nflow_np.targets import TARGETS, Target, log_partition
from nflow_np.train import NonFiniteLossError
from nflow_np.vi import FLOW_KINDS, estimate_kl, fit_vi, make_vi_flow

VI_DEFAULTS: dict[str, object] = {
    "target": ["U1"],
    "flow": "planar",
    "layers": [2, 8, 32],
    "steps": 3000,
    "anneal_steps": 2500,
    "beta0": 0.01,
    "batch_size": 500,
    "lr": 5e-3,
    "lr_schedule": "cosine",
    "clip_norm": None,
    "samples": 10000,
    "dim": 2,
    "dtype": "float64",
    "seed": 0,
    "grid": 200,
    "out": None,
    "progress": True,
}
"""Every default of ``nflow vi``. ``steps``/``anneal_steps`` are a quick run; the paper's budget is
``--steps 12000 --anneal-steps 10000`` (``docs/vi.md``). ``out`` None means ``runs/vi-<flow>``."""


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _integer(text, 1)


def _non_negative_int(text: str) -> int:
    return _integer(text, 0)


_positive_float = number(float, 0, strict=True)


def add_vi_subcommand(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``vi`` to ``subparsers`` (the object ``add_subparsers`` returned); its handler is :func:`run_vi_command`."""
    d = VI_DEFAULTS
    default = " (default: %(default)s)"
    vi = subparsers.add_parser(
        "vi",
        help="fit a flow to an unnormalised 2-D target by variational inference",
        description="Minimise the free energy F = E_q0[log q0 - sum log|det| + U(z_K)] of a flow pushed from "
        "N(0, I); report F and KL(q||p) = F + log Z, and draw the true density beside each fitted q_K.",
    )
    vi.add_argument(
        "--target",
        nargs="+",
        default=d["target"],
        metavar="NAME",
        help=f"one or more of {', '.join(TARGETS)}, or module:function returning (U, grad U)" + default,
    )
    vi.add_argument("--flow", choices=FLOW_KINDS, default=d["flow"], help="layer kind" + default)
    vi.add_argument("--layers", type=_positive_int, nargs="+", default=d["layers"], help="K values" + default)
    vi.add_argument("--steps", type=_positive_int, default=d["steps"], help="optimizer steps" + default)
    vi.add_argument(
        "--anneal-steps",
        type=_non_negative_int,
        default=d["anneal_steps"],
        help="beta_t = min(1, beta0 + t/T) with this T; 0 disables annealing" + default,
    )
    vi.add_argument("--beta0", type=_positive_float, default=d["beta0"], help="initial beta" + default)
    vi.add_argument("--batch-size", type=_positive_int, default=d["batch_size"], help="draws per step" + default)
    vi.add_argument("--lr", type=_positive_float, default=d["lr"], help="Adam learning rate" + default)
    vi.add_argument(
        "--lr-schedule",
        choices=["constant", "cosine"],
        default=d["lr_schedule"],
        help="cosine: constant while annealing, then a half cosine to 0" + default,
    )
    vi.add_argument("--clip-norm", type=_positive_float, default=d["clip_norm"], help="gradient-norm clip" + default)
    vi.add_argument("--samples", type=_positive_int, default=d["samples"], help="draws for the KL estimate" + default)
    vi.add_argument("--dim", type=_positive_int, default=None,
                    help=f"dimension of a module:function target, refused for built-in ones (default: {d['dim']})")
    vi.add_argument("--dtype", choices=["float32", "float64"], default=d["dtype"], help=default)
    vi.add_argument("--seed", type=_non_negative_int, default=d["seed"], help="seeds init and draws" + default)
    vi.add_argument("--grid", type=_positive_int, default=d["grid"], help="plot resolution per side" + default)
    vi.add_argument("--out", type=Path, default=d["out"], help="output folder (default: runs/vi-<flow>)")
    vi.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    vi.set_defaults(handler=run_vi_command)
    return vi


def resolve_target(name: str, dim: int) -> tuple[object, int, float | None, Target | None]:
    """``(energy, dim, log Z or None, Target or None)`` for a built-in name or ``module:function``.

    A user's 2-D energy gets ``log Z`` by quadrature on ``[−6, 6]²`` and is plotted on ``[−4, 4]²``.
    """
    if name in TARGETS:
        target = TARGETS[name]
        return target, 2, target.log_z(), target
    if ":" not in name:
        raise ValueError(f"unknown target {name!r}; choose from {', '.join(TARGETS)} or give module:function")
    module_name, _, attribute = name.partition(":")
    try:
        energy = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot load target {name!r}: {error}") from None
    if not callable(energy):
        raise ValueError(f"target {name!r} is not callable")
    if dim != 2:
        return energy, dim, None, None
    target = Target(name, energy, (-6.0, 6.0))
    return target, 2, log_partition(energy, -6.0, 6.0), target


def run_vi_command(args: argparse.Namespace) -> int:
    """Train one flow per (target, K), print F and KL with standard errors, write summary.json and figure3.png."""
    from nflow_np.provenance import describe, provenance
    from nflow_np.vi_plots import FigureRow, plot_figure3  # matplotlib only when the command runs

    builtin = [name for name in args.target if name in TARGETS]
    if args.dim is not None and builtin:
        names = ", ".join(builtin)
        what = f"{names} is a 2-D built-in target" if len(builtin) == 1 else f"{names} are 2-D built-in targets"
        raise ValueError(f"--dim applies to module:function targets; {what}")
    dim_given = VI_DEFAULTS["dim"] if args.dim is None else args.dim
    out = args.out or Path("runs") / f"vi-{args.flow}"
    record = provenance(args.dtype, getattr(args, "threads", None))
    print(f"nflow: {describe(record)}", flush=True)
    anneal_steps = args.anneal_steps or None
    results, rows = [], []
    for name in args.target:
        energy, dim, log_z, target = resolve_target(name, dim_given)
        flows, kls = {}, {}
        for layers in args.layers:
            flow = make_vi_flow(args.flow, dim, layers, rng=np.random.default_rng(args.seed), dtype=args.dtype)
            fit = fit_vi(
                flow,
                energy,
                steps=args.steps,
                batch_size=args.batch_size,
                optimizer=Adam(flow, lr=args.lr),
                anneal_steps=anneal_steps,
                beta0=args.beta0,
                lr_schedule=args.lr_schedule,
                clip_norm=args.clip_norm,
                seed=args.seed,
                progress=args.progress,
            )
            estimate = estimate_kl(flow, energy, log_z, samples=args.samples, rng=np.random.default_rng([args.seed, 1]))
            flows[layers] = flow
            if estimate.kl is not None:
                kls[layers] = estimate.kl
            kl_text = "" if estimate.kl is None else f"  KL(q||p) {estimate.kl:.4f} ± {estimate.stderr:.4f}"
            print(
                f"{name} / {args.flow} K={layers}: F {estimate.free_energy:.4f} ± {estimate.stderr:.4f}{kl_text} nats "
                f"({args.samples} draws); {fit.steps} steps in {fit.seconds:.1f} s ({fit.steps_per_second:.0f} steps/s)"
            )
            results.append(
                {
                    "target": name,
                    "flow": args.flow,
                    "layers": layers,
                    "free_energy": estimate.free_energy,
                    "stderr": estimate.stderr,
                    "log_z": log_z,
                    "kl": estimate.kl,
                    "samples": estimate.samples,
                    "steps": fit.steps,
                    "seconds": fit.seconds,
                    "steps_per_second": fit.steps_per_second,
                    "history": fit.history,
                }
            )
            out.mkdir(parents=True, exist_ok=True)
            # the layers g_1 … g_K by index (the flow is Inverse(Sequential(layers)), vi.make_vi_flow)
            np.savez(out / f"{name.replace(':', '_')}-{args.flow}-K{layers}.npz", **flow.flow.state_dict())
        if target is not None:
            rows.append(FigureRow(target, log_z, flows, kls))
    arguments = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("handler",)}
    summary = {"arguments": arguments, "provenance": record, "backend": record["backend"], "unit": "nats",
               "results": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    written = ["summary.json", "one .npz of parameters per run"]
    if rows:
        plot_figure3(rows, out / "figure3.png", points=args.grid, flow_name=args.flow)
        written.insert(1, "figure3.png")
    print(f"wrote {', '.join(written)} to {out}")
    return 0


# -- the EM baseline ---------------------------------------------------------------------------


_components = positive_ints("4,8,16")


def add_gmm_arguments(train_parser: argparse.ArgumentParser, default: Callable[[str], str] | None = None) -> None:
    """Add the mixture's options to the ``train`` parser (refused for the flow models).

    ``default(name)`` gives the help's "(default: …)" text; without it the defaults are the mixture's.
    """
    default = default or {"components": " (default: 1,2,4,8,16,32)", "reg_covar": " (default: 1e-6)"}.get
    train_parser.add_argument(
        "--components",
        type=_components,
        default=(1, 2, 4, 8, 16, 32),
        help="gmm only: numbers of components to try; the best validation NLL wins" + default("components"),
    )
    train_parser.add_argument(
        "--reg-covar", type=_positive_float, default=1e-6,
        help="gmm only: covariance prior lambda" + default("reg_covar"),
    )


def run_gmm_command(args: argparse.Namespace) -> int:
    """``nflow train --model gmm``: EM for each ``--components`` value, keep the best on validation, report test NLL.

    Reads ``args.data, n_train, n_val, n_test, seed, out, components, reg_covar``; writes ``gmm.npz`` and
    ``summary.json`` to ``args.out`` (default ``runs/<data>-gmm``). With ``args.prepared`` (a data file,
    :func:`~nflow_np.data.prepare.prepare_data`) EM runs on its standardised rows and the mixture is mapped
    back to the file's units (:meth:`~nflow_np.gmm.GaussianMixture.rescaled`) before it is scored and saved.
    """
    from nflow_np.data import load_toy
    from nflow_np.gmm import ConvergenceWarning, GaussianMixture

    prepared = getattr(args, "prepared", None)
    if prepared is None:
        splits = fitted_on = load_toy(args.data, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                                      seed=args.seed)  # fmt: skip
    else:
        splits, fitted_on, units = prepared.raw, prepared.splits, prepared.standardization
    name = Path(prepared.source["path"]).name if prepared is not None else args.data
    tried = []
    best = None
    for k in args.components:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            fitted = GaussianMixture(k, reg_covar=args.reg_covar, seed=args.seed).fit(fitted_on.train)
        for warning in caught:
            print(f"nflow train: warning: {warning.message}", file=sys.stderr)
        gmm = fitted if prepared is None else fitted.rescaled(units.mean, units.std)  # in the data's units
        val = gmm.nll(splits.val)
        tried.append({"components": k, "val_nll": val, "iterations": fitted.n_iter, "converged": fitted.converged})
        print(f"{name} / gmm K={k}: val NLL {val:.4f} nats ({fitted.n_iter} EM iterations)")
        if best is None or val < best[1]:
            best = (gmm, val, fitted)
    gmm, val, fitted = best
    nll = {"train": gmm.nll(splits.train), "val": val, "test": gmm.nll(splits.test)}
    out = args.out or Path("runs") / f"{args.data}-gmm"
    summary = {
        "data": args.data,
        "model": "gmm",
        "seed": args.seed,
        "n_test": int(splits.test.shape[0]),
        "components": gmm.n_components,
        "nll_unit": "nats",
        "train_nll": nll["train"],
        "val_nll": nll["val"],
        "test_nll": nll["test"],
        "elbo_history": fitted.elbo_history,
        "tried": tried,
    }
    if prepared is not None:  # EM ran on standardised rows; the mixture saved is in the file's units
        summary |= {"data_file": prepared.source, "standardization": units.to_json(),
                    "nll_unit": "nats per row, in the data file's units (EM on the standardised rows, mapped back; "
                                "elbo_history is EM's own, per standardised row)"}
    if getattr(args, "provenance", None) is not None:  # nflow train: how the numbers were made
        summary |= {"provenance": args.provenance, "backend": args.provenance["backend"]}
    gmm.save(out, summary)  # gmm.npz and summary.json published together (nflow_np.files.gmm_files)
    print(
        f"{name} / gmm: test NLL {nll['test']:.4f} nats (train {nll['train']:.4f}, val {nll['val']:.4f}) "
        f"with K={gmm.n_components} components"
    )
    print(f"wrote gmm.npz, summary.json to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m nflow_np.vi_cli vi …``: the ``vi`` subcommand on its own, until ``nflow`` mounts it."""
    parser = argparse.ArgumentParser(prog="python -m nflow_np.vi_cli")
    add_vi_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, OSError) as error:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"{parser.prog} {args.command}: training diverged: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
