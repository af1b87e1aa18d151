"""Memory budgets: how much a computation may allocate, checked before it runs.

``available_bytes(device)`` is what the device can still hold: on CPU the host's available
memory (``MemAvailable`` from ``/proc/meminfo``, else ``sysconf``), on an accelerator its
``memory_stats()`` limit minus what is in use. ``check_fits(nbytes, what=..., alternative=...)``
raises :class:`influx.errors.ResourceError` naming the size when ``nbytes`` exceeds the
budget (by default 90% of what is available), before anything is allocated.

Chunked passes (EK-FAC factors, curvature products, test gradients, scoring) size their
chunks from a **memory budget** (``memory_budget=`` in bytes on the public functions):

* :func:`default_budget`: ``DEFAULT_FRACTION`` (1/4) of :func:`available_bytes`, and on a CPU
  host at most ``HOST_CAP`` (256 MiB: larger chunks buy little speed on CPU, only memory);
  given the parameters, on a CPU host at most the larger of ``HOST_FLOOR`` (64 MiB) and
  ``GRADIENT_ROWS`` (16) per-example gradients (``16 P`` floats): a model whose gradient
  is small gets small chunks, which cost it no time on CPU, and a lower peak;
* :func:`peak_bytes` ``(fn, *args)``: the peak of the buffers ``fn``'s program allocates
  beyond its inputs (the parameters, test vectors and data it is given are already in
  memory; counting them would make a model with large ``n_test x P`` vectors refuse every
  chunk), from its jaxpr (``jax.make_jaxpr`` on shapes only, nothing runs): a liveness walk over the
  equations, sub-programs (``scan``/``map`` bodies, ``jit``, ``custom_vjp``) counted at their
  own peak. It ignores XLA's fusion (which only removes buffers), so it is an upper bound
  up to XLA's scheduling;
* :func:`sized` ``(fn, make_args)``: the same for every chunk size ``c`` from one trace at
  a symbolic ``c`` (``jax.export.symbolic_shape``; sizes are polynomials in ``c``,
  :class:`Bytes`), or a trace per size asked where the program compares its size with a
  constant (``lax.map`` batches). Traced once: the EK-FAC model program, the test
  gradients, the curvature products, EK-FAC self-influence; per size: the query solves and
  the scoring of models without convolutions (both in ``lax.map`` batches);
* :func:`chunk_size_for` ``(bytes_at, budget=, limit=, what=)``: the largest chunk ``c <=
  limit`` with ``bytes_at(c) <= budget``, from the per-example slope of ``bytes_at``; a
  budget below one example raises :class:`~influx.errors.ResourceError` with both sizes.

Freed memory: XLA:CPU allocates buffers below 32 MB (one leaf of a batch of vectors), and
the compiler its working memory, with ``malloc``; glibc keeps what is freed in its per-thread
arenas instead of returning it, so a later pass's large (``mmap``-ed) buffers come on top of
memory nobody uses (measured: 0.3-0.6 GB of the peak on the 1M-parameter transformer of
``benchmarks/models.py``). :func:`release_free_memory` (glibc's ``malloc_trim(0)``: returns
free pages to the system, changes nothing else) is called between the phases of an
influence computation (after the fit, after the solves, at the end). Nothing happens on
import; ``INFLUX_RELEASE_MEMORY=0`` in the environment turns it off; a libc without
``malloc_trim`` makes it a no-op.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from influx.errors import InputError, ResourceError

__all__ = ["available_bytes", "check_fits", "format_bytes", "default_budget", "resolve_budget",
           "peak_bytes", "sized", "chunk_size_for", "Bytes", "NotPolynomial", "as_poly",
           "shape_key", "release_free_memory", "DEFAULT_FRACTION",
           "HOST_CAP", "HOST_FLOOR", "GRADIENT_ROWS", "param_bytes"]

_SAFETY = 0.9
DEFAULT_FRACTION = 0.25  # share of the available memory a chunked pass may use by default
# ... and at most this much on a CPU host: larger chunks buy no speed on CPU, only memory. On
# the models of benchmarks/models.py (EK-FAC influence, N = 2000 CNN / N = 500 transformer, two
# calls in one process, machine under load 3-5) 256 MiB instead of 512 MiB lowered the peak from
# 986 to 777 MB (CNN; the fit pass) and from 1694 to 1487 MB (transformer), with no change in
# time beyond the load's noise
HOST_CAP = 256 << 20
# ... and, given the parameters, at most the larger of HOST_FLOOR and GRADIENT_ROWS per-example
# gradients. Warm EK-FAC influence, side by side in one process (benchmarks/models.py models,
# exact factor, 3 runs each): CNN (P = 106k) 7.6 / 8.3 / 8.5 s at 64 / 128 / 256 MiB,
# transformer (P = 1.0M) 16.1 / 16.2 / 16.4 s; peaks 665 vs 794 MB and 1269 vs 1439 MB at 64
# vs 256 MiB. A 9.5M-parameter model keeps 256 MiB: its scoring chunks each read all the
# solved queries (n_test x P), so fewer, larger chunks are faster there
HOST_FLOOR = 64 << 20
GRADIENT_ROWS = 16


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


# ------------------------------------------------------------------ budgets and chunk sizes
def param_bytes(params) -> int:
    """Bytes of one parameter-shaped pytree (arrays or ``jax.ShapeDtypeStruct`` leaves)."""
    return sum(int(np.prod(np.shape(l), dtype=np.int64)) * np.dtype(l.dtype).itemsize
               for l in jax.tree_util.tree_leaves(params))


def default_budget(device=None, *, params=None) -> int:
    """The default ``memory_budget``: ``DEFAULT_FRACTION`` of :func:`available_bytes`, capped at
    ``HOST_CAP`` on CPU devices, and there, given ``params``, at
    ``max(HOST_FLOOR, GRADIENT_ROWS * param_bytes(params))``."""
    device = device if device is not None else jax.devices()[0]
    budget = int(DEFAULT_FRACTION * available_bytes(device))
    if device.platform == "cpu":
        budget = min(budget, HOST_CAP)
        if params is not None:
            budget = min(budget, max(HOST_FLOOR, GRADIENT_ROWS * param_bytes(params)))
    step = 64 << 20  # whole 64 MiB steps: the same budget (and chunk sizes) from call to call
    return budget // step * step if budget > step else max(budget, 1)


def resolve_budget(memory_budget, *, name: str = "memory_budget", params=None) -> int:
    """``memory_budget`` checked (a positive number of bytes) or, for ``None``,
    :func:`default_budget` (for ``params``, when given)."""
    if memory_budget is None:
        return default_budget(params=params)
    ok = (isinstance(memory_budget, (int, float, np.integer, np.floating))
          and not isinstance(memory_budget, bool))
    if not ok or not np.isfinite(memory_budget) or memory_budget < 1:
        raise InputError(f"{name} must be a positive number of bytes (or None for the default, "
                         f"{DEFAULT_FRACTION:g} of the available memory), got {memory_budget!r}")
    return int(memory_budget)


def shape_key(tree) -> tuple:
    """A hashable key of a pytree's structure, shapes and dtypes (for caching estimates)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return (treedef, tuple((tuple(np.shape(l)), str(getattr(l, "dtype", type(l).__name__))) for l in leaves))


# ------------------------------------------------------------------ program peaks
# Sizes are polynomials in a chunk size ``c`` of degree <= 2, as int64 coefficient vectors
# ``(c^0, c^1, c^2)``: a program traced on concrete shapes has constant sizes, one traced
# at a symbolic ``c`` (``jax.export.symbolic_shape``) sizes that hold for every ``c``.
_VAR = "c"  # the name of the symbolic chunk size
_ZERO = np.zeros(3, np.int64)


class NotPolynomial(ValueError):
    """A symbolic size that is not a polynomial of degree <= 2 in ``c`` (e.g. ``c // 8``)."""


def as_poly(d) -> np.ndarray:
    """Coefficients ``(c^0, c^1, c^2)`` of a size or dimension: an int, or a symbolic
    expression in ``c``."""
    if isinstance(d, (int, np.integer)):
        return np.array([int(d), 0, 0], np.int64)
    out = np.zeros(3, np.int64)
    try:
        terms = d._sorted_terms  # jax's symbolic dimension: ((term, coefficient), ...)
        for term, coeff in terms:
            deg = 0
            for factor, power in term._factors:
                if factor.operation is not None or factor.var != _VAR:
                    raise NotPolynomial(f"dimension {d} is not a polynomial in {_VAR}")
                deg += power
            if deg > 2:
                raise NotPolynomial(f"dimension {d} has degree {deg} in {_VAR}")
            out[deg] += int(coeff)
    except AttributeError as e:  # jax's private structure changed: no symbolic sizes
        raise NotPolynomial(f"cannot read the dimension {d!r}") from e
    return out


def _shape_poly(shape, itemsize: int) -> np.ndarray:
    out = np.array([itemsize, 0, 0], np.int64)
    for d in shape:
        q = np.convolve(out, as_poly(d))
        if q[3:].any():
            raise NotPolynomial(f"shape {shape} has degree > 2 in {_VAR}")
        out = q[:3]
    return out


def _itemsize(dtype) -> int:
    try:
        return np.dtype(dtype).itemsize
    except TypeError:  # extended dtypes (PRNG keys)
        return 8


def _sizer():
    """``size(var) -> coefficients`` of a jaxpr variable's bytes (cached per shape/dtype)."""
    cache = {}

    def size(v):
        aval = getattr(v, "aval", None)
        shape, dtype = getattr(aval, "shape", None), getattr(aval, "dtype", None)
        if shape is None or dtype is None:
            return _ZERO
        key = (shape, dtype)
        if key not in cache:
            cache[key] = _shape_poly(shape, _itemsize(dtype))
        return cache[key]

    return size


def _subjaxprs(eqn):
    for p in eqn.params.values():
        for q in (p if isinstance(p, (tuple, list)) else (p,)):
            if isinstance(q, jax.extend.core.ClosedJaxpr):
                yield q.jaxpr
            elif isinstance(q, jax.extend.core.Jaxpr):
                yield q


def _is_var(v) -> bool:
    return isinstance(v, jax.extend.core.Var) and not isinstance(v, jax.extend.core.DropVar)


def _jaxpr_points(jaxpr, size) -> list:
    """The bytes live at every point of ``jaxpr`` (inputs included, equations in order): a
    list of coefficient vectors whose largest value at ``c`` is the peak. An equation's
    point holds what is live plus its outputs; one with sub-programs (``scan``/``map``
    bodies, ``jit``, ``custom_vjp``) adds, for each, each of their points beyond their inputs."""
    eqns = jaxpr.eqns
    last = {}
    for i, e in enumerate(eqns):
        for v in e.invars:
            if _is_var(v):
                last[v] = i
    for v in jaxpr.outvars:
        if _is_var(v):
            last[v] = len(eqns)
    inputs = set(jaxpr.invars) | set(jaxpr.constvars)
    live = sum((size(v) for v in inputs), _ZERO)
    points = [live]
    for i, e in enumerate(eqns):
        live = live + sum((size(v) for v in e.outvars if _is_var(v)), _ZERO)
        points.append(live)
        for sub in _subjaxprs(e):
            sub_in = sum((size(v) for v in list(sub.invars) + list(sub.constvars)), _ZERO)
            points.extend(live + p - sub_in for p in _jaxpr_points(sub, size))
        for v in {v for v in e.invars if _is_var(v)}:
            if last.get(v) == i and v not in inputs:
                live = live - size(v)
        for v in e.outvars:
            if _is_var(v) and v not in last:
                live = live - size(v)
    return points


class Bytes:
    """Peak bytes of a pass as a function of its chunk size: ``bytes(c) = max_i p_i(c)``
    over the program points ``i`` of one trace at a symbolic ``c``, each ``p_i`` a
    polynomial of degree <= 2 (what :func:`peak_bytes` returns for symbolic shapes)."""

    __slots__ = ("coef",)

    def __init__(self, coef):
        coef = np.asarray(coef, np.int64).reshape(-1, 3)
        self.coef = np.unique(coef, axis=0)

    def __call__(self, c) -> int:
        c = int(c)
        return int((self.coef @ np.array([1, c, c * c], np.int64)).max())

    def __repr__(self) -> str:
        return f"Bytes({len(self.coef)} points; bytes(1) = {self(1)})"


def peak_bytes(fn, *args, return_shape: bool = False):
    """Peak bytes of the buffers ``fn(*args)`` allocates beyond its inputs, from its jaxpr
    (``args`` may be ``jax.ShapeDtypeStruct`` s: nothing is computed). ``return_shape``:
    ``(bytes, shapes of fn's outputs)``, from the same trace.

    With a symbolic chunk size in the shapes (``jax.export.symbolic_shape("c")``, see
    :func:`chunk_size_for`) the peak is a :class:`Bytes`, a function of ``c`` from one
    trace; :class:`NotPolynomial` when a size is not a polynomial of degree <= 2 in ``c``."""
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    jaxpr = closed.jaxpr
    size = _sizer()
    inputs = sum((size(v) for v in set(jaxpr.invars) | set(jaxpr.constvars)), _ZERO)
    points = np.array(_jaxpr_points(jaxpr, size)) - inputs
    peak = int(points[:, 0].max()) if not points[:, 1:].any() else Bytes(points)
    return (peak, shape) if return_shape else peak


def _at_size(tree, c: int):
    """``tree``'s ``ShapeDtypeStruct`` s with the symbolic ``c`` set to ``c``."""
    powers = np.array([1, c, c * c], np.int64)

    def one(s):
        return jax.ShapeDtypeStruct(tuple(int(as_poly(d) @ powers) for d in s.shape), s.dtype)

    return jax.tree_util.tree_map(one, tree)


def sized(fn, make_args):
    """``at(c) -> (peak bytes, output shapes)`` of ``fn(*make_args(c))`` (``make_args(c)``:
    the arguments' shapes for a chunk of ``c``), for :func:`chunk_size_for`.

    One trace at a symbolic ``c`` (``jax.export.symbolic_shape``) gives every size at once
    (:class:`Bytes`; the output shapes with ``c`` set): ``at`` then traces nothing. A program
    that cannot be traced so (a size compared with a constant, ``c // 8``, a jax without
    symbolic shapes) is traced at each ``c`` asked, as :func:`peak_bytes`. On the
    transformer of ``benchmarks/models.py`` a trace of the EK-FAC model program costs about
    a second, and the search asks three sizes."""
    try:
        (sym,) = jax.export.symbolic_shape(_VAR)
        peak, shape = peak_bytes(fn, *make_args(sym), return_shape=True)
        peak = peak if isinstance(peak, Bytes) else Bytes(as_poly(peak))
        _at_size(shape, 1)  # outputs whose shapes are not polynomials in c fail here, not later
    except Exception:  # noqa: BLE001 -- inconclusive comparisons, c // k, ...: trace per size
        return lambda c: peak_bytes(fn, *make_args(c), return_shape=True)
    return lambda c: (peak(c), _at_size(shape, c))


# chunk_size_for stops at a size that uses this share of the budget: each further guess
# traces the pass once more (0.5-1 s on the transformer of benchmarks/models.py), and
# chunks a quarter smaller cost the CPU passes nothing measurable (64 vs 256 MiB budgets
# time alike there)
GOOD_ENOUGH = 0.75


def chunk_size_for(bytes_at, *, budget: int, limit: int, what: str) -> int:
    """The largest chunk ``c`` in ``[1, limit]`` whose pass fits ``budget`` bytes (or one close
    to it: at least ``GOOD_ENOUGH`` (75%) of the budget used, or no size between it and one
    that does not fit).

    ``bytes_at(c)``: the peak bytes of the pass over a chunk of ``c`` examples (e.g. a
    :func:`peak_bytes`; each call traces the pass, so few are made, none twice). One call
    when ``limit`` examples fit; else ``c = 1``, then the chord through ``(1, bytes_at(1))``
    and ``(limit, bytes_at(limit))`` gives the first guess: exact when the bytes are affine in
    ``c``, and a size that fits when they are convex (a program's peak is the largest of
    affine terms, one per program point, as long as its structure does not change with
    ``c``). Every guess is checked; a guess that fits well below the budget is extended along
    the slope of the two largest sizes that fit, one that does not fit is replaced by the
    interpolation between the largest size that fits and it (the midpoint after three misses
    in a row); once a guess has missed, an extension stays in the middle half of the
    bracket. At most ``8`` calls in all; the returned chunk always fits. (A ``bytes_at``
    from :func:`sized` traces its pass once for all sizes where it can.)
    Raises :class:`~influx.errors.ResourceError` naming both sizes when one example alone
    needs more than ``budget``.
    """
    limit = max(int(limit), 1)
    seen: dict[int, float] = {}

    def at(c):
        if c not in seen:
            seen[c] = bytes_at(c)
        return seen[c]

    if at(limit) <= budget:
        return limit
    b1 = at(1)
    if b1 > budget:
        raise _too_small(what, b1, budget)
    fits, hi, misses = [1], limit, 0  # sizes known to fit (ascending); the smallest known not to

    def towards(c0, c1, target):  # where the line through (c0, at(c0)) and (c1, at(c1)) meets target
        slope = (at(c1) - at(c0)) / (c1 - c0)
        return c1 + (target - at(c1)) / slope if slope > 0 else float(hi)

    c, bracketed = towards(1, limit, budget), False
    while len(seen) < 8:
        lo = fits[-1]
        # once a guess has missed, each guess after a fit shrinks the bracket (lo, hi) by at
        # least a quarter (steps along a line can crawl where the bytes jump)
        margin = max(1, (hi - lo) // 4) if bracketed and misses == 0 else 1
        c = int(min(max(c, lo + margin), hi - margin))
        if c <= lo or c >= hi:
            break
        if at(c) <= budget:
            fits.append(c)
            misses = 0
            if at(c) >= GOOD_ENOUGH * budget or hi - c <= 1:
                break
            c = towards(fits[-2], c, 0.98 * budget)  # extend along the slope where it fits
        else:
            hi, misses, bracketed = c, misses + 1, True
            c = towards(lo, c, budget) if misses < 3 else (lo + c) // 2
    return fits[-1]


def _too_small(what: str, b1: int, budget: int) -> ResourceError:
    return ResourceError(f"{what}: one example needs {format_bytes(b1)} but memory_budget is "
                         f"{format_bytes(budget)}; raise memory_budget to at least {format_bytes(b1)}")


_trim = None  # glibc's malloc_trim, looked up on first use (False: none)


def release_free_memory() -> bool:
    """Returns the memory ``malloc`` holds free to the system (glibc ``malloc_trim(0)``).

    Changes no allocation and no value: only pages nobody uses are given back, so the next
    large buffer does not come on top of them. ``True`` when something was released; a no-op
    (``False``) without glibc or with ``INFLUX_RELEASE_MEMORY=0``. Costs a walk over the free
    lists (milliseconds).
    """
    global _trim
    if os.environ.get("INFLUX_RELEASE_MEMORY", "1") == "0":
        return False
    if _trim is None:
        try:
            import ctypes

            _trim = ctypes.CDLL("libc.so.6").malloc_trim
            _trim.argtypes, _trim.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):
            _trim = False
    return bool(_trim and _trim(0))
