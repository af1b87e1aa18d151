"""Curvature products and operators against dense float64 references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import influx
from influx import curvature, losses
from tests.conftest import PROBLEMS, make_problem


def flat_objective(obj, params, data):
    flat, unravel = ravel_pytree(params)
    return flat, unravel, lambda f: obj(unravel(f), data)


def dense_gnh(obj, params, data):
    return jax.jit(_dense_gnh_impl, static_argnums=0)(obj, params, data)


def _dense_gnh_impl(obj, params, data):
    """1/N sum_i J_i^T H_i J_i from explicit Jacobians and output Hessians."""
    flat, unravel = ravel_pytree(params)
    x, y = data
    n = x.shape[0]
    z = obj.apply_fn(params, x)
    jac = jax.jacfwd(lambda f: obj.apply_fn(unravel(f), x))(flat)  # (N, K, P)
    h_out = jax.vmap(jax.hessian(lambda zi, yi: obj.loss_fn(zi, yi)))(z, y)  # (N, K, K)
    return jnp.einsum("nkp,nkl,nlq->pq", jac, h_out, jac) / n


def random_like(params, key):
    flat, unravel = ravel_pytree(params)
    return unravel(jax.random.normal(key, flat.shape, flat.dtype))


@pytest.mark.parametrize("name", PROBLEMS)
def test_hessian_operator_equals_jax_hessian(name):
    obj, params, data = make_problem(name)
    flat, unravel, J = flat_objective(obj, params, data)
    h_ref = jax.jit(jax.hessian(J))(flat) + 0.3 * jnp.eye(flat.size)
    op = curvature.operator(obj, params, data, kind="hessian", damping=0.3, chunk_size=8)
    np.testing.assert_allclose(curvature.dense(op), h_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", PROBLEMS)
def test_hvp_closure_equals_jax_hessian(name):
    obj, params, data = make_problem(name)
    flat, unravel, J = flat_objective(obj, params, data)
    v = random_like(params, jax.random.PRNGKey(1))
    got = ravel_pytree(influx.hvp(lambda p: obj(p, data), params, v))[0]
    np.testing.assert_allclose(got, jax.jit(jax.hessian(J))(flat) @ ravel_pytree(v)[0], rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize("name", PROBLEMS)
def test_gnh_operator_equals_explicit_jacobians(name):
    obj, params, data = make_problem(name)
    g_ref = dense_gnh(obj, params, data)
    p = g_ref.shape[0]
    op = curvature.operator(obj, params, data, kind="gnh", damping=0.1, chunk_size=10)
    g = curvature.dense(op)
    np.testing.assert_allclose(g, g_ref + (obj.l2 + 0.1) * jnp.eye(p), rtol=1e-10, atol=1e-12)
    # symmetric and PSD (undamped, no l2)
    op0 = curvature.operator(influx.Objective(obj.apply_fn, obj.loss_fn), params, data,
                             kind="gnh", damping=0.0)
    g0 = curvature.dense(op0)
    np.testing.assert_allclose(g0, g0.T, atol=1e-12)
    assert jnp.linalg.eigvalsh(g0).min() > -1e-10


@pytest.mark.parametrize("name", ["tanh_mlp", "regression_mlp", "cnn"])
def test_gnhvp_closure_equals_explicit(name):
    obj, params, data = make_problem(name)
    x, y = data
    v = random_like(params, jax.random.PRNGKey(2))
    net = lambda p: obj.apply_fn(p, x)
    loss = lambda z: jnp.mean(obj.loss_fn(z, y))
    got = ravel_pytree(influx.gnhvp(net, loss, params, v))[0]
    ref = dense_gnh(obj, params, data) @ ravel_pytree(v)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)


def test_custom_loss_uses_autodiff_output_hessian():
    obj, params, data = make_problem("tanh_mlp")
    custom = influx.Objective(obj.apply_fn, lambda z, y: losses.softmax_cross_entropy(z, y),
                              l2=obj.l2)
    v = random_like(params, jax.random.PRNGKey(3))
    a = curvature.operator(obj, params, data, kind="gnh")(v)
    b = curvature.operator(custom, params, data, kind="gnh")(v)
    np.testing.assert_allclose(ravel_pytree(a)[0], ravel_pytree(b)[0], rtol=1e-12)


@pytest.mark.parametrize("kind", ["gnh", "hessian"])
@pytest.mark.parametrize("chunk_size", [1, 5, 7, 36, 37, 100])
def test_chunked_equals_unchunked(kind, chunk_size):
    obj, params, data = make_problem("tanh_mlp", n=37)
    v = random_like(params, jax.random.PRNGKey(4))
    full = curvature.operator(obj, params, data, kind=kind, chunk_size=37)(v)
    got = curvature.operator(obj, params, data, kind=kind, chunk_size=chunk_size)(v)
    np.testing.assert_allclose(ravel_pytree(got)[0], ravel_pytree(full)[0], rtol=1e-12,
                               atol=1e-14)


@pytest.mark.parametrize("kind", ["gnh", "hessian"])
def test_jit_and_vmap_agree_with_loop(kind):
    obj, params, data = make_problem("relu_mlp")
    op = curvature.operator(obj, params, data, kind=kind, damping=1e-2, chunk_size=8)
    vs = jax.vmap(lambda k: random_like(params, k))(jax.random.split(jax.random.PRNGKey(5), 8))
    loop = [ravel_pytree(op(jax.tree_util.tree_map(lambda a: a[i], vs)))[0] for i in range(8)]
    batched = jax.jit(lambda o, v: jax.vmap(o)(v))(op, vs)
    batched = jax.vmap(lambda t: ravel_pytree(t)[0])(batched)
    np.testing.assert_allclose(batched, jnp.stack(loop), rtol=1e-12, atol=1e-14)
    mm = jax.vmap(lambda t: ravel_pytree(t)[0])(op.matmat(vs))
    np.testing.assert_allclose(mm, jnp.stack(loop), rtol=1e-12, atol=1e-14)


def test_damping_is_a_leaf_no_recompile():
    obj, params, data = make_problem("logistic")
    v = random_like(params, jax.random.PRNGKey(6))
    f = jax.jit(lambda o, v: o(v))
    op = curvature.operator(obj, params, data, damping=0.1)
    a = f(op, v)
    b = f(op.replace(damping=jnp.asarray(0.2)), v)
    diff = jax.tree_util.tree_map(lambda x, y: y - x, a, b)
    np.testing.assert_allclose(ravel_pytree(diff)[0], 0.1 * ravel_pytree(v)[0], rtol=1e-10)
    assert f._cache_size() == 1


def test_dtype_preserved_float32():
    obj, params, data = make_problem("tanh_mlp")
    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    d32 = (data[0].astype(jnp.float32), data[1])
    v = random_like(params, jax.random.PRNGKey(7))  # float64 vector is cast
    for kind in ("gnh", "hessian"):
        out = curvature.operator(obj, p32, d32, kind=kind)(v)
        assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(out))
    out = influx.hvp(lambda p: obj(p, d32), p32, v)
    assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(out))


def test_per_example_grads_equal_loop():
    obj, params, data = make_problem("cnn", n=11)
    g = curvature.per_example_grads_flat(obj, params, data, chunk_size=4)
    x, y = data
    grad_i = jax.jit(jax.grad(lambda p, xi, yi: obj.per_example_loss(p, (xi, yi))[0]))
    for i in range(11):
        gi = grad_i(params, x[i:i + 1], y[i:i + 1])
        np.testing.assert_allclose(g[i], ravel_pytree(gi)[0], rtol=1e-12, atol=1e-14)


def test_flax_linen_and_nnx_params():
    x = jax.random.normal(jax.random.PRNGKey(0), (20, 4))
    y = jax.random.randint(jax.random.PRNGKey(1), (20,), 0, 3)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(jnp.tanh(nn.Dense(5)(x)))

    model = Net()
    variables = model.init(jax.random.PRNGKey(2), x)
    obj = influx.Objective(lambda p, x: model.apply({"params": p}, x),
                           losses.softmax_cross_entropy, l2=1e-3)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), variables["params"])
    flat, unravel = ravel_pytree(params)
    h_ref = jax.jit(jax.hessian(lambda f: obj(unravel(f), (x, y))))(flat)
    op = curvature.operator(obj, params, (x, y), kind="hessian", chunk_size=6)
    np.testing.assert_allclose(curvature.dense(op), h_ref, rtol=1e-10, atol=1e-12)

    class NNet(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 5, rngs=rngs)
            self.l2 = nnx.Linear(5, 3, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))

    graphdef, state = nnx.split(NNet(nnx.Rngs(0)))
    state = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), state)
    apply = lambda s, x: nnx.merge(graphdef, s)(x)
    obj2 = influx.Objective(apply, losses.softmax_cross_entropy, l2=1e-3)
    flat2, unravel2 = ravel_pytree(state)
    h_ref2 = jax.jit(jax.hessian(lambda f: obj2(unravel2(f), (x, y))))(flat2)
    op2 = curvature.operator(obj2, state, (x, y), kind="hessian", chunk_size=7)
    np.testing.assert_allclose(curvature.dense(op2), h_ref2, rtol=1e-10, atol=1e-12)


def test_bad_inputs_raise_clear_errors():
    obj, params, data = make_problem("tanh_mlp")
    op = curvature.operator(obj, params, data)
    with pytest.raises(TypeError, match="structure"):
        op({"w": 1.0})
    bad = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape + (1,)), params)
    with pytest.raises(ValueError, match="shape"):
        op(bad)
    with pytest.raises(ValueError, match="shape"):
        influx.hvp(lambda p: obj(p, data), params, bad)
    with pytest.raises(ValueError, match="chunk_size"):
        curvature.operator(obj, params, data, chunk_size=0)
    with pytest.raises(ValueError, match="damping"):
        curvature.operator(obj, params, data, damping=-1e-3)
    with pytest.raises(ValueError, match="damping"):
        curvature.operator(obj, params, data, damping=float("nan"))
    with pytest.raises(ValueError, match="kind"):
        curvature.operator(obj, params, data, kind="fisher")
    x, y = data
    with pytest.raises(ValueError, match="out of range"):
        curvature.operator(obj, params, (x, y.at[0].set(3)))
    with pytest.raises(ValueError, match="out of range"):
        curvature.operator(obj, params, (x, y.at[0].set(-1)))
    with pytest.raises(ValueError, match="NaN"):
        curvature.operator(obj, params, (x.at[0, 0].set(jnp.nan), y))
    with pytest.raises(ValueError, match="per-example shape"):
        curvature.operator(obj, params, (x[:, :3], y))
    with pytest.raises(ValueError, match="disagree"):
        curvature.operator(obj, params, (x, y[:-1]))
    with pytest.raises(ValueError, match="empty"):
        curvature.operator(obj, params, (x[:0], y[:0]))
    with pytest.raises(TypeError, match="integers"):
        curvature.operator(obj, params, (x, y.astype(jnp.float64)))
    with pytest.raises(ValueError, match="l2"):
        influx.Objective(obj.apply_fn, obj.loss_fn, l2=-1.0)


def test_objective_is_hashable_static_arg():
    obj, params, data = make_problem("logistic")
    assert hash(obj) == hash(influx.Objective(obj.apply_fn, obj.loss_fn, l2=obj.l2))
    f = jax.jit(lambda o, p, d: o(p, d), static_argnums=0)
    np.testing.assert_allclose(f(obj, params, data), obj(params, data))


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 37, 100])
def test_chunked_map_equals_one_call(chunk_size):
    xs = {"a": jnp.arange(37.0), "b": jnp.arange(74.0).reshape(37, 2)}
    fn = lambda t: {"s": t["a"] * 2.0 + t["b"][:, 0], "n": t["b"] ** 2}
    got = curvature.chunked_map(fn, xs, chunk_size=chunk_size)
    want = fn(xs)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))


def test_static_chunks_equal_scanned_chunks():
    """chunked_sum(static=True) (static slices, used for conv models on CPU) equals the
    scanned chunks and one chunk, with and without a partial last chunk."""
    rng = np.random.default_rng(0)
    data = (jnp.asarray(rng.normal(size=(23, 3))), jnp.asarray(rng.normal(size=(23,))))

    def fn(ch):
        return {"s": jnp.sum(ch[0] * ch[1][:, None], axis=0), "q": jnp.sum(ch[1] ** 2)}

    one = curvature.chunked_sum(fn, data, chunk_size=23)
    for c in (5, 23, 4):
        for static in (False, True):
            got = curvature.chunked_sum(fn, data, chunk_size=c, static=static)
            for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(one)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12)


@pytest.mark.parametrize("n,batch", [(10, 4), (37, 8), (12, 4), (3, 8), (1, 1)])
def test_even_map_equals_lax_map_with_one_traced_body(n, batch):
    """even_map gives lax.map's rows (padding cut off), and traces ``fn`` once where lax.map
    traces it twice (a vmapped copy for the remainder when ``batch`` does not divide ``n``)."""
    xs = {"a": jnp.arange(float(n)), "b": jnp.arange(2.0 * n).reshape(n, 2)}
    traced = []

    def fn(t):
        traced.append(1)
        return {"s": t["a"] * 2.0 + t["b"][0], "q": t["b"] ** 2}

    got = jax.jit(lambda x: curvature.even_map(fn, x, batch_size=batch))(xs)
    assert len(traced) == 1
    traced.clear()
    want = jax.jit(lambda x: jax.lax.map(fn, x, batch_size=batch))(xs)
    assert len(traced) == (2 if n % min(batch, n) else 1)  # what even_map avoids
    for k in want:
        assert got[k].shape == want[k].shape
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
