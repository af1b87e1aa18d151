"""K-FAC and EK-FAC: Kronecker-factored inverse of the Gauss-Newton matrix.

For every dense layer ``y = a W + b`` (found automatically, see *Layers*), the
Gauss-Newton block of ``C = 1/N sum_n J_n^T H_n J_n`` is approximated by a Kronecker
product (Martens & Grosse 2015; "expand" form for layers applied at several positions,
Eschenhagen et al. 2023). With the augmented input ``a~ = [a; 1]`` (``[a]`` without bias),
the layer's parameters as one ``(d_in + 1, d_out)`` matrix ``W~ = [W; b]`` and, for each
example ``n``, position ``t`` and column ``l_c`` of a factor ``H_n = L_n L_n^T`` of the
output-space loss Hessian, the pseudo-gradient ``g_{n,c,t} = d(l_c^T z_n) / dy_t``::

    A = 1/N sum_n 1/T sum_t a~ a~^T                (d_in + 1, d_in + 1)
    S = 1/N sum_n sum_c sum_t g g^T                (d_out, d_out)
    G_block ~ A (x) S,     A = Q_A diag(a_i) Q_A^T,  S = Q_S diag(s_j) Q_S^T

K-FAC (``correct=False``) uses the eigenvalues ``a_i s_j``; EK-FAC (``correct=True``,
the default; George et al. 2018, as kronfluence) replaces them with the exact diagonal of
the Gauss-Newton block in the Kronecker-factored eigenbasis::

    Lambda_ij = 1/N sum_n sum_c (Q_A^T G_{n,c} Q_S)_ij^2,   G_{n,c} = sum_t a~_t g_{n,c,t}^T

and the solve is, with the shift ``s = l2 + damping``::

    X~ = Q_A [(Q_A^T B~ Q_S) / (Lambda + s)] Q_S^T          (elementwise division)

The output Hessian is factored exactly (closed forms for :mod:`influx.losses`, an
eigendecomposition of the dense ``D x D`` output Hessian otherwise), so the factors are
deterministic -- no sampled labels (kronfluence and pyDVL sample ``y ~ p(y|x)``: the
same matrix in expectation, with Monte-Carlo noise). Parameters that belong to no
recognised dense layer (convolutions, normalisation scales, shared or tied weights)
get the exact diagonal of the Gauss-Newton matrix, ``d_j = 1/N sum_n sum_c (J_n^T l_c)_j^2``,
and ``x_j = b_j / (d_j + s)``.

Layers. ``apply_fn`` is traced once for one example (``jax.make_jaxpr``) and evaluated by
a small interpreter that recognises ``dot_general`` with one operand a 2-D parameter leaf
(possibly transposed or cast) and no batch dimensions, and a following ``add`` of a 1-D
parameter leaf broadcast along the output features as its bias. A leaf used anywhere else
(weight tying, a kernel also used in a regulariser inside ``apply_fn``) is not treated as
a layer. Calls (``jit`` inside the model) are inlined; layers inside ``scan``/``cond`` or
custom derivatives are not seen (their parameters fall back to the diagonal).
:func:`layers` lists what was found.

Cost (``prepare``, once): one pass over the data for ``A``, ``S`` and the diagonal
(a forward pass and ``D`` vector-Jacobian products per example, ``D`` = number of
outputs), ``O(d_in^3 + d_out^3)`` eigendecompositions per layer, and for EK-FAC a second
pass for ``Lambda``. ``apply`` costs two small matrix products per layer and no
curvature product, plus one operator product when ``residual=True`` (the default) to
report an honest residual against the operator being solved (the GNH, or the Hessian
for ``kind="hessian"``: K-FAC always approximates the Gauss-Newton part). Memory: the
factors, ``O(sum_l d_in^2 + d_out^2 + d_in d_out)``.

Failure modes: ``shift <= 0`` (a zero eigenvalue makes the approximation singular):
``ValueError`` in ``prepare`` when concrete, ``Status.NOT_POSITIVE_DEFINITE`` when traced;
non-finite ``b``: ``Status.NONFINITE``; with ``tol`` set, a true residual above
``tol ||b||`` gives ``Status.MAX_STEPS`` (the approximation is not that accurate).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from influx import losses as _losses
from influx._xla import jit
from influx.solvers._base import Solution, Solver, Status, all_finite, check_rhs

__all__ = ["ekfac", "kfac", "layers", "DenseLayer", "EKFACState", "quadratic_form"]

_PASS = {"convert_element_type", "copy", "copy_p"}  # value-preserving for kernels and biases
_CALLS = {"pjit", "jit", "closed_call", "core_call"}


@dataclasses.dataclass(frozen=True)
class DenseLayer:
    """A recognised dense layer: ``kernel`` / ``bias`` are indices into the flat parameter
    leaves (``jax.tree_util.tree_leaves(params)``); ``transposed``: the kernel leaf is
    stored ``(d_out, d_in)``; ``path``: the kernel's key path, for reports."""

    kernel: int
    bias: int | None
    d_in: int
    d_out: int
    transposed: bool
    path: str


class EKFACState(NamedTuple):
    """Per-layer eigenbases and eigenvalues, and the diagonal of the remaining leaves.

    ``qa[l]`` ``(d_in (+1), d_in (+1))``, ``qs[l]`` ``(d_out, d_out)``, ``lam[l]``
    ``(d_in (+1), d_out)`` (K-FAC: ``a_i s_j``; EK-FAC: corrected); ``diag``: a pytree
    like the parameters (zeros on layer leaves); ``shift``: ``l2 + damping`` used.
    """

    qa: tuple
    qs: tuple
    lam: tuple
    diag: Any
    shift: jax.Array


# ------------------------------------------------------------------ the interpreter
@dataclasses.dataclass
class _Hooks:
    """What the interpreter does at a recognised layer (``dense``) and records while
    discovering (``found``: layer id -> (kernel leaf, transposed, act shape, out shape);
    ``bias``: layer id -> leaf; ``uses``: leaf -> count of uses outside passthroughs)."""

    perts: dict | None = None  # layer id -> perturbation added to the layer output
    acts: dict = dataclasses.field(default_factory=dict)
    found: dict = dataclasses.field(default_factory=dict)
    bias: dict = dataclasses.field(default_factory=dict)
    uses: dict = dataclasses.field(default_factory=dict)
    counter: int = 0
    _last_layer: int | None = None  # the layer id of the dot_general just evaluated


def _read(env, v):
    return v.val if isinstance(v, jex.core.Literal) else env[v]


def _interp(jaxpr, consts, args, prov_args, hooks: _Hooks):
    """Evaluates ``jaxpr``; ``prov`` maps a variable to ``(leaf, form)`` when it is a
    parameter leaf seen through value-preserving ops (form: "same", "T" for a transposed
    2-D leaf, "bias" for a 1-D leaf broadcast along the last axis)."""
    env, prov, dot_out = {}, {}, {}
    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a, pv in zip(jaxpr.invars, args, prov_args):
        env[v] = a
        if pv is not None:
            prov[v] = pv

    def use(v):
        if not isinstance(v, jex.core.Literal) and v in prov:
            leaf = prov[v][0]
            hooks.uses[leaf] = hooks.uses.get(leaf, 0) + 1

    for eqn in jaxpr.eqns:
        invals = [_read(env, v) for v in eqn.invars]
        name = eqn.primitive.name
        pin = [None if isinstance(v, jex.core.Literal) else prov.get(v) for v in eqn.invars]
        if name in _CALLS and "jaxpr" in eqn.params:
            closed = eqn.params["jaxpr"]
            outs = _interp(closed.jaxpr, closed.consts, invals, pin, hooks)
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
            continue
        out_prov = None
        if pin and pin[0] is not None and len(eqn.invars) == 1:
            leaf, form = pin[0]
            shape_in = np.shape(invals[0])
            if name in _PASS:
                out_prov = (leaf, form)
            elif name == "transpose" and form in ("same", "T") and len(shape_in) == 2:
                out_prov = (leaf, "T" if form == "same" else "same")
            elif name == "reshape" and form in ("same", "bias") and len(shape_in) == 1:
                new = tuple(eqn.params["new_sizes"])
                if new and new[-1] == shape_in[0] and all(d == 1 for d in new[:-1]):
                    out_prov = (leaf, "bias")
            elif (name == "broadcast_in_dim" and form in ("same", "bias")
                  and len(eqn.params["shape"]) >= 1):
                shape = tuple(eqn.params["shape"])
                bd = tuple(eqn.params["broadcast_dimensions"])
                nd_in = len(shape_in)
                if nd_in >= 1 and bd[-1] == len(shape) - 1 and shape[-1] == shape_in[-1] and all(
                        shape_in[k] == 1 for k in range(nd_in - 1)):
                    out_prov = (leaf, "bias")
        if out_prov is not None:
            ans = eqn.primitive.bind(*invals, **eqn.params)
            env[eqn.outvars[0]] = ans
            prov[eqn.outvars[0]] = out_prov
            continue

        if name == "dot_general":
            ans = _dot(eqn, invals, pin, hooks, use)
            env[eqn.outvars[0]] = ans
            if hooks._last_layer is not None:
                dot_out[eqn.outvars[0]] = hooks._last_layer
                hooks._last_layer = None
            continue
        if name == "add" and len(eqn.invars) == 2:
            lid = None
            for k in (0, 1):
                v_dot, p_b = eqn.invars[k], pin[1 - k]
                if (not isinstance(v_dot, jex.core.Literal) and v_dot in dot_out and p_b is not None
                        and p_b[1] in ("bias", "same")):
                    layer = dot_out[v_dot]
                    _, _, _, out_shape, feat_last = hooks.found[layer]
                    b_shape = np.shape(invals[1 - k])
                    if feat_last and len(out_shape) >= 1 and len(b_shape) <= len(out_shape) and (
                            b_shape[-1:] == tuple(out_shape[-1:])) and (
                            p_b[1] == "bias" or len(b_shape) == 1):
                        lid = layer
                        hooks.bias.setdefault(lid, []).append(p_b[0])
                        break
            if lid is not None:
                ans = eqn.primitive.bind(*invals, **eqn.params)
                env[eqn.outvars[0]] = ans
                continue
        for v in eqn.invars:
            use(v)
        ans = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
        if not eqn.primitive.multiple_results:
            ans = [ans]
        for v, a in zip(eqn.outvars, ans):
            env[v] = a
    return [_read(env, v) for v in jaxpr.outvars]


def _dot(eqn, invals, pin, hooks: _Hooks, use):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    kernel_side = None
    if not lb and not rb and len(lc) == 1 and len(rc) == 1:
        for k in (1, 0):  # prefer the rhs as the kernel (x @ W)
            p, other = pin[k], pin[1 - k]
            if p is not None and p[1] in ("same", "T") and np.ndim(invals[k]) == 2 and other is None:
                kernel_side = k
                break
    ans = eqn.primitive.bind(*invals, **eqn.params)
    if kernel_side is None:
        for v in eqn.invars:
            use(v)
        return ans
    leaf, form = pin[kernel_side]
    hooks.uses[leaf] = hooks.uses.get(leaf, 0) + 1
    act = invals[1 - kernel_side]
    ac = (lc if kernel_side == 1 else rc)[0]
    kc = (rc if kernel_side == 1 else lc)[0]
    # kernel operand contracting dim kc; with form "T" the stored leaf is transposed
    transposed = (kc == 1) != (form == "T")
    lid = hooks.counter
    hooks.counter += 1
    feat_last = kernel_side == 1
    hooks.found[lid] = (leaf, transposed, np.shape(act), np.shape(ans), feat_last)
    hooks._last_layer = lid
    # activation as (positions, d_in); the layer output's feature axis
    a2 = jnp.moveaxis(act, ac, -1).reshape(-1, np.shape(act)[ac])
    hooks.acts[lid] = a2
    if hooks.perts is not None and lid in hooks.perts:
        ans = ans + hooks.perts[lid]
    return ans


def _trace(apply_fn, params, x_example):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    x_leaves, x_def = jax.tree_util.tree_flatten(x_example)
    n_p = len(leaves)

    def flat(*ls):
        return apply_fn(jax.tree_util.tree_unflatten(treedef, ls[:n_p]),
                        jax.tree_util.tree_unflatten(x_def, ls[n_p:]))

    closed = jax.make_jaxpr(flat)(*leaves, *x_leaves)
    return closed, treedef, x_def, n_p


def _discover(apply_fn, params, x_example):
    closed, treedef, x_def, n_p = _trace(apply_fn, params, x_example)
    if len(closed.out_avals) != 1:
        raise TypeError(f"ekfac/kfac: apply_fn must return one array of outputs, got "
                        f"{len(closed.out_avals)} arrays")
    leaves = jax.tree_util.tree_leaves(params)
    x_leaves = jax.tree_util.tree_leaves(x_example)
    hooks = _Hooks()
    prov = [(i, "same") for i in range(n_p)] + [None] * len(x_leaves)
    jax.eval_shape(lambda *a: _interp(closed.jaxpr, closed.consts, a, prov, hooks), *leaves, *x_leaves)
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    out = []
    for lid in sorted(hooks.found):
        leaf, transposed, act_shape, out_shape, feat_last = hooks.found[lid]
        if hooks.uses.get(leaf, 0) != 1 or not jnp.issubdtype(leaves[leaf].dtype, jnp.floating):
            continue
        bias = hooks.bias.get(lid, [])
        b = bias[0] if len(bias) == 1 and hooks.uses.get(bias[0], 0) == 0 else None
        shape = np.shape(leaves[leaf])
        d_in, d_out = (shape[1], shape[0]) if transposed else shape
        if b is not None and np.shape(leaves[b]) != (d_out,):
            b = None
        out.append((lid, DenseLayer(leaf, b, int(d_in), int(d_out), bool(transposed), paths[leaf])))
    # a leaf may be the kernel of at most one layer
    kernels = [l.kernel for _, l in out]
    out = [(lid, l) for lid, l in out if kernels.count(l.kernel) == 1]
    meta = {lid: (hooks.found[lid][3], hooks.found[lid][4]) for lid, _ in out}
    return closed, treedef, x_def, n_p, meta, out


def layers(apply_fn, params, x_example) -> list[DenseLayer]:
    """The dense layers K-FAC/EK-FAC will factor for ``apply_fn(params, x_example)``
    (``x_example``: the inputs of one example as a batch of one, e.g. ``x[:1]``); every
    other parameter leaf gets the diagonal."""
    return [l for _, l in _discover(apply_fn, params, x_example)[-1]]


# ------------------------------------------------------------------ output Hessian factor
def _output_factor(loss_fn, z, y):
    """``L`` with ``L L^T = H_z`` (``(D, K)``, ``D = z.size``) for one example."""
    zf = z.reshape(-1)
    if loss_fn is _losses.softmax_cross_entropy and z.ndim == 1:
        p = jax.nn.softmax(z)
        sp = jnp.sqrt(p)
        return jnp.diag(sp) - jnp.outer(p, sp)
    if loss_fn is _losses.squared_error:
        return jnp.eye(zf.size, dtype=z.dtype)
    if loss_fn is _losses.sigmoid_binary_cross_entropy:
        p = jax.nn.sigmoid(zf)
        return jnp.diag(jnp.sqrt(p * (1 - p)))
    hvp = _losses.output_hvp(loss_fn)
    eye = jnp.eye(zf.size, dtype=z.dtype)
    y1 = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], y)
    h = jax.vmap(lambda u: hvp(z[None], y1, u.reshape(z.shape)[None])[0].reshape(-1))(eye)
    h = 0.5 * (h + h.T)
    w, v = jnp.linalg.eigh(h)
    return v * jnp.sqrt(jnp.maximum(w, 0.0))


# ------------------------------------------------------------------ statistics
def _stats_fn(obj, params, found):
    """``(pseudo, other, feat_last)``: ``pseudo(example, label_grad)`` returns the layer
    inputs and the gradients w.r.t. the non-layer leaves and the layer outputs for one
    example; ``other``: indices of the non-layer (diagonal) leaves; ``feat_last``: per layer,
    whether the output's feature axis is the last one."""
    closed, treedef, x_def, n_p, meta, lyr = found
    leaves = jax.tree_util.tree_leaves(params)
    layer_leaves = {l.kernel for _, l in lyr} | {l.bias for _, l in lyr if l.bias is not None}
    other = [i for i in range(n_p) if i not in layer_leaves
             and jnp.issubdtype(leaves[i].dtype, jnp.floating)]

    def forward(other_vals, perts, x):
        ls = list(leaves)
        for i, v in zip(other, other_vals):
            ls[i] = v
        hooks = _Hooks(perts=perts)
        xl = jax.tree_util.tree_leaves(x)
        prov = [(i, "same") for i in range(n_p)] + [None] * len(xl)
        (z,) = _interp(closed.jaxpr, closed.consts, ls + xl, prov, hooks)
        return z, {lid: hooks.acts[lid] for lid, _ in lyr}

    def pseudo(example, label_grad: bool):
        """Pseudo-gradients w.r.t. other leaves and layer outputs: rows = columns of L
        (``label_grad=False``) or one row = the loss gradient (``True``)."""
        # apply_fn sees a batch of one example (models need not accept unbatched input)
        x, y = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], example)
        perts = {lid: jnp.zeros(meta[lid][0], leaves[l.kernel].dtype) for lid, l in lyr}
        z, vjp, acts = jax.vjp(lambda o, p: forward(o, p, x), [leaves[i] for i in other], perts,
                               has_aux=True)
        if label_grad:
            ct = jax.grad(lambda zz: jnp.sum(obj.loss_fn(zz, y)))(z)[None]
        else:
            y0 = jax.tree_util.tree_map(lambda a: a[0], y)
            ct = _output_factor(obj.loss_fn, z[0], y0).T.reshape((-1,) + z.shape)
        g_other, g_perts = jax.vmap(vjp)(ct)
        return acts, g_other, g_perts

    feat_last = {lid: meta[lid][1] for lid, _ in lyr}
    return pseudo, other, feat_last


def _g2d(g, feat_last):
    """Layer-output gradient ``(K, ...)`` -> ``(K, positions, d_out)``."""
    if not feat_last:
        g = jnp.moveaxis(g, 1, -1)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def _aug(a, bias: bool):
    return jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1) if bias else a


# ------------------------------------------------------------------ the solver
def ekfac(*, correct: bool = True, tol: float | None = None, residual: bool = True) -> Solver:
    """EK-FAC (``correct=True``) or K-FAC (``correct=False``) solver (module docstring).

    Args:
      correct: refit the eigenvalues in the Kronecker-factored eigenbasis (EK-FAC, one
        more pass over the data in ``prepare``); ``False``: plain K-FAC.
      tol: if set, a relative residual ``||A x - b|| / ||b||`` above ``tol`` gives
        ``Status.MAX_STEPS`` (needs ``residual=True``).
      residual: spend one operator product per right-hand side on the true residual.

    ``prepare(op)`` needs an :class:`influx.curvature.Operator` (it reads ``op.obj``,
    ``op.params``, ``op.data``, ``op.chunk_size``).
    """
    if tol is not None and not (float(tol) > 0):
        raise ValueError(f"ekfac: tol must be None or > 0, got {tol!r}")
    if tol is not None and not residual:
        raise ValueError("ekfac: tol needs residual=True")
    name = "ekfac" if correct else "kfac"

    def prepare(op):
        for attr in ("obj", "params", "data", "chunk_size"):
            if not hasattr(op, attr):
                raise TypeError(f"{name}: prepare needs an influx.curvature.Operator (missing "
                                f"op.{attr}); K-FAC reads the model and data, not only products")
        shift = op.shift
        if not isinstance(shift, jax.core.Tracer) and not float(shift) > 0:
            raise ValueError(f"{name}: the shift l2 + damping must be > 0 (got {float(shift):.3g}); "
                             "a Kronecker-factored approximation has zero eigenvalues")
        return _prepare(op, correct)

    def apply(state: EKFACState, op, b) -> Solution:
        b = check_rhs(op, b)
        x = _inverse(state, op, b)
        finite_b = all_finite(ravel_pytree(b)[0])
        ok_shift = state.shift > 0
        if residual:
            r = ravel_pytree(op(x))[0] - ravel_pytree(b)[0]
            rn = jnp.linalg.norm(r)
            steps = jnp.asarray(1)
        else:
            rn = jnp.asarray(jnp.nan, ravel_pytree(b)[0].dtype)
            steps = jnp.asarray(0)
        status = jnp.asarray(Status.CONVERGED)
        if tol is not None:
            bn = jnp.linalg.norm(ravel_pytree(b)[0])
            status = jnp.where(rn > tol * bn, Status.MAX_STEPS, status)
        status = jnp.where(ok_shift, status, Status.NOT_POSITIVE_DEFINITE)
        status = jnp.where(finite_b & all_finite(ravel_pytree(x)[0]), status, Status.NONFINITE)
        return Solution(x, rn, steps, status == Status.CONVERGED, status, {})

    return Solver(name, prepare, apply, {"correct": correct, "tol": tol, "residual": residual})


def kfac(*, tol: float | None = None, residual: bool = True) -> Solver:
    """Plain K-FAC: ``ekfac(correct=False)``."""
    return ekfac(correct=False, tol=tol, residual=residual)


def _first(data):
    """The inputs of the first example as a batch of one (what ``apply_fn`` is traced on)."""
    return jax.tree_util.tree_map(lambda a: a[:1], data[0])


def _layer_info(obj, params, x0):
    key = (obj, jax.tree_util.tree_structure(params),
           tuple((np.shape(l), str(jnp.result_type(l))) for l in jax.tree_util.tree_leaves(params)),
           tuple((np.shape(l), str(jnp.result_type(l))) for l in jax.tree_util.tree_leaves(x0)))
    hit = _CACHE.get(key)
    if hit is None:
        found = _discover(obj.apply_fn, params, x0)
        hit = found
        if len(_CACHE) > 32:
            _CACHE.clear()
        _CACHE[key] = hit
    return hit


_CACHE: dict = {}


def _prepare(op, correct: bool) -> EKFACState:
    x0 = _first(op.data)
    found = _layer_info(op.obj, op.params, x0)
    key = (id(found), op.obj, correct, op.chunk_size)
    run = _RUNS.get(key)
    if run is None:
        run = jit(functools.partial(_prepare_run, obj=op.obj, found=found, correct=correct,
                                        chunk_size=op.chunk_size))
        if len(_RUNS) > 32:
            _RUNS.clear()
        _RUNS[key] = run
    return run(op.params, op.data, op.shift)


_RUNS: dict = {}


def _prepare_run(params, data, shift, *, obj, found, correct, chunk_size):
    """The factor passes (compiled once per model, data shapes and options)."""
    from influx.curvature import chunked_sum

    lyr = found[-1]
    leaves, treedef = jax.tree_util.tree_flatten(params)
    n = jax.tree_util.tree_leaves(data)[0].shape[0]
    pseudo, other, feat_last = _stats_fn(obj, params, found)

    def per_chunk(chunk):
        """Per-layer ``(B, T, din~)`` inputs and ``(B, K, T, dout)`` output gradients."""
        def one(ex):
            acts, g_other, g_perts = pseudo(ex, False)
            a = [_aug(acts[lid], l.bias is not None) for lid, l in lyr]
            g = [_g2d(g_perts[lid], feat_last[lid]) for lid, _ in lyr]
            return a, g, [jnp.sum(go * go, axis=0) for go in g_other]

        return jax.vmap(one)(chunk)

    def factor_stats(chunk):
        a, g, d = per_chunk(chunk)
        out = {"other": [jnp.sum(x, axis=0) for x in d], "A": [], "S": []}
        for ak, gk in zip(a, g):
            t = ak.shape[1]
            af = ak.reshape(-1, ak.shape[-1])
            gf = gk.reshape(-1, gk.shape[-1])
            out["A"].append(af.T @ af / t)
            out["S"].append(gf.T @ gf)
        return out

    st = chunked_sum(factor_stats, data, chunk_size=chunk_size)
    st = jax.tree_util.tree_map(lambda s: s / n, st)
    qa, qs, lam = [], [], []
    for k in range(len(lyr)):
        wa, va = jnp.linalg.eigh(st["A"][k])
        ws, vs = jnp.linalg.eigh(st["S"][k])
        qa.append(va)
        qs.append(vs)
        lam.append(jnp.outer(jnp.maximum(wa, 0), jnp.maximum(ws, 0)))
    if correct and lyr:
        def corr_stats(chunk):
            a, g, _ = per_chunk(chunk)
            out = []
            for k in range(len(lyr)):
                ar = a[k] @ qa[k]  # (B, T, din~): rows Q_A^T a~
                gr = g[k] @ qs[k]  # (B, K, T, dout)
                if ar.shape[1] == 1:  # one position: (Q_A^T G Q_S)_ij = ar_i gr_j
                    out.append((ar[:, 0] ** 2).T @ jnp.sum(gr[:, :, 0] ** 2, axis=1))
                else:
                    gm = jnp.einsum("bti,bktj->bkij", ar, gr)
                    out.append(jnp.sum(gm * gm, axis=(0, 1)))
            return out

        cs = chunked_sum(corr_stats, data, chunk_size=chunk_size)
        lam = [c / n for c in cs]
    diag = [jnp.zeros_like(l) for l in leaves]
    for i, d in zip(other, st["other"]):
        diag[i] = d
    return EKFACState(tuple(qa), tuple(qs), tuple(lam),
                      jax.tree_util.tree_unflatten(treedef, diag), jnp.asarray(shift))


def _layer_matrix(l: DenseLayer, leaves):
    """``(d_in (+1), d_out)`` matrix of a layer's entries of a parameter-shaped vector."""
    w = leaves[l.kernel]
    w = w.T if l.transposed else w
    if l.bias is not None:
        w = jnp.concatenate([w, leaves[l.bias][None, :]], axis=0)
    return w


def _inverse(state: EKFACState, op, b):
    """``x ~ (C + s I)^-1 b`` from the factors (no operator product)."""
    lyr = _layer_info(op.obj, op.params, _first(op.data))[-1]
    leaves, treedef = jax.tree_util.tree_flatten(b)
    dleaves = jax.tree_util.tree_leaves(state.diag)
    s = state.shift
    out = [bl / (dl.astype(bl.dtype) + s) for bl, dl in zip(leaves, dleaves)]
    for k, (_, l) in enumerate(lyr):
        m = _layer_matrix(l, leaves)
        qa, qs = state.qa[k].astype(m.dtype), state.qs[k].astype(m.dtype)
        r = (qa.T @ m @ qs) / (state.lam[k].astype(m.dtype) + s)
        xm = qa @ r @ qs.T
        if l.bias is not None:
            out[l.bias] = xm[-1]
            xm = xm[:-1]
        out[l.kernel] = xm.T if l.transposed else xm
    return jax.tree_util.tree_unflatten(treedef, out)


def quadratic_form(state: EKFACState, obj, params, chunk):
    """``g_m^T A^-1 g_m`` for every example ``m`` of ``chunk`` with the factored inverse,
    from per-example loss gradients in the eigenbasis (no solve per example):
    ``sum_l sum_ij (Q_A^T G_m Q_S)_ij^2 / (Lambda_ij + s) + sum_j g_j^2 / (d_j + s)``."""
    x0 = _first(chunk)
    found = _layer_info(obj, params, x0)
    lyr = found[-1]
    pseudo, other, feat_last = _stats_fn(obj, params, found)
    dleaves = jax.tree_util.tree_leaves(state.diag)
    s = state.shift

    def one(ex):
        acts, g_other, g_perts = pseudo(ex, True)
        tot = sum(jnp.sum(g[0] * g[0] / (dleaves[i] + s)) for i, g in zip(other, g_other))
        for k, (lid, l) in enumerate(lyr):
            a = _aug(acts[lid], l.bias is not None)
            g = _g2d(g_perts[lid], feat_last[lid])[0]  # (T, dout)
            gm = state.qa[k].T @ (a.T @ g) @ state.qs[k]
            tot = tot + jnp.sum(gm * gm / (state.lam[k] + s))
        return tot

    return jax.vmap(one)(chunk)
