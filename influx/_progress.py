"""Progress bars for long passes (EK-FAC factor passes, solves, scoring).

:func:`bar` returns a tqdm bar when tqdm is installed (imported only then: an optional
dependency), a plain line on stderr at most every 10 s without it, or a bar that does
nothing; ``progress=None`` means "when stderr is a terminal". Every bar is a context
manager with ``update(n)`` and ``close()``.
"""

from __future__ import annotations

import sys
import time

__all__ = ["bar"]


class _StderrProgress:
    """A plain progress line on stderr (when tqdm is not installed), at most every 10 s."""

    def __init__(self, total: int, initial: int, desc: str = "influx.score", unit: str = "examples"):
        self.total, self.done, self.t0, self.last = total, initial, time.perf_counter(), 0.0
        self.desc, self.unit = desc, unit

    def update(self, m: int):
        self.done += m
        now = time.perf_counter()
        if now - self.last >= 10 or self.done >= self.total:
            self.last = now
            print(f"{self.desc}: {self.done}/{self.total} {self.unit} ({now - self.t0:.0f}s)",
                  file=sys.stderr, flush=True)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _NoProgress:
    def update(self, m: int):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def bar(progress: bool | None, *, total: int, initial: int = 0, desc: str = "influx", unit: str = "examples"):
    """A progress bar over ``total`` items (``progress``: ``True``, ``False`` or ``None`` for
    "when stderr is a terminal")."""
    if not (sys.stderr.isatty() if progress is None else progress):
        return _NoProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _StderrProgress(total, initial, desc, unit)
    return tqdm(total=total, initial=initial, unit="ex" if unit == "examples" else unit, unit_scale=True,
                desc=desc, dynamic_ncols=True)
