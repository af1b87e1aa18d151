"""Measurements: the module, and class indices / labels checked against the model's outputs."""

import sys

import jax.numpy as jnp
import numpy as np
import pytest

import influx
from influx import losses, measurements, solvers
from influx.errors import InputError
from tests.conftest import make_problem

DIRECT = solvers.direct()


def _split(name, n_train=30, n_test=5):
    obj, params, (x, y) = make_problem(name, n=n_train + n_test)
    return obj, params, (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def test_one_module_behind_every_name():
    influence_module = sys.modules["influx.influence"]
    assert influx.measurements is measurements
    assert influence_module.measurements is measurements
    assert influence_module.Measurement is measurements.Measurement
    assert repr(measurements.logit(2)) == "measurements.logit(class_index=2)"
    assert repr(influx.measurements.loss()) == "measurements.loss()"


@pytest.mark.parametrize("k", [3, 1000])
def test_logit_out_of_range_raises_instead_of_clamping(k):
    obj, params, train, test = _split("tanh_mlp")  # 3 classes
    m = measurements.logit(k)
    msg = rf"logit\({k}\): class index out of range for a model with 3 outputs"
    with pytest.raises(InputError, match=msg):
        influx.influence(obj, params, train, test, solver=DIRECT, measurement=m)
    with pytest.raises(InputError, match=msg):  # label-free test set
        influx.influence(obj, params, train, (test[0], None), solver=DIRECT, measurement=m)
    with pytest.raises(InputError, match=msg):
        influx.grad_dot(obj, params, train, test, measurement=m)
    with pytest.raises(InputError, match=msg):
        influx.scoring.score(obj, params, train, test, solver=DIRECT, measurement=m)


def test_logit_last_class_matches_a_callable_measurement():
    obj, params, train, test = _split("tanh_mlp")
    s = influx.influence(obj, params, train, test, damping=0.05, solver=DIRECT,
                         measurement=measurements.logit(2))
    ref = influx.influence(obj, params, train, test, damping=0.05, solver=DIRECT,
                           measurement=lambda p, ex: obj.apply_fn(p, ex[0][None])[0, 2])
    np.testing.assert_allclose(s, ref, rtol=1e-12, atol=1e-14)
    s1 = influx.influence(obj, params, train, test, damping=0.05, solver=DIRECT,
                          measurement=measurements.logit(1))
    assert not np.allclose(s, s1)  # a different class is a different measurement


def test_logit_index_type_and_sign():
    for bad in (-1, 1.0, True, "2"):
        with pytest.raises(InputError, match="class_index"):
            measurements.logit(bad)
    assert measurements.logit(np.int64(1)).options == (("class_index", 1),)
    # values: equal and equal-hashing by their options (a shared jit cache), distinct otherwise
    assert measurements.logit(2) == measurements.logit(np.int32(2))
    assert hash(measurements.logit(2)) == hash(measurements.logit(2))
    assert measurements.logit(2) != measurements.logit(1)
    assert measurements.margin() == measurements.margin() and measurements.loss() == measurements.loss()


def test_margin_labels_checked_against_outputs():
    obj, params, train, test = _split("tanh_mlp")
    # a custom loss has no target check of its own: the margin checks its labels
    custom = influx.Objective(obj.apply_fn, lambda z, y: losses.softmax_cross_entropy(z, y), l2=obj.l2)
    bad = (test[0], test[1].at[0].set(3))
    with pytest.raises(InputError, match=r"margin\(\): test labels out of range for 3 classes"):
        influx.influence(custom, params, train, bad, solver=DIRECT, measurement=measurements.margin())
    s = influx.influence(custom, params, train, test, solver=DIRECT, measurement=measurements.margin())
    ref = influx.influence(obj, params, train, test, solver=DIRECT, measurement=measurements.margin())
    np.testing.assert_allclose(s, ref, rtol=1e-12, atol=1e-14)


def test_class_measurements_need_vector_outputs():
    obj, params, train, test = _split("regression_mlp")  # one output per example
    with pytest.raises(InputError, match="class index out of range for a model with 1 outputs"):
        influx.influence(obj, params, train, test, solver=DIRECT, measurement=measurements.logit(1))
    s = influx.influence(obj, params, train, test, solver=DIRECT, measurement=measurements.logit(0))
    assert s.shape == (5, 30) and np.all(np.isfinite(s))
    scalar_out = influx.Objective(lambda p, x: obj.apply_fn(p, x)[:, 0],
                                  lambda z, y: 0.5 * jnp.square(z - y[:, 0]))
    with pytest.raises(InputError, match="one vector of class outputs per example"):
        influx.influence(scalar_out, params, train, test, solver=DIRECT, measurement=measurements.logit(0))


def test_bad_measurements_are_input_errors():
    obj, params, train, test = _split("tanh_mlp")
    with pytest.raises(InputError, match="scalar"):
        influx.influence(obj, params, train, test, solver=DIRECT,
                         measurement=lambda p, ex: obj.apply_fn(p, ex[0][None])[0])
    with pytest.raises(TypeError, match="measurement must be None"):  # also an InputError
        influx.influence(obj, params, train, test, solver=DIRECT, measurement="loss")
    with pytest.raises(InputError, match="needs test labels"):
        influx.influence(obj, params, train, (test[0], None), solver=DIRECT,
                         measurement=measurements.margin())
