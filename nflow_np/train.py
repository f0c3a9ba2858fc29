"""Maximum-likelihood training: minibatch Adam/SGD on the mean NLL, validation, early stopping.

``θ* = argmax_θ Σ_n log p(x_n | θ)`` (the lecture's MLE problem), approximated by stochastic
gradient steps on minibatches; after every epoch the validation NLL decides which parameters are
kept (the best seen) and whether to stop (no improvement for ``patience`` epochs).

Reliability (README, "Reliability"): the data are checked before the first step; a run can write
checkpoints and be resumed from them, reproducing the uninterrupted run bit for bit (its whole
position is a :class:`~nflow_np.checkpoint.TrainState`); a non-finite loss stops the run with the
best parameters restored and the last checkpoint untouched, or, if asked, skips the batch.

Device (``docs/kernels.md#gpu-backends``): the data stay on the host; a model moved with
``model.to_device()`` receives each batch once, moved by the model's own entry point. Everything
kept across steps (the best parameters, checkpoints) is host NumPy.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from nflow_np import backend, distributed
from nflow_np.checkpoint import (
    CheckpointError,
    TrainState,
    data_fingerprint,
    latest_checkpoint,
    list_checkpoints,
    optimizer_config,
    remove_temporary_files,
    run_config,
    save_checkpoint,
    set_aside,
)
from nflow_np.io import describe_model
from nflow_np.model import FlowModel
from nflow_np.optim import Adam, Optimizer, clip_grad_norm, global_grad_norm
from nflow_np.validation import NonFiniteError, check_data


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf; the model holds the best parameters seen so far."""


@dataclass
class TrainResult:
    """What :func:`fit` did.

    Attributes
    ----------
    history : list of dict
        One entry per epoch: ``epoch``, ``step``, ``train_nll`` (mean over the epoch's stepped
        batches), ``val_nll`` (``None`` without validation data), ``skipped`` (batches skipped in
        the epoch), ``seconds`` since the start.
    best_val_nll : float or None
        Validation NLL of the parameters the model holds at the end.
    best_epoch : int
        Epoch (1-based) those parameters come from.
    steps : int
        Optimizer steps taken.
    seconds : float
        Training time of the whole fit (across resumes).
    stopped_early : bool
        Whether patience ran out before ``epochs``.
    skipped_batches : int
        Batches skipped because their loss or gradient was not finite (``skip_nonfinite``).
    resumed_from : pathlib.Path or None
        The checkpoint the run continued from.
    checkpoint : pathlib.Path or None
        The last checkpoint written.
    """

    history: list[dict] = field(default_factory=list)
    best_val_nll: float | None = None
    best_epoch: int = 0
    steps: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    skipped_batches: int = 0
    resumed_from: Path | None = None
    checkpoint: Path | None = None


def cosine_lr(base_lr: float, step: int, total_steps: int, final_fraction: float = 0.0) -> float:
    """Cosine decay from ``base_lr`` at step 0 to ``final_fraction · base_lr`` at ``total_steps``."""
    progress = min(step / max(total_steps, 1), 1.0)
    return base_lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def evaluate_nll(model: FlowModel, x: np.ndarray, batch_size: int = 8192, comm: object = None) -> float:
    """Mean NLL (nats) of all rows of ``x``, computed in batches to bound memory (sharded over ``comm``'s ranks)."""
    if comm is not None:
        return distributed.evaluate_nll(comm, model, x, batch_size)
    total = 0.0
    for start in range(0, x.shape[0], batch_size):
        total += float(-model.log_prob(x[start : start + batch_size]).sum())
    return total / x.shape[0]


def fit(
    model: FlowModel,
    train: np.ndarray,
    val: np.ndarray | None = None,
    *,
    optimizer: Optimizer | None = None,
    epochs: int = 100,
    batch_size: int = 256,
    seed: int = 0,
    patience: int | None = 10,
    clip_norm: float | None = None,
    lr_schedule: str = "constant",
    skip_nonfinite: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    metadata: dict | None = None,
    progress: bool = True,
    memory: str | None = None,
    comm: object = None,
) -> TrainResult:
    """Fit ``model`` to the rows of ``train`` by minibatch maximum likelihood.

    Parameters
    ----------
    model : FlowModel
        Trained in place, on the device its parameters are on; at the end it holds the parameters
        with the best validation NLL.
    train : numpy.ndarray, shape (N, D)
        Training data (host) in the model's dtype (integer data is converted, with a warning; see
        :func:`~nflow_np.validation.check_data`). Checked completely before the first step; each
        batch is copied to the model's device once.
    val : numpy.ndarray, shape (M, D), optional
        Validation data; without it the last parameters are kept and there is no early stop.
    optimizer : Optimizer, optional
        Default: ``Adam(model, lr=1e-3)``. Built after the model was moved (its state must be on
        the parameters' device).
    epochs : int
        Maximum number of passes over ``train``.
    batch_size : int
        Rows per step; the last, smaller batch of an epoch is dropped so every step sees
        ``batch_size`` rows.
    seed : int
        Seeds the shuffling, so a run is reproducible.
    patience : int or None
        Stop after this many epochs without a better validation NLL (``None``: never).
    clip_norm : float, optional
        Clip the global gradient norm to this value before every step.
    lr_schedule : {"constant", "cosine"}
        ``cosine`` decays the learning rate to 0 over ``epochs`` (see :func:`cosine_lr`).
    skip_nonfinite : bool
        Skip (and count) a batch whose loss or gradient is NaN/Inf instead of stopping.
    checkpoint_dir : str or os.PathLike, optional
        Folder of the run's checkpoints (:mod:`nflow_np.checkpoint`). Without ``resume`` it must
        hold none yet, so a run never overwrites another's.
    checkpoint_every : int
        Write a checkpoint every this many optimizer steps, and one when the run ends (0: only
        the one at the end). Needs ``checkpoint_dir``.
    resume : bool
        Continue from the newest checkpoint of ``checkpoint_dir`` that loads (a damaged newer one
        is renamed ``damaged-…`` and a warning says why). Every other argument must be the one the
        run was started with; the result is then bit for bit that of the uninterrupted run.
    metadata : dict, optional
        JSON-ready; stored in every checkpoint.
    progress : bool
        Show a tqdm bar with the running NLL.
    memory : {"store", "invert"}, optional
        Set the model's memory mode (:meth:`~nflow_np.model.FlowModel.set_memory`) before training:
        ``"invert"`` recomputes activations by inversion instead of storing them (``docs/memory.md``).
        Default: leave the model's as it is.
    comm : mpi4py communicator or "auto", optional
        Train data-parallel over its ranks (:mod:`nflow_np.distributed`, ``docs/distributed.md``): every
        rank passes the same arguments and data; each computes its shard of every batch and of the
        validation set, the gradients are summed in rank order, and every rank takes the same step.
        Only rank 0 shows progress and writes checkpoints; every rank reads them on ``resume``, at any
        number of ranks. ``"auto"``: ``MPI.COMM_WORLD`` under ``mpiexec -n P > 1``, else one process.

    Returns
    -------
    TrainResult

    Raises
    ------
    TypeError, ValueError
        Bad data or arguments, before anything is trained or written; a checkpoint that does not
        load or belongs to another run (``resume``).
    NonFiniteLossError
        A batch loss, a gradient or the validation NLL is NaN/Inf (and ``skip_nonfinite`` is off,
        or a whole epoch was skipped). The model is first restored to the best parameters seen;
        no checkpoint is written, so the last one stays the last good one.
    """
    comm = distributed.resolve(comm)
    dtype = model.dtype
    train = check_data(train, "train", model.dim, dtype)
    if val is not None:
        val = check_data(val, "val", model.dim, dtype)
    if isinstance(batch_size, bool) or not 1 <= batch_size <= train.shape[0]:
        raise ValueError(
            f"batch_size must be between 1 and the {train.shape[0]} training rows, got {batch_size}"
            + (" (the batch is larger than the data)" if batch_size > train.shape[0] else "")
        )
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
    if checkpoint_every < 0 or ((checkpoint_every or resume) and checkpoint_dir is None):
        raise ValueError("checkpoint_every (>= 0) and resume need checkpoint_dir")
    if memory is not None:
        model.set_memory(memory)
    optimizer = Adam(model, lr=1e-3) if optimizer is None else optimizer
    _check_same_device(model, optimizer)
    base_lr = optimizer.lr
    steps_per_epoch = train.shape[0] // batch_size
    total_steps = epochs * steps_per_epoch

    result = TrainResult()
    state = TrainState(best_params=model.state_dict())
    rng = np.random.default_rng(seed)
    run = None
    if checkpoint_dir is not None:
        # what a checkpoint must describe, checked now rather than at the first write
        describe_model(model)
        optimizer_config(optimizer, base_lr)
        json.dumps(metadata, allow_nan=False)
        run = run_config(
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            patience=patience,
            clip_norm=clip_norm,
            lr_schedule=lr_schedule,
            train=data_fingerprint(train),
            val=data_fingerprint(val),
        )
        if resume:  # rank 0 first: it sets damaged checkpoints aside before the others read
            state, result.resumed_from = distributed.root_first(
                comm, lambda: _resume(checkpoint_dir, model, optimizer, run, steps_per_epoch)
            )
            optimizer.lr = base_lr  # the state holds the scheduled rate of its step; the loop sets it again
            rng.bit_generator.state = state.rng
        elif list_checkpoints(checkpoint_dir):
            raise ValueError(
                f"{checkpoint_dir} already holds checkpoints of a run; resume it or choose another folder"
            )
        distributed.on_root(comm, lambda: remove_temporary_files(checkpoint_dir))  # left by a killed writer

    def diverged(what: str) -> NonFiniteLossError:
        last_good = result.checkpoint or result.resumed_from
        hint = _divergence_hint(model, optimizer, last_good)  # judged from the parameters that diverged
        model.load_state_dict(state.best_params)
        return NonFiniteLossError(f"{what}; {hint}")

    def checkpoint() -> None:
        state.seconds = time.perf_counter() - start
        result.checkpoint = distributed.on_root(comm, lambda: save_checkpoint(
            checkpoint_dir, model, optimizer, state, run, lr=base_lr, backend=backend.get_backend(), metadata=metadata
        ))

    start = time.perf_counter() - state.seconds
    shown = progress and distributed.is_root(comm)  # rank 0 speaks for the job
    bar = tqdm(total=total_steps, initial=state.steps, disable=not shown, desc="train", unit="step", leave=False)
    try:
        while not state.finished:
            state.rng = rng.bit_generator.state  # where this epoch's shuffle starts (a resume redraws it)
            order = rng.permutation(train.shape[0])
            for i in range(state.batch, steps_per_epoch):
                if lr_schedule == "cosine":
                    optimizer.lr = cosine_lr(base_lr, state.steps, total_steps)
                batch = train[order[i * batch_size : (i + 1) * batch_size]]
                model.zero_grad()
                # overflow is checked for explicitly just below, so NumPy's warnings would only be noise
                with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                    loss = distributed.backward(comm, model, batch, model.nll_and_backward)
                    # the norm is needed anyway to catch a NaN/Inf gradient before it reaches the parameters
                    norm = clip_grad_norm(model, clip_norm) if clip_norm else global_grad_norm(model)
                state.batch = i + 1
                if not (math.isfinite(loss) and math.isfinite(norm)):
                    if not skip_nonfinite:
                        raise diverged(
                            f"non-finite loss ({loss}) or gradient norm ({norm}) at epoch {state.epoch}, "
                            f"batch {i + 1}, step {state.steps + 1}"
                        )
                    state.skipped += 1
                    continue
                optimizer.step()
                state.steps += 1
                state.epoch_loss += loss
                state.epoch_batches += 1
                bar.update(1)
                bar.set_postfix(nll=f"{loss:.4f}", refresh=False)
                if checkpoint_every and state.steps % checkpoint_every == 0:
                    checkpoint()
            if state.epoch_batches == 0:
                raise diverged(f"every batch of epoch {state.epoch} had a non-finite loss or gradient")
            try:
                entry = _end_epoch(model, val, state, epochs, patience, start, comm)
            except NonFiniteError as error:
                raise diverged(f"the validation NLL after epoch {state.epoch} is not finite ({error})") from error
            shown = "-" if entry["val_nll"] is None else f"{entry['val_nll']:.4f}"
            bar.set_description(f"epoch {entry['epoch']} val {shown}")
        if checkpoint_dir is not None:
            checkpoint()  # the finished run, so resuming it after a crash in what follows returns at once
    finally:
        bar.close()
        optimizer.lr = base_lr
    model.load_state_dict(state.best_params)
    result.history = state.history
    result.best_val_nll = state.best_val if val is not None else None
    result.best_epoch = state.best_epoch
    result.steps = state.steps
    result.skipped_batches = state.skipped
    result.stopped_early = state.stopped_early
    result.seconds = time.perf_counter() - start
    return result


def _check_same_device(model: FlowModel, optimizer: Optimizer) -> None:
    """Refuse an optimizer whose state is not on the model's device (built before ``to_device``)."""
    xp = model.array_module
    for arrays in optimizer.state.values():
        for name, value in arrays.items():
            where = backend.array_module(value)
            if where is not xp:
                raise ValueError(
                    f"the optimizer's state for {name!r} is a {where.__name__} array but the model's parameters are "
                    f"{xp.__name__} arrays: build the optimizer after moving the model (model.to_device())"
                )


def _end_epoch(
    model: FlowModel,
    val: np.ndarray | None,
    state: TrainState,
    epochs: int,
    patience: int | None,
    start: float,
    comm: object = None,
) -> dict:
    """Validate, record the epoch in ``state.history``, keep the best parameters, decide whether to stop.

    Advances ``state`` to the start of the next epoch and returns the history entry. Raises
    :class:`~nflow_np.validation.NonFiniteError` if a validation point's log-density is not finite.
    """
    entry = {
        "epoch": state.epoch,
        "step": state.steps,
        "train_nll": state.epoch_loss / state.epoch_batches,
        "val_nll": None,
        "skipped": state.batch - state.epoch_batches,
    }
    if val is not None:
        entry["val_nll"] = evaluate_nll(model, val, comm=comm)
        if entry["val_nll"] < state.best_val:
            state.best_val, state.best_params, state.best_epoch = entry["val_nll"], model.state_dict(), state.epoch
    else:
        state.best_params, state.best_epoch = model.state_dict(), state.epoch
    entry["seconds"] = time.perf_counter() - start
    state.history.append(entry)
    if patience is not None and val is not None and state.epoch - state.best_epoch >= patience:
        state.stopped_early = True
    state.finished = state.stopped_early or state.epoch >= epochs
    state.epoch, state.batch, state.epoch_loss, state.epoch_batches = state.epoch + 1, 0, 0.0, 0
    return entry


RESUME_MAY_CHANGE = ("epochs", "patience")
"""What a resumed run may change: how long it trains (the cosine schedule then follows the new length)."""


def _resume(
    directory: str | os.PathLike, model: FlowModel, optimizer: Optimizer, run: dict, steps_per_epoch: int
) -> tuple[TrainState, Path]:
    """Load the newest good checkpoint into ``model`` and ``optimizer`` after checking it belongs to this run.

    Nothing is written (to the model, the optimizer or the folder) unless every check passes; then
    damaged checkpoints newer than the one used are renamed ``damaged-…`` so they are not tried again.
    """
    checkpoint, skipped = latest_checkpoint(directory)
    differences = []
    for key in sorted(set(run) | set(checkpoint.run)):
        ours, theirs = run.get(key), checkpoint.run.get(key)
        if ours != theirs and key not in RESUME_MAY_CHANGE:
            what = "the data differ" if key in ("train", "val") else f"it has {theirs!r}, this run {ours!r}"
            differences.append(f"{key}: {what}")
    if differences:
        raise ValueError(
            f"cannot resume from {checkpoint.path}: it belongs to another run ({'; '.join(differences)}); "
            "a resumed run must repeat the arguments it was started with"
        )
    state = checkpoint.state
    recorded_epochs = checkpoint.run.get("epochs", run["epochs"])
    beyond = state.epoch > recorded_epochs + 1 or (state.epoch > recorded_epochs and not state.finished)
    if state.rng is None or state.batch > steps_per_epoch or state.best_epoch >= state.epoch or beyond:
        raise CheckpointError(f"{checkpoint.path}: its training position is inconsistent")
    if any(run.get(key) != checkpoint.run.get(key) for key in RESUME_MAY_CHANGE):  # a longer or shorter run
        completed, patience = state.epoch - 1, run["patience"]
        with_val = run.get("val") is not None
        state.stopped_early = patience is not None and with_val and completed - state.best_epoch >= patience
        state.finished = state.stopped_early or completed >= run["epochs"]
    checkpoint.restore(model, optimizer)
    if checkpoint.backend != backend.get_backend():
        warnings.warn(
            f"{checkpoint.path} was computed with the {checkpoint.backend!r} backend, this run uses "
            f"{backend.get_backend()!r}: the result will not be bit for bit the uninterrupted run's",
            stacklevel=3,
        )
    for message in skipped:
        warnings.warn(f"passed over a damaged checkpoint: {message}", stacklevel=3)
    for path in list_checkpoints(directory):
        if path.name > checkpoint.path.name:
            set_aside(path)
    return state, checkpoint.path


def _divergence_hint(model: FlowModel, optimizer: Optimizer, checkpoint: Path | None) -> str:
    """What is kept after a non-finite loss, and its likely causes judged from the parameters."""
    kept = "the model holds the best parameters seen so far"
    if checkpoint is not None:
        kept += f" and the last good checkpoint {checkpoint} is untouched"
    causes = [f"a learning rate ({optimizer.lr:g}) too high for this model: lower it or clip gradients (clip_norm)"]
    bad = [name for name, value, _ in model.named_parameters() if not np.isfinite(value).all()]
    if bad:
        causes.insert(0, f"parameter {bad[0]} is not finite (check how the model was built or loaded)")
    bounds = [float(np.abs(value).max()) for name, value, _ in model.named_parameters() if name.endswith("scale")]
    finite_bounds = [bound for bound in bounds if math.isfinite(bound)]
    if finite_bounds:
        largest = max(finite_bounds)
        causes.append(
            f"a scale bound grown large (the largest |scale| or |log_scale| is {largest:.3g}, a stretch of up to "
            f"e^{largest:.3g} per layer): rescale the data or lower the learning rate"
        )
    return (
        f"{kept}. Likely causes: {'; '.join(causes)}. "
        "To skip such batches instead, pass skip_nonfinite=True (nflow train --skip-nonfinite)."
    )
