"""The hand-written reverse rule of one training step (metagrad._step_rev) against JAX's own
reverse mode through the same steps: identical metagradients for SGD, momentum and Adam,
full batch and minibatch, an MLP and a conv net (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import influx
from influx import metagrad, models
from influx.attribution import _bind_measurement
from tests.conftest import make_problem

OPTS = {"sgd": optax.sgd(0.3), "momentum": optax.sgd(0.2, momentum=0.9), "adam": optax.adam(0.05)}


def _both(obj, p0, train, test, opt, steps, batch_size, segment):
    x, y = train
    n = x.shape[0]
    f = _bind_measurement(obj, None)
    k = test[0].shape[0]
    out = {}
    for rule in ("custom", "autodiff"):
        out[rule] = metagrad._metagrad_jit(p0, x, y, test, jnp.ones((n,)), jax.random.key(1), jnp.eye(k),
                                           obj=obj, opt=opt, f=f, steps=steps, batch_size=batch_size,
                                           segment=segment, rule=rule)
    return out


@pytest.mark.parametrize(("opt_name", "batch_size", "segment"),
                         [("adam", 8, 3)])  # full batch: test_metagrad's finite differences
def test_custom_step_rule_equals_autodiff(opt_name, batch_size, segment):
    obj, p0, (x, y) = make_problem("tanh_mlp", n=20)
    test = (x[:3] * 0.7 + 0.2, y[:3])
    out = _both(obj, p0, (x, y), test, OPTS[opt_name], 11, batch_size, segment)
    (_, v1, j1), (_, v2, j2) = out["custom"], out["autodiff"]
    np.testing.assert_allclose(v1, v2, rtol=1e-13)
    np.testing.assert_allclose(j1, j2, rtol=1e-10, atol=1e-12 * float(jnp.max(jnp.abs(j2))))
    assert float(jnp.max(jnp.abs(j2))) > 0


@pytest.mark.slow  # ~16 s of compilation; the MLP comparison and test_metagrad run by default
def test_custom_step_rule_on_a_conv_net():
    model = models.CNN(channels=(2,), out=3)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(10, 6, 6, 1)))
    y = jnp.asarray(rng.integers(0, 3, 10))
    p0 = models.init(model, x[:1])
    obj = influx.Objective(models.apply_fn(model), influx.losses.softmax_cross_entropy, l2=1e-3)
    out = _both(obj, p0, (x, y), (x[:2] + 0.1, y[:2]), OPTS["momentum"], 6, 4, None)
    np.testing.assert_allclose(out["custom"][2], out["autodiff"][2], rtol=1e-10,
                               atol=1e-12 * float(jnp.max(jnp.abs(out["autodiff"][2]))))
