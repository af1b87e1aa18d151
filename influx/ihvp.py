"""The convenience call ``influx.ihvp``: build the damped operator and solve in one go."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from influx import curvature as _curvature
from influx.solvers._base import Solution, Solver, failed_rows, nan_rows
from influx.validation import InputTypeError, check_on_failure
from influx.validation import boundary as _boundary

__all__ = ["ihvp"]


@_boundary
def ihvp(obj, params, data, b, *, kind: str = "gnh", damping=0.0, solver: Solver | None = None,
         chunk_size: int = 256, batched: bool = False, on_failure: str = "raise") -> Solution:
    """``x = (C + (obj.l2 + damping) I)^-1 b`` with ``C`` the ``kind`` curvature of ``obj`` on ``data``.

    Args:
      obj, params, data: the :class:`influx.Objective`, the parameters (usually the
        trained ``theta_s``) and the dataset ``(x, y)``.
      b: a pytree like ``params`` (``batched=True``: every leaf has a leading batch axis,
        all right-hand sides are solved together with batched products).
      kind: ``"gnh"`` or ``"hessian"``; damping: ``lambda >= 0`` added on top of ``l2``.
      solver: any :mod:`influx.solvers` solver; default ``cg()`` (``tol=1e-6``).
      chunk_size: examples per accumulation step of the operator.
      on_failure: the failure policy, as in :func:`influx.influence`: ``"raise"`` (default)
        raises :class:`influx.errors.SolveError` naming the failed solves and the fix;
        ``"nan"`` (``"warn"``: and warns) returns NaN in ``x`` for every failed solve;
        ``"keep"`` keeps the best iterate of solves that stopped short of ``tol``
        (``MAX_STEPS``, ``STAGNATED``) and NaN for other failures.

    Returns a :class:`influx.solvers.Solution` (``status`` per right-hand side).
    """
    check_on_failure(on_failure)
    if solver is None:
        from influx.solvers import cg

        solver = cg()
    if not isinstance(solver, Solver):
        raise InputTypeError(f"ihvp: solver must be an influx.solvers solver, got {type(solver).__name__}")
    op = _curvature.operator(obj, params, data, kind=kind, damping=damping, chunk_size=chunk_size)
    sol = solver(op, b, batched=batched)
    bad = failed_rows(sol, on_failure, f"ihvp ({solver!r})")
    if bad is None:
        return sol
    if batched:
        return sol._replace(x=nan_rows(sol.x, bad))
    return sol._replace(x=jax.tree_util.tree_map(lambda a: jnp.where(bool(bad[0]), jnp.nan, a), sol.x))
