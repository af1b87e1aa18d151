"""Kronecker blocks for real layers (convolutions, DenseGeneral, sequences, embeddings,
attention) against dense float64 Gauss-Newton references (``curvature.dense``).

Where K-FAC is exact -- a linear model with squared error, any number of positions (the
"expand" setting: ``A (x) S = 1/N sum_{n,t} a a^T (x) I``), or one example at one position --
the K-FAC block must equal the Gauss-Newton block and the solve the exact solve; on
nonlinear models the EK-FAC eigenvalues must equal the GNH diagonal in the Kronecker
eigenbasis.
"""

import importlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import influx
from influx import curvature, losses, solvers
from influx.solvers import kron

E = importlib.import_module("influx.solvers.ekfac")


def _gnh(op):
    return np.asarray(curvature.dense(op)) - float(op.shift) * np.eye(op.dim)


def _block_index(params, b):
    """Flat (ravel order) indices of a block's ``(rows, d_out)`` matrix (a slice of a stacked
    leaf for a layer in (nested) scans, the columns of one feature group of a grouped conv)."""
    leaves = jax.tree_util.tree_leaves(params)
    offs = np.cumsum([0] + [np.size(l) for l in leaves])
    ix = () if b.index is None else (b.index,) if isinstance(b.index, int) else tuple(b.index)
    cols = slice(b.group * b.d_out, (b.group + 1) * b.d_out)

    def leaf_index(i):
        return np.arange(offs[i], offs[i + 1]).reshape(np.shape(leaves[i]))[ix]

    idx = leaf_index(b.kernel).transpose(b.perm).reshape(b.d_in, -1)[:, cols]
    if b.bias is not None:
        idx = np.concatenate([idx, leaf_index(b.bias).reshape(1, -1)[:, cols]], 0)
    return idx.reshape(-1)


def _basis(st, k):
    qa = np.eye(st.blocks[k].rows) if st.qa[k] is None else np.asarray(st.qa[k])
    return np.kron(qa, np.asarray(st.qs[k]))


def _nnx(module):
    graph, state = nnx.split(module)
    return (lambda p, x: nnx.merge(graph, p)(x)), state


# ------------------------------------------------------------------ linear models: K-FAC exact
def _linear_problem(name):
    """A linear model with squared error on all outputs (flattened) and its data."""
    kx, ky, kp = jax.random.split(jax.random.PRNGKey(0), 3)
    rngs = nnx.Rngs(int(kp[1]))
    if name == "conv2d":  # strides, SAME padding, bias
        m, x = nnx.Conv(2, 3, (3, 2), strides=(2, 1), padding="SAME", rngs=rngs), (4, 5, 5, 2)
    elif name == "conv1d":  # dilation, VALID
        m = nnx.Conv(2, 2, (3,), kernel_dilation=(2,), padding="VALID", rngs=rngs)
        x = (4, 9, 2)
    elif name == "conv2d_grouped":  # two feature groups, strides, SAME padding, bias
        m = nnx.Conv(4, 6, (3, 2), strides=(2, 1), padding="SAME", feature_group_count=2, rngs=rngs)
        x = (3, 4, 4, 4)
    elif name == "conv1d_depthwise":  # depthwise, channel multiplier 2
        m, x = nnx.Conv(3, 6, (3,), feature_group_count=3, padding="VALID", rngs=rngs), (3, 6, 3)
    elif name == "conv3d":
        m, x = nnx.Conv(1, 2, (2, 2, 2), use_bias=False, rngs=rngs), (3, 3, 3, 3, 1)
    elif name == "dense_general_out2":  # (d_in,) -> (heads, head_dim), bias (heads, head_dim)
        m, x = nnx.LinearGeneral(3, (2, 2), rngs=rngs), (5, 3)
    elif name == "dense_general_in2":  # (heads, head_dim) -> d, attention's output projection
        m, x = nnx.LinearGeneral((2, 2), 3, axis=(-2, -1), rngs=rngs), (5, 2, 2)
    elif name == "sequence_dense":  # one dense layer at every position of a sequence
        m, x = nnx.Linear(3, 2, rngs=rngs), (3, 4, 3)
    elif name == "embedding":  # a table lookup at every position: A = diag(token counts)
        m, x = nnx.Embed(6, 3, dtype=jnp.float64, param_dtype=jnp.float64, rngs=rngs), (4, 5)
    else:
        raise KeyError(name)
    apply, params = _nnx(m)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
    xs = (jax.random.randint(kx, x, 0, 6) if name == "embedding"
          else jax.random.normal(kx, x, jnp.float64))

    def flat_apply(p, xx):
        z = apply(p, xx)
        return z.reshape(z.shape[0], -1)

    y = jax.random.normal(ky, flat_apply(params, xs).shape, jnp.float64)
    return influx.Objective(flat_apply, losses.squared_error, l2=1e-3), params, (xs, y)


LINEAR = ["conv2d", "conv1d", "conv3d", "dense_general_out2", "dense_general_in2", "sequence_dense",
          "embedding", "conv1d_depthwise", pytest.param("conv2d_grouped", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", LINEAR)
def test_kfac_block_is_the_exact_gauss_newton_block_for_linear_models(name):
    obj, params, data = _linear_problem(name)
    blks = kron.blocks(obj.apply_fn, params, data[0][:1])
    kind = "conv" if name.startswith("conv") else "embedding" if name == "embedding" else "dense"
    groups = {"conv2d_grouped": 2, "conv1d_depthwise": 3}.get(name, 1)
    # one block per feature group (block-diagonal: the groups share no output)
    assert [(b.kind, b.group, b.groups) for b in blks] == [(kind, g, groups) for g in range(groups)]
    # every parameter is in a block: K-FAC is the whole matrix
    assert kron.coverage(obj.apply_fn, params, data[0][:1]) == 1.0
    op = curvature.operator(obj, params, data, kind="gnh", damping=1e-2, chunk_size=3)
    g = _gnh(op)
    st = solvers.kfac().prepare(op)
    for k, b in enumerate(blks):
        q = _basis(st, k)
        approx = q @ np.diag(np.asarray(st.lam[k]).ravel()) @ q.T
        idx = _block_index(params, b)
        np.testing.assert_allclose(approx, g[np.ix_(idx, idx)], atol=1e-12, rtol=1e-10)
    b = jax.tree_util.tree_map(lambda a: jnp.ones_like(a) * 0.3, params)
    for s in (solvers.kfac(), solvers.ekfac()):
        sol = s(op, b)
        want = np.linalg.solve(np.asarray(curvature.dense(op)), np.asarray(ravel_pytree(b)[0]))
        np.testing.assert_allclose(np.asarray(ravel_pytree(sol.x)[0]), want, rtol=1e-9)
        assert bool(sol.converged) and float(sol.stats["relative_residual"]) < 1e-10


@pytest.mark.parametrize("groups", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_kfac_block_exact_for_one_example_at_one_position_of_a_nonlinear_conv_net(groups):
    # a conv whose kernel covers the whole image (one output position), then tanh and a dense
    # layer with softmax cross-entropy: for one example, GNH block = a a^T (x) sum_c g_c g_c^T
    # (grouped: one such block per feature group)
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(2, 4, (4, 4), padding="VALID", feature_group_count=groups, rngs=rngs)
            self.out = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, x):
            return self.out(jnp.tanh(self.conv(x)).reshape(x.shape[0], -1))

    apply, params = _nnx(Net(nnx.Rngs(1)))
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 4, 4, 2), jnp.float64)
    obj = influx.Objective(apply, losses.softmax_cross_entropy, l2=0.0)
    op = curvature.operator(obj, params, (x, jnp.array([1])), kind="gnh", damping=1e-2)
    g = _gnh(op)
    st = solvers.kfac().prepare(op)
    assert [b.kind for b in st.blocks] == ["conv"] * groups + ["dense"]
    for k, b in enumerate(st.blocks):
        q = _basis(st, k)
        idx = _block_index(params, b)
        np.testing.assert_allclose(q @ np.diag(np.asarray(st.lam[k]).ravel()) @ q.T,
                                   g[np.ix_(idx, idx)], atol=1e-12)


# ------------------------------------------------------------------ nonlinear models: EK-FAC
class _ConvNet(nnx.Module):
    def __init__(self, rngs):
        self.c1 = nnx.Conv(2, 3, (3, 3), strides=2, padding="SAME", rngs=rngs)
        self.c2 = nnx.Conv(3, 4, (2, 2), padding="VALID", rngs=rngs)
        self.out = nnx.Linear(4 * 2 * 2, 3, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.c1(x))
        h = jnp.tanh(self.c2(h))
        return self.out(h.reshape(h.shape[0], -1))


def _attention64(q, k, v, *args, **kwargs):
    """Plain softmax attention (flax's computes the softmax in float32)."""
    w = jax.nn.softmax(jnp.einsum("...qhd,...khd->...hqk", q, k) / np.sqrt(q.shape[-1]), axis=-1)
    return jnp.einsum("...hqk,...khd->...qhd", w, v)


class _Attention(nnx.Module):
    """Embedding, one self-attention block with LayerNorm and an MLP at every position,
    per-token logits."""

    def __init__(self, rngs, vocab=5, d=4):
        f64 = {"dtype": jnp.float64, "param_dtype": jnp.float64, "rngs": rngs}
        self.emb = nnx.Embed(vocab, d, **f64)
        self.att = nnx.MultiHeadAttention(num_heads=2, in_features=d, decode=False,
                                          attention_fn=_attention64, **f64)
        self.ln = nnx.LayerNorm(d, **f64)
        self.mlp = nnx.Linear(d, d, **f64)
        self.head = nnx.Linear(d, vocab, **f64)

    def __call__(self, t):
        h = self.emb(t)
        h = h + self.att(h)
        h = h + jnp.tanh(self.mlp(self.ln(h)))
        return self.head(h)


def _token_xent():
    """Summed token cross-entropy over the sequence, with the block-diagonal factor."""
    ce = losses.softmax_cross_entropy
    return losses.Loss("token_xent", lambda z, y: jnp.sum(ce(z, y), axis=-1), ce.hessian_product,
                       lambda *a: None, ce.hessian_factor)


def _scan_apply(p, x):
    """Three stacked tanh layers applied by ``lax.scan``, then a dense head."""
    def step(h, layer):
        return jnp.tanh(h @ layer["w"] + layer["b"]), None

    h, _ = jax.lax.scan(step, x, p["stack"])
    return h @ p["head"]["w"] + p["head"]["b"]


def _nonlinear(name):
    if name == "scan":
        k = jax.random.split(jax.random.PRNGKey(0), 5)
        params = {"stack": {"w": 0.6 * jax.random.normal(k[0], (3, 4, 4)),
                            "b": 0.1 * jax.random.normal(k[1], (3, 4))},
                  "head": {"w": jax.random.normal(k[2], (4, 3)), "b": jnp.zeros(3)}}
        x = jax.random.normal(k[3], (7, 4))
        y = jax.random.randint(k[4], (7,), 0, 3)
        return influx.Objective(_scan_apply, losses.softmax_cross_entropy, l2=1e-3), params, (x, y)
    if name == "convnet":
        apply, params = _nnx(_ConvNet(nnx.Rngs(0)))
        x = jax.random.normal(jax.random.PRNGKey(1), (6, 6, 6, 2), jnp.float64)
        y = jax.random.randint(jax.random.PRNGKey(2), (6,), 0, 3)
        loss = losses.softmax_cross_entropy
    else:
        apply, params = _nnx(_Attention(nnx.Rngs(0)))
        x = jax.random.randint(jax.random.PRNGKey(1), (5, 3), 0, 5)
        y = jax.random.randint(jax.random.PRNGKey(2), (5, 3), 0, 5)
        loss = _token_xent()
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
    return influx.Objective(apply, loss, l2=1e-3), params, (x, y)


@pytest.mark.parametrize("name", ["convnet", "attention", "scan"])
def test_ekfac_eigenvalues_are_the_gnh_diagonal_in_the_eigenbasis(name):
    obj, params, data = _nonlinear(name)
    op = curvature.operator(obj, params, data, kind="gnh", damping=1e-2, chunk_size=4)
    g = _gnh(op)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # coverage >= 0.9: no warning
        st = solvers.ekfac().prepare(op)
    kinds = sorted({b.kind for b in st.blocks})
    assert kinds == {"convnet": ["conv", "dense"], "attention": ["dense", "embedding"],
                     "scan": ["dense"]}[name]
    if name == "scan":  # one block per slice of the stacked kernel and bias
        assert [(b.path, b.index, b.bias is not None) for b in st.blocks] == [
            ("['stack']['w'][0]", 0, True), ("['stack']['w'][1]", 1, True),
            ("['stack']['w'][2]", 2, True), ("['head']['w']", None, True)]
    for k, b in enumerate(st.blocks):
        q = _basis(st, k)
        idx = _block_index(params, b)
        want = np.diag(q.T @ g[np.ix_(idx, idx)] @ q).reshape(np.shape(st.lam[k]))
        np.testing.assert_allclose(np.asarray(st.lam[k]), want, rtol=1e-9, atol=1e-13)
    # the leaves in no block get the exact GNH diagonal
    in_block = np.zeros(op.dim, bool)
    for b in st.blocks:
        in_block[_block_index(params, b)] = True
    d = np.asarray(ravel_pytree(st.diag)[0])
    np.testing.assert_allclose(d[~in_block], np.diag(g)[~in_block], rtol=1e-9, atol=1e-14)
    assert np.all(d[in_block] == 0)
    # self-influence from the eigenbasis equals the quadratic form of the factored inverse
    grads = jax.vmap(lambda ex: jax.grad(lambda p: jnp.sum(obj.per_example_loss(
        p, jax.tree_util.tree_map(lambda a: a[None], ex))))(params))(data)
    xs = jax.jit(jax.vmap(lambda gr: E._inverse(st, gr)))(grads)
    flat = jax.vmap(lambda t: ravel_pytree(t)[0])
    quad, sol = solvers.ekfac().inverse_quadratic(st, op, data)
    assert sol is None
    np.testing.assert_allclose(np.asarray(quad), np.sum(np.asarray(flat(grads) * flat(xs)), 1),
                               rtol=1e-9)


def test_layers_report_every_leaf_and_coverage_of_an_attention_model():
    obj, params, data = _nonlinear("attention")
    x0 = data[0][:1]
    rep = {r.path: r for r in solvers.ekfac.layers(obj.apply_fn, params, x0)}
    assert len(rep) == len(jax.tree_util.tree_leaves(params))
    assert rep["['emb']['embedding'].value"].block == "embedding"
    for proj in ("query", "key", "value", "out"):
        assert rep[f"['att']['{proj}']['kernel'].value"][3:] == ("dense", "kernel")
        assert rep[f"['att']['{proj}']['bias'].value"][3:] == ("dense", "bias")
    assert rep["['ln']['scale'].value"].block == "diagonal"
    cov = solvers.ekfac.coverage(obj.apply_fn, params, x0)
    total = sum(r.size for r in rep.values())
    assert cov == pytest.approx(1 - sum(r.size for r in rep.values() if r.block == "diagonal") / total)
    assert cov >= 0.9
    obj, params, data = _nonlinear("convnet")
    assert kron.coverage(obj.apply_fn, params, data[0][:1]) >= 0.9


def test_layers_inside_jit_and_checkpoint_are_found():
    obj, params, data = _nonlinear("scan")
    wrapped = jax.checkpoint(jax.jit(obj.apply_fn))
    assert kron.blocks(wrapped, params, data[0][:1]) == kron.blocks(obj.apply_fn, params, data[0][:1])
    assert kron.coverage(wrapped, params, data[0][:1]) == 1.0


def test_coverage_warning_and_tied_weights():
    # a tied (shared) kernel gets no block: 100% of the big matrix on the diagonal
    def apply(p, x):
        return jnp.tanh(x @ p["tied"]) @ p["tied"].T @ p["head"]

    params = {"tied": jnp.ones((6, 6)) * 0.1, "head": jnp.ones((6, 2)) * 0.1}
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 6))
    obj = influx.Objective(apply, losses.squared_error, l2=1e-2)
    assert [r.block for r in solvers.kfac.layers(apply, params, x[:1])] == ["dense", "diagonal"]
    assert solvers.kfac.coverage(apply, params, x[:1]) == pytest.approx(12 / 48)
    op = curvature.operator(obj, params, (x, jnp.zeros((8, 2))), kind="gnh", damping=1e-2)
    with pytest.warns(RuntimeWarning, match="25% of the parameters"):
        solvers.kfac().prepare(op)


# ------------------------------------------------------------------ grouped convs, nested scans
class _GroupedNet(nnx.Module):
    """A grouped convolution (2 groups), a depthwise one, a dense head."""

    def __init__(self, rngs):
        self.c1 = nnx.Conv(2, 4, (3, 3), padding="SAME", feature_group_count=2, rngs=rngs)
        self.c2 = nnx.Conv(4, 4, (2, 2), padding="VALID", feature_group_count=4, rngs=rngs)
        self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.c2(jnp.tanh(self.c1(x))))
        return self.out(h.reshape(h.shape[0], -1))


def _nested_scan_apply(p, x):
    """``lax.scan`` over two blocks, each a ``lax.scan`` over two stacked tanh layers."""
    def outer(h, blk):
        def inner(hh, layer):
            return jnp.tanh(hh @ layer["w"] + layer["b"]), None

        return jax.lax.scan(inner, h, blk)[0], None

    h, _ = jax.lax.scan(outer, x, p["stack"])
    return h @ p["head"]["w"] + p["head"]["b"]


def _structured(name):
    if name == "grouped":
        apply, params = _nnx(_GroupedNet(nnx.Rngs(0)))
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        x = jax.random.normal(jax.random.PRNGKey(1), (5, 3, 3, 2), jnp.float64)
    else:  # numpy draws: no small compiled programs for the random numbers
        r = np.random.default_rng(0)
        params = {"stack": {"w": 0.8 * r.normal(size=(2, 2, 3, 3)), "b": 0.1 * r.normal(size=(2, 2, 3))},
                  "head": {"w": r.normal(size=(3, 3)), "b": np.zeros(3)}}
        params = jax.tree_util.tree_map(jnp.asarray, params)
        apply, x = _nested_scan_apply, jnp.asarray(r.normal(size=(5, 3)))
    y = jnp.array([0, 2, 1, 1, 0])
    return influx.Objective(apply, losses.softmax_cross_entropy, l2=1e-3), params, (x, y)


@pytest.mark.parametrize("name", ["grouped", "nested_scan"])
def test_ekfac_eigenvalues_for_grouped_convs_and_nested_scans(name):
    obj, params, data = _structured(name)
    x0 = data[0][:1]
    assert kron.coverage(obj.apply_fn, params, x0) == 1.0
    rep = {r.path: r.block for r in kron.layers(obj.apply_fn, params, x0)}
    if name == "grouped":  # one block per feature group: 2 + 4 (depthwise) + the head
        want = [("conv", None, 2)] * 2 + [("conv", None, 4)] * 4 + [("dense", None, 1)]
        assert rep == {f"['{m}']['{r}'].value": "conv" if m != "out" else "dense"
                       for m in ("c1", "c2", "out") for r in ("bias", "kernel")}
    else:  # one block per innermost slice of the doubly stacked kernel and bias
        want = [("dense", (i, j), 1) for i in range(2) for j in range(2)] + [("dense", None, 1)]
        assert set(rep.values()) == {"dense"}
    op = curvature.operator(obj, params, data, kind="gnh", damping=1e-2, chunk_size=5)
    st = solvers.ekfac().prepare(op)
    assert [(b.kind, b.index, b.groups) for b in st.blocks] == want
    assert all(b.bias is not None for b in st.blocks)
    if name == "grouped":
        assert [b.group for b in st.blocks] == [0, 1, 0, 1, 2, 3, 0]
    g = _gnh(op)
    covered = np.zeros(op.dim, int)
    for k, b in enumerate(st.blocks):
        q = _basis(st, k)
        idx = _block_index(params, b)
        covered[idx] += 1
        want_lam = np.diag(q.T @ g[np.ix_(idx, idx)] @ q).reshape(np.shape(st.lam[k]))
        np.testing.assert_allclose(np.asarray(st.lam[k]), want_lam, rtol=1e-9, atol=1e-13)
    assert np.all(covered == 1)  # the blocks partition the parameters
    # the factored inverse puts every block's share back in place: on a right-hand side that
    # is an eigenvector of one block, it is that vector over (its eigenvalue + shift)
    k = 1
    b_flat = np.zeros(op.dim)
    idx = _block_index(params, st.blocks[k])
    b_flat[idx] = _basis(st, k)[:, 2]
    unravel = ravel_pytree(params)[1]
    x = np.asarray(ravel_pytree(E._inverse(st, unravel(jnp.asarray(b_flat))))[0])
    lam = np.asarray(st.lam[k]).ravel()[2] + float(op.shift)
    np.testing.assert_allclose(x, b_flat / lam, rtol=1e-10, atol=1e-14)


@pytest.mark.slow  # the EK-FAC test of nested scans runs by default
def test_kfac_blocks_exact_for_a_deep_linear_nested_scan():
    # linear layers in nested scans with squared error: the map from a layer's output to the
    # network output is the same for every example, so each slice's Gauss-Newton block is
    # exactly A (x) S (K-FAC exact per block; the cross-layer blocks are what K-FAC drops)
    def apply(p, x):
        def outer(h, blk):
            return jax.lax.scan(lambda hh, layer: (hh @ layer["w"] + layer["b"], None), h, blk)[0], None

        return jax.lax.scan(outer, x, p["stack"])[0] @ p["head"]

    r = np.random.default_rng(4)
    params = jax.tree_util.tree_map(jnp.asarray, {
        "stack": {"w": 0.7 * r.normal(size=(2, 2, 3, 3)), "b": 0.1 * r.normal(size=(2, 2, 3))},
        "head": r.normal(size=(3, 2))})
    x = jnp.asarray(r.normal(size=(6, 3)))
    obj = influx.Objective(apply, losses.squared_error, l2=1e-3)
    op = curvature.operator(obj, params, (x, jnp.zeros((6, 2))), kind="gnh", damping=1e-2, chunk_size=6)
    st = solvers.kfac().prepare(op)
    assert [b.index for b in st.blocks] == [(0, 0), (0, 1), (1, 0), (1, 1), None]
    g = _gnh(op)
    for k, b in enumerate(st.blocks):
        q = _basis(st, k)
        idx = _block_index(params, b)
        np.testing.assert_allclose(q @ np.diag(np.asarray(st.lam[k]).ravel()) @ q.T,
                                   g[np.ix_(idx, idx)], atol=1e-12, rtol=1e-10)


def _linen_nested_scan():
    import flax.linen as nn

    class Inner(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return jnp.tanh(nn.Dense(3)(h)), None

    class Blk(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            scan = nn.scan(Inner, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
            return scan()(h, None)[0], None

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Blk, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            return nn.Dense(2)(scan()(x, None)[0])

    # abstract parameters (shapes and dtypes): tracing needs no values
    params = jax.eval_shape(lambda: Net().init(jax.random.PRNGKey(0), jnp.ones((1, 3))))
    return Net().apply, params, "['params']['ScanBlk_0']['ScanInner_0']['Dense_0']['kernel']"


def _nnx_nested_scan():
    class Layer(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 3, rngs=rngs)

    def stacked(cls, n, rngs):
        return nnx.split_rngs(splits=n)(nnx.vmap(cls, in_axes=(0,), out_axes=0))(rngs)

    class Blk(nnx.Module):
        def __init__(self, rngs):
            self.layers = stacked(Layer, 2, rngs)

        def __call__(self, h):
            step = nnx.scan(lambda hh, layer: jnp.tanh(layer.lin(hh)), in_axes=(nnx.Carry, 0),
                            out_axes=nnx.Carry)
            return step(h, self.layers)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.blocks = stacked(Blk, 3, rngs)
            self.head = nnx.Linear(3, 2, rngs=rngs)

        def __call__(self, x):
            step = nnx.scan(lambda h, blk: blk(h), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            return self.head(step(x, self.blocks))

    apply, params = _nnx(nnx.eval_shape(lambda: Net(nnx.Rngs(0))))  # abstract parameters
    return apply, params, "['blocks']['layers']['lin']['kernel'].value"


@pytest.mark.parametrize("make", [_linen_nested_scan, _nnx_nested_scan], ids=["linen", "nnx"])
def test_flax_nested_scans_get_one_block_per_slice(make):
    apply, params, kernel = make()
    x = jnp.ones((1, 3))
    blks = kron.blocks(apply, params, x)
    assert [b.index for b in blks] == [(i, j) for i in range(3) for j in range(2)] + [None]
    assert [b.path for b in blks[:2]] == [kernel + "[0][0]", kernel + "[0][1]"]
    assert all(b.bias is not None for b in blks)
    assert kron._coverage(params, blks) == 1.0


# ------------------------------------------------------------------ layers declared by hand
@jax.custom_jvp
def _opaque_dense(x, w):
    """A dense layer behind a custom derivative (its rule is the true derivative; a
    ``custom_vjp`` one would do for the factors, but the Gauss-Newton operator needs JVPs)."""
    return x @ w


_opaque_dense.defjvp(lambda p, t: (p[0] @ p[1], t[0] @ p[1] + p[0] @ t[1]))


def _custom_apply(p, x):
    return _opaque_dense(jnp.tanh(_opaque_dense(x, p["w1"]) + p["b1"]), p["w2"])


def _custom_problem():
    r = np.random.default_rng(3)
    params = {"w1": jnp.asarray(r.normal(size=(3, 4))), "b1": jnp.asarray(0.1 * r.normal(size=4)),
              "w2": jnp.asarray(r.normal(size=(4, 3)))}
    x = jnp.asarray(r.normal(size=(4, 3)))
    y = jnp.array([0, 1, 2, 1])
    return influx.Objective(_custom_apply, losses.softmax_cross_entropy, l2=1e-3), params, (x, y)


def test_declared_layers_inside_custom_jvp_get_exact_ekfac_eigenvalues():
    obj, params, data = _custom_problem()
    x0 = data[0][:1]
    # the custom-derivative function is opaque to tracing: everything on the diagonal
    assert {r.block for r in kron.layers(_custom_apply, params, x0)} == {"diagonal"}
    declare = (("w1", "dense"), kron.Layer("w2"))
    rep = {r.path: (r.block, r.role) for r in kron.layers(_custom_apply, params, x0, declare=declare)}
    assert rep == {"['b1']": ("dense", "bias"), "['w1']": ("dense", "kernel"),
                   "['w2']": ("dense", "kernel")}
    op = curvature.operator(obj, params, data, kind="gnh", damping=1e-2, chunk_size=4)
    st = solvers.ekfac(declare=declare).prepare(op)
    assert [b.path for b in st.blocks] == ["['w1']", "['w2']"]
    g = _gnh(op)
    for k, b in enumerate(st.blocks):
        q = _basis(st, k)
        idx = _block_index(params, b)
        want = np.diag(q.T @ g[np.ix_(idx, idx)] @ q).reshape(np.shape(st.lam[k]))
        np.testing.assert_allclose(np.asarray(st.lam[k]), want, rtol=1e-9, atol=1e-13)


def test_declared_diagonal_leaves_stay_out_of_the_blocks():
    obj, params, data = _structured("grouped")
    x0 = data[0][:1]
    declare = (kron.Layer("c1/kernel", "diagonal"), ("['out']['bias'].value", "diagonal"))
    blks = kron.blocks(obj.apply_fn, params, x0, declare=declare)
    assert [(b.kind, b.bias is not None) for b in blks] == [("conv", True)] * 4 + [("dense", False)]
    rep = {r.path: r.block for r in kron.layers(obj.apply_fn, params, x0, declare=declare)}
    assert rep["['c1']['kernel'].value"] == rep["['c1']['bias'].value"] == "diagonal"
    assert rep["['out']['bias'].value"] == "diagonal" and rep["['out']['kernel'].value"] == "dense"
    sizes = {r.path: r.size for r in kron.layers(obj.apply_fn, params, x0)}
    diag = sum(sizes[p] for p, blk in rep.items() if blk == "diagonal")
    assert kron.coverage(obj.apply_fn, params, x0, declare=declare) == pytest.approx(
        1 - diag / sum(sizes.values()))
    # the solver value carries the declaration (hashable, equal however it was spelled)
    s1 = solvers.kfac(declare=declare)
    s2 = solvers.kfac(declare=[("c1/kernel", "diagonal"), kron.Layer("out/bias", "diagonal")])
    assert s1.declare == declare[:1] + (kron.Layer("['out']['bias'].value", "diagonal"),)
    assert hash(s1) == hash(solvers.kfac(declare=declare)) and s1 != s2
    obj, params, data = _structured("nested_scan")
    op = curvature.operator(obj, params, data, kind="gnh", damping=1e-2, chunk_size=5)
    with pytest.warns(RuntimeWarning, match="20% of the parameters"):
        st = solvers.kfac(declare={"stack/w": "diagonal"}).prepare(op)
    assert [b.path for b in st.blocks] == ["['head']['w']"]
    d = np.asarray(ravel_pytree(st.diag)[0])
    idx = _block_index(params, st.blocks[0])
    rest = np.setdiff1d(np.arange(op.dim), idx)
    np.testing.assert_allclose(d[rest], np.diag(_gnh(op))[rest], rtol=1e-9, atol=1e-14)


def _tied(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w1"].T


def _regularised(p, x):
    return x @ p["w1"] + jnp.sum(p["w1"] ** 2)


def _elementwise(p, x):
    return jnp.tanh(x * p["w1"][:, 0])


def _in_cond(p, x):
    return jax.lax.cond(x.sum() > 0, lambda: x @ p["w1"], lambda: -x @ p["w1"]) @ p["w2"]


@pytest.mark.parametrize("apply, declare, match", [
    (_custom_apply, {"w3": "dense"}, r"'w3': no parameter leaf has this path \(the leaves: \['b1'\]"),
    (_custom_apply, kron.Layer("w1", shape=(4, 3)), r"declared shape \(4, 3\), but the leaf \['w1'\]"),
    (_custom_apply, kron.Layer("w1", "conv"), "'w1'.*the trace uses it as a dense layer"),
    (_custom_apply, kron.Layer("w1", in_axes=1, out_axes=0),
     r"declared in_axes=\(1,\), but the trace contracts axes \(0,\)"),
    (_custom_apply, {"w1": "dense", "b1": "dense"}, "'b1'.*it is the bias of a dense layer"),
    (_tied, {"w1": "dense"}, "'w1'.*weight of 2 operations"),
    (_regularised, {"w1": "dense"}, "'w1'.*1 other use"),
    (_elementwise, {"w1": "dense"}, "'w1'.*applies no dense, conv or embedding operation"),
    (_in_cond, {"w1": "dense"}, "'w1'.*applies no dense, conv or embedding operation"),
])
def test_declared_layers_that_do_not_match_the_trace_are_refused(apply, declare, match):
    params, x0 = _custom_problem()[1], jnp.ones((1, 3))
    if apply is _tied:
        params = {"w1": params["w1"][:, :3]}
    with pytest.raises(influx.errors.InputError, match=match):
        kron.blocks(apply, params, x0, declare=declare)
    # a correct declaration of the same model passes (axes and shape checked too)
    ok = kron.blocks(_custom_apply, _custom_problem()[1], x0,
                     declare=kron.Layer("w1", in_axes=(0,), out_axes=(1,), shape=(3, 4)))
    assert [b.path for b in ok] == ["['w1']"]


def test_bad_declarations_are_refused_before_any_work():
    for bad in ("w1", 3, [("w1",)], [("w1", "dense"), ("w1", "diagonal")]):
        with pytest.raises(influx.errors.InputError, match="declare"):
            solvers.ekfac(declare=bad)
    with pytest.raises(influx.errors.InputError, match="kind must be one of"):
        kron.Layer("w1", "lstm")
    with pytest.raises(influx.errors.InputError, match="in_axes"):
        kron.Layer("w1", "diagonal", in_axes=0)
    obj, params, data = _custom_problem()
    op = curvature.operator(obj, params, data, kind="gnh", damping=1e-2)
    with pytest.raises(influx.errors.InputError, match="'nope': no parameter leaf"):
        solvers.ekfac(declare={"nope": "dense"}).prepare(op)


@pytest.mark.parametrize("case", [
    ((5, 7), (3, 3), (1, 1), "SAME", (1, 1), (1, 1), ("NHWC", "HWIO", "NHWC")),
    ((8, 9), (3, 2), (2, 3), "VALID", (1, 1), (1, 1), ("NCHW", "OIHW", "NCHW")),
    ((6, 6), (3, 3), (1, 2), [(2, -1), (0, 1)], (1, 1), (2, 1), ("NHWC", "HWIO", "NCHW")),
    ((5, 4), (2, 3), (2, 1), [(1, 1), (2, 0)], (2, 1), (1, 1), ("NCHW", "OIHW", "NHWC")),
    ((10,), (3,), (2,), [(1, 1)], (1,), (2,), ("NWC", "WIO", "NWC")),
    ((4, 5, 6), (2, 2, 3), (1, 2, 1), [(1, 0), (0, 1), (1, 2)], (1, 1, 1), (1, 1, 2),
     ("NDHWC", "DHWIO", "NDHWC")),
])
@pytest.mark.parametrize("groups", [1, 3])
def test_conv_patches_equal_jax_patches(case, groups):
    """The slice-formed patches equal ``conv_general_dilated_patches`` (float64, exactly) for
    1-3 spatial axes, strides, negative and uneven padding, input and filter dilation,
    channel-first / channel-last layouts and feature groups (up to the order of the
    features)."""
    sp, filt, st, pad, ld, rd, layout = case
    c = 6
    shape = (2, c) + sp if layout[0][1] == "C" else (2,) + sp + (c,)
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape))
    rhs = (4, c) + filt if layout[1][0] == "O" else filt + (c, 4)
    dn = jax.lax.conv_dimension_numbers(shape, rhs, layout)
    if isinstance(pad, str):
        pad = jax.lax.padtype_to_pads(sp, filt, st, pad)
    ref = jax.lax.conv_general_dilated_patches(x, filt, st, pad, lhs_dilation=ld, rhs_dilation=rd,
                                               dimension_numbers=dn,
                                               precision=jax.lax.Precision.HIGHEST)
    out_sp = tuple(ref.shape[i] for i in dn.out_spec[2:])
    got = kron.patches(x, filt, out_sp, strides=st, padding=pad, lhs_dilation=ld, rhs_dilation=rd,
                       lhs_spec=dn.lhs_spec, groups=groups)
    want = jnp.transpose(ref, (dn.out_spec[0], *dn.out_spec[2:], dn.out_spec[1]))
    # jax's features are channel-major (c, k); ours are (group, k, channel of the group)
    k = int(np.prod(filt))
    want = want.reshape(want.shape[:-1] + (groups, c // groups, k))
    want = jnp.swapaxes(want, -1, -2).reshape(got.shape)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
