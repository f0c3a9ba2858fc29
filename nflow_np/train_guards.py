"""The guards around :func:`~nflow_np.train.fit`'s loop (README, "Reliability").

Its arguments and data are checked before anything is trained or written; a resume loads the
newest good checkpoint only after checking that it belongs to the same run (the arguments in
:data:`RESUME_MAY_CHANGE` aside); a diverged run names the likely causes judged from the
parameters that diverged.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np

from nflow_np import backend
from nflow_np.checkpoint import CheckpointError, TrainState, latest_checkpoint, list_checkpoints, set_aside
from nflow_np.model import FlowModel
from nflow_np.optim import Optimizer
from nflow_np.validation import check_data


def check_arguments(
    model: FlowModel,
    train: np.ndarray,
    val: np.ndarray | None,
    epochs: int,
    batch_size: int,
    lr_schedule: str,
    checkpoint_dir: object,
    checkpoint_every: int,
    resume: bool,
    time_limit: float | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Check the data (returned converted) and :func:`fit`'s arguments before anything is trained or written."""
    train = check_data(train, "train", model.dim, model.dtype)
    if val is not None:
        val = check_data(val, "val", model.dim, model.dtype)
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
    if time_limit is not None and not (isinstance(time_limit, int | float) and time_limit > 0):
        raise ValueError(f"time_limit must be a positive number of seconds or None, got {time_limit!r}")
    return train, val


def check_same_device(model: FlowModel, optimizer: Optimizer) -> None:
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


RESUME_MAY_CHANGE = ("epochs", "patience", "time_limit")
"""What a resumed run may change: how long it trains (the cosine schedule then follows the new length)."""


def resume_run(
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
        last = state.history[-1] if state.history else {}
        limit = run.get("time_limit")
        spent = limit is not None and state.batch == 0 and last.get("seconds", 0) >= limit  # fit's own budget
        state.finished = state.stopped_early or completed >= run["epochs"] or spent
        last.pop("stopped_by", None)  # what ends the run now is decided again
        if state.finished and last:
            last["stopped_by"] = "patience" if state.stopped_early else "epochs" if completed >= run["epochs"] else (
                "time_limit")
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


def divergence_hint(model: FlowModel, optimizer: Optimizer, checkpoint: Path | None) -> str:
    """What is kept after a non-finite loss, and its likely causes judged from the parameters."""
    kept = "the model holds the best parameters seen so far"
    if checkpoint is not None:
        kept += f" and the last good checkpoint {checkpoint} is untouched"
    rate = optimizer.lr * optimizer.lr_scale
    causes = [f"a learning rate ({rate:g}) too high for this model: lower it or clip gradients (clip_norm)"]
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
