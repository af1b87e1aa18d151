"""Flax adapters: linen (batch statistics constant), nnx, TrainState, parameter subsets."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state
from jax.flatten_util import ravel_pytree

import influx
from influx import flax as iflax
from influx import solvers
from influx.errors import InputError
from tests.test_influence import dense_reference

DIRECT = solvers.direct()
N, N_TEST, D, K = 24, 4, 4, 3


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(5, param_dtype=jnp.float64)(x)
        x = nn.BatchNorm(use_running_average=not train, param_dtype=jnp.float64)(x)
        return nn.Dense(K, param_dtype=jnp.float64)(jnp.tanh(x))


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(D, 5, param_dtype=jnp.float64, rngs=rngs)
        self.bn = nnx.BatchNorm(5, dtype=jnp.float64, param_dtype=jnp.float64, rngs=rngs)
        self.l2 = nnx.Linear(5, K, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.bn(self.l1(x))))


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N + N_TEST, D))
    y = rng.integers(0, K, size=N + N_TEST).astype(np.int32)
    return (x[:N], y[:N]), (x[N:], y[N:])


TRAIN, TEST = _data()


def _linen_variables():
    module = LinenNet()
    variables = module.init(jax.random.PRNGKey(0), TRAIN[0])
    # one pass in training mode so the batch statistics are not the defaults
    _, upd = module.apply(variables, 3.0 * TRAIN[0] + 1.0, train=True, mutable=["batch_stats"])
    return module, {"params": variables["params"], "batch_stats": upd["batch_stats"]}


def test_from_linen_holds_batch_stats_constant():
    module, variables = _linen_variables()
    apply_fn, params = iflax.from_linen(module, variables)
    assert set(params) == {"Dense_0", "Dense_1", "BatchNorm_0"}  # params only
    np.testing.assert_allclose(apply_fn(params, TEST[0]), module.apply(variables, TEST[0]), rtol=1e-12)
    # the running statistics are used (not the batch's): differs from train-mode output
    train_out, _ = module.apply(variables, TEST[0], train=True, mutable=["batch_stats"])
    assert not np.allclose(apply_fn(params, TEST[0]), train_out)
    obj = influx.Objective(apply_fn, influx.losses.softmax_cross_entropy, l2=1e-2)
    s = influx.influence(obj, params, TRAIN, TEST, damping=0.05, solver=DIRECT)
    ref = dense_reference(obj, params, TRAIN, TEST, kind="gnh", damping=0.05)
    np.testing.assert_allclose(s, ref, rtol=1e-9, atol=1e-12)
    with pytest.raises(KeyError, match="params"):
        iflax.from_linen(module, {"batch_stats": variables["batch_stats"]})


def test_last_layer_subset_is_the_curvature_block():
    module, variables = _linen_variables()
    apply_fn, params = iflax.from_linen(module, variables)
    obj = influx.Objective(apply_fn, influx.losses.softmax_cross_entropy, l2=1e-2)
    sub_apply, trainable = iflax.restrict(apply_fn, params, r"^Dense_1/")
    sub_obj = influx.Objective(sub_apply, influx.losses.softmax_cross_entropy, l2=1e-2)
    s = np.asarray(influx.influence(sub_obj, trainable, TRAIN, TEST, damping=0.05, solver=DIRECT))
    # dense reference on the full parameters, restricted to the Dense_1 block
    mask_tree = {k: jax.tree_util.tree_map(lambda a, k=k: np.full(a.shape, k == "Dense_1"), v)
                 for k, v in params.items()}
    sel = np.asarray(ravel_pytree(mask_tree)[0]).astype(bool)
    flat, unravel = ravel_pytree(params)
    per_loss = jax.jit(jax.jacrev(lambda fp, d: obj.per_example_loss(unravel(fp), d)))
    g, gt = np.asarray(per_loss(flat, TRAIN))[:, sel], np.asarray(per_loss(flat, TEST))[:, sel]
    jz = jax.jit(jax.jacfwd(lambda fp: apply_fn(unravel(fp), TRAIN[0])))(flat)[:, :, sel]
    p = jax.nn.softmax(apply_fn(params, TRAIN[0]))
    hz = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p)
    c = np.einsum("nkp,nkl,nlq->pq", jz, hz, jz) / N
    ref = gt @ np.linalg.solve(c + (1e-2 + 0.05) * np.eye(sel.sum()), g.T) / N
    np.testing.assert_allclose(s, ref, rtol=1e-9, atol=1e-12)
    assert ravel_pytree(trainable)[0].size == 5 * K + K
    # merge puts the subset back
    t, merge = iflax.subset(params, "Dense_1")
    t2 = jax.tree_util.tree_map(lambda a: a + 1.0, t)
    merged = merge(t2)
    np.testing.assert_array_equal(merged["Dense_0"]["kernel"], params["Dense_0"]["kernel"])
    np.testing.assert_array_equal(merged["Dense_1"]["kernel"], params["Dense_1"]["kernel"] + 1.0)
    with pytest.raises(ValueError, match="matches no parameter.*Dense_0/kernel"):
        iflax.subset(params, "conv")


def test_from_nnx():
    model = NnxNet(nnx.Rngs(0))
    model.bn.mean = nnx.BatchStat(jnp.linspace(-0.5, 0.5, 5))  # non-default running statistics
    model.bn.var = nnx.BatchStat(jnp.linspace(0.5, 2.0, 5))
    model.eval()
    apply_fn, params = iflax.from_nnx(model)
    np.testing.assert_allclose(apply_fn(params, TEST[0]), model(TEST[0]), rtol=1e-12)
    assert "mean" not in str(jax.tree_util.tree_structure(params))  # batch stats are not params
    obj = influx.Objective(apply_fn, influx.losses.softmax_cross_entropy, l2=1e-2)
    s = influx.influence(obj, params, TRAIN, TEST, damping=0.05, solver=DIRECT)
    ref = dense_reference(obj, params, TRAIN, TEST, kind="gnh", damping=0.05)
    np.testing.assert_allclose(s, ref, rtol=1e-9, atol=1e-12)
    # a subset of an nnx state (paths end in /value)
    sub_apply, trainable = iflax.restrict(apply_fn, params, r"^l2/")
    assert ravel_pytree(trainable)[0].size == 5 * K + K
    s_sub = influx.influence(influx.Objective(sub_apply, influx.losses.softmax_cross_entropy, l2=1e-2),
                             trainable, TRAIN, TEST, damping=0.05, solver=DIRECT)
    assert s_sub.shape == (N_TEST, N) and np.all(np.isfinite(s_sub))
    with pytest.raises(TypeError, match="nnx.Module"):
        iflax.from_nnx(LinenNet())


class BNState(train_state.TrainState):
    batch_stats: Any = None


def test_from_train_state():
    module, variables = _linen_variables()
    state = BNState.create(apply_fn=module.apply, params=variables["params"], tx=optax.sgd(0.1),
                           batch_stats=variables["batch_stats"])
    apply_fn, params = iflax.from_train_state(state)
    np.testing.assert_allclose(apply_fn(params, TEST[0]), module.apply(variables, TEST[0]), rtol=1e-12)
    plain = train_state.TrainState.create(
        apply_fn=nn.Dense(K).apply, params={"kernel": jnp.ones((D, K)), "bias": jnp.zeros(K)},
        tx=optax.sgd(0.1))
    f, p = iflax.from_train_state(plain)
    np.testing.assert_allclose(f(p, TEST[0]), TEST[0] @ np.ones((D, K)), rtol=1e-6)
    with pytest.raises(TypeError, match="TrainState"):
        iflax.from_train_state(object())


class FlagNet(nn.Module):
    """A linen module whose ``train`` flag has no default (BatchNorm and Dropout switch on it)."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(5, param_dtype=jnp.float64)(x)
        x = nn.BatchNorm(use_running_average=not train, param_dtype=jnp.float64)(x)
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(K, param_dtype=jnp.float64)(jnp.tanh(x))


def test_from_train_state_passes_apply_kwargs():
    module = FlagNet()
    variables = module.init(jax.random.PRNGKey(0), TRAIN[0], train=False)
    _, upd = module.apply(variables, 2.0 * TRAIN[0] - 1.0, train=True, mutable=["batch_stats"],
                          rngs={"dropout": jax.random.PRNGKey(1)})
    variables = {"params": variables["params"], "batch_stats": upd["batch_stats"]}
    state = BNState.create(apply_fn=module.apply, params=variables["params"], tx=optax.sgd(0.1),
                           batch_stats=variables["batch_stats"])
    apply_fn, params = iflax.from_train_state(state, train=False)
    np.testing.assert_allclose(apply_fn(params, TEST[0]), module.apply(variables, TEST[0], train=False),
                               rtol=1e-12)
    obj = influx.Objective(apply_fn, influx.losses.softmax_cross_entropy, l2=1e-2)
    s = influx.influence(obj, params, TRAIN, TEST, damping=0.05, solver=DIRECT)
    ref = dense_reference(obj, params, TRAIN, TEST, kind="gnh", damping=0.05)
    np.testing.assert_allclose(s, ref, rtol=1e-9, atol=1e-12)
    # the same as from_linen with the same keyword
    lin_fn, _ = iflax.from_linen(module, variables, train=False)
    np.testing.assert_allclose(apply_fn(params, TEST[0]), lin_fn(params, TEST[0]), rtol=1e-12)


class ScaledNnx(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(D, K, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x, *, scale: float = 1.0):
        return scale * self.l1(x)


def test_from_nnx_passes_call_kwargs():
    model = ScaledNnx(nnx.Rngs(0))
    apply_fn, params = iflax.from_nnx(model, scale=3.0)
    np.testing.assert_allclose(apply_fn(params, TEST[0]), model(TEST[0], scale=3.0), rtol=1e-12)
    assert not np.allclose(apply_fn(params, TEST[0]), model(TEST[0]))


def test_flax_module_as_apply_fn_says_which_adapter():
    module, variables = _linen_variables()
    loss = influx.losses.softmax_cross_entropy
    with pytest.raises(InputError, match="flax.linen module.*influx.flax.from_linen"):
        influx.Objective(module, loss)
    with pytest.raises(InputError, match=r"LinenNet.apply.*variables dict.*from_linen"):
        influx.Objective(module.apply, loss)
    with pytest.raises(InputError, match=r"LinenNet.apply.*from_linen"):  # jitted
        influx.Objective(jax.jit(module.apply), loss)
    state = BNState.create(apply_fn=module.apply, params=variables["params"], tx=optax.sgd(0.1))
    with pytest.raises(InputError, match="from_train_state"):
        influx.Objective(state.apply_fn, loss)
    with pytest.raises(TypeError, match="flax.nnx module.*influx.flax.from_nnx"):  # also a TypeError
        influx.Objective(NnxNet(nnx.Rngs(0)), loss)
    # the adapters' functions are accepted
    influx.Objective(iflax.from_linen(module, variables)[0], loss)
