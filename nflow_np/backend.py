"""Backend choice: which implementation of each reference function with a fused kernel runs.

The NumPy references (the coupling laws of :mod:`nflow_np.flows.coupling_law`, bias + activation,
the Adam update) are the specification; other backends (fused kernels from the top-level
``kernels`` package) replace exactly those functions and nothing else. The choice is made here,
in one place: :func:`set_backend`, or the environment variable ``NFLOW_BACKEND`` read at import.
Without either, the backend is ``"auto"``, the fastest that loads, resolved on first use (so
``import nflow_np`` never imports Numba).

====================  ====================================  ============================================
name                  implementation                        needs
====================  ====================================  ============================================
``"numpy"``           :mod:`nflow_np.flows.coupling_law`    nothing
``"numba"``           ``kernels/*/numba_cpu.py`` (+frames)  ``pip install numba``
``"numba-cuda"``      ``kernels/coupling/numba_cuda.py``    a CUDA GPU, ``pip install numba numba-cuda``
``"cupy"``            ``kernels/coupling/cupy_kernels.py``  a CUDA GPU, ``pip install cupy-cuda12x``
``"auto"`` (default)  the fastest of the above that loads   (resolved when selected or first used)
====================  ====================================  ============================================

``kernels/`` has one folder per operation (``coupling``, ``bias_activation``, ``adam``, ``conv``), each
holding its kernels for every backend that has one; the records below list each backend's modules.

**One seam.** Each backend is one :class:`Backend` record: its kernel modules, each exporting a
``FUSED`` table of only what it accelerates (``{"affine.forward": kernel, "adam_update": kernel, …}``).
:func:`fused` hands a caller the active backend's kernel for a reference function, or the reference
itself; a kernel may decline a call (``NotImplemented``) and the reference then runs. The coupling
laws go through the same table (:func:`coupling_law`), and a user's own law joins with
:func:`register_law` (reference + optional kernels per backend). This module imports nothing from
``flows/``: the reference laws register themselves here.

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

Length: over 400 lines because the whole seam (backend records, the fused registry, law registration,
device array modules) is kept in one file, the one place a reader looks to see what runs where.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from types import ModuleType

import numpy as np

from nflow_np.packaging import kernel_module


@dataclasses.dataclass(frozen=True)
class Backend:
    """One backend: where its kernels live, what it needs, and the array module its model lives in.

    Attributes
    ----------
    name : str
        The name :func:`set_backend` accepts.
    kernel_modules : tuple of str
        Importable names of the modules whose ``FUSED`` tables (``{name: kernel}``) replace reference
        functions; a module may define ``require_device()``, which raises when it cannot run here.
    requirements : str
        What to install (named in :class:`BackendUnavailableError`).
    array_module_name : str
        The ``xp`` of the backend's model, by name (``"numpy"`` or ``"cupy"``).
    """

    name: str
    kernel_modules: tuple[str, ...] = ()
    requirements: str = "nothing"
    array_module_name: str = "numpy"


_REFERENCE = "numpy"
_BUILT_IN = {
    record.name: record
    for record in (
        Backend(_REFERENCE),
        Backend("numba", (kernel_module("coupling.numba_cpu"), kernel_module("bias_activation.numba_cpu"),
                          kernel_module("adam.numba_cpu"), kernel_module("conv.numba_frames")),
                "pip install numba"),
        Backend("numba-cuda", (kernel_module("coupling.numba_cuda"),),
                "a CUDA GPU and pip install numba numba-cuda (or run under NUMBA_ENABLE_CUDASIM=1)", "cupy"),
        Backend("cupy", (kernel_module("coupling.cupy_kernels"),), "a CUDA GPU and pip install cupy-cuda12x", "cupy"),
    )
}
_AUTO_ORDER = ("numba", _REFERENCE)
"""What ``"auto"`` tries, fastest first (measured: ``docs/kernels.md#measured``)."""
BACKENDS = tuple(_BUILT_IN)
"""Every backend name :func:`set_backend` knows (whether or not it can load on this machine)."""

_loaded: dict[str, dict[str, Callable]] = {_REFERENCE: {}}
"""Per backend that has loaded, its fused table (the union of its kernel modules' ``FUSED``)."""
_ARRAY_MODULE_NAMES: dict[str, str] = {}
"""The array module of each backend made by :func:`register_backend`, by name."""
_DEVICE_MODULES: dict[str, ModuleType | None] = {"cupy": None}
"""Array modules other than NumPy, by the top-level name of their array type's module; ``None``:
import on first use (an array of that module exists, so the module is imported already)."""
LAWS: dict[str, type] = {}
"""The reference coupling laws by name (:func:`register_law`; ours register from
:mod:`nflow_np.flows.coupling_law`)."""
_law_kernels: dict[str, dict[str, Callable]] = {}
"""Per backend, the kernels given to :func:`register_law` (``{"law.method": kernel}``)."""
_bound: dict[tuple[str, str], object] = {}
"""Cache of :func:`fused` and :func:`coupling_law` answers per ``(backend, name)``."""
_active: str | None = None
"""The active backend's name; ``None`` until the default ``"auto"`` is resolved on first use."""

LAW_METHODS = ("forward", "inverse", "forward_vjp", "inverse_vjp")
"""What a law's kernels may replace, each fused under ``"<law>.<method>"``."""


class BackendUnavailableError(ValueError):
    """A known backend that cannot run here; the message says what to install.

    A ``ValueError`` like an unknown name, so callers that catch bad choices catch both.
    """


def _load(name: str) -> dict[str, Callable]:
    """The fused table of backend ``name``, importing its kernel modules on first use."""
    if name in _loaded:
        return _loaded[name]
    if name not in _BUILT_IN:
        raise ValueError(f"unknown backend {name!r}; choose from {list(BACKENDS)} or 'auto'")
    record, table = _BUILT_IN[name], {}
    try:
        for module_name in record.kernel_modules:
            module = importlib.import_module(module_name)
            getattr(module, "require_device", lambda: None)()
            table.update(module.FUSED)
    except (ImportError, RuntimeError) as error:
        raise BackendUnavailableError(
            f"backend {name!r} is not available here; it needs {record.requirements} ({error})"
        ) from error
    _loaded[name] = table
    return table


def available_backends() -> list[str]:
    """Names accepted by :func:`set_backend` on this machine (probing imports the kernel modules)."""
    names = []
    for name in (*BACKENDS, *(n for n in _loaded if n not in _BUILT_IN)):
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
    global _active
    if name == "auto":
        for candidate in _AUTO_ORDER:  # the first that loads; "numpy" always does
            try:
                _load(candidate)
            except BackendUnavailableError:
                continue
            _active = candidate
            return
    _load(name)
    _active = name


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


def register_backend(name: str, kernels: dict, array_module: ModuleType) -> None:
    """Make ``name`` a backend: ``kernels`` computing on arrays of ``array_module``.

    For tests and experiments: the suite registers a fake device (``tests/fake_device.py``) whose
    laws are the NumPy reference running on arrays that behave like CuPy's.

    Parameters
    ----------
    name : str
        The name :func:`set_backend` will accept; must not be one of :data:`BACKENDS`.
    kernels : dict
        A fused table ``{name: kernel}`` (names as :func:`fused` takes them), or law classes by law
        name (``{"affine": ...}``), whose :data:`LAW_METHODS` become ``"affine.forward"`` and so on.
    array_module : module
        The ``xp`` of the backend; its array type must be defined in it (``type(a).__module__``).
    """
    if name in BACKENDS or name == "auto":
        raise ValueError(f"{name!r} is a built-in backend")
    table = {}
    for key, value in kernels.items():
        if isinstance(value, type):
            table.update({f"{key}.{m}": getattr(value, m) for m in LAW_METHODS if hasattr(value, m)})
        else:
            table[key] = value
    _loaded[name] = table
    _ARRAY_MODULE_NAMES[name] = array_module.__name__
    if array_module is not np:
        _DEVICE_MODULES[array_module.__name__] = array_module
    _bound.clear()


def register_law(reference: type, kernels: dict[str, dict[str, Callable]] | None = None) -> None:
    """Make the coupling law ``reference`` available to every coupling layer (``law=reference.name``).

    The one public call for a user's own law; ours register themselves the same way
    (:mod:`nflow_np.flows.coupling_law`).

    Parameters
    ----------
    reference : type
        The reference law: ``name``, ``has_scale``, ``out_features(d2)`` and the four functions
        :data:`LAW_METHODS` with the signatures of :class:`nflow_np.flows.coupling_law.AffineLaw`.
        It is the specification, and runs on every backend without a kernel for it.
    kernels : dict, optional
        ``{backend name: {method: kernel}}``: kernels with the reference method's signature; a kernel
        may return ``NotImplemented`` to decline a call, and the reference then runs.
    """
    missing = [m for m in ("name", "has_scale", "out_features", *LAW_METHODS) if not hasattr(reference, m)]
    if missing:
        raise ValueError(f"law {reference!r} lacks {missing}")
    for backend_name, methods in (kernels or {}).items():
        unknown = sorted(set(methods) - set(LAW_METHODS))
        if unknown:
            raise ValueError(f"unknown law methods {unknown}; kernels may replace {list(LAW_METHODS)}")
        _law_kernels.setdefault(backend_name, {}).update({f"{reference.name}.{m}": k for m, k in methods.items()})
    LAWS[reference.name] = reference
    _bound.clear()


def _forget_law(name: str) -> None:
    """Undo :func:`register_law` of ``name`` (for tests)."""
    LAWS.pop(name, None)
    for table in _law_kernels.values():
        for key in [k for k in table if k.startswith(f"{name}.")]:
            del table[key]
    _bound.clear()


def _with_reference(kernel: Callable, reference: Callable) -> Callable:
    """``kernel``, running ``reference`` instead whenever the kernel declines (returns ``NotImplemented``)."""

    def call(*args, **kwargs):
        result = kernel(*args, **kwargs)
        return reference(*args, **kwargs) if result is NotImplemented else result

    call.__wrapped__ = kernel
    return call


def fused(name: str, reference: Callable) -> Callable:
    """The active backend's fused version of the reference function ``name``, else ``reference`` itself.

    ``name`` is one of ``"bias_activation"``, ``"bias_activation_backward"``
    (:mod:`nflow_np.nn.bias_activation`), ``"adam_update"`` (:func:`nflow_np.optim.adam_update`),
    ``"im2col"``, ``"col2im"`` (:mod:`nflow_np.nn.conv`), the frame passes ``"frame.to"``, ``"frame.from"``,
    ``"frame.finish"``, ``"frame.batch_norm_relu"``, ``"frame.batch_norm_relu_backward"``
    (:mod:`nflow_np.nn.shifted`) and ``"<law>.<method>"`` for the coupling laws (:data:`LAW_METHODS`;
    through :func:`coupling_law`).
    A fused version has the reference's signature and is tested against it (``tests/kernels``). A
    kernel with the attribute ``may_decline = True`` (and every kernel given to :func:`register_law`)
    may decline a call by returning ``NotImplemented``, and ``reference`` then runs; the others are
    returned as they are (no extra call on the hot path).
    Called on every use, so after the first call per backend it is one dictionary lookup.
    """
    active = get_backend()
    found = _bound.get((active, name))
    if found is None:
        kernel, declining = _loaded[active].get(name), False
        if kernel is None:
            kernel, declining = _law_kernels.get(active, {}).get(name), True
        if kernel is None:
            found = reference
        elif declining or getattr(kernel, "may_decline", False):
            found = _with_reference(kernel, reference)
        else:
            found = kernel
        _bound[active, name] = found
    return found


def bind_law(reference: type, table: dict[str, Callable]) -> object:
    """A law object: ``reference``'s attributes, its :data:`LAW_METHODS` replaced from the fused ``table``.

    What :func:`coupling_law` returns for the active backend; the kernel tests call it on a kernel
    module's ``FUSED`` table directly.
    """
    methods = {}
    for method in LAW_METHODS:
        kernel, spec = table.get(f"{reference.name}.{method}"), getattr(reference, method)
        if kernel is None:
            methods[method] = spec
        else:
            methods[method] = _with_reference(kernel, spec) if getattr(kernel, "may_decline", False) else kernel
    return _Law(reference, methods)


class _Law:
    """A coupling law as a coupling layer calls it: the reference's attributes, the backend's methods."""

    def __init__(self, reference: type, methods: dict[str, Callable]) -> None:
        self.reference = reference
        self.name, self.has_scale, self.out_features = reference.name, reference.has_scale, reference.out_features
        for method, function in methods.items():
            setattr(self, method, function)

    def __repr__(self) -> str:
        return f"<{self.reference.__name__} on {get_backend()!r}>"


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
        active = get_backend()
        record = _BUILT_IN.get(active)
        name = record.array_module_name if record else _ARRAY_MODULE_NAMES.get(active, "numpy")
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


def coupling_law(name: str) -> object:
    """The active backend's coupling law ``name`` (registered with :func:`register_law`).

    The reference law's attributes with each of :data:`LAW_METHODS` taken through :func:`fused`
    (``"affine.forward"``, …); the reference class itself where the backend has no kernel for it.
    Called by every coupling layer on every call: one dictionary lookup
    after the first call per backend.
    """
    active = get_backend()
    law = _bound.get((active, f"law {name}"))
    if law is None:
        if name not in LAWS:
            raise ValueError(f"unknown coupling law {name!r}; choose from {sorted(LAWS)}")
        reference = LAWS[name]
        methods = {m: fused(f"{name}.{m}", getattr(reference, m)) for m in LAW_METHODS}
        replaced = any(function is not getattr(reference, m) for m, function in methods.items())
        law = _Law(reference, methods) if replaced else reference  # no kernel for it: the reference itself
        _bound[active, f"law {name}"] = law
    return law


if os.environ.get("NFLOW_BACKEND"):
    set_backend(os.environ["NFLOW_BACKEND"])
