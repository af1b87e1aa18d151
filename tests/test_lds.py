"""LDS harness: subsets, the LDS with its bootstrap interval, subset retraining against
closed forms on linear least squares, bad input, a smoke run of the study (full study: slow)."""

import json

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import influx
from influx import losses
from influx.errors import InputError
from influx.studies import lds


def _linear(params, x):
    return x @ params["w"] + params["b"]


def _least_squares(n=40, d=3, seed=0, l2=0.1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=(d, 1)) + 0.3 * rng.normal(size=(n, 1))
    obj = influx.Objective(_linear, losses.squared_error, l2=l2)
    init = {"w": jnp.asarray(0.1 * rng.normal(size=(d, 1))), "b": jnp.zeros((1,))}
    test = (jnp.asarray(rng.normal(size=(6, d))), jnp.asarray(rng.normal(size=(6, 1))))
    return obj, init, (jnp.asarray(x), jnp.asarray(y)), test


def _ridge(x, y, w, l2):
    """argmin_theta (1/N) sum_i w_i 1/2 (x_i theta + b - y_i)^2 + l2/2 ||(theta, b)||^2."""
    n = x.shape[0]
    xa = np.hstack([x, np.ones((n, 1))])
    a = xa.T @ (w[:, None] * xa) / n + l2 * np.eye(xa.shape[1])
    return np.linalg.solve(a, xa.T @ (w[:, None] * y) / n)


def test_subsets_shape_count_seed():
    m = lds.subsets(50, 0.1, 7, seed=3)
    assert m.shape == (7, 50) and m.dtype == bool and np.all(m.sum(1) == 5)
    assert np.array_equal(m, lds.subsets(50, 0.1, 7, seed=3))
    assert not np.array_equal(m, lds.subsets(50, 0.1, 7, seed=4))
    assert np.all(lds.subsets(50, 0.001, 3).sum(1) == 1)  # at least one removed


def test_lds_exact_for_an_additive_run():
    """One SGD step on least squares, measured by the (linear) output: f_t(theta_1(w)) is
    linear in w, so the metagradient scores predict every group effect exactly (LDS = 1),
    and the retraining deltas equal the closed form eta/N sum_{m in S} x_t . grad L_m."""
    obj, init, train, test = _least_squares()
    eta = 0.3
    opt = optax.sgd(eta)
    f = influx.measurements.logit(0)
    scores = influx.metagradients(obj, init, train, (test[0], None), optimizer=opt, steps=1, measurement=f)
    x, y = np.asarray(train[0]), np.asarray(train[1])
    xt = np.hstack([np.asarray(test[0]), np.ones((6, 1))])
    r0 = x @ np.asarray(init["w"]) + np.asarray(init["b"]) - y  # residuals at theta_0
    g = np.hstack([x, np.ones((40, 1))]) * r0  # per-example gradients (40, d + 1)
    closed = eta / 40 * xt @ g.T  # (n_test, N): removing m changes f_t by this
    np.testing.assert_allclose(scores, closed, rtol=1e-10, atol=1e-14)
    masks = lds.subsets(40, 0.2, 12, seed=1)
    delta = lds.retrain_delta(obj, init, train, (test[0], None), 1.0 - masks, optimizer=opt, steps=1,
                              measurement=f)
    np.testing.assert_allclose(delta, masks @ closed.T, rtol=1e-10, atol=1e-13)
    e = lds.lds(scores, masks, delta, n_boot=100)
    assert e.n_valid == 6 and e.score == pytest.approx(1.0) and e.low == pytest.approx(1.0)
    # a wrong score matrix gets a lower LDS (the check can fail)
    assert lds.lds(scores[:, ::-1], masks, delta).score < 0.9


def test_lds_least_squares_converged_matches_closed_form():
    """Least squares trained to convergence: the harness's retraining equals the closed-form
    weighted ridge solution, and its LDS equals an independent Spearman (scipy)."""
    obj, init, train, test = _least_squares()
    opt = optax.sgd(0.5)
    steps = 400
    x, y = np.asarray(train[0]), np.asarray(train[1])
    xt, yt = np.hstack([np.asarray(test[0]), np.ones((6, 1))]), np.asarray(test[1])
    loss = lambda th: 0.5 * ((xt @ th - yt) ** 2)[:, 0]
    base = loss(_ridge(x, y, np.ones(40), obj.l2))
    masks = lds.subsets(40, 0.1, 16, seed=2)
    closed = np.stack([loss(_ridge(x, y, 1.0 - mk, obj.l2)) - base for mk in masks])
    delta = lds.retrain_delta(obj, init, train, test, 1.0 - masks, optimizer=opt, steps=steps)
    np.testing.assert_allclose(delta, closed, rtol=1e-7, atol=1e-12)
    scores = influx.metagradients(obj, init, train, test, optimizer=opt, steps=steps)
    e = lds.lds(scores, masks, delta, n_boot=500, seed=1)
    pred = masks.astype(float) @ scores.T
    ref = np.mean([stats.spearmanr(pred[:, t], closed[:, t])[0] for t in range(6)])
    assert e.score == pytest.approx(ref, abs=1e-12)
    assert e.score > 0.9  # first order is accurate for 10% removals on a ridge problem
    assert e.low <= e.score <= e.high


def test_bootstrap_interval():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(30, 20))
    masks = lds.subsets(20, 0.25, 10, seed=0)
    actual = masks @ scores.T + 0.5 * rng.normal(size=(10, 30))
    e = lds.lds(scores, masks, actual, n_boot=400)
    assert e.low < e.score < e.high and e.n_valid == 30
    narrow = lds.lds(scores, masks, actual, n_boot=400, level=0.5)
    assert e.low <= narrow.low <= narrow.high <= e.high


def test_bad_input():
    for a in (0, 1, 1.5, -0.1, "x"):
        with pytest.raises(InputError, match="alpha"):
            lds.subsets(10, a, 4)
    with pytest.raises(InputError, match="M"):
        lds.subsets(10, 0.1, 1)
    with pytest.raises(InputError, match="M >= 2"):
        lds.lds(np.zeros((2, 10)), np.zeros((1, 10), bool), np.zeros((1, 2)))
    with pytest.raises(InputError, match="level"):
        lds.lds(np.zeros((2, 10)), np.zeros((3, 10), bool), np.zeros((3, 2)), level=1.0)
    with pytest.raises(InputError):
        lds.lds(np.zeros((2, 10)), np.zeros((3, 9), bool), np.zeros((3, 2)))
    with pytest.raises(InputError, match="alpha"):
        lds.LDSConfig(fractions=(0.0, 0.1))
    with pytest.raises(InputError, match="n_subsets"):
        lds.LDSConfig(n_subsets=1)
    with pytest.raises(InputError, match="methods"):
        lds.LDSConfig(methods=("influence_magic",))
    with pytest.raises(InputError, match="optimizer"):
        lds.LDSConfig(optimizer="rmsprop")
    with pytest.raises(InputError, match="problem"):
        lds.LDSConfig(problem="cifar")


def test_study_smoke(tmp_path):
    cfg = lds.quick(n_train=60, width=8, steps=20, n_subsets=6, n_test_points=4, fractions=(0.1, 0.5),
                    methods=("grad_dot", "metagradients"), n_boot=50, progress=False)
    res = lds.run(cfg)
    assert [r.method for r in res.rows] == list(cfg.methods)
    for r in res.rows:
        assert not r.notes, r.notes
        assert set(r.lds) == {"0.1", "0.5"} and r.seconds > 0 and r.train_equiv > 0
        for e in r.lds.values():
            assert -1 <= e["score"] <= 1 and e["low"] <= e["score"] <= e["high"]
    # the exact derivative of the run ranks the subsets (measured 0.77; 6 removed of 60 is far
    # from infinitesimal for Adam on so few examples)
    assert res.row("metagradients").lds["0.1"]["score"] > 0.5
    json.dumps(res.to_dict(), allow_nan=False)
    md = res.to_markdown()
    assert "metagradients" in md and "LDS 0.1" in md
    assert res.plot(tmp_path / "lds.png").stat().st_size > 1000


@pytest.mark.slow
def test_full_study_digits():
    res = lds.run(lds.LDSConfig(progress=False))
    assert len(res.rows) == len(lds.METHODS)
    assert all(r.lds for r in res.rows), [r.notes for r in res.rows]



def test_cli_lds(tmp_path, capsys):
    from influx import cli

    out = tmp_path / "lds"
    rc = cli.main(["lds", "--quick", "--n-train", "40", "--steps", "10", "--subsets", "4", "--fractions",
                   "0.1,0.5", "--methods", "grad_dot,metagradients", "--test-points", "3", "--no-progress",
                   "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in doc["lds"]["rows"]] == ["grad_dot", "metagradients"]
    assert (out / "lds.png").stat().st_size > 1000 and "LDS" in (out / "report.md").read_text()
    assert cli.main(["lds", "--fractions", "0,0.5", "--out", str(tmp_path / "bad")]) == 2  # bad input
    assert "alpha" in capsys.readouterr().err
