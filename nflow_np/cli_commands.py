"""What ``nflow train``, ``eval`` and ``sample`` do once parsed: resolve the options, check, dispatch, report.

The parser (:mod:`nflow_np.cli`) leaves out every option that was not typed, so ``args`` holds exactly
what the user asked for. :func:`train` resolves it (:func:`~nflow_np.cli_options.resolve_train`, or
the recorded arguments of a checkpoint for ``--resume``), runs the preflight checks
(:mod:`nflow_np.preflight`; a data file is read and checked there, :mod:`nflow_np.cli_data`), prints the
provenance line and calls the run in the library.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from nflow_np import cli_data, distributed
from nflow_np.cli_options import (
    FILE_DEFAULTS,
    NET_OPTIONS,
    TRAIN_DEFAULTS,
    image_model_name,
    image_record,
    resolve_train,
    resumed_options,
)
from nflow_np.data.files import is_data_file
from nflow_np.density import INVERT_TOLERANCE, json_ready
from nflow_np.io import CONFIG_FILE, atomic_write, load_model, read_config
from nflow_np.preflight import (
    check_memory,
    check_output_folder,
    check_writable,
    coupling_parameters,
    save_bytes,
    training_bytes,
    writer_lock,
)
from nflow_np.provenance import describe, provenance

IMAGE_DIMS = {"digits": 64, "mnist": 784}
"""Pixels per image, for the preflight estimate before the data set is loaded."""


def _given(args: argparse.Namespace) -> dict[str, object]:
    skip = ("handler", "command", "backend", "threads")
    return {key: value for key, value in vars(args).items() if key not in skip}


def _require_matplotlib(why: str, otherwise: str = "") -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(f"{why} needs matplotlib: pip install 'nflow_np[plots]'{otherwise}") from None


def preflight(options: dict[str, object], out: Path) -> None:
    """Refuse, before any training, a run whose folder, disk space or memory cannot hold it."""
    kind = options["kind"]
    if options.get("resume") is None:
        check_output_folder(out, force=bool(options.get("force")), kind=kind)
    if is_data_file(str(options["data"])):  # read and checked now: a bad row is refused before any training
        options["prepared"] = cli_data.prepare_run(options)
    if kind == "gmm":
        n_train, rows = cli_data.row_counts(options)
        biggest = max(options["components"])
        if biggest > n_train:
            sizes = "--n-train" if options.get("prepared") is None else "the data file's training split"
            raise ValueError(f"--components {biggest} exceeds the {n_train} training points ({sizes}): "
                             "a component needs data to fit")
        check_memory(8 * rows * (2 + 3 * biggest), "EM on these rows and components", "--n-train/--components")
        check_writable(out, 65536 + 64 * biggest)
        return
    itemsize = np.dtype(str(options["dtype"])).itemsize
    if kind == "image" and options.get("net") == "resnet":
        _preflight_resnet(options, out, itemsize)
        return
    hidden = tuple(options["hidden"])
    if kind == "image":
        dim, layers = IMAGE_DIMS[str(options["data"])], 8
        _require_matplotlib("an image run (it draws samples.png, reconstructions.png, interpolations.png)")
    else:
        prepared, (_, rows) = options.get("prepared"), cli_data.row_counts(options)
        dim, layers = (2 if prepared is None else prepared.splits.train.shape[1]), int(options["layers"])
        if dim < 2:
            raise ValueError(f"{options['data']} has one column: a coupling flow needs at least 2 (its layers "
                             "transform one part of the coordinates given the other); --model gmm fits one column")
        check_memory(3 * 8 * dim * rows, f"the data ({rows} rows)", "--n-train/--n-val/--n-test")
        if options["plots"] and dim == 2:
            _require_matplotlib("drawing density.png and samples.png", ", or pass --no-plots")
    n_params = coupling_parameters(dim, layers, hidden)
    needed = training_bytes(n_params, itemsize, int(options["batch_size"]), hidden, layers)
    check_memory(needed, f"a model of about {n_params:.3g} parameters", "--hidden/--layers")
    check_writable(out, save_bytes(n_params, itemsize))


def _preflight_resnet(options: dict[str, object], out: Path, itemsize: int) -> None:
    """The preflight of ``--net resnet``: its sizes come from ``--channels`` and ``--blocks``."""
    from nflow_np.image_models import realnvp_resnet_footprint

    _require_matplotlib("an image run (it draws samples.png, reconstructions.png, interpolations.png)")
    side = math.isqrt(IMAGE_DIMS[str(options["data"])])
    n_params, needed = realnvp_resnet_footprint((1, side, side), int(options["channels"]), int(options["blocks"]),
                                                int(options["batch_size"]), itemsize)  # fmt: skip
    check_memory(needed, f"a model of about {n_params:.3g} parameters", "--channels/--blocks/--batch-size")
    check_writable(out, save_bytes(n_params, itemsize))


def train(args: argparse.Namespace) -> int:
    """``nflow train``: resolve and check the options, then run the toy, image or mixture training."""
    given = _given(args)
    options = resumed_options(given) if given.get("resume") is not None else resolve_train(given)
    name = image_model_name(str(options["model"]), options.get("net"))  # the model, or realnvp_resnet
    out = Path(options["out"] or Path("runs") / f"{cli_data.run_name(str(options['data']))}-{name}")
    options["out"] = out
    preflight(options, out)
    with writer_lock(out):  # a second nflow train into this folder meanwhile is refused, naming this process
        return _run(options, out, args.threads)


def _run(options: dict[str, object], out: Path, threads: int | None) -> int:
    """The toy, image or mixture run of :func:`train`, once its options and folder are checked."""
    record = provenance(options.get("dtype", "float64"), threads)
    print(f"nflow: {describe(record)}", flush=True)
    if options.get("prepared") is not None:
        print(cli_data.describe_data(options["prepared"], int(options["seed"])), flush=True)
        cli_data.warn_constant(options["prepared"])
        if options["kind"] != "gmm":  # a mixture is fitted and saved in float64
            cli_data.warn_resolution(options["prepared"], str(options["dtype"]))
    if options["kind"] == "gmm":
        from nflow_np.vi_cli import run_gmm_command

        if distributed.launched_size() > 1:
            raise ValueError("a Gaussian mixture (--model gmm) is fitted in one process: run it without mpiexec")

        return run_gmm_command(argparse.Namespace(**options, provenance=record))
    comm = distributed.resolve("auto")  # MPI.COMM_WORLD under mpiexec -n P > 1 (docs/distributed.md)
    if options["kind"] == "image":
        return _train_images(options, out, record, comm)
    from nflow_np.density import describe as describe_run
    from nflow_np.density import train_density

    recorded = (*TRAIN_DEFAULTS, *FILE_DEFAULTS)
    arguments = {key: options[key] for key in recorded if key in options} | {"threads": threads}
    options["arguments"] = json_ready(arguments | {"given": options["given"]})
    options["threads"] = threads
    summary = train_density(options, out, comm)
    print(describe_run(summary))
    print(f"wrote {', '.join(summary['files'])} to {out}")
    return 0


def _train_images(options: dict[str, object], out: Path, record: dict, comm: object = None) -> int:
    """``nflow train --data digits|mnist``: the recipe's settings, each typed option in its place."""
    from tqdm.auto import tqdm

    from nflow_np.architectures import build_model
    from nflow_np.density import compile_kernels, remove_replaced, set_aside_checkpoints
    from nflow_np.image_training import train_image_model

    model_name = image_model_name(str(options["model"]), options.get("net"))  # an IMAGE_RECIPES key
    sizes = NET_OPTIONS["resnet" if model_name == "realnvp_resnet" else "mlp"]  # the coupling nets' sizes
    settings = {key: options[key] for key in (*sizes, "epochs", "batch_size", "lr", "weight_decay", "time_limit",
                                               "alpha")}
    settings["patience"] = options["patience"] or None
    memory = {"memory": options["memory"], "anchor_every": options["anchor_every"]}
    if options["memory"] == "invert" and options["anchor_every"] is None:
        memory["tolerance"] = INVERT_TOLERANCE[str(options["dtype"])]
    budget = f", at most {options['time_limit']:g} s" if options["time_limit"] else ""
    bar = tqdm(total=options["epochs"], disable=not options["progress"], desc=f"epochs{budget}", unit="epoch",
               leave=False)

    def on_epoch(entry: dict) -> None:
        bar.update(entry["epoch"] - bar.n)  # a resumed run's bar starts where it was
        bar.set_postfix(val_nll=f"{entry['val_nll']:.2f}", refresh=True)

    if options.get("force"):
        distributed.on_root(comm, lambda: set_aside_checkpoints(out))
    # the kernels the image models share with a small toy model (coupling laws, nets, Adam), compiled before
    # the progress bar starts, so that its ETA measures training
    probe = build_model("realnvp", 2, layers=1, hidden=(4,), dtype=options["dtype"])
    compile_kernels(probe, np.zeros((8, 2), dtype=options["dtype"]), say=options["progress"])
    checkpoints = {"checkpoint_every": options["checkpoint_every"], "resume": options["resume"] is not None,
                   "metadata": {"arguments": json_ready(image_record(options))}}
    try:
        with warnings.catch_warnings(record=True) as caught:  # e.g. a damaged checkpoint passed over
            warnings.simplefilter("always")
            summary = train_image_model(
                options["data"], model_name, out, seed=options["seed"], dtype=options["dtype"], progress=False,
                on_epoch=on_epoch, comm=comm, **memory, **settings, **checkpoints,
                record={"provenance": record, "backend": record["backend"], "ranks": distributed.size(comm)},
            )
    finally:
        bar.close()
    for warning in caught:
        print(f"nflow train: warning: {warning.message}", file=sys.stderr)
    remove_replaced(out)
    print(
        f"{options['data']} / {model_name}: test NLL {summary['test_nll']:.2f} nats per image, "
        f"{summary['test_bits_per_dim']:.4f} bits/dim (log-likelihood on [0, 1]: "
        f"{summary['test_log_likelihood_01']:.1f} nats); best epoch {summary['best_epoch']} of "
        f"{summary['epochs_run']}, {summary['steps']} steps in {summary['train_seconds']:.1f} s"
    )
    print(
        f"wrote model.safetensors, model.json, summary.json, samples.png, reconstructions.png, interpolations.png "
        f"to {out}"
    )
    return 0


# -- eval ----------------------------------------------------------------------------------------


def _require_model(folder: Path) -> None:
    """Refuse, naming the command that would write it, a folder that holds no model at all."""
    if (folder / CONFIG_FILE).exists() or (folder / "gmm.npz").exists():
        return
    name = folder.name
    data, _, model = name.rpartition("-")
    model = {"realnvp_resnet": "realnvp --net resnet"}.get(model, model)
    suggestion = (f"nflow train --data {data} --model {model}"
                  if data and model in ("realnvp", "nice", "gmm", "realnvp --net resnet")
                  else f"nflow train --out {folder}")
    where = "does not exist" if not folder.exists() else f"holds no model ({CONFIG_FILE} or gmm.npz)"
    raise ValueError(f"{folder} {where}: train one first with `{suggestion}`")


def _is_mixture(folder: Path) -> bool:
    return (folder / "gmm.npz").exists() and not (folder / CONFIG_FILE).exists()


def _load_mixture(folder: Path) -> tuple[object, dict]:
    """The mixture and ``summary.json`` of a folder written by ``nflow train --model gmm``, with every check
    model files get (:func:`~nflow_np.files.gmm_files.load_gmm`: no FIFO, link, zip bomb or hostile JSON)."""
    from nflow_np.gmm import GaussianMixture

    return GaussianMixture.load(folder)


def evaluate(args: argparse.Namespace) -> int:
    """``nflow eval DIR``: the test NLL of a saved flow, image model or mixture; with ``--data FILE`` the NLL of
    every row of FILE, in its units (:mod:`nflow_np.cli_data`); ``--out`` also writes ``log p`` per row."""
    from nflow_np.train import evaluate_nll

    if args.out is not None and args.out.suffix not in (".npy", ".csv"):
        raise ValueError(f"--out must end in .npy or .csv, got {str(args.out)!r}")
    _require_model(args.model_dir)
    if _is_mixture(args.model_dir):
        mixture, record = _load_mixture(args.model_dir)
        dim = mixture.means.shape[1]  # a mixture is saved in the data's own units
    else:
        config = read_config(args.model_dir)
        record, mixture = config["metadata"], None
        if "image_shape" in record:
            return _evaluate_images(args, record)
        dim = config["dim"]
        model = load_model(args.model_dir).to_device()  # a model trained on a file: of its rows, in its units
    data_file = args.data is not None and is_data_file(args.data)
    cli_data.refuse_split_options(args, data_file or (args.data is None and "data_file" in record))
    if data_file:
        x, label = cli_data.file_rows(args.data, dim, args.model_dir)
    elif args.data is None and "data_file" in record:
        x, label = cli_data.recorded_test_split(record["data_file"], record.get("seed", 0), args.model_dir)
    else:
        from nflow_np.data import load_toy

        data = args.data or record.get("data")
        if not isinstance(data, str):
            raise ValueError(f"{args.model_dir} records no data set; pass --data")
        seed = record.get("seed", 0) if args.seed is None else args.seed  # folders from before seed was recorded: 0
        n_test = args.n_test or record.get("n_test", TRAIN_DEFAULTS["n_test"])
        # the test split has its own random stream, so one training point is enough to get it unchanged
        dtype = np.float64 if mixture is not None else model.dtype or np.float64
        x = load_toy(data, n_train=1, n_val=1, n_test=n_test, seed=seed, dtype=dtype).test
        label = f"{data} ({n_test} points, seed {seed})"
    if mixture is not None:
        nll, log_p = mixture.nll(x), (mixture.log_prob(x) if args.out else None)
    else:
        x = cli_data.model_rows(x, model.dtype or np.float64, label)
        nll = evaluate_nll(model, x)
        log_p = cli_data.log_density(model, x) if args.out else None
    print(f"{'NLL' if data_file else 'test NLL'} {nll:.4f} nats on {label}")
    if args.out is not None:
        cli_data.write_rows(args.out, log_p, header="log_p")
        print(f"wrote log p(x) of {len(log_p)} rows to {args.out}")
    return 0


def _evaluate_images(args: argparse.Namespace, metadata: dict) -> int:
    """``nflow eval DIR`` for a model written by ``nflow train --data digits|mnist``: its test split."""
    from nflow_np.data.images import load_images
    from nflow_np.image_models import load_image_model

    if args.data is not None or args.n_test is not None or args.out is not None:
        raise ValueError("--data, --n-test and --out apply to toy models and data files; an image model is evaluated "
                         "on its own test split")
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


# -- sample --------------------------------------------------------------------------------------


def _check_sample_size(n: int, dim: int, itemsize: int, widest: int, out: Path) -> None:
    check_memory(4 * n * (dim + widest) * itemsize, f"drawing {n} samples", "-n")
    nbytes = n * dim * (itemsize if out.suffix == ".npy" else 26)
    check_writable(out.parent, nbytes)


def sample(args: argparse.Namespace) -> int:
    """``nflow sample DIR``: draws from a saved flow (rows), image model (images) or mixture (rows)."""
    out = args.out or args.model_dir / "samples.npy"
    if out.suffix not in (".npy", ".csv", ".png"):
        raise ValueError(f"--out must end in .npy, .csv or .png, got {str(out)!r}")
    temperature = 1.0 if args.temperature is None else args.temperature
    _require_model(args.model_dir)
    if _is_mixture(args.model_dir):
        if args.temperature is not None:
            raise ValueError("--temperature applies to flow models; a mixture's samples are drawn as fitted")
        if out.suffix == ".png":
            raise ValueError(f"--out {out.name}: a PNG grid is for image models; {args.model_dir} holds rows")
        gmm, record = _load_mixture(args.model_dir)
        _check_sample_size(args.n, gmm.means.shape[1], 8, gmm.means.shape[1], out)
        x = gmm.sample(args.n, np.random.default_rng(args.seed))
    else:
        from nflow_np.image_models import load_image_model

        config = read_config(args.model_dir)
        record = config["metadata"]
        images = "image_shape" in record  # written by nflow train --data digits|mnist
        if out.suffix == ".png" and not images:
            raise ValueError(f"--out {out.name}: a PNG grid is for image models; {args.model_dir} holds rows "
                             "(.npy, .csv)")
        model = (load_image_model(args.model_dir) if images else load_model(args.model_dir)).to_device()
        widest = max((value.shape[-1] for value in model.state_dict().values() if value.ndim), default=1)
        _check_sample_size(args.n, model.dim, np.dtype(model.dtype).itemsize, widest, out)
        # an image model's samples are (N, C, H, W) integer levels; a toy model's (N, D) rows
        x = model.sample(args.n, np.random.default_rng(args.seed), temperature=temperature)  # a file's units
        if out.suffix == ".png":
            _require_matplotlib("a PNG grid")
            from nflow_np.image_plots import save_grid

            with tempfile.TemporaryDirectory(dir=out.parent) as scratch:  # drawn aside, then moved in whole
                drawn = save_grid(x, model.levels, Path(scratch) / out.name, f"{args.n} samples, T = {temperature:g}")
                atomic_write(out, drawn.read_bytes())
            print(f"wrote a grid of {args.n} samples to {out}")
            return 0
    cli_data.write_rows(out, x, cli_data.column_header(record, x.shape[-1]))  # a data file's own column names
    print(f"wrote {args.n} samples to {out}")
    return 0
