"""retrain's default chunk size (1 for conv nets on the CPU) and its unvmapped one-run path:
equal to the vmapped program and to models.train with weights (float64)."""

import jax.numpy as jnp
import numpy as np
import optax

import influx
from influx import models, response
from tests.conftest import make_problem


def _cnn(n=10):
    model = models.CNN(channels=(2,), out=3)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, 6, 6, 1)))
    y = jnp.asarray(rng.integers(0, 3, n))
    obj = influx.Objective(models.apply_fn(model), influx.losses.softmax_cross_entropy, l2=1e-3)
    return model, obj, models.init(model, x[:1]), (x, y)


def test_default_chunk_size_is_one_for_conv_nets_on_cpu():
    _, obj, p0, train = _cnn()
    assert response.retrain_chunk_size(obj, p0, train) == 1
    obj, p0, train = make_problem("tanh_mlp", n=8)
    assert response.retrain_chunk_size(obj, p0, train) == 32


def test_one_run_at_a_time_equals_vmapped_and_models_train():
    model, obj, p0, (x, y) = _cnn()
    opt = optax.sgd(0.1, momentum=0.9)
    w = response.random_subsets(10, 3, alpha=0.2, seed=1).astype(float)
    w[2] = np.linspace(0.2, 1.5, 10)
    kw = dict(test=(x[:2] + 0.1, y[:2]), optimizer=opt, steps=6, batch_size=4)
    one = response.retrain(obj, p0, (x, y), w, **kw)  # default: chunk_size 1 (a conv net)
    assert one.info["chunk_size"] == 1
    vm = response.retrain(obj, p0, (x, y), w, chunk_size=2, **kw)
    np.testing.assert_allclose(one.measured, vm.measured, rtol=1e-10)
    np.testing.assert_allclose(one.delta, vm.delta, rtol=1e-8, atol=1e-14)
    ref = models.train(model, obj.loss_fn, p0, (x, y), l2=obj.l2, optimizer=opt, steps=6, batch_size=4,
                       weights=w[2]).params
    f_ref = np.asarray(obj.per_example_loss(ref, kw["test"]))
    np.testing.assert_allclose(one.measured[2], f_ref, rtol=1e-10)
    assert np.abs(one.delta).max() > 1e-6  # the subsets change the run
