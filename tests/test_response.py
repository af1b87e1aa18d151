"""Response functions against closed forms (linear least squares) and first-order theory."""

import jax

jax.config.update("jax_enable_x64", True)

import functools  # noqa: E402
import warnings  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

import influx  # noqa: E402
from influx import losses, response, solvers  # noqa: E402
from influx.errors import InputError, SolveError  # noqa: E402,F401
from tests.conftest import make_problem  # noqa: E402

N, D, L2 = 30, 4, 1e-2
NEWTON = response.newton()  # one instance: calls share compiled programs


def linear_apply(p, x):
    return x @ p["w"] + p["b"]


def linear_problem(*, n=N, big=None):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, D))
    if big is not None:
        x[0] = 0.0
        x[0, 0] = big
    w_true = rng.normal(size=(D, 1))
    y = x @ w_true + 0.3 * rng.normal(size=(n, 1))
    xt = rng.normal(size=(7, D))
    yt = xt @ w_true + 0.3 * rng.normal(size=(7, 1))
    obj = influx.Objective(linear_apply, losses.squared_error, l2=L2)
    return obj, (jnp.asarray(x), jnp.asarray(y)), (jnp.asarray(xt), jnp.asarray(yt))


def _aug(x):
    return np.hstack([np.asarray(x), np.ones((len(x), 1))])


def _unpack(theta):
    return {"w": jnp.asarray(theta[:D, None]), "b": jnp.asarray(theta[D:])}


def ridge(x, y, n_norm, l2):
    """argmin 1/n_norm sum 1/2 (a_i^T theta - y_i)^2 + l2/2 ||theta||^2 (closed form)."""
    a = _aug(x)
    m = a.T @ a + n_norm * l2 * np.eye(D + 1)
    return np.linalg.solve(m, a.T @ np.asarray(y)[:, 0])


def sherman_morrison_loo(x, y, m_idx, n_norm, l2):
    """theta without example m via a rank-one downdate of (A^T A + n_norm l2 I)^-1."""
    a = _aug(x)
    yv = np.asarray(y)[:, 0]
    minv = np.linalg.inv(a.T @ a + n_norm * l2 * np.eye(D + 1))
    rhs = a.T @ yv
    out = []
    for m in m_idx:
        am = a[m]
        u = minv @ am
        inv_m = minv + np.outer(u, u) / (1.0 - am @ u)
        out.append(inv_m @ (rhs - am * yv[m]))
    return np.stack(out)


def _test_loss(theta, test):
    xt, yt = test
    return 0.5 * (_aug(xt) @ theta - np.asarray(yt)[:, 0]) ** 2


@pytest.fixture(scope="module")
def lin():
    obj, train, test = linear_problem()
    theta_s = ridge(*train, N, L2)
    return obj, train, test, theta_s, _unpack(theta_s)


REMOVED = [0, 3, 7, 11]


@pytest.mark.parametrize("normalization", ["n", "n-1"])
def test_cold_loo_equals_sherman_morrison(lin, normalization):
    obj, train, test, theta_s, params = lin
    init = jax.tree_util.tree_map(jnp.zeros_like, params)
    n_norm = N if normalization == "n" else N - 1
    # the reference point for "n-1" is the full-data ridge with the same normalisation
    r = response.loo(obj, params, train, REMOVED, test=test, init=init, optimizer=NEWTON, steps=6,
                     normalization=normalization, tol=1e-9)
    ref = sherman_morrison_loo(*train, REMOVED, n_norm, L2)
    got = np.stack([np.concatenate([np.asarray(r.params["w"][k, :, 0]), np.asarray(r.params["b"][k])])
                    for k in range(len(REMOVED))])
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
    want = np.stack([_test_loss(t, test) - _test_loss(theta_s, test) for t in ref])
    np.testing.assert_allclose(np.asarray(r.delta), want, rtol=1e-8, atol=1e-13)
    assert np.all(np.asarray(r.converged))
    assert r.delta.shape == (len(REMOVED), 7)
    # brute-force check of the reference itself (catches a wrong closed form)
    keep = np.setdiff1d(np.arange(N), [REMOVED[1]])
    direct = ridge(train[0][keep], train[1][keep], n_norm, L2)
    np.testing.assert_allclose(ref[1], direct, rtol=1e-10)


def test_warm_equals_cold_for_convex(lin):
    obj, train, test, _, params = lin
    init = jax.tree_util.tree_map(jnp.zeros_like, params)
    cold = response.loo(obj, params, train, REMOVED, test=test, init=init, optimizer=NEWTON, steps=6,
                        tol=1e-9)
    warm = response.loo(obj, params, train, REMOVED, test=test, optimizer=NEWTON, steps=6, tol=1e-9)
    assert warm.info["start"] == "warm" and cold.info["start"] == "cold"
    np.testing.assert_allclose(np.asarray(warm.delta), np.asarray(cold.delta), rtol=1e-9, atol=1e-13)


def test_pbrf_equals_proximal_for_quadratic(lin):
    obj, train, test, _, params = lin
    prox = response.proximal(obj, params, train, REMOVED, test=test, damping=0.05, optimizer=NEWTON,
                             steps=6, tol=1e-10)
    pb = response.pbrf(obj, params, train, REMOVED, test=test, damping=0.05, optimizer=NEWTON,
                       steps=6, tol=1e-10)
    np.testing.assert_allclose(np.asarray(pb.delta), np.asarray(prox.delta), rtol=1e-9, atol=1e-14)
    # and the proximal closed form: (A^T A / N + (l2 + lam) I) theta = (A^T y - a_m y_m)/N + lam theta_s
    a = _aug(train[0])
    yv = np.asarray(train[1])[:, 0]
    theta_s = ridge(*train, N, L2)
    m = REMOVED[2]
    keep = np.setdiff1d(np.arange(N), [m])
    lhs = a[keep].T @ a[keep] / N + (L2 + 0.05) * np.eye(D + 1)
    th = np.linalg.solve(lhs, a[keep].T @ yv[keep] / N + 0.05 * theta_s)
    np.testing.assert_allclose(np.asarray(pb.params["w"][2, :, 0]), th[:D], rtol=1e-9)
    # damping = 0: proximal is warm LOO
    warm = response.loo(obj, params, train, REMOVED, test=test, optimizer=NEWTON, steps=6, tol=1e-9)
    prox0 = response.proximal(obj, params, train, REMOVED, test=test, damping=0.0, optimizer=NEWTON,
                              steps=6, tol=1e-9)
    np.testing.assert_allclose(np.asarray(prox0.delta), np.asarray(warm.delta), rtol=1e-10, atol=1e-15)


def test_linearized_equals_damped_gnh_influence(lin):
    obj, train, test, theta_s, params = lin
    lam = 0.03
    r = response.linearized(obj, params, train, REMOVED, test=test, damping=lam)
    a, at = _aug(train[0]), _aug(test[0])
    yv, ytv = np.asarray(train[1])[:, 0], np.asarray(test[1])[:, 0]
    g_m = a * (a @ theta_s - yv)[:, None]  # per-example gradients of 1/2 (a^T theta - y)^2
    g_t = at * (at @ theta_s - ytv)[:, None]
    h = a.T @ a / N + (L2 + lam) * np.eye(D + 1)
    want = (g_m[REMOVED] @ np.linalg.solve(h, g_t.T)) / N
    np.testing.assert_allclose(np.asarray(r.delta), want, rtol=1e-10, atol=1e-14)
    s = influx.influence(obj, params, train, test, kind="gnh", damping=lam, solver=solvers.direct())
    np.testing.assert_allclose(np.asarray(r.delta), np.asarray(s)[:, REMOVED].T, rtol=1e-10, atol=1e-14)


@functools.cache
def mlp_problem():
    """One shared (obj, params, train, test) so tests here and in test_gaps share compilations.

    The parameters are untrained: the first-order claim holds at any theta_s (the Bregman
    terms have zero gradient at theta_s whether or not it minimises J).
    """
    obj, params, data = make_problem("regression_mlp", n=24)
    test = make_problem("regression_mlp", n=6, seed=1)[2]
    return obj, params, data, test


@pytest.fixture(scope="module")
def mlp():
    return mlp_problem()


def test_pbrf_first_order_matches_linearized(mlp):
    """PBRF with removal weight t * (-1/N) -> t * linearised prediction as t -> 0."""
    obj, params, train, test = mlp
    n = train[0].shape[0]
    lam = 0.05
    removed = [1, 5, 9]
    lin = np.asarray(response.linearized(obj, params, train, removed, test=test, damping=lam).delta)
    errs = []
    for t in (1e-1, 1e-2):
        r = response.pbrf(obj, params, train, removed, test=test, damping=lam, optimizer=NEWTON,
                          steps=30, epsilon=-t / n, tol=1e-9, keep_params=False)
        assert np.all(np.asarray(r.converged)), r.grad_norm
        errs.append(np.max(np.abs(np.asarray(r.delta) / t - lin)))
    scale = np.max(np.abs(lin))
    assert errs[1] < 0.02 * scale  # first order: small at t = 0.01
    assert errs[1] < 0.2 * errs[0]  # and the error shrinks ~linearly with t


def test_vmapped_equals_loop_of_single_solves(mlp):
    obj, params, train, test = mlp
    opt = optax.adam(1e-2)
    removed = [0, 2, 4, 6, 8]
    kw = dict(test=test, damping=0.01, optimizer=opt, steps=25, warn=False)
    batched = response.pbrf(obj, params, train, removed, chunk_size=2, **kw)  # 2 chunks + remainder
    loop = [response.pbrf(obj, params, train, [m], chunk_size=1, **kw) for m in removed]
    np.testing.assert_allclose(np.asarray(batched.delta),
                               np.concatenate([np.asarray(r.delta) for r in loop]), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(np.asarray(batched.grad_norm),
                               np.concatenate([np.asarray(r.grad_norm) for r in loop]), rtol=1e-9)


def test_minibatch_cold_loo_same_data_order(lin):
    """Cold LOO with minibatches: epsilon = 0 reproduces the original training run exactly."""
    obj, train, test, _, params = lin
    from influx import models

    init = jax.tree_util.tree_map(jnp.zeros_like, params)
    opt = optax.sgd(0.05)
    trained = models.train(obj.apply_fn, obj.loss_fn, init, train, l2=L2, optimizer=opt, steps=60,
                           batch_size=8, seed=3).params
    r = response.loo(obj, trained, train, [0, 1], test=test, init=init, optimizer=opt, steps=60,
                     batch_size=8, seed=3, epsilon=0.0, warn=False)
    np.testing.assert_allclose(np.asarray(r.delta), 0.0, atol=1e-12)
    rb = response.loo(obj, trained, train, [0, 1], test=test, init=init, optimizer=opt, steps=60,
                      batch_size=8, seed=3, baseline="retrain", warn=False)
    assert np.all(np.isfinite(np.asarray(rb.delta)))


def test_nonfinite_solves_are_masked_and_reported():
    """SGD diverges unless the one large-norm example is removed: only that solve survives."""
    obj, train, test = linear_problem(big=30.0)
    a = _aug(train[0])
    keep = np.arange(1, N)
    lam_full = np.linalg.eigvalsh(a.T @ a / N)[-1] + L2
    lam_rest = np.linalg.eigvalsh(a[keep].T @ a[keep] / N)[-1] + L2
    lr = 6.0 / lam_full
    assert lr * lam_rest < 1.5
    params = _unpack(ridge(*train, N, L2))
    kw = dict(test=test, optimizer=optax.sgd(lr), steps=600)
    with pytest.raises(SolveError, match=r"non-finite for 2 of 3 .*\[1, 2\].*on_failure='nan'"):
        response.loo(obj, params, train, [0, 1, 2], **kw)  # the default policy: raise, naming the rows
    with pytest.warns(RuntimeWarning, match="non-finite"):
        r = response.loo(obj, params, train, [0, 1, 2], on_failure="nan", **kw)
    status = np.asarray(r.status)
    assert status[0] == solvers.Status.CONVERGED
    assert np.all(status[1:] == solvers.Status.NONFINITE)
    assert r.failed.tolist() == [1, 2]
    assert np.all(np.isfinite(np.asarray(r.delta[0]))) and np.all(np.isnan(np.asarray(r.delta[1:])))
    assert np.all(np.isfinite(np.asarray(r.params["w"])))  # last finite iterate kept


def test_not_converged_warns(lin):
    obj, train, test, _, params = lin
    with pytest.warns(RuntimeWarning, match="did not reach"):
        r = response.pbrf(obj, params, train, [0], test=test, damping=0.0, optimizer=optax.sgd(1e-6),
                          steps=1, tol=1e-300)
    assert not bool(r.converged[0]) and int(r.status[0]) == solvers.Status.MAX_STEPS


def test_observe_and_keep_params(lin):
    obj, train, test, _, params = lin
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = response.pbrf(obj, params, train, [0, 1], test=test, damping=0.05, optimizer=NEWTON, steps=6,
                          tol=1e-10, keep_params=False, observe=lambda p: p["b"])
    assert r.params is None and r.observed.shape == (2, 1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(removed=[0, 30]), "out of range"),
        (dict(removed=[-1]), "out of range"),
        (dict(removed=[2, 2]), "duplicated"),
        (dict(removed=[]), "empty"),
        (dict(steps=0), "steps"),
        (dict(damping=-1.0), "damping"),
        (dict(test="no labels"), "test"),
        (dict(batch_size=5, optimizer=NEWTON), "full batch"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_input(lin, kwargs, match):
    obj, train, test, _, params = lin
    kw = dict(removed=[0], test=test, damping=0.1, optimizer=NEWTON, steps=3)
    kw.update(kwargs)
    if kw["test"] == "no labels":
        kw["test"] = (test[0], None)
    removed = kw.pop("removed")
    with pytest.raises((ValueError, TypeError), match=match):
        response.pbrf(obj, params, train, removed, **kw)


def test_bad_input_loo_and_linearized(lin):
    obj, train, test, _, params = lin
    with pytest.raises(ValueError, match="optimizer"):
        response.loo(obj, params, train, [0], test=test, init=params)  # cold start needs the optimizer
    with pytest.raises(ValueError, match="damping"):
        response.linearized(obj, params, train, [0], test=test, damping=-0.1)
    with pytest.raises(ValueError, match="out of range"):
        response.linearized(obj, params, train, [N], test=test, damping=0.1)
    with pytest.raises(ValueError, match="labels"):
        response.linearized(obj, params, train, [0], test=(test[0], None), damping=0.1)
    with pytest.raises(TypeError, match="init"):
        response.loo(obj, params, train, [0], test=test, init={"w": params["w"]}, optimizer=NEWTON)


@pytest.mark.slow
def test_lbfgs_inner_solver_matches_newton(lin):
    """optax.lbfgs (driven by value_and_grad_from_state) reaches the same PBRF as Newton-CG."""
    obj, train, test, _, params = lin
    kw = dict(test=test, damping=0.05, tol=1e-10)
    a = response.pbrf(obj, params, train, REMOVED, optimizer=optax.lbfgs(), steps=60, **kw)
    b = response.pbrf(obj, params, train, REMOVED, optimizer=NEWTON, steps=6, **kw)
    assert np.all(np.asarray(a.converged))
    np.testing.assert_allclose(np.asarray(a.delta), np.asarray(b.delta), rtol=1e-7, atol=1e-13)


def test_early_exit_equals_running_all_steps(mlp):
    """Full batch: the chunk's loop stops once every example is frozen; each example's result
    is that of its own single solve (an exit at the first converged example would leave the
    others unconverged), and more steps change nothing."""
    obj, params, train, test = mlp
    removed = [0, 3, 5, 7, 11]
    kw = dict(test=test, damping=0.01, optimizer=NEWTON, tol=1e-9)
    batched = response.pbrf(obj, params, train, removed, steps=40, chunk_size=5, **kw)
    more = response.pbrf(obj, params, train, removed, steps=200, chunk_size=5, **kw)
    singles = [response.pbrf(obj, params, train, [m], steps=40, chunk_size=1, **kw) for m in removed]
    taken = np.asarray(batched.steps_taken)
    assert np.all(np.asarray(batched.converged))
    assert np.all(taken < 40) and np.all(taken >= 1)
    assert len(set(taken.tolist())) > 1  # the examples converge at different steps
    np.testing.assert_array_equal(taken, np.asarray(more.steps_taken))
    single_delta = np.concatenate([np.asarray(r.delta) for r in singles])
    np.testing.assert_allclose(np.asarray(batched.delta), single_delta, atol=1e-7)  # ~ tol / damping
    np.testing.assert_array_equal(np.asarray(batched.delta), np.asarray(more.delta))


@pytest.mark.parametrize("batch_size", [None, 6])
def test_replicated_inputs_equal_shared_inputs(mlp, monkeypatch, batch_size):
    """Per-example copies of the inputs (the CPU layout fix) change nothing but speed."""
    obj, params, train, test = mlp
    removed = [1, 2, 4, 8, 9]
    kw = dict(test=test, damping=0.01, optimizer=optax.adam(1e-2), steps=15, chunk_size=2,
              batch_size=batch_size, warn=False)
    assert response._replicate_ok(train[0], 2, 1.0, response._REPLICATE_BYTES)  # on by default here
    rep = response.pbrf(obj, params, train, removed, **kw)
    monkeypatch.setattr(response, "_REPLICATE_BYTES", 0)
    assert not response._replicate_ok(train[0], 2, 1.0, response._REPLICATE_BYTES)
    shared = response.pbrf(obj, params, train, removed, **kw)
    np.testing.assert_allclose(np.asarray(rep.delta), np.asarray(shared.delta), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(np.asarray(rep.grad_norm), np.asarray(shared.grad_norm), rtol=1e-9)
    assert np.all(np.asarray(rep.steps_taken) == 15)


# ------------------------------------------------------------------ subset retraining
RT_OPT = optax.sgd(0.05, momentum=0.9)  # one instance: calls share compiled programs


def _single_run(obj, init, train, test, w, **kw):
    """One models.train retraining with weights w, measured on the test losses."""
    from influx import models

    p = models.train(obj.apply_fn, obj.loss_fn, init, train, l2=obj.l2, optimizer=RT_OPT, weights=w,
                     **kw).params
    return np.asarray(obj.per_example_loss(p, test)), p


@pytest.mark.parametrize("batch_size", [None, 8])
def test_retrain_vmapped_equals_loop_of_single_trainings(mlp, batch_size):
    obj, init, train, test = mlp
    n = train[0].shape[0]
    masks = response.random_subsets(n, 4, alpha=0.25, seed=1)
    real = np.random.default_rng(0).uniform(0.0, 2.0, size=(1, n))  # real weights work too
    w = np.concatenate([masks, real])
    kw = dict(steps=20, batch_size=batch_size, seed=3)
    r = response.retrain(obj, init, train, w, test=test, optimizer=RT_OPT, chunk_size=2, keep_params=True,
                         **kw)
    base, _ = _single_run(obj, init, train, test, None, **kw)
    loop = np.stack([_single_run(obj, init, train, test, row, **kw)[0] for row in w])
    assert r.delta.shape == (5, test[0].shape[0]) and r.finite.all() and r.failed.size == 0
    np.testing.assert_allclose(r.baseline, base, rtol=1e-10)
    np.testing.assert_allclose(r.measured, loop, rtol=1e-10)
    np.testing.assert_allclose(r.delta, loop - base[None], rtol=1e-8, atol=1e-13)
    assert np.all(np.abs(r.delta) > 0)  # removing examples changes the test losses
    _, p_last = _single_run(obj, init, train, test, w[-1], **kw)
    np.testing.assert_allclose(np.asarray(r.params[0]["w"][-1]), np.asarray(p_last[0]["w"]), rtol=1e-10)


def test_retrain_all_ones_replays_the_original_training(mlp):
    from influx import models

    obj, init, train, test = mlp
    n = train[0].shape[0]
    kw = dict(optimizer=RT_OPT, steps=20, batch_size=8, seed=3)
    params = models.train(obj.apply_fn, obj.loss_fn, init, train, l2=obj.l2, **kw).params
    r = response.retrain(obj, init, train, np.ones((2, n), bool), test=test, keep_params=True, **kw)
    np.testing.assert_allclose(np.asarray(r.delta), 0.0, atol=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(r.params)):
        np.testing.assert_allclose(np.asarray(b[0]), np.asarray(a), rtol=1e-10, atol=1e-14)
    assert response.check_replay(obj, init, train, params, **kw) <= 1e-12
    with pytest.raises(InputError, match=r"does not reproduce params: leaf \[\d\]\['(w|b)'\] differs by"):
        response.check_replay(obj, init, train, params, **{**kw, "seed": 4})
    with pytest.raises(InputError, match="does not reproduce"):
        response.check_replay(obj, init, train, params, **{**kw, "steps": 19})


def test_random_subsets():
    s = response.random_subsets(50, 7, alpha=0.1, seed=2)
    assert s.shape == (7, 50) and s.dtype == bool
    assert np.all(s.sum(axis=1) == 45)
    np.testing.assert_array_equal(s, response.random_subsets(50, 7, alpha=0.1, seed=2))
    assert not np.array_equal(s, response.random_subsets(50, 7, alpha=0.1, seed=3))
    assert len({tuple(row) for row in s}) == 7  # independent rows
    for alpha in (0.0, 1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(InputError, match="alpha"):
            response.random_subsets(50, 7, alpha=alpha)


@pytest.mark.parametrize(
    "weights, match",
    [
        (np.ones((3, 5)), r"shape \(M, 24\)"),
        (np.ones(24), r"shape \(M, 24\)"),
        (np.full((2, 24), -1.0), ">= 0"),
        (np.full((2, 24), np.nan), "finite"),
        (np.zeros((2, 24)), "weight 0"),
    ],
)
def test_retrain_bad_input(mlp, weights, match):
    obj, init, train, test = mlp
    with pytest.raises(InputError, match=match):
        response.retrain(obj, init, train, weights, test=test, optimizer=RT_OPT, steps=2)


def test_retrain_bad_options(mlp, tmp_path):
    obj, init, train, test = mlp
    w = np.ones((2, 24))
    kw = dict(test=test, optimizer=RT_OPT, steps=2)
    for bad, match in ((dict(steps=0), "steps"), (dict(batch_size=25), "batch_size"),
                       (dict(on_failure="zero"), "on_failure"), (dict(chunk_size=0), "chunk_size"),
                       (dict(keep_params=True, out_dir=tmp_path / "d"), "keep_params")):
        with pytest.raises(InputError, match=match):
            response.retrain(obj, init, train, w, **{**kw, **bad})
    assert not (tmp_path / "d").exists()  # refused before any side effect


def test_retrain_nonfinite_rows_raise_or_are_nan(mlp):
    obj, init, train, test = mlp
    n = train[0].shape[0]
    w = np.ones((3, n))
    w[1] = 1e8  # this run diverges
    kw = dict(test=test, optimizer=optax.sgd(0.05), steps=30)
    with pytest.raises(SolveError, match=r"1 of 3 runs became non-finite \(weight rows \[1\]"):
        response.retrain(obj, init, train, w, **kw)
    r = response.retrain(obj, init, train, w, on_failure="nan", **kw)
    assert r.failed.tolist() == [1] and r.finite.tolist() == [True, False, True]
    assert np.all(np.isnan(r.delta[1])) and np.all(np.isfinite(r.delta[[0, 2]]))


def test_retrain_resumes_identically_after_interruption(mlp, tmp_path, monkeypatch):
    from influx import _store

    obj, init, train, test = mlp
    n = train[0].shape[0]
    w = response.random_subsets(n, 6, alpha=0.2, seed=0)
    kw = dict(test=test, optimizer=RT_OPT, steps=10, batch_size=8, chunk_size=2)
    full = response.retrain(obj, init, train, w, out_dir=tmp_path / "a", **kw)
    mem = response.retrain(obj, init, train, w, **kw)
    np.testing.assert_allclose(full.delta, mem.delta, rtol=1e-10, atol=1e-14)

    real_commit, calls = _store.Store.commit, []

    def flaky(self, stop, block=None, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after two committed chunks
        calls.append(stop)
        return real_commit(self, stop, block, **k)

    monkeypatch.setattr(_store.Store, "commit", flaky)
    with pytest.raises(KeyboardInterrupt):
        response.retrain(obj, init, train, w, out_dir=tmp_path / "b", **kw)
    monkeypatch.setattr(_store.Store, "commit", real_commit)
    resumed = response.retrain(obj, init, train, w, out_dir=tmp_path / "b", **kw)
    assert resumed.info["resumed_rows"] == 4
    np.testing.assert_array_equal(resumed.delta, full.delta)
    np.testing.assert_array_equal(resumed.loss, full.loss)
    again = response.retrain(obj, init, train, w, out_dir=tmp_path / "b", **kw)  # complete: nothing to do
    assert again.info["resumed_rows"] == 7
    np.testing.assert_array_equal(again.delta, full.delta)
    with pytest.raises(ValueError, match="optimizer"):  # other inputs: refused, naming what differs
        response.retrain(obj, init, train, w, out_dir=tmp_path / "b", **{**kw, "optimizer": optax.sgd(0.01)})


def test_linearized_failed_solves_raise_or_are_nan_columns(mlp):
    obj, params, train, test = mlp
    rough = solvers.cg(tol=1e-12, max_steps=1)
    with pytest.raises(SolveError, match=r"linearized: the solve of \d+ of 6 test points did not converge"):
        response.linearized(obj, params, train, [0, 1], test=test, damping=0.01, solver=rough)
    with pytest.warns(RuntimeWarning, match="NaN"):
        r = response.linearized(obj, params, train, [0, 1], test=test, damping=0.01, solver=rough,
                                on_failure="nan")
    bad = r.info["failed_test"]
    assert bad.size > 0 and np.all(np.isnan(np.asarray(r.delta)[:, bad]))
    assert not np.any(np.asarray(r.delta) == 0.0)  # a failed solve is never a 0 score
    assert np.all(np.asarray(r.status) == solvers.Status.MAX_STEPS)


def test_response_options_value_and_validation():
    a = response.ResponseOptions(steps=5, damping=0.1)
    b = response.ResponseOptions(steps=5, damping=0.1)
    assert a == b and hash(a) == hash(b) and a.optimizer is response.DEFAULT_OPTIMIZER
    assert a.replace(damping=0.2) != a
    for bad, match in ((dict(damping=-1.0), "damping"), (dict(steps=0), "steps"),
                       (dict(on_failure="zero"), "on_failure"), (dict(normalization="x"), "normalization"),
                       (dict(batch_size=4), "full batch"), (dict(epsilon=float("inf")), "epsilon"),
                       (dict(optimizer=3), "optimizer"), (dict(chunk_size=True), "chunk_size")):
        with pytest.raises(InputError, match=match):
            response.ResponseOptions(**bad)


def test_respond_with_options_equals_keyword_form(lin):
    obj, train, test, _, params = lin
    opts = response.ResponseOptions(optimizer=NEWTON, steps=6, damping=0.05, tol=1e-10, warn=False)
    a = response.respond("pbrf", obj, params, train, [0, 3], test=test, options=opts)
    b = response.pbrf(obj, params, train, [0, 3], test=test, damping=0.05, optimizer=NEWTON, steps=6,
                      tol=1e-10, warn=False)
    np.testing.assert_array_equal(np.asarray(a.delta), np.asarray(b.delta))
    assert a.info["options"] == opts
    with pytest.raises(InputError, match="damping"):
        response.respond("loo", obj, params, train, [0], test=test, options=opts)


def test_failed_baseline_retraining_fails_every_row():
    """baseline='retrain': every delta depends on the full-data run; when it diverges, no row is valid."""
    obj, train, test = linear_problem(big=30.0)
    a = _aug(train[0])
    lr = 6.0 / (np.linalg.eigvalsh(a.T @ a / N)[-1] + L2)  # the full-data run diverges, without 0 it does not
    params = _unpack(ridge(*train, N, L2))
    init = jax.tree_util.tree_map(jnp.zeros_like, params)
    kw = dict(test=test, init=init, optimizer=optax.sgd(lr), steps=300, baseline="retrain", warn=False)
    with pytest.raises(SolveError, match="baseline retraining"):
        response.loo(obj, params, train, [0, 1], **kw)
    r = response.loo(obj, params, train, [0, 1], on_failure="nan", **kw)
    assert np.all(np.isnan(np.asarray(r.delta))) and r.failed.tolist() == [0, 1]
    assert np.all(np.asarray(r.status) == solvers.Status.NONFINITE)


def test_second_identical_call_compiles_nothing(lin):
    obj, train, test, _, params = lin
    kw = dict(test=test, damping=0.05, optimizer=NEWTON, steps=4, tol=1e-10, warn=False)
    response.pbrf(obj, params, train, [0, 3], **kw)
    before = response._run._cache_size()
    response.pbrf(obj, params, train, [0, 3], **{**kw, "tol": 1e-9, "damping": 0.1})  # traced numbers only
    assert response._run._cache_size() == before
