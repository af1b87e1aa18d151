"""The exceptions influx raises on purpose.

Every error influx raises deliberately derives from :class:`InfluxError`, so a caller (and
the ``influx`` command) can tell a problem influx diagnosed from a bug:

* :class:`InputError` -- bad input found at a public boundary (shapes, dtypes, NaN/inf in
  data or parameters, out-of-range options), before any heavy work or side effect. Also a
  ``ValueError``, so ``except ValueError`` keeps working.
* :class:`SolveError` -- a computation that ran but failed (a solve that did not converge, a
  diverging iteration, non-finite values met while computing). Also a ``RuntimeError``.
* :class:`ResourceError` -- work refused before it runs because it would not fit (memory,
  disk); the message gives the size needed and the alternative. Also a ``MemoryError``.
* :class:`StateError` -- on-disk state (a scoring directory, a saved solver state) that is
  damaged, foreign or in use; the message names the file and the remedy.
"""

from __future__ import annotations

__all__ = ["InfluxError", "InputError", "ResourceError", "SolveError", "StateError"]


class InfluxError(Exception):
    """Base class of the errors influx raises deliberately."""


class InputError(InfluxError, ValueError):
    """Bad input, found at a public boundary before any heavy work or side effect."""


class SolveError(InfluxError, RuntimeError):
    """A computation ran and failed (no convergence, divergence, non-finite values)."""


class ResourceError(InfluxError, MemoryError):
    """Work refused before it runs: it would need more memory or disk than there is."""


class StateError(InfluxError, RuntimeError):
    """On-disk state is damaged, foreign to influx, or in use by another process."""
