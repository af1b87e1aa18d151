"""The solver interface shared by every iHVP solver.

A solver approximately solves ``A x = b`` for a damped curvature operator ``A``
(:class:`influx.curvature.Operator`, or any symmetric linear callable on pytrees that
has ``params``, ``shift`` and ``positive_semidefinite`` attributes) and a right-hand side
``b`` shaped like the parameters. It is a value made by a factory with keyword-only
options::

    solver = influx.solvers.cg(tol=1e-8, max_steps=1000)
    sol = solver(op, b)              # Solution(x, residual_norm, iterations, converged, status)

Solving is split in two pure stages so that work that depends only on the operator
(a factorisation, a Krylov basis, a scale estimate) is done once for any number of
right-hand sides::

    state = solver.prepare(op)                              # once
    sols = jax.vmap(lambda b: solver.apply(state, op, b))(B)  # many, matvecs batched

``solver(op, b)`` is ``solver.apply(solver.prepare(op), op, b)``. Both stages are
``jit``-compatible; nothing raises inside compiled code: failures come back in
``Solution.status`` (lineax style) and the caller decides (see :func:`check_solution`).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from influx._xla import jit
from influx.objective import check_finite, check_like

__all__ = ["Solution", "Solver", "Status", "status_message", "check_solution", "check_rhs"]


class Status:
    """Integer status codes carried by :class:`Solution` (arrays, so they vmap)."""

    CONVERGED = 0
    MAX_STEPS = 1  # ran out of iterations before reaching the tolerance
    NEGATIVE_CURVATURE = 2  # p^T A p <= 0 met: A is not positive definite
    DIVERGED = 3  # iterates grew without bound (e.g. LiSSA scale too small)
    NOT_POSITIVE_DEFINITE = 4  # factorisation failed (direct)
    NONFINITE = 5  # NaN/inf in the input or the result
    STAGNATED = 6  # residual stopped decreasing (tolerance below what the dtype reaches)
    RUNNING = -1  # internal: an iterative solver that has not stopped yet


_MESSAGES = {
    Status.CONVERGED: "converged",
    Status.MAX_STEPS: "reached max_steps before the tolerance (raise max_steps or damping)",
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
        "residual of ~1e-4..1e-5) or use float64; the best iterate is returned"
    ),
}


def status_message(status) -> str:
    """Human-readable meaning of a status code."""
    return _MESSAGES.get(int(status), f"unknown status {int(status)}")


class Solution(NamedTuple):
    """Result of one solve (every field gains a leading axis under ``vmap``).

    Attributes:
      x: the approximate solution, a pytree like ``b``.
      residual_norm: ``||A x - b||`` (2-norm over all leaves).
      iterations: operator products spent on this right-hand side (a solver that
        shares work across right-hand sides reports its per-solve share plus ``prepare``
        products in ``stats``).
      converged: boolean, ``status == Status.CONVERGED``.
      status: an int code from :class:`Status`.
      stats: solver-specific diagnostics (dict of arrays), e.g. the scale LiSSA used.
    """

    x: Any
    residual_norm: jax.Array
    iterations: jax.Array
    converged: jax.Array
    status: Any = Status.CONVERGED
    stats: dict = {}


@dataclasses.dataclass(frozen=True, eq=False)
class Solver:
    """An iHVP solver: ``prepare(op) -> state`` then ``apply(state, op, b) -> Solution``.

    ``name`` and ``options`` describe it in reports; instances hash by identity so they
    can be static arguments of ``jax.jit``.
    """

    name: str
    prepare: Callable
    apply: Callable
    options: dict = dataclasses.field(default_factory=dict)
    # optional native batched apply ``(state, op, bs) -> Solution`` with a leading batch
    # axis (e.g. LiSSA draws one minibatch per step for all right-hand sides); default vmap
    apply_many: Callable | None = None

    def __call__(self, op, b, *, batched: bool = False) -> Solution:
        """Solves ``A x = b``; ``batched=True``: every leaf of ``b`` has a leading batch axis
        and all right-hand sides are solved together with batched operator products."""
        b = check_rhs(op, b, batched=batched)  # fail fast, before any compilation
        state = self.prepare(op)
        if batched:
            return self.apply_batch(state, op, b)
        return self.apply(state, op, b)

    def apply_batch(self, state, op, bs) -> Solution:
        """:attr:`apply` over a leading axis of ``bs`` in one compiled call: ``vmap``, or the
        solver's native :attr:`apply_many` when it has one."""
        bs = check_rhs(op, bs, batched=True)
        return self._batched_apply(state, op, bs)

    @functools.cached_property
    def _batched_apply(self):
        if self.apply_many is not None:
            return jit(self.apply_many)
        return jit(jax.vmap(self.apply, in_axes=(None, None, 0)))

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"influx.solvers.{self.name}({opts})"


def check_solution(sol: Solution, *, throw: bool = True, what: str = "solve") -> Solution:
    """Raises (``throw=True``) or warns when any solve in ``sol`` did not converge.

    Works on a single or a batched :class:`Solution` holding concrete values; the
    message names the status and the worst residual.
    """
    status = np.asarray(sol.status).reshape(-1)
    bad = status != Status.CONVERGED
    if not bad.any():
        return sol
    worst = float(np.max(np.asarray(sol.residual_norm)))
    codes = sorted(set(status[bad].tolist()))
    parts = [status_message(c) for c in codes]
    stats = sol.stats if isinstance(sol.stats, dict) else {}
    if Status.DIVERGED in codes and "recommended_scale" in stats:
        rec = np.asarray(stats["recommended_scale"]).reshape(-1)
        used = np.asarray(stats.get("scale", np.nan)).reshape(-1)
        div = (status == Status.DIVERGED) if rec.size == status.size else np.ones(rec.size, bool)
        parts.append(f"increase scale to at least {float(np.max(rec[div])):.4g} "
                     f"(scale used: {float(np.max(used)):.4g})")
    msg = (f"{what}: {int(bad.sum())} of {status.size} solves did not converge "
           f"(worst residual {worst:.3g}): " + "; ".join(parts))
    if throw:
        raise RuntimeError(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return sol


# ------------------------------------------------------------------ helpers for solvers
def check_rhs(op, b, *, name: str = "b", batched: bool = False):
    """Validates a right-hand side against ``op.params`` (structure, shapes, dtype cast).

    Concrete values (outside ``jit``/``vmap``) holding NaN or inf raise ``ValueError``;
    traced values pass and a solver reports ``Status.NONFINITE`` instead.
    """
    b = check_like(op.params, b, name=name, batched=batched)
    try:
        check_finite(b, name=name)
    except ValueError as e:
        raise ValueError(f"{e}: the right-hand side of the solve must be finite "
                         "(check the test gradients / measurement)") from None
    return b


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
