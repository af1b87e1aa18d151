"""Conjugate gradients for ``A x = b`` with ``A = C + (l2 + damping) I``.

Preconditioned CG (Hestenes-Stiefel) from ``x_0 = 0`` on the raveled parameter vector::

    r_0 = b,  z_0 = M^-1 r_0,  p_0 = z_0
    alpha_k = (r_k^T z_k) / (p_k^T A p_k)
    x_{k+1} = x_k + alpha_k p_k,   r_{k+1} = r_k - alpha_k A p_k
    z_{k+1} = M^-1 r_{k+1},  beta_k = (r_{k+1}^T z_{k+1}) / (r_k^T z_k),  p_{k+1} = z_{k+1} + beta_k p_k

stopped when ``||r|| <= max(tol ||b||, atol)``. The recurrence residual drifts from the
true one in finite precision, so every ``recompute_every`` steps (and always before
declaring convergence, at ``max_steps`` and after a breakdown) the true residual
``b - A x`` replaces it (residual replacement: the search direction is kept, ``r^T z`` is
recomputed). At each replacement the iterate with the lowest true residual so far is
kept; the returned ``x`` is that best iterate (never worse than ``x_0 = 0``) and
``residual_norm`` is its true residual.

In float32 the attainable relative residual is ~1e-4..1e-5 on ill-conditioned problems
(small damping); asked for less, CG loses orthogonality and the iterates can blow up
(relative residuals of 1e5 and more were seen on a digits MLP at damping 1e-3). CG
therefore stops as ``STAGNATED`` when the best true residual has not dropped by 10% over
``stagnation_window`` steps or a true residual exceeds ``divergence_factor`` times the
best, and returns the best iterate.

Failure modes, reported in ``Solution.status`` (never NaN in ``x``):

* ``NEGATIVE_CURVATURE``: ``p^T A p <= 0`` (``A`` is not positive definite, e.g. an
  undamped Hessian of a non-convex net); ``x`` is the best iterate before it.
* ``MAX_STEPS``: ``max_steps`` CG steps without reaching the tolerance.
* ``STAGNATED``: the tolerance is below what the dtype reaches (see above).
* ``NONFINITE``: NaN/inf in ``b`` (``x = 0``) or in an operator product.

Cost: one operator product per CG step plus one per residual replacement;
``Solution.iterations`` counts all of them. The loop is one ``lax.while_loop`` whose
iterations each spend one product (a CG step or a residual replacement), written for a
``(k, P)`` block of independent right-hand sides; ``apply`` runs it with ``k = 1`` and
``apply_batch`` is its ``vmap`` (products of all right-hand sides batched, finished ones
frozen, their counters stopped). A native block run (``k = 16``, operator ``vmap``-ed
inside the loop body) measured no faster than ``vmap`` of the single loop on the digits
MLP (2 CPU cores): both do the same batched products, and ``vmap`` of a ``while_loop``
already masks finished columns the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from influx.solvers._base import Solution, Solver, Status, check_rhs, flat_matvec

__all__ = ["cg", "diagonal_preconditioner", "estimate_diagonal"]


def _check_positive_int(name, v, *, minimum=1):
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return v


def cg(*, tol: float = 1e-6, atol: float = 0.0, max_steps: int = 1000,
       preconditioner: Callable | str | None = None, recompute_every: int = 50,
       stagnation_window: int | None = None, divergence_factor: float = 100.0,
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
      stagnation_window: stop with ``Status.STAGNATED`` when the best true residual has
        not dropped by 10% over this many CG steps (default ``3 * recompute_every``).
      divergence_factor: stop with ``Status.STAGNATED`` when a true residual exceeds this
        factor times the best one seen (loss of orthogonality in low precision).
      precond_samples, key: Hutchinson samples and PRNG key for ``"jacobi"``.
    """
    tol, atol = float(tol), float(atol)
    if not tol >= 0 or not atol >= 0:
        raise ValueError(f"cg: tol and atol must be >= 0, got tol={tol}, atol={atol}")
    _check_positive_int("cg: max_steps", max_steps)
    _check_positive_int("cg: recompute_every", recompute_every)
    window = 3 * recompute_every if stagnation_window is None else stagnation_window
    _check_positive_int("cg: stagnation_window", window)
    divergence_factor = float(divergence_factor)
    if not divergence_factor > 1:
        raise ValueError(f"cg: divergence_factor must be > 1, got {divergence_factor}")
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

    def _setup(state, op, dtype):
        _, unravel = ravel_pytree(op.params)
        mv = flat_matvec(op, unravel, dtype)
        if preconditioner == "jacobi":
            inv_diag = state["inv_diag"].astype(dtype)
            psolve = lambda r: inv_diag * r
        elif callable(preconditioner):
            psolve = lambda r: ravel_pytree(preconditioner(unravel(r)))[0].astype(dtype)
        else:
            psolve = lambda r: r
        return mv, psolve

    def _solve(state, op, flat_b):  # flat_b: (k, P)
        mv, psolve = _setup(state, op, flat_b.dtype)
        return _cg_block(mv, psolve, flat_b, tol=tol, atol=atol, max_steps=max_steps,
                         recompute_every=recompute_every, stagnation_window=window,
                         divergence_factor=divergence_factor)

    @jax.jit
    def _apply(state, op, b):
        flat_b, unravel = ravel_pytree(b)
        x, res, prods, status, stats = _solve(state, op, flat_b[None])
        stats = {k: v[0] for k, v in stats.items()}
        return Solution(unravel(x[0]), res[0], prods[0], status[0] == Status.CONVERGED,
                        status[0], stats)

    def apply(state, op, b):
        return _apply(state, op, check_rhs(op, b))

    opts = {"tol": tol, "max_steps": max_steps, "recompute_every": recompute_every}
    if preconditioner is not None:
        opts["preconditioner"] = preconditioner if isinstance(preconditioner, str) else "callable"
    return Solver("cg", prepare, apply, opts)


def _cg_block(mv, psolve, b, *, tol, atol, max_steps, recompute_every, stagnation_window,
              divergence_factor):
    """Block CG on ``b`` of shape ``(k, P)``: every column is an independent CG run.

    ``mv``/``psolve`` act on one flat vector and are ``vmap``-ed over the block. One loop
    iteration spends one product per running column: a CG step, or (every
    ``recompute_every`` steps, when the recurrence residual claims convergence, at
    ``max_steps`` and after a breakdown) a true-residual replacement ``r = b - A x``, at
    which the best iterate so far is updated and stagnation / divergence are checked.
    """
    dtype = b.dtype
    k = b.shape[0]
    vmv, vpsolve = jax.vmap(mv), jax.vmap(psolve)
    dot = lambda u, v: jnp.sum(u * v, axis=1)
    norm = lambda u: jnp.sqrt(jnp.sum(u * u, axis=1))
    col = lambda m: m[:, None]
    b_norm = norm(b)
    finite_b = jnp.all(jnp.isfinite(b), axis=1)
    thresh = jnp.maximum(tol * b_norm, atol).astype(dtype)
    b0 = jnp.where(col(finite_b), b, 0)
    z0 = vpsolve(b0)
    status0 = jnp.where(~finite_b, Status.NONFINITE,
                        jnp.where(norm(b0) <= thresh, Status.CONVERGED, Status.RUNNING))
    izero = jnp.zeros((k,), jnp.int32)
    res0 = jnp.where(finite_b, norm(b0), jnp.inf).astype(dtype)
    init = {
        "x": jnp.zeros_like(b0), "r": b0, "p": z0, "rz": dot(b0, z0),
        "steps": izero, "prods": izero, "j": izero, "status": status0.astype(jnp.int32),
        "pending": jnp.full((k,), Status.RUNNING, jnp.int32),  # breakdown seen, awaiting true r
        "x_best": jnp.zeros_like(b0), "res_best": res0,
        "anchor": res0, "anchor_step": izero,  # last significant (x0.9) improvement of res_best
    }

    def cond(c):
        return jnp.any(c["status"] == Status.RUNNING)

    def body(c):
        running = c["status"] == Status.RUNNING
        recompute = running & ((c["j"] >= recompute_every) | (norm(c["r"]) <= thresh)
                               | (c["steps"] >= max_steps) | (c["pending"] != Status.RUNNING))
        av = vmv(jnp.where(col(recompute), c["x"], c["p"]))

        # --- CG step (columns running and not recomputing)
        x, r, p, rz = c["x"], c["r"], c["p"], c["rz"]
        pap = dot(p, av)
        bad = ~jnp.isfinite(pap) | ~jnp.all(jnp.isfinite(av), axis=1)
        neg = (pap <= 0) & ~bad
        ok = ~bad & ~neg
        alpha = jnp.where(ok, rz / jnp.where(ok, pap, 1.0), 0.0).astype(dtype)
        x_cg = x + col(alpha) * p
        r_cg = r - col(alpha) * av
        step = running & ~recompute
        take = step & ok
        pending = jnp.where(step & bad, Status.NONFINITE,
                            jnp.where(step & neg, Status.NEGATIVE_CURVATURE, c["pending"]))

        # --- true-residual replacement (columns recomputing)
        r_true = b0 - av
        finite = jnp.all(jnp.isfinite(r_true), axis=1)
        r_rep = jnp.where(col(finite), r_true, r)
        # one preconditioner application per iteration, on the new residual of either kind
        sel = lambda m, a, b_: jnp.where(col(m) if a.ndim == 2 else m, a, b_)
        r_new = sel(take, r_cg, sel(recompute, r_rep, r))
        z_new = vpsolve(r_new)
        rz_new = dot(r_new, z_new)
        beta = jnp.where(take & (rz != 0), rz_new / jnp.where(rz != 0, rz, 1.0), 0.0).astype(dtype)
        p_cg = z_new + col(beta) * p
        res = jnp.where(finite, norm(r_true), jnp.inf)
        improve = recompute & (res < c["res_best"])
        x_best = jnp.where(col(improve), x, c["x_best"])
        res_best = jnp.where(improve, res, c["res_best"])
        signif = recompute & (res < 0.9 * c["anchor"])
        anchor = jnp.where(signif, res, c["anchor"])
        anchor_step = jnp.where(signif, c["steps"], c["anchor_step"])
        stalled = (c["steps"] - anchor_step >= stagnation_window) | (
            res > divergence_factor * res_best)
        new_status = jnp.where(
            pending != Status.RUNNING, pending,
            jnp.where(~finite, Status.NONFINITE,
                      jnp.where(res <= thresh, Status.CONVERGED,
                                jnp.where(c["steps"] >= max_steps, Status.MAX_STEPS,
                                          jnp.where(stalled, Status.STAGNATED, Status.RUNNING)))))

        return {
            "x": sel(take, x_cg, x),
            "r": r_new,
            "p": sel(take, p_cg, p),
            "rz": sel(take | recompute, rz_new, rz),
            "steps": c["steps"] + take.astype(jnp.int32),
            "prods": c["prods"] + running.astype(jnp.int32),
            "j": jnp.where(recompute, 0, c["j"] + take.astype(jnp.int32)),
            "status": jnp.where(recompute, new_status, c["status"]).astype(jnp.int32),
            "pending": pending.astype(jnp.int32),
            "x_best": x_best, "res_best": res_best, "anchor": anchor, "anchor_step": anchor_step,
        }

    c = jax.lax.while_loop(cond, body, init)
    # x_best holds the iterate with the lowest true residual seen (x0 = 0 if none is better)
    res = c["res_best"]
    rel = res / jnp.where(b_norm > 0, b_norm, 1.0)
    stats = {"steps": c["steps"], "relative_residual": rel}
    return c["x_best"], res, c["prods"], c["status"], stats


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
