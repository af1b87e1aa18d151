"""The training objective and the data convention shared by all of influx.

A model is two pure functions:

* ``apply_fn(params, x) -> outputs`` for a *batch* of inputs ``x`` (leading example axis);
* ``loss_fn(outputs, y) -> per-example loss`` (see :mod:`influx.losses`).

A dataset is a pair ``(x, y)``: two pytrees of arrays sharing a leading example axis of
length ``N``. The training objective is

    J(theta) = 1/N sum_i loss_fn(apply_fn(theta, x_i), y_i) + l2/2 ||theta||^2.

:class:`Objective` is frozen and hashable, so it can be a static argument of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from influx import losses as _losses

__all__ = ["Objective", "num_examples", "check_data", "check_like", "tree_sqnorm"]


@dataclasses.dataclass(frozen=True)
class Objective:
    """``J(theta) = mean_i loss_fn(apply_fn(theta, x_i), y_i) + l2/2 ||theta||^2``.

    Args:
      apply_fn: ``(params, x) -> outputs`` for a batch ``x``.
      loss_fn: ``(outputs, y) -> per-example loss``; one of :mod:`influx.losses` gets
        closed-form output Hessians, any other callable is differentiated.
      l2: weight-decay coefficient (``>= 0``), part of the objective and therefore of
        every curvature operator built from it.
    """

    apply_fn: Callable
    loss_fn: Callable
    l2: float = 0.0

    def __post_init__(self):
        if not callable(self.apply_fn):
            raise TypeError(f"Objective: apply_fn must be callable, got {type(self.apply_fn)}")
        if not callable(self.loss_fn):
            raise TypeError(f"Objective: loss_fn must be callable, got {type(self.loss_fn)}")
        try:
            l2 = float(self.l2)
        except (TypeError, jax.errors.ConcretizationTypeError) as e:
            raise TypeError(f"Objective: l2 must be a Python number, got {self.l2!r}") from e
        if not np.isfinite(l2) or l2 < 0:
            raise ValueError(f"Objective: l2 must be finite and >= 0, got {l2}")
        object.__setattr__(self, "l2", l2)

    # -- values ---------------------------------------------------------------------
    def per_example_loss(self, params, data):
        """``(N,)`` losses ``loss_fn(apply_fn(params, x_i), y_i)`` (no weight decay)."""
        x, y = data
        return self.loss_fn(self.apply_fn(params, x), y)

    def data_loss(self, params, data, weights=None):
        """Mean (or ``weights``-weighted sum) of per-example losses, without weight decay."""
        per = self.per_example_loss(params, data)
        if weights is None:
            return jnp.mean(per)
        return jnp.sum(weights * per)

    def __call__(self, params, data):
        """The training objective ``J(params)`` on ``data``."""
        return self.data_loss(params, data) + 0.5 * self.l2 * tree_sqnorm(params)


def tree_sqnorm(tree):
    """``||tree||^2`` summed over all leaves."""
    return sum(jnp.vdot(l, l).real for l in jax.tree_util.tree_leaves(tree))


def num_examples(data, *, name: str = "data") -> int:
    """Length of the shared leading axis of a dataset ``(x, y)``; raises on mismatch."""
    leaves = jax.tree_util.tree_leaves(data)
    if not leaves:
        raise ValueError(f"{name}: empty pytree (expected a pair (x, y) of arrays)")
    sizes = {np.shape(l)[0] if np.ndim(l) else None for l in leaves}
    if None in sizes:
        raise ValueError(f"{name}: every array needs a leading example axis; found a scalar leaf")
    if len(sizes) != 1:
        raise ValueError(f"{name}: arrays disagree on the number of examples: {sorted(sizes)}")
    n = sizes.pop()
    if n == 0:
        raise ValueError(f"{name}: the dataset is empty (0 examples)")
    return int(n)


def check_like(params, v, *, name: str = "v", batched: bool = False):
    """Checks that ``v`` has the pytree structure and leaf shapes of ``params``.

    With ``batched=True`` every leaf of ``v`` carries one extra leading axis (a batch of
    vectors). Returns ``v`` with each leaf cast to the dtype of the matching parameter
    leaf (so products preserve the parameters' dtype). Raises ``ValueError``/``TypeError``
    naming ``name`` otherwise.
    """
    p_def = jax.tree_util.tree_structure(params)
    v_def = jax.tree_util.tree_structure(v)
    if p_def != v_def:
        raise TypeError(
            f"{name}: pytree structure differs from params.\n  params: {p_def}\n  {name}: {v_def}"
        )
    p_leaves = jax.tree_util.tree_leaves(params)
    v_leaves = jax.tree_util.tree_leaves(v)
    out = []
    batch = None
    for i, (p, x) in enumerate(zip(p_leaves, v_leaves)):
        ps, xs = tuple(np.shape(p)), tuple(np.shape(x))
        if batched:
            if len(xs) != len(ps) + 1 or xs[1:] != ps:
                raise ValueError(
                    f"{name}: leaf {i} has shape {xs}, expected (batch, *{ps}) for a batch of vectors"
                )
            if batch is None:
                batch = xs[0]
            elif xs[0] != batch:
                raise ValueError(f"{name}: leaves disagree on the batch size ({batch} vs {xs[0]})")
        elif xs != ps:
            raise ValueError(f"{name}: leaf {i} has shape {xs}, but the parameter has shape {ps}")
        out.append(jnp.asarray(x, dtype=jnp.result_type(p)))
    return jax.tree_util.tree_unflatten(v_def, out)


def check_finite(tree, *, name: str):
    """Raises ``ValueError`` if a concrete leaf of ``tree`` holds NaN or inf (tracers pass)."""
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.core.Tracer):
            continue
        arr = np.asarray(leaf)
        if jnp.issubdtype(arr.dtype, jnp.inexact) and not np.all(np.isfinite(arr)):
            raise ValueError(f"{name}: contains NaN or inf")


def check_data(obj: Objective, params, data, *, name: str = "data") -> int:
    """Validates a dataset against the objective before any heavy work.

    Checks: ``data`` is a pair ``(x, y)`` with a shared, non-empty leading axis; inputs
    and targets are finite; ``apply_fn`` accepts ``x`` (checked with ``jax.eval_shape`` on
    one example, so it costs nothing); targets fit the outputs (shape, dtype and, for
    concrete labels, range). Returns ``N``.
    """
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise TypeError(f"{name}: expected a pair (x, y) of arrays, got {type(data).__name__}")
    n = num_examples(data, name=name)
    x, y = data
    check_finite(x, name=f"{name} inputs")
    check_finite(y, name=f"{name} targets")
    x1 = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((1,) + tuple(np.shape(a))[1:],
                                                               jnp.result_type(a)), x)
    try:
        out = jax.eval_shape(obj.apply_fn, params, x1)
    except Exception as e:  # noqa: BLE001 -- re-raised with the shapes that caused it
        shapes = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)[1:]), x)
        raise ValueError(
            f"{name}: apply_fn does not accept inputs with per-example shape {shapes}: "
            f"{type(e).__name__}: {e}"
        ) from e
    out_leaves = jax.tree_util.tree_leaves(out)
    if len(out_leaves) == 1:
        z_shape = (n,) + tuple(out_leaves[0].shape[1:])
        _losses.check_targets(obj.loss_fn, z_shape, y)
    return n
