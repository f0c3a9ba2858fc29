"""Backend choice: which implementation of the coupling law's elementwise transform runs.

The NumPy reference in :mod:`nflow_np.flows.coupling_law` is the specification; other backends
(fused kernels from the top-level ``kernels`` package) replace exactly those functions and
nothing else. The choice is made here, in one place: :func:`set_backend`, or the environment
variable ``NFLOW_BACKEND`` read at import.
"""

from __future__ import annotations

import os

from nflow_np.flows.coupling_law import COUPLING_LAWS

_REFERENCE = "numpy"
_BACKENDS: dict[str, dict[str, type]] = {_REFERENCE: COUPLING_LAWS}
_active = _REFERENCE


def available_backends() -> list[str]:
    """Names accepted by :func:`set_backend` on this machine."""
    return sorted(_BACKENDS)


def set_backend(name: str) -> None:
    """Select the backend by name (``"numpy"`` is always available)."""
    global _active
    if name not in _BACKENDS:
        raise ValueError(f"unknown or unavailable backend {name!r}; available: {available_backends()}")
    _active = name


def get_backend() -> str:
    """Name of the active backend."""
    return _active


def coupling_law(name: str) -> type:
    """The active backend's implementation of coupling law ``name`` ("additive" or "affine")."""
    laws = _BACKENDS[_active]
    if name not in laws:
        raise ValueError(f"unknown coupling law {name!r}; choose from {sorted(laws)}")
    return laws[name]


if os.environ.get("NFLOW_BACKEND"):
    set_backend(os.environ["NFLOW_BACKEND"])
