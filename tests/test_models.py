"""Tests for influx.models: reference Flax models and the compiled training loops."""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from influx import models  # noqa: E402
from influx.errors import InputError  # noqa: E402


def xent(z, y):
    """Per-example softmax cross-entropy (kept local: models must not need influx.losses)."""
    return jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, y[..., None], -1)[..., 0]


def sq(z, y):
    return 0.5 * jnp.sum((z - y) ** 2, axis=-1)


def _classification(n=60, d=4, k=3, seed=0, dtype=jnp.float64):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (n, d), dtype)
    w = jax.random.normal(kw, (d, k), dtype)
    y = jnp.argmax(x @ w + 0.5 * jax.random.normal(kw, (n, k), dtype), -1).astype(jnp.int32)
    return x, y


@pytest.mark.parametrize("activation", list(models.ACTIVATIONS))
def test_mlp_shapes_and_param_count(activation):
    m = models.mlp(2, 5, 3, activation)
    assert m.widths == (5, 5)
    x = jnp.ones((7, 4))
    p = models.init(m, x, seed=0)
    flat, _ = ravel_pytree(p)
    assert flat.size == (4 * 5 + 5) + (5 * 5 + 5) + (5 * 3 + 3)
    f = models.apply_fn(m)
    out = f(p, x)
    assert out.shape == (7, 3)
    # a single example works too and equals the batched row
    np.testing.assert_allclose(f(p, x[0]), out[0], rtol=1e-12)
    # seeded
    p2 = models.init(m, x, seed=0)
    np.testing.assert_array_equal(ravel_pytree(p2)[0], flat)


def test_mlp_depth0_is_linear_and_bad_args():
    m = models.mlp(0, 3, 2)
    p = models.init(m, jnp.ones((1, 4)))
    x = jax.random.normal(jax.random.key(1), (5, 4))
    ref = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    np.testing.assert_allclose(models.apply_fn(m)(p, x), ref, rtol=1e-12)
    with pytest.raises(ValueError, match="activation"):
        models.mlp(1, 3, 2, "swish")
    with pytest.raises(ValueError, match="activation"):
        models.init(models.MLP((3,), 2, "swish"), jnp.ones((1, 4)))
    with pytest.raises(ValueError, match="depth"):
        models.mlp(-1, 3, 2)
    with pytest.raises(ValueError, match="width"):
        models.mlp(1, 0, 2)


@pytest.mark.parametrize("hw", [8, 28])
def test_cnn_shapes(hw):
    m = models.CNN(channels=(4, 6), out=10)
    x = jax.random.normal(jax.random.key(0), (3, hw, hw, 1))
    p = models.init(m, x, seed=1)
    f = jax.jit(models.apply_fn(m))
    out = f(p, x)
    assert out.shape == (3, 10)
    np.testing.assert_allclose(f(p, x[1]), out[1], rtol=1e-10, atol=1e-12)
    side = int(np.ceil(np.ceil(hw / 2) / 2))  # two SAME 2x2 pools
    assert p["Dense_0"]["kernel"].shape == (side * side * 6, 10)
    with pytest.raises(ValueError, match="H, W, C"):
        f(p, jnp.ones((hw, hw)))


def test_train_full_batch_reduces_loss_and_matches_python_loop():
    x, y = _classification()
    m = models.mlp(1, 6, 3)
    p0 = models.init(m, x, seed=0)
    opt = optax.sgd(0.1)
    res = models.train(m, xent, p0, (x, y), l2=1e-3, optimizer=opt, steps=50)
    params, losses = res  # unpacks as a pair
    assert losses.shape == (50,)
    assert losses[-1] < 0.7 * losses[0]
    # reference: the same updates written as a plain Python loop
    J = models.objective(m, xent, l2=1e-3)

    @jax.jit
    def step(p, s):
        u, s = opt.update(jax.grad(J)(p, x, y), s, p)
        return optax.apply_updates(p, u), s

    p, s = p0, opt.init(p0)
    for _ in range(50):
        p, s = step(p, s)
    np.testing.assert_allclose(ravel_pytree(params)[0], ravel_pytree(p)[0], rtol=1e-9)
    np.testing.assert_allclose(losses[0], J(p0, x, y), rtol=1e-12)


def test_objective_includes_l2():
    x, y = _classification(n=10)
    m = models.mlp(1, 3, 3)
    p = models.init(m, x)
    f = models.apply_fn(m)
    ref = jnp.mean(xent(f(p, x), y)) + 0.5 * 0.3 * jnp.sum(ravel_pytree(p)[0] ** 2)
    np.testing.assert_allclose(models.objective(f, xent, l2=0.3)(p, x, y), ref, rtol=1e-12)


def test_train_minibatch_seeded_and_regression():
    kx, kn = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (64, 3))
    y = jnp.sin(x[:, :1]) + 0.05 * jax.random.normal(kn, (64, 1))
    m = models.mlp(1, 8, 1)
    p0 = models.init(m, x)
    a = models.train(m, sq, p0, (x, y), l2=0.0, steps=200, batch_size=16, seed=3)
    b = models.train(models.apply_fn(m), sq, p0, (x, y), l2=0.0, steps=200, batch_size=16, seed=3)
    np.testing.assert_array_equal(ravel_pytree(a.params)[0], ravel_pytree(b.params)[0])
    J = models.objective(m, sq, l2=0.0)
    assert J(a.params, x, y) < 0.2 * J(p0, x, y)


def test_minibatch_indices_schedule_and_train_uses_it():
    """Each epoch is a permutation; train's minibatch run equals a Python loop over the schedule."""
    idx = np.asarray(models.minibatch_indices(10, batch_size=4, steps=5, seed=7))
    assert idx.shape == (5, 4)
    flat = idx.reshape(-1)
    assert sorted(flat[:10].tolist()) == list(range(10))  # epoch 1 is a permutation
    assert len(set(flat[10:20].tolist())) == 10
    same = models.minibatch_indices(10, batch_size=4, steps=5, seed=jax.random.key(7))
    np.testing.assert_array_equal(idx, same)
    assert not np.array_equal(idx, models.minibatch_indices(10, batch_size=4, steps=5, seed=8))
    x, y = _classification(n=10)
    m = models.mlp(1, 3, 3)
    p0 = models.init(m, x)
    opt = optax.sgd(0.1)
    res = models.train(m, xent, p0, (x, y), l2=0.01, optimizer=opt, steps=5, batch_size=4, seed=7)
    J = models.objective(m, xent, l2=0.01)
    p, s = p0, opt.init(p0)
    for ib in idx:
        g = jax.grad(J)(p, x[ib], y[ib])
        u, s = opt.update(g, s, p)
        p = optax.apply_updates(p, u)
    np.testing.assert_allclose(ravel_pytree(res.params)[0], ravel_pytree(p)[0], rtol=1e-12)
    for kw in ({"batch_size": 0, "steps": 1}, {"batch_size": 11, "steps": 1}, {"batch_size": 2, "steps": 0}):
        with pytest.raises(InputError):
            models.minibatch_indices(10, **kw)


def test_train_bad_args():
    x, y = _classification(n=10)
    m = models.mlp(1, 3, 3)
    p = models.init(m, x)
    with pytest.raises(ValueError, match="steps"):
        models.train(m, xent, p, (x, y), l2=0.0, steps=0)
    with pytest.raises(ValueError, match="batch_size"):
        models.train(m, xent, p, (x, y), l2=0.0, steps=1, batch_size=11)
    with pytest.raises(ValueError, match="same number"):
        models.train(m, xent, p, (x, y[:5]), l2=0.0, steps=1)
    with pytest.raises(ValueError, match="l2"):
        models.train(m, xent, p, (x, y), l2=-1.0, steps=1)
    with pytest.raises(TypeError, match="model_or_apply_fn"):
        models.train(3, xent, p, (x, y), l2=0.0, steps=1)
    for w in (np.ones(9), -np.ones(10), np.full(10, np.nan)):
        with pytest.raises(InputError, match="weights"):
            models.train(m, xent, p, (x, y), l2=0.0, steps=1, weights=w)


def test_train_weights_are_the_weighted_mean():
    """weights w: each step descends 1/|B| sum w_i L_i + l2/2 ||theta||^2 (all ones: plain train)."""
    x, y = _classification(n=12)
    m = models.mlp(1, 3, 3)
    p0 = models.init(m, x)
    opt = optax.sgd(0.1)
    w = np.random.default_rng(0).uniform(0, 2, size=12)
    res = models.train(m, xent, p0, (x, y), l2=0.01, optimizer=opt, steps=3, weights=w)
    f = models.apply_fn(m)
    J = lambda p: jnp.mean(w * xent(f(p, x), y)) + 0.005 * sum(
        jnp.vdot(a, a) for a in jax.tree_util.tree_leaves(p))
    p = p0
    for _ in range(3):
        p = jax.tree_util.tree_map(lambda a, g: a - 0.1 * g, p, jax.grad(J)(p))
    np.testing.assert_allclose(ravel_pytree(res.params)[0], ravel_pytree(p)[0], rtol=1e-12)
    ones = models.train(m, xent, p0, (x, y), l2=0.01, optimizer=opt, steps=3, weights=np.ones(12))
    plain = models.train(m, xent, p0, (x, y), l2=0.01, optimizer=opt, steps=3)
    np.testing.assert_allclose(ravel_pytree(ones.params)[0], ravel_pytree(plain.params)[0], rtol=1e-14)


def test_lbfgs_refinement_reaches_tight_gradient_norm():
    x, y = _classification(n=80, d=5, k=3, seed=5)
    m = models.mlp(0, 1, 3)  # multinomial logistic regression
    p0 = models.init(m, x, seed=0)
    assert ravel_pytree(p0)[0].dtype == jnp.float64
    res = models.train_to_convergence(
        m, xent, p0, (x, y), l2=1e-2, optimizer=optax.adam(0.05), steps=50, tol=1e-6
    )
    assert res.losses.shape == (50,)
    assert bool(res.converged) and float(res.grad_norm) < 1e-6
    assert 0 < int(res.lbfgs_steps) < 1000
    J = models.objective(m, xent, l2=1e-2)
    g = jax.grad(J)(res.params, x, y)
    np.testing.assert_allclose(jnp.linalg.norm(ravel_pytree(g)[0]), res.grad_norm, rtol=1e-6)
    np.testing.assert_allclose(res.objective, J(res.params, x, y), rtol=1e-12)
    # minimiser: the Newton step from it is negligible (dense Hessian reference)
    flat, unravel = ravel_pytree(res.params)
    Jf = lambda v: J(unravel(v), x, y)
    newton = jax.jit(lambda v: jnp.linalg.solve(jax.hessian(Jf)(v), jax.grad(Jf)(v)))
    step = newton(flat)
    assert float(jnp.linalg.norm(step)) < 1e-5


def test_lbfgs_reports_non_convergence():
    x, y = _classification(n=30)
    m = models.mlp(1, 4, 3)
    p0 = models.init(m, x)
    res = models.train_to_convergence(m, xent, p0, (x, y), l2=1e-3, max_lbfgs_steps=2, tol=1e-12)
    assert res.losses.shape == (0,)  # steps=0: pure L-BFGS
    assert int(res.lbfgs_steps) == 2 and not bool(res.converged)
    assert float(res.grad_norm) > 1e-12


def test_lbfgs_dtype_mismatch_is_a_clear_error():
    x, y = _classification(n=10)
    m = models.mlp(0, 1, 3)
    p32 = models.init(m, x, dtype=jnp.float32)
    assert ravel_pytree(p32)[0].dtype == jnp.float32
    with pytest.raises(ValueError, match="one float dtype"):
        models.train_to_convergence(m, xent, p32, (x, y), l2=1e-2)


def test_train_reuses_compilation_across_l2_and_data():
    x, y = _classification(n=20, seed=8)
    m = models.mlp(1, 4, 3)
    p0 = models.init(m, x)
    opt = optax.sgd(0.05)
    before = models._train_jit._cache_size()
    a = models.train(m, xent, p0, (x, y), l2=0.0, optimizer=opt, steps=5)
    b = models.train(m, xent, p0, (x + 1.0, y), l2=0.5, optimizer=opt, steps=5)
    assert models._train_jit._cache_size() == before + 1
    assert not np.allclose(a.losses, b.losses)
