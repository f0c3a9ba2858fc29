"""Folders replaced whole or not at all, a lock against a second writer, and the space a save needs.

**Publishing** (:func:`publish_folder`). A save builds a complete new folder beside the old one,
``.<name>.new-<pid>-<random>``: the new files, written and fsync'ed, plus a hard link to every other
file of the old folder (checkpoints, plots, the lock; nflow never edits a file in place, so sharing
an inode is safe). Then one atomic step makes it the folder: ``renameat2(RENAME_EXCHANGE)`` swaps the
two names on Linux, or, where that is missing, a plain ``rename`` when there was no folder yet. A
crash or a full disk at any instant before that step leaves the old folder untouched (the staging
folder is garbage, removed by the next save); after it, the new folder is complete.

Where the swap is impossible (no ``renameat2``, the folder is a mount point, the parent is not
writable) the files are published inside the folder instead: all of them written to temporaries
first, then renamed in, ``model.json`` last. A full disk then still leaves the old model (nothing is
renamed until every byte is on disk), but a crash between two renames can leave a pair that loading
refuses ("checksum differs"); the message of :func:`publish_folder`'s caller says which mode ran.

**Clean-up** (:func:`remove_leftovers`): staging folders of dead processes and ``.<file>.<hex>.tmp``
files (from :func:`~nflow_np.files.safe.atomic_write`) are removed at the next save or run.

**Lock** (:func:`acquire_lock`): ``<folder>/.nflow.lock`` holds the PID and host of the writer. It is
created with one ``link`` (atomic, fails if it exists); a second writer is refused with that PID;
a lock whose process is dead is reclaimed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import socket
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from nflow_np.files.safe import ModelFileError, fsync_folder, write_all

LOCK_FILE = ".nflow.lock"
_STAGING = re.compile(r"\.(?P<name>.+)\.new-(?P<pid>\d+)-[0-9a-f]+")
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")


class FolderLockedError(OSError):
    """Another live process holds the folder's lock; the message names its PID."""


# -- publishing ------------------------------------------------------------------------------------
def publish_folder(
    directory: str | os.PathLike, files: Mapping[str, bytes], drop: Iterable[str] = ()
) -> tuple[Path, str]:
    """Make ``directory`` hold ``files`` (name -> bytes) and everything else it held, in one atomic step.

    Parameters
    ----------
    directory : str or os.PathLike
        Created (with its parents) if needed.
    files : mapping of str to bytes
        Plain file names (no ``/``); they replace files of the same name.
    drop : iterable of str
        Names of the old folder not to carry over (e.g. a flow model's files when a mixture is saved).

    Returns
    -------
    directory : pathlib.Path
    mode : {"swap", "in-place"}
        How it was published (module docstring); only ``"swap"`` is atomic against a crash.

    Raises
    ------
    OSError
        The write failed (a full disk, no permission); the old folder is unchanged and nothing of the
        attempt is left behind.
    """
    directory = Path(os.path.abspath(directory))
    if directory.is_symlink():
        directory = directory.resolve()
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a folder")
    for name in files:
        if not name or "/" in name or name.startswith(".") or os.sep in name:
            raise ValueError(f"publish_folder: {name!r} is not a plain file name")
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(directory)
    skip = set(files) | set(drop)
    try:
        staging = _make_staging(directory)
    except PermissionError:
        return _publish_in_place(directory, files, drop), "in-place"
    try:
        for name, data in files.items():
            _write_new(staging / name, data)
        if directory.is_dir():
            _link_tree(directory, staging, skip)
        fsync_folder(staging)
        if not directory.exists():
            os.rename(staging, directory)
        elif not exchange(staging, directory):
            shutil.rmtree(staging, ignore_errors=True)
            return _publish_in_place(directory, files, drop), "in-place"
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # published: what follows only tidies up, and must not report a save that happened as failed
    shutil.rmtree(staging, ignore_errors=True)  # now the old folder
    with contextlib.suppress(OSError):
        fsync_folder(directory.parent)
    return directory, "swap"


def _make_staging(directory: Path) -> Path:
    staging = directory.with_name(f".{directory.name}.new-{os.getpid()}-{secrets.token_hex(6)}")
    os.mkdir(staging)
    return staging


def _write_new(path: Path, data: bytes) -> None:
    """Write a file that does not exist yet (inside a private staging folder): write, fsync, close."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_tree(source: Path, target: Path, skip: set[str]) -> None:
    """Hard-link every regular file under ``source`` into ``target`` (folders recreated, links copied)."""
    for entry in os.scandir(source):
        if entry.name in skip or _TEMPORARY.fullmatch(entry.name):
            continue
        destination = target / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), destination)
        elif entry.is_dir():
            os.mkdir(destination)
            _link_tree(Path(entry.path), destination, set())
            fsync_folder(destination)
        elif entry.is_file():
            try:
                os.link(entry.path, destination)
            except OSError as error:  # a file system without hard links: copy
                if error.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK):
                    raise
                _write_new(destination, Path(entry.path).read_bytes())
        # FIFOs, sockets, devices are not carried over


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap the names ``a`` and ``b`` (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False, having changed nothing, where the call or the file system does not support it.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EBUSY, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _publish_in_place(directory: Path, files: Mapping[str, bytes], drop: Iterable[str]) -> Path:
    """Fallback: every file to a temporary first, then renamed in (the last name of ``files`` last)."""
    directory.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, Path]] = []
    try:
        for name, data in files.items():
            temporary = directory / f".{name}.{secrets.token_hex(6)}.tmp"
            _write_new(temporary, data)
            written.append((temporary, directory / name))
        for name in drop:
            if name not in files:
                (directory / name).unlink(missing_ok=True)
        for temporary, final in written:
            os.replace(temporary, final)
    finally:
        for temporary, _ in written:
            temporary.unlink(missing_ok=True)
    fsync_folder(directory)
    return directory


def remove_leftovers(directory: str | os.PathLike) -> list[Path]:
    """Remove what killed saves left: staging folders of dead processes beside ``directory``, temporaries in it.

    Returns
    -------
    list of pathlib.Path
        What was removed.
    """
    directory = Path(os.path.abspath(directory))
    removed = []
    if directory.parent.is_dir():
        for entry in directory.parent.iterdir():
            match = _STAGING.fullmatch(entry.name)
            if match and match["name"] == directory.name and not pid_alive(int(match["pid"])):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    if directory.is_dir():
        for entry in directory.iterdir():
            if _TEMPORARY.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


# -- the lock --------------------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (one we may not signal counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:  # not POSIX (Windows): assume alive rather than steal a lock
        return True
    return True


@contextmanager
def acquire_lock(directory: str | os.PathLike) -> Iterator[Path]:
    """Hold ``directory``'s lock for a block: ``with acquire_lock(out): ...`` (the folder is created).

    Refuses a second writer while the first is alive; reclaims a lock whose process has died (a
    killed run). The lock file lives in the folder and travels with it through :func:`publish_folder`.

    Yields
    ------
    pathlib.Path
        The lock file.

    Raises
    ------
    FolderLockedError
        A live process holds the lock; the message names its PID and host.
    """
    path = lock(directory)
    try:
        yield path
    finally:
        unlock(path)


def lock(directory: str | os.PathLike) -> Path:
    """Take ``directory``'s lock (see :func:`acquire_lock`); release it with :func:`unlock`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    mine = f"{os.getpid()} {socket.gethostname()}\n"
    for _ in range(100):  # a reclaimed lock can be taken by another reclaimer first: try again
        temporary = directory / f"{LOCK_FILE}.{secrets.token_hex(6)}.new"
        _write_new(temporary, mine.encode())
        try:
            os.link(temporary, path)  # atomic: fails if the lock exists, never leaves it half written
            return path
        except FileExistsError:
            pass
        finally:
            temporary.unlink(missing_ok=True)
        holder = _holder(path)
        if holder is None:
            continue  # released meanwhile
        pid, host = holder
        if pid == os.getpid() and host == socket.gethostname():
            raise FolderLockedError(f"{directory} is locked by this process already ({path})")
        if host == socket.gethostname() and not pid_alive(pid):
            stale = directory / f".{LOCK_FILE}.{secrets.token_hex(6)}.stale"
            try:
                os.rename(path, stale)  # only one reclaimer wins the rename
            except FileNotFoundError:
                continue
            stale.unlink(missing_ok=True)
            continue
        raise FolderLockedError(
            f"{directory} is in use by process {pid} on {host} (lock file {path}); wait for it to end, "
            "or delete the lock file if that process is not writing here"
        )
    raise FolderLockedError(f"{directory}: could not take the lock {path}")


def _holder(path: Path) -> tuple[int, str] | None:
    """``(pid, host)`` written in the lock file; unreadable content counts as a dead process."""
    try:
        text = path.read_text(errors="replace")[:200]
    except FileNotFoundError:
        return None
    except OSError:
        return (-1, socket.gethostname())
    parts = text.split()
    if len(parts) == 2 and parts[0].isdigit():
        return int(parts[0]), parts[1]
    return (-1, socket.gethostname())


def unlock(path: Path) -> None:
    """Release a lock taken by :func:`lock` (only if this process still holds it)."""
    holder = _holder(path)
    if holder is not None and holder == (os.getpid(), socket.gethostname()):
        path.unlink(missing_ok=True)


# -- space -----------------------------------------------------------------------------------------
_ARRAY_OVERHEAD = 128 + 2 * 100  # .npy header and zip headers of one member (more than a safetensors entry)


def save_bytes(n_parameters: int, n_arrays: int, itemsize: int, config_bytes: int = 64 * 1024) -> int:
    """Bytes of one model folder (weights + ``model.json``) with ``n_parameters`` scalars in ``n_arrays`` arrays."""
    return n_parameters * itemsize + n_arrays * _ARRAY_OVERHEAD + config_bytes


def bytes_needed(n_parameters: int, n_arrays: int, itemsize: int, optimizer_buffers: int = 2) -> int:
    """Free space a training run needs at its peak: model files and two checkpoints, with room to replace them.

    A folder save holds the old and the new model at once (two copies); a checkpoint write holds
    :data:`~nflow_np.checkpoint.KEEP` = 2 checkpoints and the one being written (three), each with the
    parameters, the best parameters and ``optimizer_buffers`` moment buffers (Adam: 2).

    Parameters
    ----------
    n_parameters : int
        ``model.num_parameters()`` (e.g. of the model built from the architecture, before training).
    n_arrays : int
        ``len(model.state_dict())``.
    itemsize : int
        4 (float32) or 8 (float64).
    optimizer_buffers : int
        Arrays per parameter in the optimizer state (Adam 2, SGD with momentum 1).
    """
    model = save_bytes(n_parameters, n_arrays, itemsize)
    checkpoint = save_bytes((2 + optimizer_buffers) * n_parameters, (2 + optimizer_buffers) * n_arrays, itemsize)
    return 2 * model + 3 * checkpoint


def check_writable(directory: str | os.PathLike, needed: int = 0) -> Path:
    """Refuse, before any work, a folder that cannot be written or lacks ``needed`` free bytes.

    Writes and removes a small probe file in the folder (created if needed).

    Raises
    ------
    ModelFileError
        Not writable (the message gives the OS error) or not enough free space (both numbers given).
    """
    directory = Path(os.path.abspath(directory))
    probe = directory / f".nflow-probe.{secrets.token_hex(6)}.tmp"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _write_new(probe, b"probe")
        probe.unlink()
    except OSError as error:
        raise ModelFileError(f"{directory}: cannot write there: {error.strerror or error}") from None
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise ModelFileError(
            f"{directory}: {free} bytes free, but the model and its checkpoints need about {needed} bytes"
        )
    return directory
