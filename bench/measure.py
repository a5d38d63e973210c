"""Wall time and peak resident memory of one call, and medians over repeats.

Peak memory is the highest resident set size (read from ``/proc/self/statm`` by a sampling
thread every millisecond) above the resident size when the call started: what the call itself
needs on top of the model and data already loaded. For the resident size to follow what is live,
freed memory must go back to the system: before each call the garbage is collected and glibc's
free heap pages are returned (``malloc_trim``). Without that, a call that reuses memory an
earlier call freed would show no growth.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_PAGE = os.sysconf("SC_PAGE_SIZE")
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def release_free_memory() -> None:
    """Collect garbage and hand glibc's free heap pages back to the system."""
    gc.collect()
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


@dataclass(frozen=True)
class Sample:
    """One measured call: ``seconds`` of wall time, ``peak_bytes`` above the starting RSS."""

    seconds: float
    peak_bytes: int


class _PeakSampler(threading.Thread):
    def __init__(self, interval: float = 1e-3):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = rss_bytes()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak, rss_bytes())


def measure(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Sample, Any]:
    """Run ``fn(*args, **kwargs)`` once; its wall time, peak RSS above the start, and result."""
    release_free_memory()
    start_rss = rss_bytes()
    sampler = _PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    try:
        out = fn(*args, **kwargs)
    finally:
        seconds = time.perf_counter() - t0
        peak = sampler.stop()
    return Sample(seconds=seconds, peak_bytes=max(peak - start_rss, 0)), out


@dataclass(frozen=True)
class Summary:
    """Medians of repeated samples (and the number of repeats)."""

    seconds: float
    peak_bytes: int
    repeats: int

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


def summarise(samples: list[Sample]) -> Summary:
    return Summary(
        seconds=statistics.median(s.seconds for s in samples),
        peak_bytes=int(statistics.median(s.peak_bytes for s in samples)),
        repeats=len(samples),
    )
