"""Output-space losses with their exact output-space Hessian-vector products.

A loss maps model outputs ``z`` and targets ``y`` to a **per-example** loss. The last
axis of ``z`` is the output dimension; any leading axes are example axes, so the same
function serves one example (``z.shape == (K,)``) and a batch (``z.shape == (B, K)``).
A custom ``loss_fn`` must keep that contract: for a batch of ``B`` examples it returns
``B`` values, never their mean or sum (influx averages itself, and needs the individual
losses for per-example gradients); every public entry point checks it.

Each loss registers its output-space Hessian product ``u -> (d^2 L / dz^2) u`` in closed
form, so Gauss-Newton products ``J^T H_z J v`` never differentiate the loss twice
(as kfac-jax registers its losses):

==============================  =========================================  =========================
loss                            value                                      ``H_z u``
==============================  =========================================  =========================
``softmax_cross_entropy``       ``logsumexp(z) - z[y]``  (integer ``y``)   ``p * u - p (p . u)``
``squared_error``               ``1/2 ||z - y||^2``                        ``u``
``sigmoid_binary_cross_entropy`` ``sum_k softplus(z_k) - y_k z_k``         ``s (1 - s) * u``
==============================  =========================================  =========================

with ``p = softmax(z)`` and ``s = sigmoid(z)``. All three are convex in ``z``, so their
Gauss-Newton matrices are positive semi-definite.

Any other callable ``loss_fn(z, y) -> per-example loss`` also works everywhere in influx;
:func:`output_hvp` then falls back to forward-over-reverse autodiff in output space.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from influx.validation import InputError, InputTypeError

__all__ = [
    "Loss",
    "softmax_cross_entropy",
    "squared_error",
    "sigmoid_binary_cross_entropy",
    "output_hvp",
    "check_targets",
]


@dataclasses.dataclass(frozen=True)
class Loss:
    """A per-example output-space loss with its closed-form output Hessian product.

    Attributes:
      name: short identifier.
      value: ``(z, y) -> per-example loss`` (reduces the last axis of ``z``).
      hessian_product: ``(z, y, u) -> H_z(z, y) u`` with ``u`` shaped like ``z``.
      check: ``(z_shape, y) -> None``; raises :class:`influx.errors.InputError` for targets
        that do not fit outputs of that shape (concrete values are range-checked, tracers only by
        shape and dtype).
    """

    name: str
    value: Callable
    hessian_product: Callable
    check: Callable

    def __call__(self, z, y):
        return self.value(z, y)

    def __repr__(self) -> str:  # short, stable repr for reports
        return f"influx.losses.{self.name}"


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


# ---------------------------------------------------------------- softmax cross-entropy
def _xent_value(z, y):
    y = jnp.asarray(y)
    logz = jax.nn.logsumexp(z, axis=-1)
    zy = jnp.take_along_axis(z, y[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return logz - zy


def _xent_hvp(z, y, u):
    del y
    p = jax.nn.softmax(z, axis=-1)
    return p * u - p * jnp.sum(p * u, axis=-1, keepdims=True)


def _xent_check(z_shape, y):
    y_shape = tuple(np.shape(y))
    if len(z_shape) < 1:
        raise InputError(f"softmax_cross_entropy: outputs need a class axis, got shape {z_shape}")
    if y_shape != tuple(z_shape[:-1]):
        raise InputError(
            "softmax_cross_entropy: integer labels must have shape outputs.shape[:-1] = "
            f"{tuple(z_shape[:-1])}, got labels of shape {y_shape} "
            "(one-hot labels are not accepted: pass class indices)"
        )
    dtype = getattr(y, "dtype", np.asarray(y).dtype)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise InputTypeError(f"softmax_cross_entropy: labels must be integers, got dtype {dtype}")
    if _is_concrete(y) and y_shape and np.size(y):
        arr = np.asarray(y)
        lo, hi, k = int(arr.min()), int(arr.max()), int(z_shape[-1])
        if lo < 0 or hi >= k:
            raise InputError(
                f"softmax_cross_entropy: labels out of range for {k} logits "
                f"(found labels in [{lo}, {hi}], need 0 <= label < {k})"
            )


softmax_cross_entropy = Loss(
    "softmax_cross_entropy", _xent_value, _xent_hvp, _xent_check
)


# ---------------------------------------------------------------- squared error
def _sq_value(z, y):
    return 0.5 * jnp.sum(jnp.square(z - y), axis=-1)


def _sq_hvp(z, y, u):
    del z, y
    return u


def _same_shape_check(name):
    def check(z_shape, y):
        y_shape = tuple(np.shape(y))
        if y_shape != tuple(z_shape):
            raise InputError(
                f"{name}: targets must have the outputs' shape {tuple(z_shape)}, got {y_shape} "
                "(for a scalar output use targets of shape (N, 1))"
            )
        if _is_concrete(y) and np.size(y) and not np.all(np.isfinite(np.asarray(y))):
            raise InputError(f"{name}: targets contain NaN or inf")

    return check


squared_error = Loss("squared_error", _sq_value, _sq_hvp, _same_shape_check("squared_error"))


# ---------------------------------------------------------------- sigmoid BCE
def _bce_value(z, y):
    return jnp.sum(jax.nn.softplus(z) - y * z, axis=-1)


def _bce_hvp(z, y, u):
    del y
    s = jax.nn.sigmoid(z)
    return s * (1.0 - s) * u


def _bce_check(z_shape, y):
    _same_shape_check("sigmoid_binary_cross_entropy")(z_shape, y)
    if _is_concrete(y) and np.size(y):
        arr = np.asarray(y)
        if arr.min() < 0 or arr.max() > 1:
            raise InputError(
                "sigmoid_binary_cross_entropy: targets must lie in [0, 1], "
                f"found [{arr.min()}, {arr.max()}]"
            )


sigmoid_binary_cross_entropy = Loss(
    "sigmoid_binary_cross_entropy", _bce_value, _bce_hvp, _bce_check
)


# ---------------------------------------------------------------- generic helpers
def output_hvp(loss_fn: Callable) -> Callable:
    """Returns ``(z, y, u) -> H_z u`` for ``loss_fn`` (summed over examples).

    Registered losses use their closed form; any other callable uses
    forward-over-reverse autodiff of ``sum(loss_fn(z, y))`` in output space.
    """
    if isinstance(loss_fn, Loss):
        return loss_fn.hessian_product

    def hvp(z, y, u):
        g = jax.grad(lambda zz: jnp.sum(loss_fn(zz, y)))
        return jax.jvp(g, (z,), (u,))[1]

    return hvp


def check_targets(loss_fn: Callable, z_shape, y) -> None:
    """Validates targets ``y`` against outputs of shape ``z_shape`` (no-op for custom losses)."""
    if isinstance(loss_fn, Loss):
        loss_fn.check(tuple(z_shape), y)
