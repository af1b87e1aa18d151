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
``token_cross_entropy``         ``sum_{t: y_t >= 0} CE(z_t, y_t)``         ``m_t (p_t u_t - p_t (p_t . u_t))``
``token_cross_entropy_mean``    the same divided by ``n = sum_t m_t``      ``1/n`` times the above
==============================  =========================================  =========================

with ``p = softmax(z)`` and ``s = sigmoid(z)``. All are convex in ``z``, so their
Gauss-Newton matrices are positive semi-definite.

Sequence models: the token losses take ONE example's logits ``z`` of shape ``(T, V)``
(``T`` positions, vocabulary ``V``; a batch is ``(B, T, V)``) and integer labels ``y`` of
shape ``(T,)``. Labels ``< 0`` (``IGNORE_INDEX = -100``, PyTorch's and Hugging Face's
``ignore_index``) are masked: padding, or the prompt tokens of a completion. The mask is
``m_t = [y_t >= 0]``; ``token_cross_entropy`` is the per-sequence training loss
``sum_t m_t CE(z_t, y_t)`` (kronfluence's convention), ``token_cross_entropy_mean`` the
mean over the unmasked tokens (NaN for a sequence without any: refused when the labels
are concrete). ``softmax_cross_entropy`` treats every leading axis as an example axis, so
on ``(B, T, V)`` logits it returns ``(B, T)`` losses and influx refuses it: use a token loss.

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
    "token_cross_entropy",
    "token_cross_entropy_mean",
    "IGNORE_INDEX",
    "output_hvp",
    "output_factor",
    "sampled_factor",
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
      hessian_factor: ``(z, y) -> L`` for the outputs ``z`` of ONE example (any shape,
        last axis the output dimension): a ``(z.size, K)`` matrix with ``L L^T = H_z`` in
        the flattened output order (kfac-jax's square-root factor; used by K-FAC/EK-FAC).
      sample: ``(key, z) -> y``: targets drawn from the model's predictive distribution
        ``p(y | z)`` whose Fisher ``E_y[grad_z L grad_z L^T]`` equals ``H_z`` (the sampled,
        Monte-Carlo factor of K-FAC/EK-FAC).
      sample_keeps_mask: ``sample`` is ``(key, z, y) -> y_s`` and keeps what the observed
        targets ``y`` mask (the token losses: a masked position stays masked, so it adds
        nothing to the sampled factor, as it adds nothing to ``H_z``).
      likelihood_scale: ``(z, y) -> c`` for a loss ``L = c * (-log p(y | z))`` with ``c``
        independent of the label values (the mean token loss: ``c = 1 / n``); the sampled
        factor's columns are then ``grad_z L(z, y_s) / sqrt(c)``, since
        ``E[grad L grad L^T] = c^2 F`` while ``H_z = c F``. ``None``: ``c = 1``.
    """

    name: str
    value: Callable
    hessian_product: Callable
    check: Callable
    hessian_factor: Callable | None = None
    sample: Callable | None = None
    sample_keeps_mask: bool = False
    likelihood_scale: Callable | None = None

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


def _block_diagonal(blocks):
    """``(R, C, K)`` per-row factors -> the ``(R C, R K)`` block-diagonal factor."""
    r, c, k = blocks.shape
    eye = jnp.eye(r, dtype=blocks.dtype)
    return jnp.einsum("rik,rs->risk", blocks, eye).reshape(r * c, r * k)


def _xent_factor(z, y):
    del y
    p = jax.nn.softmax(z.reshape(-1, z.shape[-1]), axis=-1)
    sp = jnp.sqrt(p)
    # H = diag(p) - p p^T = (diag(sp) - p sp^T)(diag(sp) - p sp^T)^T since sum(p) = 1
    rows = jax.vmap(lambda pi, si: jnp.diag(si) - jnp.outer(pi, si))(p, sp)
    return _block_diagonal(rows)


def _xent_sample(key, z):
    return jax.random.categorical(key, z, axis=-1)


softmax_cross_entropy = Loss(
    "softmax_cross_entropy", _xent_value, _xent_hvp, _xent_check, _xent_factor, _xent_sample
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


squared_error = Loss(
    "squared_error", _sq_value, _sq_hvp, _same_shape_check("squared_error"),
    lambda z, y: jnp.eye(z.size, dtype=z.dtype),
    lambda key, z: z + jax.random.normal(key, z.shape, z.dtype),  # y ~ N(z, I)
)


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


def _bce_factor(z, y):
    del y
    s = jax.nn.sigmoid(z.reshape(-1))
    return jnp.diag(jnp.sqrt(s * (1.0 - s)))


sigmoid_binary_cross_entropy = Loss(
    "sigmoid_binary_cross_entropy", _bce_value, _bce_hvp, _bce_check, _bce_factor,
    lambda key, z: jax.random.bernoulli(key, jax.nn.sigmoid(z)).astype(z.dtype),
)


# ---------------------------------------------------------------- token cross-entropy
IGNORE_INDEX = -100  # the conventional label of a masked token; any label < 0 is masked


def _token_terms(z, y):
    """Per-token cross-entropies (``0`` where masked) and the mask ``y >= 0``."""
    y = jnp.asarray(y)
    mask = y >= 0
    safe = jnp.where(mask, y, 0).astype(jnp.int32)
    logz = jax.nn.logsumexp(z, axis=-1)
    zy = jnp.take_along_axis(z, safe[..., None], axis=-1)[..., 0]
    return jnp.where(mask, logz - zy, 0.0), mask


def _token_weights(y, mean: bool, dtype):
    """Per-token weights of the loss: the mask, divided by the unmasked count for the mean
    (``0/0 = NaN`` for a sequence with no unmasked token: never a plausible number)."""
    m = (jnp.asarray(y) >= 0).astype(dtype)
    return m / jnp.sum(m, axis=-1, keepdims=True) if mean else m


def _token_value(mean: bool):
    def value(z, y):
        terms, mask = _token_terms(z, y)
        total = jnp.sum(terms, axis=-1)
        return total / jnp.sum(mask, axis=-1).astype(total.dtype) if mean else total
    return value


def _token_hvp(mean: bool):
    def hvp(z, y, u):
        w = _token_weights(y, mean, z.dtype)[..., None]
        return w * _xent_hvp(z, None, u)
    return hvp


def _token_factor(mean: bool):
    def factor(z, y):
        # one example: z (T, V). H_z is block diagonal over tokens, block t = w_t (diag(p_t) - p_t p_t^T)
        # with the (V, V) square root of softmax_cross_entropy per token, scaled by sqrt(w_t): T small
        # blocks, never an eigendecomposition or a differentiation of the (T V, T V) Hessian.
        if z.ndim != 2:
            raise InputError(f"token cross-entropy: the factor needs one example's logits of shape (T, V), "
                             f"got {z.shape}")
        w = _token_weights(y, mean, z.dtype)
        p = jax.nn.softmax(z, axis=-1)
        sp = jnp.sqrt(p)
        rows = jax.vmap(lambda pi, si: jnp.diag(si) - jnp.outer(pi, si))(p, sp)
        return _block_diagonal(rows * jnp.sqrt(w)[:, None, None])
    return factor


def _token_sample(key, z, y):
    """Labels ``y_s ~ softmax(z_t)`` per token; positions ``y`` masks stay masked (``IGNORE_INDEX``)."""
    draw = jax.random.categorical(key, z, axis=-1)
    if y is None:
        return draw
    return jnp.where(jnp.asarray(y) >= 0, draw, IGNORE_INDEX)


def _token_check(name: str, mean: bool):
    def check(z_shape, y):
        z_shape = tuple(z_shape)
        y_shape = tuple(np.shape(y))
        if len(z_shape) < 3:  # the outputs of a batch (check_targets): (B, T, V)
            raise InputError(f"{name}: outputs need a token axis and a vocabulary axis, (T, V) per example "
                             f"((B, T, V) for a batch), got outputs of shape {z_shape} for the batch")
        if y_shape != z_shape[:-1]:
            raise InputError(
                f"{name}: labels (one token id per position, < 0 for masked positions) must have shape "
                f"outputs.shape[:-1] = {z_shape[:-1]}, got labels of shape {y_shape} (outputs {z_shape})")
        dtype = getattr(y, "dtype", np.asarray(y).dtype)
        if not jnp.issubdtype(dtype, jnp.integer):
            raise InputTypeError(f"{name}: labels must be integer token ids, got dtype {dtype}")
        if not (_is_concrete(y) and np.size(y)):
            return
        arr = np.asarray(y)
        v = int(z_shape[-1])
        if int(arr.max()) >= v:
            raise InputError(f"{name}: labels out of range for a vocabulary of {v} (found label "
                             f"{int(arr.max())}; need label < {v}, or < 0 to mask the position)")
        if mean:
            empty = np.nonzero(~np.any(arr.reshape(-1, y_shape[-1]) >= 0, axis=-1))[0]
            if empty.size:
                raise InputError(f"{name}: {empty.size} sequence(s) have no unmasked label (first: "
                                 f"{int(empty[0])}); their mean token loss is 0/0. Drop them, or use "
                                 "token_cross_entropy (the sum, 0 for such a sequence)")
    return check


token_cross_entropy = Loss(
    "token_cross_entropy", _token_value(False), _token_hvp(False),
    _token_check("token_cross_entropy", False), _token_factor(False), _token_sample, True)

token_cross_entropy_mean = Loss(
    "token_cross_entropy_mean", _token_value(True), _token_hvp(True),
    _token_check("token_cross_entropy_mean", True), _token_factor(True), _token_sample, True,
    lambda z, y: 1.0 / jnp.sum(jnp.asarray(y) >= 0).astype(z.dtype))


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


def output_factor(loss_fn: Callable, z, y):
    """``L`` (``(z.size, K)``) with ``L L^T = H_z``, the output Hessian of ``loss_fn`` at the
    outputs ``z`` of one example (flattened): the loss's registered ``hessian_factor``, else
    the eigendecomposition of the dense ``D x D`` Hessian (``D = z.size``; negative
    eigenvalues of a non-convex loss are clipped to 0, the Gauss-Newton convention)."""
    if isinstance(loss_fn, Loss) and loss_fn.hessian_factor is not None:
        return loss_fn.hessian_factor(z, y)
    hvp = output_hvp(loss_fn)
    eye = jnp.eye(z.size, dtype=z.dtype)
    y1 = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], y)
    h = jax.vmap(lambda u: hvp(z[None], y1, u.reshape(z.shape)[None])[0].reshape(-1))(eye)
    w, v = jnp.linalg.eigh(0.5 * (h + h.T))
    return v * jnp.sqrt(jnp.maximum(w, 0.0))


def sampled_factor(loss_fn: Callable, key, z, samples: int, y=None):
    """Monte-Carlo factor ``(z.size, samples)``: columns ``grad_z L(z, y_s) / sqrt(S)`` for
    ``y_s ~ p(y | z)`` drawn with the loss's ``sample`` (``E[L L^T] = H_z``, the Fisher).

    ``y``: the observed targets of the example; required by losses whose targets carry a
    mask (``Loss.sample_keeps_mask``: the token losses), whose masked positions stay masked
    in every draw; ignored by the others."""
    if not (isinstance(loss_fn, Loss) and loss_fn.sample is not None):
        raise TypeError(f"sampled_factor: {loss_fn!r} registers no predictive distribution "
                        "(Loss.sample); use the exact factor")
    if loss_fn.sample_keeps_mask:
        if y is None:
            raise InputError(f"sampled_factor: {loss_fn!r} needs the observed targets y (their mask "
                             "says which positions count)")
        draw = lambda k: loss_fn.sample(k, z, y)  # noqa: E731
    else:
        draw = lambda k: loss_fn.sample(k, z)  # noqa: E731
    ys = jax.vmap(draw)(jax.random.split(key, samples))
    g = jax.vmap(lambda yy: jax.grad(lambda zz: jnp.sum(loss_fn(zz, yy)))(z).reshape(-1))(ys)
    scale = jnp.asarray(samples, z.dtype)
    if loss_fn.likelihood_scale is not None:
        scale = scale * loss_fn.likelihood_scale(z, y)
    return g.T / jnp.sqrt(scale)


def check_targets(loss_fn: Callable, z_shape, y) -> None:
    """Validates targets ``y`` against the outputs of a batch, shape ``z_shape`` (leading axis
    the examples), with ``Loss.check`` (no-op for custom losses)."""
    if isinstance(loss_fn, Loss):
        loss_fn.check(tuple(z_shape), y)
