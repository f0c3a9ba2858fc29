"""Checks ``nflow`` makes before any training: the output folder, the disk space, the memory a run needs.

A run that cannot end well is refused before its first step, with the number that does not fit, so
that nothing ends in a ``MemoryError`` traceback or an unwritable folder after an hour of training.
The estimates are deliberately simple upper-bound-ish sums (stated next to each); they guard
against sizes that are off by orders of magnitude, not against the last few percent.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from nflow_np.checkpoint import list_checkpoints

MODEL_FILES = ("model.json", "model.npz", "model.safetensors")
GMM_FILES = ("gmm.npz",)


def gigabytes(nbytes: float) -> str:
    """``1.5e9`` → ``"1.5 GB"`` (decimal units, as ``df -H``)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{int(nbytes)} bytes"


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (``MemAvailable`` on Linux), or ``None`` if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(nbytes: float, what: str, option: str) -> None:
    """Refuse (``ValueError``) a run whose ``what`` needs more than the memory available; ``option`` names the flag."""
    available = available_memory()
    if available is not None and nbytes > available:
        raise ValueError(
            f"{option}: {what} needs about {gigabytes(nbytes)} of memory, more than the {gigabytes(available)} "
            "available on this machine"
        )


def mlp_parameters(widths: list[int]) -> int:
    """Weights and biases of a dense network with layer widths ``[in, h1, …, out]``: ``Σ (a + 1)·b``."""
    return sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:], strict=False))


def coupling_parameters(dim: int, layers: int, hidden: tuple[int, ...]) -> int:
    """Parameters of ``layers`` couplings on ``dim`` inputs: each net maps ``⌈dim/2⌉`` → ``hidden`` → ``2·⌈dim/2⌉``."""
    half = (dim + 1) // 2
    return layers * (mlp_parameters([half, *hidden, 2 * half]) + dim)


def training_bytes(n_params: int, itemsize: int, batch_size: int, widths: tuple[int, ...], layers: int) -> int:
    """Memory of a training run: parameters ×5 (value, gradient, Adam's two moments, the best copy) plus the
    activations of one batch (each layer keeps its hidden activations and their pre-activations)."""
    return itemsize * (5 * n_params + 2 * batch_size * sum(widths) * layers)


def save_bytes(n_params: int, itemsize: int) -> int:
    """Disk for a model and two checkpoints: the weights once, and thrice per checkpoint (weights and Adam's
    moments), plus 64 kB of JSON."""
    return itemsize * n_params * (1 + 2 * 3) + 65536


def holds_model(out: Path) -> list[str]:
    """The names in ``out`` that make it the folder of a run: model files, a mixture, checkpoints."""
    found = [name for name in (*MODEL_FILES, *GMM_FILES) if (out / name).exists()]
    checkpoints = out / "checkpoints"
    if checkpoints.is_dir() and list_checkpoints(checkpoints):  # published ones, not a killed writer's temporaries
        found.append("checkpoints/")
    return found


def check_output_folder(out: Path, *, force: bool, kind: str) -> None:
    """Refuse a fresh run into a folder that holds a run, unless ``force``; never mix a mixture and a flow.

    ``kind`` is ``"gmm"`` or a flow kind. With ``force`` the old model stays in place until the new one is
    published by the save at the end of the run.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    found = holds_model(out) if out.is_dir() else []
    if not found:
        return
    flow_files = [name for name in found if name in MODEL_FILES or name == "checkpoints/"]
    if kind == "gmm" and flow_files:
        raise ValueError(f"{out} holds a flow model ({', '.join(flow_files)}): a mixture written there would leave "
                         "a mixed folder; choose another --out")
    if kind != "gmm" and "gmm.npz" in found:
        raise ValueError(f"{out} holds a Gaussian mixture (gmm.npz): a flow written there would leave a mixed "
                         "folder; choose another --out")
    if not force:
        what = "checkpoints of a run" if "checkpoints/" in found else "a model"
        raise ValueError(
            f"{out} already holds {what} ({', '.join(found)}); pass --force to replace it (the old model stays until "
            "the new one is saved), --resume to continue its checkpoints, or choose another --out"
        )


def check_writable(out: Path, needed: int) -> None:
    """Create ``out`` if need be, prove it writable with a scratch file, and check ``needed`` bytes are free there."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".nflow-preflight-"):
            pass
    except OSError as error:
        raise ValueError(f"--out {out} is not a writable folder ({error.strerror or error})") from None
    free = shutil.disk_usage(out).free
    if needed > free:
        raise ValueError(f"--out {out}: the model and its checkpoints need about {gigabytes(needed)}, but only "
                         f"{gigabytes(free)} is free there")


def writer_lock(out: Path) -> contextlib.AbstractContextManager:
    """The lock ``nflow train`` holds on its folder while it runs (:func:`~nflow_np.files.folders.acquire_lock`).

    A second writer is refused naming this process; a dead one's lock is reclaimed. Under ``mpiexec`` rank 0,
    the one rank that writes, takes it.
    """
    from nflow_np import distributed
    from nflow_np.files.folders import acquire_lock

    return acquire_lock(out) if distributed.launched_rank() == 0 else contextlib.nullcontext()
