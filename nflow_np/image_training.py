"""Train an image model end to end: data, model, time-budgeted fitting, metrics, model files and pictures.

What ``nflow train --data digits|mnist --model nice|realnvp`` runs. :data:`IMAGE_RECIPES` holds the
settings measured on a 2-core machine for each pair (``README.md#image-flows``); every one of them
can be overridden. Training is one call of :func:`nflow_np.train.fit` whose start-of-epoch hook
sets the epoch's learning rate, a cosine from ``lr`` to 0 over the epochs, or over the time budget
when there is one, and ends the run between epochs when the next one would not fit the wall-clock
budget (``time_limit``); ``fit`` keeps the parameters with the best validation NLL, and writes the
checkpoints a run can be resumed from bit for bit (every ``checkpoint_every`` epochs; the time
spent is in them, so a resumed run gets what is left of the budget). NICE's final rescaling starts
from a data-dependent value (:func:`~nflow_np.image_models.initialize_rescale`). The model files,
``summary.json`` and the pictures are published as one folder in one atomic step.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from nflow_np import distributed
from nflow_np.data.images import load_images
from nflow_np.density import CHECKPOINT_DIR
from nflow_np.flows.normalization import batch_norms, recalibrate
from nflow_np.image_models import ImageFlowModel, build_nice, build_realnvp, build_realnvp_resnet, initialize_rescale
from nflow_np.optim import Adam
from nflow_np.train import cosine_lr, fit

PICTURES = ("samples.png", "reconstructions.png", "interpolations.png")
"""What an image run draws; published with the model and its summary in one step."""
IMAGE_RECIPES: dict[tuple[str, str], dict] = {
    # digits: 1,347 training images overfit within ~20-80 epochs; early stopping on the 150
    # validation images (patience 30) and small nets with weight decay regularise
    # NICE: checkerboard partition (every pixel given its 4 neighbours, not alternate columns),
    # wider nets at a lower learning rate; 2.325 -> 2.245 bits/dim (README.md#image-flows)
    ("digits", "nice"): {
        "hidden": (512, 512),
        "partition": "checkerboard",
        "alpha": 0.05,
        "epochs": 300,
        "batch_size": 64,
        "lr": 2e-4,
        "weight_decay": 1e-2,
        "patience": 30,
        "time_limit": None,
    },
    ("digits", "realnvp"): {
        "hidden": (128, 128),
        "alpha": 0.05,
        "epochs": 150,
        "batch_size": 64,
        "lr": 1e-3,
        "weight_decay": 5e-2,
        "patience": 30,
        "time_limit": None,
    },
    # MNIST-5000: 5 minutes of training each. NICE's nets are the paper's 5 hidden layers, shrunk
    # from 1000 to 400 units (3.8 M instead of 19 M parameters) so that ~50 epochs fit the budget.
    ("mnist", "nice"): {
        "hidden": (400,) * 5,
        "partition": "parity",
        "alpha": None,
        "epochs": 1000,
        "batch_size": 100,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "patience": None,
        "time_limit": 300.0,
    },
    ("mnist", "realnvp"): {
        "hidden": (256, 256),
        "alpha": 0.05,
        "epochs": 1000,
        "batch_size": 100,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "patience": None,
        "time_limit": 300.0,
    },
    # RealNVP with the paper's convolutional ResNet couplings (nflow train --model realnvp --net resnet)
    # digits: 2.031 test bits/dim at epoch 30 of 40 (MLP RealNVP: 2.157); the nets overfit after ~30
    ("digits", "realnvp_resnet"): {
        "channels": 32,
        "blocks": 2,
        "alpha": 0.05,
        "epochs": 40,
        "batch_size": 64,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "patience": 20,
        "time_limit": None,
    },
    ("mnist", "realnvp_resnet"): {
        "channels": 32,
        "blocks": 2,
        "alpha": 0.05,
        "epochs": 1000,
        "batch_size": 64,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "patience": None,
        "time_limit": 600.0,
    },
}


def build_image_model(
    model: str,
    shape: tuple[int, int, int],
    levels: int,
    hidden: tuple[int, ...],
    alpha: float | None,
    dtype: object,
    seed: int,
    partition: str = "parity",
    channels: int = 64,
    blocks: int = 4,
) -> ImageFlowModel:
    """:func:`build_nice`, :func:`build_realnvp` or :func:`build_realnvp_resnet` (``model``) with the given
    widths (``hidden``; ``channels`` and ``blocks`` for ``realnvp_resnet``'s ResNets) and logit ``α``.

    ``partition`` is NICE's (``"parity"`` or ``"checkerboard"``); RealNVP's masks are fixed.
    """
    if model == "nice":
        return build_nice(shape, levels, hidden=hidden, alpha=alpha, partition=partition, dtype=dtype, seed=seed)
    if model == "realnvp":
        return build_realnvp(
            shape, levels, hidden=hidden, alpha=0.05 if alpha is None else alpha, dtype=dtype, seed=seed
        )
    if model == "realnvp_resnet":  # channels, blocks: the conv nets' (docs/conv.md)
        alpha = 0.05 if alpha is None else alpha
        nets = {"channels": channels, "blocks": blocks}
        return build_realnvp_resnet(shape, levels, alpha=alpha, dtype=dtype, seed=seed, **nets)
    raise ValueError(f"unknown image model {model!r}; choose nice, realnvp or realnvp_resnet")


def fit_for(
    model: ImageFlowModel,
    train: np.ndarray,
    val: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    patience: int | None,
    time_limit: float | None,
    seed: int = 0,
    progress: bool = False,
    calibration_rows: int = 1000,
    on_epoch: Callable[[dict], None] | None = None,
    comm: object = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    metadata: dict | None = None,
) -> dict:
    """Fit ``model`` for at most ``epochs`` epochs and ``time_limit`` seconds; keep the best validation NLL.

    One :func:`~nflow_np.train.fit` call with an Adam optimizer and two epoch hooks. Before each
    epoch, the learning rate is set to ``cosine_lr(lr, progress)`` where progress is the fraction of
    epochs (or of the time budget) used before it, and the run ends if the last epoch's duration no
    longer fits in what is left of the budget, so the budget is never overrun by more than the
    evaluation at the end (``fit``'s own ``time_limit``, which would stop only after the epoch that
    crosses it, never acts first; it is passed so that a resume sees a changed budget). Both are
    derived from the run's history (``seconds``: training time across resumes, rank 0's clock), so a
    resumed run continues the schedule and spends only the remainder of the budget.

    After every epoch the batch norms' running averages are recalibrated on (up to
    ``calibration_rows``) training rows (:func:`~nflow_np.flows.normalization.recalibrate`) before
    the validation NLL is measured: with parameters that move fast, exponential running averages
    lag behind them, and the evaluation-mode density would drift from the one being trained.

    With ``comm`` (:mod:`nflow_np.distributed`) every epoch and the validation run data-parallel, and
    rank 0's clock decides the learning rate and when the budget is spent, so every rank agrees.

    With ``checkpoint_dir``, a checkpoint (:mod:`nflow_np.checkpoint`: parameters and batch-norm
    averages, Adam's state, the position and history, the dequantisation noise stream, the time
    spent; ``metadata`` too) is written after the last step of every ``checkpoint_every``-th epoch
    (0: only when the run ends) and ``resume`` continues from the newest one that loads, bit for bit
    the uninterrupted run when ``epochs``, ``patience`` and ``time_limit`` are the same (another
    ``epochs`` or ``time_limit`` reshapes the rest of the schedule; ``fit`` refuses other changes).

    Returns
    -------
    dict
        ``history`` (per epoch: ``epoch``, ``train_nll``, ``val_nll``, ``lr``, ``seconds``,
        ``epoch_seconds``, ...), ``best_epoch``, ``best_val_nll``, ``epochs_run``, ``steps``,
        ``train_seconds`` (across resumes), ``stopped_by`` (``"epochs"``, ``"patience"`` or
        ``"time_limit"``), ``resumed_from`` and ``checkpoint`` (paths as text, or ``None``).
    """
    optimizer = Adam(model, lr=lr, weight_decay=weight_decay)
    rows_train, rows_val = train.reshape(train.shape[0], -1), val.reshape(val.shape[0], -1)
    has_batch_norm = any(True for _ in batch_norms(model))
    calibration = rows_train[np.random.default_rng(seed).permutation(len(rows_train))[:calibration_rows]]
    epoch_started = [0.0]  # seconds into the run (rank 0's clock, across resumes) when the epoch began

    def recalibrate_batch_norms(epoch: int) -> None:
        if has_batch_norm:
            recalibrate(model.flow, model.log_prob, calibration)

    def start_of_epoch(epoch: int, history: list[dict]) -> bool:
        elapsed = history[-1]["seconds"] if history else 0.0
        epoch_started[0] = elapsed
        if time_limit is not None and history and elapsed + history[-1]["epoch_seconds"] > time_limit:
            return True  # the next epoch would not end within the budget
        fraction = elapsed / time_limit if time_limit is not None else (epoch - 1) / epochs
        optimizer.lr_scale = cosine_lr(1.0, int(1000 * fraction), 1000)
        return False

    def end_of_epoch(epoch: int, record: dict) -> None:
        record["lr"], record["epoch_seconds"] = lr * optimizer.lr_scale, record["seconds"] - epoch_started[0]
        if on_epoch is not None:  # e.g. the command line's one progress bar over the whole run
            on_epoch(record)

    checkpoints = {}
    if checkpoint_dir is not None:  # checkpoint_every epochs, as the steps that end them
        every = checkpoint_every * (rows_train.shape[0] // batch_size)
        checkpoints = {"checkpoint_dir": checkpoint_dir, "checkpoint_every": every, "resume": resume,
                       "metadata": metadata}
    result = fit(model, rows_train, rows_val, optimizer=optimizer, epochs=epochs, batch_size=batch_size, seed=seed,
                 lr_schedule="constant", patience=patience, progress=progress, on_epoch_start=start_of_epoch,
                 on_epoch_end=end_of_epoch, before_validation=recalibrate_batch_norms, comm=comm,
                 time_limit=time_limit, shuffle_seed=lambda epoch: seed + epoch,  # the orders of the README's runs
                 **checkpoints)
    stopped_by = "time_limit" if result.stopped_by == "on_epoch_start" else result.stopped_by
    return {
        "history": result.history,
        "best_epoch": result.best_epoch,
        "best_val_nll": result.best_val_nll,
        "epochs_run": len(result.history),
        "steps": result.steps,
        "train_seconds": result.seconds,
        "stopped_by": stopped_by,
        "resumed_from": None if result.resumed_from is None else str(result.resumed_from),
        "checkpoint": None if result.checkpoint is None else str(result.checkpoint),
    }


def train_image_model(
    data: str,
    model_name: str,
    out: str | Path,
    *,
    seed: int = 0,
    dtype: object = np.float32,
    progress: bool = False,
    memory: str = "store",
    anchor_every: int | None = None,
    tolerance: float | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    record: dict | None = None,
    comm: object = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    metadata: dict | None = None,
    **overrides: object,
) -> dict:
    """Train ``model_name`` on ``data`` with :data:`IMAGE_RECIPES` (and ``overrides``); write ``out``.

    ``memory``, ``anchor_every`` and ``tolerance`` choose how the backward pass gets each layer's
    input (:meth:`~nflow_np.model.FlowModel.set_memory`; ``docs/memory.md``): ``"invert"`` recomputes
    it with the layer's inverse instead of storing it (the batch norms, in training mode, store theirs).

    Writes ``model.safetensors``/``model.json`` (:func:`nflow_np.io.save_model`, metadata with the image
    shape and levels), ``summary.json``, ``samples.png`` (temperatures 1.0 and 0.7),
    ``reconstructions.png`` and ``interpolations.png``. With ``comm`` the training runs data-parallel
    (:mod:`nflow_np.distributed`; batch norms use the whole batch's moments) and rank 0 writes the files.

    ``checkpoint_every`` (epochs; 0: none) writes checkpoints to ``out/checkpoints`` and ``resume``
    continues the run from there (:func:`fit_for`; ``nflow train --resume``); ``metadata`` (JSON-ready,
    the command line's arguments) is stored in them. With neither, no checkpoint is written.

    Returns
    -------
    dict
        The summary: test NLL (nats per image), bits/dim, NICE-convention log-likelihood on [0, 1],
        the same for train and validation, training time and history, the settings used.
    """
    from nflow_np import image_plots
    from nflow_np.io import model_file_bytes, publish_model_files, weights_sha256

    recipe = dict(IMAGE_RECIPES[(data, model_name)])
    unknown = sorted(set(overrides) - set(recipe))
    if unknown:
        raise ValueError(f"unknown settings {unknown}; known: {sorted(recipe)}")
    recipe.update(overrides)
    splits = load_images(data, seed=seed, dtype=dtype)
    model = build_image_model(
        model_name,
        splits.shape,
        splits.levels,
        tuple(recipe.get("hidden", ())),
        recipe["alpha"],
        dtype,
        seed,
        partition=recipe.get("partition", "parity"),
        **{name: recipe[name] for name in ("channels", "blocks") if name in recipe},
    )
    if model_name == "nice":
        initialize_rescale(model, splits.train[:1000])
    model.set_memory(memory, anchor_every, tolerance)
    run = fit_for(
        model,
        splits.train,
        splits.val,
        epochs=recipe["epochs"],
        batch_size=recipe["batch_size"],
        lr=recipe["lr"],
        weight_decay=recipe["weight_decay"],
        patience=recipe["patience"],
        time_limit=recipe["time_limit"],
        seed=seed,
        progress=progress,
        on_epoch=on_epoch,
        comm=comm,
        checkpoint_dir=Path(out) / CHECKPOINT_DIR if checkpoint_every or resume else None,
        checkpoint_every=checkpoint_every,
        resume=resume,
        metadata=metadata,
    )
    metrics = {name: model.evaluate(getattr(splits, name), seed=seed, comm=comm) for name in ("train", "val", "test")}
    out = Path(out)
    metadata = {
        "data": data,
        "model": model_name,
        "seed": seed,
        "image_shape": list(splits.shape),
        "levels": splits.levels,
        "test": metrics["test"],
    }

    model_files = model_file_bytes(model, metadata)
    summary = {
        "data": data,
        "model": model_name,
        "settings": recipe
        | {"seed": seed, "dtype": str(np.dtype(dtype)), "memory": memory, "anchor_every": anchor_every},
        "n_params": model.num_parameters(),
        "dim": model.dim,
        "levels": splits.levels,
        "splits": {name: int(getattr(splits, name).shape[0]) for name in ("train", "val", "test")},
        "nll_unit": "nats per image on the scale of integer levels (-log p(x + u))",
        **{f"{name}_{key}": value for name, m in metrics.items() for key, value in m.items()},
    } | run | (record or {}) | {"model_sha256": weights_sha256(model_files)}
    text = json.dumps(summary, indent=2, default=float, allow_nan=False)

    def publish() -> None:  # the model, its summary and its pictures: one folder, one atomic step
        with tempfile.TemporaryDirectory(prefix="nflow-pictures-") as scratch:
            image_plots.plot_samples(model, Path(scratch) / "samples.png", seed=seed)
            image_plots.plot_reconstructions(model, splits.test, Path(scratch) / "reconstructions.png")
            image_plots.plot_interpolations(model, splits.test, Path(scratch) / "interpolations.png")
            pictures = {name: (Path(scratch) / name).read_bytes() for name in PICTURES}
        publish_model_files(out, model_files, {"summary.json": (text + "\n").encode("utf-8"), **pictures})

    distributed.on_root(comm, publish)
    return summary
