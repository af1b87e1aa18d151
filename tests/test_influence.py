"""Influence scores against dense float64 references and closed forms."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import influx
from influx import solvers
from influx.attribution import choose_method, default_solver, forward_flops
from influx.errors import InputError, SolveError
from influx.solvers._base import Solution, Solver, Status
from tests.conftest import make_problem

DIRECT = solvers.direct()
EIGH = solvers.direct(method="eigh")


def _split(name, n_train=30, n_test=6, seed=0):
    obj, params, (x, y) = make_problem(name, n=n_train + n_test, seed=seed)
    return obj, params, (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


_PROBLEMS = {}


def problem(name):
    if name not in _PROBLEMS:
        _PROBLEMS[name] = _split(name)
    return _PROBLEMS[name]


@functools.cache
def _reference_fns(obj, unravel):
    """Jitted explicit Jacobians and Hessians (cached per problem: compiled once)."""

    def per_loss(fp, data):
        return obj.per_example_loss(unravel(fp), data)

    def jz(fp, x):
        return jax.jacfwd(lambda q: obj.apply_fn(unravel(q), x))(fp)  # (N, K, P)

    hz = jax.vmap(jax.hessian(lambda zi, yi: obj.loss_fn(zi[None], yi[None])[0]))
    hess = jax.hessian(lambda fp, data: jnp.mean(per_loss(fp, data)))
    return (jax.jit(jax.jacrev(per_loss)), jax.jit(jz), jax.jit(hz), jax.jit(hess))


def dense_reference(obj, params, train, test, *, kind, damping, test_grads=None):
    """(1/N) G_test (C + (l2 + damping) I)^-1 G_train^T from explicit Jacobians / jax.hessian."""
    flat, unravel = ravel_pytree(params)
    n = train[1].shape[0]
    jac, jz_fn, hz_fn, hess = _reference_fns(obj, _UNRAVEL.setdefault(id(params), unravel))
    g = np.asarray(jac(flat, train))
    gt = np.asarray(jac(flat, test)) if test_grads is None else np.asarray(test_grads)
    if kind == "hessian":
        c = hess(flat, train)
    else:
        x, y = train
        jz = jz_fn(flat, x)
        hz = hz_fn(obj.apply_fn(params, x), y)
        c = jnp.einsum("nkp,nkl,nlq->pq", jz, hz, jz) / n
    a = np.asarray(c) + (obj.l2 + damping) * np.eye(flat.size)
    return gt @ np.linalg.solve(a, g.T) / n


_UNRAVEL = {}


@pytest.mark.parametrize("name,kind", [("tanh_mlp", "gnh"), ("tanh_mlp", "hessian"),
                                       ("regression_mlp", "hessian"),
                                       pytest.param("cnn", "gnh", marks=pytest.mark.slow)])
def test_matches_dense_reference_both_paths(name, kind):
    obj, params, train, test = problem(name)
    damping = 0.05 if kind == "gnh" else 1.0  # untrained nets: the Hessian is indefinite
    ref = dense_reference(obj, params, train, test, kind=kind, damping=damping)
    s_jvp = influx.influence(obj, params, train, test, kind=kind, damping=damping, solver=DIRECT,
                             method="jvp", chunk_size=8)  # several chunks, a partial last one
    s_pe = influx.influence(obj, params, train, test, kind=kind, damping=damping, solver=DIRECT,
                            method="per_example", chunk_size=8)
    assert s_jvp.shape == (test[1].shape[0], train[1].shape[0])
    np.testing.assert_allclose(s_jvp, ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s_pe, ref, rtol=1e-9, atol=1e-12)


def test_cg_default_and_info():
    obj, params, train, test = problem("tanh_mlp")
    ref = dense_reference(obj, params, train, test, kind="gnh", damping=0.05)
    s, info = influx.influence(obj, params, train, test, damping=0.05,
                               solver=solvers.cg(tol=1e-12, max_steps=500), return_info=True)
    np.testing.assert_allclose(s, ref, rtol=1e-7, atol=1e-10)
    assert info.method == "jvp" and info.n_train == 30 and info.n_test == 6
    assert info.converged.shape == (6,) and info.converged.all()


@pytest.mark.parametrize("which", ["margin", "logit"])
def test_measurements(which):
    obj, params, train, test = problem("tanh_mlp")
    flat, unravel = ravel_pytree(params)

    def meas(fp, x, y):
        z = obj.apply_fn(unravel(fp), x[None])[0]
        if which == "logit":
            return z[2]
        return z[y] - jnp.max(jnp.where(jnp.arange(3) == y, -jnp.inf, z))

    gt = jax.jit(jax.vmap(jax.grad(meas), in_axes=(None, 0, 0)))(flat, *test)
    ref = dense_reference(obj, params, train, test, kind="gnh", damping=0.05, test_grads=gt)
    m = influx.measurements.margin() if which == "margin" else influx.measurements.logit(2)
    s = influx.influence(obj, params, train, test, damping=0.05, solver=DIRECT, measurement=m)
    np.testing.assert_allclose(s, ref, rtol=1e-9, atol=1e-12)
    # any callable f(params, (x, y)) -> scalar
    if which == "logit":  # label-free: the test set may come without labels
        s_nolabel = influx.influence(obj, params, train, (test[0], None), damping=0.05, solver=DIRECT,
                                     measurement=m)
        np.testing.assert_allclose(s_nolabel, ref, rtol=1e-9, atol=1e-12)
    else:
        with pytest.raises(ValueError, match="needs test labels"):
            influx.influence(obj, params, train, (test[0], None), solver=DIRECT, measurement=m)
    custom = lambda p, ex: meas(ravel_pytree(p)[0], *ex)
    s2 = influx.influence(obj, params, train, test, damping=0.05, solver=DIRECT, measurement=custom)
    np.testing.assert_allclose(s2, ref, rtol=1e-9, atol=1e-12)


def _mock(inner, name="mock", status=Status.CONVERGED):
    """A solver without a special self-influence path (forces the per-example solves)."""

    def apply(state, op, b):
        sol = inner.apply(state, op, b)
        st = jnp.asarray(status)
        return Solution(sol.x, sol.residual_norm, sol.iterations, st == Status.CONVERGED, st, {})

    return Solver(name, inner.prepare, apply, {})


# arnoldi at rank 8 is far from A^-1 (relative residuals up to ~2): tol=10 accepts it, the test is
# about the consistency of the closed-form self-influence with the pairwise scores
@pytest.mark.parametrize("solver", [DIRECT, EIGH, _mock(DIRECT), solvers.arnoldi(rank=8, tol=10.0),
                                    solvers.arnoldi(rank=8, complement=True, tol=10.0)],
                         ids=["cholesky", "eigh", "per-example-solves", "arnoldi",
                              "arnoldi-complement"])
def test_self_influence_is_diagonal_of_pairwise(solver):
    obj, params, train, _ = problem("tanh_mlp")
    pair = influx.influence(obj, params, train, train, damping=0.05, solver=solver)
    s = influx.self_influence(obj, params, train, damping=0.05, solver=solver, chunk_size=7)
    assert s.shape == (30,)
    np.testing.assert_allclose(s, np.diag(pair), rtol=1e-8, atol=1e-12)
    assert np.all(np.asarray(s) > 0)


def test_self_influence_arnoldi_full_rank_is_exact():
    obj, params, train, _ = problem("logistic")  # P = 18
    exact = influx.self_influence(obj, params, train, damping=0.05, solver=DIRECT)
    low = influx.self_influence(obj, params, train, damping=0.05,
                                solver=solvers.arnoldi(rank=18, iterations=18))
    np.testing.assert_allclose(low, exact, rtol=1e-6)


def test_failed_solve_raises_by_default_and_gives_nan_rows_on_request():
    obj, params, train, test = problem("logistic")
    bad = _mock(DIRECT, status=Status.MAX_STEPS)
    with pytest.raises(SolveError, match="6 of 6 solves did not converge.*worst residual.*on_failure='nan'"):
        influx.influence(obj, params, train, test, solver=bad)
    s, info = influx.influence(obj, params, train, test, solver=bad, on_failure="nan", return_info=True)
    assert np.all(np.isnan(np.asarray(s))) and np.all(np.asarray(info.status) == Status.MAX_STEPS)
    with pytest.warns(RuntimeWarning, match="did not converge.*worst residual"):
        s = influx.influence(obj, params, train, test, solver=bad, on_failure="warn")
    assert np.all(np.isnan(np.asarray(s)))
    with pytest.raises(SolveError, match="did not converge"):
        influx.group_influence(obj, params, train, test, np.arange(30) % 3, solver=bad)
    g = influx.group_influence(obj, params, train, test, np.arange(30) % 3, solver=bad, on_failure="nan")
    assert np.all(np.isnan(np.asarray(g)))
    with pytest.raises(SolveError, match="self_influence.*did not converge"):
        influx.self_influence(obj, params, train, solver=bad)
    v = influx.self_influence(obj, params, train, solver=bad, on_failure="nan")
    assert np.all(np.isnan(np.asarray(v)))
    with pytest.raises(InputError, match="on_failure must be one of"):
        influx.influence(obj, params, train, test, solver=DIRECT, on_failure="zero")


def test_keep_policy_keeps_stopped_short_rows_and_masks_other_failures():
    """on_failure='keep': a solve that ran out of steps keeps its (finite) answer, exactly the
    solver's iterate; any other failure is NaN, never 0."""
    obj, params, train, test = problem("logistic")
    short = solvers.cg(tol=1e-14, max_steps=2)
    s, info = influx.influence(obj, params, train, test, solver=short, damping=1e-2, on_failure="keep",
                               return_info=True)
    assert np.all(np.asarray(info.status) == Status.MAX_STEPS)
    ref = np.asarray(influx.influence(obj, params, train, test, damping=1e-2, solver=DIRECT))
    s = np.asarray(s)
    assert np.all(np.isfinite(s)) and np.abs(s).min() > 0
    assert 1e-6 < np.abs(s - ref).max() / np.abs(ref).max() < 1.0  # an approximate answer, not the exact one
    bad = _mock(DIRECT, status=Status.NEGATIVE_CURVATURE)
    s = influx.influence(obj, params, train, test, solver=bad, on_failure="keep")
    assert np.all(np.isnan(np.asarray(s)))


def _nonconvex():
    obj, params, train, test = problem("relu_mlp")
    return influx.Objective(obj.apply_fn, obj.loss_fn, l2=0.0), params, train, test


@pytest.mark.parametrize("solver", [solvers.cg(tol=1e-10), solvers.cg(tol=1e-10, block=True),
                                    solvers.direct(raise_on_failure=False)],
                         ids=["cg", "block-cg", "direct-no-raise"])
def test_indefinite_hessian_at_damping_0_is_an_error_or_nan_never_zero(solver):
    """damping 0 on a non-convex net: CG meets negative curvature, Cholesky fails. Before, the
    failed rows came back as 0.0 with a warning."""
    obj, params, train, test = _nonconvex()
    with pytest.raises(SolveError, match="negative curvature|not positive definite"):
        influx.influence(obj, params, train, test, kind="hessian", damping=0.0, solver=solver)
    s, info = influx.influence(obj, params, train, test, kind="hessian", damping=0.0, solver=solver,
                               on_failure="nan", return_info=True)
    s = np.asarray(s)
    failed = np.asarray(info.status) != Status.CONVERGED
    assert failed.any()
    assert np.all(np.isnan(s[failed])) and np.all(np.isfinite(s[~failed]))
    assert not np.any(s == 0.0)


def test_singular_gnh_cg_fails_loudly():
    """l2 = damping = 0, more parameters than examples: the GNH is singular and the test
    gradients are not in its range, so CG cannot reach its tolerance (it stagnates)."""
    obj, params, (x, y), test = problem("tanh_mlp")
    obj = influx.Objective(obj.apply_fn, obj.loss_fn, l2=0.0)
    train = (x[:3], y[:3])  # P = 51 > 3 examples x 3 outputs
    solver = solvers.cg(tol=1e-10, max_steps=200)
    with pytest.raises(SolveError, match="did not converge"):
        influx.influence(obj, params, train, test, damping=0.0, solver=solver)
    s, info = influx.influence(obj, params, train, test, damping=0.0, solver=solver, on_failure="nan",
                               return_info=True)
    failed = np.asarray(info.status) != Status.CONVERGED
    assert failed.all() and np.all(np.isnan(np.asarray(s)))


def test_second_identical_call_compiles_nothing():
    """Solvers hash by their options: an identical call reuses every compiled program."""
    import logging

    obj, params, train, test = problem("logistic")
    assert solvers.cg(tol=1e-4) == solvers.cg(tol=1e-4)
    assert hash(solvers.cg(tol=1e-4)) == hash(solvers.cg(tol=1e-4))
    assert solvers.cg(tol=1e-4) != solvers.cg(tol=1e-5)
    assert default_solver(params) == default_solver(params)
    assert repr(solvers.cg(tol=1e-4)).startswith("influx.solvers.cg(tol=0.0001")

    class Count(logging.Handler):
        n = 0

        def emit(self, record):
            if "Compiling" in record.getMessage():
                Count.n += 1

    influx.influence(obj, params, train, test, damping=1e-3)  # warm
    influx.self_influence(obj, params, train, damping=1e-3, solver=solvers.cg(tol=1e-8))
    handler = Count()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            influx.influence(obj, params, train, test, damping=1e-3)
            influx.self_influence(obj, params, train, damping=2e-3, solver=solvers.cg(tol=1e-8))
        assert Count.n == 0
        with jax.log_compiles(True):  # the counter sees compilations: a new chunk size compiles
            influx.influence(obj, params, train, test, damping=1e-3, chunk_size=11)
        assert Count.n > 0
    finally:
        logger.removeHandler(handler)


def test_half_precision_params_are_upcast_with_a_warning():
    obj, params, train, test = problem("logistic")
    ref = np.asarray(influx.influence(obj, params, train, test, solver=DIRECT))
    for dt in (jnp.bfloat16, jnp.float16):
        low = jax.tree_util.tree_map(lambda a, dt=dt: a.astype(dt), params)
        up = jax.tree_util.tree_map(lambda a, dt=dt: a.astype(dt).astype(jnp.float32), params)
        with pytest.warns(UserWarning, match=f"{jnp.dtype(dt).name}.*float32"):
            s = influx.influence(obj, low, train, test, solver=DIRECT)
        ref32 = np.asarray(influx.influence(obj, up, train, test, solver=DIRECT))
        np.testing.assert_allclose(np.asarray(s), ref32, rtol=1e-5, atol=1e-6)
        assert np.corrcoef(np.asarray(s).ravel(), ref.ravel())[0, 1] > 0.99
        with pytest.warns(UserWarning, match="float32"):
            v = influx.self_influence(obj, low, train, solver=DIRECT)
        assert np.all(np.isfinite(np.asarray(v)))


def test_group_influence_is_sum_of_members():
    obj, params, train, test = problem("logistic")
    s = np.asarray(influx.influence(obj, params, train, test, solver=DIRECT))
    ids = np.arange(30) % 4
    g_ids = influx.group_influence(obj, params, train, test, ids, solver=DIRECT)
    ref = np.stack([s[:, ids == k].sum(1) for k in range(4)], axis=1)
    np.testing.assert_allclose(g_ids, ref, rtol=1e-12, atol=1e-14)
    g_list = influx.group_influence(obj, params, train, test, [[0, 5, 7], np.array([29])], solver=DIRECT)
    np.testing.assert_allclose(g_list[:, 0], s[:, [0, 5, 7]].sum(1), rtol=1e-12)
    np.testing.assert_allclose(g_list[:, 1], s[:, 29], rtol=1e-12)
    mask = np.zeros((1, 30), bool)
    mask[0, 3:9] = True
    g_mask = influx.group_influence(obj, params, train, test, mask, solver=DIRECT)
    np.testing.assert_allclose(g_mask[:, 0], s[:, 3:9].sum(1), rtol=1e-12)
    with pytest.raises(ValueError, match="out of range"):
        influx.group_influence(obj, params, train, test, [[0, 30]], solver=DIRECT)


def test_grad_dot_and_tracin():
    obj, params, train, test = problem("tanh_mlp")
    flat, unravel = ravel_pytree(params)
    jac = jax.jit(jax.jacrev(lambda fp, d: obj.per_example_loss(unravel(fp), d)))
    ref = np.asarray(jac(flat, test)) @ np.asarray(jac(flat, train)).T / 30
    np.testing.assert_allclose(influx.grad_dot(obj, params, train, test), ref, rtol=1e-10)
    np.testing.assert_allclose(influx.grad_dot(obj, params, train, test, damping=4.0), ref / 4,
                               rtol=1e-10)
    # TracIn over two checkpoints = learning-rate-weighted sum of gradient dots
    params2 = jax.tree_util.tree_map(lambda a: 0.9 * a, params)
    ref2 = np.asarray(influx.grad_dot(obj, params2, train, test))
    t = influx.tracin(obj, [params, params2], train, test, [0.1, 0.05])
    np.testing.assert_allclose(t, 0.1 * ref + 0.05 * ref2, rtol=1e-10)
    # large damping: influence -> grad_dot / damping
    big = 1e6
    s = influx.influence(obj, params, train, test, damping=big, solver=DIRECT)
    np.testing.assert_allclose(np.asarray(s) * big, ref, rtol=1e-4)


def _ridge(x, y, l2):
    n, d = x.shape
    return np.linalg.solve(x.T @ x / n + l2 * np.eye(d), x.T @ y / n)


def _ridge_make(n, rng):
    x = rng.normal(size=(n, 3))
    y = x @ np.array([[1.0], [-2.0], [0.5]]) + 0.3 * rng.normal(size=(n, 1))
    return x, y


def _ridge_errors(n, rng, xt, yt):
    d, l2 = 3, 1e-3
    x, y = _ridge_make(n, rng)
    theta = _ridge(x, y, l2)
    obj = influx.Objective(_linear, influx.losses.squared_error, l2=l2)
    s = np.asarray(influx.influence(obj, jnp.asarray(theta), (jnp.asarray(x), jnp.asarray(y)),
                                    (jnp.asarray(xt), jnp.asarray(yt)), kind="hessian", damping=0.0,
                                    solver=DIRECT))
    f = lambda th: 0.5 * ((xt @ th - yt) ** 2)[:, 0]
    f0 = f(theta)
    exact_eps, loo = np.empty((5, n)), np.empty((5, n))
    for m in range(n):
        keep = np.arange(n) != m
        # removal with eps = -1/N (the influence definition; J stays quadratic: a closed form)
        a = x.T @ x / n - np.outer(x[m], x[m]) / n + l2 * np.eye(d)
        th_eps = np.linalg.solve(a, (x.T @ y - x[m:m + 1].T * y[m]) / n)
        exact_eps[:, m] = f(th_eps) - f0
        loo[:, m] = f(_ridge(x[keep], y[keep], l2)) - f0  # refit with the mean over N - 1
    rel = lambda pred, act: np.linalg.norm(pred - act) / np.linalg.norm(act)
    return rel(s, exact_eps), rel(s, loo)


def _linear(p, x):
    return x @ p


def test_ridge_hessian_influence_predicts_loo():
    """Linear least squares: influence vs exact leave-one-out refits (closed form)."""
    rng = np.random.default_rng(0)
    xt, yt = _ridge_make(5, rng)  # one test set for both sizes
    e40 = _ridge_errors(40, rng, xt, yt)
    e320 = _ridge_errors(320, rng, xt, yt)
    # first order: the relative error is O(leverage) = O(d / N): 8x the data, ~8x smaller
    assert max(e40) < 0.3 and max(e320) < 0.04, (e40, e320)
    assert e320[0] < e40[0] / 4 and e320[1] < e40[1] / 4, (e40, e320)


def test_choose_method_rule():
    assert choose_method(1, 10_000) == "jvp"
    assert choose_method(1024, 10_000) == "per_example"  # forward cost unknown: by count
    assert choose_method(32, 10_000, flops_per_example=2e4) == "jvp"  # dense: F ~ 2P
    assert choose_method(256, 10_000, flops_per_example=2e4) == "per_example"
    assert choose_method(64, 20_000, flops_per_example=2e6) == "per_example"  # conv: F >> P
    assert choose_method(16, 20_000, flops_per_example=2e6) == "jvp"
    assert choose_method(1024, 10**9) == "jvp"  # the per-example block would not fit
    obj, params, train, _ = problem("cnn")
    f = forward_flops(obj, params, train[0])
    assert f is None or f > 2 * 9 * 2 * 16  # at least the convolution's multiply-adds
    obj, params, train, _ = problem("tanh_mlp")
    f = forward_flops(obj, params, train[0])
    assert f is None or f >= 2 * (4 * 6 + 6 * 3)  # the two matmuls' multiply-adds


# ------------------------------------------------------------------ bad input
def test_bad_inputs_fail_before_heavy_work():
    obj, params, train, test = problem("tanh_mlp")
    x, y = train
    with pytest.raises(ValueError, match="train.*apply_fn does not accept"):
        influx.influence(obj, params, (x[:, :3], y), test, solver=DIRECT)
    with pytest.raises(ValueError, match="test.*apply_fn does not accept"):
        influx.influence(obj, params, train, (test[0][:, :2], test[1]), solver=DIRECT)
    with pytest.raises(ValueError, match="out of range"):
        influx.influence(obj, params, train, (test[0], test[1] + 5), solver=DIRECT)
    with pytest.raises(ValueError, match="empty"):
        influx.influence(obj, params, (x[:0], y[:0]), test, solver=DIRECT)
    with pytest.raises(ValueError, match="method"):
        influx.influence(obj, params, train, test, solver=DIRECT, method="fast")
    with pytest.raises(ValueError, match="scalar"):
        influx.influence(obj, params, train, test, solver=DIRECT,
                         measurement=lambda p, ex: obj.apply_fn(p, ex[0][None])[0])
    with pytest.raises(TypeError, match="measurement"):
        influx.influence(obj, params, train, test, solver=DIRECT, measurement="loss")
    with pytest.raises(ValueError, match="disagree"):
        influx.self_influence(obj, params, (x, y[:-1]), solver=DIRECT)


def test_no_warning_when_converged():
    obj, params, train, test = problem("logistic")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        influx.influence(obj, params, train, test, solver=DIRECT)


def test_self_influence_closed_forms_follow_the_failure_policy():
    """Arnoldi's closed form on an indefinite Hessian (a kept eigenvalue + shift <= 0) and a
    failed Cholesky: an error by default, NaN (never 0) with on_failure='nan'."""
    obj, params, train, _ = _nonconvex()
    p = ravel_pytree(params)[0].size  # full rank: the negative eigenvalues are among those kept
    for solver in (solvers.arnoldi(rank=p), solvers.direct(raise_on_failure=False)):
        with pytest.raises(SolveError, match="self_influence.*(negative curvature|not positive definite)"):
            influx.self_influence(obj, params, train, kind="hessian", damping=0.0, solver=solver)
        v, info = influx.self_influence(obj, params, train, kind="hessian", damping=0.0, solver=solver,
                                        on_failure="nan", return_info=True)
        assert np.all(np.isnan(np.asarray(v))) and info.method == "self"
        assert np.all(np.asarray(info.status) != Status.CONVERGED)
