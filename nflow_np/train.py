"""Maximum-likelihood training: one training step, and minibatch epochs with validation and early stopping.

``θ* = argmax_θ Σ_n log p(x_n | θ)`` (the lecture's MLE problem), approximated by stochastic
gradient steps on minibatches. :func:`train_step` is the one step (zero the gradients; the loss
and its backward pass; clip; update) that every training loop of the library calls: :func:`fit`,
:func:`nflow_np.vi.fit_vi`, the image trainer and the benchmarks. After every epoch :func:`fit`
measures the validation NLL, which decides which parameters are kept (the best seen) and whether
to stop (no improvement for ``patience`` epochs, the ``time_limit`` crossed, or ``on_epoch_end``
says so). Derivations: ``docs/training.md``.

Reliability (README, "Reliability"): the data are checked before the first step; a run can write
checkpoints and be resumed from them, reproducing the uninterrupted run bit for bit (its whole
position is a :class:`~nflow_np.checkpoint.TrainState`); a non-finite loss stops the run with the
best parameters restored and the last checkpoint untouched, or, if asked, skips the batch.

Device (``docs/kernels.md#gpu-backends``): the data stay on the host; a model moved with
``model.to_device()`` receives each batch once, moved by the model's own entry point. Everything
kept across steps (the best parameters, checkpoints) is host NumPy.

Length: over 400 lines because :func:`fit` keeps checkpointing, resume, divergence handling, the epoch
hooks and data parallelism in one loop a reader can follow top to bottom; its argument checks, resume and
divergence hint already live in :mod:`nflow_np.train_guards`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from nflow_np import backend, distributed, threads
from nflow_np.checkpoint import (
    TrainState,
    data_fingerprint,
    list_checkpoints,
    optimizer_config,
    remove_temporary_files,
    run_config,
    save_checkpoint,
)
from nflow_np.io import describe_model
from nflow_np.model import FlowModel
from nflow_np.module import Module
from nflow_np.optim import Adam, Optimizer, clip_grad_norm, global_grad_norm
from nflow_np.train_guards import check_arguments, check_same_device, divergence_hint, resume_run
from nflow_np.validation import NonFiniteError


class NonFiniteLossError(FloatingPointError):
    """The training loss or its gradient became NaN or Inf.

    Raised by :func:`train_step` before the update (the parameters are those before the step, its
    ``loss`` and ``norm`` attributes say which was not finite; ``None`` where the error was raised
    elsewhere, e.g. by a VI target); :func:`fit` then restores the best parameters seen so far.
    """

    def __init__(self, message: str, loss: float | None = None, norm: float | None = None) -> None:
        super().__init__(message)
        self.loss, self.norm = loss, norm


def train_step(
    model: Module,
    optimizer: Optimizer,
    batch: np.ndarray,
    *,
    clip: float | None = None,
    loss_and_backward: Callable[[np.ndarray], float] | None = None,
    reduce_gradients: Callable[[Module], None] | None = None,
) -> float:
    """One optimizer step on ``batch``; return the loss before the step.

    1. ``model.zero_grad()``;
    2. the loss and its gradient: the mean NLL ``model.nll_and_backward(batch)``
       (``docs/model.md#gradient-of-the-loss``), or ``loss_and_backward(batch)`` for another loss
       (VI's free energy), which must add its gradient to ``grads`` the same way;
    3. ``reduce_gradients(model)``, if given: the one place between backward and update where the
       gradients of this batch are final, e.g. where a data-parallel run all-reduces (averages) them
       across workers, so that clipping and the update below see the global gradient (leaving the
       same gradients on every worker keeps the workers' parameters, and their NaN checks, in step);
    4. the global gradient norm, clipped to ``clip`` if given (:func:`~nflow_np.optim.clip_grad_norm`);
       a non-finite loss or norm raises before anything is updated;
    5. ``optimizer.step()``.

    Parameters
    ----------
    model : Module
        A :class:`~nflow_np.model.FlowModel`, or any module when ``loss_and_backward`` is given.
    optimizer : Optimizer
    batch : numpy.ndarray, shape (N, D)
        Rows of data (or base draws for VI), in the model's dtype.
    clip : float, optional
        Maximum global gradient norm.
    loss_and_backward : callable, optional
        ``batch -> float``; default ``model.nll_and_backward``.
    reduce_gradients : callable, optional
        ``model -> None``, called on the accumulated gradients before clipping and the update.

    Returns
    -------
    float
        The loss at the parameters before the step.

    Raises
    ------
    NonFiniteLossError
        The loss or the gradient norm is NaN/Inf; the parameters are untouched.
    """
    model.zero_grad()
    # one compute block for the whole step (thread plan, flush mode): the norm's dot products run under it too, so
    # no idle BLAS pool wakes between backward and update to spin beside the one computing (nflow_np.threads)
    with threads.compute("train"):
        # overflow is checked for explicitly just below, so NumPy's warnings would only be noise
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            loss = (model.nll_and_backward if loss_and_backward is None else loss_and_backward)(batch)
            if reduce_gradients is not None:
                reduce_gradients(model)
            # the norm is needed anyway to catch a NaN/Inf gradient before it reaches the parameters
            norm = clip_grad_norm(model, clip) if clip else global_grad_norm(model)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise NonFiniteLossError(f"non-finite loss ({loss}) or gradient norm ({norm})", loss, norm)
        optimizer.step()
    return loss


@dataclass
class TrainResult:
    """What :func:`fit` did.

    Attributes
    ----------
    history : list of dict
        One entry per epoch: ``epoch``, ``step``, ``train_nll`` (mean over the epoch's stepped
        batches), ``val_nll`` (``None`` without validation data), ``skipped`` (batches skipped in
        the epoch), ``seconds`` since the start; the last entry also ``stopped_by``, and whatever
        ``on_epoch_end`` added.
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
    stopped_by : str
        What ended the run: ``"epochs"``, ``"patience"``, ``"time_limit"``, ``"on_epoch_end"`` or
        ``"on_epoch_start"``.
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
    stopped_by: str = "epochs"
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
    patience: int | None = 20,
    clip_norm: float | None = None,
    lr_schedule: str = "cosine",
    skip_nonfinite: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    metadata: dict | None = None,
    progress: bool = True,
    memory: str | None = None,
    comm: object = None,
    time_limit: float | None = None,
    on_epoch_end: Callable[[int, dict], bool | None] | None = None,
    on_epoch_start: Callable[[int, list[dict]], bool | None] | None = None,
    before_validation: Callable[[int], None] | None = None,
    shuffle_seed: Callable[[int], int] | None = None,
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
        Default: ``Adam(model, lr=2e-3)`` (``nflow train``'s). Built after the model was moved (its state must be on
        the parameters' device). Any of :mod:`nflow_np.optim` (with parameter groups, frozen
        parameters skipped); checkpoints know Adam, SGD and RMSprop.
    epochs : int
        Maximum number of passes over ``train``.
    batch_size : int
        Rows per step; the last, smaller batch of an epoch is dropped so every step sees
        ``batch_size`` rows.
    seed : int
        Seeds the shuffling, so a run is reproducible.
    patience : int or None
        Stop after this many epochs without a better validation NLL (``None``: never). The defaults
        (100 epochs, batch 256, patience 20, cosine, Adam at 2e-3) are ``nflow train``'s.
    clip_norm : float, optional
        Clip the global gradient norm to this value before every step.
    lr_schedule : {"constant", "cosine"}
        ``cosine`` decays every parameter group's learning rate to 0 over ``epochs`` (see
        :func:`cosine_lr`), through the optimizer's ``lr_scale``.
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
    time_limit : float, optional
        Seconds of training (across resumes); the run stops after the epoch that crosses it
        (``stopped_by == "time_limit"``), so it overruns by at most one epoch.
    on_epoch_end : callable, optional
        ``on_epoch_end(epoch, record) -> bool | None``, called after every epoch with its history
        entry (which it may extend, e.g. with the learning rate it used, or change the optimizer's
        ``lr_scale`` for the next epoch); returning ``True`` ends the run (``stopped_by ==
        "on_epoch_end"``).
    on_epoch_start : callable, optional
        ``on_epoch_start(epoch, history) -> bool | None``, called before every epoch, and before the
        rest of one a resume continues in its middle, with the history of the epochs done (a resumed
        run's included): what the caller's schedule derives from the run so far (the image trainer
        sets the epoch's learning rate from the time spent) it can derive again after a resume.
        Returning ``True`` between two epochs ends the run after the last one (``stopped_by ==
        "on_epoch_start"``); in the middle of an epoch, or before the first, it is ignored.
    before_validation : callable, optional
        ``before_validation(epoch)``, called at the end of every epoch before the validation NLL is
        measured (the image trainer recalibrates its batch norms there).
    shuffle_seed : callable, optional
        ``shuffle_seed(epoch) -> int``: epoch ``epoch`` (from 1) visits the rows in the order
        ``np.random.default_rng(shuffle_seed(epoch)).permutation(N)``. Default: one generator seeded
        with ``seed``, continued from epoch to epoch. (The image trainer passes ``seed + epoch``: the
        orders its published runs used.)

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
    train, val = check_arguments(model, train, val, epochs, batch_size, lr_schedule, checkpoint_dir,
                                  checkpoint_every, resume, time_limit)
    if memory is not None:
        model.set_memory(memory)
    optimizer = Adam(model, lr=2e-3) if optimizer is None else optimizer
    check_same_device(model, optimizer)
    base_lr, base_scale = optimizer.lr, optimizer.lr_scale
    steps_per_epoch = train.shape[0] // batch_size

    def step_loss(batch: np.ndarray) -> float:
        """The NLL and its gradient of ``batch``, data-parallel over ``comm``'s ranks (one process: unchanged)."""
        return distributed.backward(comm, model, batch, model.nll_and_backward)

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
        run = run_config(epochs=epochs, batch_size=batch_size, seed=seed, patience=patience, clip_norm=clip_norm,
                         lr_schedule=lr_schedule, train=data_fingerprint(train), val=data_fingerprint(val))
        if time_limit is not None:  # absent otherwise, as in the checkpoints written before it existed
            run["time_limit"] = float(time_limit)
        if resume:  # rank 0 first: it sets damaged checkpoints aside before the others read
            state, result.resumed_from = distributed.root_first(
                comm, lambda: resume_run(checkpoint_dir, model, optimizer, run, steps_per_epoch)
            )
            optimizer.lr = base_lr  # older files hold the scheduled rate of their step; the loop sets it again
            rng.bit_generator.state = state.rng
        elif list_checkpoints(checkpoint_dir):
            raise ValueError(
                f"{checkpoint_dir} already holds checkpoints of a run; resume it or choose another folder"
            )
        distributed.on_root(comm, lambda: remove_temporary_files(checkpoint_dir))  # left by a killed writer

    def diverged(what: str) -> NonFiniteLossError:
        hint = divergence_hint(model, optimizer, result.checkpoint or result.resumed_from)  # from the bad parameters
        distributed.barrier(comm)  # every rank has read them before the ranks of a node restore their shared copy
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
        with distributed.training(comm, model, optimizer):  # a node's ranks share θ and divide the update
            while not state.finished:
                if on_epoch_start is not None and on_epoch_start(state.epoch, state.history) is True:
                    if state.batch == 0 and state.history:
                        state.finished, state.history[-1]["stopped_by"] = True, "on_epoch_start"
                        break
                state.rng = rng.bit_generator.state  # where this epoch's shuffle starts (a resume redraws it)
                shuffler = rng if shuffle_seed is None else np.random.default_rng(shuffle_seed(state.epoch))
                order = shuffler.permutation(train.shape[0])
                for i in range(state.batch, steps_per_epoch):
                    if lr_schedule == "cosine":
                        optimizer.lr_scale = cosine_lr(base_scale, state.steps, total_steps)
                    state.batch = i + 1
                    try:
                        loss = train_step(model, optimizer, train[order[i * batch_size : (i + 1) * batch_size]],
                                          clip=clip_norm, loss_and_backward=step_loss)
                    except NonFiniteLossError as error:
                        if not skip_nonfinite:
                            where = f"at epoch {state.epoch}, batch {i + 1}, step {state.steps + 1}"
                            raise diverged(f"{error} {where}") from None
                        state.skipped += 1
                        continue
                    state.steps += 1
                    state.epoch_loss += loss
                    state.epoch_batches += 1
                    bar.update(1)
                    bar.set_postfix(nll=f"{loss:.4f}", refresh=False)
                    if checkpoint_every and state.steps % checkpoint_every == 0:
                        checkpoint()
                if state.epoch_batches == 0:
                    raise diverged(f"every batch of epoch {state.epoch} had a non-finite loss or gradient")
                if before_validation is not None:
                    before_validation(state.epoch)
                try:
                    entry = _end_epoch(model, val, state, epochs, patience, start, comm)
                except NonFiniteError as error:
                    raise diverged(f"the validation NLL after epoch {state.epoch} is not finite ({error})") from error
                # rank 0's clock: every rank stops alike
                entry["seconds"] = distributed.broadcast(comm, entry["seconds"])
                _stop_if_asked(entry, state, time_limit, on_epoch_end)
                shown = "-" if entry["val_nll"] is None else f"{entry['val_nll']:.4f}"
                bar.set_description(f"epoch {entry['epoch']} val {shown}")
            if checkpoint_dir is not None:
                checkpoint()  # the finished run, so resuming it after a crash in what follows returns at once
    finally:
        bar.close()
        optimizer.lr, optimizer.lr_scale = base_lr, base_scale
    model.load_state_dict(state.best_params)
    result.history = state.history
    result.best_val_nll = state.best_val if val is not None else None
    result.best_epoch = state.best_epoch
    result.steps = state.steps
    result.skipped_batches = state.skipped
    result.stopped_early = state.stopped_early
    result.stopped_by = state.history[-1].get("stopped_by", "epochs") if state.history else "epochs"
    result.seconds = time.perf_counter() - start
    return result


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
        entry["stopped_by"] = "patience"
    elif state.epoch >= epochs:
        entry["stopped_by"] = "epochs"
    state.finished = state.stopped_early or state.epoch >= epochs
    state.epoch, state.batch, state.epoch_loss, state.epoch_batches = state.epoch + 1, 0, 0.0, 0
    return entry


def _stop_if_asked(
    entry: dict, state: TrainState, time_limit: float | None, on_epoch_end: Callable[[int, dict], bool | None] | None
) -> None:
    """End the run after the epoch of ``entry`` if ``on_epoch_end`` returns True or the time limit is crossed."""
    if on_epoch_end is not None and on_epoch_end(entry["epoch"], entry) is True and not state.finished:
        state.finished, entry["stopped_by"] = True, "on_epoch_end"
    if time_limit is not None and entry["seconds"] >= time_limit and not state.finished:
        state.finished, entry["stopped_by"] = True, "time_limit"
