"""The ``nflow`` command: train a model on a toy density, evaluate it, sample from it.

A thin shell over the library: :func:`~nflow_np.data.load_toy`, :func:`~nflow_np.architectures.build_model`,
:func:`~nflow_np.train.fit`, :mod:`nflow_np.io` and :mod:`nflow_np.plots` do the work.

    nflow train --data two_moons --model realnvp --out runs/moons
    nflow eval runs/moons
    nflow sample runs/moons -n 5000 --out samples.csv

Exit codes: 0 success; 2 bad arguments, unknown data set, unreadable model folder or other bad
input (one line on stderr); 1 training diverged (non-finite loss).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path

import numpy as np

from nflow_np.architectures import MODELS, build_model
from nflow_np.data import TOY_DATASETS, load_toy
from nflow_np.io import CONFIG_FILE, WEIGHTS_FILE, ModelFileError, atomic_write, load_model, read_config, save_model
from nflow_np.nn import ACTIVATIONS
from nflow_np.optim import Adam
from nflow_np.train import NonFiniteLossError, evaluate_nll, fit

# Every default of `nflow train`, in one place. `hidden` is parsed like the command-line value;
# `out` None means runs/<data>-<model>; `patience` 0 disables early stopping; `clip_norm` None: no clipping.
TRAIN_DEFAULTS: dict[str, object] = {
    "data": "two_moons",
    "model": "realnvp",
    "layers": 8,
    "hidden": "64,64",
    "activation": "relu",
    "epochs": 100,
    "batch_size": 256,
    "lr": 2e-3,
    "lr_schedule": "cosine",
    "patience": 20,
    "clip_norm": None,
    "dtype": "float64",
    "seed": 0,
    "n_train": 15000,
    "n_val": 5000,
    "n_test": 5000,
    "out": None,
    "progress": True,
}
SAMPLE_DEFAULTS: dict[str, object] = {"n": 1000, "temperature": 1.0, "seed": 0, "out": None}  # out: DIR/samples.npy


class UsageError(Exception):
    """Bad command-line arguments; ``main`` prints the message and returns 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print the usage and call sys.exit
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def _number(convert: type, minimum: float, strict: bool = False) -> object:
    """An argparse type: ``convert(text)``, finite, at least (or, if ``strict``, above) ``minimum``."""
    kind = "an integer" if convert is int else "a number"

    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"expected {kind} {'>' if strict else '>='} {minimum}, got {text!r}")
        return value

    return parse


def _hidden(text: str) -> tuple[int, ...]:
    """``"64,64"`` → ``(64, 64)``."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive widths like 64,64, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    """The ``nflow`` argument parser (defaults from :data:`TRAIN_DEFAULTS` and :data:`SAMPLE_DEFAULTS`)."""
    positive, non_negative, above_zero = _number(int, 1), _number(int, 0), _number(float, 0, strict=True)
    default = " (default: %(default)s)"
    parser = _Parser(prog="nflow", description="Normalizing flows in NumPy: train, evaluate, sample.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,sample}")

    d = TRAIN_DEFAULTS
    train = commands.add_parser("train", help="fit a model to a toy data set")
    train.add_argument("--data", choices=list(TOY_DATASETS), default=d["data"], help="toy data set" + default)
    train.add_argument("--model", choices=MODELS, default=d["model"], help="architecture" + default)
    train.add_argument("--layers", type=positive, default=d["layers"], help="coupling layers" + default)
    train.add_argument("--hidden", type=_hidden, default=d["hidden"], help="widths of each coupling net" + default)
    train.add_argument(
        "--activation", choices=list(ACTIVATIONS), default=d["activation"], help="nonlinearity" + default
    )
    train.add_argument("--epochs", type=positive, default=d["epochs"], help="maximum number of epochs" + default)
    train.add_argument("--batch-size", type=positive, default=d["batch_size"], help="rows per step" + default)
    train.add_argument("--lr", type=above_zero, default=d["lr"], help="Adam learning rate" + default)
    train.add_argument("--lr-schedule", choices=["constant", "cosine"], default=d["lr_schedule"], help=default)
    train.add_argument(
        "--patience",
        type=non_negative,
        default=d["patience"],
        help="epochs without a better val NLL before stopping, 0: never" + default,
    )
    train.add_argument("--clip-norm", type=above_zero, default=d["clip_norm"], help="gradient-norm clip" + default)
    train.add_argument("--dtype", choices=["float32", "float64"], default=d["dtype"], help=default)
    train.add_argument("--seed", type=non_negative, default=d["seed"], help="seeds data, init, shuffling" + default)
    train.add_argument("--n-train", type=positive, default=d["n_train"], help="training points" + default)
    train.add_argument("--n-val", type=positive, default=d["n_val"], help="validation points" + default)
    train.add_argument("--n-test", type=positive, default=d["n_test"], help="test points" + default)
    train.add_argument("--out", type=Path, default=d["out"], help="output folder (default: runs/<data>-<model>)")
    train.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    train.set_defaults(handler=_train, progress=d["progress"])

    evaluate = commands.add_parser("eval", help="test NLL of a saved model")
    evaluate.add_argument("model_dir", type=Path, metavar="DIR", help="folder written by nflow train")
    evaluate.add_argument("--data", choices=list(TOY_DATASETS), help="data set (default: the one it was trained on)")
    evaluate.add_argument("--seed", type=non_negative, help="data seed (default: the training seed)")
    evaluate.add_argument("--n-test", type=positive, help="test points (default: as in training)")
    evaluate.set_defaults(handler=_eval)

    s = SAMPLE_DEFAULTS
    sample = commands.add_parser("sample", help="draw samples from a saved model")
    sample.add_argument("model_dir", type=Path, metavar="DIR", help="folder written by nflow train")
    sample.add_argument("-n", type=positive, default=s["n"], help="number of samples" + default)
    sample.add_argument("--temperature", type=above_zero, default=s["temperature"], help="scales z" + default)
    sample.add_argument("--seed", type=non_negative, default=s["seed"], help=default)
    sample.add_argument("--out", type=Path, default=s["out"], help=".npy or .csv file (default: DIR/samples.npy)")
    sample.set_defaults(handler=_sample)
    return parser


def _json_ready(value: object) -> object:
    """``value`` with tuples as lists, paths as strings and non-finite floats as ``None`` (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _train(args: argparse.Namespace) -> int:
    out = args.out or Path("runs") / f"{args.data}-{args.model}"
    arguments = _json_ready({k: v for k, v in vars(args).items() if k not in ("handler", "command")} | {"out": out})
    splits = load_toy(
        args.data, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, seed=args.seed, dtype=args.dtype
    )
    model = build_model(
        args.model,
        splits.train.shape[1],
        layers=args.layers,
        hidden=args.hidden,
        activation=args.activation,
        dtype=args.dtype,
        seed=args.seed,
    )
    result = fit(
        model,
        splits.train,
        splits.val,
        optimizer=Adam(model, lr=args.lr),
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        patience=args.patience or None,
        clip_norm=args.clip_norm,
        lr_schedule=args.lr_schedule,
        progress=args.progress,
    )
    nll = {
        "train": evaluate_nll(model, splits.train),
        "val": result.best_val_nll,
        "test": evaluate_nll(model, splits.test),
    }

    metadata = {"data": args.data, "model": args.model, "seed": args.seed, "n_test": args.n_test}
    save_model(model, out, _json_ready(metadata | {"test_nll": nll["test"], "arguments": arguments}))
    summary = {
        "data": args.data,
        "model": args.model,
        "arguments": arguments,
        "n_params": model.num_parameters(),
        "nll_unit": "nats",
        "train_nll": nll["train"],
        "val_nll": nll["val"],
        "test_nll": nll["test"],
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "steps": result.steps,
        "train_seconds": result.seconds,
        "stopped_early": result.stopped_early,
        "history": result.history,
    }
    atomic_write(out / "summary.json", (json.dumps(_json_ready(summary), indent=2) + "\n").encode("utf-8"))
    files = [WEIGHTS_FILE, CONFIG_FILE, "summary.json"]
    if model.dim == 2:
        from nflow_np import plots  # matplotlib is only imported when there is something to draw

        plots.plot_density(model, splits.test, out / "density.png")
        plots.plot_samples(model, splits.test, out / "samples.png", seed=args.seed)
        files += ["density.png", "samples.png"]

    stopped = ", stopped early" if result.stopped_early else ""
    print(
        f"{args.data} / {args.model}: test NLL {nll['test']:.4f} nats (train {nll['train']:.4f}, "
        f"val {nll['val']:.4f}); best epoch {result.best_epoch} of {len(result.history)}{stopped}; "
        f"{result.steps} steps in {result.seconds:.1f} s"
    )
    print(f"wrote {', '.join(files)} to {out}")
    return 0


def evaluate_model(
    model_dir: Path, data: str | None = None, seed: int | None = None, n_test: int | None = None
) -> tuple[float, str, int, int]:
    """Test NLL (nats) of the model in ``model_dir``; unset arguments come from its metadata.

    Parameters
    ----------
    model_dir : pathlib.Path
        A folder written by ``nflow train`` (or :func:`~nflow_np.io.save_model` with ``data`` metadata).
    data : str, optional
        Toy data set name.
    seed : int, optional
        Data seed.
    n_test : int, optional
        Number of test points.

    Returns
    -------
    (nll, data, seed, n_test) : (float, str, int, int)
    """
    metadata = read_config(model_dir)["metadata"]
    data = data or metadata.get("data")
    if data is None:
        raise ValueError(f"{model_dir} records no data set; pass --data")
    seed = metadata.get("seed", 0) if seed is None else seed
    n_test = n_test or metadata.get("n_test", TRAIN_DEFAULTS["n_test"])
    model = load_model(model_dir)
    # the test split has its own random stream, so one training point is enough to get it unchanged
    splits = load_toy(data, n_train=1, n_val=1, n_test=n_test, seed=seed, dtype=model.dtype or np.float64)
    return evaluate_nll(model, splits.test), data, seed, n_test


def _eval(args: argparse.Namespace) -> int:
    nll, data, seed, n_test = evaluate_model(args.model_dir, args.data, args.seed, args.n_test)
    print(f"test NLL {nll:.4f} nats on {data} ({n_test} points, seed {seed})")
    return 0


def _sample(args: argparse.Namespace) -> int:
    out = args.out or args.model_dir / "samples.npy"
    if out.suffix not in (".npy", ".csv"):
        raise ValueError(f"--out must end in .npy or .csv, got {str(out)!r}")
    model = load_model(args.model_dir)
    x = model.sample(args.n, np.random.default_rng(args.seed), temperature=args.temperature)
    if out.suffix == ".npy":
        buffer = io.BytesIO()
        np.save(buffer, x)
        content = buffer.getvalue()
    else:
        text = io.StringIO()
        digits = 17 if x.dtype == np.float64 else 9  # enough to read back the exact value
        header = ",".join(f"x{j}" for j in range(x.shape[1]))
        np.savetxt(text, x, fmt=f"%.{digits}g", delimiter=",", header=header, comments="")
        content = text.getvalue().encode("utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, content)
    print(f"wrote {args.n} samples to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``nflow`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code.

    Parameters
    ----------
    argv : list of str, optional

    Returns
    -------
    int
        0 on success, 2 for bad input (message on stderr), 1 if training diverged.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as error:
        print(error, file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
    try:
        return args.handler(args)
    except (ModelFileError, ValueError, OSError) as error:
        print(f"nflow {args.command}: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"nflow {args.command}: training diverged: {error}", file=sys.stderr)
        return 1
