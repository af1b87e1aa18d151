"""LiSSA: the stochastic Neumann-series iHVP (Agarwal et al., 2017; Koh & Liang, 2017).

For ``A = C + s_0 I`` (``s_0 = l2 + damping``) and a scale ``S``, ``A^-1 = (1/S) sum_j
(I - A/S)^j`` whenever the spectrum of ``A/S`` lies in ``(0, 2)``. LiSSA truncates the
series at ``depth`` and replaces ``A`` by a fresh minibatch operator ``A_t`` at every
step (``op.subsample(idx)``, which keeps the shift ``s_0``)::

    h_0 = b,   h_t = b + (I - A_t / S) h_{t-1},   x = mean_{samples} h_depth / S.

Accuracy: in expectation the deterministic error after ``depth`` steps is
``(I - A/S)^(depth+1) A^-1 b``, so it decays like ``(1 - lambda_min(A)/S)^depth``:
LiSSA reaches ``A^-1 b`` only as ``depth -> infinity`` (``depth >> S / lambda_min``), and
the minibatch noise adds a random error that averaging over ``samples`` reduces as
``1/sqrt(samples)``. It is a stochastic solver: results depend on ``key``.

Stability: the recursion is contractive for every minibatch only when
``S > lambda_max(A_t) / 2`` for all ``t``. A too-small ``S`` makes ``||h_t||`` grow
geometrically (the NaN that peer libraries return). Here:

* ``scale=None`` (default) estimates ``lambda_max`` in :meth:`prepare` by Lanczos
  (``scale_iterations`` products) on the full operator -- on a random subset of
  ``scale_examples`` examples when ``N`` is larger, so the estimate costs at most
  ``scale_iterations * scale_examples`` example-products however large the data --
  *and* on ``scale_batches`` random minibatch operators (minibatch curvature can exceed
  the full one), and sets
  ``S = safety * max(all estimates)`` (``safety = 1.1``). Since the Ritz estimate is a
  lower bound of ``lambda_max`` that converges fast, and stability only needs
  ``S > lambda_max(A_t) / 2``, this leaves a margin of ``2 * safety = 2.2`` for unseen
  minibatches.
* divergence is detected (``||h_t|| > 2 (t + 1) ||b||``, which a contractive recursion
  never exceeds, or a non-finite ``h_t``): the recursion stops, ``x`` is built from the
  last finite iterate, ``Solution.status = DIVERGED`` and ``stats["recommended_scale"]``
  holds ``safety * S (1 + rho)`` with ``rho = ||h_t|| / ||h_{t-1}||`` at divergence
  (``rho ~ |1 - lambda_max(A_t)/S|``, so ``S (1 + rho)`` estimates ``lambda_max``);
  :func:`influx.solvers.check_solution` turns it into "increase scale to at least ...".

Cost per right-hand side: ``samples * depth`` minibatch products (``batch_size / N`` of a
full product each) plus one full product for the true residual ``||A x - b||``;
``Solution.iterations`` counts the products of both kinds and ``stats["products"]`` the
cost in full-product equivalents. Every right-hand side sees the same minibatch sequence
(independent ones per sample). ``apply_batch`` (and :func:`influx.influence`) runs them in
one loop (``Solver.apply_many``): each step gathers one minibatch and multiplies it with
all iterates, sharing the forward pass (``vmap`` of the single loop would batch the step
counter and with it the gather and the forward pass), with the same result as solving
them one at a time.

Convergence: the true relative residual ``||A x - b|| / ||b||`` is computed for every
right-hand side and the status is ``CONVERGED`` only when it is ``<= tol`` (default
1e-2); otherwise ``MAX_STEPS`` (raise ``depth``/``samples``, add damping, or use cg) or
``DIVERGED``. The residual bounds the error only up to the condition number
(``||x - A^-1 b|| <= ||A x - b|| / shift``): at small shifts even ``tol = 1e-2`` can hide
a large error, which is why the default is not looser.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from influx.errors import InputError
from influx.solvers._base import (
    Solution,
    Solver,
    Status,
    all_finite,
    check_rhs,
    compiled,
    flat_matvec,
    key_array,
    key_tuple,
    ravel_batch,
    relative,
    residual_status,
)
from influx.solvers.arnoldi import top_eigenpairs
from influx.validation import check_int

__all__ = ["LiSSA", "lissa", "estimate_top_eigenvalue", "DEFAULT_TOL"]


def _subset(op, idx):
    """``op`` on the examples ``idx`` (its curvature the mean over them): the protocol's
    ``op.subsample``."""
    return op.subsample(idx)


def estimate_top_eigenvalue(op, key, *, iterations: int = 20):
    """Largest eigenvalue of the damped operator ``A`` (Lanczos Ritz value, a lower bound).

    Cost: ``min(iterations, P)`` operator products.
    """
    flat, unravel = ravel_pytree(op.params)
    m = min(iterations, flat.shape[0])
    v0 = jax.random.normal(key, flat.shape, flat.dtype)
    w, _ = top_eigenpairs(flat_matvec(op, unravel, flat.dtype), v0, m, 1)
    return w[0]


#: default tolerance of :func:`lissa` on the true relative residual. LiSSA reaches it on
#: well-damped small problems (Iris MLP, damping 1e-3, depth 1000: 0.003-0.03); its
#: minibatch noise often stops it above (digits MLP: 0.25-0.85, ``benchmarks/README.md``):
#: then raise ``samples`` and ``depth``, add damping, pass a looser ``tol`` knowingly, or use cg.
DEFAULT_TOL = 1e-2


@dataclasses.dataclass(frozen=True, repr=False)
class LiSSA(Solver):
    """Stochastic Neumann series (made by :func:`lissa`; the fields are its options)."""

    name: ClassVar[str] = "lissa"
    scale: float | None = None
    depth: int = 1000
    samples: int = 1
    batch_size: int = 128
    key: tuple = (0, 0)
    safety: float = 1.1
    scale_iterations: int = 20
    scale_batches: int = 4
    scale_examples: int | None = 8192
    tol: float = DEFAULT_TOL

    def _keys(self):
        return jax.random.split(key_array(self.key))

    def prepare(self, op):
        if not hasattr(op, "subsample"):
            raise InputError("lissa: the operator has no subsample(idx) (minibatch operators); "
                             "see influx.solvers.LinearOperator")
        return compiled(LiSSA._prepare)(self, op)

    def _prepare(self, op):
        flat, _ = ravel_pytree(op.params)
        dtype = flat.dtype
        n = op.num_examples
        bs = min(self.batch_size, n)
        if self.scale is not None:
            nan = jnp.asarray(jnp.nan, dtype)
            return {"scale": jnp.asarray(self.scale, dtype), "lambda_max": nan, "lambda_max_batch": nan}
        k_full, k_b = jax.random.split(self._keys()[0])
        full = op
        if self.scale_examples is not None and self.scale_examples < n:  # static: a random subset
            k_full, k_sub = jax.random.split(k_full)
            full = _subset(op, jax.random.choice(k_sub, n, (self.scale_examples,), replace=False))
        lam = estimate_top_eigenvalue(full, k_full, iterations=self.scale_iterations)
        lam_b = jnp.asarray(0.0, dtype)
        if bs < n and self.scale_batches > 0:
            def one(k):
                k1, k2 = jax.random.split(k)
                idx = jax.random.choice(k1, n, (bs,), replace=False)
                return estimate_top_eigenvalue(_subset(op, idx), k2, iterations=self.scale_iterations)

            lam_b = jnp.max(jax.lax.map(one, jax.random.split(k_b, self.scale_batches)))
        s = self.safety * jnp.maximum(lam, lam_b)
        return {"scale": s.astype(dtype), "lambda_max": lam, "lambda_max_batch": lam_b}

    def apply(self, state, op, b) -> Solution:
        b = check_rhs(op, b)
        sol = self.apply_many(state, op, jax.tree_util.tree_map(lambda a: a[None], b))
        return jax.tree_util.tree_map(lambda a: a[0], sol)

    def apply_many(self, state, op, bs) -> Solution:
        """All right-hand sides (leading axis of every leaf of ``bs``) in one loop: every step
        draws one minibatch and multiplies it with every iterate (the forward pass and the
        gather are shared), exactly the sequence a single solve draws -- so the result equals
        solving them one at a time. A diverged right-hand side is frozen at its last finite
        iterate; the loop ends when ``depth`` is reached or every one has diverged."""
        return compiled(LiSSA._apply_many)(self, state, op, bs)

    def _recursion(self, op, unravel, b0, b_norm, s, finite_b):
        """The ``samples`` recursions: ``(h, steps, growth ratio, diverged)`` per sample and rhs."""
        n = op.num_examples
        bsz = min(self.batch_size, n)

        def batch_mv(t_key):
            # with replacement: O(batch) per step (no O(N) permutation), unbiased
            sub = op if bsz == n else _subset(op, jax.random.randint(t_key, (bsz,), 0, n))
            return jax.vmap(flat_matvec(sub, unravel, b0.dtype))

        def run(sample_key):
            def cond(c):
                return (c[1] < self.depth) & ~jnp.all(c[5])

            def body(c):
                h, t, ts, nrm, ratio, div = c
                h_new = b0 + h - batch_mv(jax.random.fold_in(sample_key, t))(h) / s
                nrm_new = jnp.linalg.norm(h_new, axis=1)
                div_new = div | ~jnp.isfinite(nrm_new) | (nrm_new > 2.0 * (t + 2) * b_norm)
                r = nrm_new / jnp.where(nrm > 0, nrm, 1.0)
                ratio = jnp.where(div, ratio, jnp.where(jnp.isfinite(r), r, ratio))
                return (jnp.where(div_new[:, None], h, h_new), t + 1, jnp.where(div, ts, t + 1),
                        jnp.where(div_new, nrm, nrm_new), ratio, div_new)

            zeros = jnp.zeros(b_norm.shape, jnp.int32)
            init = (b0, jnp.int32(0), zeros, b_norm, jnp.zeros(b_norm.shape, b0.dtype), ~finite_b)
            h, _, ts, _, ratio, div = jax.lax.while_loop(cond, body, init)
            return h, ts, ratio, div

        return jax.vmap(run)(jax.random.split(self._keys()[1], self.samples))

    def _apply_many(self, state, op, bs) -> Solution:
        flat_bs, unravel = ravel_batch(bs)
        dtype = flat_bs.dtype
        n = op.num_examples
        s = state["scale"].astype(dtype)
        finite_b = jax.vmap(all_finite)(flat_bs)
        b0 = jnp.where(finite_b[:, None], flat_bs, 0.0)
        b_norm = jnp.linalg.norm(b0, axis=1)
        hs, ts, ratios, divs = self._recursion(op, unravel, b0, b_norm, s, finite_b)  # (samples, k, ...)
        x = jnp.mean(hs, axis=0) / s
        res = jnp.linalg.norm(jax.vmap(flat_matvec(op, unravel, dtype))(x) - b0, axis=1)
        diverged = jnp.any(divs & finite_b[None], axis=0)
        status = jnp.where(~finite_b, Status.NONFINITE,
                           jnp.where(diverged, Status.DIVERGED, Status.CONVERGED))
        res = jnp.where(finite_b, res, jnp.inf)
        status = residual_status(res, b_norm, self.tol, status)
        steps = jnp.sum(ts, axis=0)
        rho = jnp.max(jnp.where(divs, ratios, 0.0), axis=0)
        stats = {
            "scale": jnp.broadcast_to(s, res.shape),
            "recommended_scale": jnp.where(diverged, self.safety * s * (1.0 + rho), s),
            "lambda_max": jnp.broadcast_to(state["lambda_max"], res.shape),
            "products": (steps * min(self.batch_size, n) / n + 1.0).astype(dtype),
            "depth_reached": jnp.min(ts, axis=0),
            "relative_residual": relative(res, b_norm),
        }
        return Solution(jax.vmap(unravel)(x), res, steps + 1, status == Status.CONVERGED, status, stats)


def lissa(*, scale=None, depth: int = 1000, samples: int = 1, batch_size: int = 128, key=None,
          safety: float = 1.1, scale_iterations: int = 20, scale_batches: int = 4,
          scale_examples: int | None = 8192, tol: float | None = None) -> LiSSA:
    """Stochastic Neumann-series solver (see module docstring); returns a :class:`LiSSA` value.

    Args:
      scale: ``S``; ``None`` estimates it automatically in ``prepare`` (recommended).
      depth: recursion steps per sample.
      samples: independent recursions averaged.
      batch_size: examples per minibatch operator (capped at ``N``; ``N`` = exact
        deterministic Neumann series).
      key: PRNG key for minibatches and the scale estimate (default ``PRNGKey(0)``).
      safety: ``S = safety * lambda_max`` estimate when ``scale=None``.
      scale_iterations, scale_batches: Lanczos steps per estimate and number of minibatch
        operators probed for the scale.
      scale_examples: the estimate "on the full operator" uses a random subset of this
        many examples when ``N`` is larger (``None``: always all ``N``). Without the cap
        the estimate costs ``scale_iterations`` full passes over the data, more than the
        whole recursion once ``N`` exceeds ``depth * batch_size / scale_iterations``; the
        top eigenvalue of a random subset's curvature is typically at least the full one's
        (safe for stability), and the minibatch probes bound it from above as well.
      tol: a solve is ``CONVERGED`` only when its true relative residual is ``<= tol``
        (default :data:`DEFAULT_TOL` = 1e-2); above it the status is ``MAX_STEPS`` (raise
        ``depth`` and ``samples``, add damping, or use cg).
    """
    for name, v in (("depth", depth), ("samples", samples), ("batch_size", batch_size),
                    ("scale_iterations", scale_iterations)):
        check_int(v, f"lissa: {name}", minimum=1)
    check_int(scale_batches, "lissa: scale_batches", minimum=0)
    check_int(scale_examples, "lissa: scale_examples", minimum=1, allow_none=True)
    if scale is not None:
        scale = float(scale)
        if not scale > 0 or scale == float("inf"):
            raise InputError(f"lissa: scale must be finite and > 0 (or None for automatic), got {scale}")
    if not float(safety) >= 1.0:
        raise InputError(f"lissa: safety must be >= 1, got {safety}")
    tol = DEFAULT_TOL if tol is None else float(tol)
    if not tol > 0:
        raise InputError(f"lissa: tol must be > 0, got {tol}")
    return LiSSA(scale=scale, depth=int(depth), samples=int(samples), batch_size=int(batch_size),
                 key=key_tuple(key), safety=float(safety), scale_iterations=int(scale_iterations),
                 scale_batches=int(scale_batches),
                 scale_examples=None if scale_examples is None else int(scale_examples), tol=tol)
