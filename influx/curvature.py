"""Curvature-vector products and dataset-level damped curvature operators.

Products on closures (any pytree of parameters):

* :func:`hvp` ``(f, params, v) -> H v`` with ``H = d^2 f / dtheta^2``, forward-over-reverse
  (one ``jax.jvp`` of ``jax.grad``: about 2-3 gradients of cost).
* :func:`gnhvp` ``(net, loss, params, v) -> J^T H_z J v`` with ``J = d net / dtheta`` and
  ``H_z = d^2 loss / dz^2``: one ``jax.linearize`` of the network (forward + JVP), the
  output-space Hessian product, and the transpose of the linearised network (one VJP).

Dataset-level operator (:func:`operator`), for the objective of :class:`influx.Objective`::

    A v = C v + (l2 + damping) v,       C = 1/N sum_i C_i,

    C_i = J_i^T H_z,i J_i               (kind="gnh", Gauss-Newton; PSD for convex losses)
    C_i = d^2 loss_i / dtheta^2          (kind="hessian")

accumulated over chunks of at most ``chunk_size`` examples inside one compiled ``lax.scan``,
so memory is bounded by the chunk; a final partial chunk is handled exactly. The chunk of a
product is also bounded by the operator's ``memory_budget`` (bytes; default
:func:`influx._memory.default_budget`): :meth:`Operator.product_chunk` takes the largest
chunk whose product over ``k`` vectors (``vmap``) fits, from the program's peak bytes
(:func:`influx._memory.peak_bytes`, shapes only). Operators are
pytrees (params, data and damping are leaves), so they pass through ``jax.jit`` and their
products ``vmap`` over batches of vectors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from influx import _memory, _xla
from influx import losses as _losses
from influx._xla import jit
from influx.objective import Objective, check_data, check_like, num_examples
from influx.validation import boundary as _boundary
from influx.validation import check_choice, check_damping, check_positive_int

__all__ = [
    "hvp",
    "gnhvp",
    "Operator",
    "operator",
    "operator_unchecked",
    "dense",
    "dense_unchecked",
    "example_grad",
    "chunked_sum",
    "chunked_map",
    "even_map",
    "per_example_grads",
    "per_example_grads_flat",
]

KINDS = ("gnh", "hessian")


def _tree_axpy(a, x, y):
    return jax.tree_util.tree_map(lambda xi, yi: a * xi + yi, x, y)


# ------------------------------------------------------------------ closure products
def hvp(f: Callable, params, v):
    """Hessian-vector product ``(d^2 f / dtheta^2) v`` of a scalar ``f(params)``.

    Forward-over-reverse: ``jvp(grad f, (params,), (v,))``. ``v`` must match ``params``
    in structure and shapes (``ValueError``/``TypeError`` otherwise); the result has the
    parameters' dtypes.
    """
    v = check_like(params, v, name="v")
    return jax.jvp(jax.grad(f), (params,), (v,))[1]


def gnhvp(net: Callable, loss: Callable, params, v):
    """Gauss-Newton-vector product ``J^T (d^2 loss / dz^2) J v``.

    Args:
      net: ``params -> z`` (any array-valued network closure).
      loss: ``z -> scalar`` (the loss of those outputs, targets closed over).
      params: parameter pytree; ``v``: vector shaped like ``params``.

    Cost: one forward pass with its JVP (``jax.linearize``), one output-space HVP, one
    transpose of the linear map (VJP). The loss is differentiated twice only in output
    space; use :func:`operator` with an :mod:`influx.losses` loss for closed forms.
    """
    v = check_like(params, v, name="v")
    z, jvp_fn = jax.linearize(net, params)
    jv = jvp_fn(v)
    hjv = jax.jvp(jax.grad(loss), (z,), (jv,))[1]
    (out,) = jax.linear_transpose(jvp_fn, params)(hjv)
    return out


# ------------------------------------------------------------------ chunking
MAX_STATIC_CHUNKS = 64  # chunked_sum(static=True): at most this many chunks written out


def chunked_sum(fn: Callable, data, *, chunk_size: int, static: bool = False):
    """``sum_k fn(chunk_k)`` over consecutive chunks of ``data``'s leading axis.

    Full chunks run inside one ``lax.scan`` (memory bounded by ``chunk_size``); a final
    partial chunk of ``N mod chunk_size`` examples is evaluated separately, so any ``N``
    is handled exactly. ``fn`` must return a pytree of arrays with static shapes.
    ``static=True`` (up to :data:`MAX_STATIC_CHUNKS` chunks): the chunks are written out as
    static slices instead -- a model with convolutions on XLA:CPU runs several times slower
    on chunks sliced inside a loop, unrolled or not (one CNN curvature product at N = 2000
    in 8 chunks: 4.6 s scanned, 5.1 s unrolled, 0.43 s on static slices; jax issue 12868).
    """
    n = num_examples(data)
    c = min(int(chunk_size), n)
    n_full, rem = divmod(n, c)
    if static and n_full + bool(rem) <= MAX_STATIC_CHUNKS:
        acc = None
        for a in range(0, n, c):
            part = fn(jax.tree_util.tree_map(lambda x, a=a: x[a:a + c], data))
            acc = part if acc is None else jax.tree_util.tree_map(jnp.add, acc, part)
        return acc
    head = jax.tree_util.tree_map(lambda a: a[: n_full * c].reshape((n_full, c) + a.shape[1:]), data)
    if n_full == 1:
        acc = fn(jax.tree_util.tree_map(lambda a: a[0], head))
    else:
        out_shape = jax.eval_shape(fn, jax.tree_util.tree_map(lambda a: a[0], head))
        acc0 = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)

        def body(acc, chunk):
            return jax.tree_util.tree_map(jnp.add, acc, fn(chunk)), None

        acc, _ = jax.lax.scan(body, acc0, head)
    if rem:
        tail = jax.tree_util.tree_map(lambda a: a[n_full * c :], data)
        acc = jax.tree_util.tree_map(jnp.add, acc, fn(tail))
    return acc


def pad_rows(chunk, size: int):
    """``chunk`` (a pytree of arrays with a leading example axis) padded to ``size`` examples
    by repeating its last example, on the host; the caller masks or drops the padding. A
    last, short chunk then has the shape of the others (one compiled program for all)."""
    n = num_examples(chunk)
    if n == size:
        return chunk
    return jax.tree_util.tree_map(
        lambda a: np.concatenate([np.asarray(a), np.repeat(np.asarray(a)[-1:], size - n, axis=0)]), chunk)


def chunk_plan(n: int, chunk_size: int) -> tuple[int, list[tuple[int, int]]]:
    """Equal chunks for a host-driven pass over ``n`` examples: ``k = ceil(n / chunk_size)``
    chunks of ``c = ceil(n / k) <= chunk_size`` examples, so one compiled program serves
    every chunk (a short last chunk would compile the program a second time). Returns
    ``(c, [(start, stop), ...])``; the last chunk may hold fewer than ``c`` examples
    (:func:`window` gives it the shape of the others)."""
    n, chunk_size = int(n), max(1, int(chunk_size))
    k = max(1, -(-n // chunk_size))
    c = -(-n // k) if n else 1
    return c, [(a, min(a + c, n)) for a in range(0, n, c)]


@functools.partial(jax.jit, static_argnames=("size",))
def _window_jit(leaves, start, *, size):
    return [jax.lax.dynamic_slice_in_dim(a, start, size) for a in leaves]


def window(data, start: int, stop: int, size: int):
    """Examples ``[start, stop)`` of ``data`` as a chunk of exactly ``size`` rows, with a mask.

    The chunk is rows ``[w, w + size)`` with ``w = min(start, n - size)``: a short last
    chunk is moved back over examples of the chunk before it (no padding copy), and
    ``mask`` (``(size,)`` bool, numpy) marks the rows in ``[start, stop)``. Returns
    ``(chunk, w, mask)``. NumPy leaves are sliced on the host; JAX arrays by one compiled
    slice per data structure and ``size`` (not one program per start, as ``a[start:stop]``
    compiles). Needs ``size <= n``."""
    leaves, treedef = jax.tree_util.tree_flatten(data)
    n = leaves[0].shape[0]
    w = max(0, min(int(start), n - size))
    dev = [i for i, a in enumerate(leaves) if isinstance(a, jax.Array)]
    out = [a if i in dev else np.asarray(a)[w:w + size] for i, a in enumerate(leaves)]
    if dev:
        for i, a in zip(dev, _window_jit([leaves[i] for i in dev], np.int32(w), size=size)):
            out[i] = a
    mask = (np.arange(w, w + size) >= start) & (np.arange(w, w + size) < stop)
    return jax.tree_util.tree_unflatten(treedef, out), w, mask


def even_map(fn, xs, *, batch_size: int):
    """``jax.lax.map(fn, xs, batch_size=...)`` as one compiled body: the rows are split into
    ``k = ceil(n / batch_size)`` equal batches of ``b = ceil(n / k) <= batch_size``, the last
    padded with copies of the last row (fewer than ``k``; finite wherever the data are),
    which are cut from the outputs.

    ``lax.map`` traces ``fn`` a second time, vmapped over the remainder, whenever
    ``batch_size`` does not divide ``n``: two copies of the body in one program, twice its
    compile time (on the transformer of ``benchmarks/models.py``: 7 s for the scoring
    kernel of 125 examples in blocks of 16). ``fn`` maps one row to one output row."""
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    k = -(-n // max(1, min(int(batch_size), n)))
    b = -(-n // k)
    pad = k * b - n
    if pad:
        xs = jax.tree_util.tree_map(
            lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]), xs)
    out = jax.lax.map(fn, xs, batch_size=b)
    return jax.tree_util.tree_map(lambda o: o[:n], out) if pad else out


def chunked_map(fn, xs, *, chunk_size: int):
    """``fn`` applied to consecutive chunks of ``xs``'s leading axis, outputs concatenated.

    ``fn`` takes a batch (a leading axis of ``chunk_size``, the last one possibly shorter)
    and returns pytrees with the same leading axis. Full chunks run in one ``lax.map``
    (one compiled body, memory bounded by the chunk); a final partial chunk is a separate
    call, so any length is handled exactly (the companion of :func:`chunked_sum`).
    """
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    c = min(int(chunk_size), n)
    n_full, rem = divmod(n, c)
    outs = []
    if n_full:
        head = jax.tree_util.tree_map(lambda a: a[: n_full * c].reshape((n_full, c) + a.shape[1:]), xs)
        o = jax.lax.map(fn, head)
        outs.append(jax.tree_util.tree_map(lambda l: l.reshape((n_full * c,) + l.shape[2:]), o))
    if rem:
        outs.append(fn(jax.tree_util.tree_map(lambda a: a[n_full * c:], xs)))
    if len(outs) == 1:
        return outs[0]
    return jax.tree_util.tree_map(lambda *ls: jnp.concatenate(ls), *outs)


# ------------------------------------------------------------------ the operator
@jax.tree_util.register_pytree_node_class
class Operator:
    """Damped curvature operator ``v -> (C + (l2 + damping) I) v`` on a dataset.

    Build it with :func:`operator`. Leaves: ``params``, ``data``, ``damping``; static:
    ``obj``, ``kind``, ``chunk_size``. Calling it on a vector shaped like ``params``
    returns the product; ``jax.vmap(op)`` applies it to a batch of vectors (the
    forward pass is shared, only the tangents are batched).

    Tags (lineax-style, queried by solvers): ``symmetric`` is always true;
    ``positive_semidefinite`` holds for ``kind="gnh"`` with a convex output-space loss
    (all :mod:`influx.losses`); ``positive_definite`` additionally needs a positive shift.
    """

    def __init__(self, obj: Objective, params, data, damping, *, kind: str, chunk_size: int,
                 memory_budget: int | None = None):
        self.obj = obj
        self.params = params
        self.data = data
        self.damping = damping
        self.kind = kind
        self.chunk_size = chunk_size
        self.memory_budget = memory_budget

    # pytree protocol
    def tree_flatten(self):
        return (self.params, self.data, self.damping), (self.obj, self.kind, self.chunk_size,
                                                        self.memory_budget)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj, kind, chunk_size, memory_budget = aux
        params, data, damping = children
        return cls(obj, params, data, damping, kind=kind, chunk_size=chunk_size,
                   memory_budget=memory_budget)

    # tags and sizes
    symmetric = True

    @property
    def positive_semidefinite(self) -> bool:
        return self.kind == "gnh"

    @property
    def num_examples(self) -> int:
        return num_examples(self.data)

    @property
    def shift(self):
        """``l2 + damping``: the multiple of the identity added to ``C``."""
        return self.obj.l2 + self.damping

    @property
    def dim(self) -> int:
        return sum(int(np.size(l)) for l in jax.tree_util.tree_leaves(self.params))

    # products
    def curvature(self, v):
        """``C v`` (mean over the data, no weight decay, no damping)."""
        return _curvature_product(self, check_like(self.params, v, name="v"))

    def __call__(self, v):
        """``(C + (l2 + damping) I) v``."""
        v = check_like(self.params, v, name="v")
        return _tree_axpy(self.shift, v, _curvature_product(self, v))

    def matmat(self, vs):
        """Products with a batch of vectors (every leaf has a leading batch axis), in data
        chunks sized for the whole batch (:meth:`for_vectors`)."""
        vs = check_like(self.params, vs, name="vs", batched=True)
        k = int(jax.tree_util.tree_leaves(vs)[0].shape[0])
        return jax.vmap(self.for_vectors(k).__call__)(vs)

    def product_chunk(self, n_vectors: int = 1) -> int:
        """Examples per chunk of a product with ``n_vectors`` vectors at once (``vmap``): at
        most ``chunk_size``, fewer when the product's peak memory would exceed the operator's
        ``memory_budget`` (shapes only, nothing runs; cached per shapes). Raises
        :class:`influx.errors.ResourceError` when one example does not fit."""
        return _product_chunk(self.obj, self.kind, _memory.shape_key(self.params),
                              _memory.shape_key(jax.tree_util.tree_map(lambda a: a[0], self.data)),
                              min(int(self.chunk_size), self.num_examples), int(n_vectors),
                              _memory.resolve_budget(self.memory_budget, params=self.params))

    def for_vectors(self, n_vectors: int) -> Operator:
        """This operator with its chunk sized for products with ``n_vectors`` vectors at once
        (the same products; only the chunking, so the memory, changes)."""
        c = self.product_chunk(n_vectors)
        return self if c == self.chunk_size else self.replace(chunk_size=c)

    # variants
    def replace(self, **changes) -> Operator:
        """A copy with some of ``params``, ``data``, ``damping``, ``kind``, ``chunk_size`` changed."""
        kw = dict(params=self.params, data=self.data, damping=self.damping, kind=self.kind,
                  chunk_size=self.chunk_size, memory_budget=self.memory_budget)
        kw.update(changes)
        return Operator(self.obj, kw["params"], kw["data"], kw["damping"], kind=kw["kind"],
                        chunk_size=kw["chunk_size"], memory_budget=kw["memory_budget"])

    def subsample(self, idx) -> Operator:
        """The operator on the examples ``idx`` (``(k,)`` int array; its curvature the mean over
        them, the same shift): LiSSA's minibatch operators (see the protocol in
        :class:`influx.solvers.LinearOperator`)."""
        data = jax.tree_util.tree_map(lambda a: a[idx], self.data)
        return self.replace(data=data, chunk_size=min(self.chunk_size, int(np.shape(idx)[0])))

    def __repr__(self) -> str:
        return (f"Operator(kind={self.kind!r}, n={self.num_examples}, dim={self.dim}, "
                f"l2={self.obj.l2}, chunk_size={self.chunk_size})")


def _struct(key):
    """``jax.ShapeDtypeStruct`` pytree from a :func:`influx._memory.shape_key`, with an
    optional leading axis."""
    treedef, leaves = key
    return lambda lead=(): jax.tree_util.tree_unflatten(
        treedef, [jax.ShapeDtypeStruct(tuple(lead) + s, jnp.dtype(d)) for s, d in leaves])


@functools.lru_cache(maxsize=256)
def _product_chunk(obj, kind, params_key, example_key, limit, n_vectors, budget) -> int:
    params, example = _struct(params_key), _struct(example_key)

    def run(p, vs, chunk):
        return jax.vmap(lambda v: _chunk_product(obj, kind, p, v)(chunk))(vs)

    at = _memory.sized(run, lambda c: (params(), params((n_vectors,)), example((c,))))
    what = f"curvature.operator ({kind} product with {n_vectors} vector(s))"
    return _memory.chunk_size_for(lambda c: at(c)[0], budget=budget, limit=limit, what=what)


@jit
def _curvature_product(op: Operator, v):
    """``C v``, compiled once per operator structure (inlined under an outer ``jit``)."""
    chunk_fn = _chunk_product(op.obj, op.kind, op.params, v)
    x1 = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((1,) + a.shape[1:], a.dtype), op.data[0])
    shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), op.params)
    total = chunked_sum(chunk_fn, op.data, chunk_size=op.product_chunk(1),
                        static=_xla.conv_on_cpu(op.obj.apply_fn, shapes, x1))
    n = op.num_examples
    return jax.tree_util.tree_map(lambda t: t / n, total)


def _chunk_product(obj: Objective, kind: str, params, v):
    """Returns ``chunk -> sum_{i in chunk} C_i v``."""
    if kind == "gnh":
        out_hvp = _losses.output_hvp(obj.loss_fn)

        def fn(chunk):
            x, y = chunk
            z, jvp_fn = jax.linearize(lambda p: obj.apply_fn(p, x), params)
            hu = out_hvp(z, y, jvp_fn(v))
            (g,) = jax.linear_transpose(jvp_fn, params)(hu)
            return g

    else:

        def fn(chunk):
            f = lambda p: jnp.sum(obj.per_example_loss(p, chunk))
            return jax.jvp(jax.grad(f), (params,), (v,))[1]

    return fn


@_boundary
def operator(obj: Objective, params, data, *, kind: str = "gnh", damping=0.0,
             chunk_size: int = 256, memory_budget: int | None = None) -> Operator:
    """The damped curvature operator ``v -> (C + (obj.l2 + damping) I) v`` on ``data``.

    Args:
      obj: the :class:`~influx.Objective`.
      params: parameters at which the curvature is taken (usually the trained ``theta_s``).
      data: ``(x, y)`` with a leading example axis.
      kind: ``"gnh"`` (Gauss-Newton, ``J^T H_z J``) or ``"hessian"`` (exact Hessian).
      damping: ``lambda >= 0`` added to the diagonal on top of ``obj.l2``.
      chunk_size: at most this many examples per scan step; any ``N`` works.
      memory_budget: bytes one product (or a batch of products, :meth:`Operator.matmat`)
        may use for its chunk; ``None``: :func:`influx._memory.default_budget`. The chunk is
        the largest ``<= chunk_size`` that fits (:meth:`Operator.product_chunk`).

    Cost of one product: about one forward + one JVP + one VJP over the data for
    ``"gnh"``; one forward-over-reverse pass (~2-3 gradients) for ``"hessian"``.

    Raises:
      influx.errors.InputError (a ``ValueError``; also a ``TypeError`` for a wrong type):
      unknown ``kind``, ``chunk_size < 1``, negative or non-finite
      ``damping``, a ``memory_budget`` that is not a positive number, or data that does not
      fit the model (see :func:`influx.objective.check_data`).
    """
    check_choice(kind, "kind", KINDS)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    damping = check_damping(damping)
    if memory_budget is not None:
        memory_budget = _memory.resolve_budget(memory_budget)
    check_data(obj, params, data)
    return operator_unchecked(obj, params, data, kind=kind, damping=damping, chunk_size=chunk_size,
                              memory_budget=memory_budget)


def operator_unchecked(obj: Objective, params, data, *, kind: str, damping, chunk_size: int,
                       memory_budget: int | None = None) -> Operator:
    """:func:`operator` for inputs a public entry point has already validated (no data scan)."""
    return Operator(obj, params, data, jnp.asarray(damping), kind=kind, chunk_size=chunk_size,
                    memory_budget=memory_budget)


def dense(op: Operator, params=None, *, batch_size: int = 64):
    """Materialises ``op`` as a ``(P, P)`` matrix in ``ravel_pytree(params)`` order.

    Costs ``P`` operator products (``batch_size`` of them vmapped at a time) and ``P^2``
    memory: for small models only. ``params`` defaults to ``op.params``. Before anything
    runs, the matrix and its transposed copy (``2 P^2`` numbers) are checked against the
    available memory: :class:`influx.errors.ResourceError` with the size otherwise.
    """
    if params is not None:
        op = op.replace(params=params)
    p = sum(int(np.size(l)) for l in jax.tree_util.tree_leaves(op.params))
    itemsize = jnp.result_type(*jax.tree_util.tree_leaves(op.params)).itemsize
    _memory.check_fits(2 * p * p * itemsize,
                       what=f"curvature.dense: a {p:,} x {p:,} matrix",
                       alternative="use operator products (op(v)) with influx.solvers.cg() or "
                                   "influx.solvers.ekfac() instead of the dense matrix")
    return _dense(op, batch_size=batch_size)


def dense_unchecked(op, *, dtype=None, batch_size: int = 64):
    """:func:`dense` without the memory check, traceable, for any operator of the protocol;
    with ``dtype`` the matrix has that dtype (an :class:`Operator`'s products then run on
    parameters cast to ``dtype``, e.g. float32 for bfloat16 parameters)."""
    if dtype is not None and isinstance(op, Operator):
        op = op.replace(params=jax.tree_util.tree_map(lambda a: a.astype(dtype), op.params))
    flat, unravel = ravel_pytree(op.params)
    dtype = flat.dtype if dtype is None else dtype
    p = flat.shape[0]

    def column(e):
        return ravel_pytree(op(unravel(e)))[0].astype(dtype)

    eye = jnp.eye(p, dtype=dtype)
    return even_map(column, eye, batch_size=batch_size).T


@functools.partial(jit, static_argnames="batch_size")
def _dense(op: Operator, *, batch_size: int):
    return dense_unchecked(op, batch_size=batch_size)


# ------------------------------------------------------------------ per-example gradients
def example_grad(obj: Objective, params, example):
    """``grad_theta loss_fn(apply_fn(theta, x), y)`` for ONE example ``(x, y)`` without a
    leading axis (no weight decay): the single per-example-gradient idiom of influx
    (``vmap`` / ``lax.map`` it over a chunk)."""
    single = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], example)
    return jax.grad(lambda p: jnp.sum(obj.per_example_loss(p, single)))(params)


def per_example_grads(obj: Objective, params, data, *, chunk_size: int = 256):
    """Gradients ``grad_theta loss_fn(apply_fn(theta, x_i), y_i)`` for every example.

    Returns a pytree like ``params`` with a leading axis of length ``N`` (no weight decay).
    Computed with ``vmap`` of :func:`example_grad` over chunks of ``chunk_size``
    (``lax.map``), so peak memory is ``N x P`` for the result plus one chunk of activations.
    """
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    return even_map(lambda ex: example_grad(obj, params, ex), data, batch_size=chunk_size)


def per_example_grads_flat(obj: Objective, params, data, *, chunk_size: int = 256):
    """Per-example gradients as an ``(N, P)`` matrix in ``ravel_pytree(params)`` order."""
    g = per_example_grads(obj, params, data, chunk_size=chunk_size)
    return jax.vmap(lambda t: ravel_pytree(t)[0])(g)
