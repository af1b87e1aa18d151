"""Direct solver: materialise ``A`` and factorise it (small models only).

``A = dense(op)`` costs ``P`` operator products and ``P^2`` memory; then

* ``method="cholesky"``: ``A = L L^T``, ``x = L^-T L^-1 b``; a failed factorisation
  (``A`` not positive definite, e.g. an undamped Hessian of a non-convex net) gives
  ``Status.NOT_POSITIVE_DEFINITE`` -- and, with ``raise_on_failure=True`` (default) on
  concrete values, a :class:`influx.errors.SolveError` that says how much damping to add.
* ``method="eigh"``: ``A = U diag(w) U^T``, ``x = U diag(1/w) U^T b``; reports
  non-positive eigenvalues the same way, and exposes the spectrum in the state.

The factorisation is done once in :meth:`Direct.prepare` and reused for every
right-hand side. Before anything is allocated, ``prepare`` checks that the matrix, its
factor and the work arrays fit in memory (:func:`influx._memory.check_fits`) and raises
:class:`influx.errors.ResourceError` with the size and the matrix-free alternatives
otherwise. Every solve reports its true residual ``||A x - b||`` (``A`` is at hand, no
operator product) and is ``CONVERGED`` only when it is ``<= tol ||b||``. A failed solve
returns ``x = NaN``, never a plausible number.

float16/bfloat16 parameters: the matrix is formed and factorised in float32 (LAPACK has
no half-precision factorisation); the solution is cast back to the parameters' dtype.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from influx import _memory
from influx.errors import InputError, SolveError
from influx.solvers._base import Solution, Solver, Status, check_rhs, compiled, relative, residual_status

__all__ = ["Direct", "direct", "dense_bytes"]

# P x P arrays alive at the peak of prepare: the matrix and its transposed copy while it is
# formed, then the matrix, the factor and LAPACK's work copy (eigh: eigenvectors and work)
_PEAK_MATRICES = {"cholesky": 3, "eigh": 4}


def solve_dtype(params):
    """The dtype a dense factorisation runs in: the parameters' float dtype, at least float32."""
    dt = jnp.result_type(*jax.tree_util.tree_leaves(params))
    if not jnp.issubdtype(dt, jnp.floating) or jnp.finfo(dt).bits < 32:
        return jnp.dtype(jnp.float32)
    return jnp.dtype(dt)


def dense_bytes(op, *, matrices: int = 1) -> int:
    """Bytes of ``matrices`` dense ``P x P`` arrays for ``op`` (in :func:`solve_dtype`)."""
    p = sum(int(np.size(l)) for l in jax.tree_util.tree_leaves(op.params))
    return matrices * p * p * solve_dtype(op.params).itemsize


@dataclasses.dataclass(frozen=True, repr=False)
class Direct(Solver):
    """Dense factorisation (made by :func:`direct`; the fields are its options)."""

    name: ClassVar[str] = "direct"
    method: str = "cholesky"
    raise_on_failure: bool = True
    tol: float | None = None

    def _tol(self, dtype) -> float:
        return float(np.sqrt(jnp.finfo(dtype).eps)) if self.tol is None else self.tol

    def prepare(self, op):
        p = sum(int(np.size(l)) for l in jax.tree_util.tree_leaves(op.params))
        _memory.check_fits(dense_bytes(op, matrices=_PEAK_MATRICES[self.method]),
                           what=f"direct ({self.method}): the dense curvature matrix (P = {p:,} parameters), "
                                "its factor and work arrays",
                           alternative="use the matrix-free influx.solvers.cg() or the Kronecker-factored "
                                       "influx.solvers.ekfac()")
        state = compiled(Direct._prepare)(self, op)
        ok = state["ok"]
        if self.raise_on_failure and not isinstance(ok, jax.core.Tracer) and not bool(ok):
            raise SolveError(self._failure_message(state, op))
        return state

    def _prepare(self, op):
        from influx.curvature import dense_unchecked

        a = dense_unchecked(op, dtype=solve_dtype(op.params))
        if self.method == "cholesky":
            fac = jnp.linalg.cholesky(a)
            return {"a": a, "factor": fac, "ok": jnp.all(jnp.isfinite(fac))}
        w, u = jnp.linalg.eigh(a)
        return {"a": a, "w": w, "u": u, "ok": jnp.all(w > 0) & jnp.all(jnp.isfinite(w))}

    def _failure_message(self, state, op) -> str:
        if self.method == "eigh":
            detail = f" (smallest eigenvalue {float(state['w'][0]):.3g})"
        else:
            detail = " (Cholesky failed)"
        fix = f"add damping (damping > 0, e.g. damping={_suggest(state, self.method)})"
        if getattr(op, "kind", None) != "gnh":
            fix += " or use kind='gnh'"
        return f"direct: the curvature matrix is not positive definite{detail}; {fix}"

    def _solve_flat(self, state, b0):
        if self.method == "cholesky":
            fac = state["factor"]
            y = jax.scipy.linalg.solve_triangular(fac, b0, lower=True)
            return jax.scipy.linalg.solve_triangular(fac.T, y, lower=False)
        return state["u"] @ ((state["u"].T @ b0) / state["w"])

    def apply(self, state, op, b) -> Solution:
        return compiled(Direct._apply)(self, state, op, check_rhs(op, b))

    def _apply(self, state, op, b) -> Solution:
        flat_b, unravel = ravel_pytree(b)
        dtype = state["a"].dtype
        finite_b = jnp.all(jnp.isfinite(flat_b))
        b0 = jnp.where(finite_b, flat_b, 0.0).astype(dtype)
        x = self._solve_flat(state, b0)
        finite = jnp.all(jnp.isfinite(x)) & finite_b
        ok = state["ok"] & finite
        res = jnp.where(ok, jnp.linalg.norm(state["a"] @ x - b0), jnp.inf)
        b_norm = jnp.linalg.norm(b0)
        status = jnp.where(~state["ok"], Status.NOT_POSITIVE_DEFINITE,
                           jnp.where(finite, Status.CONVERGED, Status.NONFINITE))
        status = residual_status(res, b_norm, self._tol(dtype), status)
        x = jnp.where(ok, x, jnp.nan).astype(flat_b.dtype)
        stats = {"relative_residual": relative(res, b_norm)}
        return Solution(unravel(x), res.astype(flat_b.dtype), jnp.int32(flat_b.shape[0]),
                        status == Status.CONVERGED, status, stats)

    def inverse_quadratic(self, state, op, chunk):
        """``g_m^T A^-1 g_m = ||L^-1 g_m||^2`` (Cholesky) or ``sum_k (u_k^T g_m)^2 / w_k`` (eigh)
        from the factor of ``prepare``: no solve per example. ``NaN`` (status
        ``NOT_POSITIVE_DEFINITE``) when the factorisation failed."""
        from influx.curvature import per_example_grads_flat

        g = per_example_grads_flat(op.obj, op.params, chunk).astype(state["a"].dtype)
        if self.method == "cholesky":
            y = jax.scipy.linalg.solve_triangular(state["factor"], g.T, lower=True)
            vals = jnp.sum(y * y, axis=0)
        else:
            proj = g @ state["u"]
            vals = jnp.sum(proj * proj / state["w"], axis=1)
        m = g.shape[0]
        status = jnp.broadcast_to(jnp.where(state["ok"], Status.CONVERGED, Status.NOT_POSITIVE_DEFINITE),
                                  (m,)).astype(jnp.int32)
        vals = jnp.where(state["ok"], vals, jnp.nan)
        zero = jnp.zeros((m,), vals.dtype)
        sol = Solution(None, jnp.where(state["ok"], zero, jnp.inf), jnp.zeros((m,), jnp.int32),
                       status == Status.CONVERGED, status, {})
        return vals, sol


def direct(*, method: str = "cholesky", raise_on_failure: bool = True, tol: float | None = None) -> Direct:
    """Dense factorisation solver (see module docstring); returns a :class:`Direct` value.

    Args:
      method: ``"cholesky"`` (default) or ``"eigh"``.
      raise_on_failure: when the operator is concrete (not traced), raise
        :class:`influx.errors.SolveError` if it is not positive definite instead of
        returning a failed status.
      tol: a solve is ``CONVERGED`` when its true relative residual is ``<= tol``; default
        ``sqrt(eps)`` of the solve dtype (1.5e-8 in float64, 3.5e-4 in float32), which a
        backward-stable factorisation reaches unless ``A`` is nearly singular.

    Cost: ``P`` operator products and an ``O(P^3)`` factorisation in ``prepare``;
    ``O(P^2)`` per right-hand side. ``iterations`` reports ``P`` (the products of
    ``prepare``, shared by all right-hand sides). Memory: 3-4 ``P x P`` arrays at the peak
    (checked before allocation).
    """
    if method not in ("cholesky", "eigh"):
        raise InputError(f"direct: method must be 'cholesky' or 'eigh', got {method!r}")
    if tol is not None and not float(tol) > 0:
        raise InputError(f"direct: tol must be None or > 0, got {tol!r}")
    return Direct(method=method, raise_on_failure=bool(raise_on_failure),
                  tol=None if tol is None else float(tol))


def _suggest(state, method) -> str:
    """A damping that makes the matrix positive definite (for the error message)."""
    if method == "eigh":
        w = np.asarray(state["w"])
    else:
        w = np.linalg.eigvalsh(np.asarray(state["a"], dtype=np.float64))
    need = max(-float(w[0]), 0.0) + 1e-3 * max(float(np.max(np.abs(w))), 1e-12)
    return f"{need:.2g}"
