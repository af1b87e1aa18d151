"""Metagradients: replay == models.train, metagradient == finite differences of weighted
retraining (an independent run of models.train with a weighted loss), remat == plain reverse
mode, == Hessian influence for a strictly convex model trained to convergence, bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import influx
from influx import metagrad, models
from influx.errors import InputError, SolveError
from tests.conftest import make_problem

OPTIMIZERS = {
    "sgd": optax.sgd(0.3),
    "momentum": optax.sgd(0.2, momentum=0.9),
    "adam": optax.adam(0.05),
}


@dataclasses.dataclass(frozen=True)
class _WeightedLoss:
    """loss_fn(outputs, (y, w)) = w * loss(outputs, y): weighted training with models.train."""

    loss_fn: object

    def __call__(self, out, yw):
        y, w = yw
        return w * self.loss_fn(out, y)


def _problem(n=20):
    obj, p0, (x, y) = make_problem("tanh_mlp", n=n)
    test = (x[:3] * 0.7 + 0.2, y[:3])
    return obj, p0, (x, y), test


def _weighted_train(obj, p0, train, w, opt, steps, batch_size):
    x, y = train
    r = models.train(obj.apply_fn, _WeightedLoss(obj.loss_fn), p0, (x, (y, w)), l2=obj.l2, optimizer=opt,
                     steps=steps, batch_size=batch_size)
    return r.params


def _test_losses(obj, params, test):
    return np.asarray(obj.per_example_loss(params, test))


@pytest.mark.parametrize("batch_size", [None, 8])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_replay_with_all_ones_is_models_train(opt_name, batch_size):
    obj, p0, train, _ = _problem()
    opt = OPTIMIZERS[opt_name]
    ref = models.train(obj.apply_fn, obj.loss_fn, p0, train, l2=obj.l2, optimizer=opt, steps=17,
                       batch_size=batch_size, seed=3).params
    for remat in ("none", "sqrt"):
        got = metagrad.replay(obj, p0, train, optimizer=opt, steps=17, batch_size=batch_size, seed=3,
                              remat=remat)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    # a different seed is a different schedule: the comparison can fail
    if batch_size is not None:
        other = metagrad.replay(obj, p0, train, optimizer=opt, steps=17, batch_size=batch_size, seed=4)
        diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                   zip(jax.tree_util.tree_leaves(other), jax.tree_util.tree_leaves(ref)))
        assert diff > 1e-6


@pytest.mark.parametrize("batch_size", [None, 8])
@pytest.mark.parametrize("opt_name", ["sgd", "momentum", "adam"])
def test_metagradient_matches_finite_differences(opt_name, batch_size):
    obj, p0, train, test = _problem()
    opt, steps, n = OPTIMIZERS[opt_name], 20, 20
    S = influx.metagradients(obj, p0, train, test, optimizer=opt, steps=steps, batch_size=batch_size)
    assert S.shape == (3, n)
    h = 1e-4
    for m in (0, 7, 13):
        e = np.zeros(n)
        e[m] = h
        fp = _test_losses(obj, _weighted_train(obj, p0, train, 1 + e, opt, steps, batch_size), test)
        fm = _test_losses(obj, _weighted_train(obj, p0, train, 1 - e, opt, steps, batch_size), test)
        fd = -(fp - fm) / (2 * h)
        np.testing.assert_allclose(S[:, m], fd, rtol=1e-6, atol=1e-6 * np.abs(S).max())
    # examples outside every batch of the run have no effect
    if batch_size is not None:
        idx = np.asarray(metagrad.minibatch_indices(n, batch_size=batch_size, steps=steps, seed=0))
        unused = np.setdiff1d(np.arange(n), idx)
        assert np.all(S[:, unused] == 0)


def test_remat_equals_plain_reverse_mode():
    obj, p0, train, test = _problem()
    opt = OPTIMIZERS["momentum"]
    kw = dict(optimizer=opt, steps=23, batch_size=8)
    plain = influx.metagradients(obj, p0, train, test, remat="none", **kw)
    for remat in ("sqrt", 1):
        got, info = influx.metagradients(obj, p0, train, test, remat=remat, return_info=True, **kw)
        np.testing.assert_allclose(got, plain, rtol=1e-12, atol=1e-12 * np.abs(plain).max())
    assert info.segment_length == 1 and info.n_segments == 23
    assert metagrad.segment_length(23, "sqrt") == 5
    assert metagrad.segment_length(16, "sqrt") == 4
    # test measurements in several reverse passes give the same rows
    chunked = influx.metagradients(obj, p0, train, test, test_batch_size=2, **kw)
    np.testing.assert_allclose(chunked, plain, rtol=1e-12, atol=1e-12 * np.abs(plain).max())


def test_measurement_and_label_free_test():
    obj, p0, train, test = _problem()
    kw = dict(optimizer=OPTIMIZERS["sgd"], steps=10)
    S = influx.metagradients(obj, p0, train, (test[0], None), measurement=influx.measurements.logit(1), **kw)
    h, n = 1e-4, 20
    for m in (2, 11):
        e = np.zeros(n)
        e[m] = h
        out = [obj.apply_fn(_weighted_train(obj, p0, train, 1 + s * e, kw["optimizer"], 10, None),
                            test[0])[:, 1] for s in (1, -1)]
        np.testing.assert_allclose(S[:, m], -(out[0] - out[1]) / (2 * h), rtol=1e-6, atol=1e-9)


def test_convex_converged_equals_hessian_influence():
    obj, p0, train, test = _problem()
    lin, lp0, (x, y) = make_problem("logistic", n=30)
    lin = dataclasses.replace(lin, l2=0.1)
    test = (x[:4] + 0.3, y[:4])
    opt = optax.sgd(1.0)
    S, info = influx.metagradients(lin, lp0, (x, y), test, optimizer=opt, steps=300, return_info=True)
    ref = influx.influence(lin, info.params, (x, y), test, kind="hessian", damping=0.0,
                           solver=influx.solvers.direct())
    err = np.abs(S - ref).max() / np.abs(ref).max()
    assert err < 1e-12, err  # measured 3e-16 at 300 steps, 7e-10 at 100
    # too short a run is not converged: the two differ (the comparison can fail)
    short = influx.metagradients(lin, lp0, (x, y), test, optimizer=opt, steps=5)
    assert np.abs(short - ref).max() / np.abs(ref).max() > 1e-3


def test_float32_runs_and_matches_float64():
    obj, p0, train, test = _problem()
    kw = dict(optimizer=OPTIMIZERS["adam"], steps=10, batch_size=8)
    S64 = influx.metagradients(obj, p0, train, test, **kw)
    with jax.enable_x64(False):
        f32 = lambda t: jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32)
                                               if np.issubdtype(np.asarray(a).dtype, np.floating) else
                                               np.asarray(a, np.int32), t)
        S32 = influx.metagradients(obj, f32(p0), f32(train), f32(test), **kw)
    assert S32.dtype == np.float32
    np.testing.assert_allclose(S32, S64, rtol=0, atol=2e-4 * np.abs(S64).max())


def test_bad_input():
    obj, p0, train, test = _problem()
    opt = OPTIMIZERS["sgd"]
    kw = dict(optimizer=opt, steps=5)
    trained = models.train(obj.apply_fn, obj.loss_fn, p0, train, l2=obj.l2, optimizer=opt, steps=5).params
    influx.metagradients(obj, p0, train, test, params=trained, **kw)  # the right run passes
    with pytest.raises(InputError, match="does not reproduce params"):
        influx.metagradients(obj, p0, train, test, params=trained, optimizer=opt, steps=6)
    with pytest.raises(InputError, match="structure"):
        influx.metagradients(obj, p0, train, test, params={"w": 1.0}, **kw)
    with pytest.raises(InputError, match="remat"):
        influx.metagradients(obj, p0, train, test, remat="log", **kw)
    with pytest.raises(InputError, match="on_failure"):
        influx.metagradients(obj, p0, train, test, on_failure="zero", **kw)
    with pytest.raises(InputError, match="batch_size"):
        influx.metagradients(obj, p0, train, test, batch_size=0, **kw)
    with pytest.raises(InputError, match="steps"):
        influx.metagradients(obj, p0, train, test, optimizer=opt, steps=0)
    with pytest.raises(InputError, match="optimizer"):
        influx.metagradients(obj, p0, train, test, optimizer="adam", steps=5)
    bad = jax.tree_util.tree_map(lambda a: a.at[0].set(jnp.nan), p0)
    with pytest.raises(InputError, match="NaN"):
        influx.metagradients(obj, bad, train, test, **kw)


def test_non_finite_values_are_errors_or_nan_rows():
    obj, p0, train, test = _problem()
    kw = dict(optimizer=OPTIMIZERS["sgd"], steps=5)

    def f(params, ex):  # finite value, NaN gradient: sqrt at 0
        loss = obj.loss_fn(obj.apply_fn(params, ex[0][None]), ex[1][None])[0]
        return loss + jnp.sqrt(0.0 * params[0]["b"][0])

    with pytest.raises(SolveError, match="backward pass"):
        influx.metagradients(obj, p0, train, test, measurement=f, **kw)
    S, info = influx.metagradients(obj, p0, train, test, measurement=f, on_failure="nan",
                                   return_info=True, **kw)
    assert info.failed.all() and np.isnan(S).all()
    with pytest.raises(SolveError, match="diverged"):
        influx.metagradients(obj, p0, train, test, optimizer=optax.sgd(1e200), steps=30)


def test_trajectory_checkpoints_are_the_run():
    obj, p0, train, _ = _problem()
    opt = OPTIMIZERS["adam"]
    ck = metagrad.trajectory(obj, p0, train, optimizer=opt, steps=11, every=4, batch_size=8)
    assert len(ck) == 3  # after steps 4, 8 and 11
    ref = models.train(obj.apply_fn, obj.loss_fn, p0, train, l2=obj.l2, optimizer=opt, steps=11, batch_size=8)
    for a, b in zip(jax.tree_util.tree_leaves(ck[-1]), jax.tree_util.tree_leaves(ref.params)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    # full batch: checkpoint k is the run of k * every steps
    ck = metagrad.trajectory(obj, p0, train, optimizer=opt, steps=8, every=4)
    ref = models.train(obj.apply_fn, obj.loss_fn, p0, train, l2=obj.l2, optimizer=opt, steps=4).params
    for a, b in zip(jax.tree_util.tree_leaves(ck[0]), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
