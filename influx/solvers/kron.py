"""Kronecker-factored curvature blocks: which layers of a model get one.

``apply_fn`` is traced once for one example (``jax.make_jaxpr``) and evaluated by a small
interpreter that recognises four kinds of linear layers whose weight is a parameter leaf
(seen through casts, copies and transposes) applied to something that is not a parameter:

* ``"dense"``: ``dot_general`` without batch dimensions, any number of contracted and free
  kernel axes (``nn.Dense``, ``DenseGeneral`` / ``nnx.LinearGeneral``, the query, key, value
  and output projections of ``MultiHeadAttention``, einsum kernels, and a dense layer applied
  at every position of a sequence: the "expand" setting, every position is a row);
* ``"batched"``: ``dot_general`` with batch dimensions shared by the layer input and the
  kernel (per-head kernels ``einsum('bthd,hde->bthe', x, W)`` with ``W: (heads, d, e)``,
  mixtures of experts ``einsum('ecd,edf->ecf', x, W)``, linen ``DenseGeneral(batch_dims=)``,
  ``nnx.Einsum`` / ``nn.Einsum`` with such an equation; any number of batch axes in any
  placement, contracted axes in any order, the kernel on either side). Slice ``h`` of the
  batch axes (flattened row-major, in the output's order) is a dense layer of its own,
  ``y[h] = x[h] W[h]`` at every remaining position, with its own inputs and output
  gradients, and gets its own block ``A_h (x) S_h`` (``A_h = E[a_h a_h^T]``, ``S_h =
  E[g_h g_h^T]``), exactly as a feature group of a grouped convolution. The alternative,
  the batch index kept as one more factor (one ``A`` and ``S`` shared by all slices, times an
  ``H x H`` factor), would average the input statistics of different heads or experts,
  which see different inputs, and is not exact where K-FAC is (one position per slice, or
  a linear model); per-slice blocks cost ``H (d_in^3 + d_out^3)`` for the
  eigendecompositions, ``H`` times the shared factors' but the same as ``H`` separate
  layers. It is also what the peers amount to: kronfluence factors only ``nn.Linear`` and
  ``nn.Conv2d`` modules, so per-head or per-expert weights get factors only when written
  as one ``nn.Linear`` each (one block per slice); kfac-jax's graph matcher registers a
  ``dot_general`` as a dense layer only without batch dimensions (its "repeated dense"
  blocks are one *shared* weight applied along vmapped axes, the ``"dense"`` expand case
  here), so a batched kernel falls back to its diagonal/generic blocks. A batched
  ``dot_general`` whose slices are ``1 x 1`` (a scale per slice) is left to the exact
  diagonal, which is its exact block;
* ``"conv"``: ``conv_general_dilated`` with ``batch_group_count = 1`` (any number of
  spatial dimensions, strides, padding, dilations): the rows are the input patches at
  every output position (Grosse & Martens 2016, KFC; the "expand" form of Eschenhagen et
  al. 2023), formed by strided slices (:func:`patches`), the kernel viewed as
  ``(*filter, C_in) x C_out`` rows. A grouped convolution
  (``feature_group_count = G > 1``; depthwise: ``G`` = input channels) is ``G`` layers,
  one block per group: group ``g``'s outputs are its kernel columns ``g*O/G ... (g+1)*O/G``
  applied to the patches of its input channels and nothing else, a layer of its own (the
  Gauss-Newton blocks between two groups are dropped as those between two layers are; they
  vanish when the groups' outputs reach the loss separately, e.g. a linear model with
  squared error);
* ``"embedding"``: a ``gather`` of rows of a 2-D table (``nn.Embed``, ``jnp.take``): the
  rows are the one-hot token vectors, so the input factor ``A`` is exactly diagonal (the
  token frequencies) and is kept as a diagonal -- no ``V x V`` matrix, no eigendecomposition.

A layer's weight is viewed as a ``(d_in, d_out)`` matrix by a transpose ``perm`` of the leaf
followed by a reshape (contracted/input axes first, then a batched kernel's batch axes,
output-feature axes last); its bias is a parameter leaf added right after it (possibly after
a transpose of the layer's output), spanning the output features (a batched kernel's bias:
the batch axes, then the output features) and broadcast along every other axis (through
reshapes that insert size-1 axes, ``broadcast_in_dim``, ``squeeze``, transposes). A
leaf used anywhere else (weight tying, a kernel also used in a regulariser inside
``apply_fn``) gets no block. Nested ``jit`` and ``checkpoint``/``remat`` calls are inlined;
layers inside ``cond``, ``while`` or custom derivatives are not seen (custom derivatives:
unless declared, below), nor inside a ``scan``, except a ``scan`` over stacked parameters
(``lax.scan``, ``nn.scan``, ``nnx.scan`` with the layer weights as scanned inputs): it is
unrolled and every slice of a stacked leaf is a layer of its own (one block per slice,
when every slice is one). Nested scans (a scan of blocks, each scanning its own stacked
layers) unroll the same way: one block per innermost slice ``leaf[i, j]``.

Layers can be declared by hand (:class:`Layer`, the ``declare=`` option of
:func:`blocks`, :func:`layers`, :func:`coverage` and of the K-FAC/EK-FAC solvers): a leaf
forced onto the diagonal, or a leaf that must be a layer of a given kind (and then is
looked for inside ``custom_jvp``/``custom_vjp`` functions too); a declaration the traced
graph does not match is an :class:`InputError` naming the leaf and what the trace found.

:func:`layers` reports every parameter leaf with the block it got, :func:`coverage` the
share of parameters in Kronecker blocks, :func:`blocks` the blocks themselves.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, NamedTuple

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from influx.errors import InputError

__all__ = ["Block", "LeafReport", "Layer", "blocks", "coverage", "declarations", "layers",
           "COVERAGE_WARNING"]

COVERAGE_WARNING = 0.9  # prepare warns when less than this share of parameters is in blocks
_PASS = {"convert_element_type", "copy", "copy_p"}
_CALLS = {"pjit", "jit", "closed_call", "core_call", "checkpoint", "remat", "remat2"}  # inlined
_CUSTOM = {"custom_jvp_call", "custom_vjp_call"}  # inlined only around declared layers


@dataclasses.dataclass(frozen=True)
class Block:
    """A Kronecker-factored layer (hashable: it is static data of a solver state).

    ``kernel`` / ``bias``: indices into ``jax.tree_util.tree_leaves(params)``; the weight
    matrix is ``leaf[index].transpose(perm).reshape(d_in, groups * d_out)[:, cols]`` with
    ``cols = group * d_out : (group + 1) * d_out`` (:meth:`matrix`; ``leaf`` itself when
    ``index`` is ``None``, ``leaf[i]`` for a layer inside a ``scan`` over stacked
    parameters, ``leaf[i, j]`` (``index = (i, j)``) inside nested scans; one feature group of
    a grouped convolution, or one slice of a batched kernel's batch axes (``kind =
    "batched"``; ``perm`` puts the batch axes between the input and the output axes, so
    slice ``group`` is ``W[h]``): ``groups > 1``). The bias, if any
    (``bias_leaf[index].reshape(-1)[cols]``), is appended as a last row, so the factored
    matrix is ``(d_in + 1, d_out)``. ``site``: which recognised operation of the traced
    program it is (one per feature group or batch slice);
    ``path``: the kernel's key path, for reports; ``opened``: the leaves whose
    custom-derivative calls the interpreter enters (declared layers, :class:`Layer`).
    """

    kind: str  # "dense" | "batched" | "conv" | "embedding"
    site: int
    kernel: int
    bias: int | None
    perm: tuple
    d_in: int
    d_out: int
    path: str
    index: int | tuple | None = None  # the slice of a stacked kernel (and bias) leaf: scans
    group: int = 0  # the feature group of a grouped convolution, the slice of a batched kernel
    groups: int = 1
    opened: frozenset = frozenset()

    def _cols(self, w):
        if self.groups == 1:
            return w
        return w[..., self.group * self.d_out:(self.group + 1) * self.d_out]

    def _kernel_view(self, k):
        """The kernel (slice) as ``(d_in, groups * d_out)``."""
        return k.transpose(self.perm).reshape(self.d_in, self.groups * self.d_out)

    def matrix(self, leaves):
        """The block's ``(rows, d_out)`` matrix of a parameter-shaped list of ``leaves``
        (jax or numpy arrays)."""
        ix = _ix(self.index)
        w = self._cols(self._kernel_view(leaves[self.kernel][ix]))
        if self.bias is None:
            return w
        b = self._cols(leaves[self.bias][ix].reshape(1, self.groups * self.d_out))
        return (np.concatenate if isinstance(w, np.ndarray) else jnp.concatenate)([w, b], axis=0)

    def write(self, m, out):
        """Writes the block's ``(rows, d_out)`` matrix ``m`` into the list of leaves ``out``
        (in place; the other groups and slices of the leaves are kept)."""
        ix = _ix(self.index)
        cols = slice(self.group * self.d_out, (self.group + 1) * self.d_out)
        if self.bias is not None:
            bl = jnp.asarray(out[self.bias])
            cur = bl[ix].reshape(-1)
            out[self.bias] = bl.at[ix].set(cur.at[cols].set(m[-1]).reshape(bl[ix].shape))
            m = m[:-1]
        kl = jnp.asarray(out[self.kernel])
        k = kl[ix]
        view = self._kernel_view(k).at[:, cols].set(m.astype(k.dtype))
        shape_t = tuple(k.shape[i] for i in self.perm)
        new = view.reshape(shape_t).transpose(tuple(int(i) for i in np.argsort(self.perm)))
        out[self.kernel] = kl.at[ix].set(new)

    @property
    def transposed(self) -> bool:
        """A 2-D kernel stored ``(d_out, d_in)`` (torch layout)."""
        return self.perm == (1, 0)

    @property
    def diagonal_inputs(self) -> bool:
        """The input factor is diagonal (embeddings: one-hot rows)."""
        return self.kind == "embedding"

    @property
    def rows(self) -> int:
        return self.d_in + (self.bias is not None)


class LeafReport(NamedTuple):
    """One parameter leaf: its key ``path``, ``shape``, ``size``, the ``block`` it got
    (``"dense"``, ``"batched"`` (one block per batch slice), ``"conv"``, ``"embedding"``:
    Kronecker; ``"diagonal"``: the exact diagonal
    of the Gauss-Newton matrix; ``"none"``: not floating point, not a parameter of the solve)
    and its ``role`` in the block (``"kernel"``, ``"bias"`` or ``""``)."""

    path: str
    shape: tuple
    size: int
    block: str
    role: str


class _Param(NamedTuple):
    """A value that is parameter leaf ``leaf`` (its slice ``leaf[index]`` inside unrolled,
    possibly nested, scans: one index per scan level) transposed by ``perm``."""
    leaf: int
    perm: tuple
    index: tuple = ()


class _Bias(NamedTuple):
    """A value that is parameter leaf ``leaf`` (or its slice ``leaf[index]``) broadcast: the
    value's axes ``axes`` hold the leaf's axes (in the leaf's order), and it is constant
    along every other axis (size 1 or broadcast)."""
    leaf: int
    index: tuple = ()
    axes: tuple = ()


def _shape(p, leaf_shapes) -> tuple:
    """The shape of the leaf (slice) a provenance refers to."""
    return tuple(leaf_shapes[p.leaf])[len(p.index):]


def _ix(index) -> tuple:
    """A :class:`Block`'s public ``index`` (``None``, an int, or a tuple for nested scans) as
    a tuple of slice indices."""
    if index is None:
        return ()
    return (int(index),) if isinstance(index, (int, np.integer)) else tuple(index)


def _public_index(index: tuple):
    return None if not index else index[0] if len(index) == 1 else tuple(index)


class _Site(NamedTuple):
    """A recognised linear operation: weight leaf, its ``(d_in, d_out)`` view, and the axes
    of the operation's output that hold the output features (in ``perm``'s order)."""
    kind: str
    leaf: int
    perm: tuple
    d_in: int
    d_out: int
    out_axes: tuple
    out_shape: tuple
    act_operand: int = 0  # which operand is the layer input
    act_axes: tuple = ()  # dense: the input's contracted axes, in the kernel's order
    index: tuple = ()  # the slice of a stacked leaf (a layer inside scans)
    group: int = 0  # a grouped convolution is one site per feature group
    groups: int = 1
    n_in: int = 0  # how many of ``perm``'s axes are input axes (the rest: output features)
    nbatch: int = 0  # batched dense: the leading output axes that are the batch dimensions
    act_batch: tuple = ()  # batched dense: the input's batch axes, in the kernel's order

    @property
    def pert_shape(self) -> tuple:
        """Shape of this site's share of the operation's output (one feature group's, one
        batch slice's)."""
        if self.nbatch:
            return self.out_shape[self.nbatch:]
        if self.groups == 1:
            return self.out_shape
        s = list(self.out_shape)
        s[self.out_axes[0]] = self.d_out
        return tuple(s)

    @property
    def bias_axes(self) -> tuple:
        """The axes of the operation's output that a bias of this layer spans, in the order of
        the bias leaf: the batch axes, then the output features."""
        return tuple(range(self.nbatch)) + tuple(self.nbatch + a for a in self.out_axes)

    def slice_rows(self, r, g: int):
        """Group / slice ``g``'s share of the operation's input rows ``r`` (:func:`_rows`)."""
        if self.nbatch:
            return r[g]
        return r if self.groups == 1 else r[:, g * self.d_in:(g + 1) * self.d_in]

    def combine(self, parts):
        """The operation's output perturbation from one part per group / batch slice."""
        if self.nbatch:
            return jnp.stack(parts).reshape(self.out_shape)
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=self.out_axes[0])


@dataclasses.dataclass
class _Tape:
    """State of one interpretation: ``perts`` (site -> perturbation added to its output) and
    ``want`` (sites whose input rows to record) in a run; what discovery records."""

    perts: dict | None = None
    want: frozenset = frozenset()
    rows: dict = dataclasses.field(default_factory=dict)  # site -> (positions, d_in)
    sites: dict = dataclasses.field(default_factory=dict)  # site -> _Site
    bias: dict = dataclasses.field(default_factory=dict)  # site -> [leaf]
    uses: dict = dataclasses.field(default_factory=dict)  # (leaf, index) -> uses
    opened: frozenset = frozenset()  # leaves whose custom-derivative calls are interpreted
    counter: int = 0

    def use(self, prov):
        if prov is not None:
            key = (prov.leaf, prov.index)
            self.uses[key] = self.uses.get(key, 0) + 1


def _read(env, v):
    return v.val if isinstance(v, jex.core.Literal) else env[v]


def _pass_prov(name, params, p, shape_in, leaf_shape):
    """Provenance of the output of a one-operand value-preserving op, or ``None``: casts and
    copies keep it, a transpose permutes a kernel's axes, and a reshape that only inserts or
    drops size-1 axes, a ``broadcast_in_dim``, a ``squeeze`` or a transpose of a plain leaf
    (or of a broadcast one) give a :class:`_Bias` (the leaf broadcast along other axes)."""
    if name in _PASS:
        return p
    if name == "transpose" and isinstance(p, _Param):
        return _Param(p.leaf, tuple(p.perm[i] for i in params["permutation"]), p.index)
    nd = len(leaf_shape)
    if isinstance(p, _Bias):
        axes = p.axes
    elif isinstance(p, _Param) and p.perm == tuple(range(len(p.perm))):
        axes = tuple(range(nd))
    else:
        return None
    if name == "transpose":
        perm = tuple(params["permutation"])
        return _Bias(p.leaf, p.index, tuple(perm.index(a) for a in axes))
    if name == "broadcast_in_dim":
        bd = tuple(params["broadcast_dimensions"])
        return _Bias(p.leaf, p.index, tuple(bd[a] for a in axes))
    if name == "squeeze":
        gone = {d % len(shape_in) for d in params["dimensions"]}
        if gone & set(axes):
            return None
        return _Bias(p.leaf, p.index, tuple(a - sum(d < a for d in gone) for a in axes))
    if name == "reshape":
        # only size-1 axes inserted or dropped, the leaf's axes in order: match the leaf's
        # shape right-aligned in the new shape, every other new axis of size 1
        if list(axes) != sorted(axes) or any(
                shape_in[i] != 1 for i in range(len(shape_in)) if i not in axes):
            return None
        new = tuple(params["new_sizes"])
        pos, j = [], len(new) - 1
        for k in reversed(range(nd)):
            while j >= 0 and new[j] != leaf_shape[k]:
                if new[j] != 1:
                    return None
                j -= 1
            if j < 0:
                return None
            pos.append(j)
            j -= 1
        if any(new[i] != 1 for i in range(j + 1)):
            return None
        return _Bias(p.leaf, p.index, tuple(reversed(pos)))
    return None


def _bind(eqn, result, env, prov, site_of):
    """Binds a sub-program's ``(outs, provenances, sites)`` to the equation's outputs."""
    for v, o, p, s in zip(eqn.outvars, *result):
        env[v] = o
        if p is not None:
            prov[v] = p
        if s is not None:
            site_of[v] = s


def _interp(jaxpr, consts, args, provs, tape: _Tape, leaf_shapes):
    """Evaluates ``jaxpr``; returns ``(outs, out_provs, out_sites)``."""
    env, prov, site_of = {}, {}, {}
    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a, p in zip(jaxpr.invars, args, provs):
        env[v] = a
        if p is not None:
            prov[v] = p
    get = lambda v: None if isinstance(v, jex.core.Literal) else prov.get(v)  # noqa: E731
    for eqn in jaxpr.eqns:
        invals = [_read(env, v) for v in eqn.invars]
        name, pin = eqn.primitive.name, [get(v) for v in eqn.invars]
        if name in _CALLS and "jaxpr" in eqn.params:
            c = eqn.params["jaxpr"]  # closed (jit) or open (checkpoint / remat)
            inner, consts = (c.jaxpr, c.consts) if hasattr(c, "consts") else (c, [])
            _bind(eqn, _interp(inner, consts, invals, pin, tape, leaf_shapes), env, prov, site_of)
            continue
        if (name in _CUSTOM and tape.opened
                and any(p is not None and p.leaf in tape.opened for p in pin)):
            c = eqn.params["call_jaxpr"]  # a declared layer inside: its primal program
            _bind(eqn, _interp(c.jaxpr, c.consts, invals, pin, tape, leaf_shapes), env, prov, site_of)
            continue
        if name == "scan" and _unrollable(eqn, pin):
            for v, o in zip(eqn.outvars, _unroll_scan(eqn, invals, pin, tape, leaf_shapes)):
                env[v] = o
            continue
        if len(pin) == 1 and pin[0] is not None:
            p = _pass_prov(name, eqn.params, pin[0], np.shape(invals[0]), _shape(pin[0], leaf_shapes))
            if p is not None:
                env[eqn.outvars[0]] = eqn.primitive.bind(*invals, **eqn.params)
                prov[eqn.outvars[0]] = p
                continue
        site = _match(name, eqn, invals, pin, leaf_shapes)
        if site is not None:
            sid = tape.counter
            tape.counter += site.groups
            sids = [sid + g for g in range(site.groups)]
            for g in range(site.groups):
                tape.sites[sid + g] = site._replace(group=g)
            tape.use(_Param(site.leaf, (), site.index))
            ans = eqn.primitive.bind(*invals, **eqn.params)
            if any(i in tape.want for i in sids):
                r = _rows(name, eqn, invals, site)
                for g, i in enumerate(sids):
                    if i in tape.want:
                        tape.rows[i] = site.slice_rows(r, g)
            if tape.perts is not None and any(i in tape.perts for i in sids):
                parts = [tape.perts[i] if i in tape.perts else jnp.zeros(site.pert_shape, ans.dtype)
                         for i in sids]
                ans = ans + site.combine(parts)
            env[eqn.outvars[0]] = ans
            site_of[eqn.outvars[0]] = (sid, tuple(range(len(site.out_shape))))
            continue
        if name == "add" and _bias_add(eqn, invals, pin, site_of, tape, leaf_shapes):
            env[eqn.outvars[0]] = eqn.primitive.bind(*invals, **eqn.params)
            continue
        for p in pin:
            tape.use(p)
        ans = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
        for v, a in zip(eqn.outvars, ans if eqn.primitive.multiple_results else [ans]):
            env[v] = a
        if (name == "transpose" or name in _PASS) and not isinstance(eqn.invars[0], jex.core.Literal) \
                and eqn.invars[0] in site_of:  # a layer output, transposed: its bias may follow
            sid, amap = site_of[eqn.invars[0]]
            if name == "transpose":
                perm = tuple(eqn.params["permutation"])
                amap = tuple(perm.index(a) for a in amap)
            site_of[eqn.outvars[0]] = (sid, amap)
    outs = [_read(env, v) for v in jaxpr.outvars]
    return outs, [get(v) for v in jaxpr.outvars], [
        None if isinstance(v, jex.core.Literal) else site_of.get(v) for v in jaxpr.outvars]


def _unrollable(eqn, pin) -> bool:
    """A ``scan`` that slices a parameter leaf (or a slice of one, in a nested scan) along
    its leading axis (stacked layers)."""
    first = eqn.params["num_consts"] + eqn.params["num_carry"]
    return any(isinstance(p, _Param) and p.perm[:1] == (0,) for p in pin[first:])


def _unroll_scan(eqn, invals, pin, tape: _Tape, leaf_shapes):
    """Evaluates a ``scan`` step by step, so that every slice of a stacked parameter leaf is
    a layer of its own (one block per slice); returns the scan's outputs."""
    prm = eqn.params
    nc, nk, body = prm["num_consts"], prm["num_carry"], prm["jaxpr"]
    consts, carry, xs = invals[:nc], list(invals[nc:nc + nk]), invals[nc + nk:]
    xprov = []
    for p in pin[nc + nk:]:
        if isinstance(p, _Param) and p.perm[:1] == (0,):
            xprov.append(p)
        else:
            tape.use(p)  # carried or nested-sliced parameters: no block
            xprov.append(None)
    ys = []
    steps = range(prm["length"] - 1, -1, -1) if prm["reverse"] else range(prm["length"])
    for i in steps:
        provs = list(pin[:nc]) + [None] * nk + [
            None if p is None else _Param(p.leaf, tuple(a - 1 for a in p.perm[1:]), p.index + (i,))
            for p in xprov]
        outs, _, _ = _interp(body.jaxpr, body.consts, list(consts) + carry + [x[i] for x in xs],
                             provs, tape, leaf_shapes)
        carry, y = outs[:nk], outs[nk:]
        ys.append(y)
    if prm["reverse"]:
        ys = ys[::-1]
    stacked = [jnp.stack(col) for col in zip(*ys)] if ys else []
    return carry + stacked


def _bias_add(eqn, invals, pin, site_of, tape, leaf_shapes) -> bool:
    """Records ``site output + bias``: a leaf broadcast along every axis of the layer's output
    except the ones it spans (:attr:`_Site.bias_axes`: the output features, and for a batched
    kernel the batch axes first), in that order (the output possibly transposed before)."""
    out_shape = tuple(eqn.outvars[0].aval.shape)
    for k in (0, 1):
        v, p = eqn.invars[k], pin[1 - k]
        if isinstance(v, jex.core.Literal) or v not in site_of or p is None:
            continue
        if isinstance(p, _Param) and p.perm != tuple(range(len(p.perm))):
            continue
        sid, amap = site_of[v]
        site = tape.sites[sid]
        if site.kind == "embedding":  # a table row plus a vector: the vector gets the diagonal
            continue
        bshape = _shape(p, leaf_shapes)
        have = p.axes if isinstance(p, _Bias) else tuple(range(len(bshape)))
        want = tuple(amap[a] for a in site.bias_axes)
        if (have == want and np.shape(invals[k]) == out_shape
                and tuple(out_shape[a] for a in want) == bshape
                and np.ndim(invals[1 - k]) == len(out_shape)):
            tape.bias.setdefault(sid, []).append((p.leaf, p.index))
            return True
    return False


def _match(name, eqn, invals, pin, leaf_shapes) -> _Site | None:
    """The layer an equation is, or ``None``."""
    if name == "dot_general":
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        for k in (1, 0):  # prefer the rhs as the kernel (x @ W)
            p, other = pin[k], pin[1 - k]
            if isinstance(p, _Param) and other is None:
                kc, kb = list(rc if k == 1 else lc), list(rb if k == 1 else lb)
                nd = np.ndim(invals[k])
                kf = [i for i in range(nd) if i not in kc and i not in kb]
                shp = np.shape(invals[k])
                d_in, d_out = math.prod(shp[i] for i in kc), math.prod(shp[i] for i in kf)
                if kb and d_in * d_out == 1:  # a scale per slice: the exact diagonal is its block
                    return None
                # one slice of the output (batch axes dropped): (input free, kernel free) for
                # x @ W, (kernel free, input free) for W @ x
                out_nd = np.ndim(invals[1 - k]) - len(kc) - len(kb) + len(kf)
                out_axes = (tuple(range(out_nd - len(kf), out_nd)) if k == 1
                            else tuple(range(len(kf))))
                return _Site("batched" if kb else "dense", p.leaf, tuple(p.perm[i] for i in kc + kb + kf),
                             d_in, d_out, out_axes, tuple(eqn.outvars[0].aval.shape), 1 - k,
                             tuple(lc if k == 1 else rc), p.index,
                             groups=math.prod(shp[i] for i in kb), n_in=len(kc), nbatch=len(kb),
                             act_batch=tuple(lb if k == 1 else rb))
        return None
    if name == "conv_general_dilated":
        prm = eqn.params
        p = pin[1]
        if not isinstance(p, _Param) or pin[0] is not None or prm["batch_group_count"] != 1:
            return None
        dn = prm["dimension_numbers"]
        rs = dn.rhs_spec  # (out, in per group, spatial...)
        shp = np.shape(invals[1])
        kin = [*rs[2:], rs[1]]  # rows offset-major, as patches() forms them
        groups = int(prm["feature_group_count"])  # output features: groups x (out per group)
        return _Site("conv", p.leaf, tuple(p.perm[i] for i in kin + [rs[0]]),
                     math.prod(shp[i] for i in kin), int(shp[rs[0]]) // groups, (dn.out_spec[1],),
                     tuple(eqn.outvars[0].aval.shape), index=p.index, groups=groups,
                     n_in=len(kin))
    if name == "gather":
        p = pin[0]
        if not isinstance(p, _Param) or p.perm != (0, 1) or pin[1] is not None:
            return None
        d = eqn.params["dimension_numbers"]
        idx = np.shape(invals[1])
        table = _shape(p, leaf_shapes)
        if (len(table) == 2 and idx and idx[-1] == 1 and tuple(d.offset_dims) == (len(idx) - 1,)
                and tuple(d.collapsed_slice_dims) == (0,) and tuple(d.start_index_map) == (0,)
                and not d.operand_batching_dims
                and tuple(eqn.params["slice_sizes"]) == (1, table[1])):
            out = tuple(eqn.outvars[0].aval.shape)
            return _Site("embedding", p.leaf, (0, 1), int(table[0]), int(table[1]),
                         (len(out) - 1,), out, index=p.index, n_in=1)
    return None


def _rows(name, eqn, invals, site: _Site):
    """The layer's input rows ``(positions, d_in)`` (patches for a convolution), in the order
    of the output positions; for an embedding the token ids ``(positions,)`` that stand for
    the one-hot rows."""
    if name == "dot_general":
        act, ac, ab = invals[site.act_operand], list(site.act_axes), list(site.act_batch)
        free = [i for i in range(act.ndim) if i not in ac and i not in ab]
        a = jnp.transpose(act, ab + free + ac)
        if site.nbatch:  # (slices, positions, d_in): the batch axes flattened first
            return a.reshape(site.groups, -1, site.d_in)
        return a.reshape(-1, site.d_in)
    if name == "conv_general_dilated":
        prm = eqn.params
        dn = prm["dimension_numbers"]
        filt = tuple(np.shape(invals[1])[i] for i in dn.rhs_spec[2:])
        out_sp = tuple(eqn.outvars[0].aval.shape[i] for i in dn.out_spec[2:])
        pt = patches(invals[0], filt, out_sp, strides=prm["window_strides"], padding=prm["padding"],
                     lhs_dilation=prm["lhs_dilation"], rhs_dilation=prm["rhs_dilation"],
                     lhs_spec=dn.lhs_spec, groups=site.groups)  # (N, *out_sp, C * prod(filt))
        # positions in the order of the output array's axes (batch and spatial, as out_spec places them)
        order = np.argsort([dn.out_spec[0], *dn.out_spec[2:]], kind="stable")
        pt = jnp.transpose(pt, tuple(int(i) for i in order) + (pt.ndim - 1,))
        return pt.reshape(-1, site.groups * site.d_in)
    idx = invals[1][..., 0].reshape(-1)
    return idx  # the token ids: the one-hot rows, without materialising them


def patches(x, filt, out_shape, *, strides, padding, lhs_dilation, rhs_dilation, lhs_spec, groups=1):
    """The input patches of a convolution, ``(N, *out_shape, C * prod(filt))``, features
    offset-major within each feature group: ``(g, k, c)`` for group ``g``, filter offset ``k``
    (row-major over ``filt``) and input channel ``c`` of the group -- the order of a kernel
    viewed as ``(*filt, C_in / groups)`` rows. ``x`` is laid out as ``lhs_spec`` says
    (batch, feature, spatial axes); ``padding``: ``(lo, hi)`` per spatial axis (negative
    crops), ``lhs_dilation`` spreads the input (a transposed convolution), ``rhs_dilation``
    the filter.

    Formed channel-last by padding and one strided slice per filter offset, concatenated
    along the features, not by ``conv_general_dilated_patches`` (a convolution with a
    one-hot filter, ``prod(filt) x C`` times the work of a copy: 5.5x slower on the models
    benchmark's CNN on CPU)."""
    x = jnp.transpose(x, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))  # (N, *spatial, C)
    zero = jnp.zeros((), x.dtype)
    x = jax.lax.pad(x, zero, [(0, 0, 0)] + [(int(lo), int(hi), int(d) - 1) for (lo, hi), d
                                            in zip(padding, lhs_dilation)] + [(0, 0, 0)])
    parts = []
    for off in itertools.product(*(range(k) for k in filt)):
        start = [0] + [o * d for o, d in zip(off, rhs_dilation)] + [0]
        limit = ([x.shape[0]] + [st + (n - 1) * s + 1 for st, n, s in zip(start[1:], out_shape, strides)]
                 + [x.shape[-1]])
        parts.append(jax.lax.slice(x, start, limit, [1, *strides, 1]))
    pt = jnp.concatenate(parts, axis=-1)  # (N, *out_shape, K * C)
    if groups > 1:  # (K, G, C/G) -> (G, K, C/G): each group's rows contiguous
        k, c = len(parts), x.shape[-1]
        pt = pt.reshape(pt.shape[:-1] + (k, groups, c // groups))
        pt = jnp.swapaxes(pt, -3, -2).reshape(pt.shape[:-3] + (-1,))
    return pt


def out_rows(g, out_axes, d_out):
    """Layer-output gradients ``(K, *out_shape)`` -> ``(K, positions, d_out)``; ``out_axes``:
    the output-feature axes of ``out_shape``."""
    lead = 1
    axes = [lead + a for a in out_axes]
    g = jnp.moveaxis(g, axes, list(range(g.ndim - len(axes), g.ndim)))
    return g.reshape(g.shape[:lead] + (-1, d_out))


# ------------------------------------------------------------------ layers declared by hand
KINDS = ("dense", "batched", "conv", "embedding")
DECLARABLE = KINDS + ("diagonal",)


def _axes(v, what):
    if v is None:
        return None
    try:
        t = tuple(int(a) for a in (v if isinstance(v, (tuple, list)) else (v,)))
    except (TypeError, ValueError):
        raise InputError(f"kron.Layer: {what} must be an int or a tuple of ints, got {v!r}") from None
    return t


@dataclasses.dataclass(frozen=True)
class Layer:
    """A layer declared by hand (hashable: an option of :func:`influx.solvers.ekfac`).

    ``path``: the parameter leaf, as :func:`layers` reports it
    (``"['params']['Dense_0']['kernel']"``) or with slashes (``"params/Dense_0/kernel"``;
    the ``value`` attribute of an ``nnx`` state may be left out: ``"conv/kernel"``).

    ``kind``:

    * ``"dense"`` / ``"batched"`` / ``"conv"`` / ``"embedding"``: the leaf must be the kernel
      of such a layer in the traced ``apply_fn``, used by nothing else (one block, or one per
      scan slice, feature group or batch slice), else :class:`InputError` says what the
      trace found (a per-head or per-expert kernel, ``dot_general`` with batch dimensions,
      is ``"batched"``, not ``"dense"``). Inside a ``jax.custom_jvp`` / ``jax.custom_vjp``
      function that uses a declared leaf, the interpreter follows the function's primal
      program (which it otherwise treats as opaque): the pseudo-gradients of the factors
      are then the derivatives of that program, not of the custom rule (the same when the
      rule is the true derivative with other numerics, the usual case).
    * ``"diagonal"``: keep the leaf out of every block (it gets the exact Gauss-Newton
      diagonal): a layer K-FAC approximates badly, or a bias to leave out of its block.

    ``in_axes`` / ``out_axes`` (optional): the kernel's axes that meet the layer input
    (contracted; for a convolution the input-feature and spatial axes) and those that hold
    the output features, counted on the layer's weight (one slice of a stacked leaf);
    ``batch_axes`` (optional, ``"batched"`` only): the kernel's batch axes, one block per
    slice of them; and ``shape`` (optional), the leaf's shape: checked against the trace.
    """

    path: str
    kind: str = "dense"
    in_axes: tuple | None = None
    out_axes: tuple | None = None
    shape: tuple | None = None
    batch_axes: tuple | None = None

    def __post_init__(self):
        if not isinstance(self.path, str) or not self.path:
            raise InputError(f"kron.Layer: path must be a non-empty string, got {self.path!r}")
        if self.kind not in DECLARABLE:
            raise InputError(f"kron.Layer {self.path!r}: kind must be one of {DECLARABLE}, got "
                             f"{self.kind!r}")
        object.__setattr__(self, "in_axes", _axes(self.in_axes, "in_axes"))
        object.__setattr__(self, "out_axes", _axes(self.out_axes, "out_axes"))
        object.__setattr__(self, "shape", _axes(self.shape, "shape"))
        object.__setattr__(self, "batch_axes", _axes(self.batch_axes, "batch_axes"))
        if self.kind == "diagonal" and (self.in_axes or self.out_axes or self.batch_axes):
            raise InputError(f"kron.Layer {self.path!r}: a 'diagonal' leaf has no in_axes/out_axes/"
                             "batch_axes")
        if self.batch_axes and self.kind != "batched":
            raise InputError(f"kron.Layer {self.path!r}: batch_axes={self.batch_axes} makes it a "
                             f"'batched' layer (one block per slice), not {self.kind!r}")


def declarations(declare) -> tuple[Layer, ...]:
    """Normalises ``declare`` to a tuple of :class:`Layer`: ``None``, a :class:`Layer`, a
    mapping ``{path: kind}``, or a sequence of :class:`Layer` and ``(path, kind)`` pairs."""
    if declare is None:
        return ()
    if isinstance(declare, Layer):
        declare = (declare,)
    elif isinstance(declare, dict):
        declare = tuple(declare.items())
    elif isinstance(declare, str) or not isinstance(declare, (tuple, list)):
        raise InputError("declare: expected kron.Layer values, a {path: kind} mapping or "
                         f"(path, kind) pairs, got {declare!r}")
    out = []
    for d in declare:
        if isinstance(d, Layer):
            out.append(d)
        elif isinstance(d, (tuple, list)) and len(d) == 2 and isinstance(d[1], str):
            out.append(Layer(d[0], d[1]))
        else:
            raise InputError(f"declare: each entry must be a kron.Layer or a (path, kind) pair, "
                             f"got {d!r}")
    paths = [d.path for d in out]
    dup = sorted({p for p in paths if paths.count(p) > 1})
    if dup:
        raise InputError(f"declare: {dup} declared more than once")
    return tuple(out)


def _names(keypath) -> list[str]:
    out = []
    for k in keypath:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return out


def _resolve(declare, params) -> dict:
    """``{leaf index: Layer}``, every declared path matched to exactly one leaf."""
    declare = declarations(declare)
    if not declare:
        return {}
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    keys = [jax.tree_util.keystr(k) for k, _ in flat]
    forms = []
    for k, _ in flat:
        n = _names(k)
        f = {jax.tree_util.keystr(k), "/".join(n)}
        if len(n) > 1 and n[-1] == "value":
            f.add("/".join(n[:-1]))
        forms.append(f)
    out = {}
    for d in declare:
        hits = [i for i, f in enumerate(forms) if d.path.strip("/") in f]
        if len(hits) != 1:
            shown = ", ".join(keys[:12]) + (" ..." if len(keys) > 12 else "")
            raise InputError(f"declared layer {d.path!r}: no parameter leaf has this path "
                             f"(the leaves: {shown})" if not hits else
                             f"declared layer {d.path!r} matches {len(hits)} leaves: "
                             f"{[keys[i] for i in hits]}")
        i = hits[0]
        leaf = flat[i][1]
        if d.shape is not None and tuple(np.shape(leaf)) != d.shape:
            raise InputError(f"declared layer {d.path!r}: declared shape {d.shape}, but the leaf "
                             f"{keys[i]} has shape {tuple(np.shape(leaf))}")
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise InputError(f"declared layer {d.path!r}: the leaf {keys[i]} is not floating "
                             f"point ({jnp.result_type(leaf)}): not a parameter of the solve")
        if i in out:
            raise InputError(f"declared layer {d.path!r}: the leaf {keys[i]} is already declared "
                             f"as {out[i].path!r}")
        out[i] = d
    return out


def _check_declared(decl, found, tape, leaf_shapes, paths, floating):
    """Every declared layer is what the trace found, else an :class:`InputError` naming it
    and saying what the trace saw."""
    for leaf, d in decl.items():
        if d.kind == "diagonal":
            continue
        name = f"declared {d.kind} layer {d.path!r} ({paths[leaf]}, shape {tuple(leaf_shapes[leaf])})"
        mine = [b for b in found if b.kernel == leaf]
        if not mine:
            owner = [b for b in found if b.bias == leaf]
            if owner:
                raise InputError(f"{name}: it is the bias of a {owner[0].kind} layer "
                                 f"({owner[0].path}), not a kernel (declare the kernel; its bias is "
                                 "found with it)")
            ops = [s for s in tape.sites.values() if s.leaf == leaf and s.group == 0]
            uses = sum(n for (lf, _), n in tape.uses.items() if lf == leaf)
            if not ops:
                raise InputError(
                    f"{name}: the traced apply_fn applies no dense, conv or embedding operation "
                    f"(batched or not) to this leaf as a weight (it has {uses} other use(s): e.g. "
                    "inside lax.cond, while_loop, or after a reshape or an elementwise op); declare "
                    "it 'diagonal' or apply it with a plain dot/einsum/conv")
            if len(ops) > uses or len({s.index for s in ops}) < len(ops):
                why = f"it is the weight of {len(ops)} operations (shared or tied weights)"
            elif uses > len(ops):
                why = (f"besides {len(ops)} layer operation(s) it has {uses - len(ops)} other "
                       "use(s) in apply_fn (e.g. a regulariser, a tied weight)")
            else:
                why = "only some slices of the stacked leaf are layers"
            raise InputError(f"{name}: {why}: its Kronecker block would be wrong; declare it "
                             "'diagonal' or restructure apply_fn")
        kinds = {b.kind for b in mine}
        if kinds != {d.kind}:
            raise InputError(f"{name}: the trace uses it as a {'/'.join(sorted(kinds))} layer")
        site = tape.sites[mine[0].site]
        nb = site.n_in + site.nbatch
        t_in, t_b, t_out = set(site.perm[:site.n_in]), set(site.perm[site.n_in:nb]), set(site.perm[nb:])
        for what, want, got in (("in_axes", d.in_axes, t_in), ("out_axes", d.out_axes, t_out),
                                ("batch_axes", d.batch_axes, t_b)):
            if want is not None and set(want) != got:
                raise InputError(f"{name}: declared {what}={want}, but the trace contracts axes "
                                 f"{tuple(sorted(t_in))} with the layer input, puts axes "
                                 f"{tuple(sorted(t_out))} on the output features and has batch "
                                 f"axes {tuple(sorted(t_b))} (one layer per slice)")


# ------------------------------------------------------------------ tracing and discovery
class Traced(NamedTuple):
    """``apply_fn`` traced on one example: the program, its input structure and leaf shapes."""
    closed: Any
    treedef: Any
    x_def: Any
    leaf_shapes: tuple


def trace(apply_fn, params, x_example) -> Traced:
    """Traces ``apply_fn(params, x_example)`` (abstractly: works on tracers too)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    x_leaves, x_def = jax.tree_util.tree_flatten(x_example)
    n_p = len(leaves)

    def flat(*ls):
        return apply_fn(jax.tree_util.tree_unflatten(treedef, ls[:n_p]),
                        jax.tree_util.tree_unflatten(x_def, ls[n_p:]))

    spec = [jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)) for a in leaves + x_leaves]
    closed = jax.make_jaxpr(flat)(*spec)
    if len(closed.out_avals) != 1:
        raise InputError(f"ekfac/kfac: apply_fn must return one array of outputs, got "
                         f"{len(closed.out_avals)} arrays")
    return Traced(closed, treedef, x_def, tuple(np.shape(a) for a in leaves))


def run(traced: Traced, leaves, x, tape: _Tape):
    """Evaluates the traced model on parameter ``leaves`` and inputs ``x`` with ``tape``."""
    xl = jax.tree_util.tree_leaves(x)
    provs = [_Param(i, tuple(range(len(s))), ()) for i, s in enumerate(traced.leaf_shapes)]
    c = traced.closed
    outs, _, _ = _interp(c.jaxpr, c.consts, list(leaves) + xl, provs + [None] * len(xl), tape,
                         traced.leaf_shapes)
    return outs[0]


def _complete(keys, leaf_shapes, uses, per_key: int) -> set:
    """The leaves whose every use is accounted for by ``keys`` (``(leaf, index)``, each
    used ``per_key`` times): the whole leaf (``index ()``), or every slice ``leaf[index]``
    of the stacked axes exactly once (nested scans: every ``(i, j, ...)``), and no other
    use of the leaf."""
    by_leaf = {}
    for leaf, index in keys:
        by_leaf.setdefault(leaf, []).append(index)
    ok = set()
    for leaf, idx in by_leaf.items():
        depth = {len(i) for i in idx}
        if len(depth) != 1 or len(set(idx)) != len(idx):
            continue
        d = depth.pop()
        want = set(itertools.product(*(range(n) for n in leaf_shapes[leaf][:d])))
        total = sum(n for (lf, _), n in uses.items() if lf == leaf)
        if set(idx) == want and total == per_key * len(idx):
            ok.add(leaf)
    return ok


def _discover(apply_fn, params, x_example, declare=()) -> tuple[Traced, tuple]:
    decl = _resolve(declare, params)
    opened = frozenset(i for i, d in decl.items() if d.kind != "diagonal")
    traced = trace(apply_fn, params, x_example)
    leaves = jax.tree_util.tree_leaves(params)
    tape = _Tape(opened=opened)
    jax.eval_shape(lambda ls, x: run(traced, ls, x, tape), leaves, x_example)
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    floating = [jnp.issubdtype(jnp.result_type(l), jnp.floating) for l in leaves]
    ops = {sid: s for sid, s in tape.sites.items() if s.group == 0}  # one per operation
    kernels = [(s.leaf, s.index) for s in ops.values()]
    kernel_leaves = {k[0] for k in kernels}
    good_ops = {sid: s for sid, s in ops.items() if tape.uses.get((s.leaf, s.index), 0) == 1
                and kernels.count((s.leaf, s.index)) == 1 and floating[s.leaf]}
    good = _complete([(s.leaf, s.index) for s in good_ops.values()], traced.leaf_shapes,
                     tape.uses, 1)
    good_ops = {sid: s for sid, s in good_ops.items() if s.leaf in good}
    all_bias = [x for v in tape.bias.values() for x in v]
    bias = {}
    for sid, s in good_ops.items():
        b = tape.bias.get(sid, [])
        if (len(b) == 1 and b[0][1] == s.index and tape.uses.get(b[0], 0) == 0 and floating[b[0][0]]
                and b[0][0] not in kernel_leaves and all_bias.count(b[0]) == 1):
            bias[sid] = b[0]
    good_b = _complete(list(bias.values()), traced.leaf_shapes, tape.uses, 0)
    found = []
    for sid, s in sorted(good_ops.items()):
        b = bias[sid][0] if sid in bias and bias[sid][0] in good_b else None
        if b is not None and b in decl and decl[b].kind == "diagonal":
            b = None
        if s.leaf in decl and decl[s.leaf].kind == "diagonal":
            continue
        path = paths[s.leaf] + "".join(f"[{i}]" for i in s.index)
        for g in range(s.groups):
            found.append(Block(s.kind, sid + g, s.leaf, b, s.perm, s.d_in, s.d_out,
                               path + (f"[slice {g}]" if s.nbatch else f"[group {g}]" if s.groups > 1
                                       else ""),
                               _public_index(s.index), g, s.groups, opened))
    _check_declared(decl, found, tape, traced.leaf_shapes, paths, floating)
    return traced, tuple(found)


def blocks(apply_fn, params, x_example, *, declare=()) -> tuple[Block, ...]:
    """The Kronecker blocks K-FAC/EK-FAC will use for ``apply_fn(params, x_example)``
    (``x_example``: the inputs of one example as a batch of one, e.g. ``x[:1]``;
    ``declare``: layers declared by hand, :func:`declarations`)."""
    return _discover(apply_fn, params, x_example, declare)[1]


def _report(params, found) -> list[LeafReport]:
    role = {}
    for b in found:
        role[b.kernel] = (b.kind, "kernel")
        if b.bias is not None:
            role[b.bias] = (b.kind, "bias")
    out = []
    for i, (k, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0]):
        fl = jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
        blk, r = role.get(i, ("diagonal" if fl else "none", ""))
        out.append(LeafReport(jax.tree_util.keystr(k), tuple(np.shape(leaf)), int(np.size(leaf)),
                              blk, r))
    return out


def layers(apply_fn, params, x_example, *, declare=()) -> list[LeafReport]:
    """Every parameter leaf of ``params`` with the block it gets (:class:`LeafReport`):
    ``"dense"`` / ``"batched"`` / ``"conv"`` / ``"embedding"`` (Kronecker-factored: a batched
    kernel one block per batch slice, an embedding's input factor its exact diagonal),
    ``"diagonal"`` (the exact Gauss-Newton diagonal) or ``"none"`` (not floating point).
    ``x_example``: one example as a batch of one."""
    return _report(params, blocks(apply_fn, params, x_example, declare=declare))


def _coverage(params, found) -> float:
    rep = _report(params, found)
    total = sum(r.size for r in rep if r.block != "none")
    return sum(r.size for r in rep if r.block not in ("none", "diagonal")) / max(total, 1)


def coverage(apply_fn, params, x_example, *, declare=()) -> float:
    """Share of the (floating-point) parameters that are in Kronecker blocks, in ``[0, 1]``;
    K-FAC/EK-FAC warn in ``prepare`` when it is below ``COVERAGE_WARNING`` (0.9)."""
    return _coverage(params, blocks(apply_fn, params, x_example, declare=declare))
