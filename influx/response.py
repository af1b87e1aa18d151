"""Response functions: the actual change of a measurement when a training example is removed.

Ground truth for influence functions. For each removed example ``m`` an objective is
minimised over ``theta`` and the change ``delta = f(theta_m) - f(theta_s)`` of each test
measurement ``f`` (default: the per-example test loss) is reported, with the same sign
and scale as :func:`influx.influence` (``eps = -1/N``; positive: removing ``m`` raises
``f``). With ``N`` training examples, ``L_i(theta) = loss_fn(apply_fn(theta, x_i), y_i)``,
``l2 = obj.l2``, ``lambda = damping`` and the removal weight ``eps`` (``epsilon``,
default ``-1/N``):

* :func:`loo`, leave-one-out retraining (Bae et al. 2022 call it LOO; "cold" when
  started from the original initialisation ``init``, "warm" when started from
  ``theta_s``)::

      J_m(theta) = 1/N sum_i L_i(theta) + eps L_m(theta) + l2/2 ||theta||^2

  With the default ``eps = -1/N`` the removed example's weight is 0 and every other
  example keeps its weight ``1/N`` (``normalization="n"``). This is the convention of
  the influence function and of the PBRF, so the chain cold LOO -> ... -> influence has
  no spurious ``O(1/N^2)`` term from renormalising. Its minimiser equals that of
  retraining on the ``N - 1`` remaining examples with weight decay ``l2 N / (N - 1)``.
  ``normalization="n-1"`` instead minimises the literal retraining objective
  ``1/(N-1) sum_{i != m} L_i + l2/2 ||theta||^2`` (what a user re-running their
  training script without ``z_m`` would get).
* :func:`proximal`: warm-start LOO plus ``lambda/2 ||theta - theta_s||^2``.
* :func:`pbrf`, the proximal Bregman response function (Bae et al. 2022)::

      1/N sum_i D_L(h(theta, x_i), h(theta_s, x_i)) + eps L_m(theta)
          + (l2 + lambda)/2 ||theta - theta_s||^2,
      D_L(z, z_s) = L(z) - L(z_s) - grad_z L(z_s)^T (z - z_s)      (targets fixed)

  (``l2/2 ||theta - theta_s||^2`` is the Bregman divergence of the weight decay). For a
  model linear in ``theta`` with a quadratic loss it is *exactly* the proximal LOO
  objective up to a constant, provided ``theta_s`` minimises ``J``.
* :func:`linearized`: the first-order solution of the PBRF in ``eps``,
  ``delta_t = -eps g_t^T (G + (l2 + lambda) I)^-1 g_m`` with ``G`` the Gauss-Newton
  matrix of ``J``'s data term at ``theta_s``, ``g_t = grad f_t(theta_s)`` and
  ``g_m = grad L_m(theta_s)``; with ``eps = -1/N`` it is the GNH influence score.

Engine. The removed example enters only through a weight vector (the objective keeps
static shapes), so one solve is a pure function of ``(m, eps)``. ``chunk_size`` removed
examples are solved together: one loop over the optax steps whose body is the step
``vmap``-ped over the chunk (full batch: a ``lax.while_loop`` that stops as soon as every
example of the chunk has converged or failed; minibatches from
:func:`influx.models.minibatch_indices`, the schedule of :func:`influx.models.train`,
shared by every removed example, "same data order": a ``lax.scan`` over all ``steps``),
with ``lax.map`` over the chunks -- all one compiled program. The options of a call are
one frozen, hashable :class:`ResponseOptions` (built once by :func:`loo`, :func:`proximal`
and :func:`pbrf` from their keyword arguments, or passed to :func:`respond`); the static
part of the compiled program is one ``_Program`` value.

Inner solvers (each wrapped once in a small step adapter with ``init`` and one ``step``,
so the engine has no per-solver branches): any optax optimizer -- first-order
(``optax.adam``, ``optax.sgd``; the only choice with minibatches) or L-BFGS
(``optax.lbfgs()``, full batch; its line search is driven through
``optax.value_and_grad_from_state``) -- or the second-order
:func:`newton` (the default, :class:`NewtonCG`: truncated Newton steps, CG on exact
Hessian-vector products of the objective itself, Armijo backtracking), which reaches
``||grad|| ~ 1e-12`` in float64 in 5-20 steps on small problems and compiles about twice
as fast as ``optax.lbfgs``'s zoom line search. In full-batch mode an example whose
gradient norm reaches ``tol`` is frozen (no further updates), so line searches never see
a vanishing gradient (except a cold start with a first-order optimizer, which replays the
original training step for step); ``tol`` therefore also bounds how precisely ``delta`` is resolved
(about ``tol / (smallest curvature)`` in ``theta``).

The three minimised objects are one formula with different coefficients
(:func:`_make_objective`), so loo, proximal and pbrf with the same optimizer, steps and
shapes share one compiled program.

Performance. On accelerators a large ``chunk_size`` batches the removed examples into
big matrix products. On a CPU a full-batch step is already compute-bound, so vmapping
saves only per-step overhead (about 1.5-2x on the UCI Concrete MLP, nothing on the
digits MLP); with minibatches a single solve is overhead-bound and vmapping gains more
(``benchmarks/response.py``). On the CPU each solve of a chunk gets its own copy of the
training inputs while the copies stay under 8 MiB (:func:`_replicate`: it avoids a
per-step transpose XLA otherwise inserts), and first-order steps evaluate only the
gradient.

Diagnostics (:class:`Response`): the final full-batch gradient norm of each example's
objective, its value, ``converged = grad_norm <= tol``, and a status code
(:class:`influx.solvers.Status`), and the number of steps that updated it. When the
gradient or the iterate becomes non-finite (or the objective, checked every step by the
line-search solvers and at the end by all), that example stops at its last finite
iterate and is marked ``NONFINITE``; the others continue. Failure policy
(``on_failure``): by default a ``NONFINITE`` solve raises :class:`influx.errors.SolveError`
naming the removed indices and the fix; with ``on_failure="nan"`` its ``delta`` row is NaN
(never 0) and ``status``/``failed`` say which. A finite solve that did not reach ``tol``
is not a failure: status ``MAX_STEPS`` and a ``RuntimeWarning`` (``warn=False`` silences
it).

Subset retraining (:func:`retrain`, :func:`random_subsets`, :func:`check_replay`): the
original training run (:func:`influx.models.train_loop`) repeated from the original
initialisation with per-example weights, ``vmap``-ped over ``M`` weight vectors; the
ground truth for group attribution (LDS) and resumable on disk (``out_dir``).

Cost: ``len(removed) x steps`` gradient evaluations of the objective on the (mini)batch
(L-BFGS: plus line-search evaluations; Newton: up to ``cg_steps`` Hessian-vector products
and the backtracking evaluations), plus one full-batch gradient per example at the
end; memory ``chunk_size`` copies of the parameters and optimizer state plus one
chunk's activations (``keep_params=False`` avoids keeping ``len(removed)`` parameter
copies).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from influx import _xla
from influx import validation as _validation
from influx.curvature import chunked_map
from influx.errors import InputError, SolveError
from influx.measurements import Measurement
from influx.measurements import bind as _bind_measurement
from influx.measurements import check as _check_measurement
from influx.models import minibatch_indices
from influx.objective import Objective, check_data, check_like, num_examples, tree_sqnorm
from influx.solvers._base import Status
from influx.validation import boundary as _boundary
from influx.validation import check_fraction, check_int, check_nonnegative

__all__ = ["Response", "ResponseOptions", "NewtonCG", "newton", "loo", "proximal", "pbrf", "respond",
           "linearized", "DEFAULT_OPTIMIZER", "Retrain", "retrain", "retrain_chunk_size", "random_subsets",
           "check_replay"]

_DEFAULT_STEPS = 50


class Response(NamedTuple):
    """Result of a response function (one row per removed example).

    Attributes:
      delta: ``(len(removed), n_test)`` actual change ``f(theta_m) - f(theta_s)`` of each
        test measurement (NaN rows for examples whose solve became non-finite).
      params: the solutions ``theta_m`` stacked on a leading axis (``None`` with
        ``keep_params=False``; for :func:`linearized`, ``None``).
      grad_norm: ``(len(removed),)`` full-batch gradient norm of each example's objective
        at its solution (``nan`` for :func:`linearized`).
      objective: ``(len(removed),)`` objective value at the solution.
      converged: ``(len(removed),)`` bool, ``grad_norm <= tol`` and finite.
      status: ``(len(removed),)`` :class:`influx.solvers.Status` codes (``CONVERGED``,
        ``MAX_STEPS``, ``NONFINITE``).
      removed: the removed indices (numpy int array).
      failed: removed indices whose solve became non-finite.
      baseline: ``(n_test,)`` measurement ``f`` at the reference point (``theta_s``, or
        the retrained full-data solution with ``baseline="retrain"``).
      observed: outputs of ``observe(theta_m)`` stacked per example (or ``None``).
      kind: ``"loo"``, ``"proximal"``, ``"pbrf"`` or ``"linearized"``.
      info: settings used (steps, optimizer, epsilon, damping, tol, ...).
      steps_taken: ``(len(removed),)`` optimizer steps that updated each example (fewer
        than ``steps`` when it converged or failed earlier; ``None`` for
        :func:`linearized`).
    """

    delta: Any
    params: Any
    grad_norm: Any
    objective: Any
    converged: Any
    status: Any
    removed: np.ndarray
    failed: np.ndarray
    baseline: Any
    observed: Any = None
    kind: str = ""
    info: dict = {}
    steps_taken: Any = None


# ------------------------------------------------------------------ validation
def _check_removed(removed, n: int) -> np.ndarray:
    try:
        arr = np.asarray(removed)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"removed: expected a sequence of integer indices, got {removed!r}") from e
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise InputError(f"removed: expected a 1-D sequence of indices, got shape {arr.shape}")
    if arr.size == 0:
        raise InputError("removed: empty; pass at least one training index")
    if not np.issubdtype(arr.dtype, np.integer):
        integral = np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))
        if np.issubdtype(arr.dtype, np.floating) and integral:
            arr = arr.astype(np.int64)
        else:
            raise InputError(f"removed: indices must be integers, got dtype {arr.dtype}")
    bad = arr[(arr < 0) | (arr >= n)]
    if bad.size:
        raise InputError(
            f"removed: indices out of range for {n} training examples: {bad[:10].tolist()} "
            f"(need 0 <= index < {n}; negative indices are not accepted)"
        )
    uniq, counts = np.unique(arr, return_counts=True)
    if np.any(counts > 1):
        raise InputError(f"removed: duplicated indices {uniq[counts > 1][:10].tolist()}")
    return arr.astype(np.int32)


ON_FAILURE = ("raise", "nan")  # the failure policies response functions support


def _check_optimizer(opt, name: str = "optimizer"):
    if not (hasattr(opt, "init") and hasattr(opt, "update") and callable(opt.update)):
        raise InputError(f"{name}: expected an optax GradientTransformation, got {type(opt).__name__}")
    try:
        hash(opt)
    except TypeError as e:
        raise InputError(f"{name}: must be hashable (optax transformations are)") from e
    return opt


def _check_test(obj: Objective, params, test, measurement):
    """Validates ``test`` and returns the bound measurement ``f(params, example) -> scalar``."""
    if not (isinstance(test, (tuple, list)) and len(test) == 2):
        raise _validation.InputTypeError(f"test: expected a pair (x, y) of arrays, got {type(test).__name__}")
    needs_labels = measurement is None or (
        isinstance(measurement, Measurement) and measurement.name in ("loss", "margin"))
    if needs_labels and test[1] is None:
        raise InputError(
            "test: the measurement "
            f"{'loss (the default)' if measurement is None else repr(measurement)} needs labels; "
            "pass test=(x, y), or a measurement that ignores them (influx.measurements.logit(k))"
        )
    _validation.check_test(obj, params, tuple(test))
    f = _bind_measurement(obj, measurement)
    _check_measurement(f, params, tuple(test))
    return f


def _leaves_finite(tree):
    leaves = jax.tree_util.tree_leaves(tree)
    return functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(l)) for l in leaves], jnp.array(True))


def _tree_where(c, a, b):
    return jax.tree_util.tree_map(lambda x, y: jnp.where(c, x, y), a, b)


def _tree_sub(a, b):
    return jax.tree_util.tree_map(jnp.subtract, a, b)


def _take(tree, idx):
    return jax.tree_util.tree_map(lambda a: a[idx], tree)


# ------------------------------------------------------------------ Newton-CG
@dataclasses.dataclass(frozen=True)
class NewtonCG:
    """Inexact (truncated) Newton steps with CG on the objective's own Hessian.

    Each step (Nocedal & Wright, Alg. 7.1): ``H p = -g`` is solved by CG on exact
    Hessian-vector products (``jax.linearize`` of the gradient, once per step) to the
    residual ``min(forcing, ||g||) ||g||`` (quadratic convergence near the optimum), at most
    ``cg_steps`` products, stopping at the first direction of non-positive curvature
    (steepest descent if that happens at once); then Armijo backtracking (halving, at most
    ``max_backtracks`` trials). Full batch only. Make one with :func:`newton`.

    Cost per step: one gradient, one linearisation, up to ``cg_steps`` HVPs (each about
    one JVP + VJP of the objective), and 1 + backtracks objective values. On small
    problems it reaches ``||grad|| ~ 1e-12`` (float64) in 5-20 steps; compiles much
    faster than ``optax.lbfgs`` with its zoom line search.
    """

    cg_steps: int = 100
    max_backtracks: int = 30
    forcing: float = 1e-2

    def init(self, params):
        return ()

    def update(self, *args, **kwargs):  # marks the object as an optimizer for validation
        raise TypeError("NewtonCG is driven by influx.response, not by optax.apply_updates")

    def step(self, fun, params, state):
        x, unravel = ravel_pytree(params)
        f = lambda y: fun(unravel(y))
        v, g = jax.value_and_grad(f)(x)
        _, hvp = jax.linearize(jax.grad(f), x)
        gn = jnp.linalg.norm(g)
        tol = jnp.minimum(self.forcing, gn) * gn
        zero = jnp.zeros_like(x)

        def cg_cond(c):
            k, _, _, _, _, stop = c
            return (k < self.cg_steps) & ~stop

        def cg_body(c):
            k, p, r, d, rr, _ = c
            hd = hvp(d)
            dhd = jnp.vdot(d, hd)
            neg = dhd <= 0
            alpha = rr / jnp.where(neg, 1.0, dhd)
            p_new = p + alpha * d
            r_new = r + alpha * hd
            rr_new = jnp.vdot(r_new, r_new)
            beta = rr_new / jnp.where(rr > 0, rr, 1.0)
            d_new = -r_new + beta * d
            # negative curvature: keep p (or steepest descent at the first iteration)
            p_out = jnp.where(neg, jnp.where(k == 0, -g, p), p_new)
            stop = neg | (jnp.sqrt(rr_new) <= tol)
            return (k + 1, p_out, jnp.where(neg, r, r_new), jnp.where(neg, d, d_new),
                    jnp.where(neg, rr, rr_new), stop)

        c0 = (jnp.array(0), zero, g, -g, jnp.vdot(g, g), gn <= 0)
        _, p, _, _, _, _ = jax.lax.while_loop(cg_cond, cg_body, c0)
        slope = jnp.vdot(g, p)
        p = jnp.where(slope < 0, p, -g)  # safeguard: always a descent direction
        slope = jnp.vdot(g, p)

        def ls_cond(c):
            j, a, fa = c
            bad = ~jnp.isfinite(fa) | (fa > v + 1e-4 * a * slope)
            return (j < self.max_backtracks) & bad

        def ls_body(c):
            j, a, _ = c
            a = 0.5 * a
            return j + 1, a, f(x + a * p)

        one = jnp.asarray(1.0, x.dtype)
        _, a, fa = jax.lax.while_loop(ls_cond, ls_body, (jnp.array(0), one, f(x + p)))
        ok = jnp.isfinite(fa) & (fa <= v)
        x_new = jnp.where(ok, x + a * p, x)
        return v, unravel(g), unravel(x_new), state


def newton(*, cg_steps: int = 100, max_backtracks: int = 30, forcing: float = 1e-2) -> NewtonCG:
    """A Newton-CG inner solver for the response functions (see :class:`NewtonCG`)."""
    forcing = check_nonnegative(forcing, "forcing")
    if not 0 < forcing < 1:
        raise InputError(f"forcing must be in (0, 1), got {forcing}")
    return NewtonCG(check_int(cg_steps, "cg_steps", minimum=1),
                    check_int(max_backtracks, "max_backtracks", minimum=0), forcing)


#: Default inner optimizer of the warm-start objects: Newton-CG (full batch).
DEFAULT_OPTIMIZER = NewtonCG()


# ------------------------------------------------------------------ inner solvers as step adapters
# One small value per kind of inner solver, chosen once (:func:`_step_adapter`); the engine
# calls ``adapter.init(params)`` and ``adapter(F, theta, state, m, eps, idx, x)``, which
# returns ``(value, grad, new_theta, new_state)``. ``value`` may be 0 when the solver does
# not need it (a non-finite objective then shows up in the gradient).
@dataclasses.dataclass(frozen=True)
class _FirstOrderStep:
    """An optax first-order step (``optax.sgd``, ``optax.adam``, ...): gradient only, minibatches ok."""

    opt: Any
    full_batch_only = False

    def init(self, params):
        return self.opt.init(params)

    def __call__(self, F, th, st, m, e, idx, x):
        g = jax.grad(F)(th, m, e, idx, x)
        upd, st = self.opt.update(g, st, th)
        leaf = jax.tree_util.tree_leaves(g)[0]
        return jnp.zeros((), leaf.dtype), g, optax.apply_updates(th, upd), st


@dataclasses.dataclass(frozen=True)
class _LineSearchStep:
    """An optax optimizer with a line search that keeps value and gradient in its state
    (``optax.lbfgs``), driven through ``optax.value_and_grad_from_state``. Full batch."""

    opt: Any
    full_batch_only = True

    def init(self, params):
        return self.opt.init(params)

    def __call__(self, F, th, st, m, e, idx, x):
        full = lambda t: F(t, m, e, None, x)
        v, g = optax.value_and_grad_from_state(full)(th, state=st)
        upd, st = self.opt.update(g, st, th, value=v, grad=g, value_fn=full)
        return v, g, optax.apply_updates(th, upd), st


@dataclasses.dataclass(frozen=True)
class _NewtonStep:
    """:class:`NewtonCG` (full batch)."""

    newton: Any
    full_batch_only = True

    def init(self, params):
        return self.newton.init(params)

    def __call__(self, F, th, st, m, e, idx, x):
        return self.newton.step(lambda t: F(t, m, e, None, x), th, st)


def _step_adapter(opt, params):
    """The step adapter of an inner solver: Newton-CG, line search (state holds ``value``), first order."""
    if isinstance(opt, NewtonCG):
        return _NewtonStep(opt)
    state = jax.eval_shape(opt.init, params)
    try:
        has_value = optax.tree.get(state, "value") is not None
    except (KeyError, ValueError):
        has_value = False
    return _LineSearchStep(opt) if has_value else _FirstOrderStep(opt)


# ------------------------------------------------------------------ options
@dataclasses.dataclass(frozen=True)
class ResponseOptions:
    """Every option of :func:`loo`, :func:`proximal` and :func:`pbrf`, validated once.

    Frozen and hashable (by value): the public functions build one from their keyword
    arguments and pass it down; :func:`influx.gaps.decompose` builds its objects' options
    up front, so a bad option fails before any retraining. The fields are the keyword
    arguments documented in :func:`loo` (``optimizer=None`` becomes
    :data:`DEFAULT_OPTIMIZER`; ``tol=None`` stays ``None`` and resolves to the
    parameters' dtype at the call). Raises :class:`influx.errors.InputError` on a bad value.
    """

    optimizer: Any = None
    steps: int = 50
    damping: float = 0.0
    epsilon: float | None = None
    normalization: str = "n"
    baseline: str = "params"
    batch_size: int | None = None
    seed: int = 0
    chunk_size: int = 64
    tol: float | None = None
    keep_params: bool = True
    measurement: Any = None
    observe: Callable | None = None
    warn: bool = True
    on_failure: str = "raise"

    def __post_init__(self):
        put = lambda k, v: object.__setattr__(self, k, v)
        put("optimizer", DEFAULT_OPTIMIZER if self.optimizer is None else _check_optimizer(self.optimizer))
        put("steps", check_int(self.steps, "steps", minimum=1))
        put("damping", check_nonnegative(self.damping, "damping"))
        if self.epsilon is not None:
            try:
                eps = float(self.epsilon)
            except (TypeError, ValueError) as e:
                raise InputError(f"epsilon must be a number, got {self.epsilon!r}") from e
            if not np.isfinite(eps):
                raise InputError(f"epsilon must be finite, got {self.epsilon!r}")
            put("epsilon", eps)
        if self.normalization not in ("n", "n-1"):
            raise InputError(f"normalization must be 'n' or 'n-1', got {self.normalization!r}")
        if self.baseline not in ("params", "retrain"):
            raise InputError(f"baseline must be 'params' or 'retrain', got {self.baseline!r}")
        if self.normalization == "n-1":
            if self.baseline == "retrain":
                raise InputError(
                    "baseline='retrain' needs normalization='n' (the original training's weights)")
            if self.epsilon is not None:
                raise InputError(
                    "epsilon cannot be combined with normalization='n-1' (it removes the example)")
        if self.batch_size is not None:
            put("batch_size", check_int(self.batch_size, "batch_size", minimum=1))
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise InputError(f"seed must be an integer, got {self.seed!r}")
        put("seed", int(self.seed))
        put("chunk_size", check_int(self.chunk_size, "chunk_size", minimum=1))
        if self.tol is not None:
            put("tol", check_nonnegative(self.tol, "tol"))
        if self.observe is not None and not callable(self.observe):
            raise InputError(f"observe must be callable params -> pytree, got {self.observe!r}")
        put("keep_params", bool(self.keep_params))
        put("warn", bool(self.warn))
        _validation.check_on_failure(self.on_failure, allowed=ON_FAILURE)
        if isinstance(self.optimizer, NewtonCG) and self.batch_size is not None:
            raise InputError(
                "optimizer: a line-search optimizer (optax.lbfgs, response.newton) needs the full batch; "
                "use batch_size=None or a first-order optimizer"
            )

    def replace(self, **changes) -> ResponseOptions:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------ the objective
def _coefficients(kind, l2, damping):
    """``(bregman, loo, c_norm, c_prox)`` of the unified objective (see :func:`_make_objective`)."""
    if kind == "loo":
        return (0.0, 1.0, l2, 0.0)
    if kind == "proximal":
        return (0.0, 1.0, l2, damping)
    if kind == "pbrf":
        return (1.0, 0.0, 0.0, l2 + damping)
    raise ValueError(kind)


def _make_objective(obj, theta_s, train, aux, a, coef, n):
    """``F(theta, m, eps, idx)``: the objective of removed example ``m`` on batch ``idx``.

    One formula for every response object, so they share one compiled program::

        F = s sum_{i in batch} (a + loo eps [i == m]) (L_i - bregman (L_i(theta_s) + g_i^T (z_i - z_i,s)))
            + (1 - loo) eps L_m + c_norm/2 ||theta||^2 + c_prox/2 ||theta - theta_s||^2

    with ``coef = (bregman, loo, c_norm, c_prox)`` from :func:`_coefficients`. ``idx=None``
    is the full batch (``s = 1``); a batch of ``B`` examples has ``s = N / B`` so its
    expectation is the full objective. ``a`` is the base weight (1/N or 1/(N-1)).
    """
    bregman, loo_on, c_norm, c_prox = coef

    def F(theta, m, eps, idx, x=None):
        if idx is None:
            batch, scale, ids, aux_b = train, 1.0, jnp.arange(n), aux
        else:
            batch, scale, ids, aux_b = _take(train, idx), n / idx.shape[0], idx, _take(aux, idx)
        xb, yb = batch
        if x is not None:  # the same inputs, as a (replicated) copy owned by this example
            xb = x
        z = obj.apply_fn(theta, xb)
        z_s, g_s, l_s = aux_b
        lin = jnp.sum((g_s * (z - z_s)).reshape(z.shape[0], -1), axis=-1)
        per = obj.loss_fn(z, yb) - bregman * (l_s + lin)
        w = scale * (a + loo_on * eps * (ids == m))
        x_m, y_m = _take(train, m[None])
        l_m = obj.loss_fn(obj.apply_fn(theta, x_m), y_m)[0]
        data = jnp.sum(w * per) + (1.0 - loo_on) * eps * l_m
        reg = 0.5 * c_norm * tree_sqnorm(theta) + 0.5 * c_prox * tree_sqnorm(_tree_sub(theta, theta_s))
        return data + reg

    return F


def _pbrf_aux(obj, theta_s, train):
    """Outputs, output-gradients and losses at ``theta_s`` for the Bregman divergences."""
    x, y = train
    z_s = obj.apply_fn(theta_s, x)
    l_s, vjp = jax.vjp(lambda z: obj.loss_fn(z, y), z_s)
    (g_s,) = vjp(jnp.ones_like(l_s))  # per-example output gradients (losses are separable)
    return z_s, g_s, l_s


#: Largest total size in bytes of the per-example copies of the inputs (see :func:`_replicate`).
_REPLICATE_BYTES = 8 * 2**20


def _replicate_ok(x, c: int, frac: float, budget: int) -> bool:
    """Whether each of ``c`` vmapped solves gets its own copy of (a fraction ``frac`` of) ``x``."""
    size = sum(l.size * l.dtype.itemsize for l in jax.tree_util.tree_leaves(x))
    return c > 1 and jax.default_backend() == "cpu" and c * size * frac <= budget


def _replicate(x, c: int):
    """``c`` materialised copies of ``x`` on a new leading axis.

    Semantically a no-op (every vmapped solve sees the same inputs). It changes how XLA's
    CPU backend lays out the vmapped model: with shared inputs the first layer becomes one
    ``(n, d) @ (d, c h)`` product whose output and gradient XLA then transposes to and
    from ``(c, n, h)`` every step (a strided copy as costly as the layer); with a copy per
    solve every layer is a batched product in its natural layout. Measured on the UCI
    Concrete MLP (``benchmarks/response.py``): 1.5-2x faster vmapped steps. The
    ``optimization_barrier`` keeps XLA from folding the broadcast back into the product.
    Used only on the CPU and while the copies stay small (``_REPLICATE_BYTES``).
    """
    return jax.tree_util.tree_map(
        lambda l: jax.lax.optimization_barrier(jnp.broadcast_to(l, (c,) + l.shape)), x)


@dataclasses.dataclass(frozen=True)
class _Program:
    """The static (compile-time) part of one response computation: one compiled :func:`_run`
    per distinct value. Numbers that may change freely (tolerances, weights, coefficients,
    the seed) are traced arguments instead."""

    step: Any  # a step adapter (_FirstOrderStep, _LineSearchStep, _NewtonStep)
    steps: int
    batch_size: int | None
    chunk_size: int
    keep_params: bool
    measure: Callable
    observe: Callable | None
    replicate_bytes: int = _REPLICATE_BYTES


@functools.partial(jax.jit, static_argnames=("obj", "program"))
def _run(theta_s, theta0, train, test, removed, eps, a, coef, tol, freeze_tol, key, *, obj, program):
    """The compiled engine (module docstring): every chunk of removed examples solved by one loop
    over steps with the step adapter vmapped inside. Its closures share the traced objective and
    data, hence one function a little over 80 lines."""
    step, steps, batch_size = program.step, program.steps, program.batch_size
    n = num_examples(train)
    measure = program.measure
    f = lambda p, t: jax.vmap(lambda ex: measure(p, ex))(t)
    aux = _pbrf_aux(obj, theta_s, train)
    F = _make_objective(obj, theta_s, train, aux, a, coef, n)
    f_s = f(theta_s, test)
    # the schedule of influx.models.train: a cold start replays the original run's batches
    xs = None if batch_size is None else minibatch_indices(n, batch_size=batch_size, steps=steps, seed=key)
    x_train = train[0]

    def solve_chunk(args):
        """Solves the removed examples ``ms`` (one chunk) together: one loop over steps, vmap inside."""
        ms, es = args
        c = ms.shape[0]
        # every example of the chunk gets its own copy of the inputs (see _replicate)
        budget = program.replicate_bytes
        rep_full = _replicate_ok(x_train, c, 1.0, budget)
        rep = rep_full if batch_size is None else _replicate_ok(x_train, c, batch_size / n, budget)
        x_full = _replicate(x_train, c) if rep_full else None

        def step_one(th, st, ok, done, m, e, idx, x):
            v, g, th_new, st_new = step(F, th, st, m, e, idx, x)
            gn = jnp.sqrt(tree_sqnorm(g))
            ok = ok & jnp.isfinite(v) & jnp.isfinite(gn)
            if idx is None:
                done = done | (gn <= freeze_tol)
            ok = ok & _leaves_finite(th_new)
            active = ok & ~done
            th = _tree_where(active, th_new, th)
            st = _tree_where(active, st_new, st)
            return th, st, ok, done, active

        def step_chunk(carry, idx):
            th, st, ok, done, taken = carry
            if idx is None:
                x, x_ax = x_full, (None if x_full is None else 0)
            elif rep:
                x, x_ax = _replicate(_take(x_train, idx), c), 0
            else:
                x, x_ax = None, None
            th, st, ok, done, active = jax.vmap(step_one, in_axes=(0, 0, 0, 0, 0, 0, None, x_ax))(
                th, st, ok, done, ms, es, idx, x)
            return th, st, ok, done, taken + active

        bcast = lambda t: jax.tree_util.tree_map(lambda l: jnp.broadcast_to(l, (c,) + l.shape), t)
        th0 = bcast(theta0)
        carry = (th0, jax.vmap(step.init)(th0), jnp.ones((c,), bool), jnp.zeros((c,), bool),
                 jnp.zeros((c,), jnp.int32))
        if batch_size is None:
            # full batch: stop as soon as every example of the chunk is frozen or failed
            def cond(kc):
                k, (_, _, ok, done, _) = kc
                return (k < steps) & jnp.any(ok & ~done)

            _, carry = jax.lax.while_loop(cond, lambda kc: (kc[0] + 1, step_chunk(kc[1], None)),
                                          (jnp.asarray(0), carry))
        else:
            carry, _ = jax.lax.scan(lambda cr, idx: (step_chunk(cr, idx), None), carry, xs)
        th, _, ok, _, taken = carry

        def final_one(th, ok, m, e, x):
            v, g = jax.value_and_grad(F)(th, m, e, None, x)
            gn = jnp.sqrt(tree_sqnorm(g))
            raw = f(th, test) - f_s
            ok = ok & jnp.isfinite(v) & jnp.isfinite(gn) & jnp.all(jnp.isfinite(raw))
            conv = ok & (gn <= tol)
            status = jnp.where(~ok, Status.NONFINITE, jnp.where(conv, Status.CONVERGED, Status.MAX_STEPS))
            out = {"delta": jnp.where(ok, raw, jnp.nan), "grad_norm": gn, "objective": v, "converged": conv,
                   "status": status}
            if program.keep_params:
                out["params"] = th
            if program.observe is not None:
                out["observed"] = program.observe(th)
            return out

        out = jax.vmap(final_one, in_axes=(0, 0, 0, 0, None if x_full is None else 0))(th, ok, ms, es, x_full)
        out["steps_taken"] = taken
        return out

    out = chunked_map(solve_chunk, (removed, eps), chunk_size=program.chunk_size)
    out["f_s"] = f_s
    return out


# ------------------------------------------------------------------ the public objects
def _resolve_tol(tol, params) -> float:
    """``tol=None``: what the parameters' dtype can reach, 1e-6 in float64, 1e-4 in float32."""
    if tol is not None:
        return tol
    wide = any(jnp.result_type(l) == jnp.float64 for l in jax.tree_util.tree_leaves(params))
    return 1e-6 if wide else 1e-4


def _respond(kind, obj, params, train, removed, *, test, init, options: ResponseOptions) -> Response:
    """One response object (``kind``) with validated ``options``; all checks run before the solve
    (checks, the compiled run, the failure policy and the result: kept together, ~80 lines)."""
    if not isinstance(obj, Objective):
        raise InputError(f"obj must be an influx.Objective, got {type(obj).__name__}")
    if not isinstance(options, ResponseOptions):
        raise InputError(f"options must be a ResponseOptions, got {type(options).__name__}")
    o = options
    n = check_data(obj, params, train, name="train")
    removed = _check_removed(removed, n)
    measure = _check_test(obj, params, test, o.measurement)
    tol = _resolve_tol(o.tol, params)
    batch_size = o.batch_size
    if batch_size is not None:
        if batch_size > n:
            raise InputError(f"batch_size must be <= the number of training examples {n}, got {batch_size}")
        if batch_size == n:
            batch_size = None
    if o.normalization == "n-1":
        if n < 2:
            raise InputError("normalization='n-1' needs at least 2 training examples")
        a, eps = 1.0 / (n - 1), -1.0 / (n - 1)
    else:
        a = 1.0 / n
        eps = -1.0 / n if o.epsilon is None else o.epsilon
    cold = init is not None
    if cold:
        init = check_like(params, init, name="init")
    step = _step_adapter(o.optimizer, params)
    if step.full_batch_only and batch_size is not None:
        raise InputError(
            "optimizer: a line-search optimizer (optax.lbfgs, response.newton) needs the full batch; "
            "use batch_size=None or a first-order optimizer"
        )
    if o.keep_params:
        _memory_ok(params, removed.size + (o.baseline == "retrain"))
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
    r = removed.size
    rem = jnp.asarray(removed)
    eps_v = jnp.full((r,), eps, dtype)
    if o.baseline == "retrain":  # one extra solve with the example's weight unchanged
        rem = jnp.concatenate([rem, rem[:1]])
        eps_v = jnp.concatenate([eps_v, jnp.zeros((1,), dtype)])
    coef = jnp.asarray(_coefficients(kind, obj.l2, o.damping), dtype)
    program = _Program(step=step, steps=o.steps, batch_size=batch_size,
                       chunk_size=min(o.chunk_size, r + (o.baseline == "retrain")),
                       keep_params=o.keep_params, measure=measure, observe=o.observe,
                       replicate_bytes=_REPLICATE_BYTES)
    # a cold start with a first-order optimizer replays the original training step for step (no freezing)
    freeze_tol = -1.0 if cold and not step.full_batch_only else tol
    out = _run(params, init if cold else params, tuple(train), tuple(test), rem, eps_v, jnp.asarray(a, dtype),
               coef, jnp.asarray(tol, dtype), jnp.asarray(freeze_tol, dtype), jax.random.key(o.seed),
               obj=obj, program=program)
    delta, f_ref = out["delta"], out["f_s"]
    status = np.asarray(out["status"][:r])
    take = lambda t: jax.tree_util.tree_map(lambda x: x[:r], t)
    if o.baseline == "retrain":
        if int(out["status"][r]) == Status.NONFINITE:
            _fail(o, kind, f"the baseline retraining (nothing removed) became non-finite; every delta "
                  f"depends on it ({r} rows)", removed)
            status = np.full((r,), int(Status.NONFINITE), status.dtype)
        shift = out["delta"][r]
        f_ref = f_ref + shift
        delta = delta[:r] - shift[None]
    failed = removed[status == Status.NONFINITE]
    if failed.size:
        _fail(o, kind, f"the objective, its gradient, the iterate or the measurement became non-finite "
              f"for {failed.size} of {r} removed examples", failed)
        delta = jnp.where(jnp.asarray(status == Status.NONFINITE)[:, None], jnp.nan, delta)
    info = {"steps": o.steps, "optimizer": o.optimizer, "epsilon": eps, "damping": o.damping, "tol": tol,
            "batch_size": batch_size, "seed": o.seed, "normalization": o.normalization,
            "start": "cold" if cold else "warm", "baseline": o.baseline, "on_failure": o.on_failure,
            "options": o}
    res = Response(
        delta=delta, params=take(out["params"]) if o.keep_params else None,
        grad_norm=out["grad_norm"][:r], objective=out["objective"][:r],
        converged=out["converged"][:r], status=jnp.asarray(status), removed=removed,
        failed=failed, baseline=f_ref,
        observed=take(out["observed"]) if o.observe is not None else None, kind=kind, info=info,
        steps_taken=out["steps_taken"][:r],
    )
    if o.warn:
        _warn(res, kind, tol, o.steps)
    return res


def _memory_ok(params, copies: int) -> None:
    """Refuses ``keep_params=True`` when ``copies`` parameter copies would not fit in memory."""
    from influx import _memory

    leaves = jax.tree_util.tree_leaves(params)
    nbytes = copies * sum(int(np.size(l)) * jnp.result_type(l).itemsize for l in leaves)
    _memory.check_fits(nbytes, what=f"keep_params=True ({copies} parameter copies)",
                       alternative="keep_params=False (and observe=... for what you need of each solution)")


def _fail(o: ResponseOptions, kind: str, what: str, rows) -> None:
    """The failure policy: ``on_failure="raise"`` raises :class:`SolveError`; ``"nan"`` returns."""
    if o.on_failure == "raise":
        rows = np.asarray(rows)
        raise SolveError(
            f"{kind}: {what} (removed indices {rows[:20].tolist()}{' ...' if rows.size > 20 else ''}). "
            "Fix: lower the learning rate, add damping, or use response.newton(); pass on_failure='nan' "
            "to get NaN rows for the failed removals and their status instead of this error"
        )


def _warn(res: Response, kind: str, tol: float, steps: int) -> None:
    if res.failed.size:
        warnings.warn(
            f"{kind}: the objective became non-finite for removed indices {res.failed[:20].tolist()}"
            f"{' ...' if res.failed.size > 20 else ''} (stopped at their last finite iterate, delta = NaN); "
            "lower the learning rate or add damping",
            RuntimeWarning, stacklevel=3,
        )
    nc = ~np.asarray(res.converged) & (np.asarray(res.status) != Status.NONFINITE)
    if nc.any():
        worst = float(np.max(np.asarray(res.grad_norm)[nc]))
        warnings.warn(
            f"{kind}: {int(nc.sum())} of {nc.size} solves did not reach ||grad|| <= tol={tol:g} in "
            f"{steps} steps (worst {worst:.3g}; removed indices {res.removed[nc][:10].tolist()}"
            f"{' ...' if nc.sum() > 10 else ''}); raise steps, use response.newton(), or loosen tol",
            RuntimeWarning, stacklevel=3,
        )


@_boundary
def respond(kind: str, obj: Objective, params, train, removed, *, test, init=None,
            options: ResponseOptions | None = None) -> Response:
    """The response object ``kind`` (``"loo"``, ``"proximal"`` or ``"pbrf"``) with ``options``.

    The options-object form of :func:`loo`, :func:`proximal` and :func:`pbrf` (which build
    a :class:`ResponseOptions` from their keyword arguments and call this): useful to
    validate every option of several objects before running any of them.
    """
    if kind not in ("loo", "proximal", "pbrf"):
        raise InputError(f"kind must be 'loo', 'proximal' or 'pbrf', got {kind!r}")
    options = ResponseOptions() if options is None else options
    if kind != "loo" and init is not None:
        raise InputError(f"{kind} is warm-started at params; init is only for loo")
    if kind == "loo" and options.damping != 0:
        raise InputError("loo has no damping (use kind='proximal')")
    if kind != "loo" and (options.normalization != "n" or options.baseline != "params"):
        raise InputError(f"{kind}: normalization and baseline are options of loo only")
    return _respond(kind, obj, params, train, removed, test=test, init=init, options=options)


_COMMON_DOC = """
    Args:
      obj: the :class:`influx.Objective` (its ``l2`` is part of every objective).
      params: the trained parameters ``theta_s`` (ideally a minimiser of ``J``).
      train: the training set ``(x, y)`` the model was trained on (``N`` examples).
      removed: 1-D sequence of distinct indices in ``[0, N)``.
      test: ``(x, y)`` test set (``y`` may be ``None`` for a measurement that ignores
        labels).
      optimizer: optax transformation for the inner minimisation (default: the shared
        :data:`DEFAULT_OPTIMIZER`, full-batch Newton-CG, see :func:`newton`), or
        ``optax.lbfgs()``, ``optax.adam(...)``, ... Reuse one instance
        across calls: a new instance recompiles.
      steps: number of optimizer steps (``>= 1``); in full-batch mode a chunk stops earlier
        once all its examples have converged (``Response.steps_taken``).
      epsilon: weight added to the removed example's loss (default ``-1/N``, removal).
        A small multiple ``t * (-1/N)`` gives the finite-difference check of influence.
      batch_size: ``None`` (full batch, default) or minibatches of
        :func:`influx.models.minibatch_indices` (``seed``), the same for every removed example.
      chunk_size: removed examples solved together by ``vmap`` (bounds memory).
      tol: convergence threshold on the final full-batch gradient norm (default: 1e-6 for
        float64 parameters, 1e-4 for float32); in full-batch
        mode an example is frozen once its gradient norm reaches it.
      keep_params: return the solutions stacked per removed example (refused with
        :class:`influx.errors.ResourceError` when the copies would not fit in memory).
      measurement: ``None`` (the test loss), an :data:`influx.measurements` value, or a
        callable ``f(params, (x_t, y_t)) -> scalar`` on one unbatched test example (the
        convention of :func:`influx.influence`).
      observe: ``params -> pytree`` evaluated on each solution inside the program
        (an alternative to keeping the parameters).
      warn: emit a ``RuntimeWarning`` for non-converged (or, with ``on_failure="nan"``,
        non-finite) solves.
      on_failure: what a failed solve (objective, gradient, iterate or measurement
        non-finite; status ``NONFINITE``) does: ``"raise"`` (default) raises
        :class:`influx.errors.SolveError` naming the failed removals and the fix;
        ``"nan"`` returns their ``delta`` rows as NaN (never 0) with ``status`` and
        ``failed`` saying which. A solve that is finite but did not reach ``tol`` in
        ``steps`` is not a failure: it is returned with status ``MAX_STEPS``,
        ``converged=False`` and a warning.

    Returns: :class:`Response` with ``delta`` of shape ``(len(removed), n_test)``.

    Raises:
      InputError: indices out of range or duplicated, a test set without labels for the
      default measurement, ``steps < 1``, negative ``damping``, a line-search optimizer
      with minibatches, bad shapes -- before any computation.
      SolveError: a failed solve with ``on_failure="raise"``.
"""


@_boundary
def loo(obj: Objective, params, train, removed, *, test, init=None, optimizer=None,
        steps: int = _DEFAULT_STEPS, epsilon: float | None = None, normalization: str = "n",
        baseline: str = "params", batch_size: int | None = None, seed: int = 0,
        chunk_size: int = 64, tol: float | None = None, keep_params: bool = True,
        measurement=None, observe: Callable | None = None,
        warn: bool = True, on_failure: str = "raise") -> Response:
    """Leave-one-out retraining (see the module docstring for the objective).

    ``init=None``: warm start, minimise ``J_m`` from ``theta_s``. ``init=<pytree>``: cold
    start, retrain from ``init`` -- pass the *same* ``optimizer``, ``steps``,
    ``batch_size`` and ``seed`` as the original training (with :func:`influx.models.train`
    the minibatch order is identical: both use :func:`influx.models.minibatch_indices`),
    so that the only difference is the removed
    example; then ``baseline="retrain"`` measures against the full-data run of the same
    program instead of ``params`` (cancels the shared optimisation error).
    ``normalization``: ``"n"`` (default, removed weight set to 0, others keep ``1/N``)
    or ``"n-1"`` (mean over the ``N - 1`` remaining examples).
    """
    if init is not None and optimizer is None:
        raise InputError(
            "loo: a cold start (init=...) needs the optimizer (and steps) of the original training")
    options = ResponseOptions(optimizer=optimizer, steps=steps, epsilon=epsilon, normalization=normalization,
                              baseline=baseline, batch_size=batch_size, seed=seed, chunk_size=chunk_size,
                              tol=tol, keep_params=keep_params, measurement=measurement, observe=observe,
                              warn=warn, on_failure=on_failure)
    return _respond("loo", obj, params, train, removed, test=test, init=init, options=options)


@_boundary
def proximal(obj: Objective, params, train, removed, *, test, damping: float, optimizer=None,
             steps: int = _DEFAULT_STEPS, epsilon: float | None = None, batch_size: int | None = None,
             seed: int = 0, chunk_size: int = 64, tol: float | None = None, keep_params: bool = True,
             measurement=None, observe: Callable | None = None,
             warn: bool = True, on_failure: str = "raise") -> Response:
    """Proximal LOO: warm-start ``J_m(theta) + damping/2 ||theta - theta_s||^2`` from ``theta_s``.
    """
    options = ResponseOptions(optimizer=optimizer, steps=steps, damping=damping, epsilon=epsilon,
                              batch_size=batch_size, seed=seed, chunk_size=chunk_size, tol=tol,
                              keep_params=keep_params, measurement=measurement, observe=observe, warn=warn,
                              on_failure=on_failure)
    return _respond("proximal", obj, params, train, removed, test=test, init=None, options=options)


@_boundary
def pbrf(obj: Objective, params, train, removed, *, test, damping: float, optimizer=None,
         steps: int = _DEFAULT_STEPS, epsilon: float | None = None, batch_size: int | None = None,
         seed: int = 0, chunk_size: int = 64, tol: float | None = None, keep_params: bool = True,
         measurement=None, observe: Callable | None = None,
         warn: bool = True, on_failure: str = "raise") -> Response:
    """Proximal Bregman response function (Bae et al. 2022), warm-started at ``theta_s``.

    With minibatches the Bregman term is estimated on each batch and the removal term
    ``eps L_m`` is added at every step.
    """
    options = ResponseOptions(optimizer=optimizer, steps=steps, damping=damping, epsilon=epsilon,
                              batch_size=batch_size, seed=seed, chunk_size=chunk_size, tol=tol,
                              keep_params=keep_params, measurement=measurement, observe=observe, warn=warn,
                              on_failure=on_failure)
    return _respond("pbrf", obj, params, train, removed, test=test, init=None, options=options)


for _f in (loo, proximal, pbrf):
    _f.__doc__ = _f.__doc__.rstrip() + "\n" + _COMMON_DOC
del _f


# ------------------------------------------------------------------ linearised PBRF
def _default_exact_solver(dim: int):
    from influx import solvers

    if dim <= 4096 or not hasattr(solvers, "cg"):
        return solvers.direct()
    return solvers.cg(tol=1e-12, max_steps=10 * dim)


@_boundary
def linearized(obj: Objective, params, train, removed, *, test, damping: float, solver=None,
               epsilon: float | None = None, chunk_size: int = 256, measurement=None,
               on_failure: str = "raise") -> Response:
    """First-order solution of the PBRF: ``delta_t = -eps g_t^T (G + (l2 + damping) I)^-1 g_m``.

    ``G`` is the Gauss-Newton matrix of the data term at ``theta_s``, ``g_t`` the gradient
    of test measurement ``t``, ``g_m`` that of the removed example's loss, ``eps``
    defaults to ``-1/N`` (then ``delta`` is exactly the GNH influence score
    :func:`influx.influence`, which computes it). ``solver`` defaults to an exact one:
    ``influx.solvers.direct()`` up to 4096 parameters, converged CG beyond; pass a
    practical solver to get the influence it would give.

    Failure policy: a test point whose solve did not converge (or whose column is not
    finite) is a failed solve; ``on_failure="raise"`` (default) raises
    :class:`influx.errors.SolveError` naming the test points, the worst residual and the
    fix; ``"nan"`` returns those ``delta`` columns as NaN (never 0), every row's status
    ``MAX_STEPS`` and the failed test indices in ``info["failed_test"]``.

    Cost: that of :func:`influx.influence` (``n_test`` solves and one pass over the
    training set). ``params``, ``grad_norm`` and ``objective`` of the result are
    ``None``/NaN (nothing is minimised).
    """

    from influx.attribution import influence

    if not isinstance(obj, Objective):
        raise InputError(f"obj must be an influx.Objective, got {type(obj).__name__}")
    n = check_data(obj, params, train, name="train")
    removed = _check_removed(removed, n)
    f = _check_test(obj, params, test, measurement)
    damping = check_nonnegative(damping, "damping")
    chunk_size = check_int(chunk_size, "chunk_size", minimum=1)
    _validation.check_on_failure(on_failure, allowed=ON_FAILURE)
    try:
        eps = -1.0 / n if epsilon is None else float(epsilon)
    except (TypeError, ValueError) as e:
        raise InputError(f"epsilon must be a number, got {epsilon!r}") from e
    if not np.isfinite(eps):
        raise InputError(f"epsilon must be finite, got {epsilon!r}")
    if solver is None:
        dim = sum(int(np.size(l)) for l in jax.tree_util.tree_leaves(params))
        solver = _default_exact_solver(dim)
    kw = {"on_failure": "nan"}  # the policy is applied here, per column
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # reported below, with the policy
        scores, info = influence(obj, params, tuple(train), tuple(test), kind="gnh", damping=damping,
                                 solver=solver, measurement=measurement, chunk_size=chunk_size,
                                 return_info=True, **kw)
    delta = (-eps * n) * np.asarray(scores)[:, np.asarray(removed)].T
    r = removed.size
    bad_t = ~np.all(np.isfinite(delta), axis=0)
    if info.converged is not None:
        bad_t |= ~np.asarray(info.converged, bool).reshape(-1)
    failed_t = np.flatnonzero(bad_t)
    res_max = None if info.residual_norm is None else float(np.nanmax(np.asarray(info.residual_norm)))
    if failed_t.size:
        worst = res_max if res_max is not None else float("nan")
        more = " ..." if failed_t.size > 20 else ""
        msg = (f"linearized: the solve of {failed_t.size} of {bad_t.size} test points did not converge "
               f"(test indices {failed_t[:20].tolist()}{more}; worst relative residual {worst:.3g}, "
               f"solver {solver!r})")
        if on_failure == "raise":
            raise SolveError(msg + ". Fix: raise the solver's max_steps, add damping, or use the exact "
                             "default solver (solver=None); pass on_failure='nan' for NaN columns instead")
        warnings.warn(msg + "; their delta columns are NaN", RuntimeWarning, stacklevel=2)
        delta[:, failed_t] = np.nan
    ok = not failed_t.size
    nan = jnp.full((r,), jnp.nan, delta.dtype)
    return Response(
        delta=jnp.asarray(delta), params=None, grad_norm=nan, objective=nan,
        converged=np.full((r,), ok),
        status=np.full((r,), Status.CONVERGED if ok else Status.MAX_STEPS),
        removed=removed, failed=np.zeros((0,), np.int32),
        baseline=jax.vmap(lambda ex: f(params, ex))(tuple(test)), kind="linearized",
        info={"epsilon": eps, "damping": damping, "solver": repr(solver), "solver_residual_max": res_max,
              "failed_test": failed_t, "on_failure": on_failure},
    )


# ------------------------------------------------------------------ subset retraining
class Retrain(NamedTuple):
    """Result of :func:`retrain` (one row per weight vector).

    Attributes:
      delta: ``(M, n_test)`` change ``f_t(theta_w) - f_t(theta_1)`` of each test
        measurement against the all-ones run (NaN rows for failed runs, never 0).
      measured: ``(M, n_test)`` the measurements ``f_t(theta_w)`` themselves.
      baseline: ``(n_test,)`` ``f_t(theta_1)``, the all-ones run (the original training).
      loss: ``(M,)`` final weighted training objective ``1/N sum_i w_i L_i + l2/2 ||theta||^2``
        (full batch) at each run's final parameters.
      finite: ``(M,)`` bool, every loss along the run, the final parameters and the
        measurements are finite.
      failed: row indices whose run was not finite.
      params: the final parameters stacked per row (``keep_params=True``), else ``None``.
      info: settings (steps, batch_size, seed, chunk_size, resumed rows, ...).
    """

    delta: Any
    measured: Any
    baseline: Any
    loss: Any
    finite: Any
    failed: np.ndarray
    params: Any = None
    info: dict = {}


def random_subsets(n: int, m: int, *, alpha: float, seed: int = 0) -> np.ndarray:
    """``m`` random training subsets that each drop a fraction ``alpha`` of ``n`` examples.

    Returns an ``(m, n)`` boolean array of *kept* examples (usable directly as
    :func:`retrain`'s ``weights``): every row keeps exactly ``n - k`` examples, with
    ``k = max(1, round(alpha n))`` dropped uniformly at random without replacement,
    independently per row; the same ``seed`` gives the same subsets. (For
    :func:`influx.metrics.linear_datamodeling_score` pass ``kept=True``.)

    Raises InputError for ``alpha`` outside ``(0, 1)``, ``m < 1``, ``n < 2`` or a ``k``
    that would drop every example.
    """
    n = check_int(n, "n", minimum=2)
    m = check_int(m, "m", minimum=1)
    a = check_fraction(alpha, "alpha (the fraction of examples dropped)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"seed must be an integer, got {seed!r}")
    k = max(1, int(round(a * n)))
    if k >= n:
        raise InputError(f"alpha={a} drops all {n} examples; use a smaller alpha")
    rng = np.random.default_rng(int(seed))
    order = np.argsort(rng.random((m, n)), axis=1)
    keep = np.ones((m, n), bool)
    np.put_along_axis(keep, order[:, :k], False, axis=1)
    return keep


def _check_weights(weights, n: int) -> np.ndarray:
    try:
        w = np.asarray(weights)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"weights: expected an (M, {n}) array, got {type(weights).__name__}") from e
    if w.ndim != 2 or w.shape[1] != n or w.shape[0] < 1:
        raise InputError(f"weights: expected shape (M, {n}) (one row of per-example weights per run, "
                         f"M >= 1), got {w.shape}")
    if w.dtype == bool:
        w = w.astype(np.float64)
    if not np.issubdtype(w.dtype, np.number) or np.iscomplexobj(w):
        raise InputError(f"weights: expected real numbers or booleans, got dtype {w.dtype}")
    bad = ~np.isfinite(w) | (w < 0)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise InputError(f"weights: entries must be finite and >= 0 (a 0/1 mask or real weights); "
                         f"{int(bad.sum())} are not, first at row {r}, column {c}: {w[r, c]!r}")
    empty = np.flatnonzero(~np.any(w > 0, axis=1))
    if empty.size:
        raise InputError(f"weights: rows {empty[:10].tolist()} give every example weight 0 "
                         "(nothing to train on)")
    return w


@functools.partial(jax.jit, static_argnames=("obj", "opt", "steps", "batch_size", "chunk_size", "keep_params",
                                             "measure", "replicate_bytes"))
def _retrain_run(init, train, test, weights, l2, key, *, obj, opt, steps, batch_size, chunk_size, keep_params,
                 measure, replicate_bytes=_REPLICATE_BYTES):
    from influx.models import train_loop

    x, y = train

    def one(w, xr):
        data = (x if xr is None else xr, y)
        p, losses = train_loop(obj.apply_fn, obj.loss_fn, opt, init, data, l2=l2, steps=steps,
                               batch_size=batch_size, seed=key, weights=w)
        loss = jnp.mean(w * obj.per_example_loss(p, data)) + 0.5 * l2 * tree_sqnorm(p)
        meas = jax.vmap(lambda ex: measure(p, ex))(test)
        finite = (_leaves_finite(p) & jnp.isfinite(loss) & jnp.all(jnp.isfinite(meas))
                  & jnp.all(jnp.isfinite(losses)))
        out = {"measured": meas, "loss": loss, "finite": finite}
        if keep_params:
            out["params"] = p
        return out

    def chunk(ws):
        c = ws.shape[0]
        if c == 1:  # no vmap: one plain run (vmapped convolutions become grouped ones, slow on XLA:CPU)
            return jax.tree_util.tree_map(lambda a: a[None], one(ws[0], None))
        # full batch on the CPU: each run gets its own copy of the inputs (see _replicate)
        if batch_size is None and _replicate_ok(x, c, 1.0, replicate_bytes):
            return jax.vmap(one)(ws, _replicate(x, c))
        return jax.vmap(one, in_axes=(0, None))(ws, None)

    return chunked_map(chunk, weights, chunk_size=chunk_size)


#: Largest total size of the per-run input copies of full-batch :func:`retrain` on the CPU
#: (:func:`_replicate`): measured on the digits MLP (128 runs, 47 MB of copies) it turns a
#: 0.3-0.4x slowdown of the vmapped program against the loop into a speed-up.
_RETRAIN_REPLICATE_BYTES = 64 * 2**20


def _digest_tree(tree) -> str:
    import hashlib

    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(tree):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:32]


def _probe_optimizer(opt, init) -> str:
    """A digest of two updates of ``opt`` on a fixed pseudo-gradient: tells optimizers apart
    (learning rate, schedule, momentum) where their ``repr`` cannot (it names closures)."""
    leaves, tdef = jax.tree_util.tree_flatten(init)
    g = jax.tree_util.tree_unflatten(tdef, [jnp.full(jnp.shape(l), 0.01 * (i + 1), jnp.result_type(l))
                                            for i, l in enumerate(leaves)])
    s = opt.init(init)
    u1, s = opt.update(g, s, init)
    u2, _ = opt.update(g, s, init)
    return _digest_tree((u1, u2))


@_boundary
def retrain(obj: Objective, init_params, train, weights, *, test, optimizer, steps: int,
            batch_size: int | None = None, seed: int = 0, measurement=None, chunk_size: int | None = None,
            keep_params: bool = False, on_failure: str = "raise", out_dir=None) -> Retrain:
    """Retrains from ``init_params`` once per row of ``weights`` and measures the test set.

    Row ``r`` of ``weights`` (``(M, N)``: a 0/1 mask of kept examples, e.g. from
    :func:`random_subsets`, or real weights ``>= 0``) replays the original training run --
    the same ``optimizer``, ``steps``, minibatches (:func:`influx.models.minibatch_indices`
    with ``batch_size`` and ``seed``) -- on the weighted objective

        J_w(theta) = 1/|B| sum_{i in B} w_i L_i(theta) + l2/2 ||theta||^2     (each batch B)

    (:func:`influx.models.train_loop`; all ones is exactly :func:`influx.models.train`).
    A removed example keeps its slot in the batches with weight 0: the other examples'
    weights do not change (the convention of :func:`loo` with ``normalization="n"``).
    The runs are ``vmap``-ped ``chunk_size`` at a time inside one compiled program;
    the all-ones run is computed too (one extra row) and ``delta = f(theta_w) - f(theta_1)``.

    Args:
      obj: the :class:`influx.Objective` (``l2`` included).
      init_params: the original initialisation.
      train: ``(x, y)`` with ``N`` examples.
      weights: ``(M, N)`` per-example weights (bool or real, finite, ``>= 0``, no all-zero row).
      test: ``(x, y)`` test set; measurement: as in :func:`loo` (default: test loss).
      optimizer, steps, batch_size, seed: the original training's (use :func:`check_replay`
        to verify that they reproduce the trained parameters).
      chunk_size: runs per ``vmap`` batch (memory: ``chunk_size`` parameter and optimizer
        state copies plus activations); ``1`` runs one plain (not vmapped) run at a time.
        ``None`` (default): :func:`retrain_chunk_size` -- 32, or 1 for a model with
        convolutions on the CPU (vmapped over runs, a convolution's kernel gets a batch axis
        and XLA:CPU runs it as a grouped convolution: 5 runs of a small MNIST CNN took 2.8x
        longer vmapped than one after the other).
      keep_params: also return every run's final parameters (refused if they do not fit).
      on_failure: a non-finite run: ``"raise"`` (default, :class:`influx.errors.SolveError`
        naming the rows) or ``"nan"`` (NaN rows, ``finite``/``failed`` say which).
      out_dir: a directory for resumable long grids (:mod:`influx._store`): every chunk of
        rows is committed with a checksum; a killed run resumes at the first uncommitted
        chunk and gives identical results. Refused with other inputs (data, weights,
        optimizer, steps, ...) than the ones it was started with. Not with ``keep_params``.

    Cost: ``(M + 1) x steps`` gradient evaluations on the (mini)batch, plus one full-batch
    loss and one test measurement per run.

    (Over 80 lines only by this docstring: about 45 lines of code.)
    """
    n, w, measure, optimizer, steps, batch_size, chunk_size = _check_retrain(
        obj, init_params, train, weights, test=test, optimizer=optimizer, steps=steps, batch_size=batch_size,
        seed=seed, measurement=measurement, chunk_size=chunk_size, keep_params=keep_params,
        on_failure=on_failure, out_dir=out_dir)
    m = w.shape[0]
    if keep_params:
        _memory_ok(init_params, m + 1)
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(init_params))
    w_all = np.concatenate([np.ones((1, n), w.dtype), w]).astype(dtype)  # row 0: the all-ones run
    l2 = jnp.asarray(obj.l2, dtype)
    key = jax.random.key(int(seed))
    static = dict(obj=obj, opt=optimizer, steps=steps, batch_size=batch_size, keep_params=keep_params,
                  measure=measure, replicate_bytes=_RETRAIN_REPLICATE_BYTES)
    args = (init_params, tuple(train), tuple(test))
    resumed = 0
    if out_dir is None:
        out = _retrain_run(*args, jnp.asarray(w_all), l2, key, chunk_size=min(chunk_size, m + 1), **static)
        measured, loss, finite = (np.asarray(out[k]) for k in ("measured", "loss", "finite"))
        params = out.get("params")
    else:
        measured, loss, finite, resumed = _retrain_stored(out_dir, args, w_all, l2, key, chunk_size, static,
                                                          seed=int(seed))
        params = None
    base_ok = bool(finite[0])
    baseline = measured[0]
    measured, loss, finite = measured[1:], loss[1:], finite[1:].astype(bool)
    if not base_ok:
        if on_failure == "raise":
            raise SolveError("retrain: the all-ones run (the original training) became non-finite; every "
                             "delta depends on it. Fix: lower the learning rate or check init_params/data")
        finite = np.zeros_like(finite)
    failed = np.flatnonzero(~finite)
    if failed.size and on_failure == "raise":
        raise SolveError(
            f"retrain: {failed.size} of {m} runs became non-finite (weight rows {failed[:20].tolist()}"
            f"{' ...' if failed.size > 20 else ''}). Fix: lower the learning rate; pass on_failure='nan' to "
            "get NaN rows for them instead of this error")
    delta = np.where(finite[:, None], measured - baseline[None], np.nan)
    measured = np.where(finite[:, None], measured, np.nan)
    info = {"steps": steps, "batch_size": batch_size, "seed": int(seed), "chunk_size": chunk_size,
            "optimizer": optimizer, "n_train": n, "rows": m, "resumed_rows": resumed,
            "out_dir": None if out_dir is None else str(out_dir)}
    if params is not None:
        params = jax.tree_util.tree_map(lambda a: a[1:], params)
    return Retrain(delta=delta, measured=measured, baseline=baseline, loss=loss, finite=finite, failed=failed,
                   params=params, info=info)


def retrain_chunk_size(obj: Objective, init_params, train) -> int:
    """The default ``chunk_size`` of :func:`retrain`: ``1`` (runs one after the other, not
    vmapped) when ``obj.apply_fn`` has a convolution and the default backend is the CPU,
    else 32. Traces ``apply_fn`` on one example (no FLOPs)."""
    if jax.default_backend() != "cpu":
        return 32
    x1 = jax.tree_util.tree_map(lambda a: a[:1], tuple(train)[0])
    return 1 if _xla.conv_on_cpu(obj.apply_fn, init_params, x1) else 32


def _check_retrain(obj, init_params, train, weights, *, test, optimizer, steps, batch_size, seed, measurement,
                   chunk_size, keep_params, on_failure, out_dir):
    """Every check of :func:`retrain`'s arguments, before any work or side effect."""
    if not isinstance(obj, Objective):
        raise InputError(f"obj must be an influx.Objective, got {type(obj).__name__}")
    n = check_data(obj, init_params, train, name="train")
    w = _check_weights(weights, n)
    measure = _check_test(obj, init_params, test, measurement)
    optimizer = _check_optimizer(optimizer)
    steps = check_int(steps, "steps", minimum=1)
    chunk_size = (retrain_chunk_size(obj, init_params, train) if chunk_size is None
                  else check_int(chunk_size, "chunk_size", minimum=1))
    _validation.check_on_failure(on_failure, allowed=ON_FAILURE)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"seed must be an integer, got {seed!r}")
    if batch_size is not None:
        batch_size = check_int(batch_size, "batch_size", minimum=1)
        if batch_size > n:
            raise InputError(f"batch_size must be <= the number of training examples {n}, got {batch_size}")
        batch_size = None if batch_size == n else batch_size
    if out_dir is not None and keep_params:
        raise InputError("retrain: keep_params=True cannot be combined with out_dir "
                         "(parameters are not stored)")
    return n, w, measure, optimizer, steps, batch_size, chunk_size


def _retrain_stored(out_dir, args, w_all, l2, key, chunk_size, static, *, seed):
    """The chunk loop of :func:`retrain` on a resumable :mod:`influx._store` directory.

    The store's array is ``(M + 1, n_test + 2)``: per row the measurements, the final loss
    and the finite flag; rows are committed a chunk at a time (the manifest is the commit
    point), so a resumed run computes only the uncommitted chunks, each with the same
    compiled program as before (identical results)."""
    from influx import _store

    init, train, test = args
    rows, n_test = w_all.shape[0], jax.tree_util.tree_leaves(test)[0].shape[0]
    f0 = jax.vmap(lambda ex: static["measure"](init, ex))(tuple(test))
    inputs = {"init": _digest_tree(init), "train": _digest_tree(train), "test": _digest_tree(test),
              "weights": _digest_tree(w_all), "optimizer": _probe_optimizer(static["opt"], init),
              "measurement": _digest_tree(f0), "steps": static["steps"], "batch_size": static["batch_size"],
              "seed": seed, "l2": float(l2), "chunk_size": int(chunk_size), "dtype": str(w_all.dtype)}
    resumed = 0
    with _store.open_store(out_dir, kind="retrain", inputs=inputs, shape=(rows, n_test + 2), dtype=np.float64,
                           axis=0, array="retrain.npy",
                           space_hint="pass out_dir=None to keep the results in memory") as store:
        resumed = store.done
        for start in range(store.done, rows, chunk_size):
            stop = min(start + chunk_size, rows)
            out = _retrain_run(init, train, test, jnp.asarray(w_all[start:stop]), l2, key,
                               chunk_size=chunk_size, **static)
            block = np.concatenate([np.asarray(out["measured"], np.float64),
                                    np.asarray(out["loss"], np.float64)[:, None],
                                    np.asarray(out["finite"], np.float64)[:, None]], axis=1)
            store.commit(stop, block)
        if not store.complete:
            store.finish()
        data = np.array(store.array)
    return data[:, :n_test], data[:, n_test], data[:, n_test + 1] > 0.5, resumed


def check_replay(obj: Objective, init_params, train, params, *, optimizer, steps: int,
                 batch_size: int | None = None, seed: int = 0, rtol: float | None = None) -> float:
    """Checks that the training description reproduces ``params``; returns the relative difference.

    Replays :func:`influx.models.train` from ``init_params`` with all weights 1 (the run
    :func:`retrain` and the metagradients differentiate or repeat) and compares the result
    with ``params`` leaf by leaf: ``||replay - params|| / max(||params||, tiny)`` must be
    ``<= rtol`` (default ``1e-8`` for float64 parameters, ``1e-4`` for float32). Raises
    :class:`influx.errors.InputError` naming the leaf that differs most, both norms and the
    settings to check otherwise. Cost: one training run.
    """
    from influx import models

    if not isinstance(obj, Objective):
        raise InputError(f"obj must be an influx.Objective, got {type(obj).__name__}")
    params = check_like(init_params, params, name="params")
    optimizer = _check_optimizer(optimizer)
    if rtol is None:
        wide = any(jnp.result_type(l) == jnp.float64 for l in jax.tree_util.tree_leaves(params))
        rtol = 1e-8 if wide else 1e-4
    rtol = check_nonnegative(rtol, "rtol")
    replay = models.train(obj.apply_fn, obj.loss_fn, init_params, tuple(train), l2=obj.l2,
                          optimizer=optimizer, steps=steps, batch_size=batch_size, seed=seed).params
    worst, worst_path, total = -1.0, None, 0.0
    flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_r = jax.tree_util.tree_leaves(replay)
    for (path, p), r in zip(flat_p, flat_r):
        p, r = np.asarray(p, np.float64), np.asarray(r, np.float64)
        d = float(np.linalg.norm(r - p)) if np.all(np.isfinite(r)) else float("inf")
        rel = d / max(float(np.linalg.norm(p)), np.finfo(np.float64).tiny)
        total = max(total, rel)
        if rel > worst:
            worst, worst_path = rel, jax.tree_util.keystr(path)
    if not total <= rtol:
        raise InputError(
            f"check_replay: replaying the training (steps={steps}, batch_size={batch_size}, seed={seed}) "
            f"from init_params with all weights 1 does not reproduce params: leaf {worst_path} differs by "
            f"{worst:.3g} relative (> rtol={rtol:g}); pass the optimizer object, steps, batch_size and "
            "seed of the original influx.models.train run (and the same l2, data order and dtype)")
    return total
