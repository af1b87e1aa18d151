"""The solver interface shared by every iHVP solver, and the operator protocol it uses.

A solver approximately solves ``A x = b`` for a damped curvature operator ``A`` (see
:class:`LinearOperator`; :class:`influx.curvature.Operator` implements it) and a
right-hand side ``b`` shaped like the parameters. A solver is a *value*: a frozen
dataclass whose fields are its options, made by a factory with keyword-only options::

    solver = influx.solvers.cg(tol=1e-8, max_steps=1000)
    solver == influx.solvers.cg(tol=1e-8, max_steps=1000)   # True, and equal hashes
    sol = solver(op, b)              # Solution(x, residual_norm, iterations, converged, status)

Two solvers with the same options are equal and hash equally, so they share every
compiled program (the solver is a static argument of ``jax.jit``): a second identical
:func:`influx.influence` call compiles nothing.

Solving is split in two pure stages so that work that depends only on the operator
(a factorisation, a Krylov basis, a scale estimate) is done once for any number of
right-hand sides::

    state = solver.prepare(op)                           # once
    sol = solver.apply(state, op, b)                     # one right-hand side; jit/vmap-able
    sols = solver.apply_batch(state, op, B)              # a leading batch axis, compiled
    vals, sol = solver.inverse_quadratic(state, op, chunk)   # g_m^T A^-1 g_m per example

``solver(op, b)`` is ``solver.apply(solver.prepare(op), op, b)``. Nothing raises inside
compiled code: failures come back in ``Solution.status`` (lineax style) and the caller
decides (see :func:`check_solution`). Every solver computes the true residual
``||A x - b||`` of what it returns and reports ``Status.CONVERGED`` only when
``||A x - b|| <= tol ||b||`` for its ``tol`` (every solver has a default ``tol`` it can
reach).

Writing a solver: subclass :class:`Solver` as a
``@dataclasses.dataclass(frozen=True, repr=False)`` (``repr=False`` keeps the base's
``influx.solvers.name(...)`` repr) whose fields are the options, set ``name`` (a
``ClassVar``), implement ``prepare`` and ``apply`` (and optionally ``apply_many`` /
``inverse_quadratic``); wrap the traced parts in :func:`compiled` so that equal solvers
share one program.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from influx._xla import jit
from influx.errors import InputError, SolveError
from influx.objective import check_finite, check_like

__all__ = [
    "FunctionSolver",
    "LinearOperator",
    "STOPPED_SHORT",
    "Solution",
    "Solver",
    "Status",
    "check_rhs",
    "check_solution",
    "failed_rows",
    "is_positive_semidefinite",
    "key_tuple",
    "nan_rows",
    "status_message",
]


class Status:
    """Integer status codes carried by :class:`Solution` (arrays, so they vmap)."""

    CONVERGED = 0
    MAX_STEPS = 1  # ran out of iterations (or depth, rank) before reaching the tolerance
    NEGATIVE_CURVATURE = 2  # p^T A p <= 0 met: A is not positive definite
    DIVERGED = 3  # iterates grew without bound (e.g. LiSSA scale too small)
    NOT_POSITIVE_DEFINITE = 4  # factorisation failed (direct)
    NONFINITE = 5  # NaN/inf in the input or the result
    STAGNATED = 6  # residual stopped decreasing (tolerance below what the dtype reaches)
    UNCHECKED = 7  # no true residual computed (residual=False): convergence unknown
    RUNNING = -1  # internal: an iterative solver that has not stopped yet


_MESSAGES = {
    Status.CONVERGED: "converged",
    Status.MAX_STEPS: (
        "stopped above the tolerance (true relative residual > tol): raise max_steps (cg), depth "
        "(lissa) or rank (arnoldi), add damping, or use cg"
    ),
    Status.NEGATIVE_CURVATURE: (
        "met negative curvature (p^T A p <= 0): the operator is not positive definite; "
        "use kind='gnh' or add damping"
    ),
    Status.DIVERGED: (
        "diverged (iterates grew without bound): increase scale (LiSSA: scale must exceed "
        "half the largest eigenvalue of every minibatch operator) or use scale=None"
    ),
    Status.NOT_POSITIVE_DEFINITE: (
        "the matrix is not positive definite (Cholesky failed): add damping or use kind='gnh'"
    ),
    Status.NONFINITE: "non-finite values (NaN/inf) in the right-hand side or the solution",
    Status.STAGNATED: (
        "stagnated: the true residual stopped decreasing (or grew) before the tolerance; the "
        "tolerance is below what this dtype reaches, raise tol (float32 reaches a relative "
        "residual of ~1e-4..1e-5), add damping, or use float64; the best iterate is returned"
    ),
    Status.UNCHECKED: "not checked (residual=False): pass residual=True to verify the solution",
}


def status_message(status) -> str:
    """Human-readable meaning of a status code."""
    return _MESSAGES.get(int(status), f"unknown status {int(status)}")


class Solution(NamedTuple):
    """Result of one solve (every field gains a leading axis under ``vmap``).

    Attributes:
      x: the approximate solution, a pytree like ``b``.
      residual_norm: the true ``||A x - b||`` (2-norm over all leaves).
      iterations: operator products spent on this right-hand side (a solver that
        shares work across right-hand sides reports its per-solve share plus ``prepare``
        products in ``stats``).
      converged: boolean, ``status == Status.CONVERGED``.
      status: an int code from :class:`Status`.
      stats: solver-specific diagnostics (dict of arrays), e.g. ``relative_residual``.
    """

    x: Any
    residual_norm: jax.Array
    iterations: jax.Array
    converged: jax.Array
    status: Any = Status.CONVERGED
    stats: dict = {}


# ------------------------------------------------------------------ the operator protocol
@runtime_checkable
class LinearOperator(Protocol):
    """What a solver may use of an operator ``A = C + shift I`` (bring your own).

    Any object with these members works with every solver except ``ekfac``/``kfac``;
    :class:`influx.curvature.Operator` implements all of them. Vectors are pytrees shaped
    like ``params``. Operators must be pytrees (``jax.tree_util.register_pytree_node_class``)
    with ``shift`` (and anything else that changes between calls) as a leaf, so that
    ``jit`` compiles a solver once per operator structure.

    Required:

    * ``op(v)``: the damped product ``(C + shift I) v`` (symmetric in ``v``).
    * ``op.curvature(v)``: the undamped product ``C v`` (Arnoldi's eigenpairs).
    * ``op.shift``: the scalar multiple of the identity in ``A`` (``l2 + damping``).
    * ``op.params``: the parameters (structure, shapes and dtypes of the vectors).
    * ``op.positive_semidefinite``: ``True`` if ``C`` is known to be PSD (a tag, as in
      lineax). A solver that needs a positive definite ``A`` (cg, direct) reports
      ``NEGATIVE_CURVATURE``/``NOT_POSITIVE_DEFINITE`` when it meets a non-PD one; an
      operator without the tag counts as not PSD (:func:`is_positive_semidefinite`).

    Optional:

    * ``op.subsample(idx)``: the operator on the examples ``idx`` (a ``(k,)`` int array),
      its curvature the mean over them and the same shift (LiSSA's minibatches), with
      ``op.num_examples`` the number of examples ``N``.
    * ``op.obj``, ``op.data``, ``op.chunk_size``, ``op.kind``: the objective, data,
      chunking and curvature kind (the Kronecker-factored ``ekfac``/``kfac`` read the
      model itself, and the generic ``inverse_quadratic`` forms per-example gradients
      of ``op.obj``'s loss on a data chunk at ``op.params``).
    """

    params: Any

    def __call__(self, v): ...

    def curvature(self, v): ...

    @property
    def shift(self): ...

    @property
    def positive_semidefinite(self) -> bool: ...


def is_positive_semidefinite(op) -> bool:
    """The operator's ``positive_semidefinite`` tag (``False`` when it has none)."""
    return bool(getattr(op, "positive_semidefinite", False))


def _concrete_float(x) -> float | None:
    """``float(x)`` for a concrete scalar, ``None`` for a tracer."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return float(x)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


# ------------------------------------------------------------------ solvers as values
@functools.cache
def compiled(fn: Callable) -> Callable:
    """``jit(fn)`` with the solver (first argument) static: one compiled program per solver
    *value* (equal options share it) and operator structure."""
    return jit(fn, static_argnums=0)


class Solver:
    """An iHVP solver: ``prepare(op) -> state`` then ``apply(state, op, b) -> Solution``.

    Subclasses are frozen dataclasses whose fields are the options: equal options give
    equal, equal-hashing solvers (static ``jit`` arguments that share compiled programs).
    ``name`` is the factory's name (``"cg"``, ``"direct"``, ...). ``Solver(name, prepare,
    apply, options)`` (the former closure-based constructor) still works and returns a
    :class:`FunctionSolver`.
    """

    name: ClassVar[str] = "solver"

    def __new__(cls, *args, **kwargs):
        if cls is Solver:
            if not args and not kwargs:
                raise TypeError("Solver is abstract: use a factory (influx.solvers.cg(...), ...) "
                                "or subclass it")
            return FunctionSolver(*args, **kwargs)
        return object.__new__(cls)

    # -- the interface ----------------------------------------------------------------
    def prepare(self, op):
        """Work that depends only on the operator (factor, basis, scale); a pytree state."""
        raise NotImplementedError

    def apply(self, state, op, b) -> Solution:
        """Solves one right-hand side ``b`` (a pytree like ``op.params``); jit/vmap-able."""
        raise NotImplementedError

    def apply_many(self, state, op, bs) -> Solution:
        """Solves a batch (every leaf of ``bs`` has a leading axis); default ``vmap(apply)``."""
        return jax.vmap(lambda b: self.apply(state, op, b))(bs)

    def inverse_quadratic(self, state, op, chunk):
        """``(vals, Solution | None)``: ``g_m^T A^-1 g_m`` for every example ``m`` of ``chunk``,
        ``g_m`` the per-example gradient of ``op.obj``'s loss at ``op.params``.

        Default: per-example gradients (:func:`influx.curvature.per_example_grads`) and one
        solve each (:meth:`apply_many`); the returned ``Solution`` (``x`` dropped) carries
        the per-example status. Solvers with a closed form (direct, arnoldi, ekfac)
        override it.
        """
        from influx.curvature import per_example_grads

        grads = per_example_grads(op.obj, op.params, chunk, chunk_size=_n_leading(chunk))
        sol = self.apply_many(state, op, grads)
        vals = sum(jnp.sum((g * x).reshape(g.shape[0], -1), axis=1)
                   for g, x in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(sol.x)))
        return vals, sol._replace(x=None, stats={})

    # -- conveniences -------------------------------------------------------------------
    def __call__(self, op, b, *, batched: bool = False) -> Solution:
        """Solves ``A x = b``; ``batched=True``: every leaf of ``b`` has a leading batch axis
        and all right-hand sides are solved together with batched operator products."""
        b = check_rhs(op, b, batched=batched)  # fail fast, before any compilation
        state = self.prepare(op)
        if batched:
            return self.apply_batch(state, op, b)
        return self.apply(state, op, b)

    def apply_batch(self, state, op, bs) -> Solution:
        """:meth:`apply_many` in one compiled call (the program is cached per solver value)."""
        bs = check_rhs(op, bs, batched=True)
        return compiled(type(self).apply_many)(self, state, op, bs)

    @property
    def options(self) -> dict:
        """The options (dataclass fields), for reports and fingerprints."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.repr}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"influx.solvers.{self.name}({opts})"


def _n_leading(tree) -> int:
    return int(jax.tree_util.tree_leaves(tree)[0].shape[0])


class FunctionSolver(Solver):
    """A solver from closures ``prepare(op)``, ``apply(state, op, b)`` (and optionally
    ``apply_many(state, op, bs)``): the former ``Solver(name, prepare, apply, options)``.

    It hashes by identity (closures have no comparable options); prefer a frozen dataclass
    subclass of :class:`Solver`, which shares compiled programs between equal values.
    """

    def __init__(self, name: str, prepare: Callable, apply: Callable, options: dict | None = None,
                 apply_many: Callable | None = None):
        self.name = name
        self._prepare, self._apply, self._apply_many = prepare, apply, apply_many
        self._options = dict(options or {})

    def prepare(self, op):
        return self._prepare(op)

    def apply(self, state, op, b) -> Solution:
        return self._apply(state, op, b)

    def apply_many(self, state, op, bs) -> Solution:
        if self._apply_many is None:
            return super().apply_many(state, op, bs)
        return self._apply_many(state, op, bs)

    @property
    def options(self) -> dict:
        return dict(self._options)


# ------------------------------------------------------------------ failures
def failure_message(sol: Solution, *, what: str = "solve") -> str | None:
    """``None`` when every solve in ``sol`` converged, else one message naming how many
    failed, the statuses with what to change, and the worst relative residual."""
    status = np.asarray(sol.status).reshape(-1)
    bad = status != Status.CONVERGED
    if not bad.any():
        return None
    stats = sol.stats if isinstance(sol.stats, dict) else {}
    res = np.asarray(sol.residual_norm, dtype=float).reshape(-1)
    res = res[bad] if res.size == bad.size else res
    worst = f"worst residual {float(np.nanmax(res)) if np.isfinite(res).any() else float('nan'):.3g}"
    if "relative_residual" in stats:
        rel = np.asarray(stats["relative_residual"], dtype=float).reshape(-1)
        rel = rel[bad] if rel.size == bad.size else rel
        if np.isfinite(rel).any():
            worst += f", relative {float(np.nanmax(rel)):.3g}"
    codes = sorted(set(status[bad].tolist()))
    parts = [status_message(c) for c in codes]
    if Status.DIVERGED in codes and "recommended_scale" in stats:
        rec = np.asarray(stats["recommended_scale"]).reshape(-1)
        used = np.asarray(stats.get("scale", np.nan)).reshape(-1)
        div = (status == Status.DIVERGED) if rec.size == status.size else np.ones(rec.size, bool)
        parts.append(f"increase scale to at least {float(np.max(rec[div])):.4g} "
                     f"(scale used: {float(np.max(used)):.4g})")
    return (f"{what}: {int(bad.sum())} of {status.size} solves did not converge ({worst}): "
            + "; ".join(parts))

# statuses whose answer is the solver's own finite answer (best iterate, or unchecked with
# residual=False), kept under on_failure="keep"
STOPPED_SHORT = (Status.MAX_STEPS, Status.STAGNATED, Status.UNCHECKED)


def _user_stacklevel() -> int:
    """``stacklevel`` pointing at the first frame outside the influx package."""
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(2), 2  # level 1: the function that calls warnings.warn
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(pkg):
        frame, level = frame.f_back, level + 1
    return level


def failed_rows(sol: Solution, on_failure: str, what: str):
    """The failure policy (``on_failure``, see :data:`influx.validation.ON_FAILURE`) for the
    solves in ``sol``: ``None`` when every solve converged; else raise ``SolveError``
    (``"raise"``), or return the boolean mask of failed solves for the caller to set to NaN
    (``"nan"``; ``"warn"`` also warns). ``"keep"`` keeps the answer of solves that only
    stopped short of their tolerance (``MAX_STEPS``, ``STAGNATED``, ``UNCHECKED``: the
    solver's own finite answer, e.g. to measure a practical solver's error) and masks every
    other failure."""
    msg = failure_message(sol, what=what)
    if msg is None:
        return None
    if on_failure == "raise":
        raise SolveError(msg + ". Pass on_failure='nan' to get NaN for the failed rows (and their "
                         "status in the info) instead of this error.")
    if on_failure == "warn":
        warnings.warn(msg + " (their scores are NaN)", RuntimeWarning, stacklevel=_user_stacklevel())
    return masked_rows(sol.status, on_failure)


def masked_rows(status, on_failure: str) -> np.ndarray:
    """Which solves' rows are NaN under ``on_failure``: every non-converged one, except the
    ones that only stopped short of their tolerance under ``"keep"``."""
    status = np.asarray(status).reshape(-1)
    if on_failure == "keep":
        return ~np.isin(status, (Status.CONVERGED, *STOPPED_SHORT))
    return status != Status.CONVERGED


def nan_rows(tree, bad):
    """``tree`` (leading axis = solves) with the rows ``bad`` set to NaN."""
    if bad is None:
        return tree
    mask = jnp.asarray(bad)
    return jax.tree_util.tree_map(
        lambda a: jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), jnp.nan, a), tree)


def check_solution(sol: Solution, *, throw: bool = True, what: str = "solve") -> Solution:
    """Raises :class:`influx.errors.SolveError` (``throw=True``) or warns when any solve in
    ``sol`` did not converge.

    Works on a single or a batched :class:`Solution` holding concrete values; the
    message names the status, what to change and the worst residual.
    """
    msg = failure_message(sol, what=what)
    if msg is None:
        return sol
    if throw:
        raise SolveError(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return sol


def residual_status(res, b_norm, tol, status):
    """The final status of a solve from its true residual: ``CONVERGED`` only when the
    solver's own ``status`` is ``CONVERGED`` and ``res <= tol * b_norm``, ``MAX_STEPS``
    when it would be but the residual is too large, else ``status``."""
    ok = res <= jnp.asarray(tol, res.dtype) * b_norm
    return jnp.where(status == Status.CONVERGED, jnp.where(ok, Status.CONVERGED, Status.MAX_STEPS),
                     status).astype(jnp.int32)


def relative(res, b_norm):
    """``res / ||b||`` (``res`` itself for ``b = 0``)."""
    return res / jnp.where(b_norm > 0, b_norm, 1.0)


# ------------------------------------------------------------------ helpers for solvers
def check_rhs(op, b, *, name: str = "b", batched: bool = False):
    """Validates a right-hand side against ``op.params`` (structure, shapes, dtype cast).

    Concrete values (outside ``jit``/``vmap``) holding NaN or inf raise ``InputError``;
    traced values pass and a solver reports ``Status.NONFINITE`` instead.
    """
    b = check_like(op.params, b, name=name, batched=batched)
    try:
        check_finite(b, name=name)
    except ValueError as e:
        raise InputError(f"{e}: the right-hand side of the solve must be finite "
                         "(check the test gradients / measurement)") from None
    return b


def key_tuple(key) -> tuple:
    """A PRNG key as a tuple of ints (hashable, so a solver holding it compares by value);
    ``None`` gives ``PRNGKey(0)``."""
    if key is None:
        key = jax.random.PRNGKey(0)
    if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return tuple(int(k) for k in np.asarray(key).reshape(-1))


def key_array(t: tuple):
    """The raw ``uint32`` PRNG key of a :func:`key_tuple`."""
    return jnp.asarray(np.asarray(t, dtype=np.uint32))


def ravel_batch(bs):
    """``(flat, unravel)``: the ``(k, P)`` rows of a batched pytree ``bs`` (leading axis ``k``)
    and the ``unravel`` of one row."""
    flat = jax.vmap(lambda b: ravel_pytree(b)[0])(bs)
    return flat, ravel_pytree(jax.tree_util.tree_map(lambda a: a[0], bs))[1]


def flat_matvec(op, unravel, dtype):
    """``x -> ravel(op(unravel(x)))`` on flat vectors, in ``dtype``."""

    def mv(x):
        return ravel_pytree(op(unravel(x)))[0].astype(dtype)

    return mv


def flat_curvature(op, unravel, dtype):
    """``x -> ravel(op.curvature(unravel(x)))`` (undamped ``C``) on flat vectors."""

    def mv(x):
        return ravel_pytree(op.curvature(unravel(x)))[0].astype(dtype)

    return mv


def all_finite(x):
    return jnp.all(jnp.isfinite(x))
