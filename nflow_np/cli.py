"""The ``nflow`` command: train a model on a toy density, evaluate it, sample from it.

A thin shell over the library: :func:`~nflow_np.data.load_toy`, :func:`~nflow_np.architectures.build_model`,
:func:`~nflow_np.train.fit`, :mod:`nflow_np.io` and :mod:`nflow_np.plots` do the work.

    nflow train --data two_moons --model realnvp --out runs/moons --checkpoint-every 500
    nflow train --resume runs/moons          # after a crash: continues, bit for bit
    nflow eval runs/moons
    nflow sample runs/moons -n 5000 --out samples.csv
    nflow train --data digits --model realnvp      # image flows: nflow_np.image_training, docs/images.md

Exit codes: 0 success; 2 bad arguments, unknown data set, unreadable model folder or other bad
input (one line on stderr); 1 training diverged (non-finite loss).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from nflow_np.architectures import MODELS, build_model
from nflow_np.backend import BACKENDS, set_backend
from nflow_np.checkpoint import CheckpointError, latest_checkpoint
from nflow_np.cli_types import number, positive_ints
from nflow_np.data import TOY_DATASETS, load_toy
from nflow_np.data.images import IMAGE_DATASETS
from nflow_np.data.toy2d import Splits
from nflow_np.image_models import load_image_model
from nflow_np.io import CONFIG_FILE, WEIGHTS_FILE, ModelFileError, atomic_write, load_model, read_config, save_model
from nflow_np.model import FlowModel
from nflow_np.nn import ACTIVATIONS
from nflow_np.optim import Adam
from nflow_np.threads import num_threads
from nflow_np.train import NonFiniteLossError, TrainResult, evaluate_nll, fit
from nflow_np.validation import NonFiniteError
from nflow_np.vi_cli import add_gmm_arguments, add_vi_subcommand, run_gmm_command

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
    "plots": True,
    "checkpoint_every": 0,
    "resume": None,
    "skip_nonfinite": False,
    "memory": "store",
    "anchor_every": None,
}
INVERT_TOLERANCE = {"float32": 1e-6, "float64": 1e-12}
"""``--memory invert`` without ``--anchor-every``: anchors chosen for this reconstruction error (docs/memory.md)."""
CHECKPOINT_DIR = "checkpoints"  # under the run's output folder
# what `nflow train --resume` may change: none of these changes the numbers of a run that never diverges
_RESUME_MAY_CHANGE = ("out", "progress", "plots", "checkpoint_every", "resume", "skip_nonfinite")
SAMPLE_DEFAULTS: dict[str, object] = {"n": 1000, "temperature": 1.0, "seed": 0, "out": None}  # out: DIR/samples.npy


class UsageError(Exception):
    """Bad command-line arguments; ``main`` prints the message and returns 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print the usage and call sys.exit
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


_hidden = positive_ints("64,64", "widths")
"""``--hidden``: ``"64,64"`` → ``(64, 64)``."""


def build_parser() -> argparse.ArgumentParser:
    """The ``nflow`` argument parser (defaults from :data:`TRAIN_DEFAULTS` and :data:`SAMPLE_DEFAULTS`)."""
    positive, non_negative, above_zero = number(int, 1), number(int, 0), number(float, 0, strict=True)
    default = " (default: %(default)s)"
    parser = _Parser(prog="nflow", description="Normalizing flows in NumPy: train, evaluate, sample.")
    parser.add_argument(
        "--backend",
        choices=[*BACKENDS, "auto"],
        default=None,
        help="coupling-law implementation, before the command: nflow --backend numba train ... "
        "(default: $NFLOW_BACKEND, else auto: numba when it is installed, else numpy)",
    )
    parser.add_argument(
        "--threads",
        type=positive,
        default=None,
        help="threads for the library's compute (default: the cores no other process keeps busy; "
        "nflow_np.threads chooses the BLAS/Numba split per operation)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,sample,vi,bench}")

    d = TRAIN_DEFAULTS
    train = commands.add_parser("train", help="fit a model to a toy data set")
    train.add_argument(
        "--data", choices=[*TOY_DATASETS, *IMAGE_DATASETS], default=d["data"], help="toy or image data set" + default
    )
    train.add_argument("--model", choices=[*MODELS, "gmm"], default=d["model"], help="architecture" + default)
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
    train.add_argument("--no-plots", dest="plots", action="store_false", help="skip the density and sample plots")
    train.add_argument(
        "--checkpoint-every",
        type=non_negative,
        default=d["checkpoint_every"],
        metavar="N",
        help=f"write OUT/{CHECKPOINT_DIR}/checkpoint-<step>.npz every N steps and at the end, 0: never" + default,
    )
    train.add_argument(
        "--resume", type=Path, default=d["resume"], metavar="DIR", help="continue the run whose output folder is DIR"
    )
    train.add_argument(
        "--skip-nonfinite", action="store_true", help="skip (and count) batches with a NaN/Inf loss instead of stopping"
    )
    train.add_argument(
        "--memory",
        choices=["store", "invert"],
        default=d["memory"],
        help="store every layer's activations, or recompute them by inversion in the backward pass "
        "(memory flat in depth, docs/memory.md)" + default,
    )
    train.add_argument(
        "--anchor-every",
        type=positive,
        default=d["anchor_every"],
        metavar="K",
        help="with --memory invert: store the input of every K-th layer (default: chosen from a measured "
        "reconstruction error of 1e-12 in float64, 1e-6 in float32)",
    )
    image_only = " (image data only; default: the recipe's, nflow_np.image_training.IMAGE_RECIPES)"
    train.add_argument("--weight-decay", type=number(float, 0), help="AdamW weight decay" + image_only)
    train.add_argument("--time-limit", type=above_zero, help="training budget in seconds" + image_only)
    train.add_argument("--alpha", type=number(float, 0), help="logit transform's α, e.g. 0.05" + image_only)
    add_gmm_arguments(train)
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
    sample.add_argument(
        "--out",
        type=Path,
        default=s["out"],
        help=".npy or .csv file, or .png for an image model's grid (default: DIR/samples.npy; an image model's .npy "
        "holds (N, C, H, W) images, its .csv one flattened image per row)",
    )
    sample.set_defaults(handler=_sample)

    add_vi_subcommand(commands)
    # every argument after `bench` goes to the suite's own parser: no prefix chars here, so none is an option
    bench = commands.add_parser("bench", help="run the benchmark suite (nflow bench --help)", add_help=False,
                                prefix_chars="\0")
    bench.add_argument("bench_args", nargs="*")
    bench.set_defaults(handler=_bench)
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


def _resumed_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """The arguments of the run in ``args.resume``, read from its newest good checkpoint.

    They are re-parsed like a command line, so a damaged or hostile checkpoint cannot pass a value
    the parser would refuse. An option given now with a value other than its default must agree
    with the recorded one, except those in :data:`_RESUME_MAY_CHANGE`.
    """
    checkpoint, _ = latest_checkpoint(args.resume / CHECKPOINT_DIR)
    recorded = checkpoint.metadata.get("arguments")
    if not isinstance(recorded, dict):
        raise CheckpointError(f"{checkpoint.path}: records no nflow train arguments")
    recorded_keys = [key for key in TRAIN_DEFAULTS if key not in _RESUME_MAY_CHANGE]
    argv = ["train"]
    for key in recorded_keys:
        value = recorded.get(key)
        if isinstance(value, list):
            value = ",".join(map(str, value))
        if value is not None:
            argv.append(f"--{key.replace('_', '-')}={value}")
    try:
        resumed = build_parser().parse_args(argv)
    except (UsageError, SystemExit) as error:
        raise CheckpointError(f"{checkpoint.path}: its recorded arguments do not parse: {error}") from None
    defaults = build_parser().parse_args(["train"])
    for key in recorded_keys:
        given = getattr(args, key)
        if given != getattr(defaults, key) and given != getattr(resumed, key):
            flag = f"--{key.replace('_', '-')}"
            raise ValueError(f"{flag} {given} differs from the resumed run's {getattr(resumed, key)}; leave it out")
    if args.out is not None and args.out != args.resume:
        raise ValueError(f"--out {args.out} differs from --resume {args.resume}; a resumed run writes to its folder")
    for key in _RESUME_MAY_CHANGE:
        setattr(resumed, key, getattr(args, key))
    resumed.out = args.resume
    every = recorded.get("checkpoint_every")
    resumed.checkpoint_every = args.checkpoint_every or (every if type(every) is int and every > 0 else 0)
    return resumed


def _fit(args: argparse.Namespace, out: Path, arguments: dict, model: FlowModel, splits: Splits) -> TrainResult:
    """:func:`~nflow_np.train.fit` with the command's arguments; checkpoints go to ``out/checkpoints``."""
    return fit(
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
        skip_nonfinite=args.skip_nonfinite,
        checkpoint_dir=out / CHECKPOINT_DIR if args.checkpoint_every or args.resume else None,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume is not None,
        metadata={"arguments": arguments},
        progress=args.progress,
    )


def _nll(model: FlowModel, x: np.ndarray) -> float:
    """Mean NLL of ``x``; ``inf`` (null in summary.json) if a row's density overflows, as an outlier may."""
    try:
        return evaluate_nll(model, x)
    except NonFiniteError:
        return math.inf


def _train(args: argparse.Namespace) -> int:
    if args.model == "gmm":
        return run_gmm_command(args)
    if args.resume is not None:
        args = _resumed_arguments(args)
    if args.data in IMAGE_DATASETS:
        if args.checkpoint_every or args.resume or args.skip_nonfinite:
            raise ValueError("--checkpoint-every, --resume and --skip-nonfinite apply to toy data only")
        return _train_images(args)
    if args.weight_decay is not None or args.time_limit is not None or args.alpha is not None:
        raise ValueError("--weight-decay, --time-limit and --alpha apply to image data (digits, mnist) only")
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
    ).to_device()  # the active backend's array module: on a GPU backend the whole model lives on the device
    if args.anchor_every is not None and args.memory != "invert":
        raise ValueError("--anchor-every applies to --memory invert only")
    tolerance = INVERT_TOLERANCE[args.dtype] if args.memory == "invert" and args.anchor_every is None else None
    model.set_memory(args.memory, args.anchor_every, tolerance)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _fit(args, out, arguments, model, splits)
    for warning in caught:
        print(f"nflow train: warning: {warning.message}", file=sys.stderr)
    nll = {
        "train": _nll(model, splits.train),
        "val": result.best_val_nll,
        "test": _nll(model, splits.test),
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
        "skipped_batches": result.skipped_batches,
        "resumed_from": result.resumed_from,
        "checkpoint": result.checkpoint,
        "history": result.history,
    }
    atomic_write(out / "summary.json", (json.dumps(_json_ready(summary), indent=2) + "\n").encode("utf-8"))
    files = [WEIGHTS_FILE, CONFIG_FILE, "summary.json"]
    if model.dim == 2 and args.plots:
        from nflow_np import plots  # matplotlib is only imported when there is something to draw

        plots.plot_density(model, splits.test, out / "density.png")
        plots.plot_samples(model, splits.test, out / "samples.png", seed=args.seed)
        files += ["density.png", "samples.png"]

    stopped = ", stopped early" if result.stopped_early else ""
    stopped += f", skipped {result.skipped_batches} non-finite batches" if result.skipped_batches else ""
    print(
        f"{args.data} / {args.model}: test NLL {nll['test']:.4f} nats (train {nll['train']:.4f}, "
        f"val {nll['val']:.4f}); best epoch {result.best_epoch} of {len(result.history)}{stopped}; "
        f"{result.steps} steps in {result.seconds:.1f} s"
    )
    print(f"wrote {', '.join(files)} to {out}")
    return 0


def _train_images(args: argparse.Namespace) -> int:
    """``nflow train --data digits|mnist``: options left at their toy defaults take the image recipe's values."""
    from nflow_np.image_training import train_image_model

    toy_only = {"layers": "--layers", "activation": "--activation", "lr_schedule": "--lr-schedule",
                "clip_norm": "--clip-norm", "n_train": "--n-train", "n_val": "--n-val", "n_test": "--n-test"}
    for name, flag in toy_only.items():
        if getattr(args, name) != TRAIN_DEFAULTS[name]:
            raise ValueError(f"{flag} applies to toy data only; image data use fixed splits and recipes")
    overrides = {name: getattr(args, name) for name in ("epochs", "batch_size", "lr", "patience")
                 if getattr(args, name) != TRAIN_DEFAULTS[name]}
    if args.hidden != _hidden(TRAIN_DEFAULTS["hidden"]):
        overrides["hidden"] = args.hidden
    if "patience" in overrides:
        overrides["patience"] = overrides["patience"] or None
    overrides |= {
        name: getattr(args, name) for name in ("weight_decay", "time_limit", "alpha") if getattr(args, name) is not None
    }
    if args.anchor_every is not None and args.memory != "invert":
        raise ValueError("--anchor-every applies to --memory invert only")
    memory = {"memory": args.memory, "anchor_every": args.anchor_every}
    if args.memory == "invert" and args.anchor_every is None:
        memory["tolerance"] = INVERT_TOLERANCE["float32"]  # image models train in float32
    out = args.out or Path("runs") / f"{args.data}-{args.model}"
    summary = train_image_model(
        args.data, args.model, out, seed=args.seed, progress=args.progress, **memory, **overrides
    )
    print(
        f"{args.data} / {args.model}: test NLL {summary['test_nll']:.2f} nats per image, "
        f"{summary['test_bits_per_dim']:.4f} bits/dim (log-likelihood on [0, 1]: "
        f"{summary['test_log_likelihood_01']:.1f} nats); best epoch {summary['best_epoch']} of "
        f"{summary['epochs_run']}, {summary['steps']} steps in {summary['train_seconds']:.1f} s"
    )
    print(f"wrote model.npz, model.json, summary.json, samples.png, reconstructions.png, interpolations.png to {out}")
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
    model = load_model(model_dir).to_device()
    # the test split has its own random stream, so one training point is enough to get it unchanged
    splits = load_toy(data, n_train=1, n_val=1, n_test=n_test, seed=seed, dtype=model.dtype or np.float64)
    return evaluate_nll(model, splits.test), data, seed, n_test


def _eval(args: argparse.Namespace) -> int:
    if (args.model_dir / "gmm.npz").exists() and not (args.model_dir / CONFIG_FILE).exists():
        return _eval_gmm(args)
    if "image_shape" in read_config(args.model_dir)["metadata"]:
        return _eval_images(args)
    nll, data, seed, n_test = evaluate_model(args.model_dir, args.data, args.seed, args.n_test)
    print(f"test NLL {nll:.4f} nats on {data} ({n_test} points, seed {seed})")
    return 0


def _eval_gmm(args: argparse.Namespace) -> int:
    """``nflow eval DIR`` for a folder written by ``nflow train --model gmm`` (``gmm.npz``, ``summary.json``)."""
    from nflow_np.gmm import GaussianMixture

    try:
        summary = json.loads((args.model_dir / "summary.json").read_text())
        with np.load(args.model_dir / "gmm.npz", allow_pickle=False) as saved:
            gmm = GaussianMixture.from_parameters(saved["weights"], saved["means"], saved["covariances"])
    except (OSError, ValueError, KeyError) as error:  # unreadable, not JSON, missing arrays, bad parameters
        raise ModelFileError(f"{args.model_dir}: not a readable Gaussian-mixture folder ({error})") from error
    data = args.data or summary.get("data")
    if data is None:
        raise ValueError(f"{args.model_dir} records no data set; pass --data")
    seed = summary.get("seed", 0) if args.seed is None else args.seed  # folders from before seed was recorded: 0
    n_test = args.n_test or summary.get("n_test", TRAIN_DEFAULTS["n_test"])
    splits = load_toy(data, n_train=1, n_val=1, n_test=n_test, seed=seed)
    print(f"test NLL {gmm.nll(splits.test):.4f} nats on {data} ({n_test} points, seed {seed})")
    return 0


def _eval_images(args: argparse.Namespace) -> int:
    """``nflow eval DIR`` for a model written by ``nflow train --data digits|mnist``: its test split."""
    from nflow_np.data.images import load_images
    from nflow_np.image_models import load_image_model

    if args.data is not None or args.n_test is not None:
        raise ValueError("--data and --n-test apply to toy models; an image model is evaluated on its own test split")
    metadata = read_config(args.model_dir)["metadata"]
    seed = metadata.get("seed", 0) if args.seed is None else args.seed
    model = load_image_model(args.model_dir)
    splits = load_images(metadata["data"], seed=seed, dtype=model.dtype)
    metrics = model.evaluate(splits.test, seed=seed)
    print(
        f"test NLL {metrics['nll']:.2f} nats per image, {metrics['bits_per_dim']:.4f} bits/dim, "
        f"log-likelihood on [0, 1] {metrics['log_likelihood_01']:.1f} nats on {metadata['data']} "
        f"({len(splits.test)} images, seed {seed})"
    )
    return 0


def _bench(args: argparse.Namespace) -> int:
    """``nflow bench ARGS``: ``python -m benchmarks ARGS`` (the suite lives in the repository, beside the package)."""
    from benchmarks import suite

    return suite.main(args.bench_args)


def _sample(args: argparse.Namespace) -> int:
    out = args.out or args.model_dir / "samples.npy"
    if out.suffix not in (".npy", ".csv", ".png"):
        raise ValueError(f"--out must end in .npy, .csv or .png, got {str(out)!r}")
    images = "image_shape" in read_config(args.model_dir)["metadata"]  # written by nflow train --data digits|mnist
    if out.suffix == ".png" and not images:
        raise ValueError(f"--out {out.name}: a PNG grid is for image models; {args.model_dir} holds rows (.npy, .csv)")
    model = (load_image_model(args.model_dir) if images else load_model(args.model_dir)).to_device()
    # an image model's samples are (N, C, H, W) integer levels; a toy model's (N, D) rows
    x = model.sample(args.n, np.random.default_rng(args.seed), temperature=args.temperature)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        from nflow_np.image_plots import save_grid

        with tempfile.TemporaryDirectory(dir=out.parent) as scratch:  # drawn aside, then moved in whole
            drawn = save_grid(x, model.levels, Path(scratch) / out.name, f"{args.n} samples, T = {args.temperature:g}")
            atomic_write(out, drawn.read_bytes())
        print(f"wrote a grid of {args.n} samples to {out}")
        return 0
    if out.suffix == ".npy":
        buffer = io.BytesIO()
        np.save(buffer, x)
        content = buffer.getvalue()
    else:
        rows = x.reshape(x.shape[0], -1)  # a CSV row per sample: images flattened in C order
        text = io.StringIO()
        digits = 17 if rows.dtype == np.float64 else 9  # enough to read back the exact value
        header = ",".join(f"x{j}" for j in range(rows.shape[1]))
        np.savetxt(text, rows, fmt=f"%.{digits}g", delimiter=",", header=header, comments="")
        content = text.getvalue().encode("utf-8")
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
        if args.backend is not None:
            set_backend(args.backend)
        with num_threads(args.threads):
            return args.handler(args)
    except (ModelFileError, ValueError, OSError, ImportError) as error:  # ImportError: a missing optional package
        print(f"nflow {args.command}: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"nflow {args.command}: training diverged: {error}", file=sys.stderr)
        return 1
