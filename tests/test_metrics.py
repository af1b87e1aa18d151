"""Tests for influx.metrics against scipy.stats and closed forms."""

import numpy as np
import pytest
import scipy.stats

from influx import metrics


def _rng(seed=0):
    return np.random.default_rng(seed)


@pytest.mark.parametrize("seed", range(5))
def test_pearson_matches_scipy(seed):
    rng = _rng(seed)
    a = rng.normal(size=40)
    b = 0.5 * a + rng.normal(size=40)
    np.testing.assert_allclose(metrics.pearson(a, b), scipy.stats.pearsonr(a, b)[0], atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_spearman_with_ties_matches_scipy(seed):
    rng = _rng(seed)
    a = rng.integers(0, 5, size=50).astype(float)  # many ties
    b = a + rng.integers(0, 3, size=50)
    ref = scipy.stats.spearmanr(a, b)[0]
    np.testing.assert_allclose(metrics.spearman(a, b), ref, atol=1e-12)
    c = rng.normal(size=50)
    np.testing.assert_allclose(metrics.spearman(c, b), scipy.stats.spearmanr(c, b)[0], atol=1e-12)


def test_rankdata_matches_scipy():
    rng = _rng(1)
    a = rng.integers(0, 7, size=100)
    np.testing.assert_array_equal(metrics.rankdata(a), scipy.stats.rankdata(a))
    np.testing.assert_array_equal(metrics.rankdata(np.array([3.0])), [1.0])


def test_perfect_and_monotone():
    a = np.arange(10.0)
    assert metrics.pearson(a, 2 * a + 1) == pytest.approx(1.0)
    assert metrics.pearson(a, -a) == pytest.approx(-1.0)
    assert metrics.spearman(a, np.exp(a)) == pytest.approx(1.0)
    assert metrics.pearson(a, np.exp(a)) < 1.0


def test_2d_inputs_are_flattened():
    rng = _rng(2)
    a, b = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    assert metrics.pearson(a, b) == pytest.approx(scipy.stats.pearsonr(a.ravel(), b.ravel())[0])


def test_constant_input_gives_nan_not_crash():
    a = np.ones(5)
    b = np.arange(5.0)
    assert np.isnan(metrics.pearson(a, b))
    assert np.isnan(metrics.spearman(b, a))
    c = metrics.correlations(a, b)
    assert np.isnan(c.pearson) and np.isnan(c.spearman)
    assert c.mean_abs_diff == pytest.approx(np.mean(np.abs(a - b)))
    assert c.n == 5


def test_correlations():
    rng = _rng(3)
    p, a = rng.normal(size=30), rng.normal(size=30)
    c = metrics.correlations(p, a)
    assert c.pearson == pytest.approx(scipy.stats.pearsonr(p, a)[0])
    assert c.spearman == pytest.approx(scipy.stats.spearmanr(p, a)[0])
    assert c.mean_abs_diff == pytest.approx(np.mean(np.abs(p - a)))
    assert c.n == 30


@pytest.mark.parametrize(
    "a, b, match",
    [
        (np.ones(3), np.ones(4), "same shape"),
        (np.ones(1), np.ones(1), "at least 2"),
        (np.array([1.0, np.nan]), np.ones(2), "non-finite"),
        (np.array([1.0, 2.0]), np.array([np.inf, 1.0]), "non-finite"),
    ],
)
def test_bad_input_raises(a, b, match):
    with pytest.raises(ValueError, match=match):
        metrics.pearson(a, b)
    with pytest.raises(ValueError, match=match):
        metrics.spearman(a, b)
    with pytest.raises(ValueError):
        metrics.correlations(a, b)


def test_lds_closed_form():
    rng = _rng(4)
    n_test, n_train, n_sub = 3, 20, 15
    S = rng.normal(size=(n_test, n_train))
    masks = rng.random((n_sub, n_train)) < 0.3
    exact = masks.astype(float) @ S.T
    # actual = monotone transform of the linear prediction -> LDS = 1
    r = metrics.linear_datamodeling_score(S, masks, np.tanh(exact))
    assert r.score == pytest.approx(1.0)
    np.testing.assert_allclose(r.predicted, exact)
    assert r.n_valid == n_test
    # noisy actual: each per-test entry is scipy's Spearman
    actual = exact + rng.normal(size=exact.shape)
    r = metrics.linear_datamodeling_score(S, masks, actual)
    ref = [scipy.stats.spearmanr(exact[:, j], actual[:, j])[0] for j in range(n_test)]
    np.testing.assert_allclose(r.per_test, ref, atol=1e-12)
    assert r.score == pytest.approx(np.mean(ref))
    # kept=True: the removed set is the complement -> same ranking as removing ~masks
    r2 = metrics.linear_datamodeling_score(S, ~masks, actual, kept=True)
    np.testing.assert_allclose(r2.per_test, r.per_test, atol=1e-12)


def test_lds_constant_column_skipped_and_shapes_checked():
    rng = _rng(5)
    S = rng.normal(size=(2, 6))
    masks = rng.random((8, 6)) < 0.5
    actual = rng.normal(size=(8, 2))
    actual[:, 1] = 0.0
    r = metrics.linear_datamodeling_score(S, masks, actual)
    assert np.isnan(r.per_test[1]) and r.n_valid == 1
    assert r.score == pytest.approx(r.per_test[0])
    with pytest.raises(ValueError, match="actual"):
        metrics.linear_datamodeling_score(S, masks, actual.T)
    with pytest.raises(ValueError, match="subsets"):
        metrics.linear_datamodeling_score(S, masks[:, :5], actual)
    with pytest.raises(ValueError, match="scores"):
        metrics.linear_datamodeling_score(S[0], masks, actual)


def test_topk_overlap():
    a = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    b = np.array([5.0, 1.0, 3.0, 2.0, 4.0])
    assert metrics.topk_overlap(a, a, 3) == 1.0
    assert metrics.topk_overlap(a, b, 2) == 0.5  # {0,1} vs {0,4}
    assert metrics.topk_overlap(a, -a, 2) == 0.0
    assert metrics.topk_overlap(a, -a, 2, by="abs") == 1.0
    assert metrics.topk_overlap(a, b, 5) == 1.0
    rows = metrics.topk_overlap(np.stack([a, a]), np.stack([a, b]), 2)
    np.testing.assert_allclose(rows, [1.0, 0.5])
    for k in (0, 6, 1.5):
        with pytest.raises(ValueError, match="k must"):
            metrics.topk_overlap(a, b, k)
    with pytest.raises(ValueError, match="by"):
        metrics.topk_overlap(a, b, 2, by="rank")


def test_mislabel_curve_perfect_random_and_worst():
    n = 100
    flipped = np.zeros(n, bool)
    flipped[:10] = True
    perfect = flipped.astype(float) + 0.01 * np.arange(n)[::-1] / n
    c = metrics.mislabel_detection_curve(perfect, flipped, fractions=(0.05, 0.1, 0.2, 0.3))
    np.testing.assert_allclose(c.found, [0.5, 1.0, 1.0, 1.0])
    assert c.auc == pytest.approx(1 - 10 / (2 * n))
    assert c.n_flipped == 10
    assert c.inspected.shape == c.recall.shape == (n + 1,)
    assert c.recall[0] == 0.0 and c.recall[-1] == 1.0
    worst = metrics.mislabel_detection_curve(-perfect, flipped)
    np.testing.assert_allclose(worst.found, 0.0)
    assert worst.auc == pytest.approx(10 / (2 * n))
    # constant scores: ties are expected-random -> diagonal, AUC 0.5
    const = metrics.mislabel_detection_curve(np.zeros(n), flipped, fractions=(0.1, 0.3))
    np.testing.assert_allclose(const.found, [0.1, 0.3])
    assert const.auc == pytest.approx(0.5)
    np.testing.assert_allclose(const.recall, const.inspected)


def test_mislabel_curve_random_ranking_near_diagonal():
    rng = _rng(6)
    n = 5000
    flipped = rng.random(n) < 0.1
    c = metrics.mislabel_detection_curve(rng.normal(size=n), flipped)
    assert abs(c.auc - 0.5) < 0.03
    np.testing.assert_allclose(c.found, c.fractions, atol=0.05)


def test_mislabel_curve_errors_and_no_flips():
    s = np.arange(5.0)
    c = metrics.mislabel_detection_curve(s, np.zeros(5, bool))
    assert np.isnan(c.auc) and np.all(np.isnan(c.found)) and c.n_flipped == 0
    with pytest.raises(ValueError, match="is_flipped"):
        metrics.mislabel_detection_curve(s, np.zeros(4, bool))
    with pytest.raises(ValueError, match="fractions"):
        metrics.mislabel_detection_curve(s, np.ones(5, bool), fractions=(0.5, 1.5))
    with pytest.raises(ValueError, match="non-finite"):
        metrics.mislabel_detection_curve(np.array([1.0, np.nan]), np.ones(2, bool))
    with pytest.raises(ValueError, match="is_flipped"):
        metrics.mislabel_detection_curve(s, np.full(5, 2))
