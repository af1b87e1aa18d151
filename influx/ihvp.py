"""The convenience call ``influx.ihvp``: build the damped operator and solve in one go."""

from __future__ import annotations

from influx import curvature as _curvature
from influx.solvers._base import Solution, Solver
from influx.validation import boundary as _boundary

__all__ = ["ihvp"]


@_boundary
def ihvp(obj, params, data, b, *, kind: str = "gnh", damping=0.0, solver: Solver | None = None,
         chunk_size: int = 256, batched: bool = False) -> Solution:
    """``x = (C + (obj.l2 + damping) I)^-1 b`` with ``C`` the ``kind`` curvature of ``obj`` on ``data``.

    Args:
      obj, params, data: the :class:`influx.Objective`, the parameters (usually the
        trained ``theta_s``) and the dataset ``(x, y)``.
      b: a pytree like ``params`` (``batched=True``: every leaf has a leading batch axis,
        all right-hand sides are solved together with batched products).
      kind: ``"gnh"`` or ``"hessian"``; damping: ``lambda >= 0`` added on top of ``l2``.
      solver: any :mod:`influx.solvers` solver; default ``cg()`` (``tol=1e-6``).
      chunk_size: examples per accumulation step of the operator.

    Returns a :class:`influx.solvers.Solution`; check ``converged`` / ``status`` or pass
    it to :func:`influx.solvers.check_solution`.
    """
    if solver is None:
        from influx.solvers import cg

        solver = cg()
    if not isinstance(solver, Solver):
        raise TypeError(f"ihvp: solver must be an influx.solvers solver, got {type(solver).__name__}")
    op = _curvature.operator(obj, params, data, kind=kind, damping=damping, chunk_size=chunk_size)
    return solver(op, b, batched=batched)
