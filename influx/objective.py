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

# The input checks live in influx.validation; re-exported here, where they used to be.
from influx.validation import (  # noqa: F401
    InputTypeError,
    check_apply_fn,
    check_callable,
    check_data,
    check_finite,
    check_like,
    check_nonnegative,
    num_examples,
)

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

    Raises :class:`influx.errors.InputError` for a non-callable function, a Flax module or
    ``module.apply`` given as ``apply_fn`` (use :mod:`influx.flax`'s adapters), or a bad ``l2``.
    """

    apply_fn: Callable
    loss_fn: Callable
    l2: float = 0.0

    def __post_init__(self):
        check_apply_fn(self.apply_fn, name="Objective: apply_fn")
        check_callable(self.loss_fn, "Objective: loss_fn")
        if isinstance(self.l2, jax.core.Tracer):
            raise InputTypeError("Objective: l2 must be a Python number, got a traced value (an "
                                 "Objective is a static jit argument: build it outside jit)")
        object.__setattr__(self, "l2", check_nonnegative(self.l2, "Objective: l2"))

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
