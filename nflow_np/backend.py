"""Backend choice: which implementation of the coupling law's elementwise transform runs.

The NumPy reference in :mod:`nflow_np.flows.coupling_law` is the specification; other backends
(fused kernels from the top-level ``kernels`` package) replace exactly those functions and
nothing else. The choice is made here, in one place: :func:`set_backend`, or the environment
variable ``NFLOW_BACKEND`` read at import.

======================  ===================================  =============================================
name                    implementation                       needs
======================  ===================================  =============================================
``"numpy"`` (default)   :mod:`nflow_np.flows.coupling_law`   nothing
``"numba"``             :mod:`kernels.numba_cpu`             ``pip install numba``
``"numba-cuda"``        :mod:`kernels.numba_cuda`            a CUDA GPU, ``pip install numba numba-cuda``
``"cupy"``              :mod:`kernels.cupy_kernels`          a CUDA GPU, ``pip install cupy-cuda12x``
``"auto"``              the fastest of the above that loads  (resolved when selected)
======================  ===================================  =============================================

A kernel module is imported only when its backend is selected, so the reference runs with NumPy
alone. ``"auto"`` means ``"numba"`` when Numba imports, else ``"numpy"``: the GPU backends are
left out until the library's arrays live on the GPU (with NumPy arrays they copy every call to
the device and back; see ``docs/kernels.md#gpu-backends``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

from nflow_np.flows.coupling_law import COUPLING_LAWS

_REFERENCE = "numpy"
_KERNEL_MODULES = {"numba": "kernels.numba_cpu", "numba-cuda": "kernels.numba_cuda", "cupy": "kernels.cupy_kernels"}
_REQUIREMENTS = {
    "numba": "pip install numba",
    "numba-cuda": "a CUDA GPU and pip install numba numba-cuda (or run under NUMBA_ENABLE_CUDASIM=1)",
    "cupy": "a CUDA GPU and pip install cupy-cuda12x",
}
_GPU_BACKENDS = frozenset({"numba-cuda", "cupy"})
_AUTO_ORDER = ("numba", _REFERENCE)
"""What ``"auto"`` tries, fastest first (measured: ``docs/kernels.md#measured``)."""
BACKENDS = (_REFERENCE, *_KERNEL_MODULES)
"""Every backend name :func:`set_backend` knows (whether or not it can load on this machine)."""

_loaded: dict[str, dict[str, type]] = {_REFERENCE: COUPLING_LAWS}
_active = _REFERENCE
_active_laws = COUPLING_LAWS


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


def get_backend() -> str:
    """Name of the active backend."""
    return _active


def array_module() -> object:
    """The array module (``xp``) the active backend computes with: ``numpy``, or ``cupy`` on the GPU backends
    (``numpy`` for numba-cuda without CuPy installed).

    The seam for library code that must allocate arrays (``xp.empty_like``, ``xp.zeros``): with
    the GPU backends the whole model is meant to live in CuPy arrays (see the module doc; the
    library does not do that yet, so today their laws take NumPy arrays and copy them).
    """
    if _active in _GPU_BACKENDS and importlib.util.find_spec("cupy") is not None:
        return importlib.import_module("cupy")
    return importlib.import_module("numpy")  # numba-cuda without CuPy (e.g. the simulator) copies NumPy arrays


def coupling_law(name: str) -> type:
    """The active backend's implementation of coupling law ``name`` ("additive" or "affine").

    Called by every coupling layer on every call, so it is one dictionary lookup.
    """
    try:
        return _active_laws[name]
    except KeyError:
        raise ValueError(f"unknown coupling law {name!r}; choose from {sorted(_active_laws)}") from None


if os.environ.get("NFLOW_BACKEND"):
    set_backend(os.environ["NFLOW_BACKEND"])
