"""Measurements: the scalar ``f(theta, z_t)`` of a test example whose change influence predicts.

A measurement is a function ``f(params, example) -> scalar`` of one test example
``example = (x_t, y_t)`` *without* a leading axis (``apply_fn`` then needs ``x_t[None]``).
The factories here return :class:`Measurement` values (frozen, hashable: a static ``jit``
argument) that close over the objective when bound:

* :func:`loss` -- the test loss ``loss_fn(apply_fn(theta, x_t), y_t)`` (the default);
* :func:`margin` -- the classification margin ``z_y - max_{k != y} z_k`` (integer labels);
* :func:`logit` ``(k)`` -- the output ``z_k`` of a fixed class (label-free).

Sequence models (one example's outputs are token logits ``z`` of shape ``(T, V)``, its
labels ``y`` token ids of shape ``(T,)``; labels ``< 0``, e.g. ``-100``, are masked as in
:data:`influx.losses.token_cross_entropy`). With ``CE_t = logsumexp(z_t) - z_t[y_t]``:

* :func:`sequence_loss` ``(reduction="sum" | "mean", mask=None)`` -- ``sum_t w_t CE_t``
  (or divided by ``sum_t w_t``) with ``w_t = [y_t >= 0] [mask_t]``: the loss of a completion
  span when the prompt's labels are ``-100`` (the span may differ per test example), or of
  a fixed span of positions ``mask`` shared by all. The training loss per sequence is
  :func:`loss` with ``influx.losses.token_cross_entropy`` as the objective's loss;
* :func:`token_loss` ``(position)`` -- ``CE_t`` at one position ``t``;
* :func:`token_margin` ``(position, token=None)`` -- the logit margin
  ``z_t[c] - max_{k != c} z_t[k]`` of the target token ``c`` (the label at ``t``, or a fixed
  token id) at position ``t``;
* :func:`per_token` ``(test)`` -- the per-token loss as a vector measurement: one query per
  (example, unmasked position), scored with :func:`sequence_loss`, and
  :meth:`PerToken.grid` puts the scores back on a ``(n_test, T, ...)`` grid.

A measured position whose label is masked, a test example with nothing to measure, a
position or token id out of range, or a ``mask`` whose length is not ``T`` are
:class:`influx.errors.InputError` when the labels are concrete (traced: NaN, never 0).

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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from influx.validation import InputError, InputTypeError, check_choice, check_int

__all__ = ["Measurement", "loss", "margin", "logit", "sequence_loss", "token_loss", "token_margin",
           "per_token", "PerToken", "bind", "check"]


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


# ------------------------------------------------------------------ sequence models
IGNORE_INDEX = -100  # the label of a masked token (any label < 0 is masked)


def _token_logits(z, what: str):
    """One example's token logits ``(T, V)`` (static shape check: raises while tracing)."""
    shape = tuple(getattr(z, "shape", ()))
    if len(shape) != 2:
        raise InputError(f"measurement {what} needs token logits of shape (T, V) per example (a sequence "
                         f"model), got per-example outputs of shape {shape}")
    return shape


def _token_ce(z, y):
    """Per-position ``logsumexp(z_t) - z_t[y_t]`` (``y_t`` clipped into range where masked)."""
    safe = jnp.where(y >= 0, y, 0).astype(jnp.int32)
    return jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, safe[:, None], axis=-1)[:, 0]


def _position(position: int, t: int, what: str) -> int:
    if not -t <= position < t:
        raise InputError(f"measurement {what}: position {position} out of range for sequences of {t} "
                         f"tokens (need {-t} <= position < {t})")
    return position % t


def _labels_of(y, t: int, what: str):
    """Concrete test labels ``(n, T)`` as a numpy array, or ``None`` (absent or traced); checks the
    shape and dtype either way."""
    if y is None:
        raise InputError(f"measurement {what} needs test labels (token ids, < 0 for masked positions): "
                         "pass test=(x, y)")
    if not jnp.issubdtype(jnp.result_type(y), jnp.integer):
        raise InputTypeError(f"measurement {what} needs integer token labels, got dtype {jnp.result_type(y)}")
    if tuple(np.shape(y))[1:] != (t,):
        raise InputError(f"measurement {what}: test labels (the loss mask: one token id per position, < 0 "
                         f"masked) must have shape (n_test, {t}) for token logits of {t} positions, got "
                         f"{tuple(np.shape(y))}")
    if isinstance(y, jax.core.Tracer):
        return None
    return np.asarray(y)


def _one_output(outputs, what: str):
    leaves = jax.tree_util.tree_leaves(outputs)
    if len(leaves) != 1:
        raise InputError(f"measurement {what} needs a model with one output array (token logits)")
    return _token_logits(leaves[0], what)


@dataclasses.dataclass(frozen=True)
class _CheckOf:
    """``fn.check`` as a value (equal for equal ``fn``: equal measurements, one jit cache entry)."""

    fn: Any

    def __call__(self, outputs, y):
        return self.fn.check(outputs, y)


def _check_vocab(arr, v: int, what: str):
    if arr is not None and arr.size and int(arr.max()) >= v:
        raise InputError(f"measurement {what}: test labels out of range for a vocabulary of {v} (found "
                         f"{int(arr.max())}; need label < {v}, or < 0 to mask the position)")


def _mask_weights(mask, t: int, what: str):
    if mask is None:
        return None
    if len(mask) != t:
        raise InputError(f"measurement {what}: mask has {len(mask)} entries but the sequences have {t} "
                         f"positions (the model's outputs are (T, V) = ({t}, V) per example)")
    return np.asarray(mask, bool)


def _labelled_tokens(obj, params, example, what):
    """``(logits (T, V), labels (T,), T)`` of one labelled sequence example, checked."""
    x, y = example
    _needs_labels(y, what)
    z = _outputs(obj, params, x)
    t, _ = _token_logits(z, what)
    return z, jnp.asarray(y), t


@dataclasses.dataclass(frozen=True)
class _SequenceLoss:
    """``sum_t w_t CE_t`` (``mean``: over ``sum_t w_t``; 0/0 = NaN) with ``w_t = [y_t >= 0] mask_t``."""

    mean: bool
    mask: tuple | None

    @property
    def what(self):
        return f"sequence_loss(reduction={'mean' if self.mean else 'sum'!r})"

    def __call__(self, obj, params, example):
        z, y, t = _labelled_tokens(obj, params, example, self.what)
        w = y >= 0
        m = _mask_weights(self.mask, t, self.what)
        if m is not None:
            w = w & jnp.asarray(m)
        w = w.astype(z.dtype)
        total = jnp.sum(w * _token_ce(z, y))
        return total / jnp.sum(w) if self.mean else total

    def check(self, outputs, y):
        t, v = _one_output(outputs, self.what)
        arr = _labels_of(y, t, self.what)
        m = _mask_weights(self.mask, t, self.what)
        _check_vocab(arr, v, self.what)
        if arr is None:
            return
        w = arr >= 0 if m is None else (arr >= 0) & m[None]
        empty = np.nonzero(~np.any(w, axis=1))[0]
        if empty.size:
            raise InputError(f"measurement {self.what}: {empty.size} test example(s) have no measured token "
                             f"(every label masked{' or outside mask' if m is not None else ''}; first: "
                             f"example {int(empty[0])}): the measurement would be empty")


def sequence_loss(*, reduction: str = "sum", mask=None) -> Measurement:
    """The token loss of a span: ``sum_t w_t CE_t`` (``reduction="sum"``) or its mean over the
    measured tokens (``"mean"``), ``w_t = [y_t >= 0] [mask_t]``.

    The span is where the test labels are ``>= 0``: give the prompt (and padding) the label
    ``-100`` and the completion its token ids (each test example its own span), and/or a
    fixed ``mask`` (``T`` booleans, the same positions for every example). Outputs must be
    ``(T, V)`` token logits per example; a test example with no measured token, a mask of
    the wrong length, labels of the wrong shape or ``>= V`` are :class:`~influx.errors.InputError`.
    """
    check_choice(reduction, "sequence_loss: reduction", ("sum", "mean"))
    if mask is not None:
        arr = np.asarray(mask)
        if arr.ndim != 1:
            raise InputError(f"sequence_loss: mask must be one boolean per position (shape (T,)), got "
                             f"shape {arr.shape}")
        mask = tuple(bool(b) for b in arr)
    fn = _SequenceLoss(reduction == "mean", mask)
    opts = (("reduction", reduction),) + ((("mask", mask),) if mask is not None else ())
    return Measurement("sequence_loss", fn, opts, _CheckOf(fn))


@dataclasses.dataclass(frozen=True)
class _TokenLoss:
    """``CE_t`` at one position (NaN when the label there is masked)."""

    position: int

    @property
    def what(self):
        return f"token_loss({self.position})"

    def __call__(self, obj, params, example):
        z, y, t = _labelled_tokens(obj, params, example, self.what)
        i = _position(self.position, t, self.what)
        return jnp.where(y[i] >= 0, _token_ce(z[i:i + 1], y[i:i + 1])[0], jnp.nan)

    def check(self, outputs, y):
        t, v = _one_output(outputs, self.what)
        i = _position(self.position, t, self.what)
        arr = _labels_of(y, t, self.what)
        _check_vocab(arr, v, self.what)
        _check_unmasked(arr, i, self.what)


def _check_unmasked(arr, i: int, what: str):
    if arr is None:
        return
    bad = np.nonzero(arr[:, i] < 0)[0]
    if bad.size:
        raise InputError(f"measurement {what}: the label at position {i} is masked (< 0) in {bad.size} test "
                         f"example(s) (first: example {int(bad[0])}): nothing to measure there")


def token_loss(position: int) -> Measurement:
    """The loss ``CE_t = logsumexp(z_t) - z_t[y_t]`` of the token at ``position`` (``-1``: the last).

    The label there must not be masked (:class:`~influx.errors.InputError` when concrete,
    NaN when traced). For every position at once see :func:`per_token`.
    """
    p = check_int(position, "token_loss: position", minimum=None)
    fn = _TokenLoss(p)
    return Measurement("token_loss", fn, (("position", p),), _CheckOf(fn))


@dataclasses.dataclass(frozen=True)
class _TokenMargin:
    """``z_t[c] - max_{k != c} z_t[k]`` with ``c`` the label at ``t`` or a fixed token."""

    position: int
    token: int | None

    @property
    def what(self):
        extra = "" if self.token is None else f", token={self.token}"
        return f"token_margin({self.position}{extra})"

    def __call__(self, obj, params, example):
        x, y = example
        z = _outputs(obj, params, x)
        t, v = _token_logits(z, self.what)
        i = _position(self.position, t, self.what)
        zi = z[i]
        if self.token is None:
            _needs_labels(y, self.what)
            c = jnp.asarray(y)[i]
            valid = c >= 0
            c = jnp.where(valid, c, 0).astype(jnp.int32)
        else:
            if self.token >= v:
                raise InputError(f"measurement {self.what}: token id out of range for a vocabulary of {v}")
            c, valid = self.token, True
        others = jnp.where(jnp.arange(v) == c, -jnp.inf, zi)
        return jnp.where(valid, zi[c] - jnp.max(others), jnp.nan)

    def check(self, outputs, y):
        t, v = _one_output(outputs, self.what)
        i = _position(self.position, t, self.what)
        if self.token is not None:
            if self.token >= v:
                raise InputError(f"measurement {self.what}: token id {self.token} out of range for a "
                                 f"vocabulary of {v} (need 0 <= token < {v})")
            return
        arr = _labels_of(y, t, self.what)
        _check_vocab(arr, v, self.what)
        _check_unmasked(arr, i, self.what)


def token_margin(position: int, *, token: int | None = None) -> Measurement:
    """The logit margin ``z_t[c] - max_{k != c} z_t[k]`` at ``position`` ``t`` of the target
    token ``c``: the test label at ``t`` (``token=None``; must not be masked) or a fixed token
    id (label-free). Positive when the model predicts ``c`` there."""
    p = check_int(position, "token_margin: position", minimum=None)
    tok = None if token is None else check_int(token, "token_margin: token", minimum=0)
    fn = _TokenMargin(p, tok)
    opts = (("position", p),) + ((("token", tok),) if tok is not None else ())
    return Measurement("token_margin", fn, opts, _CheckOf(fn))


class PerToken(NamedTuple):
    """The per-token loss as ``len(example)`` scalar queries (made by :func:`per_token`).

    test: ``(x, y)`` with row ``r`` the input of test example ``example[r]`` and labels masked
      everywhere but ``position[r]``: ``sequence_loss()`` on row ``r`` is ``CE`` of that token.
    example, position: ``(R,)`` int arrays. shape: ``(n_test, T)`` of the original test set.
    """

    test: Any
    example: np.ndarray
    position: np.ndarray
    shape: tuple

    def grid(self, scores):
        """``(R, ...)`` scores (one row per query) -> ``(n_test, T, ...)``, NaN at masked positions."""
        s = np.asarray(scores)
        if s.shape[:1] != self.example.shape:
            raise InputError(f"PerToken.grid: expected {self.example.shape[0]} rows (one per query), got "
                             f"scores of shape {s.shape}")
        out = np.full(tuple(self.shape) + s.shape[1:], np.nan, dtype=np.result_type(s.dtype, np.float32))
        out[self.example, self.position] = s
        return out


def per_token(test, *, positions=None) -> PerToken:
    """The per-token loss of every test sequence as a vector measurement.

    Each unmasked position ``t`` (of ``positions``, default all) of each test example becomes
    one query whose labels are masked except at ``t``; score them with
    ``measurement=sequence_loss()`` (``= CE_t``) and map the ``(R, n_train)`` scores back
    with :meth:`PerToken.grid` to ``(n_test, T, n_train)``. ``test = (x, y)`` with concrete
    labels ``y`` of shape ``(n_test, T)`` (< 0 masked). Cost: the test side grows ``T``-fold.
    """
    if not (isinstance(test, (tuple, list)) and len(test) == 2):
        raise InputTypeError("per_token: expected test=(x, y) with token labels y of shape (n_test, T)")
    x, y = test
    if y is None or isinstance(y, jax.core.Tracer):
        raise InputError("per_token needs concrete test labels (token ids, < 0 for masked positions)")
    arr = np.asarray(y)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"per_token: test labels must be integer token ids of shape (n_test, T), got "
                         f"shape {arr.shape} and dtype {arr.dtype}")
    n, t = arr.shape
    keep = arr >= 0
    if positions is not None:
        pos = np.asarray(positions, int).reshape(-1)
        if pos.size and (pos.min() < -t or pos.max() >= t):
            raise InputError(f"per_token: positions out of range for sequences of {t} tokens")
        sel = np.zeros(t, bool)
        sel[pos % t] = True
        keep &= sel[None]
    ex, ps = np.nonzero(keep)
    if ex.size == 0:
        raise InputError("per_token: no unmasked test token to measure")
    labels = np.full((ex.size, t), IGNORE_INDEX, dtype=arr.dtype)
    labels[np.arange(ex.size), ps] = arr[ex, ps]
    xs = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[ex], x)
    return PerToken((xs, jnp.asarray(labels)), ex, ps, (n, t))


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
            "logit(k) / sequence_loss() / token_loss(t) / token_margin(t)) or a callable "
            f"f(params, example) -> scalar, got {type(measurement).__name__}"
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

