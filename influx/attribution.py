"""Influence scores: pairwise, self and group influence, measurements, baselines.

Sign and scale (the contract of :mod:`influx`): the score of training example ``m`` on a
measurement ``f`` is the predicted change of ``f`` when ``m`` is **removed** from the
training set (an up-weighting by ``eps = -1/N``), to first order::

    score[t, m] = (1/N) grad f_t(theta_s)^T (C + (l2 + damping) I)^-1 grad L(z_m, theta_s)
                ~= f_t(theta without m) - f_t(theta_s).

``C`` is the Gauss-Newton matrix (``kind="gnh"``) or the Hessian (``kind="hessian"``) of
the mean training loss, ``L(z_m, .)`` the per-example training loss (no weight decay) and
``f_t`` the measurement on test example ``t`` (default: its loss). Positive: removing
``m`` raises ``f_t`` -- for the test loss, ``m`` was *helpful*; negative: harmful.

How it is computed (:func:`influence`):

1. and 2., the test side, with one solver state (``solver.prepare`` once): for each batch of
   test examples, ``grad f_t`` (a ``vmap(grad)``) and ``s_t = A^-1 grad f_t`` (``solver.apply``
   batched), written into one ``n_test``-row answer; only the ``s_t`` are kept (one
   ``n_test x P`` copy plus one batch, never all gradients and all answers at once);
3. every training example is scored against every ``s_t`` in chunks of ``chunk_size``:

   * ``method="jvp"``: ``grad L(z_m)^T s_t`` is the directional derivative of the
     per-example loss vector along ``s_t``: one ``jax.jvp`` of the ``(chunk,)`` loss
     vector per test vector (vmapped, forward pass shared). No per-example gradients;
     cost ~ ``n_test`` forward-mode passes per chunk, memory ~ one chunk of activations
     per test vector.
   * ``method="per_example"``: per-example gradients (``vmap(grad)``, ``PER_EXAMPLE_BATCH``
     examples at a time) contracted leaf by leaf with the ``s_t``. Cost ~ a
     per-example-gradient pass (~20 tangent passes on CPU) plus ``2 n_test P`` flops
     per example; memory ``PER_EXAMPLE_BATCH x P``.
   * ``method="auto"``: :func:`choose_method` (a cost rule from the forward flops per
     example: JVP while the test vectors are few).

Measurements (:data:`measurements`): ``loss()`` (default), ``margin()``, ``logit(k)``,
or any callable ``f(params, example) -> scalar`` where ``example = (x_t, y_t)`` is one
test example *without* a leading axis (``apply_fn`` needs ``x_t[None]``).

Baselines with the same call shape: :func:`grad_dot` (identity curvature) and
:func:`tracin` (sum of gradient dot products over checkpoints).

Memory: every pass works in chunks bounded by ``memory_budget`` (bytes; default
:func:`influx._memory.default_budget`, a quarter of the available memory; on a CPU host at
most 256 MiB, and at most the larger of 64 MiB and 16 per-example gradients): the test
gradients, the solver's preparation (EK-FAC's factor passes get their own *fit* chunk),
the curvature products, and the scoring of the training set (at most ``chunk_size``
examples per step, fewer when the step's program -- its peak bytes
estimated from shapes, :func:`influx._memory.peak_bytes` -- would not fit). Nothing
``N x P`` or ``P x P`` is formed unless the solver is a dense one (``direct``), which
refuses a matrix that does not fit before allocating it. A budget too small for one
example raises :class:`influx.errors.ResourceError` naming both sizes. ``progress=True``
shows bars for the fit (EK-FAC), the solves and the scoring.

Errors, never a plausible number: the inputs are validated once, at the public entry
point, before any heavy work (:class:`influx.errors.InputError`); a solve that did not
converge (its true residual above the solver's ``tol``, negative curvature, a failed
factorisation, ...) raises :class:`influx.errors.SolveError` naming the failure and the
fix, or, with ``on_failure="nan"``, gives NaN in the rows that depend on it and their
status in :class:`InfluenceInfo`. A failed solve is never scored as 0.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from influx import _memory, _progress, _xla
from influx import curvature as _curvature
from influx import validation as _validation
from influx._xla import jit
from influx.errors import InputError, ResourceError
from influx.measurements import Measurement, measurements
from influx.measurements import bind as _bind_measurement
from influx.measurements import check as _check_measurement
from influx.objective import Objective, check_data, num_examples
from influx.solvers import saved as _saved
from influx.solvers._base import (
    STOPPED_SHORT,
    Solution,
    Solver,
    compiled,
    failed_rows,
    masked_rows,
    nan_rows,
)
from influx.validation import boundary as _boundary
from influx.validation import check_test as _check_test

__all__ = [
    "Measurement",
    "measurements",
    "InfluenceInfo",
    "influence",
    "self_influence",
    "group_influence",
    "grad_dot",
    "tracin",
    "choose_method",
    "forward_flops",
    "solve_test_vectors",
    "default_solver",
]

METHODS = ("auto", "jvp", "per_example")

# Cost rule (see :func:`choose_method`), calibrated on CPU by benchmarks/scoring.py (MLP
# 784-256-10 and a 28x28 CNN): a per-example-gradient pass costs about this many JVP passes ...
PER_EXAMPLE_OVERHEAD = 20
# ... and contracting gradients with test vectors (a GEMM) runs this much faster per flop
# than a tangent pass (measured ~1.6x): the 2P flops per test vector count as 0.6 x 2P.
CONTRACTION_FACTOR = 0.6
# ... and, when the forward cost per example is unknown, JVP is used up to this many vectors.
JVP_MAX_TEST = 32
# The per-example path never holds more than PER_EXAMPLE_BATCH x P gradients; above this
# many bytes for that block it is not used.
PER_EXAMPLE_MAX_BYTES = 1 << 30
# Per-example gradients are formed this many examples at a time inside a chunk (a model
# with convolutions on the CPU: the whole chunk at once, see per_example_block).
PER_EXAMPLE_BATCH = 16


# ------------------------------------------------------------------ options and solver
def default_solver(params=None) -> Solver:
    """The default iHVP solver: conjugate gradients, block CG for batches.

    ``influx.solvers.cg(tol=1e-8, block=True)`` for float64 parameters, ``tol=1e-4`` for
    float32 and narrower (float32 CG cannot reach much below ``1e-5`` relative residual on
    ill-conditioned curvature; asking for more wastes steps or drifts). ``block=True``
    solves the test gradients of one call together in one shared Krylov space; a single
    right-hand side is plain CG. Equal parameters dtypes give equal solvers (and so shared
    compiled programs).
    """
    from influx.solvers import cg

    wide = params is not None and _itemsize(params) >= 8
    return cg(tol=1e-8 if wide else 1e-4, max_steps=1000, block=True)


ON_FAILURE = _validation.ON_FAILURE
# the failure policy (solvers/_base.py): shared with influx.ihvp
_STOPPED_SHORT = STOPPED_SHORT
_failed_rows, _nan_rows = failed_rows, nan_rows


def _upcast_params(params):
    """float16/bfloat16 parameters -> float32, with a warning (solves in half precision fail
    in LAPACK and lose all accuracy in CG)."""
    leaves = jax.tree_util.tree_leaves(params)
    narrow = {str(jnp.result_type(l)) for l in leaves
              if jnp.issubdtype(jnp.result_type(l), jnp.floating) and jnp.finfo(jnp.result_type(l)).bits < 32}
    if not narrow:
        return params
    warnings.warn(f"parameters in {', '.join(sorted(narrow))}: influx computes influence in float32 "
                  "(half-precision solves are not accurate enough); scores are float32",
                  UserWarning, stacklevel=_user_stacklevel())
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float32) if jnp.issubdtype(jnp.result_type(a), jnp.floating)
        and jnp.finfo(jnp.result_type(a)).bits < 32 else a, params)


def _n_params(params) -> int:
    return sum(int(np.size(l)) for l in jax.tree_util.tree_leaves(params))


def choose_method(n_test: int, n_params: int, *, itemsize: int = 4,
                  flops_per_example: float | None = None) -> str:
    """The cost rule of ``method="auto"``: ``"jvp"`` or ``"per_example"``.

    Per training example, with ``F`` the forward flops per example and ``P`` parameters:

    * JVP path: one tangent pass per test vector, ~``n_test * F`` (the primal is shared);
    * per-example path: one per-example gradient, ~``PER_EXAMPLE_OVERHEAD * F`` (20 on
      CPU), plus the contraction with the test vectors, ``2 P n_test`` flops of GEMM, which
      runs faster per flop (``CONTRACTION_FACTOR = 0.6`` tangent-pass flops each),

    so the per-example path is chosen when
    ``n_test (1 - CONTRACTION_FACTOR * 2P / F) > PER_EXAMPLE_OVERHEAD``. Dense layers have
    ``F ~ 2P`` (each weight used once per example): per-example from ~50 test vectors
    (``benchmarks/scoring.py``); convolutions reuse weights (``F >> P``): from ~20.
    ``flops_per_example`` comes from XLA's cost analysis of ``apply_fn`` on one example
    (:func:`forward_flops`); when it is unknown the rule is ``n_test > JVP_MAX_TEST``. Never
    per-example when its ``PER_EXAMPLE_BATCH x P`` gradient block would exceed
    ``PER_EXAMPLE_MAX_BYTES``.
    """
    if PER_EXAMPLE_BATCH * n_params * itemsize > PER_EXAMPLE_MAX_BYTES:
        return "jvp"
    if n_test <= PER_EXAMPLE_OVERHEAD:
        return "jvp"
    if flops_per_example is None or not flops_per_example > 0:
        return "per_example" if n_test > JVP_MAX_TEST else "jvp"
    gain = 1.0 - CONTRACTION_FACTOR * 2.0 * n_params / float(flops_per_example)
    return "per_example" if n_test * gain > PER_EXAMPLE_OVERHEAD else "jvp"


def forward_flops(obj: Objective, params, x) -> float | None:
    """Forward flops per example of ``apply_fn`` from XLA's cost analysis (``None`` if unknown).

    Lowers ``apply_fn`` on one example of ``x`` (no compilation, no execution).
    """
    x1 = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((1,) + tuple(np.shape(a))[1:],
                                                               jnp.result_type(a)), x)
    try:
        ca = jax.jit(obj.apply_fn).lower(params, x1).cost_analysis()
        if isinstance(ca, (list, tuple)):
            ca = ca[0] if ca else None
        flops = None if ca is None else ca.get("flops")
        return float(flops) if flops is not None and flops > 0 else None
    except Exception:  # noqa: BLE001 -- cost analysis is best effort
        return None


def _itemsize(params) -> int:
    leaves = jax.tree_util.tree_leaves(params)
    return max((jnp.result_type(l).itemsize for l in leaves), default=4)


# ------------------------------------------------------------------ test side
@functools.partial(jit, static_argnames=("f", "batch_size"))
def _measurement_grads(f, params, test, *, batch_size):
    return _curvature.even_map(lambda ex: jax.grad(f)(params, ex), test, batch_size=batch_size)


def _first(tree, lead=None):
    """The shapes of one example of a batched pytree (no leading axis; ``lead``: a leading
    axis of this length), as ``ShapeDtypeStruct``s: no slicing program runs."""
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(((lead,) if lead else ()) + tuple(np.shape(a))[1:],
                                       jnp.result_type(a)), tree)


def _structs(key, lead=()):
    treedef, leaves = key
    return jax.tree_util.tree_unflatten(treedef, [jax.ShapeDtypeStruct(tuple(lead) + s, jnp.dtype(d))
                                                  for s, d in leaves])


@functools.lru_cache(maxsize=64)
def _grad_bytes(f, params_key, example_key):
    """``c -> (peak bytes, shapes)`` of ``c`` measurement gradients (one trace for every ``c``)."""
    return _memory.sized(lambda p, t: jax.vmap(lambda ex: jax.grad(f)(p, ex))(t),
                         lambda c: (_structs(params_key), _structs(example_key, (c,))))


@functools.lru_cache(maxsize=256)
def _grad_batch(f, params_key, example_key, limit, budget) -> int:
    """Test examples per step of the measurement gradients within ``budget`` bytes."""
    at = _grad_bytes(f, params_key, example_key)
    return _memory.chunk_size_for(lambda c: at(c)[0], budget=budget, limit=limit, what="test gradients")


def _test_grads(f, params, test, *, chunk_size, budget):
    """``grad f_t`` for every test example, ``min(chunk_size, what the budget allows)`` at a time
    (all ``n_test x P`` of them at once: :func:`_solve_queries` forms them batch by batch)."""
    n_test = num_examples(test[0], name="test inputs")
    batch = _grad_batch(f, _memory.shape_key(params), _memory.shape_key(_first(test)),
                        min(chunk_size, n_test), _memory.resolve_budget(budget, params=params))
    return _measurement_grads(f, params, test, batch_size=batch)


def _solve_batch(solver, state, op, row, *, limit, budget) -> int:
    """Right-hand sides per ``apply_many`` program: ``limit``, or fewer when the program's
    peak beyond its inputs (shapes only) would exceed ``budget`` (at least one); ``row``: one
    right-hand side (a pytree like the parameters, without the leading axis). Cached per
    solver value and shapes, as the other chunk sizes here."""
    return _solve_batch_for(solver, _memory.shape_key(state), _memory.shape_key(op), _memory.shape_key(row),
                            limit, _memory.resolve_budget(budget, params=row))


@functools.lru_cache(maxsize=64)
def _solve_batch_for(solver, state_key, op_key, row_key, limit, budget) -> int:
    at = _memory.sized(lambda st, o, bb: type(solver).apply_many(solver, st, o, bb),
                       lambda k: (_structs(state_key), _structs(op_key), _structs(row_key, (k,))))
    try:
        return _memory.chunk_size_for(lambda k: at(k)[0], budget=budget, limit=limit,
                                      what=f"solves ({solver.name})")
    except ResourceError:  # one right-hand side is the smallest unit (its vectors exist anyway)
        return 1


def _query_batch(f, solver, state, op, params, test, *, limit, budget) -> int:
    """Test examples per step of :func:`_solve_queries` (their gradients, then their solves):
    ``limit``, or fewer when the step's peak -- the ``k x P`` gradients it forms, the solve's
    answers and temporaries, beyond the parameters, state, operator and test examples it is
    given (shapes only) -- would exceed ``budget`` (at least one)."""
    return _query_batch_for(f, solver, _memory.shape_key(state), _memory.shape_key(op),
                            _memory.shape_key(params), _memory.shape_key(_first(test)), limit,
                            _memory.resolve_budget(budget, params=params))


@functools.lru_cache(maxsize=64)
def _query_batch_for(f, solver, state_key, op_key, params_key, example_key, limit, budget) -> int:
    grad_batch = _grad_batch(f, params_key, example_key, limit, budget)

    def step(p, st, o, t):
        k = num_examples(t[0])
        g = _curvature.even_map(lambda ex: jax.grad(f)(p, ex), t, batch_size=min(grad_batch, k))
        return type(solver).apply_many(solver, st, o, g)

    at = _memory.sized(step, lambda k: (_structs(params_key), _structs(state_key), _structs(op_key),
                                        _structs(example_key, (k,))))
    try:
        return _memory.chunk_size_for(lambda k: at(k)[0], budget=budget, limit=limit,
                                      what=f"solves ({solver.name})")
    except ResourceError:  # one test example is the smallest unit
        return 1


@functools.partial(jit, static_argnums=1)
def _rows_like(tree, n: int):
    """Zeros with ``n`` rows and the row shape and dtype of every leaf (one program)."""
    return jax.tree_util.tree_map(lambda a: jnp.zeros((n,) + a.shape[1:], a.dtype), tree)


@functools.partial(jit, donate_argnums=0)
def _write_rows(out, start, x):
    """``out[start:start + len(x)] = x`` leaf by leaf, in place (``out`` is donated: no copy of
    the ``n_test x P`` answers per batch)."""
    return jax.tree_util.tree_map(
        lambda o, v: jax.lax.dynamic_update_slice_in_dim(o, v.astype(o.dtype), start, 0), out, x)


def _join_rows(parts):
    """Batched pytrees of host arrays (``None`` leaves allowed) concatenated along the leading axis."""
    return jax.tree_util.tree_map(lambda *a: np.concatenate(a), *parts)


def _solve_queries(f, params, test, solver, state, op, *, batch, grad_batch, progress=False, host=False):
    """``s_t = A^-1 grad f_t`` for every test example (a batched :class:`Solution`), ``batch``
    test examples at a time: per batch the measurement gradients (``grad_batch`` at a time in
    a ``lax.map``), their ``solver.apply_many`` (one compiled program per solver value,
    operator structure and batch shape; ``host``: the solver's own host-driven
    ``apply_batch``), and the answers written in place into one preallocated ``n_test``-row
    pytree. Only the answers are kept: the peak is one ``n_test x P`` copy plus one batch's
    gradients and solve, never all ``n_test`` gradients. Each batch is finished before the
    next starts (asynchronous dispatch would keep several batches alive), with a bar when
    ``progress`` asks.

    Batches are ``[0, batch), [batch, 2 batch), ...`` (block CG shares a Krylov space within
    a batch, so the partition is part of the result). A short last batch is solved as a
    full-size window over the last ``batch`` rows (one gradient, one solve and one write
    program for every batch; the few rows solved twice cost less than compiling the solve a
    second time, 2-5 s on the models of ``benchmarks/models.py``), so its rows share a Krylov
    space with the rows before them. It runs first, so that the full batches after it
    overwrite the rows it shares with them: every other row holds the answer of its own
    batch, and the one program is compiled before the answer is allocated."""
    n = num_examples(test[0], name="test inputs")
    solve = ((lambda b: solver.apply_batch(state, op, b)) if host else
             (lambda b: compiled(type(solver).apply_many)(solver, state, op, b)))
    starts = list(range(0, n, batch))
    if n % batch and len(starts) > 1:  # the short (window) batch first
        starts = starts[-1:] + starts[:-1]
    out, infos = None, []
    with _progress.bar(progress, total=n, desc=f"influx: solves ({solver.name})", unit="solves") as bar:
        for start in starts:
            m = min(batch, n - start)
            # a batch-sized window: a short last batch moved back over rows of the batch before
            part, w, _ = _curvature.window(test, start, start + m, batch)
            grads = _measurement_grads(f, params, part, batch_size=min(grad_batch, batch))
            sol = solve(grads)
            del grads
            jax.block_until_ready(sol.x)
            if m == n:  # one batch: its answers are the result
                bar.update(m)
                return sol
            # diagnostics of the batch's own rows, on the host (no slice or concatenate programs)
            own = slice(start - w, start - w + m)
            infos.append((start, jax.tree_util.tree_map(lambda a, own=own: np.asarray(a)[own],
                                                        sol._replace(x=None))))
            if out is None:
                out = _rows_like(sol.x, n)
            out = _write_rows(out, w, sol.x)
            del sol
            jax.block_until_ready(out)
            _memory.release_free_memory()
            bar.update(m)
    # every row of ``out`` was written by its own batch (the batches cover [0, n)): no zero is left
    return _join_rows([info for _, info in sorted(infos, key=lambda t: t[0])])._replace(x=out)


class InfluenceInfo(NamedTuple):
    """Diagnostics of an influence computation.

    method: the path that scored the training set: ``"jvp"`` or ``"per_example"`` for
    :func:`influence` / :func:`group_influence` / the baselines, ``"self"`` for
    :func:`self_influence` (the solver's ``inverse_quadratic``).
    n_train, n_test: sizes. solver: ``repr`` of the solver (``None`` for baselines).
    residual_norm, iterations, converged, status: per test vector (per training example
    for ``"self"``), from the solves (``None`` for baselines and for closed forms that
    report nothing per example). With ``on_failure="nan"`` the rows whose ``status`` is not
    ``Status.CONVERGED`` are NaN in the scores.
    """

    method: str
    n_train: int
    n_test: int
    solver: str | None
    residual_norm: np.ndarray | None
    iterations: np.ndarray | None
    converged: np.ndarray | None
    status: np.ndarray | None


def _user_stacklevel() -> int:
    """``stacklevel`` pointing at the first frame outside the influx package."""
    pkg = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(2), 2  # level 1: the function that calls warnings.warn
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(pkg):
        frame, level = frame.f_back, level + 1
    return level


@_boundary
def solve_test_vectors(obj: Objective, params, train, test, *, kind: str = "gnh", damping=1e-3,
                       solver: Solver | None = None, measurement=None, chunk_size: int = 256,
                       rhs_batch_size: int = 64, on_failure: str = "raise", state=None,
                       memory_budget: int | None = None, progress: bool | None = False):
    """The solved test vectors ``s_t = (C + (l2 + damping) I)^-1 grad f_t`` (batched pytree).

    ``train`` is the data the curvature ``C`` is taken over (arrays ``(x, y)``). Returns
    ``(vectors, solution)``: ``vectors`` is a pytree like ``params`` with a leading
    ``n_test`` axis; ``solution`` the batched :class:`~influx.solvers.Solution`. Cost:
    ``n_test`` measurement gradients, one ``solver.prepare`` and ``n_test`` solves
    (``rhs_batch_size`` at a time, batched). A failed solve raises
    :class:`influx.errors.SolveError` (``on_failure="raise"``) or gives a NaN vector
    (``"nan"``, ``"warn"``), never a plausible one. ``state``: an :class:`influx.Prepared`
    for these inputs (:func:`influx.prepare`): no ``solver.prepare`` (see :func:`influence`).
    ``memory_budget`` (bytes) bounds every pass (module docstring); ``progress``: bars for
    the fit and the solves.
    """
    solver = _saved.resolve_solver(state, solver)  # prepared state (influx.solvers.saved)
    chunk_size = _validation.check_positive_int(chunk_size, "chunk_size")
    _validation.check_on_failure(on_failure)
    memory_budget = _check_budget(memory_budget)
    params = _upcast_params(params)
    f = _bind_measurement(obj, measurement)
    _check_kind_damping(kind, damping)
    check_data(obj, params, train, name="train")
    _check_test(obj, params, test)
    _check_measurement(f, params, test)
    solver = _check_solver(solver, params)
    _saved.verify(state, obj, params, train, kind=kind, damping=damping, solver=solver)
    return _solve_test_vectors(obj, params, train, test, f, kind=kind, damping=damping, solver=solver,
                               chunk_size=chunk_size, rhs_batch_size=rhs_batch_size, on_failure=on_failure,
                               prepared=state, memory_budget=memory_budget, progress=progress)


def _check_budget(memory_budget):
    """A checked ``memory_budget`` (``None`` stays ``None``: the default, resolved per pass)."""
    return None if memory_budget is None else _memory.resolve_budget(memory_budget)


def _with_progress(solver, progress):
    """The solver with ``progress`` set, for solvers that have the option (EK-FAC's fit)."""
    if progress is False or not any(f.name == "progress" for f in dataclasses.fields(solver)):
        return solver
    return dataclasses.replace(solver, progress=progress)


def _check_kind_damping(kind, damping):
    _validation.check_choice(kind, "kind", _curvature.KINDS)
    _validation.check_damping(damping)


def _check_solver(solver, params) -> Solver:
    if solver is None:
        return default_solver(params)
    if not isinstance(solver, Solver):
        raise InputError(f"solver must be an influx.solvers.Solver, got {type(solver).__name__}")
    return solver


def _solve_test_vectors(obj, params, train, test, f, *, kind, damping, solver, chunk_size,
                        rhs_batch_size=64, on_failure="raise", prepared=None, memory_budget=None,
                        progress=False):
    """:func:`solve_test_vectors` on validated inputs (no data scan), with the failure policy;
    ``prepared``: a verified :class:`influx.Prepared` whose state is used instead of ``prepare``."""
    n_test = num_examples(test[0], name="test inputs")
    op = _curvature.operator_unchecked(obj, params, train, kind=kind, damping=damping,
                                       chunk_size=chunk_size, memory_budget=memory_budget)
    # first: a refused dense allocation comes before any program runs
    state = _with_progress(solver, progress).prepare(op) if prepared is None else prepared.state
    _memory.release_free_memory()  # what the fit (and its compilation) freed, before n_test x P
    host = getattr(solver, "host_driven", lambda _: False)(op)  # cg on a conv net on CPU
    batch = min(rhs_batch_size, n_test)
    if not host:  # fewer test examples per step when one step would not fit the budget
        batch = _query_batch(f, solver, state, op, params, test, limit=batch, budget=memory_budget)
    batch = _curvature.chunk_plan(n_test, batch)[0]  # equal batches: one solve program (100 -> 50 + 50)
    grad_batch = _grad_batch(f, _memory.shape_key(params), _memory.shape_key(_first(test)),
                             min(chunk_size, batch), _memory.resolve_budget(memory_budget, params=params))
    sol = _solve_queries(f, params, test, solver, state, op, batch=batch, grad_batch=grad_batch,
                         progress=progress, host=host)
    _memory.release_free_memory()  # the batches' gradients and temporaries, before the scoring
    bad = _failed_rows(sol, on_failure, f"influence ({solver!r})")
    return _nan_rows(sol.x, bad), sol


# ------------------------------------------------------------------ training side
def per_example_block(obj: Objective, params, example) -> int | None:
    """Examples per block of the per-example scoring kernel: ``PER_EXAMPLE_BATCH`` (blocks in
    a ``lax.map``: cache-sized gradient blocks, several times faster on CPU than one
    ``(chunk, P)`` block for dense models), or ``None`` -- the whole chunk in one ``vmap`` --
    when ``apply_fn`` has a convolution and runs on the CPU: XLA:CPU runs convolutions
    several times slower inside a compiled loop (jax issue 12868; 2.5-3x on the models
    benchmark's CNN). ``example``: one input with a leading axis of 1 (arrays or shapes)."""
    return None if _xla.conv_on_cpu(obj.apply_fn, params, example) else PER_EXAMPLE_BATCH


def _kernel(obj, method, params, vecs, chunk, scale, sub=None, block=PER_EXAMPLE_BATCH):
    """``scale * grad L(z_m)^T v_t`` for every ``v_t`` in ``vecs`` and ``m`` in ``chunk``
    (``sub``: at most this many examples at a time, in a ``lax.map``, bounding the memory;
    ``block``: per-example gradients formed this many at a time, ``None``: all at once)."""
    c = num_examples(chunk)
    if sub is not None and sub < c:
        def one(ex):
            one_ex = jax.tree_util.tree_map(lambda a: a[None], ex)
            return _kernel(obj, method, params, vecs, one_ex, 1.0, block=block)[:, 0]
        return _curvature.even_map(one, chunk, batch_size=sub).T * scale
    vecs = jax.tree_util.tree_map(lambda v, p: v.astype(jnp.result_type(p)), vecs, params)
    if method == "jvp":
        f = lambda p: obj.per_example_loss(p, chunk)
        out = jax.vmap(lambda v: jax.jvp(f, (params,), (v,))[1])(vecs)
    else:
        # per-example gradients, ``block`` at a time (per_example_block), contracted leaf by
        # leaf (no ravel copy)
        def one(ex):
            g = _curvature.example_grad(obj, params, ex)
            parts = jax.tree_util.tree_map(lambda v, gl: jnp.tensordot(v, gl, axes=gl.ndim), vecs, g)
            return sum(jax.tree_util.tree_leaves(parts))

        if block is None or block >= c:
            out = jax.vmap(one)(chunk).T
        else:
            out = _curvature.even_map(one, chunk, batch_size=block).T
    return out * scale


@functools.lru_cache(maxsize=64)
def chunk_scorer(obj: Objective, method: str, mesh=None, axis: str = "data", sub: int | None = None,
                 block: int | None = PER_EXAMPLE_BATCH):
    """A compiled ``(params, vecs, chunk, scale) -> (n_test, chunk) scores`` function.

    With a ``mesh`` the chunk is split over the mesh axis ``axis`` with ``jax.shard_map``
    (parameters and vectors replicated, every device scores its slice of the chunk with
    no communication); the chunk length must be a multiple of the axis size. ``sub``: each
    device scores its slice at most ``sub`` examples at a time (memory bounded by ``sub``).
    ``block``: see :func:`per_example_block`.
    """
    kern = functools.partial(_kernel, obj, method, sub=sub, block=block)
    if mesh is None:
        return jit(kern)

    def local(params, vecs, chunk, scale):
        # Mark the replicated parameters as device-varying: differentiating an unvarying
        # input inside shard_map would psum the per-example gradients across devices.
        params = jax.lax.pcast(params, axis, to="varying")
        return _kernel(obj, method, params, vecs, chunk, scale, sub, block)

    P = PartitionSpec
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(axis), P()),
                            out_specs=P(None, axis))
    return jit(sharded)


def _take(tree, a, b):
    return jax.tree_util.tree_map(lambda x: x[a:b], tree)


@functools.lru_cache(maxsize=256)
def _score_chunk(obj, method, params_key, vecs_key, example_key, limit, budget, block) -> int:
    """Training examples per scoring step within ``budget`` bytes (shapes only)."""
    scale = jax.ShapeDtypeStruct((), jnp.dtype(params_key[1][0][1]))
    at = _memory.sized(functools.partial(_kernel, obj, method, block=block),
                       lambda c: (_structs(params_key), _structs(vecs_key), _structs(example_key, (c,)),
                                  scale))
    return _memory.chunk_size_for(lambda c: at(c)[0], budget=budget, limit=limit,
                                  what=f"influence scoring ({method})")


def score_chunk_size(obj, method, params, vecs, train, *, chunk_size, memory_budget=None,
                     block: int | None = PER_EXAMPLE_BATCH) -> int:
    """Training examples per scoring step: ``chunk_size``, or fewer when the step (``method``
    against the batched ``vecs``, per-example ``block``) would need more than
    ``memory_budget`` bytes."""
    n = num_examples(train)
    return _score_chunk(obj, method, _memory.shape_key(params), _memory.shape_key(vecs),
                        _memory.shape_key(_first(train)), min(int(chunk_size), n),
                        _memory.resolve_budget(memory_budget, params=params), block)


def _score_arrays(obj, params, vecs, train, *, method, chunk_size, n_total, memory_budget=None,
                  progress=False):
    """Scores in-memory ``train`` against ``vecs`` chunk by chunk -> ``(n_test, N)``."""
    n = num_examples(train)
    block = per_example_block(obj, params, _first(train[0], lead=1)) if method == "per_example" else None
    c = score_chunk_size(obj, method, params, vecs, train, chunk_size=chunk_size, memory_budget=memory_budget,
                         block=block)
    c, spans = _curvature.chunk_plan(n, c)
    fn = chunk_scorer(obj, method, block=block)
    scale = np.asarray(1.0 / n_total, dtype=jnp.result_type(*jax.tree_util.tree_leaves(params)))
    outs = []
    with _progress.bar(progress, total=n, desc="influx: scoring") as bar:
        for start, stop in spans:
            chunk, w, _ = _curvature.window(train, start, stop, c)
            out = fn(params, vecs, chunk, scale)
            outs.append(out if start == w else out[:, start - w:])  # the last window's new rows
            if not isinstance(bar, _progress._NoProgress):
                jax.block_until_ready(outs[-1])
            bar.update(stop - start)
    return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]


def _resolve_method(method, n_test, params, chunk_size, x=None, obj=None):
    method = _validation.check_choice(method, "method", METHODS)
    if method == "auto":
        n_params = _n_params(params)
        flops = None
        if n_test > PER_EXAMPLE_OVERHEAD and x is not None and obj is not None:
            flops = forward_flops(obj, params, x)
        method = choose_method(n_test, n_params, itemsize=_itemsize(params), flops_per_example=flops)
    return method


# ------------------------------------------------------------------ public functions
@_boundary
def influence(obj: Objective, params, train, test, *, kind: str = "gnh", damping=1e-3,
              solver: Solver | None = None, measurement=None, chunk_size: int = 256,
              method: str = "auto", return_info: bool = False, on_failure: str = "raise", state=None,
              memory_budget: int | None = None, progress: bool | None = False):
    """Pairwise influence matrix ``(n_test, n_train)`` (see the module docstring).

    ``score[t, m] = (1/N) grad f_t^T (C + (l2 + damping) I)^-1 grad L(z_m)``, the
    predicted ``f_t(theta without m) - f_t(theta_s)``; positive = ``m`` helpful for the
    test loss.

    Args:
      obj, params: the objective and the trained parameters ``theta_s`` (float16/bfloat16
        parameters are upcast to float32, with a warning).
      train, test: ``(x, y)`` arrays with leading example axes (``train`` is also the
        data of the curvature operator; ``N = len(train)``).
      kind: ``"gnh"`` or ``"hessian"``. damping: ``lambda >= 0`` on top of ``obj.l2``.
      solver: an :mod:`influx.solvers` solver; default :func:`default_solver`.
      measurement: ``None`` (test loss), a :data:`measurements` factory result, or a
        callable ``f(params, (x_t, y_t)) -> scalar`` on one unbatched test example.
      chunk_size: at most this many training examples per scoring step (and curvature
        product chunk); fewer when ``memory_budget`` requires. EK-FAC's factor passes have
        their own fit chunk (``influx.solvers.ekfac(chunk_size=...)``, default from the budget).
      method: ``"auto"`` | ``"jvp"`` | ``"per_example"`` (see :func:`choose_method`).
      return_info: also return an :class:`InfluenceInfo`.
      on_failure: what a failed solve (status not ``CONVERGED``: e.g. CG meeting negative
        curvature, a stagnating or unfinished solve, a failed factorisation) does:
        ``"raise"`` (default) raises :class:`influx.errors.SolveError` naming how many
        solves failed, why, the worst residual and the fix; ``"nan"`` returns NaN in the
        rows of the failed test vectors (``InfluenceInfo.status`` says which);
        ``"warn"`` is ``"nan"`` plus a ``RuntimeWarning``; ``"keep"`` keeps the rows of
        solves that only stopped short of their tolerance (``MAX_STEPS``/``STAGNATED``, or
        ``UNCHECKED`` with ``residual=False``: the solver's own finite answer, for measuring
        a practical solver's error) and gives NaN
        for every other failure. A failed row is never 0.
      state: an :class:`influx.Prepared` from :func:`influx.prepare` or
        :func:`influx.solvers.load_state` for the same ``obj``, ``params``, ``train`` (the
        curvature data), ``kind``, ``damping`` and solver (``solver=None`` takes the
        state's): its state is used and nothing is prepared -- fit once, query many test
        sets. A state for other inputs is refused (``InputError`` naming what differs).
      memory_budget: bytes every pass may use (module docstring); ``None``:
        :func:`influx._memory.default_budget`. Too small for one example:
        :class:`influx.errors.ResourceError` with both sizes.
      progress: progress bars for the fit (EK-FAC), the solves and the scoring (tqdm, else a
        stderr line); ``None``: when stderr is a terminal; ``False`` (default): none.

    Cost: ``n_test`` gradients + one solver preparation + ``n_test`` solves, then one
    pass over the training set (``n_test`` JVPs or one per-example-gradient pass per
    chunk). Memory: ``n_test x N`` scores plus one chunk.

    Raises ``InputError`` (a ``ValueError``)/``TypeError`` before any heavy work for data
    that does not fit ``apply_fn``, labels out of range, empty data, a bad measurement or
    option; the inputs are validated once, here.
    """
    solver = _saved.resolve_solver(state, solver)  # prepared state (influx.solvers.saved)
    params, n, n_test, f, solver = _validate(obj, params, train, test, kind=kind, damping=damping,
                                             solver=solver, measurement=measurement,
                                             chunk_size=chunk_size, method=method, on_failure=on_failure)
    _saved.verify(state, obj, params, train, kind=kind, damping=damping, solver=solver)
    scores, info = _influence(obj, params, train, test, f, n=n, n_test=n_test, kind=kind, damping=damping,
                              solver=solver, chunk_size=chunk_size, method=method, on_failure=on_failure,
                              prepared=state, memory_budget=_check_budget(memory_budget), progress=progress)
    return (scores, info) if return_info else scores


def _validate(obj, params, train, test, *, kind, damping, solver, measurement, chunk_size, method,
              on_failure):
    """The checks of the public entry points, once: ``(params, N, n_test, f, solver)``."""
    _validation.check_positive_int(chunk_size, "chunk_size")
    _validation.check_choice(method, "method", METHODS)
    _validation.check_on_failure(on_failure)
    _check_kind_damping(kind, damping)
    params = _upcast_params(params)
    n = check_data(obj, params, train, name="train")
    n_test = _check_test(obj, params, test)
    f = _bind_measurement(obj, measurement)
    _check_measurement(f, params, test)
    return params, n, n_test, f, _check_solver(solver, params)


def _influence(obj, params, train, test, f, *, n, n_test, kind, damping, solver, chunk_size, method,
               on_failure, prepared=None, memory_budget=None, progress=False):
    """:func:`influence` on validated inputs: ``(scores, info)``."""
    vecs, sol = _solve_test_vectors(obj, params, train, test, f, kind=kind, damping=damping,
                                    solver=solver, chunk_size=chunk_size, on_failure=on_failure,
                                    prepared=prepared, memory_budget=memory_budget, progress=progress)
    sol = sol._replace(x=None)  # the raw answers (a second n_test x P copy when rows were set to NaN)
    method = _resolve_method(method, n_test, params, chunk_size, train[0], obj)
    scores = _score_arrays(obj, params, vecs, train, method=method, chunk_size=chunk_size, n_total=n,
                           memory_budget=memory_budget, progress=progress)
    bad = masked_rows(sol.status, on_failure)
    scores = _nan_rows(scores, bad if bad.any() else None)  # explicit: a failed row is NaN
    del vecs
    _memory.release_free_memory()  # the scoring's chunks: the next call starts from what is in use
    info = InfluenceInfo(method, n, n_test, repr(solver), np.asarray(sol.residual_norm),
                         np.asarray(sol.iterations), np.asarray(sol.converged), np.asarray(sol.status))
    return scores, info


def _groups_matrix(groups, n: int) -> np.ndarray:
    """Membership matrix ``(N, n_groups)`` from ids, a boolean mask or index lists."""
    if isinstance(groups, (np.ndarray, jax.Array)) and np.ndim(groups) == 1 and len(groups) == n \
            and np.issubdtype(np.asarray(groups).dtype, np.integer):
        ids = np.asarray(groups)
        if ids.min() < 0:
            raise ValueError("groups: group ids must be >= 0")
        k = int(ids.max()) + 1
        m = np.zeros((n, k))
        m[np.arange(n), ids] = 1.0
        return m
    if isinstance(groups, (np.ndarray, jax.Array)) and np.ndim(groups) == 2:
        mask = np.asarray(groups)
        if mask.dtype != bool or mask.shape[1] != n:
            raise ValueError(f"groups: a mask must be boolean of shape (n_groups, {n}), got "
                             f"{mask.dtype} {mask.shape}")
        return mask.T.astype(float)
    if isinstance(groups, Sequence) or isinstance(groups, np.ndarray):
        m = np.zeros((n, len(groups)))
        for j, idx in enumerate(groups):
            idx = np.asarray(idx)
            if idx.dtype == bool:
                if idx.shape != (n,):
                    raise ValueError(f"groups[{j}]: boolean mask must have shape ({n},), got {idx.shape}")
                idx = np.nonzero(idx)[0]
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise ValueError(f"groups[{j}]: indices out of range for {n} training examples")
            if len(np.unique(idx)) != idx.size:
                raise ValueError(f"groups[{j}]: repeated indices")
            m[idx, j] = 1.0
        return m
    raise TypeError("groups must be an (N,) int array of group ids, an (n_groups, N) boolean mask, "
                    f"or a sequence of index arrays; got {type(groups).__name__}")


@_boundary
def group_influence(obj: Objective, params, train, test, groups, *, kind: str = "gnh", damping=1e-3,
                    solver: Solver | None = None, measurement=None, chunk_size: int = 256,
                    method: str = "auto", return_info: bool = False, on_failure: str = "raise",
                    state=None, memory_budget: int | None = None, progress: bool | None = False):
    """Influence of removing whole groups of training examples at once: ``(n_test, n_groups)``.

    Removing a set ``S`` (each member up-weighted by ``-1/N``) changes the parameters, to
    first order, by ``(1/N) A^-1 sum_{m in S} grad L(z_m)``, so the first-order group
    score is exactly the **sum of the member scores**:
    ``score[t, S] = sum_{m in S} score[t, m]``. (Second-order effects -- the curvature
    change from removing many examples -- are not modelled; for large groups the actual
    change can differ substantially.)

    ``groups``: an ``(N,)`` int array of group ids (groups ``0..max``), an
    ``(n_groups, N)`` boolean mask, or a sequence of index arrays (possibly overlapping).
    Other keyword arguments (the failure policy ``on_failure``: a failed test vector gives a
    NaN row; ``state``, a prepared solver state; ``memory_budget``, ``progress``) as
    :func:`influence`.
    """
    solver = _saved.resolve_solver(state, solver)  # prepared state (influx.solvers.saved)
    params, n, n_test, f, solver = _validate(obj, params, train, test, kind=kind, damping=damping,
                                             solver=solver, measurement=measurement,
                                             chunk_size=chunk_size, method=method, on_failure=on_failure)
    m = _groups_matrix(groups, n)
    _saved.verify(state, obj, params, train, kind=kind, damping=damping, solver=solver)
    scores, info = _influence(obj, params, train, test, f, n=n, n_test=n_test, kind=kind, damping=damping,
                              solver=solver, chunk_size=chunk_size, method=method, on_failure=on_failure,
                              prepared=state, memory_budget=_check_budget(memory_budget), progress=progress)
    g = scores @ jnp.asarray(m, dtype=scores.dtype)
    return (g, info) if return_info else g


@_boundary
def self_influence(obj: Objective, params, train, *, kind: str = "gnh", damping=1e-3,
                   solver: Solver | None = None, chunk_size: int = 256, return_info: bool = False,
                   on_failure: str = "raise", state=None, memory_budget: int | None = None,
                   progress: bool | None = False):
    """Self-influence ``(1/N) grad L(z_m)^T (C + (l2 + damping) I)^-1 grad L(z_m)``, ``(N,)``.

    The diagonal of ``influence(obj, params, train, train, ...)``: large values flag
    examples the model bends to fit (mislabel detection). Non-negative for a positive
    definite operator.

    Computed chunk by chunk (``chunk_size`` examples) with the solver's
    :meth:`~influx.solvers.Solver.inverse_quadratic`: a closed form from the state of
    ``direct`` (Cholesky or eigh factor), ``arnoldi`` (low-rank eigenpairs, ``O(N P r)``
    flops) and ``ekfac``/``kfac`` (the factored eigenbasis), with no per-example solve;
    for any other solver (``cg``, ``lissa``) one solve per example (``N`` in all).

    ``on_failure`` as in :func:`influence`: an example whose solve failed raises
    :class:`influx.errors.SolveError` (default) or is NaN (``"nan"``/``"warn"``), never 0.
    ``state``: a prepared solver state for these inputs, as in :func:`influence`.
    ``memory_budget`` (bytes) bounds the fit and the chunks (at most ``chunk_size``
    examples, fewer when one chunk's program would not fit); ``progress`` as :func:`influence`.
    """
    solver = _saved.resolve_solver(state, solver)  # prepared state (influx.solvers.saved)
    chunk_size = _validation.check_positive_int(chunk_size, "chunk_size")
    memory_budget = _check_budget(memory_budget)
    _validation.check_on_failure(on_failure)
    _check_kind_damping(kind, damping)
    params = _upcast_params(params)
    n = check_data(obj, params, train, name="train")
    solver = _check_solver(solver, params)
    _saved.verify(state, obj, params, train, kind=kind, damping=damping, solver=solver)
    op = _curvature.operator_unchecked(obj, params, train, kind=kind, damping=damping, chunk_size=chunk_size,
                                       memory_budget=memory_budget)
    st = _with_progress(solver, progress).prepare(op) if state is None else state.state
    vals, sol = _self_values(solver, st, op, train, n, chunk_size, memory_budget=memory_budget,
                             progress=progress)
    if sol is not None:
        bad = _failed_rows(sol, on_failure, f"self_influence ({solver!r})")
        vals = _nan_rows(vals, bad)
    if not return_info:
        return vals
    fields = ("residual_norm", "iterations", "converged", "status")
    info = InfluenceInfo("self", n, n, repr(solver),
                         *(None if sol is None else np.asarray(getattr(sol, k)) for k in fields))
    return vals, info


def _self_chunk(solver, state, op, train, limit, budget) -> int:
    """Examples per chunk of ``solver.inverse_quadratic`` within ``budget`` bytes (shapes only)."""
    example = _memory.shape_key(_first(train))
    if isinstance(op, _curvature.Operator):  # the data is there already: count one product chunk of it
        op = op.replace(data=_take(op.data, 0, min(op.num_examples, op.chunk_size)))

    at = _memory.sized(lambda st, o, ch: type(solver).inverse_quadratic(solver, st, o, ch),
                       lambda c: (state, op, _structs(example, (c,))))
    return _memory.chunk_size_for(lambda c: at(c)[0], budget=budget, limit=limit,
                                  what=f"self_influence ({solver.name})")


def _self_values(solver, state, op, train, n, chunk_size, memory_budget=None, progress=False):
    """``(g_m^T A^-1 g_m / N for all m, batched Solution | None)`` chunk by chunk."""
    quad = compiled(type(solver).inverse_quadratic)
    c = _self_chunk(solver, state, op, train, min(chunk_size, n),
                    _memory.resolve_budget(memory_budget, params=op.params))
    out, sols = [], []
    with _progress.bar(progress, total=n, desc="influx: self-influence") as bar:
        for start in range(0, n, c):
            chunk = _take(train, start, start + c)
            m = num_examples(chunk)
            vals, sol = quad(solver, state, op, _curvature.pad_rows(chunk, c) if m < c else chunk)
            out.append(vals[:m])
            if sol is not None:
                sols.append(_take(sol._replace(x=None, stats={}), 0, m))
            bar.update(m)
    vals = jnp.concatenate(out) / n
    if not sols:
        return vals, None
    fields = ("residual_norm", "iterations", "converged", "status")
    return vals, Solution(None, *(np.concatenate([np.asarray(getattr(t, k)) for t in sols]) for k in fields))


@_boundary
def grad_dot(obj: Objective, params, train, test, *, damping=None, measurement=None,
             chunk_size: int = 256, method: str = "auto", return_info: bool = False):
    """Gradient-dot-product baseline: influence with identity curvature.

    ``score[t, m] = (1/N) grad f_t^T grad L(z_m) / c`` with ``c = damping`` if given
    (the limit of :func:`influence` when ``damping`` dominates ``C``: ``(C + c I)^-1 ->
    I / c``) and ``c = 1`` otherwise. Same sign convention and call shape as
    :func:`influence`; no solve.
    """
    chunk_size = _validation.check_positive_int(chunk_size, "chunk_size")
    c = 1.0 if damping is None else float(damping)
    if not c > 0 or not np.isfinite(c):
        raise ValueError(f"grad_dot: damping must be None or > 0, got {damping!r}")
    n = check_data(obj, params, train, name="train")
    n_test = _check_test(obj, params, test)
    f = _bind_measurement(obj, measurement)
    _check_measurement(f, params, test)
    grads = _measurement_grads(f, params, test, batch_size=min(chunk_size, n_test))
    vecs = jax.tree_util.tree_map(lambda g: g / c, grads)
    method = _resolve_method(method, n_test, params, chunk_size, train[0], obj)
    scores = _score_arrays(obj, params, vecs, train, method=method, chunk_size=chunk_size, n_total=n)
    if return_info:
        return scores, InfluenceInfo(method, n, n_test, None, None, None, None, None)
    return scores


@_boundary
def tracin(obj: Objective, checkpoints: Sequence[Any], train, test, learning_rates, *,
           measurement=None, chunk_size: int = 256, method: str = "auto"):
    """TracIn-CP baseline (Pruthi et al., 2020) over a list of checkpoints.

    ``score[t, m] = (1/N) sum_c eta_c grad f_t(theta_c)^T grad L(z_m, theta_c)``: the sum
    of gradient dot products at every checkpoint ``theta_c``, weighted by the learning
    rate ``eta_c`` in use there (a scalar applies to all). The ``1/N`` of the mean
    objective keeps the scale of :func:`grad_dot`; positive = ``m`` reduced the test
    loss during training (a proponent), matching the influence sign convention.
    """
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise ValueError("tracin: checkpoints is empty")
    lrs = np.broadcast_to(np.asarray(learning_rates, dtype=float), (len(checkpoints),))
    total = None
    for theta, lr in zip(checkpoints, lrs):
        s = grad_dot(obj, theta, train, test, measurement=measurement, chunk_size=chunk_size,
                     method=method)
        total = lr * s if total is None else total + lr * s
    return total
