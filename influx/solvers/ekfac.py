"""K-FAC and EK-FAC: Kronecker-factored inverse of the Gauss-Newton matrix.

For every linear layer ``y = a W + b`` that :mod:`influx.solvers.kron` finds (dense and
``DenseGeneral``/einsum kernels, per-head / per-expert batched kernels with one block per
slice, convolutions over patches, embeddings, at every position
of a sequence or image: the "expand" setting of Eschenhagen et al. 2023), the Gauss-Newton
block of ``C = 1/N sum_n J_n^T H_n J_n`` is approximated by a Kronecker product (Martens &
Grosse 2015; Grosse & Martens 2016 for convolutions). With the input rows ``a~ = [a; 1]``
(``[a]`` without bias; for a convolution the patches, for an embedding the one-hot token),
the weight as one ``(d_in + 1, d_out)`` matrix ``W~ = [W; b]`` and, for each example ``n``,
position ``t`` and column ``l_c`` of a factor ``H_n = L_n L_n^T`` of the output-space loss
Hessian, the pseudo-gradient ``g_{n,c,t} = d(l_c^T z_n) / dy_t``::

    A = 1/N sum_n 1/T sum_t a~ a~^T                (d_in + 1, d_in + 1)
    S = 1/N sum_n sum_c sum_t g g^T                (d_out, d_out)
    G_block ~ A (x) S,     A = Q_A diag(a_i) Q_A^T,  S = Q_S diag(s_j) Q_S^T

(an embedding's ``A`` is diagonal, the token frequencies: ``Q_A = I`` and no ``V x V``
matrix). K-FAC (:func:`kfac`) uses the eigenvalues ``a_i s_j``; EK-FAC (:func:`ekfac`;
George et al. 2018, as kronfluence) replaces them with the exact diagonal of the
Gauss-Newton block in the Kronecker-factored eigenbasis::

    Lambda_ij = 1/N sum_n sum_c (Q_A^T G_{n,c} Q_S)_ij^2,   G_{n,c} = sum_t a~_t g_{n,c,t}^T

and the solve is, with the shift ``s = l2 + damping``::

    X~ = Q_A [(Q_A^T B~ Q_S) / (Lambda + s)] Q_S^T          (elementwise division)

Parameters in no block (normalisation scales, shared or tied weights, layers inside
``cond``/``while``, leaves declared ``"diagonal"``) get the exact Gauss-Newton diagonal
``d_j = 1/N sum_n sum_c (J_n^T l_c)_j^2`` and ``x_j = b_j / (d_j + s)``; ``prepare`` warns
when they hold more than 10% of the parameters (``influx.solvers.ekfac.layers(...)`` /
``.coverage(...)`` say which; ``declare=`` of :func:`ekfac` moves leaves in or out).

Output factor: the loss's own square-root factor ``L`` (:attr:`influx.losses.Loss.hessian_factor`,
closed forms; an eigendecomposition of the dense ``D x D`` output Hessian for any other
loss), exact and deterministic, costing ``D`` vector-Jacobian products per example (``D``
outputs per example). Above ``EXACT_MAX_OUTPUTS`` outputs (or with ``samples=k > 0``) the
sampled Fisher is used instead: ``L = [grad_z L(z, y_s)]_s / sqrt(k)`` with ``y_s ~ p(y|z)``
drawn by the loss's ``sample`` with ``key`` (``E[L L^T] = H_z``; kronfluence's choice).

Cost (``prepare``, once): one pass over the data for ``A``, ``S`` and the diagonal (a
forward pass and ``K`` vector-Jacobian products per example), ``O(d_in^3 + d_out^3)``
eigendecompositions per layer, and for EK-FAC a second pass for ``Lambda``. Both passes
call one compiled model program per chunk (the forward pass and the products: block inputs
and output gradients) and a small program for their own sums, so the model is compiled
once for the fit.

Memory: each pass runs host-driven over chunks of its own size (the *fit* chunk, separate
from the operator's scoring/product ``chunk_size``): ``chunk_size=`` of the solver, or by
default the largest chunk whose program fits the memory budget (``memory_budget=`` of the
solver, else the operator's, else :func:`influx._memory.default_budget`), estimated from the
program's peak bytes on shapes (:func:`influx._memory.peak_bytes`). Nothing ``N x P`` or
``P x P`` is formed; the largest arrays are the per-layer factors. A budget too small for
one example raises :class:`influx.errors.ResourceError` with both sizes. The residual check
of a batch of ``k`` right-hand sides runs its products in data chunks sized for ``k``
vectors (:meth:`influx.curvature.Operator.for_vectors`). ``progress=True`` shows a bar per
factor pass (tqdm, else a stderr line; default when stderr is a terminal). ``apply``: two
small matrix products per layer and, by default, one operator product for the true
residual ``||A x - b|| / ||b||`` against the operator being solved (``apply_many`` batches
the products of all right-hand sides into one pass over the data). The status is
``CONVERGED`` only when that relative residual is ``<= tol``. The default ``tol = 1`` is
the residual of ``x = 0``: above it the approximation is worse than no solve for that
right-hand side. Kronecker factors are often that coarse on small, weakly damped models
(relative residuals of 1-4 are common there): add damping, use ``cg``, or accept the
approximation explicitly with ``tol=math.inf`` (or ``residual=False``, as kronfluence,
which checks nothing).

Failure modes: ``shift <= 0`` (zero eigenvalues): ``InputError`` in ``prepare`` when
concrete, ``Status.NOT_POSITIVE_DEFINITE`` when traced; non-finite ``b``:
``Status.NONFINITE``; relative residual above ``tol``: ``Status.MAX_STEPS`` and a warning
saying what to change. ``kind="hessian"``: K-FAC approximates only the Gauss-Newton part;
``prepare`` warns and the residual is measured against the Hessian.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from influx import _memory, _progress
from influx import curvature as _curvature
from influx import losses as _losses
from influx._xla import jit
from influx.errors import InputError
from influx.solvers import kron
from influx.solvers._base import (
    Solution,
    Solver,
    Status,
    all_finite,
    check_rhs,
    compiled,
    key_array,
    key_tuple,
    relative,
)
from influx.solvers.kron import Block, blocks, coverage, layers

__all__ = ["ekfac", "kfac", "EKFAC", "KFAC", "EKFACState", "layers", "coverage", "blocks",
           "quadratic_form", "DEFAULT_TOL", "EXACT_MAX_OUTPUTS", "AUTO_SAMPLES", "APPLY_BATCH"]

DEFAULT_TOL = 1.0  # relative residual of x = 0: above it the approximation counts as failed
EXACT_MAX_OUTPUTS = 256  # automatic choice: exact output factor up to this many outputs
AUTO_SAMPLES = 4  # ... sampled Fisher with this many labels per example above it
APPLY_BATCH = 8  # apply_many: right-hand sides per vmapped step of the factored inverse

DenseLayer = Block  # deprecated alias (the former name of a recognised layer)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["qa", "qs", "lam", "diag", "shift"], meta_fields=["blocks"])
@dataclasses.dataclass(frozen=True)
class EKFACState:
    """Per-block eigenbases and eigenvalues, and the diagonal of the remaining leaves.

    ``blocks[k]`` (:class:`influx.solvers.kron.Block`, static): the layer; ``qa[k]``
    ``(rows, rows)`` (``None`` for an embedding: ``Q_A = I``), ``qs[k]`` ``(d_out, d_out)``,
    ``lam[k]`` ``(rows, d_out)`` (K-FAC: ``a_i s_j``; EK-FAC: corrected); ``diag``: a pytree
    like the parameters (zeros on block leaves); ``shift``: ``l2 + damping`` used.
    """

    qa: tuple
    qs: tuple
    lam: tuple
    diag: Any
    shift: jax.Array
    blocks: tuple = ()


# ------------------------------------------------------------------ per-example statistics
def _other_leaves(params, blks) -> list[int]:
    """Indices of the floating-point leaves in no block (they get the diagonal)."""
    used = {b.kernel for b in blks} | {b.bias for b in blks if b.bias is not None}
    return [i for i, l in enumerate(jax.tree_util.tree_leaves(params))
            if i not in used and jnp.issubdtype(jnp.result_type(l), jnp.floating)]


def _pseudo_fn(obj, params, blks, x_example):
    """``pseudo(example, cotangents) -> (rows, g_other, g_out)`` for one example: the block
    input rows ``{site: (T, d_in)}``, and for every output cotangent ``u`` (``cotangents(z)
    -> (K, *z.shape)``) the gradients of ``u . z`` w.r.t. the diagonal leaves and the block
    outputs ``{site: (K, T, d_out)}``."""
    traced = kron.trace(obj.apply_fn, params, x_example)
    leaves = jax.tree_util.tree_leaves(params)
    other = _other_leaves(params, blks)
    want = frozenset(b.site for b in blks)
    opened = frozenset().union(*(b.opened for b in blks))  # declared layers' custom calls
    tape0 = kron._Tape(opened=opened)
    jax.eval_shape(lambda ls, x: kron.run(traced, ls, x, tape0), leaves, x_example)
    sites = {b.site: tape0.sites[b.site] for b in blks}

    def forward(other_vals, perts, x):
        ls = list(leaves)
        for i, v in zip(other, other_vals):
            ls[i] = v
        tape = kron._Tape(perts=perts, want=want, opened=opened)
        z = kron.run(traced, ls, x, tape)
        return z, {b.site: tape.rows[b.site] for b in blks}

    def pseudo(example, cotangents):
        x, y = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], example)
        perts = {b.site: jnp.zeros(sites[b.site].pert_shape, leaves[b.kernel].dtype) for b in blks}
        z, vjp, rows = jax.vjp(lambda o, p: forward(o, p, x), [leaves[i] for i in other], perts,
                               has_aux=True)
        ct = cotangents(z, y)
        g_other, g_perts = jax.vmap(vjp)(ct)
        g_out = {b.site: kron.out_rows(g_perts[b.site], sites[b.site].out_axes, b.d_out)
                 for b in blks}
        rows = {b.site: _aug(rows[b.site], b.bias is not None) for b in blks}
        return rows, g_other, g_out

    return pseudo, other


def _aug(a, bias: bool):
    return jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1) if bias else a


def _factor_cotangents(loss_fn, samples: int, key):
    """``(z, y, index) -> (K, *z.shape)``: the columns of the output-Hessian factor of one
    example (exact when ``samples == 0``, else the sampled Fisher with a per-example key)."""

    def cot(z, y, index):
        z0, y0 = z[0], jax.tree_util.tree_map(lambda a: a[0], y)
        if samples:
            lf = _losses.sampled_factor(loss_fn, jax.random.fold_in(key, index), z0, samples, y0)
        else:
            lf = _losses.output_factor(loss_fn, z0, y0)
        return lf.T.reshape((-1,) + z.shape)

    return cot


def _label_cotangent(loss_fn):
    def cot(z, y):
        return jax.grad(lambda zz: jnp.sum(loss_fn(zz, y)))(z)[None]
    return cot


# ------------------------------------------------------------------ the factor passes
def _factor_stats(blks, mask, rows, g_other, g_out):
    """Per-chunk sums over the examples where ``mask`` (``(B,)``) is 1: the diagonal of the
    other leaves, ``A`` (a diagonal for embeddings) and ``S`` of every block (the gradients
    of masked-out examples are already zero: their cotangents are)."""
    d = [jnp.sum(g * g, axis=(0, 1)) for g in g_other]
    a_stats, s_stats = [], []
    for b in blks:
        a = rows[b.site]  # (B, T, rows), or the token ids (B, T) of an embedding
        dt = g_out[b.site].dtype
        if b.diagonal_inputs:  # A = diag(token counts): one-hot rows squared
            w = jnp.broadcast_to(mask.astype(dt)[:, None], a.shape).reshape(-1)
            counts = jnp.zeros(b.d_in, dt).at[a.reshape(-1)].add(w, mode="drop")
            a_stats.append(counts / a.shape[1])
        else:
            af = a.reshape(-1, a.shape[-1])
            wf = (a * mask.astype(a.dtype)[:, None, None]).reshape(-1, a.shape[-1])
            a_stats.append(wf.T @ af / a.shape[1])
        gf = g_out[b.site].reshape(-1, b.d_out)  # (B K T, d_out)
        s_stats.append(gf.T @ gf)
    return d, a_stats, s_stats


_CORRECTION_BYTES = 256 * 2**20  # default bound on the (examples, K, rows, d_out) projections at once


def _correction_stats(blks, qa, qs, rows, g_out, max_bytes=_CORRECTION_BYTES):
    """Per-chunk sums of ``(Q_A^T G_{n,c} Q_S)^2`` for every block."""
    out = []
    for k, b in enumerate(blks):
        gr = g_out[b.site] @ qs[k]  # (B, K, T, d_out)
        if b.diagonal_inputs:  # Q_A = I: G_{n,c} = per-token sums of the output gradients
            out.append(_squared_projections(rows[b.site], gr, tokens=b.d_in, max_bytes=max_bytes))
            continue
        ar = rows[b.site] @ qa[k]  # (B, T, rows)
        if ar.shape[1] == 1:  # one position: (Q_A^T G Q_S)_ij = ar_i gr_j
            out.append((ar[:, 0] ** 2).T @ jnp.sum(gr[:, :, 0] ** 2, axis=1))
        else:
            out.append(_squared_projections(ar, gr, max_bytes=max_bytes))
    return out




def _token_rows(ids, g, tokens: int):
    """``onehot(ids)^T g`` (``(tokens, d_out)``) as a per-token sum, for ``g`` ``(T, d_out)``."""
    return jax.ops.segment_sum(g, ids, num_segments=tokens)


def _squared_projections(ar, gr, tokens: int | None = None, max_bytes: int = _CORRECTION_BYTES):
    """``sum_{b,k} (ar_b^T gr_{b,k})^2`` for ``ar`` ``(B, T, rows)`` (or token ids ``(B, T)``
    standing for one-hot rows of width ``tokens``), ``gr`` ``(B, K, T, d_out)``, at most
    ``max_bytes`` of per-example ``(K, rows, d_out)`` matrices at a time."""
    b, k, _, d_out = gr.shape
    per_example = k * (tokens or ar.shape[-1]) * d_out * gr.dtype.itemsize
    batch = max(1, min(b, max_bytes // max(per_example, 1)))

    def one(pair):
        a, g = pair
        if tokens is None:
            gm = jnp.einsum("ti,ktj->kij", a, g)
        else:
            gm = jax.vmap(lambda gk: _token_rows(a, gk, tokens))(g)
        return jnp.sum(gm * gm, axis=0)

    if tokens is not None:
        return jnp.sum(_curvature.even_map(one, (ar, gr), batch_size=batch), axis=0)
    if batch >= b:
        gm = jnp.einsum("bti,bktj->bkij", ar, gr)
        return jnp.sum(gm * gm, axis=(0, 1))
    return jnp.sum(_curvature.even_map(one, (ar, gr), batch_size=batch), axis=0)


def _per_chunk(obj, blks, samples, params, chunk, index, mask, key):
    """Block rows, diagonal-leaf and block-output pseudo-gradients of every example of a chunk
    (``index``: the examples' positions in the data, for their sampled labels; ``mask``:
    ``(B,)``, 0 for rows of the chunk that are not counted: their cotangents are zeroed)."""
    x0 = jax.tree_util.tree_map(lambda a: a[:1], chunk[0])
    pseudo, _ = _pseudo_fn(obj, params, blks, x0)
    cot = _factor_cotangents(obj.loss_fn, samples, key)

    def one(e, i, m):
        return pseudo(e, lambda z, y: cot(z, y, i) * m.astype(z.dtype))

    return jax.vmap(one)(chunk, index, mask)


def _add(acc, part):
    """``acc + part`` leafwise (``part`` when ``acc`` is ``None``): a chunk's sums are added
    inside the chunk's own program (no separate program per accumulator leaf)."""
    return part if acc is None else jax.tree_util.tree_map(jnp.add, acc, part)


# The two fit passes run the same model program (forward, backward to the block outputs) on
# every chunk and differ only in the sums they form from it, so the model program is
# compiled once for both (on the transformer of benchmarks/models.py it is 2.5 of the 2.6 s
# and 3.1 s the two fused passes took to compile), and the sums are small programs of their own.
_chunk_pseudo = functools.partial(jit, static_argnums=(0, 1, 2))(_per_chunk)


@functools.partial(jit, static_argnums=(1,))
def _chunk_factor_stats(acc, blks, mask, rows, g_other, g_out):
    return _add(acc, _factor_stats(blks, mask, rows, g_other, g_out))


@functools.partial(jit, static_argnums=(1,), static_argnames=("max_bytes",))
def _chunk_correction_stats(acc, blks, qa, qs, rows, g_out, *, max_bytes):
    return _add(acc, _correction_stats(blks, qa, qs, rows, g_out, max_bytes))


@functools.lru_cache(maxsize=128)
def _fit_chunk(obj, blks, samples, params_key, data_key, limit, budget, correct):
    """``(c, sums)``: examples per chunk of the factor passes within ``budget`` bytes, and the
    shapes of the passes' sums (the accumulators of :func:`_chunked`, the same for every
    chunk size), from one trace of the model program at a symbolic chunk size
    (:func:`influx._memory.sized`; one per size tried where it cannot be traced so) and
    traces of the sums on its output shapes at each size tried (shapes only: nothing runs,
    and no program is traced again for its shapes). A chunk's peak: the model program's,
    or its outputs plus a pass's sums'."""
    leaves = jax.tree_util.tree_leaves(_struct_of(params_key)())

    def qs_like(b):
        return jax.ShapeDtypeStruct((b.d_out, b.d_out), leaves[b.kernel].dtype)

    def qa_like(b):
        rows = b.d_in + (b.bias is not None)
        return None if b.diagonal_inputs else jax.ShapeDtypeStruct((rows, rows), leaves[b.kernel].dtype)

    qa, qs = [qa_like(b) for b in blks], [qs_like(b) for b in blks]
    sums = {}
    model = _model_bytes(obj, blks, samples, params_key, _row_key(data_key))

    def bytes_at(c):
        need, out = model(c)
        mask = jax.ShapeDtypeStruct((c,), jnp.bool_)
        held = sum(math.prod(o.shape) * jnp.dtype(o.dtype).itemsize for o in jax.tree_util.tree_leaves(out))
        rows, g_other, g_out = out
        got, sums["factors"] = _memory.peak_bytes(functools.partial(_factor_stats, blks), mask, rows,
                                                  g_other, g_out, return_shape=True)
        need = max(need, held + got)
        if correct and blks:
            corr = functools.partial(_correction_stats, blks, max_bytes=max(budget // 4, 1))
            got, sums["correction"] = _memory.peak_bytes(corr, qa, qs, rows, g_out, return_shape=True)
            need = max(need, held + got)
        return need

    c = _memory.chunk_size_for(bytes_at, budget=budget, limit=limit, what="ekfac.prepare (factor passes)")
    return c, sums


@functools.lru_cache(maxsize=64)
def _model_bytes(obj, blks, samples, params_key, row_key):
    """``c -> (peak bytes, output shapes)`` of the model program on a chunk of ``c`` (one
    trace for every ``c``; ``row_key``: the data's shape key without its leading axis)."""
    params, data = _struct_of(params_key)(), _struct_of(row_key)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    return _memory.sized(functools.partial(_per_chunk, obj, blks, samples),
                         lambda c: (params, data(c), jax.ShapeDtypeStruct((c,), jnp.int32),
                                    jax.ShapeDtypeStruct((c,), jnp.bool_), key))


def _row_key(key):
    treedef, leaves = key
    return treedef, tuple(((0,) + s[1:], d) for s, d in leaves)


def _struct_of(key):
    treedef, leaves = key
    return lambda lead=None: jax.tree_util.tree_unflatten(
        treedef, [jax.ShapeDtypeStruct(s if lead is None else (lead,) + s[1:], jnp.dtype(d))
                  for s, d in leaves])


@functools.partial(jit, static_argnames=("blks",))
def _eigen(a_sum, s_sum, n, *, blks):
    """Eigenbases of ``A`` (identity for an embedding's diagonal ``A``) and ``S``, and the
    K-FAC eigenvalues ``a_i s_j``."""
    qa, qs, lam = [], [], []
    for b, a, s in zip(blks, a_sum, s_sum):
        wa, va = (a / n, None) if b.diagonal_inputs else jnp.linalg.eigh(a / n)
        ws, vs = jnp.linalg.eigh(s / n)
        qa.append(va)
        qs.append(vs)
        lam.append(jnp.outer(jnp.maximum(wa, 0), jnp.maximum(ws, 0)))
    return qa, qs, lam


def _chunked(fn, data, chunk_size, sums, bar=None):
    """``sum_k fn(acc, chunk_k, index_k, mask_k)`` over equal chunks, driven from the host.

    ``fn(acc, chunk, index, mask) -> acc + sums over the chunk's rows where mask`` is one
    compiled program called once per chunk: :func:`influx.curvature.chunk_plan` makes the
    chunks equal and :func:`influx.curvature.window` gives a short last chunk the same shape
    (its repeated rows masked), so it compiles once; the accumulator starts as zeros made on
    the host with the shapes ``sums`` (from :func:`_fit_chunk`'s traces: tracing the program
    for them would trace it once more than the call does). Driven from the host because
    XLA:CPU runs convolutions several times slower inside a compiled loop (jax issue 12868);
    memory stays bounded by ``chunk_size`` all the same. ``bar``: a progress bar
    (``update(examples)``), advanced once a chunk is computed."""
    n = jax.tree_util.tree_leaves(data)[0].shape[0]
    c, spans = _curvature.chunk_plan(n, chunk_size)
    acc = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), sums)
    for start, stop in spans:
        chunk, w, mask = _curvature.window(data, start, stop, c)
        index = np.arange(w, w + c, dtype=np.int32)
        acc = fn(acc, chunk, index, mask)
        if bar is not None:
            jax.block_until_ready(acc)
            bar.update(stop - start)
    return acc


def _prepare_run(params, data, shift, key, *, obj, blks, correct, chunk_size, sums, samples,
                 budget=None, progress=False, name="ekfac"):
    """The factor passes: ``A``, ``S`` and the diagonal, the eigenbases, then (EK-FAC) the
    corrected eigenvalues (chunks of ``chunk_size`` examples; ``sums``: the shapes of both
    passes' sums, from :func:`_fit_chunk`; ``budget``: bytes for the correction's projections)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    n = jax.tree_util.tree_leaves(data)[0].shape[0]
    other = _other_leaves(params, blks)
    passes = 2 if correct and blks else 1

    def pseudo(c, i, m):
        return _chunk_pseudo(obj, blks, samples, params, c, i, m, key)

    def factor_step(acc, c, i, m):
        return _chunk_factor_stats(acc, blks, m, *pseudo(c, i, m))

    with _progress.bar(progress, total=n, desc=f"influx.{name}: factors (1/{passes})") as bar:
        d, a_sum, s_sum = _chunked(factor_step, data, chunk_size, sums["factors"], bar)
    qa, qs, lam = _eigen(a_sum, s_sum, n, blks=blks)
    if correct and blks:
        max_bytes = _CORRECTION_BYTES if budget is None else max(int(budget) // 4, 1)

        def correction_step(acc, c, i, m):
            rows, _, g_out = pseudo(c, i, m)
            return _chunk_correction_stats(acc, blks, qa, qs, rows, g_out, max_bytes=max_bytes)

        with _progress.bar(progress, total=n, desc=f"influx.{name}: eigenvalues (2/2)") as bar:
            lam = _chunked(correction_step, data, chunk_size, sums["correction"], bar)
    lam, diag = _finish(lam, d, leaves, n, correct=bool(correct and blks), other=tuple(other))
    return EKFACState(tuple(qa), tuple(qs), tuple(lam), jax.tree_util.tree_unflatten(treedef, diag),
                      jnp.asarray(shift), tuple(blks))


@functools.partial(jax.jit, static_argnames=("correct", "other"))
def _finish(lam, d, leaves, n, *, correct, other):
    """The corrected eigenvalues (sums / n) and the diagonal pytree's leaves (zeros on block
    leaves), in one program."""
    lam = [c / n for c in lam] if correct else lam
    diag = [jnp.zeros_like(l) for l in leaves]
    for i, di in zip(other, d):
        diag[i] = di / n
    return lam, diag


# ------------------------------------------------------------------ the factored inverse
def _to_matrix(b: Block, leaves):
    """A block's ``(rows, d_out)`` matrix of a parameter-shaped vector's leaves."""
    return b.matrix(leaves)


def _from_matrix(b: Block, m, out):
    """Writes a block's ``(rows, d_out)`` matrix into the leaves ``out`` (in place)."""
    b.write(m, out)


def _rotate(qa, m, qs):
    """``Q_A^T M Q_S`` (``Q_A = I`` when ``qa`` is ``None``)."""
    r = m @ qs.astype(m.dtype)
    return r if qa is None else qa.astype(m.dtype).T @ r


def _unrotate(qa, r, qs):
    x = r @ qs.astype(r.dtype).T
    return x if qa is None else qa.astype(r.dtype) @ x


def _whole(blk: Block) -> bool:
    """Whether the block's matrix is its whole kernel leaf (and bias leaf): no scan slice, no
    feature group."""
    return blk.index is None and blk.groups == 1


def _leaf(blk: Block, m, like):
    """The kernel leaf (shaped as ``like``) whose whole matrix is ``m`` (``d_in, d_out``)."""
    shape_t = tuple(like.shape[i] for i in blk.perm)
    return m.reshape(shape_t).transpose(tuple(int(i) for i in np.argsort(blk.perm))).astype(like.dtype)


def _inverse(state: EKFACState, b):
    """``x ~ (C + s I)^-1 b`` from the factors (no operator product).

    Leaves that are a whole block's kernel or bias are formed from the block's solved matrix
    directly; only the leaves in no block (the diagonal) and the leaves shared by several
    blocks (scan slices, feature groups) start from ``b / (d + s)`` and are written slice by
    slice. So no leaf is computed twice, and under ``vmap`` over ``k`` right-hand sides the
    program holds about one ``k x P`` answer beyond ``b`` (plus one block's rotations)."""
    leaves, treedef = jax.tree_util.tree_flatten(b)
    s = state.shift
    own = {i for blk in state.blocks if _whole(blk) for i in (blk.kernel, blk.bias) if i is not None}
    out = [None if i in own else bl / (dl.astype(bl.dtype) + s)
           for i, (bl, dl) in enumerate(zip(leaves, jax.tree_util.tree_leaves(state.diag)))]
    for k, blk in enumerate(state.blocks):
        m = _to_matrix(blk, leaves)
        r = _rotate(state.qa[k], m, state.qs[k]) / (state.lam[k].astype(m.dtype) + s)
        x = _unrotate(state.qa[k], r, state.qs[k])
        if not _whole(blk):
            _from_matrix(blk, x, out)
            continue
        if blk.bias is not None:
            out[blk.bias] = x[-1].reshape(leaves[blk.bias].shape).astype(leaves[blk.bias].dtype)
            x = x[:-1]
        out[blk.kernel] = _leaf(blk, x, leaves[blk.kernel])
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.partial(jit, static_argnames=("obj",))
def _inverse_quadratic(state: EKFACState, obj, params, chunk):
    """``g_m^T A^-1 g_m`` for every example of ``chunk`` from per-example loss gradients in
    the eigenbasis: ``sum_l sum_ij (Q_A^T G_m Q_S)_ij^2 / (Lambda_ij + s) + sum_j g_j^2 /
    (d_j + s)``, ``G_m = sum_t a~_t g_t^T`` (no solve, no operator product)."""
    x0 = jax.tree_util.tree_map(lambda a: a[:1], chunk[0])
    pseudo, other = _pseudo_fn(obj, params, state.blocks, x0)
    dleaves = jax.tree_util.tree_leaves(state.diag)
    s = state.shift
    cot = _label_cotangent(obj.loss_fn)

    def one(ex):
        rows, g_other, g_out = pseudo(ex, cot)
        tot = sum(jnp.sum(g[0] * g[0] / (dleaves[i] + s)) for i, g in zip(other, g_other))
        for k, b in enumerate(state.blocks):
            a, g = rows[b.site], g_out[b.site][0]
            gmat = _token_rows(a, g, b.d_in) if b.diagonal_inputs else a.T @ g
            gm = _rotate(state.qa[k], gmat, state.qs[k])
            tot = tot + jnp.sum(gm * gm / (state.lam[k] + s))
        return tot

    return jax.vmap(one)(chunk)


def quadratic_form(state: EKFACState, obj, params, chunk):
    """Deprecated: use ``solver.inverse_quadratic(state, op, chunk)``."""
    return _inverse_quadratic(state, obj, params, chunk)


# ------------------------------------------------------------------ the solver values
def _tree_norm(t):
    """The 2-norm of a pytree, summed leaf by leaf, each leaf's squares as one dot product
    (``jnp.sum(jnp.square(l))`` of a large leaf becomes a tree of ``reduce-window``s on
    XLA:CPU, with the squares materialised: 8 of the 62 ms of a 4-vector ``apply_many`` on
    the 1M-parameter transformer of ``benchmarks/models.py``)."""
    return jnp.sqrt(sum(jnp.vdot(l, l) for l in jax.tree_util.tree_leaves(t)))


def _num_outputs(obj, params, x0) -> int:
    out = jax.eval_shape(obj.apply_fn, params, x0)
    return int(np.prod(out.shape[1:])) if out.shape else 1


@dataclasses.dataclass(frozen=True, repr=False)
class EKFAC(Solver):
    """EK-FAC solver value (module docstring); made by :func:`ekfac`."""

    name: ClassVar[str] = "ekfac"
    correct: ClassVar[bool] = True
    tol: float = DEFAULT_TOL
    residual: bool = True
    samples: int | None = None
    key: tuple = (0, 0)  # key_tuple(jax.random.PRNGKey(0))
    declare: tuple = ()  # layers declared by hand (kron.Layer)
    chunk_size: int | None = None
    memory_budget: int | None = None
    progress: bool | None = dataclasses.field(default=False, compare=False, repr=False)

    def __post_init__(self):
        if not (isinstance(self.tol, (int, float)) and float(self.tol) > 0):
            raise InputError(f"{self.name}: tol must be a number > 0, got {self.tol!r} (math.inf "
                             "accepts any residual)")
        if self.samples is not None and (not isinstance(self.samples, (int, np.integer))
                                         or isinstance(self.samples, bool) or self.samples < 0):
            raise InputError(f"{self.name}: samples must be None (automatic), 0 (exact output "
                             f"factor) or a positive int, got {self.samples!r}")
        object.__setattr__(self, "declare", kron.declarations(self.declare))
        if self.chunk_size is not None and (not isinstance(self.chunk_size, (int, np.integer))
                                            or isinstance(self.chunk_size, bool) or self.chunk_size < 1):
            raise InputError(f"{self.name}: chunk_size must be None (from the memory budget) or an "
                             f"int >= 1, got {self.chunk_size!r}")
        if self.memory_budget is not None:
            _memory.resolve_budget(self.memory_budget, name=f"{self.name}: memory_budget")

    # -- prepare ------------------------------------------------------------------------
    def _check_op(self, op):
        for attr in ("obj", "params", "data", "chunk_size"):
            if not hasattr(op, attr):
                raise InputError(f"{self.name}: prepare needs an influx.curvature.Operator "
                                 f"(missing op.{attr}); K-FAC reads the model and data, not only "
                                 "products")
        shift = op.shift
        if not isinstance(shift, jax.core.Tracer) and not float(shift) > 0:
            raise InputError(f"{self.name}: the shift l2 + damping must be > 0 (got "
                             f"{float(shift):.3g}); a Kronecker-factored approximation has zero "
                             "eigenvalues")
        if getattr(op, "kind", "gnh") != "gnh":
            warnings.warn(f"{self.name}: kind={op.kind!r}: K-FAC/EK-FAC approximate only the "
                          "Gauss-Newton part of the Hessian; the residual is measured against the "
                          "Hessian and is often large -- use kind='gnh', or cg for the Hessian",
                          RuntimeWarning, stacklevel=3)

    def _resolve_samples(self, obj, params, x0) -> int:
        loss = obj.loss_fn
        has_sampler = isinstance(loss, _losses.Loss) and loss.sample is not None
        d = _num_outputs(obj, params, x0)
        samples = self.samples
        if samples is None:
            samples = AUTO_SAMPLES if d > EXACT_MAX_OUTPUTS and has_sampler else 0
        closed = isinstance(loss, _losses.Loss) and loss.hessian_factor is not None
        if not samples and not closed and d > EXACT_MAX_OUTPUTS:
            warnings.warn(f"{self.name}: {loss!r} registers no output-Hessian factor and no "
                          f"predictive distribution: the factor is an eigendecomposition of the "
                          f"dense {d} x {d} output Hessian of every example; give the loss a "
                          "hessian_factor or sample (influx.losses.Loss)", RuntimeWarning,
                          stacklevel=3)
        return int(samples)

    def prepare(self, op) -> EKFACState:
        """The factors and eigenvalues for ``op`` (two passes over ``op.data``)."""
        self._check_op(op)
        x0 = jax.tree_util.tree_map(lambda a: a[:1], op.data[0])
        blks = blocks(op.obj.apply_fn, op.params, x0, declare=self.declare)
        cov = kron._coverage(op.params, blks)
        if cov < kron.COVERAGE_WARNING:
            warnings.warn(f"{self.name}: only {cov:.0%} of the parameters are in Kronecker blocks; "
                          "the rest get the Gauss-Newton diagonal (see influx.solvers.ekfac."
                          "layers(apply_fn, params, x[:1]) for which leaves)", RuntimeWarning,
                          stacklevel=2)
        samples = self._resolve_samples(op.obj, op.params, x0)
        if samples and not (isinstance(op.obj.loss_fn, _losses.Loss) and op.obj.loss_fn.sample):
            raise InputError(f"{self.name}: samples={samples} needs a loss with a predictive "
                             f"distribution (influx.losses.Loss.sample); {op.obj.loss_fn!r} has "
                             "none: pass samples=0 (exact factor)")
        n = jax.tree_util.tree_leaves(op.data)[0].shape[0]
        budget = self.memory_budget if self.memory_budget is not None else getattr(op, "memory_budget", None)
        budget = _memory.resolve_budget(budget, params=op.params)
        limit = n if self.chunk_size is None else min(int(self.chunk_size), n)
        chunk, sums = _fit_chunk(op.obj, tuple(blks), samples, _memory.shape_key(op.params),
                                 _memory.shape_key(op.data), limit, budget, self.correct)
        return _prepare_run(op.params, op.data, op.shift, key_array(self.key), obj=op.obj,
                            blks=tuple(blks), correct=self.correct, chunk_size=chunk, sums=sums,
                            samples=samples, budget=budget, progress=self.progress, name=self.name)

    def fit_chunk(self, op) -> int:
        """Examples per chunk of :meth:`prepare`'s factor passes for ``op`` (from ``chunk_size``
        and the memory budget; shapes only, nothing runs)."""
        x0 = jax.tree_util.tree_map(lambda a: a[:1], op.data[0])
        blks = tuple(blocks(op.obj.apply_fn, op.params, x0))
        n = jax.tree_util.tree_leaves(op.data)[0].shape[0]
        budget = self.memory_budget if self.memory_budget is not None else getattr(op, "memory_budget", None)
        limit = n if self.chunk_size is None else min(int(self.chunk_size), n)
        return _fit_chunk(op.obj, blks, self._resolve_samples(op.obj, op.params, x0),
                          _memory.shape_key(op.params), _memory.shape_key(op.data), limit,
                          _memory.resolve_budget(budget, params=op.params), self.correct)[0]

    # -- apply ----------------------------------------------------------------------------
    def _solution(self, state, x, b, ax):
        """Status from the true residual ``ax - b`` (``ax = None``: not checked)."""
        # leaf by leaf (no raveled copies of the right-hand sides: n_test x P is large)
        bn = _tree_norm(b)
        if ax is None:
            rn = jnp.asarray(jnp.nan, bn.dtype)
            status = jnp.asarray(Status.CONVERGED)
        else:
            rn = _tree_norm(jax.tree_util.tree_map(jnp.subtract, ax, b))
            status = jnp.where(rn <= self.tol * bn, Status.CONVERGED, Status.MAX_STEPS)
        status = jnp.where(state.shift > 0, status, Status.NOT_POSITIVE_DEFINITE)
        finite = functools.reduce(jnp.logical_and, [all_finite(l) for l in jax.tree_util.tree_leaves((b, x))])
        status = jnp.where(finite, status, Status.NONFINITE)
        rel = relative(rn, bn)
        return Solution(x, rn, jnp.asarray(int(self.residual)), status == Status.CONVERGED, status,
                        {"relative_residual": rel})

    def apply(self, state: EKFACState, op, b) -> Solution:
        """One right-hand side: the factored inverse, and one operator product for the
        true residual (``residual=True``)."""
        b = check_rhs(op, b)
        x = _inverse(state, b)
        return self._solution(state, x, b, op(x) if self.residual else None)

    def apply_many(self, state: EKFACState, op, bs) -> Solution:
        """A batch (leading axis): the residual products of all right-hand sides are one
        batched pass over the data (``vmap`` of the operator: one forward pass, batched
        tangents)."""
        # APPLY_BATCH right-hand sides at a time: the rotations of k vectors at once would hold
        # about 1.4 k x P of temporaries (XLA's buffer assignment, 64 vectors of the 1M-parameter
        # transformer: 334 MB); a lax.map of small vmapped batches holds one batch's
        xs = _curvature.even_map(lambda b: _inverse(state, b), bs, batch_size=APPLY_BATCH)
        if self.residual and hasattr(op, "for_vectors"):  # data chunks sized for k vectors at once
            op = op.for_vectors(int(jax.tree_util.tree_leaves(bs)[0].shape[0]))
        axs = jax.vmap(op)(xs) if self.residual else None
        if axs is None:
            return jax.vmap(lambda x, b: self._solution(state, x, b, None))(xs, bs)
        return jax.vmap(lambda x, b, ax: self._solution(state, x, b, ax))(xs, bs, axs)

    def inverse_quadratic(self, state: EKFACState, op, chunk):
        """``(g_m^T A^-1 g_m for m in chunk, None)`` in the eigenbasis (no solve)."""
        return _inverse_quadratic(state, op.obj, op.params, chunk), None

    # -- conveniences: the base's, warning with what to change ------------------------------
    def __call__(self, op, b, *, batched: bool = False) -> Solution:
        b = check_rhs(op, b, batched=batched)
        state = self.prepare(op)
        if batched:
            return self.apply_batch(state, op, b)
        return self._warn(compiled(type(self).apply)(self, state, op, b))

    def apply_batch(self, state, op, bs) -> Solution:
        return self._warn(super().apply_batch(state, op, bs))

    def _warn(self, sol: Solution) -> Solution:
        st = np.asarray(sol.status).reshape(-1)
        if (st == Status.MAX_STEPS).any():
            rel = np.asarray(sol.stats["relative_residual"]).reshape(-1)
            warnings.warn(
                f"{self.name}: {int((st == Status.MAX_STEPS).sum())} of {st.size} solves have a true "
                f"relative residual above tol={self.tol:g} (worst {np.nanmax(rel):.3g}): the "
                "Kronecker-factored approximation is not accurate for this operator. Add damping, "
                "use cg (it reaches any tolerance), or pass tol=<larger> to accept it",
                RuntimeWarning, stacklevel=3)
        return sol


@dataclasses.dataclass(frozen=True, repr=False)
class KFAC(EKFAC):
    """K-FAC solver value (eigenvalues ``a_i s_j``, no correction pass); made by :func:`kfac`."""

    name: ClassVar[str] = "kfac"
    correct: ClassVar[bool] = False


def ekfac(*, correct: bool = True, tol: float = DEFAULT_TOL, residual: bool = True,
          samples: int | None = None, key=None, declare=None, chunk_size: int | None = None,
          memory_budget: int | None = None, progress: bool | None = False) -> EKFAC:
    """EK-FAC (``correct=True``) or K-FAC (``correct=False``) solver (module docstring).

    Args:
      correct: refit the eigenvalues in the Kronecker-factored eigenbasis (EK-FAC, one
        more pass over the data in ``prepare``); ``False``: plain K-FAC (:func:`kfac`).
      tol: ``CONVERGED`` only when the true relative residual ``||A x - b|| / ||b||`` is
        ``<= tol`` (default ``DEFAULT_TOL`` = 1, the residual of ``x = 0``; ``math.inf`` or
        ``None`` accept any).
      residual: spend one operator product per right-hand side on the true residual
        (batched over right-hand sides). ``False`` skips the check: the status is then
        ``CONVERGED`` unchecked and ``residual_norm`` NaN -- an explicit opt-out.
      samples: output-Hessian factor: ``None`` (automatic: exact up to
        ``EXACT_MAX_OUTPUTS`` outputs per example, else ``AUTO_SAMPLES`` sampled labels),
        ``0`` (always exact) or ``k`` (the sampled Fisher with ``k`` labels per example).
      key: ``jax.random`` key or int seed of the sampled labels (default ``PRNGKey(0)``;
        each example folds in its index).
      declare: layers declared by hand (:class:`influx.solvers.kron.Layer`, a ``{path:
        kind}`` mapping or ``(path, kind)`` pairs): ``"diagonal"`` keeps a leaf out of the
        blocks; ``"dense"``/``"batched"``/``"conv"``/``"embedding"`` requires the leaf to be such a layer
        (also inside ``custom_jvp``/``custom_vjp`` functions), else ``prepare`` raises
        :class:`InputError` naming it.
      chunk_size: examples per step of the factor passes (the *fit* chunk, separate from the
        operator's ``chunk_size`` used for products and scoring); ``None``: the largest chunk
        (up to all of the data) whose pass fits the memory budget.
      memory_budget: bytes a factor pass may use; ``None``: the operator's
        ``memory_budget``, else :func:`influx._memory.default_budget`.
      progress: a progress bar per factor pass (tqdm, else a plain stderr line); ``None``:
        when stderr is a terminal; ``False`` (default): none.

    ``prepare(op)`` needs an :class:`influx.curvature.Operator` (it reads ``op.obj``,
    ``op.params``, ``op.data``, ``op.chunk_size``).
    """
    cls = EKFAC if correct else KFAC
    return cls(tol=_tol(tol), residual=residual, samples=samples, key=_seed(key),
               declare=kron.declarations(declare), chunk_size=chunk_size, memory_budget=memory_budget,
               progress=progress)


def kfac(*, tol: float = DEFAULT_TOL, residual: bool = True, samples: int | None = None,
         key=None, declare=None, chunk_size: int | None = None, memory_budget: int | None = None,
         progress: bool | None = False) -> KFAC:
    """Plain K-FAC: ``ekfac(correct=False)``."""
    return KFAC(tol=_tol(tol), residual=residual, samples=samples, key=_seed(key),
                declare=kron.declarations(declare), chunk_size=chunk_size, memory_budget=memory_budget,
                progress=progress)


def _tol(tol):
    """``None`` (the former "no tolerance") is ``math.inf``: any finite residual passes."""
    return float("inf") if tol is None else tol


def _seed(key) -> tuple:
    """A hashable key (:func:`key_tuple`) from a ``jax.random`` key, an int seed or ``None``."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        key = jax.random.PRNGKey(int(key))
    try:
        return key_tuple(key)
    except (TypeError, ValueError):
        raise InputError(f"ekfac/kfac: key must be a jax.random key or an int seed, got {key!r}") from None


# influx.solvers.ekfac is this function (the module is shadowed in influx.solvers):
# its layer reports are reachable as attributes
for _f in (ekfac, kfac):
    _f.layers = layers
    _f.coverage = coverage
    _f.blocks = blocks
    _f.Layer = kron.Layer  # a layer declared by hand: ekfac(declare=[ekfac.Layer(...)])
