"""Inference mode: ``with nflow_np.no_grad(): ...`` keeps no backward caches (as ``torch.no_grad``).

A layer keeps what its backward pass needs (its cache: inputs, net activations) from one call to the
next. A call that will never be back-propagated, ``log_prob``, ``sample``, ``encode``, ``decode``,
``evaluate``, needs none of it, and at batch 8192 the caches of a deep flow are most of the memory
the call touches. Inside :func:`no_grad`:

- :class:`~nflow_np.flows.base.Sequential` frees each layer's caches (and its nets') as soon as the
  layer has run, so only one layer's arrays are alive at a time and the allocator hands the freed
  blocks to the next layer (the work buffers are reused, not multiplied by depth);
- the :class:`~nflow_np.model.FlowModel` methods above free whatever is left when they return, so
  ``model.cached_nbytes() == 0`` after each of them;
- a backward call after an inference call raises ("backward called before forward"), never
  back-propagates stale data.

The flag is per thread (a second thread training while one samples keeps its caches). Training,
``nll_and_backward``, is unchanged: it runs with gradients enabled even inside a ``no_grad`` block.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_state = threading.local()


def is_grad_enabled() -> bool:
    """Whether calls on this thread keep their backward caches (``False`` inside :func:`no_grad`)."""
    return getattr(_state, "enabled", True)


@contextlib.contextmanager
def set_grad_enabled(enabled: bool) -> Iterator[None]:
    """Keep backward caches (``True``) or not (``False``) inside the block; the previous setting after it."""
    previous = is_grad_enabled()
    _state.enabled = bool(enabled)
    try:
        yield
    finally:
        _state.enabled = previous


def no_grad() -> contextlib.AbstractContextManager[None]:
    """``with no_grad(): ...``: no backward caches are kept inside the block (module doc)."""
    return set_grad_enabled(False)
