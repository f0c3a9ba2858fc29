"""What ``nflow train``, ``eval`` and ``sample`` do once parsed: resolve the options, check, dispatch, report.

The parser (:mod:`nflow_np.cli`) leaves out every option that was not typed, so ``args`` holds exactly
what the user asked for. :func:`train` resolves it (:func:`~nflow_np.cli_options.resolve_train`, or
the recorded arguments of a checkpoint for ``--resume``), runs the preflight checks
(:mod:`nflow_np.preflight`), prints the provenance line and calls the run in the library.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from nflow_np import distributed
from nflow_np.checkpoint import CheckpointError, latest_checkpoint
from nflow_np.cli_options import (
    NET_OPTIONS,
    RECORDED,
    TRAIN_DEFAULTS,
    flag,
    image_model_name,
    image_record,
    refuse_unknown,
    resolve_train,
)
from nflow_np.density import CHECKPOINT_DIR, INVERT_TOLERANCE, json_ready
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

RESUME_MAY_CHANGE = ("out", "progress", "plots", "checkpoint_every", "resume", "skip_nonfinite")
"""What ``nflow train --resume`` may change without changing the numbers of a run that never diverges."""
RESUME_LENGTH = ("epochs", "patience", "time_limit")
"""Training-length options: given with ``--resume``, they lengthen or shorten the run."""
IMAGE_DIMS = {"digits": 64, "mnist": 784}
"""Pixels per image, for the preflight estimate before the data set is loaded."""


def _given(args: argparse.Namespace) -> dict[str, object]:
    skip = ("handler", "command", "backend", "threads")
    return {key: value for key, value in vars(args).items() if key not in skip}


def _shown(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple | list) else str(value)


def resumed_options(given: dict[str, object]) -> dict[str, object]:
    """The options of the run in ``given["resume"]``, read from its newest good checkpoint, with ``given`` applied.

    The recorded arguments are re-parsed like a command line, so a damaged or hostile checkpoint cannot
    pass a value the parser would refuse. A typed option must agree with the recorded one, except those
    of :data:`RESUME_MAY_CHANGE` and the lengths of :data:`RESUME_LENGTH` (a longer or shorter run).
    """
    from nflow_np.cli import UsageError, build_parser

    resume = Path(given["resume"])
    if given.get("force"):
        raise ValueError("--force starts a fresh run and --resume continues one; give one of them")
    checkpoint, _ = latest_checkpoint(resume / CHECKPOINT_DIR)
    recorded = checkpoint.metadata.get("arguments")
    if not isinstance(recorded, dict):
        raise CheckpointError(f"{checkpoint.path}: records no nflow train arguments")
    argv = ["train"]
    for key in RECORDED:
        value = recorded.get(key)
        if key in (*RESUME_MAY_CHANGE, "force") or value is None:
            continue
        argv.append(f"{flag(key)}={_shown(value)}")
    try:
        parsed = _given(build_parser().parse_args(argv))
        options = resolve_train(parsed)
    except (UsageError, SystemExit, ValueError) as error:
        raise CheckpointError(f"{checkpoint.path}: its recorded arguments do not parse: {error}") from None
    refuse_unknown(given, options, options["kind"], str(options["data"]))  # what a fresh run of its kind refuses
    for key, value in given.items():
        if key in RESUME_MAY_CHANGE or key in RESUME_LENGTH:
            continue
        if value != options.get(key):
            raise ValueError(
                f"{flag(key)} {_shown(value)} differs from the resumed run's {_shown(options.get(key))}; leave it out"
            )
    if given.get("out") is not None and Path(given["out"]) != resume:
        raise ValueError(f"--out {given['out']} differs from --resume {resume}; a resumed run writes to its folder")
    for key in (*RESUME_MAY_CHANGE, *RESUME_LENGTH):
        if key in given:
            options[key] = given[key]
    every = recorded.get("checkpoint_every")
    options["checkpoint_every"] = given.get("checkpoint_every") or (every if type(every) is int and every > 0 else 0)
    return options | {"out": resume, "resume": resume}


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
    if kind == "gmm":
        biggest = max(options["components"])
        if biggest > options["n_train"]:
            raise ValueError(f"--components {biggest} exceeds the {options['n_train']} training points (--n-train): "
                             "a component needs data to fit")
        rows = options["n_train"] + options["n_val"] + options["n_test"]
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
        dim, layers = 2, int(options["layers"])
        rows = options["n_train"] + options["n_val"] + options["n_test"]
        check_memory(3 * 8 * dim * rows, f"the data ({rows} rows)", "--n-train/--n-val/--n-test")
        if options["plots"]:
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
    out = Path(options["out"] or Path("runs") / f"{options['data']}-{name}")
    options["out"] = out
    preflight(options, out)
    with writer_lock(out):  # a second nflow train into this folder meanwhile is refused, naming this process
        return _run(options, out, args.threads)


def _run(options: dict[str, object], out: Path, threads: int | None) -> int:
    """The toy, image or mixture run of :func:`train`, once its options and folder are checked."""
    record = provenance(options.get("dtype", "float64"), threads)
    print(f"nflow: {describe(record)}", flush=True)
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

    arguments = {key: options[key] for key in TRAIN_DEFAULTS if key in options} | {"threads": threads}
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
    """``nflow eval DIR``: the test NLL of a saved flow, image model or mixture."""
    from nflow_np.data import load_toy

    _require_model(args.model_dir)
    if _is_mixture(args.model_dir):
        gmm, summary = _load_mixture(args.model_dir)
        data = args.data or summary.get("data")
        if not isinstance(data, str):
            raise ValueError(f"{args.model_dir} records no data set; pass --data")
        seed = summary.get("seed", 0) if args.seed is None else args.seed  # folders from before seed was recorded: 0
        n_test = args.n_test or summary.get("n_test", TRAIN_DEFAULTS["n_test"])
        splits = load_toy(data, n_train=1, n_val=1, n_test=n_test, seed=seed)
        print(f"test NLL {gmm.nll(splits.test):.4f} nats on {data} ({n_test} points, seed {seed})")
        return 0
    metadata = read_config(args.model_dir)["metadata"]
    if "image_shape" in metadata:
        return _evaluate_images(args, metadata)
    from nflow_np.train import evaluate_nll

    data = args.data or metadata.get("data")
    if data is None:
        raise ValueError(f"{args.model_dir} records no data set; pass --data")
    seed = metadata.get("seed", 0) if args.seed is None else args.seed
    n_test = args.n_test or metadata.get("n_test", TRAIN_DEFAULTS["n_test"])
    model = load_model(args.model_dir).to_device()
    # the test split has its own random stream, so one training point is enough to get it unchanged
    splits = load_toy(data, n_train=1, n_val=1, n_test=n_test, seed=seed, dtype=model.dtype or np.float64)
    print(f"test NLL {evaluate_nll(model, splits.test):.4f} nats on {data} ({n_test} points, seed {seed})")
    return 0


def _evaluate_images(args: argparse.Namespace, metadata: dict) -> int:
    """``nflow eval DIR`` for a model written by ``nflow train --data digits|mnist``: its test split."""
    from nflow_np.data.images import load_images
    from nflow_np.image_models import load_image_model

    if args.data is not None or args.n_test is not None:
        raise ValueError("--data and --n-test apply to toy models; an image model is evaluated on its own test split")
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
        gmm, _ = _load_mixture(args.model_dir)
        _check_sample_size(args.n, gmm.means.shape[1], 8, gmm.means.shape[1], out)
        x = gmm.sample(args.n, np.random.default_rng(args.seed))
    else:
        from nflow_np.image_models import load_image_model

        images = "image_shape" in read_config(args.model_dir)["metadata"]  # written by nflow train --data digits|mnist
        if out.suffix == ".png" and not images:
            raise ValueError(f"--out {out.name}: a PNG grid is for image models; {args.model_dir} holds rows "
                             "(.npy, .csv)")
        model = (load_image_model(args.model_dir) if images else load_model(args.model_dir)).to_device()
        widest = max((value.shape[-1] for value in model.state_dict().values() if value.ndim), default=1)
        _check_sample_size(args.n, model.dim, np.dtype(model.dtype).itemsize, widest, out)
        # an image model's samples are (N, C, H, W) integer levels; a toy model's (N, D) rows
        x = model.sample(args.n, np.random.default_rng(args.seed), temperature=temperature)
        if out.suffix == ".png":
            _require_matplotlib("a PNG grid")
            from nflow_np.image_plots import save_grid

            with tempfile.TemporaryDirectory(dir=out.parent) as scratch:  # drawn aside, then moved in whole
                drawn = save_grid(x, model.levels, Path(scratch) / out.name, f"{args.n} samples, T = {temperature:g}")
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
