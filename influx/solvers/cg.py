"""Conjugate gradients for ``A x = b`` with ``A = C + (l2 + damping) I``.

Preconditioned CG (Hestenes-Stiefel) from ``x_0 = 0`` on the raveled parameter vector::

    r_0 = b,  z_0 = M^-1 r_0,  p_0 = z_0
    alpha_k = (r_k^T z_k) / (p_k^T A p_k)
    x_{k+1} = x_k + alpha_k p_k,   r_{k+1} = r_k - alpha_k A p_k
    z_{k+1} = M^-1 r_{k+1},  beta_k = (r_{k+1}^T z_{k+1}) / (r_k^T z_k),  p_{k+1} = z_{k+1} + beta_k p_k

stopped when ``||r|| <= max(tol ||b||, atol)``. The recurrence residual drifts from the
true one in finite precision, so every ``recompute_every`` steps (and always before
declaring convergence) the true residual ``b - A x`` replaces it (residual replacement:
the search direction is kept, ``r^T z`` is recomputed). The reported ``residual_norm`` is
always a true residual.

Failure modes, reported in ``Solution.status`` (never NaN in ``x``):

* ``NEGATIVE_CURVATURE``: ``p^T A p <= 0`` (``A`` is not positive definite, e.g. an
  undamped Hessian of a non-convex net); ``x`` is the last iterate before it.
* ``MAX_STEPS``: ``max_steps`` CG steps without reaching the tolerance.
* ``NONFINITE``: NaN/inf in ``b`` (``x = 0``) or in an operator product.

Cost: one operator product per CG step plus one per residual replacement;
``Solution.iterations`` counts all of them. Works under ``vmap`` over ``b`` (the products
of all right-hand sides are batched; finished right-hand sides are frozen and their
counters stop).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from influx.solvers._base import Solution, Solver, Status, all_finite, check_rhs, flat_matvec

__all__ = ["cg", "diagonal_preconditioner", "estimate_diagonal"]


def _check_positive_int(name, v, *, minimum=1):
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return v


def cg(*, tol: float = 1e-6, atol: float = 0.0, max_steps: int = 1000,
       preconditioner: Callable | str | None = None, recompute_every: int = 50,
       precond_samples: int = 32, key=None) -> Solver:
    """Conjugate-gradient solver (see module docstring).

    Args:
      tol: relative tolerance, stop when ``||b - A x|| <= tol ||b||``.
      atol: absolute tolerance (the stopping threshold is ``max(tol ||b||, atol)``).
      max_steps: maximum number of CG steps per right-hand side.
      preconditioner: ``None``; a callable ``v -> M^-1 v`` on pytrees like the params
        (``M`` symmetric positive definite); or ``"jacobi"``: a diagonal preconditioner
        estimated once in ``prepare`` by Hutchinson's method with ``precond_samples``
        products (see :func:`estimate_diagonal`).
      recompute_every: replace the recurrence residual by the true residual every this
        many steps (one extra product each time).
      precond_samples, key: Hutchinson samples and PRNG key for ``"jacobi"``.
    """
    tol, atol = float(tol), float(atol)
    if not tol >= 0 or not atol >= 0:
        raise ValueError(f"cg: tol and atol must be >= 0, got tol={tol}, atol={atol}")
    _check_positive_int("cg: max_steps", max_steps)
    _check_positive_int("cg: recompute_every", recompute_every)
    if not (preconditioner is None or preconditioner == "jacobi" or callable(preconditioner)):
        raise ValueError("cg: preconditioner must be None, 'jacobi' or a callable v -> M^-1 v, "
                         f"got {preconditioner!r}")
    if preconditioner == "jacobi":
        _check_positive_int("cg: precond_samples", precond_samples)
    key = jax.random.PRNGKey(0) if key is None else key

    @jax.jit
    def prepare(op):
        if preconditioner == "jacobi":
            return {"inv_diag": 1.0 / estimate_diagonal(op, key, samples=precond_samples)}
        return {}

    @jax.jit
    def _apply(state, op, b):
        flat_b, unravel = ravel_pytree(b)
        dtype = flat_b.dtype
        mv = flat_matvec(op, unravel, dtype)
        if preconditioner == "jacobi":
            inv_diag = state["inv_diag"].astype(dtype)
            psolve = lambda r: inv_diag * r
        elif callable(preconditioner):
            psolve = lambda r: ravel_pytree(preconditioner(unravel(r)))[0].astype(dtype)
        else:
            psolve = lambda r: r
        return _cg_flat(mv, psolve, flat_b, unravel, tol=tol, atol=atol, max_steps=max_steps,
                        recompute_every=recompute_every)

    def apply(state, op, b):
        return _apply(state, op, check_rhs(op, b))

    opts = {"tol": tol, "max_steps": max_steps, "recompute_every": recompute_every}
    if preconditioner is not None:
        opts["preconditioner"] = preconditioner if isinstance(preconditioner, str) else "callable"
    return Solver("cg", prepare, apply, opts)


def _cg_flat(mv, psolve, b, unravel, *, tol, atol, max_steps, recompute_every):
    dtype = b.dtype
    b_norm = jnp.linalg.norm(b)
    finite_b = all_finite(b)
    thresh = jnp.maximum(tol * b_norm, atol)
    zero = jnp.zeros_like(b)
    b0 = jnp.where(finite_b, b, zero)
    r0 = b0
    z0 = psolve(r0)
    rz0 = jnp.vdot(r0, z0)
    status0 = jnp.where(~finite_b, Status.NONFINITE,
                        jnp.where(jnp.linalg.norm(r0) <= thresh, Status.CONVERGED, Status.RUNNING))
    # carry: x, r, p, rz, steps (CG steps), products, status
    init = (zero, r0, z0, rz0, jnp.int32(0), jnp.int32(0), jnp.int32(status0))

    def inner_cond(c):
        _, r, _, _, steps, _, status, j = c
        return ((status == Status.RUNNING) & (steps < max_steps) & (jnp.linalg.norm(r) > thresh)
                & (j < recompute_every))

    def inner_body(c):
        x, r, p, rz, steps, prods, status, j = c
        ap = mv(p)
        pap = jnp.vdot(p, ap)
        bad = ~jnp.isfinite(pap) | ~all_finite(ap)
        neg = (pap <= 0) & ~bad
        ok = ~bad & ~neg
        alpha = jnp.where(ok, rz / jnp.where(ok, pap, 1.0), 0.0).astype(dtype)
        x_new = x + alpha * p
        r_new = r - alpha * ap
        z_new = psolve(r_new)
        rz_new = jnp.vdot(r_new, z_new)
        beta = jnp.where(ok & (rz != 0), rz_new / jnp.where(rz != 0, rz, 1.0), 0.0).astype(dtype)
        p_new = z_new + beta * p
        status = jnp.where(bad, Status.NONFINITE, jnp.where(neg, Status.NEGATIVE_CURVATURE, status))
        keep = lambda new, old: jnp.where(ok, new, old)
        return (keep(x_new, x), keep(r_new, r), keep(p_new, p), keep(rz_new, rz),
                steps + ok.astype(jnp.int32), prods + 1, status.astype(jnp.int32), j + 1)

    def outer_cond(c):
        return c[6] == Status.RUNNING

    def outer_body(c):
        x, r, p, rz, steps, prods, status, _ = jax.lax.while_loop(
            inner_cond, inner_body, c + (jnp.int32(0),))
        # residual replacement with the true residual (also certifies convergence)
        r_true = b0 - mv(x)
        finite = all_finite(r_true)
        r_true = jnp.where(finite, r_true, r)
        z = psolve(r_true)
        rz = jnp.vdot(r_true, z)
        res = jnp.linalg.norm(r_true)
        status = jnp.where(status != Status.RUNNING, status,
                           jnp.where(~finite, Status.NONFINITE,
                                     jnp.where(res <= thresh, Status.CONVERGED,
                                               jnp.where(steps >= max_steps, Status.MAX_STEPS,
                                                         Status.RUNNING))))
        return (x, r_true, p, rz, steps, prods + 1, status.astype(jnp.int32))

    x, r, _, _, steps, prods, status = jax.lax.while_loop(outer_cond, outer_body, init)
    # every exit path of outer_body left a true residual in r, except negative curvature /
    # non-finite exits, after which r was also replaced; status0 exits have x = 0, r = b.
    res = jnp.where(finite_b, jnp.linalg.norm(r), jnp.inf)
    stats = {"steps": steps, "relative_residual": res / jnp.where(b_norm > 0, b_norm, 1.0)}
    return Solution(unravel(x), res, prods, status == Status.CONVERGED, status, stats)


# ------------------------------------------------------------------ preconditioning
def estimate_diagonal(op, key, *, samples: int = 32):
    """Hutchinson estimate of ``diag(A)`` (flat, ravel order): ``mean_s z_s * (A z_s)``.

    ``z_s`` are Rademacher vectors; ``samples`` operator products (vmapped). The estimate
    is clipped from below at ``max(shift, 1e-3 * mean |d|)`` so it is positive even for an
    indefinite Hessian (a preconditioner must be positive definite). Standard error of
    each entry: ``sqrt(sum_{j != i} A_ij^2 / samples)``.
    """
    flat, unravel = ravel_pytree(op.params)
    mv = flat_matvec(op, unravel, flat.dtype)
    z = jax.random.rademacher(key, (samples, flat.shape[0]), dtype=flat.dtype)
    d = jnp.mean(z * jax.vmap(mv)(z), axis=0)
    floor = jnp.maximum(jnp.asarray(op.shift, flat.dtype), 1e-3 * jnp.mean(jnp.abs(d)))
    return jnp.maximum(d, floor)


def diagonal_preconditioner(op, key=None, *, samples: int = 32) -> Callable:
    """A Jacobi preconditioner ``v -> D^-1 v`` (pytrees) with ``D`` from :func:`estimate_diagonal`.

    Equivalent to ``cg(preconditioner="jacobi")``, which estimates ``D`` inside ``prepare``.
    """
    key = jax.random.PRNGKey(0) if key is None else key
    inv = 1.0 / jax.jit(estimate_diagonal, static_argnames="samples")(op, key, samples=samples)
    _, unravel = ravel_pytree(op.params)

    def apply(v):
        fv, unr = ravel_pytree(v)
        return unr(inv.astype(fv.dtype) * fv)

    return apply
