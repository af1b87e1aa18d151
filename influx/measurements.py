"""Measurements: the scalar ``f(theta, z_t)`` of a test example whose change influence predicts.

A measurement is a function ``f(params, example) -> scalar`` of one test example
``example = (x_t, y_t)`` *without* a leading axis (``apply_fn`` then needs ``x_t[None]``).
The factories here return :class:`Measurement` values (frozen, hashable: a static ``jit``
argument) that close over the objective when bound:

* :func:`loss` -- the test loss ``loss_fn(apply_fn(theta, x_t), y_t)`` (the default);
* :func:`margin` -- the classification margin ``z_y - max_{k != y} z_k`` (integer labels);
* :func:`logit` ``(k)`` -- the output ``z_k`` of a fixed class (label-free).

Any callable ``f(params, example) -> scalar`` works as well. :func:`bind` turns any of
these into ``f(params, example)``; every public entry point then checks it on one
abstract test example before any work (:func:`check`): it must return a float scalar;
a class index or a label out of range for the model's outputs is an
:class:`influx.errors.InputError` (JAX indexing would silently clamp it to the last class).

This module is also the namespace ``influx.measurements`` (``influx.measurements.logit(2)``).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from influx.validation import InputError, InputTypeError, check_int

__all__ = ["Measurement", "loss", "margin", "logit", "bind", "check"]


@dataclasses.dataclass(frozen=True)
class Measurement:
    """A named measurement ``f(obj, params, example) -> scalar`` of one test example.

    ``example = (x, y)`` without a leading axis. Frozen and hashable (a static ``jit``
    argument); :meth:`bind` closes over the objective. ``check(outputs, y)``, when set,
    validates the measurement against the per-example output shape ``outputs`` (a
    ``ShapeDtypeStruct`` pytree) and the (possibly concrete) test labels ``y`` before any
    work.
    """

    name: str
    fn: Callable
    options: tuple = ()
    check: Callable | None = None

    def bind(self, obj) -> Callable:
        return _Bound(self, obj)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options)
        return f"measurements.{self.name}({opts})"


@dataclasses.dataclass(frozen=True)
class _Bound:
    measurement: Measurement
    obj: object

    def __call__(self, params, example):
        return self.measurement.fn(self.obj, params, example)

    def __repr__(self) -> str:
        return repr(self.measurement)


def _outputs(obj, params, x):
    out = obj.apply_fn(params, jax.tree_util.tree_map(lambda a: a[None], x))
    return out[0]


def _needs_labels(y, what):
    if y is None:
        raise InputError(f"measurement {what} needs test labels: pass test=(x, y), or a label-free "
                         "measurement such as influx.measurements.logit(k)")


def _class_axis(z, what: str) -> int:
    """The number of classes of one example's outputs ``z`` (static), which must be a vector."""
    shape = tuple(getattr(z, "shape", ()))
    if len(shape) != 1:
        raise InputError(f"measurement {what} needs one vector of class outputs per example, "
                         f"got per-example outputs of shape {shape}")
    return shape[0]


def _loss_fn(obj, params, example):
    x, y = example
    _needs_labels(y, "loss (the default)")
    y1 = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], y)
    return obj.loss_fn(obj.apply_fn(params, jax.tree_util.tree_map(lambda a: a[None], x)), y1)[0]


def _margin_fn(obj, params, example):
    x, y = example
    _needs_labels(y, "margin")
    z = _outputs(obj, params, x)
    _class_axis(z, "margin()")
    y = jnp.asarray(y).astype(jnp.int32)
    zy = z[y]
    others = jnp.where(jnp.arange(z.shape[-1]) == y, -jnp.inf, z)
    return zy - jnp.max(others)


def _margin_check(outputs, y):
    leaves = jax.tree_util.tree_leaves(outputs)
    if len(leaves) != 1:
        raise InputError("measurement margin() needs a model with one output array")
    k = _class_axis(leaves[0], "margin()")
    if y is None or isinstance(y, jax.core.Tracer):
        return
    if not jnp.issubdtype(jnp.result_type(y), jnp.integer):
        raise InputTypeError("measurement margin() needs integer class labels, "
                             f"got dtype {jnp.result_type(y)}")
    if np.ndim(y) != 1:
        raise InputError(f"measurement margin() needs one class label per test example, got labels of "
                         f"shape {np.shape(y)}")
    arr = np.asarray(y)
    if arr.size and (arr.min() < 0 or arr.max() >= k):
        raise InputError(f"measurement margin(): test labels out of range for {k} classes "
                         f"(found labels in [{arr.min()}, {arr.max()}], need 0 <= label < {k})")


def loss() -> Measurement:
    """The test loss ``loss_fn(apply_fn(theta, x_t), y_t)`` (the default)."""
    return Measurement("loss", _loss_fn)


def margin() -> Measurement:
    """Classification margin ``z_y - max_{k != y} z_k`` (integer labels in ``[0, K)``)."""
    return Measurement("margin", _margin_fn, check=_margin_check)


def _logit_in_range(k: int, z):
    n = _class_axis(z, f"logit({k})")
    if k >= n:
        raise InputError(f"measurement logit({k}): class index out of range for a model with {n} "
                         f"outputs per example (need 0 <= class_index < {n})")


@dataclasses.dataclass(frozen=True)
class _Logit:
    """``z_k`` of one example (a value: equal by ``k``, so equal measurements share a jit cache)."""

    k: int

    def __call__(self, obj, params, example):
        z = _outputs(obj, params, example[0])
        _logit_in_range(self.k, z)  # shapes are static: raises while tracing, never clamps
        return z[self.k]


@dataclasses.dataclass(frozen=True)
class _LogitCheck:
    """The check of ``logit(k)`` against the per-example outputs of the model."""

    k: int

    def __call__(self, outputs, y):
        del y
        leaves = jax.tree_util.tree_leaves(outputs)
        if len(leaves) != 1:
            raise InputError(f"measurement logit({self.k}) needs a model with one output array")
        _logit_in_range(self.k, leaves[0])


def logit(class_index: int) -> Measurement:
    """The output ``z_k`` for a fixed class ``k`` (ignores the label).

    ``0 <= k < K`` for a model with ``K`` outputs per example; checked against the model
    at every entry point (:class:`influx.errors.InputError` otherwise). Two calls with the
    same ``k`` return equal values (one compiled program for both).
    """
    k = check_int(class_index, "logit: class_index", minimum=0)
    return Measurement("logit", _Logit(k), (("class_index", k),), _LogitCheck(k))


# the module is its own namespace: influx.measurements.logit(2), influx.influence.measurements.loss()
measurements = sys.modules[__name__]


def bind(obj, measurement) -> Callable:
    """``f(params, example) -> scalar`` for ``measurement`` on the objective ``obj``.

    ``measurement`` is ``None`` (the test loss), a :class:`Measurement` (bound to ``obj``)
    or a callable ``f(params, example)`` (returned as is); anything else is an
    :class:`~influx.errors.InputError`.
    """
    if measurement is None:
        measurement = loss()
    if isinstance(measurement, Measurement):
        return measurement.bind(obj)
    if not callable(measurement):
        raise InputTypeError(
            "measurement must be None, a Measurement (influx.measurements.loss() / margin() / "
            f"logit(k)) or a callable f(params, example) -> scalar, got {type(measurement).__name__}"
        )
    return measurement


def check(f, params, test, *, name="test"):
    """Checks a bound measurement ``f`` (from :func:`bind`) on one abstract ``name`` example.

    It must return a float scalar; a :class:`Measurement`'s own ``check`` validates class
    indices and labels against the model's outputs. Shapes only (``jax.eval_shape``): no
    computation. Raises :class:`~influx.errors.InputError`.
    """
    ex = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], jnp.result_type(a)), test)
    m = f.measurement if isinstance(f, _Bound) else None
    if m is not None and m.check is not None:
        x1 = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct((1,) + tuple(np.shape(a))[1:], jnp.result_type(a)), test[0])
        try:
            out = jax.eval_shape(f.obj.apply_fn, params, x1)
        except Exception:  # noqa: BLE001 -- the data check reports apply_fn failures
            out = None
        if out is not None:
            m.check(jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), out),
                    test[1])
    try:
        out = jax.eval_shape(f, params, ex)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 -- re-raised with context
        raise InputError(f"measurement {f!r} failed on one {name} example: {type(e).__name__}: {e}") from e
    if not (hasattr(out, "shape") and out.shape == ()):
        raise InputError(
            f"measurement must return a scalar for one {name} example, got {getattr(out, 'shape', out)}"
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise InputTypeError(f"measurement must return a float scalar, got dtype {out.dtype}")

