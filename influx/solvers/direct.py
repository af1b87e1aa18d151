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

from influx._xla import jit
from influx.solvers._base import Solution, Solver, Status, check_rhs

__all__ = ["direct"]


def direct(*, method: str = "cholesky", raise_on_failure: bool = True) -> Solver:
    """Dense factorisation solver (see module docstring).

    Args:
      method: ``"cholesky"`` (default) or ``"eigh"``.
      raise_on_failure: when the operator is concrete (not traced), raise ``ValueError``
        if it is not positive definite instead of returning a failed status.

    Cost: ``P`` operator products and an ``O(P^3)`` factorisation in ``prepare``;
    ``O(P^2)`` per right-hand side. ``iterations`` reports ``P`` (the products of
    ``prepare``, shared by all right-hand sides).
    """
    if method not in ("cholesky", "eigh"):
        raise ValueError(f"direct: method must be 'cholesky' or 'eigh', got {method!r}")
    from influx.curvature import dense

    @jit
    def _prepare(op):
        a = dense(op)
        if method == "cholesky":
            fac = jnp.linalg.cholesky(a)
            ok = jnp.all(jnp.isfinite(fac))
            return {"a": a, "factor": fac, "ok": ok}
        w, u = jnp.linalg.eigh(a)
        ok = jnp.all(w > 0)
        return {"a": a, "w": w, "u": u, "ok": ok}

    def prepare(op):
        state = _prepare(op)
        ok = state["ok"]
        if raise_on_failure and not isinstance(ok, jax.core.Tracer) and not bool(ok):
            if method == "eigh":
                detail = f" (smallest eigenvalue {float(state['w'][0]):.3g})"
            else:
                detail = " (Cholesky failed)"
            raise ValueError(
                f"direct: the curvature matrix is not positive definite{detail}; "
                f"add damping (damping > 0, e.g. damping={_suggest(state, method)}) or use kind='gnh'"
            )
        return state

    @jit
    def _apply(state, op, b):
        flat_b, unravel = ravel_pytree(b)
        finite_b = jnp.all(jnp.isfinite(flat_b))
        b0 = jnp.where(finite_b, flat_b, 0.0)
        if method == "cholesky":
            fac = state["factor"].astype(b0.dtype)
            y = jax.scipy.linalg.solve_triangular(fac, b0, lower=True)
            x = jax.scipy.linalg.solve_triangular(fac.T, y, lower=False)
        else:
            u, w = state["u"].astype(b0.dtype), state["w"].astype(b0.dtype)
            x = u @ ((u.T @ b0) / w)
        finite = jnp.all(jnp.isfinite(x)) & finite_b
        ok = state["ok"] & finite
        x = jnp.where(ok, x, 0.0)
        res = jnp.where(ok, jnp.linalg.norm(state["a"].astype(b0.dtype) @ x - b0), jnp.inf)
        status = jnp.where(~state["ok"], Status.NOT_POSITIVE_DEFINITE,
                           jnp.where(finite, Status.CONVERGED, Status.NONFINITE)).astype(jnp.int32)
        n = jnp.int32(flat_b.shape[0])
        return Solution(unravel(x), res, n, status == Status.CONVERGED, status, {})

    def apply(state, op, b):
        return _apply(state, op, check_rhs(op, b))

    return Solver("direct", prepare, apply, {"method": method})


def _suggest(state, method) -> str:
    """A damping that makes the matrix positive definite (for the error message)."""
    import numpy as np

    if method == "eigh":
        w = np.asarray(state["w"])
    else:
        w = np.linalg.eigvalsh(np.asarray(state["a"]))
    need = max(-float(w[0]), 0.0) + 1e-3 * max(float(np.max(np.abs(w))), 1e-12)
    return f"{need:.2g}"
