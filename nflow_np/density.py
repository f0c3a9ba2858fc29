"""Density estimation on toy data or a data file, end to end: the run behind ``nflow train`` for a flow.

Data (:func:`~nflow_np.data.load_toy`, or a user's file made ready by
:func:`~nflow_np.data.prepare.prepare_data`), model (:func:`~nflow_np.architectures.build_model`), fitting
(:func:`~nflow_np.train.fit`), metrics, and the folder: ``model.safetensors`` + ``model.json``,
``summary.json`` (with the provenance of :mod:`nflow_np.provenance` and the weights' SHA-256) and the
density plots, all published in one atomic step (:func:`~nflow_np.io.publish_model_files`), so a kill at
any instant leaves the previous run's files together or the new run's, never a mixture. The command line
only parses and checks options; :func:`train_density` takes them as one dict.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from nflow_np import backend, distributed
from nflow_np.architectures import build_model
from nflow_np.data import load_toy
from nflow_np.data.files import DataSplits
from nflow_np.io import CONFIG_FILE, WEIGHTS_FILE, model_file_bytes, publish_model_files, weights_sha256
from nflow_np.model import FlowModel, with_standardization
from nflow_np.optim import Adam
from nflow_np.provenance import provenance
from nflow_np.train import TrainResult, evaluate_nll, fit, train_step
from nflow_np.validation import NonFiniteError

INVERT_TOLERANCE = {"float32": 1e-6, "float64": 1e-12}
"""``--memory invert`` without ``--anchor-every``: anchors chosen for this reconstruction error (docs/memory.md)."""
CHECKPOINT_DIR = "checkpoints"  # under the run's output folder
PLOTS = ("density.png", "samples.png")
"""The pictures of a 2-D run; a run that draws none drops an earlier run's (they showed another model)."""
NLL_UNIT_OF_A_FILE = (
    "nats per row, in the data file's units: train/val/test are the saved model (Standardize ∘ flow) on the "
    "file's rows; history is the NLL of the standardised rows the optimizer saw + Σ_j log std_j"
)
"""``summary.json``'s ``nll_unit`` for a run on a data file (``docs/data.md``)."""
REPLACED_CHECKPOINTS = ".replaced-checkpoints"
"""Where ``--force`` moves an earlier run's checkpoints until the new model is published (then they go)."""


def json_ready(value: object) -> object:
    """``value`` with tuples as lists, paths as strings and non-finite floats as ``None`` (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def compile_kernels(model: FlowModel, rows: np.ndarray, say: bool = True) -> float:
    """Run one training step of a copy of ``model`` so that a kernel backend compiles (or loads) its kernels now.

    ``rows: (N, D)`` are a few rows of the model's data, in its dtype.

    The copy keeps the model's parameters, running statistics and optimizer untouched, so the run
    that follows computes exactly what it would have without this. Says so in one line on stderr
    (``say``) and returns the seconds it took; nothing happens on the NumPy reference.
    """
    name = backend.get_backend()
    if name == "numpy":
        return 0.0
    if say:
        print(f"nflow: preparing the {name} kernels (compiled on first use, ~20 s; cached afterwards) ...",
              end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    scratch = copy.deepcopy(model)
    rows = np.zeros((8, model.dim), dtype=rows.dtype)  # harmless inputs: the data may hold a row that overflows
    train_step(scratch, Adam(scratch, lr=1e-3), rows)  # with the fused optimizer kernel, where the backend has one
    scratch.log_prob(rows[:2])
    scratch.sample(2, np.random.default_rng(0))
    seconds = time.perf_counter() - start
    if say:
        print(f" done in {seconds:.1f} s", file=sys.stderr, flush=True)
    return seconds


def _nll(model: FlowModel, x: np.ndarray, comm: object = None) -> float:
    """Mean NLL of ``x``; ``inf`` (null in summary.json) if a row's density overflows, as an outlier may."""
    try:
        return evaluate_nll(model, x, comm=comm)
    except NonFiniteError:
        return math.inf


def _fit(
    options: dict, out: Path, model: FlowModel, train: np.ndarray, val: np.ndarray, comm: object = None
) -> TrainResult:
    """:func:`~nflow_np.train.fit` with the run's options; checkpoints go to ``out/checkpoints``."""
    extra = {"time_limit": options["time_limit"]} if options.get("time_limit") is not None else {}
    return fit(
        model,
        train,
        val,
        optimizer=Adam(model, lr=options["lr"]),
        epochs=options["epochs"],
        batch_size=options["batch_size"],
        seed=options["seed"],
        patience=options["patience"] or None,
        clip_norm=options["clip_norm"],
        lr_schedule=options["lr_schedule"],
        skip_nonfinite=options["skip_nonfinite"],
        checkpoint_dir=out / CHECKPOINT_DIR if options["checkpoint_every"] or options["resume"] else None,
        checkpoint_every=options["checkpoint_every"],
        resume=options["resume"] is not None,
        metadata={"arguments": options["arguments"]},
        progress=options["progress"],
        comm=comm,
        **extra,
    )


def set_aside_checkpoints(out: Path) -> None:
    """``--force``: move an earlier run's checkpoints out of the way of the new run (removed once it is published)."""
    old = out / CHECKPOINT_DIR
    if old.is_dir():
        aside = out / REPLACED_CHECKPOINTS
        if aside.exists():
            shutil.rmtree(aside)
        old.rename(aside)


def remove_replaced(out: Path) -> None:
    """Remove what :func:`set_aside_checkpoints` kept, once the new model is published."""
    aside = out / REPLACED_CHECKPOINTS
    if aside.is_dir():
        shutil.rmtree(aside)


def train_density(options: dict, out: Path, comm: object = None) -> dict:
    """Train a flow on a toy data set with ``options`` (every ``nflow train`` option resolved); write ``out``.

    Parameters
    ----------
    options : dict
        The keys of :data:`nflow_np.cli_options.TRAIN_DEFAULTS`, plus ``arguments`` (the JSON-ready
        record of the run kept in checkpoints and ``summary.json``). With ``prepared`` (a
        :class:`~nflow_np.data.prepare.PreparedData`) the flow trains on its standardised splits instead of
        a toy data set (``n_train``/``n_val``/``n_test`` unused); the model saved is ``Standardize ∘ flow``
        (:func:`~nflow_np.model.with_standardization`), a model of the file's rows in its units; the folder
        records the standardisation and the file, and the NLLs in ``summary.json`` (history included) and the
        plots are in the file's units (``docs/data.md``).
    out : pathlib.Path
        The run's folder: ``model.safetensors`` + ``model.json``, ``summary.json``, ``density.png`` and
        ``samples.png`` (2-D data, unless ``plots`` is off), ``checkpoints/`` if asked for.
    comm : mpi4py communicator, optional
        Train data-parallel (:mod:`nflow_np.distributed`); rank 0 writes every file.

    Returns
    -------
    dict
        The summary written to ``summary.json``, with ``files`` (the names written).

    Raises
    ------
    ValueError
        Bad options or data, before anything is trained or written.
    NonFiniteLossError
        Training diverged (the message names the last good checkpoint).
    """
    dtype = options["dtype"]
    prepared = options.get("prepared")
    if prepared is None:
        splits = load_toy(
            options["data"], n_train=options["n_train"], n_val=options["n_val"], n_test=options["n_test"],
            seed=options["seed"], dtype=dtype,
        )
    else:
        splits = prepared.splits
    model = build_model(
        options["model"], splits.train.shape[1], layers=options["layers"], hidden=options["hidden"],
        activation=options["activation"], dtype=dtype, seed=options["seed"],
    ).to_device()  # the active backend's array module: on a GPU backend the whole model lives on the device
    tolerance = INVERT_TOLERANCE[dtype] if options["memory"] == "invert" and options["anchor_every"] is None else None
    model.set_memory(options["memory"], options["anchor_every"], tolerance)
    compile_seconds = compile_kernels(model, splits.train, say=options["progress"])
    if options.get("force"):
        distributed.on_root(comm, lambda: set_aside_checkpoints(out))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _fit(options, out, model, splits.train, splits.val, comm)
    for warning in caught:
        print(f"nflow train: warning: {warning.message}", file=sys.stderr)
    if prepared is None:
        saved, scored, history = model, splits, result.history
        nll = {"train": _nll(model, splits.train, comm), "val": result.best_val_nll}
    else:  # the model saved is Standardize ∘ flow: a model of the file's rows, in its units (docs/data.md)
        units = prepared.standardization
        saved = with_standardization(model, units.mean, units.std)
        raw = prepared.raw
        scored = DataSplits(*(None if x is None else x.astype(dtype) for x in (raw.train, raw.val, raw.test)))
        history = in_file_units(result.history, -units.log_abs_det)
        nll = {"train": _nll(saved, scored.train, comm),
               "val": None if scored.val is None else _nll(saved, scored.val, comm)}
    nll["test"] = _nll(saved, scored.test, comm)  # nflow eval DIR scores these rows with this model, bit for bit
    arguments = options["arguments"]
    metadata = {"data": options["data"], "model": options["model"], "seed": options["seed"],
                "n_test": int(splits.test.shape[0])}
    if prepared is not None:
        metadata |= {"standardization": prepared.standardization.to_json(), "data_file": prepared.source}
    model_files = model_file_bytes(saved, json_ready(metadata | {"test_nll": nll["test"], "arguments": arguments}))
    summary = {
        "data": options["data"],
        "model": options["model"],
        "arguments": arguments,
        "provenance": provenance(dtype, options.get("threads")),
        "backend": backend.get_backend(),
        "ranks": distributed.size(comm),  # MPI ranks that trained it (docs/distributed.md)
        "n_params": model.num_parameters(),
        "nll_unit": "nats",
        "train_nll": nll["train"],
        "val_nll": nll["val"],
        "test_nll": nll["test"],
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "steps": result.steps,
        "train_seconds": result.seconds,
        "compile_seconds": compile_seconds,
        "stopped_early": result.stopped_early,
        "stopped_by": result.stopped_by,
        "skipped_batches": result.skipped_batches,
        "resumed_from": result.resumed_from,
        "checkpoint": result.checkpoint,
        "history": history,
        "model_sha256": weights_sha256(model_files),  # the model.safetensors this summary belongs to
    }
    if prepared is not None:
        summary |= {"nll_unit": NLL_UNIT_OF_A_FILE, "data_file": prepared.source,
                    "standardization": units.to_json() | {"sum_log_std": -units.log_abs_det}}
    files = [WEIGHTS_FILE, CONFIG_FILE, "summary.json"]
    plot = model.dim == 2 and options["plots"]
    if plot:
        files += list(PLOTS)

    def publish() -> None:  # model, summary and plots: one folder, one atomic step
        extra = {"summary.json": (json.dumps(json_ready(summary), indent=2) + "\n").encode("utf-8")}
        if plot:  # in the data's units: a data file's rows and the saved model of them
            extra |= _draw_plots(saved, scored.test, options["seed"], None if prepared is None else prepared.source)
        publish_model_files(out, model_files, extra, drop=() if plot else PLOTS)
        remove_replaced(out)

    distributed.on_root(comm, publish)  # rank 0 writes; an error there is raised on every rank
    return summary | {"files": files}


def in_file_units(history: list[dict], sum_log_std: float) -> list[dict]:
    """A run's history with its NLLs in a data file's units: ``NLL_x = NLL_u + Σ_j log σ_j`` (``docs/data.md``).

    The optimizer saw the standardised rows ``u``; the term is the same for every row and every parameter
    value, so it moves the curve and not its shape. The entries are copies (the run's own are left as they are).
    """
    return [entry | {key: entry[key] + sum_log_std for key in ("train_nll", "val_nll") if entry.get(key) is not None}
            for entry in history]


def _draw_plots(model: FlowModel, data: np.ndarray, seed: int, data_file: dict | None = None) -> dict[str, bytes]:
    """``density.png`` and ``samples.png`` as bytes, drawn in a scratch folder (published with the model).

    For a data file (its record ``data_file``) the axes are its columns, named from its header where it has
    one, each in its own units (no equal aspect: the two columns may measure different things)."""
    from nflow_np import plots  # matplotlib is only imported when there is something to draw

    style = {}
    if data_file is not None:
        columns = data_file.get("columns") or ["column 0", "column 1"]
        style = {"labels": (columns[0], columns[1]), "equal_aspect": False}
    with tempfile.TemporaryDirectory(prefix="nflow-plots-") as scratch:
        plots.plot_density(model, data, Path(scratch) / "density.png", **style)
        plots.plot_samples(model, data, Path(scratch) / "samples.png", seed=seed, **style)
        return {name: (Path(scratch) / name).read_bytes() for name in PLOTS}


def describe(summary: dict) -> str:
    """The one line ``nflow train`` prints after a toy run."""
    stopped = ", stopped early" if summary["stopped_early"] else ""
    if summary.get("stopped_by") == "time_limit":
        stopped += ", stopped by the time limit"
    if summary["skipped_batches"]:
        stopped += f", skipped {summary['skipped_batches']} non-finite batches"
    data = Path(summary["data_file"]["path"]).name if "data_file" in summary else summary["data"]
    return (
        f"{data} / {summary['model']}: test NLL {summary['test_nll']:.4f} nats (train "
        f"{summary['train_nll']:.4f}, val {summary['val_nll']:.4f}); best epoch {summary['best_epoch']} of "
        f"{summary['epochs_run']}{stopped}; {summary['steps']} steps in {summary['train_seconds']:.1f} s"
    )
