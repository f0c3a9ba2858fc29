"""The ``nflow`` command: parse, check, dispatch. The runs themselves live in the library.

    nflow train --data two_moons --model realnvp --out runs/moons --checkpoint-every 500
    nflow train --resume runs/moons          # after a crash: continues, bit for bit
    nflow train --resume runs/moons --epochs 200   # or longer (--epochs, --patience, --time-limit may change)
    nflow eval runs/moons
    nflow sample runs/moons -n 5000 --out samples.csv
    nflow train --data digits --model realnvp      # image flows: nflow_np.image_training, docs/images.md
    nflow train --data my.csv --out runs/mine      # your own data (.csv, .npy, .npz[:ARRAY]), nflow_np.cli_data
    nflow eval runs/mine --data new.csv            # log-density of new rows, in the file's units

Toy runs are :func:`nflow_np.density.train_density`, image runs
:func:`nflow_np.image_training.train_image_model`, the mixture :func:`nflow_np.vi_cli.run_gmm_command`.
Every option typed is honoured or refused with the reason (:mod:`nflow_np.cli_options`); the sizes
and the output folder are checked before any training (:mod:`nflow_np.preflight`).

Exit codes: 0 success; 2 bad arguments, unknown data set, unreadable model folder, a size that does
not fit, or other bad input (one line on stderr); 1 training diverged (non-finite loss).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nflow_np import __version__
from nflow_np.architectures import MODELS
from nflow_np.backend import BACKENDS, set_backend
from nflow_np.cli_data import eval_data, train_data
from nflow_np.cli_options import NETS, TRAIN_DEFAULTS, help_defaults
from nflow_np.cli_types import fraction, number, positive_ints
from nflow_np.data import TOY_DATASETS
from nflow_np.data.images import IMAGE_DATASETS
from nflow_np.io import ModelFileError
from nflow_np.nn import ACTIVATIONS
from nflow_np.threads import num_threads
from nflow_np.train import NonFiniteLossError
from nflow_np.vi_cli import add_gmm_arguments, add_vi_subcommand

__all__ = ["TRAIN_DEFAULTS", "UsageError", "build_parser", "main"]

SAMPLE_DEFAULTS: dict[str, object] = {"n": 1000, "temperature": 1.0, "seed": 0, "out": None}  # out: DIR/samples.npy


class UsageError(Exception):
    """Bad command-line arguments; ``main`` prints the message and returns 2."""


class _Parser(argparse.ArgumentParser):
    """No abbreviations (``--epoch`` is not ``--epochs``), and errors as one line instead of ``sys.exit``."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # argparse would print the usage and call sys.exit
        if "unrecognized arguments" in message and any(name in message for name in ("--backend", "--threads")):
            message += " (--backend and --threads go before the command: nflow --backend numba train ...)"
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


_hidden = positive_ints("64,64", "widths")
"""``--hidden``: ``"64,64"`` → ``(64, 64)``."""


def _peek(argv: list[str], option: str) -> str | None:
    """The value of ``option`` in ``argv`` (``--data x`` or ``--data=x``), read before parsing, for ``--help``."""
    for i, word in enumerate(argv):
        if word == option and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith(option + "="):
            return word.split("=", 1)[1]
    return None


def _show(value: object) -> str:
    """A default as the command line writes it: ``(64, 64)`` → ``64,64``, ``None`` → ``none``."""
    if isinstance(value, tuple | list):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def _add_train_arguments(train: argparse.ArgumentParser, data: str | None, model: str | None,
                         net: str | None = None) -> None:
    """The ``train`` options, every one with default ``SUPPRESS`` (absent unless typed); the help shows the
    defaults of the run the command line asks for (``nflow train --data digits --help``)."""
    defaults, whose = help_defaults(data, model, net)

    def default(name: str) -> str:
        if name not in defaults:
            return f" (not for {whose})"
        return f" (default for {whose}: {_show(defaults[name])})"

    positive, non_negative, above_zero = number(int, 1), number(int, 0), number(float, 0, strict=True)
    add = train.add_argument
    add("--data", type=train_data, metavar="DATA",
        help=f"a toy data set ({', '.join(TOY_DATASETS)}), an image data set ({', '.join(IMAGE_DATASETS)}), or your "
        "own data file: FILE.csv (header optional), FILE.npy, FILE.npz (one array) or FILE.npz:ARRAY"
        + default("data"))
    add("--model", choices=[*MODELS, "gmm"], help="architecture" + default("model"))
    add("--layers", type=positive, help="coupling layers" + default("layers"))
    add("--hidden", type=_hidden, help="widths of each coupling net" + default("hidden"))
    add("--activation", choices=list(ACTIVATIONS), help="nonlinearity" + default("activation"))
    add("--epochs", type=positive, help="maximum number of epochs" + default("epochs"))
    add("--batch-size", type=positive, help="rows per step" + default("batch_size"))
    add("--lr", type=above_zero, help="Adam learning rate" + default("lr"))
    add("--lr-schedule", choices=["constant", "cosine"], help="learning-rate schedule" + default("lr_schedule"))
    add("--patience", type=non_negative,
        help="epochs without a better val NLL before stopping, 0: never" + default("patience"))
    add("--clip-norm", type=above_zero, help="gradient-norm clip" + default("clip_norm"))
    add("--dtype", choices=["float32", "float64"], help="floating-point type" + default("dtype"))
    add("--seed", type=non_negative, help="seeds data, init, shuffling" + default("seed"))
    add("--n-train", type=positive, help="training points" + default("n_train"))
    add("--n-val", type=positive, help="validation points" + default("n_val"))
    add("--n-test", type=positive, help="test points" + default("n_test"))
    add("--val-fraction", type=fraction, help="data file only: share of its rows held out for validation, "
        "chosen at random with --seed" + default("val_fraction"))
    add("--test-fraction", type=fraction, help="data file only: share of its rows held out for the test NLL"
        + default("test_fraction"))
    add("--out", type=Path,
        help="output folder (default: runs/<data>-<model>; runs/<data>-realnvp_resnet for --net resnet)")
    add("--force", action="store_true",
        help="replace the run in --out (its model stays until the new one is saved)" + default("force"))
    add("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    add("--no-plots", dest="plots", action="store_false", help="skip the density and sample plots" + default("plots"))
    add("--checkpoint-every", type=non_negative, metavar="N",
        help="write OUT/checkpoints/checkpoint-<step>.npz every N steps (image runs: every N epochs) and at the "
        "end, 0: only at the end"
        + default("checkpoint_every"))
    add("--resume", type=Path, metavar="DIR",
        help="continue the run whose output folder is DIR; --epochs, --patience and --time-limit may change its "
        "length"
        + default("resume"))
    add("--skip-nonfinite", action="store_true",
        help="skip (and count) batches with a NaN/Inf loss instead of stopping" + default("skip_nonfinite"))
    add("--memory", choices=["store", "invert"], help="store every layer's activations, or recompute them by "
        "inversion in the backward pass (memory flat in depth, docs/memory.md)" + default("memory"))
    add("--anchor-every", type=positive, metavar="K", help="with --memory invert: store the input of every K-th "
        "layer (default: chosen from a measured reconstruction error of 1e-12 in float64, 1e-6 in float32)")
    add("--weight-decay", type=number(float, 0), help="AdamW weight decay" + default("weight_decay"))
    add("--time-limit", type=above_zero, help="training budget in seconds" + default("time_limit"))
    add("--alpha", type=number(float, 0), help="logit transform's α, e.g. 0.05" + default("alpha"))
    add("--net", choices=list(NETS), help="RealNVP's coupling nets on images: MLPs, or the paper's convolutional "
        "ResNets (docs/conv.md)" + default("net"))
    add("--blocks", type=non_negative, help="residual blocks per ResNet" + default("blocks"))
    add("--channels", type=positive, help="feature maps of the ResNets" + default("channels"))
    add_gmm_arguments(train, default)
    for action in train._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``nflow`` argument parser; ``argv`` (if given) picks the defaults ``train --help`` shows."""
    argv = [] if argv is None else list(argv)
    non_negative = number(int, 0)
    parser = _Parser(prog="nflow", description="Normalizing flows in NumPy: train, evaluate, sample.")
    parser.add_argument("--version", action="version", version=f"nflow_np {__version__}")
    parser.add_argument(
        "--backend",
        choices=[*BACKENDS, "auto"],
        default=None,
        help="coupling-law implementation, before the command: nflow --backend numba train ... "
        "(default: $NFLOW_BACKEND, else auto: numba when it is installed, else numpy)",
    )
    parser.add_argument(
        "--threads",
        type=number(int, 1),
        default=None,
        help="threads for the library's compute (default: the cores no other process keeps busy; "
        "nflow_np.threads chooses the BLAS/Numba split per operation)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,sample,vi,bench}")

    train = commands.add_parser("train", help="fit a model to a toy or image data set, or to your own data file")
    _add_train_arguments(train, _peek(argv, "--data"), _peek(argv, "--model"), _peek(argv, "--net"))
    train.set_defaults(handler=_handler("train"))

    evaluate = commands.add_parser("eval", help="test NLL of a saved model")
    evaluate.add_argument("model_dir", type=Path, metavar="DIR", help="folder written by nflow train")
    evaluate.add_argument("--data", type=eval_data, metavar="DATA",
                          help="a toy data set, or a data file (.csv, .npy, .npz[:ARRAY]) whose every row is scored "
                          "in its own units (default: the test split of the data it was trained on)")
    evaluate.add_argument("--seed", type=non_negative, help="toy data seed (default: the training seed)")
    evaluate.add_argument("--n-test", type=number(int, 1), help="toy test points (default: as in training)")
    evaluate.add_argument("--out", type=Path, help="also write log p(x) of every row scored, in nats (.npy or .csv)")
    evaluate.set_defaults(handler=_handler("eval"))

    s = SAMPLE_DEFAULTS
    sample = commands.add_parser("sample", help="draw samples from a saved model (flow or mixture)")
    sample.add_argument("model_dir", type=Path, metavar="DIR", help="folder written by nflow train")
    sample.add_argument("-n", type=number(int, 1), default=s["n"], help="number of samples (default: %(default)s)")
    sample.add_argument("--temperature", type=number(float, 0, strict=True), default=None,
                        help="scales z, flows only (default: 1)")
    sample.add_argument("--seed", type=non_negative, default=s["seed"], help="(default: %(default)s)")
    sample.add_argument(
        "--out",
        type=Path,
        default=s["out"],
        help=".npy or .csv file, or .png for an image model's grid (default: DIR/samples.npy; an image model's .npy "
        "holds (N, C, H, W) images, its .csv one flattened image per row)",
    )
    sample.set_defaults(handler=_handler("sample"))

    add_vi_subcommand(commands)
    # every argument after `bench` goes to the suite's own parser: no prefix chars here, so none is an option
    bench = commands.add_parser("bench", help="run the benchmark suite (nflow bench --help)", add_help=False,
                                prefix_chars="\0")
    bench.add_argument("bench_args", nargs="*")
    bench.set_defaults(handler=_bench)
    return parser


def _handler(command: str) -> object:
    """The handler of ``command`` in :mod:`nflow_np.cli_commands`, imported when it runs (``--help`` stays fast)."""

    def run(args: argparse.Namespace) -> int:
        from nflow_np import cli_commands

        return getattr(cli_commands, {"eval": "evaluate"}.get(command, command))(args)

    return run


def given_options(args: argparse.Namespace) -> dict[str, object]:
    """The ``train`` options typed on the command line (the parser leaves every other one out)."""
    return {key: value for key, value in vars(args).items() if key not in ("handler", "command", "backend", "threads")}


def _bench(args: argparse.Namespace) -> int:
    """``nflow bench ARGS``: ``python -m benchmarks ARGS`` (the suite lives in the repository, beside the package)."""
    import importlib

    from nflow_np.packaging import sibling_package

    return importlib.import_module(f"{sibling_package('benchmarks')}.suite").main(args.bench_args)


def main(argv: list[str] | None = None) -> int:
    """Run ``nflow`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code.

    Parameters
    ----------
    argv : list of str, optional

    Returns
    -------
    int
        0 on success, 2 for bad input (one line on stderr), 1 if training diverged.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except UsageError as error:
        print(error, file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help, --version
        return exit_.code if isinstance(exit_.code, int) else 0
    from nflow_np.distributed_cli import command_line

    with command_line(args.command) as job:  # under mpiexec: every rank runs it, rank 0 speaks (docs/distributed.md)
        try:
            if args.backend is not None:
                set_backend(args.backend)
            with num_threads(args.threads):
                return args.handler(args)
        except (ModelFileError, ValueError, OSError, ImportError) as error:  # ImportError: an optional package
            if job.says(error):
                print(f"nflow {args.command}: error: {_one_line(error)}", file=sys.stderr)
            return 2
        except MemoryError as error:
            detail = f" ({error})" if str(error) else ""
            if job.says(error):
                print(f"nflow {args.command}: error: out of memory{detail}; ask for fewer rows, samples or "
                      "parameters", file=sys.stderr)
            return 2
        except NonFiniteLossError as error:
            if job.says(error):
                print(f"nflow {args.command}: training diverged: {_one_line(error)}", file=sys.stderr)
            return 1
        except Exception as error:  # raised on one rank of an MPI job and on every rank after it (nflow_np.distributed)
            if not getattr(error, "nflow_agreed", False):
                raise
            if job.says(error):
                print(f"nflow {args.command}: error: {_one_line(error)}", file=sys.stderr)
            return 2


def _one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (a multi-line message would read as several errors)."""
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())

