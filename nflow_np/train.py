"""Maximum-likelihood training: minibatch Adam/SGD on the mean NLL, validation, early stopping.

``θ* = argmax_θ Σ_n log p(x_n | θ)`` (the lecture's MLE problem), approximated by stochastic
gradient steps on minibatches; after every epoch the validation NLL decides which parameters are
kept (the best seen) and whether to stop (no improvement for ``patience`` epochs).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from nflow_np.model import FlowModel
from nflow_np.optim import Adam, Optimizer, clip_grad_norm, global_grad_norm
from nflow_np.validation import check_batch


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf; the model holds the last good parameters."""


@dataclass
class TrainResult:
    """What :func:`fit` did.

    Attributes
    ----------
    history : list of dict
        One entry per epoch: ``epoch``, ``step``, ``train_nll`` (mean over the epoch's batches),
        ``val_nll`` (``None`` without validation data), ``seconds`` since the start.
    best_val_nll : float or None
        Validation NLL of the parameters the model holds at the end.
    best_epoch : int
        Epoch (1-based) those parameters come from.
    steps : int
        Optimizer steps taken.
    seconds : float
        Wall-clock time of the whole fit.
    stopped_early : bool
        Whether patience ran out before ``epochs``.
    """

    history: list[dict] = field(default_factory=list)
    best_val_nll: float | None = None
    best_epoch: int = 0
    steps: int = 0
    seconds: float = 0.0
    stopped_early: bool = False


def cosine_lr(base_lr: float, step: int, total_steps: int, final_fraction: float = 0.0) -> float:
    """Cosine decay from ``base_lr`` at step 0 to ``final_fraction · base_lr`` at ``total_steps``."""
    progress = min(step / max(total_steps, 1), 1.0)
    return base_lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def evaluate_nll(model: FlowModel, x: np.ndarray, batch_size: int = 8192) -> float:
    """Mean NLL (nats) of all rows of ``x``, computed in batches to bound memory."""
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
    progress: bool = True,
) -> TrainResult:
    """Fit ``model`` to the rows of ``train`` by minibatch maximum likelihood.

    Parameters
    ----------
    model : FlowModel
        Trained in place; at the end it holds the parameters with the best validation NLL.
    train : numpy.ndarray, shape (N, D)
        Training data, in the model's dtype.
    val : numpy.ndarray, shape (M, D), optional
        Validation data; without it the last parameters are kept and there is no early stop.
    optimizer : Optimizer, optional
        Default: ``Adam(model, lr=1e-3)``.
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
    progress : bool
        Show a tqdm bar with the running NLL.

    Returns
    -------
    TrainResult

    Raises
    ------
    NonFiniteLossError
        If a batch loss or a gradient is NaN/Inf; the model is first restored to the best
        parameters seen (or its initial ones).
    """
    dtype = model.dtype
    check_batch(train, "train", model.dim, dtype)
    if val is not None:
        check_batch(val, "val", model.dim, dtype)
    if not 1 <= batch_size <= train.shape[0]:
        raise ValueError(f"batch_size must be between 1 and the {train.shape[0]} training rows, got {batch_size}")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
    optimizer = Adam(model, lr=1e-3) if optimizer is None else optimizer
    base_lr = optimizer.lr
    rng = np.random.default_rng(seed)
    steps_per_epoch = train.shape[0] // batch_size
    total_steps = epochs * steps_per_epoch

    result = TrainResult()
    best_state = model.state_dict()
    best_val = math.inf
    start = time.perf_counter()
    bar = tqdm(total=total_steps, disable=not progress, desc="train", unit="step", leave=False)
    try:
        for epoch in range(1, epochs + 1):
            order = rng.permutation(train.shape[0])
            epoch_loss = 0.0
            for i in range(steps_per_epoch):
                if lr_schedule == "cosine":
                    optimizer.lr = cosine_lr(base_lr, result.steps, total_steps)
                batch = train[order[i * batch_size : (i + 1) * batch_size]]
                model.zero_grad()
                loss = model.nll_and_backward(batch)
                # the norm is needed anyway to catch a NaN/Inf gradient before it reaches the parameters
                norm = clip_grad_norm(model, clip_norm) if clip_norm else global_grad_norm(model)
                if not (math.isfinite(loss) and math.isfinite(norm)):
                    model.load_state_dict(best_state)
                    raise NonFiniteLossError(
                        f"non-finite loss ({loss}) or gradient norm ({norm}) at epoch {epoch}, step "
                        f"{result.steps + 1}; the model holds the best parameters seen so far. "
                        "Try a lower learning rate, gradient clipping, or a smaller scale bound."
                    )
                optimizer.step()
                result.steps += 1
                epoch_loss += loss
                bar.update(1)
                bar.set_postfix(nll=f"{loss:.4f}", refresh=False)
            entry = {"epoch": epoch, "step": result.steps, "train_nll": epoch_loss / steps_per_epoch}
            if val is not None:
                val_nll = evaluate_nll(model, val)
                entry["val_nll"] = val_nll
                if val_nll < best_val:
                    best_val, best_state, result.best_epoch = val_nll, model.state_dict(), epoch
            else:
                entry["val_nll"] = None
                best_state, result.best_epoch = model.state_dict(), epoch
            entry["seconds"] = time.perf_counter() - start
            result.history.append(entry)
            bar.set_description(f"epoch {epoch} val {entry['val_nll'] if val is None else f'{val_nll:.4f}'}")
            if patience is not None and val is not None and epoch - result.best_epoch >= patience:
                result.stopped_early = True
                break
    finally:
        bar.close()
        optimizer.lr = base_lr
    model.load_state_dict(best_state)
    result.best_val_nll = best_val if val is not None else None
    result.seconds = time.perf_counter() - start
    return result
