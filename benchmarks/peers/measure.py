"""Process-level measurement helpers shared by both sides (pure Python, Linux /proc).

``PeakRSS``: the largest resident-set-size increase over the RSS at entry, sampled every
2 ms from ``/proc/self/statm`` by a daemon thread, after ``malloc_trim(0)`` so memory freed by
an earlier measurement is handed back first. It measures the process (allocator caches,
XLA/torch temporaries, compiled code), the number a user sees in ``top``; a spike shorter
than the sampling interval can be missed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRSS(contextlib.AbstractContextManager):
    """``with PeakRSS() as m: ...`` then ``m.increase`` (bytes) and ``m.peak``."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval

    def __enter__(self):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.base = rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, rss_bytes())
                time.sleep(self.interval)

        self._t = threading.Thread(target=sample, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())
        self.increase = self.peak - self.base
        return False
