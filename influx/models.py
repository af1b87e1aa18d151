"""Small Flax linen reference models and a compiled training loop for the studies.

Models:

* :class:`MLP` (``widths`` hidden layers, ``out`` outputs, smooth activation by default)
  and :func:`mlp` (``depth`` hidden layers of equal ``width``).
* :class:`CNN`: conv (3x3, SAME) -> activation -> 2x2 average pool per entry of
  ``channels``, then a dense readout; for 28x28x1 (MNIST) or 8x8x1 (digits) inputs.

Both accept a single example or any number of leading batch axes, so per-example
functions can ``vmap`` over unbatched inputs.

Parameters are the ``"params"`` collection: :func:`init` returns it and
:func:`apply_fn` gives the influx-style ``apply_fn(params, x) -> outputs``.

Training (:func:`train`, :func:`train_to_convergence`) minimises the influx objective

    J(theta) = mean_i loss_fn(apply_fn(theta, x_i), y_i) + l2/2 ||theta||^2

with optax, as one ``lax.scan`` (no Python loop over steps); optionally followed by
full-batch L-BFGS until ``||grad J|| < tol`` -- influence functions assume ``theta_s`` is
a minimiser of J, so studies should check ``grad_norm``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from influx.errors import InputError
from influx.objective import Objective, tree_sqnorm
from influx.validation import check_int, check_nonnegative

__all__ = [
    "ACTIVATIONS",
    "CNN",
    "MLP",
    "ConvergedResult",
    "TrainResult",
    "apply_fn",
    "init",
    "minibatch_indices",
    "mlp",
    "objective",
    "train",
    "train_loop",
    "train_to_convergence",
]

ACTIVATIONS: dict[str, Callable] = {
    "tanh": jnp.tanh,
    "relu": nn.relu,
    "gelu": nn.gelu,
    "softplus": nn.softplus,
    "sigmoid": nn.sigmoid,
}


def _activation(name: str) -> Callable:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MLP(nn.Module):
    """Multilayer perceptron: ``Dense(w) -> act`` for each ``w`` in ``widths``, then
    ``Dense(out)`` (linear outputs: logits or regression values).

    ``widths=()`` is a linear model. Inputs are (..., d) feature vectors.
    """

    widths: Sequence[int]
    out: int
    activation: str = "tanh"

    @nn.compact
    def __call__(self, x):
        act = _activation(self.activation)
        for w in self.widths:
            x = act(nn.Dense(int(w))(x))
        return nn.Dense(int(self.out))(x)


def mlp(depth: int, width: int, out: int, activation: str = "tanh") -> MLP:
    """An :class:`MLP` with ``depth`` hidden layers of ``width`` units (depth 0: linear)."""
    depth = check_int(depth, "depth", minimum=0)
    width = check_int(width, "width", minimum=1)
    _activation(activation)
    return MLP(widths=(int(width),) * int(depth), out=int(out), activation=activation)


class CNN(nn.Module):
    """Small conv net: per entry of ``channels`` a 3x3 SAME conv, activation and 2x2
    average pool (smooth, unlike max pooling), then flatten and ``Dense(out)``.

    Inputs (..., H, W, C), e.g. (N, 28, 28, 1) or (8, 8, 1) for one digit.
    """

    channels: Sequence[int] = (8, 16)
    out: int = 10
    activation: str = "tanh"

    @nn.compact
    def __call__(self, x):
        act = _activation(self.activation)
        if x.ndim < 3:
            raise ValueError(f"CNN expects inputs (..., H, W, C), got shape {x.shape}")
        for c in self.channels:
            x = act(nn.Conv(int(c), kernel_size=(3, 3), padding="SAME")(x))
            x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2), padding="SAME")
        x = x.reshape(x.shape[:-3] + (-1,))
        return nn.Dense(int(self.out))(x)


def init(model: nn.Module, x_example, *, seed: int = 0, dtype=None):
    """Initialise ``model`` on an example input; returns the ``"params"`` collection.

    Parameters get ``dtype`` (default: the example's dtype if it is floating, so float64
    inputs give float64 parameters -- flax alone would make them float32).
    """
    x = jnp.asarray(x_example)
    variables = model.init(jax.random.key(seed), x)
    if dtype is None and jnp.issubdtype(x.dtype, jnp.floating):
        dtype = x.dtype
    params = variables["params"]
    if dtype is not None:
        params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
    return params


def apply_fn(model: nn.Module) -> Callable:
    """``apply_fn(params, x) = model.apply({"params": params}, x)`` (influx convention)."""

    def f(params, x):
        return model.apply({"params": params}, x)

    return f


def _as_apply(model_or_apply_fn) -> Callable:
    if isinstance(model_or_apply_fn, nn.Module):
        return apply_fn(model_or_apply_fn)
    if not callable(model_or_apply_fn):
        raise TypeError("model_or_apply_fn must be a flax Module or apply_fn(params, x)")
    return model_or_apply_fn


def objective(model_or_apply_fn, loss_fn: Callable, *, l2: float) -> Callable:
    """``J(params, x, y) = mean(loss_fn(apply_fn(params, x), y)) + l2/2 ||params||^2``.

    The :class:`influx.Objective` ``J`` with the data as two arguments (``l2`` may be a
    traced value here). ``loss_fn`` returns per-example losses (a (batch,) vector); a
    scalar is taken as already averaged.
    """
    data_loss = Objective(_as_apply(model_or_apply_fn), loss_fn).data_loss

    def J(params, x, y):
        return data_loss(params, (x, y)) + 0.5 * l2 * tree_sqnorm(params)

    return J


def _data_xy(data):
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise ValueError("data must be a pair (x, y) of arrays with a leading example axis")
    x, y = jax.tree_util.tree_map(jnp.asarray, tuple(data))
    nx = jax.tree_util.tree_leaves(x)[0].shape[0]
    ny = jax.tree_util.tree_leaves(y)[0].shape[0]
    if nx != ny:
        raise ValueError(f"x and y need the same number of examples, got {nx} and {ny}")
    return x, y, nx


class TrainResult(NamedTuple):
    """params: trained parameters. losses: (steps,) objective J on each step's batch
    (before that step's update)."""

    params: Any
    losses: jax.Array


class ConvergedResult(NamedTuple):
    """params: final parameters. losses: optax-phase history (see :class:`TrainResult`).
    grad_norm: ``||grad J||`` (full batch) at ``params``. objective: J at ``params``.
    lbfgs_steps: L-BFGS iterations taken. converged: ``grad_norm < tol``."""

    params: Any
    losses: jax.Array
    grad_norm: jax.Array
    objective: jax.Array
    lbfgs_steps: jax.Array
    converged: jax.Array


def _hashable(f) -> bool:
    try:
        hash(f)
    except TypeError:
        return False
    return True


# Compiled loops live at module level with the model, loss and optimizer as static
# arguments, so repeated calls with the same (hashable) objects reuse the compilation;
# l2, data, seed and tolerance are traced and may change freely.


def minibatch_indices(n: int, *, batch_size: int, steps: int, seed=0) -> jax.Array:
    """The minibatch schedule of :func:`train`: ``(steps, batch_size)`` training indices.

    Epoch ``e`` is the permutation ``jax.random.permutation(k_e, n)`` with
    ``k_0, k_1, ... = jax.random.split(key, ceil(steps * batch_size / n))`` and
    ``key = jax.random.key(seed)``; the epochs are concatenated and cut into ``steps``
    consecutive batches of ``batch_size`` (the last epoch may be used only in part, and a
    batch may straddle two epochs). Step ``k`` uses rows ``idx[k]``.

    This one function is shared by :func:`train`, the cold-start LOO and subset retraining
    of :mod:`influx.response` and the metagradients, so all of them see exactly the same
    data order for the same ``seed``.

    Args:
      n: number of training examples (a Python int).
      batch_size: examples per step, ``1 <= batch_size <= n``.
      steps: number of steps (``>= 1``).
      seed: an integer, or a JAX PRNG key (may be traced, e.g. inside ``jit``).

    Cost: ``ceil(steps * batch_size / n)`` permutations of ``n``.
    """
    n = check_int(n, "n", minimum=1)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    steps = check_int(steps, "steps", minimum=1)
    if batch_size > n:
        raise InputError(f"batch_size must be <= n = {n}, got {batch_size}")
    key = seed if isinstance(seed, jax.Array) and jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key) \
        else jax.random.key(seed)
    n_epochs = -(-steps * batch_size // n)
    perms = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, n_epochs))
    return perms.reshape(-1)[: steps * batch_size].reshape(steps, batch_size)


def train_loop(apply_fn: Callable, loss_fn: Callable, optimizer, params, data, *, l2, steps: int,
               batch_size: int | None = None, seed=0, weights=None):
    """The training loop of :func:`train` as a pure function (jit-, vmap- and grad-able).

    Runs ``steps`` optax updates from ``params`` on the per-step objective

        J_k(theta) = 1/|B_k| sum_{i in B_k} w_i L_i(theta) + l2/2 ||theta||^2

    with ``B_k`` the full batch (``batch_size=None``) or row ``k`` of
    :func:`minibatch_indices` ``(n, batch_size=batch_size, steps=steps, seed=seed)``, and
    ``w = weights`` (``(N,)``, default all ones: then ``J_k`` is the plain mean, exactly
    :func:`train`). It is the one loop behind :func:`train`, the subset retraining of
    :func:`influx.response.retrain` (``vmap`` over ``weights``) and the metagradients
    (``grad`` with respect to ``weights``), so all of them replay the same run.

    Returns ``(params, losses)`` with ``losses[k] = J_k`` before step ``k``'s update.
    Cost: ``steps`` value-and-gradients on the batch; no validation (see :func:`train`).
    """
    x, y = data
    n = jax.tree_util.tree_leaves(x)[0].shape[0]

    def J(p, xb, yb, wb):
        per = loss_fn(apply_fn(p, xb), yb)
        data_term = jnp.mean(per) if wb is None else jnp.mean(wb * per)
        return data_term + 0.5 * l2 * tree_sqnorm(p)

    def body(carry, ib):
        p, s = carry
        if ib is None:
            xb, yb, wb = x, y, weights
        else:
            xb, yb = jax.tree_util.tree_map(lambda a: a[ib], (x, y))
            wb = None if weights is None else weights[ib]
        val, g = jax.value_and_grad(J)(p, xb, yb, wb)
        upd, s = optimizer.update(g, s, p)
        return (optax.apply_updates(p, upd), s), val

    idx = None if batch_size is None else minibatch_indices(n, batch_size=batch_size, steps=steps, seed=seed)
    (p, _), losses = jax.lax.scan(body, (params, optimizer.init(params)), idx, length=steps)
    return p, losses


@partial(jax.jit, static_argnames=("f", "loss_fn", "opt", "steps", "batch_size"))
def _train_jit(params, x, y, l2, key, weights=None, *, f, loss_fn, opt, steps, batch_size):
    return train_loop(_as_apply(f), loss_fn, opt, params, (x, y), l2=l2, steps=steps, batch_size=batch_size,
                      seed=key, weights=weights)


def train(
    model_or_apply_fn,
    loss_fn: Callable,
    params,
    data,
    *,
    l2: float,
    optimizer: optax.GradientTransformation | None = None,
    steps: int,
    batch_size: int | None = None,
    seed: int = 0,
    weights=None,
) -> TrainResult:
    """Minimise ``J(theta) = mean loss + l2/2 ||theta||^2`` with optax, compiled.

    Args:
      model_or_apply_fn: a flax Module (params = its ``"params"`` collection) or
        ``apply_fn(params, x) -> outputs``.
      loss_fn: ``loss_fn(outputs, y) -> (batch,)`` per-example losses.
      params: initial parameters (pytree); their dtype is kept.
      data: ``(x, y)`` arrays with a leading example axis (held on device).
      l2: weight decay coefficient in J.
      optimizer: optax transformation; default ``optax.adam(1e-2)``.
      steps: number of updates, all inside one ``lax.scan``.
      batch_size: ``None`` for full batch; else minibatches drawn from seeded
        per-epoch permutations (:func:`minibatch_indices`, fixed by ``seed``, so runs are
        reproducible).
      weights: optional ``(N,)`` per-example weights ``w_i >= 0``: each step minimises
        ``1/|B| sum_{i in B} w_i L_i + l2/2 ||theta||^2`` (see :func:`train_loop`); the
        default (all ones) is the plain mean. Same batches whatever the weights.

    Returns ``TrainResult(params, losses)`` (unpacks as ``params, losses``).
    Cost: ``steps`` gradient evaluations on the batch. The loop is compiled once per
    (model or apply_fn, loss_fn, optimizer object, steps, batch_size, shapes): reuse the
    same optimizer object across calls to skip recompilation.
    """
    steps = check_int(steps, "steps", minimum=1)
    check_nonnegative(l2, "l2", as_float=False)
    f = _as_apply(model_or_apply_fn)
    if not _hashable(f) or not _hashable(loss_fn):
        raise TypeError("model_or_apply_fn and loss_fn must be hashable (functions are)")
    x, y, n = _data_xy(data)
    if batch_size is not None:
        batch_size = check_int(batch_size, "batch_size", minimum=1, maximum=n, allow_none=True)
        batch_size = None if batch_size == n else batch_size
    if weights is not None:
        weights = jnp.asarray(weights)
        if weights.shape != (n,) or not jnp.issubdtype(weights.dtype, jnp.number) \
                or not bool(jnp.all(jnp.isfinite(weights) & (weights >= 0))):
            raise InputError(f"weights must be a ({n},) array of finite values >= 0, "
                             f"got shape {weights.shape}")
        weights = weights.astype(_float_dtype(params))
    opt = _DEFAULT_OPT if optimizer is None else optimizer
    p, losses = _train_jit(
        params,
        x,
        y,
        jnp.asarray(l2, _float_dtype(params)),
        jax.random.key(seed),
        weights,
        f=model_or_apply_fn if isinstance(model_or_apply_fn, nn.Module) else f,
        loss_fn=loss_fn,
        opt=opt,
        steps=steps,
        batch_size=batch_size,
    )
    return TrainResult(p, losses)


_DEFAULT_OPT = optax.adam(1e-2)


def _float_dtype(params):
    dts = [l.dtype for l in jax.tree_util.tree_leaves(params) if jnp.issubdtype(l.dtype, jnp.floating)]
    return jnp.result_type(*dts) if dts else jnp.result_type(float)


def _tree_norm(tree) -> jax.Array:
    return jnp.sqrt(tree_sqnorm(tree))


@partial(jax.jit, static_argnames=("f", "loss_fn", "memory_size", "max_it"))
def _lbfgs_jit(params, x, y, l2, tol, *, f, loss_fn, memory_size, max_it):
    J = objective(f, loss_fn, l2=l2)
    fun = lambda p: J(p, x, y)
    opt = optax.lbfgs(memory_size=memory_size)
    value_and_grad = optax.value_and_grad_from_state(fun)

    def cond(carry):
        _, _, it, gn = carry
        return (it < max_it) & (gn >= tol)

    def body(carry):
        p, s, it, _ = carry
        val, g = value_and_grad(p, state=s)
        upd, s = opt.update(g, s, p, value=val, grad=g, value_fn=fun)
        p = optax.apply_updates(p, upd)
        return p, s, it + 1, _tree_norm(jax.grad(fun)(p))

    carry = (params, opt.init(params), jnp.asarray(0), _tree_norm(jax.grad(fun)(params)))
    p, _, it, gn = jax.lax.while_loop(cond, body, carry)
    return p, it, gn, fun(p)


def train_to_convergence(
    model_or_apply_fn,
    loss_fn: Callable,
    params,
    data,
    *,
    l2: float,
    optimizer: optax.GradientTransformation | None = None,
    steps: int = 0,
    batch_size: int | None = None,
    seed: int = 0,
    tol: float = 1e-6,
    max_lbfgs_steps: int = 1000,
    memory_size: int = 10,
) -> ConvergedResult:
    """Optax warm-up (``steps`` > 0, see :func:`train`), then full-batch L-BFGS on J.

    L-BFGS (``optax.lbfgs`` with its zoom line search, driven through
    ``optax.value_and_grad_from_state``) runs inside ``lax.while_loop`` until
    ``||grad J|| < tol`` or ``max_lbfgs_steps``. Returns :class:`ConvergedResult` with
    the final full-batch gradient norm.

    Failure modes: in float32 ``tol`` below ~1e-4 is usually out of reach (the
    gradient is rounding noise) -- use float64 params/data for tight tolerances;
    params and data must share one float dtype (else ``ValueError``); without
    ``l2 > 0`` a separable classification problem has no minimiser and ``theta`` grows
    while the gradient shrinks only slowly; deep non-convex nets may need many more
    than 1000 iterations for 1e-6. Check ``converged``.
    Cost: per L-BFGS step one gradient for the norm plus the line search's evaluations
    (usually 1-2 value-and-gradients).
    """
    steps = check_int(steps, "steps", minimum=0)
    max_it = check_int(max_lbfgs_steps, "max_lbfgs_steps", minimum=0)
    memory_size = check_int(memory_size, "memory_size", minimum=1)
    if not tol > 0:
        raise InputError(f"tol must be > 0, got {tol!r}")
    check_nonnegative(l2, "l2", as_float=False)
    x, y, _ = _data_xy(data)
    p_dt = {l.dtype for l in jax.tree_util.tree_leaves(params)}
    x_dt = {l.dtype for l in jax.tree_util.tree_leaves((x, y)) if jnp.issubdtype(l.dtype, jnp.floating)}
    if len(p_dt | x_dt) > 1:
        raise ValueError(
            f"params ({sorted(map(str, p_dt))}) and data ({sorted(map(str, x_dt))}) need one "
            "float dtype for L-BFGS: use models.init(..., dtype=...) / data.load(..., dtype=...)"
        )
    f = _as_apply(model_or_apply_fn)
    if steps > 0:
        params, losses = train(
            model_or_apply_fn,
            loss_fn,
            params,
            (x, y),
            l2=l2,
            optimizer=optimizer,
            steps=steps,
            batch_size=batch_size,
            seed=seed,
        )
    else:
        losses = jnp.zeros((0,), _float_dtype(params))
    dt = _float_dtype(params)
    p, it, gn, val = _lbfgs_jit(
        params,
        x,
        y,
        jnp.asarray(l2, dt),
        jnp.asarray(tol, dt),
        f=model_or_apply_fn if isinstance(model_or_apply_fn, nn.Module) else f,
        loss_fn=loss_fn,
        memory_size=memory_size,
        max_it=max_it,
    )
    return ConvergedResult(
        params=p, losses=losses, grad_norm=gn, objective=val, lbfgs_steps=it, converged=gn < tol
    )
