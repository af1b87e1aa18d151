"""Memory budgets: how much a computation may allocate, checked before it runs.

``available_bytes(device)`` is what the device can still hold: on CPU the host's available
memory (``MemAvailable`` from ``/proc/meminfo``, else ``sysconf``), on an accelerator its
``memory_stats()`` limit minus what is in use. ``check_fits(nbytes, what=..., alternative=...)``
raises :class:`influx.errors.ResourceError` naming the size when ``nbytes`` exceeds the
budget (by default 90% of what is available), before anything is allocated.
"""

from __future__ import annotations

import os

import jax

from influx.errors import ResourceError

__all__ = ["available_bytes", "check_fits", "format_bytes"]

_SAFETY = 0.9


def format_bytes(n: float) -> str:
    """``1.5 GB``-style size with a unit chosen so the number is >= 1 (never ``0.0 TB``)."""
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - exotic platforms
        return 1 << 62


def available_bytes(device=None) -> int:
    """Bytes the device can still allocate (host memory for CPU devices)."""
    device = device if device is not None else jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        limit = stats.get("bytes_limit")
        if limit:
            return int(limit) - int(stats.get("bytes_in_use", 0))
    return _host_available()


def check_fits(nbytes: float, *, what: str, alternative: str = "", budget: int | None = None,
               device=None) -> None:
    """Raises ``ResourceError`` when ``nbytes`` exceeds ``budget`` (default: 90% of
    :func:`available_bytes`), naming ``what`` needs it, both sizes and the ``alternative``."""
    limit = int(budget) if budget is not None else int(_SAFETY * available_bytes(device))
    if nbytes > limit:
        msg = (f"{what} needs {format_bytes(nbytes)} but only {format_bytes(limit)} is available"
               + (f"; {alternative}" if alternative else ""))
        raise ResourceError(msg)
