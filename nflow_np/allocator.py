"""Keep freed memory in the process for reuse (glibc's ``mallopt``), for ``memory="invert"``.

In ``memory="invert"`` mode (``docs/memory.md``) each layer's arrays are freed as soon as the backward
pass is done with them. glibc's malloc answers that pattern by handing the freed top of its heap, and
every large block it served with ``mmap``, back to the operating system, so the next layer page-faults
fresh memory: measured, that makes an invert-mode step 2.1–2.4× a standard one. Raising the trim and
mmap thresholds makes malloc keep and reuse those blocks: the same step then costs 1.15–1.27×, close
to the 4/3 the extra arithmetic predicts. The process keeps its peak heap instead of shrinking
between steps, which in invert mode is a few layers' activations.

The ResNet on frames (:mod:`nflow_np.nn.shifted_resnet`) asks for the same: a training step allocates some thirty
frames of up to 14 MB and frees them at its end; measured at 28×28, batch 64, one thread, the step spent
0.07 s per step in the kernel (page faults) and was 12 % slower (min of 5) without it.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper limit on 64-bit systems

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the system.

    Process-wide and idempotent: the first call sets the thresholds, later calls return the first
    call's answer.

    Returns
    -------
    bool
        True if both thresholds were set; False where the C library is not glibc (nothing changes).
    """
    global _applied
    if _applied is None:
        _applied = False
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
            mallopt = getattr(libc, "mallopt", None)
        except OSError:
            mallopt = None
        if mallopt is not None:
            trim = mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
            mmap = mallopt(M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
            _applied = bool(trim) and bool(mmap)
    return _applied
