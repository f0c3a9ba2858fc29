"""The allocator setting that invert mode relies on: applied once, on glibc, by choosing invert mode."""

import ctypes.util

import nflow_np.allocator as allocator
from nflow_np import AffineCoupling, Sequential


def test_invert_mode_asks_malloc_to_keep_freed_memory(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "_applied", None)
    real = allocator.keep_freed_memory

    def spy() -> bool:
        calls.append(1)
        return real()

    monkeypatch.setattr("nflow_np.flows.base.keep_freed_memory", spy)
    Sequential([AffineCoupling(2, parity=0)], memory="store")
    assert calls == []
    Sequential([AffineCoupling(2, parity=0)], memory="invert")
    assert calls == [1]
    # this machine's C library is glibc, where both thresholds must take
    assert ctypes.util.find_library("c") is not None and allocator.keep_freed_memory() is True
    assert allocator.keep_freed_memory() is True  # idempotent
