"""Kronecker blocks for batched kernels: ``dot_general`` with batch dimensions shared by the
layer input and the kernel (per-head kernels ``einsum('bthd,hde->bthe', x, W)``, mixture of
experts ``einsum('becd,edf->becf', x, W)``, linen ``DenseGeneral(batch_dims=...)``,
``nnx.Einsum``), one block per batch slice, against dense float64 Gauss-Newton references.

Where K-FAC is exact (a linear model with squared error: every slice's outputs are its own,
so the Gauss-Newton matrix is block-diagonal over the slices and each block is ``A_h (x) I``)
the K-FAC blocks must be the exact blocks and the solve the exact solve; on nonlinear models
the EK-FAC eigenvalues must equal the GNH diagonal in every slice's Kronecker eigenbasis, and
the factored inverse must have no entry between two slices.
"""

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import influx
from influx import curvature, losses, solvers
from influx.solvers import kron
from tests.test_kron import _basis, _block_index

E = importlib.import_module("influx.solvers.ekfac")


def _gnh(obj, params, data):
    """The Gauss-Newton matrix ``J^T H_z J`` of the mean loss from explicit Jacobians: the
    reference, independent of the Kronecker code (and one compiled program, ``jacfwd``)."""
    flat, unravel = ravel_pytree(params)

    @jax.jit
    def gnh(w, x, y):
        z = obj.apply_fn(unravel(w), x)
        jac = jax.jacfwd(lambda v: obj.apply_fn(unravel(v), x).reshape(-1))(w)
        hz = jax.hessian(lambda zz: jnp.mean(obj.loss_fn(zz.reshape(z.shape), y)))(z.reshape(-1))
        return jac.T @ hz @ jac

    return np.asarray(gnh(flat, *data))


def _f64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


# ------------------------------------------------------------------ linear models: K-FAC exact
def _linear(name, r):
    """``(apply, params, x, slices)``: one batched linear layer (``slices`` batch slices)."""
    def nrm(*s):
        return jnp.asarray(r.normal(size=s))

    if name == "per_head":  # bias (heads, e) added after einsum's transpose
        def apply(p, x):
            return jnp.einsum("bthd,hde->bthe", x, p["w"]) + p["b"]
        return apply, {"w": nrm(3, 2, 2), "b": nrm(3, 2)}, nrm(4, 2, 3, 2), 3
    if name == "moe":  # experts x capacity tokens, bias broadcast over the capacity axis
        def apply(p, x):
            return jnp.einsum("becd,edf->becf", x, p["w"]) + p["b"][:, None, :]
        return apply, {"w": nrm(2, 3, 2), "b": nrm(2, 2)}, nrm(4, 2, 3, 3), 2
    if name == "two_batch_axes":  # kernel batch axes (g, h) in the other order than the input's
        def apply(p, x):
            return jnp.einsum("bhgd,ghde->bhge", x, p["w"])
        return apply, {"w": nrm(2, 3, 2, 2)}, nrm(4, 3, 2, 2), 6
    if name == "kernel_first":  # W x per head, two contracted axes in swapped order
        def apply(p, x):
            return jnp.moveaxis(jax.lax.dot_general(p["w"], x, (((2, 3), (3, 2)), ((0,), (1,)))), 2, 0)
        return apply, {"w": nrm(2, 3, 2, 2)}, nrm(4, 2, 2, 2), 2
    if name == "scan_per_head":  # lax.scan over stacked per-head kernels: a block per (layer, head)
        def apply(p, x):
            def step(c, layer):
                return c, jnp.einsum("bthd,hde->bthe", x, layer["w"]) + layer["b"]
            return jnp.moveaxis(jax.lax.scan(step, None, p)[1], 0, 1)
        return apply, {"w": nrm(2, 2, 2, 2), "b": nrm(2, 2, 2)}, nrm(4, 2, 2, 2), 2
    if name == "linen_batch_dims":  # nn.DenseGeneral(batch_dims=(0,)), vmapped over examples
        m = nn.DenseGeneral(features=2, batch_dims=(0,), axis=-1, param_dtype=jnp.float64)
        shapes = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.ones((3, 2, 3)))
        params = jax.tree_util.tree_map(lambda a: nrm(*a.shape), shapes)  # no compiled init
        return (lambda p, x: jax.vmap(lambda xi: m.apply(p, xi))(x)), params, nrm(4, 3, 2, 3), 3
    if name == "nnx_einsum":
        e = nnx.eval_shape(lambda: nnx.Einsum("bthd,hde->bthe", (2, 3, 2), (2, 2),
                                              param_dtype=jnp.float64, rngs=nnx.Rngs(0)))
        graph, state = nnx.split(e)
        state = jax.tree_util.tree_map(lambda a: nrm(*a.shape), state)
        return (lambda p, x: nnx.merge(graph, p)(x)), state, nrm(4, 2, 2, 3), 2
    raise KeyError(name)


LINEAR = ("per_head", "moe", "two_batch_axes", "kernel_first", "scan_per_head", "linen_batch_dims",
          "nnx_einsum")


def test_kfac_blocks_are_the_exact_gauss_newton_blocks_per_slice_of_linear_batched_layers():
    # all six layers side by side, their outputs concatenated, squared error: every slice's
    # outputs are its own, so the Gauss-Newton matrix is block-diagonal over layers and slices
    # and each block is A_h (x) I: K-FAC exact, one compiled set of programs for all six
    r = np.random.default_rng(0)
    layers = {n: _linear(n, r) for n in LINEAR}
    params = _f64({n: v[1] for n, v in layers.items()})
    x = {n: v[2] for n, v in layers.items()}

    def flat(p, xx):
        return jnp.concatenate([layers[n][0](p[n], xx[n]).reshape(xx[n].shape[0], -1) for n in LINEAR], 1)

    x0 = jax.tree_util.tree_map(lambda a: a[:1], x)
    blks = kron.blocks(flat, params, x0)
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    layer_of = [jax.tree_util.keystr(k[:1])[2:-2] for k, _ in paths]
    bias = ("per_head", "moe", "scan_per_head", "linen_batch_dims", "nnx_einsum")
    got = sorted((layer_of[b.kernel], b.kind, b.index, b.group, b.groups, b.bias is not None)
                 for b in blks)
    assert got == sorted((n, "batched", i, h, layers[n][3], n in bias) for n in LINEAR
                         for i in ((0, 1) if n == "scan_per_head" else (None,))
                         for h in range(layers[n][3]))
    assert kron.coverage(flat, params, x0) == 1.0
    y = jnp.asarray(r.normal(size=jax.eval_shape(flat, params, x).shape))
    obj = influx.Objective(flat, losses.squared_error, l2=1e-3)
    op = curvature.operator(obj, params, (x, y), kind="gnh", damping=1e-2)
    g = _gnh(obj, params, (x, y))
    st = solvers.kfac().prepare(op)
    covered = np.zeros(op.dim, int)
    for k, b in enumerate(st.blocks):
        q = _basis(st, k)
        idx = _block_index(params, b)
        covered[idx] += 1
        np.testing.assert_allclose(q @ np.diag(np.asarray(st.lam[k]).ravel()) @ q.T,
                                   g[np.ix_(idx, idx)], atol=1e-12, rtol=1e-10, err_msg=b.path)
    assert np.all(covered == 1)  # the slices partition the parameters
    # the exact matrix has nothing between slices either: the factored inverse is the inverse
    np.testing.assert_allclose(_inverse_matrix(st, params),
                               np.linalg.inv(g + float(op.shift) * np.eye(op.dim)), rtol=1e-9, atol=1e-12)


def _inverse_matrix(st, params):
    """The factored inverse of ``st`` as a dense ``(P, P)`` matrix (ravel order)."""
    flat, unravel = ravel_pytree(params)
    return np.asarray(jax.jit(jax.vmap(lambda e: ravel_pytree(E._inverse(st, unravel(e)))[0]))(
        jnp.eye(flat.size)))


# ------------------------------------------------------------------ nonlinear models: EK-FAC
def _per_head(p, x):
    """Per-head tanh layer (batched, with bias), then a dense readout over heads and features."""
    h = jnp.tanh(jnp.einsum("bthd,hde->bthe", x, p["w"]) + p["b"])
    return jnp.einsum("bthe,hek->bk", h, p["out"]) / x.shape[1]


def _moe(p, x):
    """Two per-expert layers (both batched over the experts) on dispatched tokens ``(B, E, C, d)``."""
    h = jnp.tanh(jnp.einsum("becd,edf->becf", x, p["w1"]) + p["b1"][:, None, :])
    return jnp.einsum("becf,efk->bek", h, p["w2"]).sum(1)


def _nonlinear_apply(p, x):
    """The logits of a per-head model and of a mixture of experts, summed."""
    return _per_head(p["heads"], x["heads"]) + _moe(p["moe"], x["moe"])


def _nonlinear():
    r = np.random.default_rng(2)
    params = {"heads": {"w": r.normal(size=(2, 3, 3)), "b": 0.1 * r.normal(size=(2, 3)),
                        "out": r.normal(size=(2, 3, 3))},
              "moe": {"w1": r.normal(size=(2, 3, 4)), "b1": 0.1 * r.normal(size=(2, 4)),
                      "w2": 0.5 * r.normal(size=(2, 4, 3))}}
    x = {"heads": r.normal(size=(5, 2, 2, 3)), "moe": r.normal(size=(5, 2, 2, 3))}
    params, x = (jax.tree_util.tree_map(jnp.asarray, t) for t in (params, x))
    obj = influx.Objective(_nonlinear_apply, losses.softmax_cross_entropy, l2=1e-3)
    return obj, params, (x, jnp.array([0, 2, 1, 1, 0]))


def test_ekfac_eigenvalues_per_slice_and_no_curvature_between_slices():
    obj, params, data = _nonlinear()
    x0 = jax.tree_util.tree_map(lambda a: a[:1], data[0])
    assert kron.coverage(obj.apply_fn, params, x0) == 1.0
    op = curvature.operator(obj, params, data, kind="gnh", damping=1e-2, chunk_size=5)
    st = solvers.ekfac().prepare(op)
    assert [(b.path, b.kind, b.index, b.group, b.bias is not None) for b in st.blocks] == [
        ("['heads']['w'][slice 0]", "batched", None, 0, True),
        ("['heads']['w'][slice 1]", "batched", None, 1, True),
        ("['heads']['out']", "dense", None, 0, False),
        ("['moe']['w1'][slice 0]", "batched", None, 0, True),
        ("['moe']['w1'][slice 1]", "batched", None, 1, True),
        ("['moe']['w2'][slice 0]", "batched", None, 0, False),
        ("['moe']['w2'][slice 1]", "batched", None, 1, False)]
    g = _gnh(obj, params, data)
    idxs = [_block_index(params, b) for b in st.blocks]
    covered = np.zeros(op.dim, int)
    for k, idx in enumerate(idxs):
        covered[idx] += 1
        q = _basis(st, k)
        lam = np.diag(q.T @ g[np.ix_(idx, idx)] @ q).reshape(np.shape(st.lam[k]))
        np.testing.assert_allclose(np.asarray(st.lam[k]), lam, rtol=1e-9, atol=1e-13,
                                   err_msg=st.blocks[k].path)
    assert np.all(covered == 1)
    # the factored inverse as a dense matrix: on every block Q diag(1 / (Lambda + s)) Q^T, and
    # exactly zero between two blocks (two heads / experts / layers)
    inv = _inverse_matrix(st, params)
    s = float(op.shift)
    for k, idx in enumerate(idxs):
        q = _basis(st, k)
        np.testing.assert_allclose(inv[np.ix_(idx, idx)],
                                   q @ np.diag(1 / (np.asarray(st.lam[k]).ravel() + s)) @ q.T,
                                   rtol=1e-9, atol=1e-12, err_msg=st.blocks[k].path)
        rest = np.setdiff1d(np.arange(op.dim), idx)
        assert np.all(inv[np.ix_(idx, rest)] == 0) and np.all(inv[np.ix_(rest, idx)] == 0)


# ------------------------------------------------------------------ an attention model
def _attention_apply(p, t, heads=2):
    """Embedding, self-attention with per-head q/k/v/output kernels applied to per-head slices
    of the features (``einsum('bthd,hde->bthe')``), LayerNorm, per-token logits."""
    x = p["emb"][t]
    b, n, d = x.shape
    xh = x.reshape(b, n, heads, d // heads)
    q, k, v = (jnp.einsum("bthd,hde->bthe", xh, p[w]) + p["b" + w] for w in ("q", "k", "v"))
    a = jax.nn.softmax(jnp.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(q.shape[-1]), axis=-1)
    o = jnp.einsum("bthe,hed->bthd", jnp.einsum("bhqk,bkhe->bqhe", a, v), p["o"]) + p["bo"]
    h = x + o.reshape(b, n, d)
    h = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-5) * p["ln"]
    return h @ p["head"] + p["bhead"]


def attention_model(vocab=6, d=8, heads=2, seed=0):
    """``(apply, params)`` of :func:`_attention_apply` (float64 when x64 is on)."""
    r = np.random.default_rng(seed)
    dh = d // heads
    params = {"emb": r.normal(size=(vocab, d)), "ln": np.ones(d), "head": r.normal(size=(d, vocab)),
              "bhead": np.zeros(vocab), "o": r.normal(size=(heads, dh, dh)) / np.sqrt(dh),
              "bo": np.zeros((heads, dh))}
    for w in ("q", "k", "v"):
        params[w] = r.normal(size=(heads, dh, dh)) / np.sqrt(dh)
        params["b" + w] = 0.1 * r.normal(size=(heads, dh))
    return (lambda p, t: _attention_apply(p, t, heads)), jax.tree_util.tree_map(jnp.asarray, params)


def test_per_head_attention_model_coverage_and_layer_report():
    apply, params = attention_model()
    t0 = jnp.zeros((1, 5), jnp.int32)
    rep = {r.path: (r.block, r.role) for r in kron.layers(apply, params, t0)}
    for w in ("q", "k", "v", "o"):
        assert rep[f"['{w}']"] == ("batched", "kernel")
        assert rep[f"['b{w}']"] == ("batched", "bias")
    assert rep["['emb']"] == ("embedding", "kernel") and rep["['head']"] == ("dense", "kernel")
    assert rep["['ln']"] == ("diagonal", "")
    blks = kron.blocks(apply, params, t0)
    assert [b.path for b in blks if b.path.startswith("['o']")] == ["['o'][slice 0]", "['o'][slice 1]"]
    sizes = {r.path: r.size for r in kron.layers(apply, params, t0)}
    cov = kron.coverage(apply, params, t0)
    assert cov == pytest.approx(1 - sizes["['ln']"] / sum(sizes.values()))
    assert cov >= 0.9


# ------------------------------------------------------------------ fallbacks and declarations
def _twice(p, x):  # the same per-head kernel applied twice: no block
    h = jnp.tanh(jnp.einsum("bthd,hde->bthe", x, p["w"]))
    return jnp.einsum("bthd,hde->bthe", h, p["w"]).sum((1, 2))


def _elementwise_too(p, x):  # the kernel also scales something elementwise: no block
    return jnp.einsum("bthd,hde->bthe", x, p["w"]).sum((1, 2)) + jnp.sum(p["w"] ** 2)


def _one_per_head(p, x):
    return jnp.einsum("bthd,hde->bthe", x, p["w"]).sum((1, 2))


def test_batched_kernels_used_elsewhere_fall_back_and_declarations_are_checked():
    params, x0 = {"w": jnp.ones((2, 3, 3))}, jnp.ones((1, 4, 2, 3))
    for apply in (_twice, _elementwise_too):
        assert kron.blocks(apply, params, x0) == ()
        assert kron.coverage(apply, params, x0) == 0.0
        with pytest.raises(influx.errors.InputError, match="'w'.*Kronecker block would be wrong"):
            kron.blocks(apply, params, x0, declare={"w": "batched"})
    # a per-head kernel declared as what the trace finds passes, with its axes
    ok = kron.blocks(_one_per_head, params, x0,
                     declare=kron.Layer("w", "batched", in_axes=1, out_axes=2, batch_axes=0))
    assert [(b.kind, b.group) for b in ok] == [("batched", 0), ("batched", 1)]
    with pytest.raises(influx.errors.InputError, match="'w'.*the trace uses it as a batched layer"):
        kron.blocks(_one_per_head, params, x0, declare={"w": "dense"})
    with pytest.raises(influx.errors.InputError, match=r"declared batch_axes=\(1,\), but .* batch "
                                                       r"axes \(0,\)"):
        kron.blocks(_one_per_head, params, x0, declare=kron.Layer("w", "batched", batch_axes=1))
    with pytest.raises(influx.errors.InputError, match="batch_axes.*'batched' layer"):
        kron.Layer("w", "dense", batch_axes=0)


def test_flax_einsum_modules_and_nnx_scan_over_them_get_a_block_per_slice():
    # linen nn.Einsum with a per-head equation and its bias; nnx.scan over nnx.vmap-stacked
    # nnx.Einsum layers: one block per (layer, head), the bias with it (traced, nothing runs)
    class Linen(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Einsum((3, 4, 2), "bthd,hde->bthe", use_bias=True)(x)

    m, x = Linen(), jnp.ones((1, 5, 3, 4))
    params = jax.eval_shape(m.init, jax.random.PRNGKey(0), x)
    rep = {r.path: (r.block, r.role) for r in kron.layers(m.apply, params, x)}
    assert rep == {"['params']['Einsum_0']['bias']": ("batched", "bias"),
                   "['params']['Einsum_0']['kernel']": ("batched", "kernel")}

    class Layer(nnx.Module):
        def __init__(self, rngs):
            self.e = nnx.Einsum("bthd,hde->bthe", (2, 3, 3), (2, 3), rngs=rngs)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.split_rngs(splits=3)(nnx.vmap(Layer, in_axes=0, out_axes=0))(rngs)

        def __call__(self, x):
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def step(h, layer):
                return jnp.tanh(layer.e(h))
            return step(x, self.layers)

    net = nnx.eval_shape(lambda: Net(nnx.Rngs(0)))
    graph, state = nnx.split(net)
    blks = kron.blocks(lambda p, x: nnx.merge(graph, p)(x), state, jnp.ones((1, 4, 2, 3)))
    assert [(b.kind, b.index, b.group, b.bias is not None) for b in blks] == [
        ("batched", i, h, True) for i in range(3) for h in range(2)]
