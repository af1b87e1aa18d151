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
    """Flat (ravel order) indices of a block's ``(rows, d_out)`` matrix."""
    leaves = jax.tree_util.tree_leaves(params)
    offs = np.cumsum([0] + [np.size(l) for l in leaves])

    def leaf_index(i):
        idx = np.arange(offs[i], offs[i + 1]).reshape(np.shape(leaves[i]))
        return idx if b.index is None else idx[b.index]

    idx = leaf_index(b.kernel).transpose(b.perm).reshape(b.d_in, b.d_out)
    if b.bias is not None:
        idx = np.concatenate([idx, leaf_index(b.bias).reshape(1, -1)], 0)
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
          "embedding"]


@pytest.mark.parametrize("name", LINEAR)
def test_kfac_block_is_the_exact_gauss_newton_block_for_linear_models(name):
    obj, params, data = _linear_problem(name)
    blks = kron.blocks(obj.apply_fn, params, data[0][:1])
    kind = "conv" if name.startswith("conv") else "embedding" if name == "embedding" else "dense"
    assert len(blks) == 1 and blks[0].kind == kind
    # every parameter is in the block: K-FAC is the whole matrix
    assert kron.coverage(obj.apply_fn, params, data[0][:1]) == 1.0
    op = curvature.operator(obj, params, data, kind="gnh", damping=1e-2, chunk_size=3)
    g = _gnh(op)
    st = solvers.kfac().prepare(op)
    q = _basis(st, 0)
    approx = q @ np.diag(np.asarray(st.lam[0]).ravel()) @ q.T
    idx = _block_index(params, blks[0])
    np.testing.assert_allclose(approx, g[np.ix_(idx, idx)], atol=1e-12, rtol=1e-10)
    b = jax.tree_util.tree_map(lambda a: jnp.ones_like(a) * 0.3, params)
    for s in (solvers.kfac(), solvers.ekfac()):
        sol = s(op, b)
        want = np.linalg.solve(np.asarray(curvature.dense(op)), np.asarray(ravel_pytree(b)[0]))
        np.testing.assert_allclose(np.asarray(ravel_pytree(sol.x)[0]), want, rtol=1e-9)
        assert bool(sol.converged) and float(sol.stats["relative_residual"]) < 1e-10


def test_kfac_block_exact_for_one_example_at_one_position_of_a_nonlinear_conv_net():
    # a conv whose kernel covers the whole image (one output position), then tanh and a dense
    # layer with softmax cross-entropy: for one example, GNH block = a a^T (x) sum_c g_c g_c^T
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(2, 3, (4, 4), padding="VALID", rngs=rngs)
            self.out = nnx.Linear(3, 4, rngs=rngs)

        def __call__(self, x):
            return self.out(jnp.tanh(self.conv(x)).reshape(x.shape[0], -1))

    apply, params = _nnx(Net(nnx.Rngs(1)))
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 4, 4, 2), jnp.float64)
    obj = influx.Objective(apply, losses.softmax_cross_entropy, l2=0.0)
    op = curvature.operator(obj, params, (x, jnp.array([1])), kind="gnh", damping=1e-2)
    g = _gnh(op)
    st = solvers.kfac().prepare(op)
    assert [b.kind for b in st.blocks] == ["conv", "dense"]
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
