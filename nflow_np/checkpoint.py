"""Training checkpoints: everything :func:`~nflow_np.train.fit` needs to continue a run exactly.

A checkpoint folder holds files ``checkpoint-<step>.npz`` (``<step>``: optimizer steps taken, nine
digits), the newest :data:`KEEP` of them. Each file is complete on its own and is written
atomically (temporary file, fsync, rename, fsync of the folder; :func:`nflow_np.io.atomic_write`),
so a crash at any moment leaves every published checkpoint intact: at worst a stray temporary file
``.checkpoint-<step>.npz.<random>.tmp``, which loading ignores and the next writer removes.

One file, an ``.npz`` archive read with ``allow_pickle=False``, holds

- ``model/<name>``: the parameters at that step (``name`` as in ``model.state_dict()``);
- ``best/<name>``: the parameters with the best validation NLL so far (what ``fit`` returns);
- ``optimizer/<key>``: ``optimizer.state_dict()`` (step count, learning rate, moment buffers);
- ``meta``: UTF-8 JSON as a ``uint8`` array::

    {"format": "nflow-checkpoint", "format_version": 1, "backend": "numpy",
     "model": {"dtype", "dim", "base", "flow"},           # as in model.json
     "optimizer": {"kind": "adam", "lr", "betas", "eps", "weight_decay"},  # + "groups" if it has any
     "run": {"epochs", "batch_size", "seed", "patience", "clip_norm", "lr_schedule",
             "train": {"shape", "dtype", "sha256"}, "val": {...} or null},   # + "time_limit" if set
     "state": {"epoch", "batch", "steps", "skipped", "epoch_loss", "epoch_batches", "rng",
               "best_val", "best_epoch", "history", "seconds", "finished", "stopped_early",
               "noise"},                                  # "noise": absent in files written before it
     "arrays_sha256": "…", "metadata": {...}}

``state`` is the position of the run: ``batch`` batches of epoch ``epoch`` are done, and ``rng`` is
the shuffling generator's state at the start of that epoch, so resuming redraws the same
permutation and continues with batch ``batch``. ``noise`` holds the generator states of the
model's layers that draw noise in their forward pass (an image model's dequantisation), in module
order, so that the resumed run draws the noise the uninterrupted one draws. ``arrays_sha256``
covers every array, so a damaged file is refused rather than half-trusted; :func:`latest_checkpoint`
then falls back to the one before.
Every problem with a file raises :class:`CheckpointError`, a :class:`~nflow_np.io.ModelFileError`.

Length: over 400 lines because the checkpoint format (what is saved, every check on reading it back,
the legacy layouts that must still load) is one contract and is kept in one file.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nflow_np.distributed_layers import drawing_layers
from nflow_np.files import safe
from nflow_np.files.model_files import check_description, describe_model, model_from_description
from nflow_np.files.safe import (
    ARCHIVE_ERRORS,
    ModelFileError,
    archive_members,
    atomic_write,
    parse_json,
    read_arrays,
    read_file,
)
from nflow_np.model import FlowModel
from nflow_np.optim import SGD, Adam, Optimizer, RMSprop

FORMAT = "nflow-checkpoint"
FORMAT_VERSION = 1
KEEP = 2
"""How many checkpoints a folder keeps: the newest, and one to fall back on if it is damaged."""

_NAME = re.compile(r"checkpoint-(\d{9})\.npz")
_TEMPORARY = re.compile(r"\.checkpoint-\d{9}\.npz\.[0-9a-f]+\.tmp")
_META_KEYS = {"format", "format_version", "backend", "model", "optimizer", "run", "state", "arrays_sha256", "metadata"}
_OPTIMIZERS: dict[str, type[Optimizer]] = {"adam": Adam, "sgd": SGD, "rmsprop": RMSprop}


class CheckpointError(ModelFileError):
    """A checkpoint file or folder is missing, damaged or inconsistent; the message says which and why."""


class NonFiniteCheckpointError(CheckpointError, FloatingPointError):
    """Refused to checkpoint non-finite state; the message names the array and the last checkpoint that loads."""


@dataclass
class TrainState:
    """Where a run of :func:`~nflow_np.train.fit` is: enough to continue it bit for bit.

    Attributes
    ----------
    epoch : int
        The epoch in progress (1-based); ``epochs + 1`` once all are done.
    batch : int
        Batches of ``epoch`` already processed (stepped or skipped).
    steps : int
        Optimizer steps taken.
    skipped : int
        Batches skipped because their loss or gradient was not finite.
    epoch_loss : float
        Sum of the losses of the stepped batches of ``epoch``.
    epoch_batches : int
        Number of those batches.
    rng : dict or None
        The shuffling generator's ``bit_generator.state`` at the start of ``epoch``.
    best_params : dict[str, numpy.ndarray]
        Parameters with the best validation NLL so far (the initial ones before any validation).
    best_val : float
        Their validation NLL (``inf`` before any).
    best_epoch : int
        The epoch they come from (0: the initial parameters).
    history : list of dict
        One entry per finished epoch (see :class:`~nflow_np.train.TrainResult`).
    seconds : float
        Training time so far.
    finished, stopped_early : bool
        Whether the run is over, and whether patience ended it.
    noise : list of dict or None
        ``bit_generator.state`` of every layer of the model that draws noise of its own
        (:func:`~nflow_np.distributed_layers.drawing_layers`), as saved; ``None`` in files written
        before it was recorded.
    """

    epoch: int = 1
    batch: int = 0
    steps: int = 0
    skipped: int = 0
    epoch_loss: float = 0.0
    epoch_batches: int = 0
    rng: dict | None = None
    best_params: dict[str, np.ndarray] = field(default_factory=dict)
    best_val: float = math.inf
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    finished: bool = False
    stopped_early: bool = False
    noise: list[dict] | None = None

    def to_json(self) -> dict:
        """Every field but ``best_params`` (stored as arrays), JSON-ready (``best_val`` inf as null)."""
        fields = {name: getattr(self, name) for name in _STATE_TYPES}
        fields["best_val"] = None if math.isinf(self.best_val) else self.best_val
        return fields

    @classmethod
    def from_json(cls, fields: object, best_params: dict[str, np.ndarray], where: str) -> TrainState:
        """Check ``fields`` (from :meth:`to_json`) and build the state; raise :class:`CheckpointError`."""
        if not isinstance(fields, dict) or not set(_STATE_TYPES) - _OPTIONAL <= set(fields) <= set(_STATE_TYPES):
            keys = sorted(fields) if isinstance(fields, dict) else type(fields).__name__
            raise CheckpointError(f"{where}: state must have the keys {sorted(_STATE_TYPES)}, got {keys}")
        fields = {"noise": None} | fields
        for name, kinds in _STATE_TYPES.items():
            value = fields[name]
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise CheckpointError(f"{where}: state.{name} has the wrong type ({type(value).__name__})")
            if isinstance(value, int | float) and not isinstance(value, bool) and not math.isfinite(value):
                raise CheckpointError(f"{where}: state.{name} must be finite, got {value}")
            # counters and time cannot be negative; losses (an NLL, a sum of them) can
            if name not in ("epoch_loss", "best_val") and isinstance(value, int | float) and value < 0:
                raise CheckpointError(f"{where}: state.{name} must not be negative, got {value}")
        if fields["epoch"] < 1:
            raise CheckpointError(f"{where}: state.epoch must be at least 1, got {fields['epoch']}")
        for name, state in [("rng", fields["rng"]), *(("noise", s) for s in fields["noise"] or [])]:
            try:
                if state is not None:
                    np.random.PCG64().state = state
            except (ValueError, TypeError, KeyError, OverflowError) as error:
                raise CheckpointError(f"{where}: state.{name} is not a PCG64 state: {error}") from error
        if not all(isinstance(entry, dict) for entry in fields["history"]):
            raise CheckpointError(f"{where}: state.history must be a list of objects")
        best_val = math.inf if fields["best_val"] is None else float(fields["best_val"])
        return cls(**{**fields, "best_val": best_val, "best_params": best_params})


_STATE_TYPES: dict[str, tuple[type, ...]] = {
    "epoch": (int,),
    "batch": (int,),
    "steps": (int,),
    "skipped": (int,),
    "epoch_loss": (float, int),
    "epoch_batches": (int,),
    "rng": (dict, type(None)),
    "best_val": (float, int, type(None)),
    "best_epoch": (int,),
    "history": (list,),
    "seconds": (float, int),
    "finished": (bool,),
    "stopped_early": (bool,),
    "noise": (list, type(None)),
}
_OPTIONAL = {"noise"}
"""State keys that files written before them lack."""


@dataclass
class Checkpoint:
    """A loaded, fully checked checkpoint.

    Attributes
    ----------
    path : pathlib.Path
    model : FlowModel
        Rebuilt from the file, holding the parameters at the checkpoint's step.
    description : dict
        The model description (``dtype``, ``dim``, ``base``, ``flow``).
    optimizer : dict
        The optimizer's kind and hyperparameters (see :func:`optimizer_config`).
    optimizer_state : dict[str, numpy.ndarray]
        What ``optimizer.load_state_dict`` takes.
    run : dict
        The arguments of the run that must not change on resume (see :func:`run_config`).
    state : TrainState
    backend : str
        The backend that computed it.
    metadata : dict
    """

    path: Path
    model: FlowModel
    description: dict
    optimizer: dict
    optimizer_state: dict[str, np.ndarray]
    run: dict
    state: TrainState
    backend: str
    metadata: dict

    def restore(self, model: FlowModel, optimizer: Optimizer) -> None:
        """Copy the parameters and the optimizer state into ``model`` and ``optimizer``.

        ``optimizer`` is compared as constructed, its ``lr`` being the base learning rate.

        Raises
        ------
        ValueError
            ``model`` has another architecture, or ``optimizer`` another kind or hyperparameters,
            or the file records no noise state for a model that draws noise; nothing is written then.
        """
        if describe_model(model) != self.description:
            raise ValueError(f"cannot resume from {self.path}: it holds a model of another architecture or dtype")
        config = optimizer_config(optimizer, optimizer.lr)
        if config != self.optimizer:
            raise ValueError(f"cannot resume from {self.path}: its optimizer is {self.optimizer}, not {config}")
        layers, noise = drawing_layers(model), self.state.noise
        if layers and (noise is None or len(noise) != len(layers)):
            found = "none" if noise is None else len(noise)
            raise ValueError(f"cannot resume from {self.path}: the model has {len(layers)} layers drawing noise, the "
                             f"file records the state of {found}, so the run could not continue bit for bit")
        model.load_state_dict(self.model.state_dict())
        optimizer.load_state_dict(self.optimizer_state)
        for layer, state in zip(layers, noise or [], strict=True):
            layer.rng.bit_generator.state = state


def optimizer_config(optimizer: Optimizer, lr: float) -> dict:
    """Kind and hyperparameters of ``optimizer`` with base learning rate ``lr``, JSON-ready.

    Raises
    ------
    TypeError
        An optimizer other than :class:`~nflow_np.optim.Adam`, :class:`~nflow_np.optim.SGD` and
        :class:`~nflow_np.optim.RMSprop`.
    """
    if type(optimizer) is Adam:
        hyper = {"betas": [optimizer.beta1, optimizer.beta2], "eps": optimizer.eps}
    elif type(optimizer) is SGD:
        hyper = {"momentum": optimizer.momentum}
    elif type(optimizer) is RMSprop:
        hyper = {"alpha": optimizer.alpha, "eps": optimizer.eps, "momentum": optimizer.momentum}
    else:
        raise TypeError(f"checkpoints know Adam, SGD and RMSprop, not {type(optimizer).__name__}")
    kind = next(name for name, cls in _OPTIMIZERS.items() if type(optimizer) is cls)
    groups = {"groups": optimizer.group_config()} if len(optimizer.groups) > 1 else {}  # absent: files before groups
    return {"kind": kind, "lr": float(lr), **hyper, "weight_decay": optimizer.weight_decay} | groups


def data_fingerprint(x: np.ndarray | None) -> dict | None:
    """``{"shape", "dtype", "sha256"}`` of a data set, so a resume on other data is refused."""
    if x is None:
        return None
    digest = hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()
    return {"shape": list(x.shape), "dtype": str(x.dtype), "sha256": digest}


def run_config(**arguments: object) -> dict:
    """The arguments of a run that a resume must repeat (``fit``'s, plus data fingerprints), JSON-ready."""
    return json.loads(json.dumps(arguments, allow_nan=False))


# -- writing ---------------------------------------------------------------------------------------
def checkpoint_path(directory: str | Path, steps: int) -> Path:
    """``directory/checkpoint-<steps>.npz``."""
    return Path(directory) / f"checkpoint-{steps:09d}.npz"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """The checkpoint files of ``directory``, newest (most steps) first; none if it does not exist."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [path for path in directory.iterdir() if _NAME.fullmatch(path.name)]
    return sorted(found, key=lambda path: path.name, reverse=True)


def remove_temporary_files(directory: str | Path) -> None:
    """Delete temporary files left by a writer that was killed before its rename."""
    directory = Path(directory)
    if directory.is_dir():
        for path in directory.iterdir():
            if _TEMPORARY.fullmatch(path.name):
                path.unlink(missing_ok=True)


def save_checkpoint(
    directory: str | Path,
    model: FlowModel,
    optimizer: Optimizer,
    state: TrainState,
    run: dict,
    *,
    lr: float,
    backend: str,
    metadata: dict | None = None,
) -> Path:
    """Write ``checkpoint-<state.steps>.npz`` atomically, then delete all but the newest :data:`KEEP`.

    Parameters
    ----------
    directory : str or pathlib.Path
        Created if needed.
    model, optimizer : FlowModel, Optimizer
        Their current parameters and state are saved.
    state : TrainState
    run : dict
        From :func:`run_config`.
    lr : float
        The base learning rate (the optimizer's may be scheduled).
    backend : str
    metadata : dict, optional
        JSON-ready; stored and returned by :func:`load_checkpoint`.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    arrays = {f"model/{name}": value for name, value in model.state_dict().items()}
    arrays |= {f"best/{name}": value for name, value in state.best_params.items()}
    arrays |= {f"optimizer/{key}": value for key, value in optimizer.state_dict().items()}
    _refuse_non_finite(arrays, Path(directory), state.steps)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backend": backend,
        "model": describe_model(model),
        "optimizer": optimizer_config(optimizer, lr),
        "run": run,
        "state": state.to_json() | {"noise": noise_states(model)},
        "arrays_sha256": _digest(arrays),
        "metadata": {} if metadata is None else metadata,
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta, allow_nan=False).encode("utf-8"), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = atomic_write(checkpoint_path(directory, state.steps), buffer.getvalue())
    for old in list_checkpoints(directory)[KEEP:]:
        old.unlink(missing_ok=True)
    return path


def noise_states(model: FlowModel) -> list[dict]:
    """``bit_generator.state`` of every layer of ``model`` that draws noise of its own, in module order."""
    return [layer.rng.bit_generator.state for layer in drawing_layers(model)]


def _refuse_non_finite(arrays: dict[str, np.ndarray], directory: Path, steps: int) -> None:
    """Raise :class:`NonFiniteCheckpointError` if any array holds a NaN/Inf: a loader would refuse it anyway."""
    bad = [name for name, value in arrays.items() if value.dtype.kind == "f" and not np.isfinite(value).all()]
    if not bad:
        return
    try:
        kept = f"the last good checkpoint {latest_checkpoint(directory)[0].path} is untouched: resume from it"
    except CheckpointError:
        kept = "no checkpoint of this run loads: start again"
    raise NonFiniteCheckpointError(
        f"step {steps}: {bad[0]} holds non-finite values ({len(bad)} arrays do); not checkpointed, and {kept} "
        "with a lower learning rate (or clip gradients)"
    )


def _digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``arrays``."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}\0{value.dtype.str}\0{value.shape}\0".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


# -- reading ---------------------------------------------------------------------------------------
def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load and check one checkpoint file; nothing outside the returned object is touched.

    Raises
    ------
    CheckpointError
        The file is missing, not a checkpoint, damaged, or inconsistent with itself.
    """
    path = Path(path)
    try:
        data = read_file(path, safe.MAX_WEIGHTS_BYTES)
        meta, meta_shape = _read_meta(data, path)
        return _build(data, path, meta, meta_shape)
    except CheckpointError:
        raise
    except ModelFileError as error:  # from the shared model-file checks
        raise CheckpointError(str(error)) from error


def _read_meta(data: bytes, path: Path) -> tuple[dict, tuple]:
    """The checked ``meta`` JSON and the shape of its array (read alone, after bounding its size)."""
    sizes = archive_members(data, path)
    if "meta" not in sizes:
        raise CheckpointError(f"{path}: no meta array; not a checkpoint")
    if sizes["meta"] > safe.MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path}: meta declares {sizes['meta']} bytes, more than {safe.MAX_CONFIG_BYTES}")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            raw = archive["meta"]
    except ARCHIVE_ERRORS as error:
        raise CheckpointError(f"{path}: meta cannot be read: {type(error).__name__}: {error}") from error
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 1:
        raise CheckpointError(f"{path}: meta must be a 1-D uint8 array")
    meta = parse_json(raw.tobytes(), path)
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: not a version-{FORMAT_VERSION} {FORMAT} file (format {meta.get('format')!r}, "
            f"version {meta.get('format_version')!r})"
        )
    if set(meta) != _META_KEYS:
        missing, unexpected = sorted(_META_KEYS - set(meta)), sorted(set(meta) - _META_KEYS)
        raise CheckpointError(f"{path}: missing keys {missing}, unexpected keys {unexpected}")
    for key, kind in (("backend", str), ("model", dict), ("optimizer", dict), ("run", dict), ("metadata", dict)):
        if not isinstance(meta[key], kind):
            raise CheckpointError(f"{path}: {key} must be a {kind.__name__}, got {type(meta[key]).__name__}")
    return meta, raw.shape


def _build(data: bytes, path: Path, meta: dict, meta_shape: tuple) -> Checkpoint:
    where = str(path)
    description = meta["model"]
    if set(description) != {"dtype", "dim", "base", "flow"}:
        raise CheckpointError(f"{where}: model must have the keys dtype, dim, base, flow")
    check_description(description, where)
    dtype = np.dtype(description["dtype"])
    model = model_from_description(description, where, max_parameters=len(data) // dtype.itemsize)
    optimizer = meta["optimizer"]
    kind = _OPTIMIZERS.get(optimizer.get("kind")) if isinstance(optimizer.get("kind"), str) else None
    if kind is None:
        raise CheckpointError(f"{where}: unknown optimizer {optimizer.get('kind')!r}; known: {sorted(_OPTIMIZERS)}")
    if not isinstance(optimizer.get("lr"), float | int) or not 0 < optimizer["lr"] < math.inf:
        raise CheckpointError(f"{where}: optimizer lr must be a positive number, got {optimizer.get('lr')!r}")

    shapes = {name: value.shape for name, value in model.named_state()}  # parameters and buffers
    expected: dict[str, tuple] = {"meta": (meta_shape, np.uint8)}
    for prefix in ("model", "best"):
        expected |= {f"{prefix}/{name}": (shape, dtype) for name, shape in shapes.items()}
    expected |= {"optimizer/step": ((), np.int64), "optimizer/lr": ((), np.float64)}
    for buffer in kind._buffers:
        expected |= {f"optimizer/{buffer}/{name}": (value.shape, dtype) for name, value, _ in model.named_parameters()}
    # files written while batch norm's running averages were parameters hold (unused) moments for them too
    members = archive_members(data, path)
    legacy = {f"optimizer/{b}/{n}": (value.shape, dtype) for b in kind._buffers for n, value in model.named_buffers()}
    expected |= {key: spec for key, spec in legacy.items() if key in members}
    arrays = read_arrays(data, path, expected, "the model and optimizer it describes")
    del arrays["meta"]
    if _digest(arrays) != meta["arrays_sha256"]:
        raise CheckpointError(f"{where}: the arrays do not match their checksum; the file is damaged")
    for key in legacy:
        arrays.pop(key, None)

    model.load_state_dict({name: arrays[f"model/{name}"] for name in shapes})
    best = {name: arrays[f"best/{name}"] for name in shapes}
    optimizer_state = {key[len("optimizer/") :]: arrays[key] for key in arrays if key.startswith("optimizer/")}
    if int(optimizer_state["step"]) < 0:
        raise CheckpointError(f"{where}: optimizer step is negative")
    state = TrainState.from_json(meta["state"], best, where)
    return Checkpoint(
        path, model, description, optimizer, optimizer_state, meta["run"], state, meta["backend"], meta["metadata"]
    )


def latest_checkpoint(directory: str | Path) -> tuple[Checkpoint, list[str]]:
    """The newest checkpoint of ``directory`` that loads, and why any newer one was passed over.

    Returns
    -------
    checkpoint : Checkpoint
    skipped : list of str
        One message per newer file that failed to load (damaged, truncated...).

    Raises
    ------
    CheckpointError
        No checkpoint in ``directory`` loads.
    """
    skipped = []
    for path in list_checkpoints(directory):
        try:
            return load_checkpoint(path), skipped
        except CheckpointError as error:
            skipped.append(str(error))
    if skipped:
        raise CheckpointError(f"{directory}: no checkpoint loads: " + "; ".join(skipped))
    raise CheckpointError(f"{directory}: no checkpoint to resume from (no checkpoint-<step>.npz files)")


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to ``damaged-<name>`` so it is never loaded again (nor deleted)."""
    target = path.with_name(f"damaged-{path.name}")
    path.replace(target)
    return target
