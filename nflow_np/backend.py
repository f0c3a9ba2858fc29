"""Backend choice: which implementation of the coupling law's elementwise transform runs.

The NumPy reference in :mod:`nflow_np.flows.coupling_law` is the specification; other backends
(fused kernels from the top-level ``kernels`` package) replace exactly those functions and
nothing else. The choice is made here, in one place: :func:`set_backend`, or the environment
variable ``NFLOW_BACKEND`` read at import. Without either, the backend is ``"auto"``, the fastest
that loads, resolved on first use (so ``import nflow_np`` never imports Numba).

======================  ===================================  =============================================
name                    implementation                       needs
======================  ===================================  =============================================
``"numpy"``             :mod:`nflow_np.flows.coupling_law`   nothing
``"numba"``             :mod:`kernels.numba_cpu`             ``pip install numba``
``"numba-cuda"``        :mod:`kernels.numba_cuda`            a CUDA GPU, ``pip install numba numba-cuda``
``"cupy"``              :mod:`kernels.cupy_kernels`          a CUDA GPU, ``pip install cupy-cuda12x``
``"auto"`` (default)    the fastest of the above that loads  (resolved when selected or first used)
======================  ===================================  =============================================

A kernel module is imported only when its backend is selected, so the reference runs with NumPy
alone. ``"auto"`` means ``"numba"`` when Numba imports, else ``"numpy"`` (the GPU backends pay
only once the model is moved to the device, which ``"auto"`` cannot decide for the caller). The
numba backend is never slower than the reference (measured: ``docs/kernels.md#measured``); its first
use compiles the kernels (about 20 s), cached on disk for later processes (about 1 s to load).

**The array-module seam** (``docs/kernels.md#gpu-backends``). Each backend also names the array
module (``xp``) its model should live in: ``numpy``, or ``cupy`` for the GPU backends. The
library has one code path for both. Code that takes arrays calls ufuncs, methods and NumPy
functions that dispatch on their argument (``np.exp(x)``, ``x.sum()``, ``np.empty_like(x)``,
``np.zeros_like(x, shape=n)``: CuPy implements ``__array_ufunc__``/``__array_function__``), so it
runs on whichever array it is given. Only code that makes arrays with no array at hand asks for
``xp``: :func:`array_module` (of an array, or of the active backend). A model is moved with
:meth:`~nflow_np.module.Module.to_device` / :meth:`~nflow_np.module.Module.to_host`; its
``state_dict`` is always host NumPy, and :class:`~nflow_np.model.FlowModel` takes host data,
moves it, and returns results where the input was. The GPU laws take device arrays without a
copy; given NumPy arrays (a model left on the host) they copy to the device and back per call.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from types import ModuleType

import numpy as np

from nflow_np.flows.coupling_law import COUPLING_LAWS
from nflow_np.packaging import kernel_module

_REFERENCE = "numpy"
_KERNEL_MODULES = {"numba": kernel_module("numba_cpu"), "numba-cuda": kernel_module("numba_cuda"),
                   "cupy": kernel_module("cupy_kernels")}
_REQUIREMENTS = {
    "numba": "pip install numba",
    "numba-cuda": "a CUDA GPU and pip install numba numba-cuda (or run under NUMBA_ENABLE_CUDASIM=1)",
    "cupy": "a CUDA GPU and pip install cupy-cuda12x",
}
_ARRAY_MODULE_NAMES = {"numba-cuda": "cupy", "cupy": "cupy"}
"""The array module each backend's model lives in, by name (every other backend: ``numpy``)."""
_DEVICE_MODULES: dict[str, ModuleType | None] = {"cupy": None}
"""Array modules other than NumPy, by the top-level name of their array type's module; ``None``:
import on first use (an array of that module exists, so the module is imported already)."""
_AUTO_ORDER = ("numba", _REFERENCE)
"""What ``"auto"`` tries, fastest first (measured: ``docs/kernels.md#measured``)."""
BACKENDS = (_REFERENCE, *_KERNEL_MODULES)
"""Every backend name :func:`set_backend` knows (whether or not it can load on this machine)."""

_loaded: dict[str, dict[str, type]] = {_REFERENCE: COUPLING_LAWS}
_active: str | None = None
"""The active backend's name; ``None`` until the default ``"auto"`` is resolved on first use."""
_active_laws: dict[str, type] | None = None


class BackendUnavailableError(ValueError):
    """A known backend that cannot run here; the message says what to install.

    A ``ValueError`` like an unknown name, so callers that catch bad choices catch both.
    """


def _load(name: str) -> dict[str, type]:
    """The law registry of backend ``name``, importing its kernel module on first use."""
    if name in _loaded:
        return _loaded[name]
    if name not in _KERNEL_MODULES:
        raise ValueError(f"unknown backend {name!r}; choose from {list(BACKENDS)} or 'auto'")
    try:
        module = importlib.import_module(_KERNEL_MODULES[name])
        module.require_device()
    except (ImportError, RuntimeError) as error:
        raise BackendUnavailableError(
            f"backend {name!r} is not available here; it needs {_REQUIREMENTS[name]} ({error})"
        ) from error
    _loaded[name] = module.COUPLING_LAWS
    return _loaded[name]


def available_backends() -> list[str]:
    """Names accepted by :func:`set_backend` on this machine (probing imports the kernel modules)."""
    names = []
    for name in BACKENDS:
        try:
            _load(name)
        except BackendUnavailableError:
            continue
        names.append(name)
    return names


def set_backend(name: str) -> None:
    """Select the backend by name (see the module table); raises if it cannot run here.

    Raises
    ------
    ValueError
        An unknown name.
    BackendUnavailableError
        A known backend whose requirements are missing; the message says what to install.
    """
    global _active, _active_laws
    if name == "auto":
        for candidate in _AUTO_ORDER:  # the first that loads; "numpy" always does
            try:
                _active_laws, _active = _load(candidate), candidate
                return
            except BackendUnavailableError:
                continue
    laws = _load(name)
    _active, _active_laws = name, laws


@contextlib.contextmanager
def using(name: str) -> Iterator[None]:
    """``with using("numba"): ...``: :func:`set_backend` for the block, then the backend before it again.

    The backend is restored however the block ends; an unknown or unavailable ``name`` raises before
    anything changes (as :func:`set_backend` does).
    """
    before = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(before)


def get_backend() -> str:
    """Name of the active backend (resolving the default ``"auto"`` on the first call)."""
    if _active is None:
        set_backend("auto")
    return _active


def register_backend(name: str, laws: dict[str, type], array_module: ModuleType) -> None:
    """Make ``name`` a backend: law classes ``laws`` computing on arrays of ``array_module``.

    For tests and experiments: the suite registers a fake device (``tests/fake_device.py``) whose
    laws are the NumPy reference running on arrays that behave like CuPy's.

    Parameters
    ----------
    name : str
        The name :func:`set_backend` will accept; must not be one of :data:`BACKENDS`.
    laws : dict
        ``{"additive": ..., "affine": ...}`` with the reference's static methods.
    array_module : module
        The ``xp`` of the backend; its array type must be defined in it (``type(a).__module__``).
    """
    if name in BACKENDS or name == "auto":
        raise ValueError(f"{name!r} is a built-in backend")
    _loaded[name] = laws
    _ARRAY_MODULE_NAMES[name] = array_module.__name__
    if array_module is not np:
        _DEVICE_MODULES[array_module.__name__] = array_module


def array_module(like: object = None) -> ModuleType:
    """The array module (``xp``) of the array ``like``, or, without it, of the active backend.

    Parameters
    ----------
    like : array, optional
        A CuPy array (or one of a registered device module) gives that module; anything else,
        NumPy arrays, scalars and lists included, gives ``numpy``. CuPy is never imported here
        unless ``like`` is a CuPy array (which means it is imported already).

    Returns
    -------
    module
        With ``like``: its module. Without: ``numpy`` on the CPU backends, ``cupy`` on the GPU
        backends (``numpy`` for numba-cuda without CuPy installed, e.g. the simulator: its laws
        then copy NumPy arrays to the device and back on every call).
    """
    if like is None:
        name = _ARRAY_MODULE_NAMES.get(get_backend(), "numpy")
        if name == "numpy" or (name == "cupy" and importlib.util.find_spec("cupy") is None):
            return np
        return _DEVICE_MODULES.get(name) or importlib.import_module(name)
    if isinstance(like, np.ndarray | np.generic):
        return np
    top = type(like).__module__.partition(".")[0]
    if top in _DEVICE_MODULES:
        return _DEVICE_MODULES[top] or sys.modules.get(top) or importlib.import_module(top)
    return np


def is_array(x: object) -> bool:
    """Whether ``x`` is a NumPy array or an array of a device module (CuPy, a registered one)."""
    if isinstance(x, np.ndarray):
        return True
    return x is not None and array_module(x) is not np  # (array_module(None) would be the active backend's)


def to_host(array: object, copy: bool = False) -> np.ndarray:
    """``array`` as a host NumPy array: a device array is copied to the host (``.get()``).

    Parameters
    ----------
    array : array or array-like
        A device array, a NumPy array, or anything ``numpy.asarray`` takes.
    copy : bool
        Copy a NumPy array too (a device array is always copied).
    """
    if array is not None and array_module(array) is not np:
        return array.get()
    return np.array(array) if copy else np.asarray(array)


def coupling_law(name: str) -> type:
    """The active backend's implementation of coupling law ``name`` ("additive" or "affine").

    Called by every coupling layer on every call, so it is one dictionary lookup.
    """
    try:
        return (_active_laws if _active_laws is not None else _loaded[get_backend()])[name]
    except KeyError:
        raise ValueError(f"unknown coupling law {name!r}; choose from {sorted(_active_laws)}") from None


_FUSED_MODULES = {"numba": (kernel_module("numba_nn"), kernel_module("numba_optim"))}
"""Per backend, the kernel modules whose ``FUSED`` tables replace reference functions other than the
coupling laws: the hidden layers' bias + activation and the Adam update. Backends not listed use the
references."""
_fused: dict[str, dict[str, Callable]] = {}


def fused(name: str, reference: Callable) -> Callable:
    """The active backend's fused version of the reference function ``name``, else ``reference`` itself.

    ``name`` is one of ``"bias_activation"``, ``"bias_activation_backward"``
    (:mod:`nflow_np.nn.bias_activation`) and ``"adam_update"`` (:func:`nflow_np.optim.adam_update`).
    A fused version has the reference's signature and is tested against it (``tests/kernels``).
    Called on every use, so after the first call per backend it is two dictionary lookups.
    """
    active = get_backend()
    table = _fused.get(active)
    if table is None:
        table = {}
        for module_name in _FUSED_MODULES.get(active, ()):
            table.update(importlib.import_module(module_name).FUSED)
        _fused[active] = table
    return table.get(name, reference)



if os.environ.get("NFLOW_BACKEND"):
    set_backend(os.environ["NFLOW_BACKEND"])
