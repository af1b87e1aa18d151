"""Metagradients: exact attribution of a training run by differentiating through it.

The training run of :func:`influx.models.train` is replayed with a weight ``w_i`` on
every training example. Step ``k`` minimises, on its batch ``b_k`` (all ``N`` examples for
full batch, ``B`` rows of the seeded schedule otherwise),

    J_k(theta; w) = (1/|b_k|) sum_{i in b_k} w_i L(z_i, theta) + l2/2 ||theta||^2,

    g_k = grad_theta J_k(theta_k; w),   (u_k, s_{k+1}) = opt.update(g_k, s_k, theta_k),
    theta_{k+1} = theta_k + u_k,

from ``theta_0 = init_params`` and ``s_0 = opt.init(theta_0)`` for ``steps`` steps. With
``w = 1`` this is exactly ``models.train`` (same optimizer, steps, minibatch order and
seed; a test checks the replay reproduces its parameters). The metagradient score is

    score[t, m] = - d f_t(theta_T(w)) / d w_m   at w = 1,

the first-order predicted change of the test measurement ``f_t`` when ``m`` is removed
(``w_m: 1 -> 0``), in influx's sign and scale: for a strictly convex objective trained to
convergence it equals ``influx.influence(..., kind="hessian", damping=0)``
(``theta_T = argmin J(.; w)`` gives ``d theta / d w_m = -H^-1 grad L_m / N``). Unlike
influence it needs no convexity, convergence or iHVP: it is the exact derivative of the
run that produced the model (MAGIC, Ilyas & Engstrom 2025).

Computation: one reverse-mode pass through the compiled ``lax.scan`` of the run, with the
``n_test`` measurement cotangents batched (``vmap`` of the VJP): the forward replay and
its rematerialisation are shared, the backward pass carries ``n_test`` parameter-sized
cotangents. Each step has a hand-written reverse rule (:func:`_step_rev`): the cotangent
of ``theta_k`` gets ``H_k a`` and every example of the batch gets ``grad L_i^T a / |b_k|``
from one forward-over-reverse ``jax.linearize`` of the step's gradient (``H_k`` is
symmetric), so a step stores only ``(theta_k, s_k)`` -- not the activations of its
gradient, as JAX's reverse-over-reverse would. Memory is kept at ``O(sqrt(T))``
parameter (plus optimizer state) copies by rematerialisation: the ``T`` steps are split
into segments of ``S ~ sqrt(T)`` steps, each segment is a ``jax.checkpoint``-ed inner
scan, so the forward pass stores only the ``T / S`` segment-boundary states and the
backward pass recomputes one segment at a time (storing its ``S`` states). Cost in
gradient evaluations per step: 1 (forward) + 1 (remat recompute) + 1 (the backward
step's own gradient, recomputed) + one tangent pass per measurement; without remat the
second term goes. Measured (``benchmarks/attribution.py``, digits MLP with 2,410
parameters, XLA's compiled temp memory, minibatch 64, Adam, 8 cotangents): 5.8 MiB with
remat and 60 MiB without at ``T = 1024`` (11 and 228 MiB with JAX's own reverse mode
through the steps); full batch: 8.5 / 62 MiB (29 / 703 MiB before). Time: see the
benchmark's cost table (ratios to one training run).
"""

from __future__ import annotations

import math
import time
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from influx import validation as _validation
from influx.errors import InputError, SolveError
from influx.objective import Objective, check_data, tree_sqnorm
from influx.validation import boundary as _boundary
from influx.validation import check_int

__all__ = ["MetagradInfo", "metagradients", "minibatch_indices", "replay", "segment_length", "trajectory"]


# ------------------------------------------------------------------ the schedule
def minibatch_indices(n: int, *, batch_size: int, steps: int, seed=0) -> jax.Array:
    """``(steps, batch_size)`` training rows of each step: the schedule of ``models.train``.

    Uses ``influx.models.minibatch_indices`` when it exists (the one shared definition);
    otherwise the same code: per-epoch permutations from
    ``jax.random.split(jax.random.key(seed), ceil(steps * batch_size / n))``, concatenated
    and cut into ``steps`` consecutive batches.
    """
    from influx import models

    shared = getattr(models, "minibatch_indices", None)
    if shared is not None:
        return shared(n, batch_size=batch_size, steps=steps, seed=seed)
    key = seed if isinstance(seed, jax.Array) and jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key) \
        else jax.random.key(seed)
    n_epochs = -(-steps * batch_size // n)
    perms = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, n_epochs))
    return perms.reshape(-1)[: steps * batch_size].reshape(steps, batch_size)


def segment_length(steps: int, remat) -> int | None:
    """Segment length ``S`` for ``remat``: ``"sqrt"`` -> ``ceil(sqrt(steps))``; an int -> it
    (capped at ``steps``); ``"none"``/``None``/``False`` -> ``None`` (plain reverse mode)."""
    if remat is None or remat is False or remat == "none":
        return None
    if remat is True or remat == "sqrt":
        return max(1, math.isqrt(steps - 1) + 1) if steps > 1 else 1
    if isinstance(remat, (int, np.integer)) and not isinstance(remat, bool) and remat >= 1:
        return int(min(int(remat), steps))
    raise InputError(f"remat must be 'sqrt', 'none' or a segment length >= 1, got {remat!r}")


# ------------------------------------------------------------------ the replayed run
def _grad_and_losses(obj: Objective, p, wb, xb, yb):
    """``(grad_theta J_k(p; w), per-example losses)`` on the batch."""

    def J(q):
        per = obj.loss_fn(obj.apply_fn(q, xb), yb)
        return jnp.mean(wb * per) + 0.5 * obj.l2 * tree_sqnorm(q), per

    return jax.grad(J, has_aux=True)(p)


def _update(opt, g, s, p):
    upd, s = opt.update(g, s, p)
    return optax.apply_updates(p, upd), s


def _batch(x, y, ib):
    return (x, y) if ib is None else (_take(x, ib), _take(y, ib))


def _step(obj: Objective, opt, carry, wb, x, y, ib):
    """One training step ``(theta_k, s_k) -> (theta_{k+1}, s_{k+1})`` (plain autodiff)."""
    p, s = carry
    xb, yb = _batch(x, y, ib)
    return _update(opt, _grad_and_losses(obj, p, wb, xb, yb)[0], s, p)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _step_rev(obj: Objective, opt, p, s, wb, x, y, ib):
    """:func:`_step` with a hand-written reverse rule (same values and derivatives).

    With ``g = grad J_k(theta_k; w)`` and ``(theta_{k+1}, s_{k+1}) = U(g, s_k, theta_k)``
    (the optimizer update), the cotangents ``(a, c)`` of ``(theta_{k+1}, s_{k+1})`` pull
    back to

        (a_g, c_s, a_p) = U^T(a, c)           (VJP of the elementwise optimizer update),
        theta_k:  a_p + H_k a_g               (H_k = Hessian of J_k, symmetric),
        w_i:      (1/|b_k|) grad L_i(theta_k)^T a_g   for i in the batch,

    and both ``H_k a_g`` and the ``|b_k|`` directional derivatives ``grad L_i^T a_g`` are
    the tangent of ONE forward-over-reverse pass: ``jax.linearize`` of ``theta ->
    (grad J_k, (L_i)_i)`` at ``theta_k``, applied to ``a_g``. Autodiff of :func:`_step`
    instead runs reverse-over-reverse through the stored activations of the gradient;
    this rule stores only ``(theta_k, s_k)`` and the batch rows per step, recomputes the
    gradient once in the backward pass and was about 2x faster on the digits MLP
    (``benchmarks/attribution.py``). A test checks it against :func:`_step`'s autodiff.
    """
    return _step(obj, opt, (p, s), wb, x, y, ib)


def _step_rev_fwd(obj, opt, p, s, wb, x, y, ib):
    return _step(obj, opt, (p, s), wb, x, y, ib), (p, s, wb, x, y, ib)


def _step_rev_bwd(obj, opt, res, ct):
    p, s, wb, x, y, ib = res
    xb, yb = _batch(x, y, ib)
    (g, _), lin = jax.linearize(lambda q: _grad_and_losses(obj, q, wb, xb, yb), p)
    _, pull = jax.vjp(lambda g_, s_, p_: _update(opt, g_, s_, p_), g, s, p)
    ct_g, ct_s, ct_p = pull(ct)
    hv, dper = lin(ct_g)
    ct_p = jax.tree_util.tree_map(jnp.add, ct_p, hv)
    zeros = lambda t: jax.tree_util.tree_map(_zero_cotangent, t)
    return ct_p, ct_s, dper / wb.shape[0], zeros(x), zeros(y), zeros(ib)


def _zero_cotangent(a):
    a = jnp.asarray(a)
    if jnp.issubdtype(a.dtype, jnp.inexact):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, jax.dtypes.float0)


_step_rev.defvjp(_step_rev_fwd, _step_rev_bwd)


def _take(tree, idx):
    return jax.tree_util.tree_map(lambda a: a[idx], tree)


def _run(obj, opt, init, x, y, w, idx, *, steps: int, segment: int | None, rule: str = "autodiff"):
    """theta_T(w): the replayed training run (``idx`` None for full batch).

    ``rule="custom"``: steps with the hand-written reverse rule of :func:`_step_rev` (for
    reverse mode); ``"autodiff"``: plain steps (any transformation, e.g. ``jvp``).
    """

    def body(carry, ib):
        wb = w if idx is None else w[ib]
        ib = None if idx is None else ib
        if rule == "custom":
            return _step_rev(obj, opt, carry[0], carry[1], wb, x, y, ib), None
        return _step(obj, opt, carry, wb, x, y, ib), None

    xs = jnp.arange(steps) if idx is None else idx
    carry = (init, opt.init(init))
    if segment is None:
        carry, _ = jax.lax.scan(body, carry, xs)
        return carry[0]

    @jax.checkpoint
    def run_segment(c, seg_xs):
        return jax.lax.scan(body, c, seg_xs)[0]

    n_seg, rem = divmod(steps, segment)
    full = jax.tree_util.tree_map(lambda a: a[: n_seg * segment].reshape((n_seg, segment) + a.shape[1:]), xs)
    carry, _ = jax.lax.scan(lambda c, sx: (run_segment(c, sx), None), carry, full)
    if rem:
        carry = run_segment(carry, jax.tree_util.tree_map(lambda a: a[n_seg * segment:], xs))
    return carry[0]


@partial(jax.jit, static_argnames=("obj", "opt", "steps", "batch_size", "segment"))
def _replay_jit(init, x, y, w, key, *, obj, opt, steps, batch_size, segment):
    n = jax.tree_util.tree_leaves(x)[0].shape[0]
    idx = None if batch_size is None else minibatch_indices(n, batch_size=batch_size, steps=steps, seed=key)
    return _run(obj, opt, init, x, y, w, idx, steps=steps, segment=segment)


@partial(jax.jit, static_argnames=("obj", "opt", "f", "steps", "batch_size", "segment", "rule"))
def _metagrad_jit(init, x, y, test, w, key, cot, *, obj, opt, f, steps, batch_size, segment, rule="custom"):
    n = jax.tree_util.tree_leaves(x)[0].shape[0]
    idx = None if batch_size is None else minibatch_indices(n, batch_size=batch_size, steps=steps, seed=key)

    def measure(wv):
        theta = _run(obj, opt, init, x, y, wv, idx, steps=steps, segment=segment, rule=rule)
        return jax.vmap(lambda ex: f(theta, ex))(test), theta

    vals, pull, theta = jax.vjp(measure, w, has_aux=True)
    (jac,) = jax.vmap(pull)(cot.astype(vals.dtype))
    return theta, vals, jac


# ------------------------------------------------------------------ checks
def _check_optimizer(opt):
    if not (hasattr(opt, "init") and hasattr(opt, "update")):
        raise InputError(f"optimizer must be an optax GradientTransformation, got {type(opt).__name__}")
    try:
        hash(opt)
    except TypeError as e:
        raise InputError("optimizer must be hashable (optax transformations are)") from e
    return opt


def _check_batch_size(batch_size, n: int):
    if batch_size is None:
        return None
    if (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
            or not 1 <= batch_size <= n):
        raise InputError(f"batch_size must be None or an integer in [1, {n}], got {batch_size!r}")
    return None if batch_size == n else int(batch_size)


def _float_dtype(params):
    dts = [jnp.result_type(l) for l in jax.tree_util.tree_leaves(params)
           if jnp.issubdtype(jnp.result_type(l), jnp.floating)]
    if not dts:
        raise InputError("init_params has no floating-point leaves")
    return jnp.result_type(*dts)


def _check_params(init_params):
    leaves = jax.tree_util.tree_leaves(init_params)
    if not leaves:
        raise InputError("init_params is an empty pytree")
    for i, leaf in enumerate(leaves):
        a = np.asarray(leaf)
        if jnp.issubdtype(a.dtype, jnp.inexact) and not np.all(np.isfinite(a)):
            raise InputError(f"init_params: leaf {i} (shape {a.shape}) contains NaN or inf")


def _check_weights(weights, n: int, dtype):
    if weights is None:
        return jnp.ones((n,), dtype)
    w = np.asarray(weights)
    if w.shape != (n,):
        raise InputError(f"weights must have shape (n_train={n},), got {w.shape}")
    if not np.issubdtype(w.dtype, np.number) or not np.all(np.isfinite(w)):
        raise InputError("weights must be finite real numbers")
    return jnp.asarray(w, dtype)


def _replay_mismatch(theta, params) -> tuple[float, str]:
    """Worst relative difference ``||theta - params|| / ||params||`` over leaves, and where."""
    p_def, t_def = jax.tree_util.tree_structure(params), jax.tree_util.tree_structure(theta)
    if p_def != t_def:
        raise InputError("params: pytree structure differs from init_params.\n"
                         f"  init: {t_def}\n  params: {p_def}")
    worst, where = 0.0, ""
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, p), t in zip(paths, jax.tree_util.tree_leaves(theta)):
        p, t = np.asarray(p, np.float64), np.asarray(t, np.float64)
        if p.shape != t.shape:
            raise InputError(f"params{jax.tree_util.keystr(path)}: shape {p.shape}, the run gives {t.shape}")
        rel = float(np.linalg.norm(t - p) / max(np.linalg.norm(p), np.finfo(np.float64).tiny))
        if not np.isfinite(rel) or rel > worst:
            worst, where = rel, jax.tree_util.keystr(path)
            if not np.isfinite(rel):
                break
    return worst, where


# ------------------------------------------------------------------ public functions
def replay(obj: Objective, init_params, train, weights=None, *, optimizer, steps: int,
           batch_size: int | None = None, seed=0, remat="none"):
    """The weighted training run ``theta_T(w)`` (module docstring), compiled.

    ``weights=None`` is ``w = 1``: then the result is ``influx.models.train``'s parameters
    for the same ``optimizer``, ``steps``, ``batch_size`` and ``seed`` (to float rounding).
    Cost: ``steps`` gradients on the batch.
    """
    if not isinstance(obj, Objective):
        raise InputError(f"obj must be an influx.Objective, got {type(obj).__name__}")
    _check_params(init_params)
    n = check_data(obj, init_params, train, name="train")
    steps = check_int(steps, "steps", minimum=1)
    batch_size = _check_batch_size(batch_size, n)
    opt = _check_optimizer(optimizer)
    w = _check_weights(weights, n, _float_dtype(init_params))
    x, y = jax.tree_util.tree_map(jnp.asarray, tuple(train))
    return _replay_jit(init_params, x, y, w, jax.random.key(seed), obj=obj, opt=opt, steps=steps,
                       batch_size=batch_size, segment=segment_length(steps, remat))


@partial(jax.jit, static_argnames=("obj", "opt", "steps", "batch_size", "every"))
def _trajectory_jit(init, x, y, key, *, obj, opt, steps, batch_size, every):
    n = jax.tree_util.tree_leaves(x)[0].shape[0]
    w = jnp.ones((n,), _float_dtype(init))
    idx = None if batch_size is None else minibatch_indices(n, batch_size=batch_size, steps=steps, seed=key)
    xs = jnp.arange(steps) if idx is None else idx

    def body(carry, ib):
        if idx is None:
            return _step(obj, opt, carry, w, x, y, None), None
        return _step(obj, opt, carry, w[ib], x, y, ib), None

    def segment(c, sx):
        c = jax.lax.scan(body, c, sx)[0]
        return c, c[0]

    k = steps // every
    full = jax.tree_util.tree_map(lambda a: a[: k * every].reshape((k, every) + a.shape[1:]), xs)
    carry, stacked = jax.lax.scan(segment, (init, opt.init(init)), full)
    if steps > k * every:
        carry = jax.lax.scan(body, carry, jax.tree_util.tree_map(lambda a: a[k * every:], xs))[0]
    return stacked, carry[0]


def trajectory(obj: Objective, init_params, train, *, optimizer, steps: int, every: int,
               batch_size: int | None = None, seed=0) -> list:
    """Checkpoints of the run (``w = 1``): parameters after steps ``every, 2 every, ...`` and
    after the last step (``steps``), as a list of pytrees (for TracIn). Cost: one run."""
    if not isinstance(obj, Objective):
        raise InputError(f"obj must be an influx.Objective, got {type(obj).__name__}")
    _check_params(init_params)
    n = check_data(obj, init_params, train, name="train")
    steps = check_int(steps, "steps", minimum=1)
    every = min(check_int(every, "every", minimum=1), steps)
    batch_size = _check_batch_size(batch_size, n)
    opt = _check_optimizer(optimizer)
    x, y = jax.tree_util.tree_map(jnp.asarray, tuple(train))
    stacked, last = _trajectory_jit(init_params, x, y, jax.random.key(seed), obj=obj, opt=opt, steps=steps,
                                    batch_size=batch_size, every=every)
    k = steps // every
    out = [jax.tree_util.tree_map(lambda a, i=i: a[i], stacked) for i in range(k)]
    if steps > k * every:
        out.append(last)
    return out


class MetagradInfo(NamedTuple):
    """Diagnostics of :func:`metagradients`.

    params: the replayed final parameters ``theta_T(1)``. measurements: ``(n_test,)``
    ``f_t(theta_T)``. failed: ``(n_test,)`` bool, rows with non-finite values (NaN rows
    under ``on_failure="nan"``). replay_error: worst relative difference of the replay
    against the given ``params`` (``None`` if not given). segment_length, n_segments:
    the rematerialisation (``None``, 1 for plain reverse mode). seconds: wall time.
    """

    params: Any
    measurements: np.ndarray
    failed: np.ndarray
    replay_error: float | None
    segment_length: int | None
    n_segments: int
    steps: int
    batch_size: int | None
    seconds: float


def _check_replay(theta, params, rtol: float, run: str) -> float:
    """The replay's relative difference from ``params``; :class:`InputError` above ``rtol``."""
    error, where = _replay_mismatch(theta, params)
    if not error <= rtol:
        raise InputError(
            f"metagradients: replaying the training run ({run}) from init_params does not "
            f"reproduce params: relative difference {error:.3g} at params{where} "
            f"(tolerance {rtol:.3g}). Pass the run's exact settings and initialisation.")
    return error


def _failed_rows(scores, vals, theta, on_failure: str) -> np.ndarray:
    """The failure policy: rows with a non-finite score or measurement, or all rows when
    ``theta_T`` is not finite; raises :class:`SolveError` (``"raise"``) or sets them to NaN
    in ``scores`` (``"nan"``). Returns the boolean mask."""
    theta_ok = all(bool(np.all(np.isfinite(np.asarray(l)))) for l in jax.tree_util.tree_leaves(theta))
    failed = ~np.all(np.isfinite(scores), axis=1) | ~np.isfinite(vals) | (not theta_ok)
    if failed.any():
        if on_failure == "raise":
            cause = ("the training run itself diverged (non-finite final parameters)" if not theta_ok else
                     "non-finite values in the backward pass")
            raise SolveError(
                f"metagradients: {int(failed.sum())} of {len(failed)} test rows are not finite: {cause}. "
                "With Adam, a gradient entry that is exactly zero makes d sqrt(nu) infinite: use "
                "optax.adam(lr, eps_root=1e-16); otherwise lower the learning rate or use float64. "
                "on_failure='nan' returns NaN rows instead.")
        scores[failed] = np.nan
    return failed


@_boundary
def metagradients(obj: Objective, init_params, train, test, *, optimizer, steps: int,
                  batch_size: int | None = None, seed=0, measurement=None, remat="sqrt",
                  params=None, params_rtol: float | None = None, test_batch_size: int | None = None,
                  on_failure: str = "raise", return_info: bool = False):
    """Metagradient scores ``(n_test, n_train)``: ``score[t, m] = -d f_t(theta_T(w)) / d w_m``
    at ``w = 1`` (module docstring), exact through the whole training run.

    Args:
      obj: the objective; its ``l2`` is the weight decay of the training run.
      init_params: ``theta_0``, the initialisation the run started from.
      train: ``(x, y)`` training data (``N`` examples). test: ``(x, y)`` test data, or
        ``(x, None)`` for a label-free measurement.
      optimizer, steps, batch_size, seed: the run, as given to ``influx.models.train``
        (``batch_size=None`` or ``N``: full batch; else its seeded minibatch schedule).
      measurement: ``None`` (test loss), an ``influx.measurements`` value, or a callable
        ``f(params, (x_t, y_t)) -> scalar``.
      remat: ``"sqrt"`` (default): segments of ``ceil(sqrt(steps))`` steps under
        ``jax.checkpoint``, memory ``~ 2 sqrt(T)`` copies of (params, optimizer state) plus
        one segment's activations, cost one extra forward replay; an int: that segment
        length; ``"none"``: plain reverse mode, memory ``~ T`` copies of the per-step
        residuals (parameters, optimizer state and batch activations).
      params: the trained parameters, to check the replay against (``InputError`` naming
        the worst leaf if ``||theta_T - params|| > params_rtol ||params||``; default
        ``params_rtol`` 1e-6 for float64, 1e-3 for float32 -- float32 runs differ in
        rounding after many steps).
      test_batch_size: test measurements per reverse pass (default: all ``n_test`` in one
        pass). Each pass replays the forward run again.
      on_failure: ``"raise"``: ``SolveError`` if a row has a non-finite value; ``"nan"``:
        those rows are NaN, listed in ``info.failed``.
      return_info: also return a :class:`MetagradInfo`.

    Cost per reverse pass: the forward replay (``T`` batch gradients), its
    rematerialisation (another ``T``; none with ``remat="none"``) and ``T`` backward steps,
    each one gradient recomputed plus one forward-over-reverse tangent pass (a
    Hessian-vector product and the batch's per-example directional derivatives) per test
    measurement, vmapped: the backward part grows with ``n_test``, not with ``N``.

    Failure modes: Adam's ``sqrt(nu)`` has an infinite derivative where a gradient entry is
    exactly zero (unused parameters, dead ReLUs): the backward pass then gives NaN, reported
    as a ``SolveError``; ``optax.adam(lr, eps_root=1e-16)`` makes it differentiable.
    A diverging run (non-finite ``theta_T``) fails every row.

    (Over 80 lines only by this docstring: about 50 lines of code.)
    """
    from influx.measurements import bind as _bind_measurement
    from influx.measurements import check as _check_measurement

    t0 = time.perf_counter()
    if not isinstance(obj, Objective):
        raise InputError(f"obj must be an influx.Objective, got {type(obj).__name__}")
    _validation.check_on_failure(on_failure, allowed=("raise", "nan"))
    _check_params(init_params)
    n = check_data(obj, init_params, train, name="train")
    n_test = _validation.check_test(obj, init_params, test)
    steps = check_int(steps, "steps", minimum=1)
    batch_size = _check_batch_size(batch_size, n)
    opt = _check_optimizer(optimizer)
    seg = segment_length(steps, remat)
    f = _bind_measurement(obj, measurement)
    test = tuple(test)
    _check_measurement(f, init_params, test)
    chunk = n_test if test_batch_size is None else check_int(test_batch_size, "test_batch_size", minimum=1)
    chunk = min(chunk, n_test)
    dtype = _float_dtype(init_params)
    if params_rtol is None:
        params_rtol = 1e-6 if jnp.finfo(dtype).bits >= 64 else 1e-3
    if params is not None:
        _replay_mismatch(init_params, params)  # structure and shapes, before the heavy work

    x, y = jax.tree_util.tree_map(jnp.asarray, tuple(train))
    test = jax.tree_util.tree_map(jnp.asarray, test)
    w = jnp.ones((n,), dtype)
    key = jax.random.key(seed)
    eye = np.eye(n_test)
    rows, vals, theta = [], [], None
    for a in range(0, n_test, chunk):
        cot = np.zeros((chunk, n_test))
        b = min(a + chunk, n_test)
        cot[: b - a] = eye[a:b]
        theta, v, jac = _metagrad_jit(init_params, x, y, test, w, key, jnp.asarray(cot), obj=obj, opt=opt,
                                      f=f, steps=steps, batch_size=batch_size, segment=seg)
        if a == 0:
            run = (f"optimizer={optimizer!r}, steps={steps}, batch_size={batch_size}, seed={seed}, "
                   f"l2={obj.l2}")
            replay_error = None if params is None else _check_replay(theta, params, params_rtol, run)
            vals = np.asarray(v)
        rows.append(np.asarray(jac)[: b - a])
    jac = np.concatenate(rows, axis=0)
    scores = -jac
    failed = _failed_rows(scores, vals, theta, on_failure)
    if not return_info:
        return scores
    n_seg = 1 if seg is None else -(-steps // seg)
    info = MetagradInfo(params=theta, measurements=vals, failed=failed, replay_error=replay_error,
                        segment_length=seg, n_segments=n_seg, steps=steps, batch_size=batch_size,
                        seconds=time.perf_counter() - t0)
    return scores, info

