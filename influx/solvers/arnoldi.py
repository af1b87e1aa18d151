"""Low-rank iHVP from the top eigenpairs of the curvature (Schioppa et al., 2022).

``prepare`` (once per operator) runs ``iterations`` steps of Lanczos with full
re-orthogonalisation on the *undamped* curvature ``C`` (``op.curvature``; for a symmetric
operator Arnoldi reduces to Lanczos), from a random unit start vector::

    C Q_m = Q_m T_m + beta_m q_{m+1} e_m^T,    T_m tridiagonal,  Q_m^T Q_m = I

and keeps the ``rank`` largest Ritz pairs ``(lambda_i, u_i)`` of ``T_m`` (largest
*algebraic* value). ``apply`` (per right-hand side, no operator product) is::

    x = U diag(1 / (lambda_i + s)) U^T b  [ + (b - U U^T b) / s  with complement=True ],
    s = l2 + damping

The default (projection only) is Schioppa et al.'s estimator. With ``complement=True``,
``C`` is approximated by ``U diag(lambda) U^T`` and its complement by zero, so the
complement is inverted with the shift ``s`` alone. With ``s == 0`` the complement has no
finite inverse and ``x`` is the projection ``U diag(1/lambda) U^T b`` only (a
pseudo-inverse on the subspace). This is exact when ``rank = iterations = P``; in
general it over-weights directions of small but non-zero curvature (their ``1/(lambda+s)``
is replaced by ``1/s``), which is the approximation error of the method.

Failure modes: a kept Ritz value with ``lambda_i + s <= 0`` (indefinite Hessian without
enough damping) gives ``Status.NEGATIVE_CURVATURE`` and that component is dropped; NaN/inf
in ``b`` gives ``NONFINITE``; a true residual above ``tol ||b||`` (default ``tol`` 1e-2)
gives ``MAX_STEPS`` (the rank was too small for that accuracy: raise ``rank``, add
damping, or use cg).

Cost: ``iterations`` products of ``C`` and ``O(iterations * P)`` memory in ``prepare``;
``apply`` is two ``(P, rank)`` matrix products, plus one operator product when
``residual=True`` (the default) to report an honest residual.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from influx import _memory
from influx.errors import InputError
from influx.solvers._base import (
    Solution,
    Solver,
    Status,
    all_finite,
    check_rhs,
    compiled,
    flat_curvature,
    flat_matvec,
    key_array,
    key_tuple,
    ravel_batch,
    relative,
    residual_status,
)
from influx.validation import check_int

__all__ = ["Arnoldi", "arnoldi", "lanczos", "ArnoldiState", "top_eigenpairs", "DEFAULT_TOL"]


class ArnoldiState(NamedTuple):
    """Top Ritz pairs of ``C``: ``eigvals`` (rank,), descending; ``eigvecs`` (P, rank), ravel order."""

    eigvals: jax.Array
    eigvecs: jax.Array


def lanczos(mv, v0, iterations: int):
    """Lanczos with full re-orthogonalisation (twice per step, "twice is enough").

    Args:
      mv: symmetric ``(P,) -> (P,)`` product.
      v0: start vector (normalised inside).
      iterations: ``m`` steps (``m`` products), ``m <= P``.

    Returns ``(alphas (m,), betas (m-1,), Q (m, P))`` with ``Q`` orthonormal rows and
    ``T = tridiag(betas, alphas, betas) = Q C Q^T``. On breakdown (an invariant subspace
    found, ``beta ~ 0``) the remaining basis vectors are zero and the matching ``T``
    entries are zero.
    """
    p = v0.shape[0]
    dtype = v0.dtype
    q0 = v0 / jnp.linalg.norm(v0)
    qs = jnp.zeros((iterations, p), dtype).at[0].set(q0)
    eps = jnp.finfo(dtype).eps

    def body(j, carry):
        qs, alphas, betas, scale = carry
        q = qs[j]
        w = mv(q)
        alpha = jnp.vdot(q, w)
        w = w - qs.T @ (qs @ w)  # rows > j are zero
        w = w - qs.T @ (qs @ w)
        beta = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.abs(alpha) + beta)
        alive = (beta > 100 * eps * scale) & (jnp.linalg.norm(q) > 0)
        q_next = jnp.where(alive, w / jnp.where(alive, beta, 1.0), 0.0)
        beta = jnp.where(alive, beta, 0.0)
        nxt = jnp.minimum(j + 1, iterations - 1)
        qs = jnp.where(j + 1 < iterations, qs.at[nxt].set(q_next), qs)
        return qs, alphas.at[j].set(alpha), betas.at[j].set(beta), scale

    carry = (qs, jnp.zeros(iterations, dtype), jnp.zeros(iterations, dtype), jnp.zeros((), dtype))
    qs, alphas, betas, _ = jax.lax.fori_loop(0, iterations, body, carry)
    return alphas, betas[: iterations - 1], qs


def top_eigenpairs(mv, v0, iterations: int, rank: int):
    """Top-``rank`` Ritz pairs ``(values desc, vectors (P, rank))`` after ``iterations`` Lanczos steps."""
    alphas, betas, qs = lanczos(mv, v0, iterations)
    t = jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1)
    w, s = jnp.linalg.eigh(t)
    order = jnp.argsort(-w)[:rank]
    return w[order], qs.T @ s[:, order]


#: default tolerance of :func:`arnoldi` on the true relative residual: reached when the
#: right-hand sides lie almost entirely in the top eigenspace (a rank near the effective
#: rank of the curvature); a larger rank, ``complement=True`` at large shifts, or cg
#: otherwise (``benchmarks/README.md``).
DEFAULT_TOL = 1e-2


@dataclasses.dataclass(frozen=True, repr=False)
class Arnoldi(Solver):
    """Low-rank inverse from top Ritz pairs (made by :func:`arnoldi`; fields are its options)."""

    name: ClassVar[str] = "arnoldi"
    rank: int = 20
    iterations: int = 40
    key: tuple = (0, 0)
    tol: float = DEFAULT_TOL
    residual: bool = True
    complement: bool = False

    def prepare(self, op) -> ArnoldiState:
        p = sum(int(np.size(l)) for l in jax.tree_util.tree_leaves(op.params))
        m, r = min(self.iterations, p), min(self.rank, p)
        itemsize = jnp.result_type(*jax.tree_util.tree_leaves(op.params)).itemsize
        _memory.check_fits((m + r) * p * itemsize + 2 * m * m * itemsize,
                           what=f"arnoldi: the Lanczos basis ({m} x {p:,}) and {r} eigenvectors",
                           alternative="lower rank/iterations, or use influx.solvers.cg() or ekfac()")
        return compiled(Arnoldi._prepare)(self, op)

    def _prepare(self, op) -> ArnoldiState:
        flat, unravel = ravel_pytree(op.params)
        p = flat.shape[0]
        m, r = min(self.iterations, p), min(self.rank, p)
        v0 = jax.random.normal(key_array(self.key), (p,), flat.dtype)
        w, u = top_eigenpairs(flat_curvature(op, unravel, flat.dtype), v0, m, r)
        return ArnoldiState(w, u)

    def _inverse(self, state, shift, g):
        """``x`` for rows ``g`` (``(k, P)``), the projections ``U^T g`` and the kept mask."""
        u = state.eigvecs.astype(g.dtype)
        denom = state.eigvals.astype(g.dtype) + shift
        ok = denom > 0
        coef = g @ u
        x = jnp.where(ok, coef / jnp.where(ok, denom, 1.0), 0.0) @ u.T
        if self.complement:
            comp = (g - coef @ u.T) / jnp.where(shift > 0, shift, 1.0)
            x = x + jnp.where(shift > 0, comp, 0.0)
        return x, coef, ok

    def apply(self, state, op, b) -> Solution:
        b = check_rhs(op, b)
        sol = self.apply_many(state, op, jax.tree_util.tree_map(lambda a: a[None], b))
        return jax.tree_util.tree_map(lambda a: a[0], sol)

    def apply_many(self, state, op, bs) -> Solution:
        return compiled(Arnoldi._apply_many)(self, state, op, bs)

    def _apply_many(self, state: ArnoldiState, op, bs) -> Solution:
        flat_bs, unravel = ravel_batch(bs)
        dtype = flat_bs.dtype
        finite_b = jax.vmap(all_finite)(flat_bs)
        b0 = jnp.where(finite_b[:, None], flat_bs, 0.0)
        shift = jnp.asarray(op.shift, dtype)
        x, _, ok = self._inverse(state, shift, b0)
        status = jnp.where(~finite_b, Status.NONFINITE,
                           jnp.where(jnp.all(ok), Status.CONVERGED, Status.NEGATIVE_CURVATURE))
        b_norm = jnp.linalg.norm(b0, axis=1)
        k = flat_bs.shape[0]
        if self.residual:
            res = jnp.linalg.norm(jax.vmap(flat_matvec(op, unravel, dtype))(x) - b0, axis=1)
            res = jnp.where(finite_b, res, jnp.inf)
            status = residual_status(res, b_norm, self.tol, status)
            prods = jnp.ones((k,), jnp.int32)
        else:
            res = jnp.full((k,), jnp.nan, dtype)
            status = jnp.where(status == Status.CONVERGED, Status.UNCHECKED, status).astype(jnp.int32)
            prods = jnp.zeros((k,), jnp.int32)
        stats = {"prepare_products": jnp.full((k,), min(self.iterations, flat_bs.shape[1]), jnp.int32),
                 "relative_residual": relative(res, b_norm)}
        return Solution(jax.vmap(unravel)(x), res, prods, status == Status.CONVERGED, status, stats)

    def inverse_quadratic(self, state, op, chunk):
        """``g_m^T x_m`` with exactly the ``x_m`` of :meth:`apply`, from the projections
        ``U^T g_m`` of the per-example gradients: ``O(m P r)`` flops, no operator product
        (so no residual: the status flags only indefinite kept eigenvalues, as
        ``NEGATIVE_CURVATURE`` with ``NaN`` values)."""
        from influx.curvature import per_example_grads_flat

        g = per_example_grads_flat(op.obj, op.params, chunk)
        shift = jnp.asarray(op.shift, g.dtype)
        _, coef, ok = self._inverse(state, shift, g)
        denom = state.eigvals.astype(g.dtype) + shift
        vals = jnp.sum(jnp.where(ok, coef * coef / jnp.where(ok, denom, 1.0), 0.0), axis=1)
        if self.complement:
            rest = jnp.sum(g * g, axis=1) - jnp.sum(coef * coef, axis=1)
            vals = vals + jnp.where(shift > 0, rest / jnp.where(shift > 0, shift, 1.0), 0.0)
        m = g.shape[0]
        good = jnp.all(ok)
        status = jnp.broadcast_to(jnp.where(good, Status.CONVERGED, Status.NEGATIVE_CURVATURE),
                                  (m,)).astype(jnp.int32)
        sol = Solution(None, jnp.full((m,), jnp.nan, g.dtype), jnp.zeros((m,), jnp.int32),
                       status == Status.CONVERGED, status, {})
        return jnp.where(good, vals, jnp.nan), sol


def arnoldi(*, rank: int = 20, iterations: int | None = None, key=None, tol: float | None = None,
            residual: bool = True, complement: bool = False) -> Arnoldi:
    """Low-rank eigen-solver (see module docstring); returns an :class:`Arnoldi` value.

    Args:
      rank: number of top Ritz pairs kept (capped at the number of parameters ``P``; a
        rank near ``P`` is better served by ``direct()``).
      iterations: Lanczos steps (products in ``prepare``); default ``2 * rank``; must be
        ``>= rank``; capped at ``P``.
      key: PRNG key of the start vector (default ``PRNGKey(0)``).
      tol: a solve is ``CONVERGED`` only when its true relative residual is ``<= tol``
        (default :data:`DEFAULT_TOL` = 1e-2; a larger rank or cg when it is not reached).
      residual: compute the true residual ``||A x - b||`` (one product per solve); when
        False, ``residual_norm`` is NaN and the status ``UNCHECKED`` (never ``CONVERGED``).
      complement: ``False`` (default) keeps only the projection
        ``U diag(1/(lambda + s)) U^T b`` (Schioppa et al.'s estimator, also pyDVL's: biased
        towards the top eigenspace, but never amplifies the complement by ``1/s``);
        ``True`` adds ``(b - U U^T b) / s`` (the damped low-rank inverse of the module
        docstring), which over-weights every direction of small but non-zero curvature
        by up to ``lambda_rank / s`` and so helps only at large shifts
        (``benchmarks/README.md``). Only ``complement=True`` is exact at full rank when
        ``C`` is singular (a GNH's null space is not in the Krylov space of one start
        vector).

    ``solver.prepare(op)`` returns an :class:`ArnoldiState` computed once (its memory,
    ``(iterations + rank) x P`` numbers, is checked first); reuse it with
    ``solver.apply(state, op, b)`` or ``solver.apply_batch(state, op, B)``.
    """
    rank = check_int(rank, "arnoldi: rank", minimum=1)
    iterations = 2 * rank if iterations is None else iterations
    iterations = check_int(iterations, f"arnoldi: iterations (rank={rank})", minimum=rank)
    tol = DEFAULT_TOL if tol is None else float(tol)
    if not tol > 0:
        raise InputError(f"arnoldi: tol must be > 0, got {tol}")
    return Arnoldi(rank=int(rank), iterations=int(iterations), key=key_tuple(key), tol=tol,
                   residual=bool(residual), complement=bool(complement))
