"""Direct solver: materialise ``A`` and factorise it (small models only).

``A = dense(op)`` costs ``P`` operator products and ``P^2`` memory; then

* ``method="cholesky"``: ``A = L L^T``, ``x = L^-T L^-1 b``; a failed factorisation
  (``A`` not positive definite, e.g. an undamped Hessian of a non-convex net) gives
  ``Status.NOT_POSITIVE_DEFINITE`` -- and, called outside ``jit`` on concrete values,
  a ``ValueError`` that says to add damping.
* ``method="eigh"``: ``A = U diag(w) U^T``, ``x = U diag(1/w) U^T b``; reports
  non-positive eigenvalues the same way, and exposes the spectrum in ``stats``.

The factorisation is done once in :meth:`Solver.prepare` and reused for every
right-hand side.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from influx.objective import check_like
from influx.solvers._base import Solution, Solver, Status

__all__ = ["direct"]


def direct(*, method: str = "cholesky", raise_on_failure: bool = True) -> Solver:
    """Dense factorisation solver (see module docstring).

    Args:
      method: ``"cholesky"`` (default) or ``"eigh"``.
      raise_on_failure: when the operator is concrete (not traced), raise ``ValueError``
        if it is not positive definite instead of returning a failed status.
    """
    if method not in ("cholesky", "eigh"):
        raise ValueError(f"direct: method must be 'cholesky' or 'eigh', got {method!r}")
    from influx.curvature import dense

    def prepare(op):
        a = dense(op)
        if method == "cholesky":
            fac = jnp.linalg.cholesky(a)
            ok = jnp.all(jnp.isfinite(fac))
            state = {"a": a, "factor": fac, "ok": ok}
        else:
            w, u = jnp.linalg.eigh(a)
            ok = jnp.all(w > 0)
            state = {"a": a, "w": w, "u": u, "ok": ok}
        if raise_on_failure and not isinstance(ok, jax.core.Tracer) and not bool(ok):
            raise ValueError(
                "direct: the curvature matrix is not positive definite"
                + (f" (smallest eigenvalue {float(state['w'][0]):.3g})" if method == "eigh" else "")
                + "; add damping (damping > 0) or use kind='gnh'"
            )
        return state

    def apply(state, op, b):
        b = check_like(op.params, b, name="b")
        flat_b, unravel = ravel_pytree(b)
        if method == "cholesky":
            fac = state["factor"]
            y = jax.scipy.linalg.solve_triangular(fac, flat_b, lower=True)
            x = jax.scipy.linalg.solve_triangular(fac.T, y, lower=False)
        else:
            u, w = state["u"], state["w"]
            x = u @ ((u.T @ flat_b) / w)
        res = jnp.linalg.norm(state["a"] @ x - flat_b)
        finite = jnp.all(jnp.isfinite(x)) & jnp.all(jnp.isfinite(flat_b))
        status = jnp.where(~state["ok"], Status.NOT_POSITIVE_DEFINITE,
                           jnp.where(finite, Status.CONVERGED, Status.NONFINITE))
        n = jnp.asarray(flat_b.shape[0])
        return Solution(unravel(x), res, n, status == Status.CONVERGED, status, {})

    return Solver("direct", prepare, apply, {"method": method})
