"""The five-gap decomposition on a tiny non-convex problem."""

import jax

jax.config.update("jax_enable_x64", True)

import json  # noqa: E402

import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

from influx import gaps, models, response, solvers  # noqa: E402
from influx.errors import InputError  # noqa: E402
from tests.test_response import NEWTON, mlp_problem  # noqa: E402

TRAIN_OPT = optax.adam(2e-2)
REMOVED = [0, 3, 6]


@pytest.fixture(scope="module")
def decomposition():
    obj, init, train, test = mlp_problem()  # shares compiled programs with test_response
    params = models.train(obj.apply_fn, obj.loss_fn, init, train, l2=obj.l2, optimizer=TRAIN_OPT,
                          steps=150).params
    # a deliberately rough practical solver so the solver error is non-zero
    practical = solvers.direct() if not hasattr(solvers, "cg") else solvers.cg(tol=1e-2, max_steps=3)
    g = gaps.decompose(obj, init, params, train, test, REMOVED, damping=0.05, solver=practical,
                       optimizer=NEWTON, steps=30, train_optimizer=TRAIN_OPT, train_steps=150)
    return g, obj, init, params, train, test


def test_terms_finite_and_telescoping(decomposition):
    g = decomposition[0]
    assert [t.name for t in g.terms] == list(gaps.TERMS)
    for t in g.terms:
        assert np.isfinite(t.mean_abs) and t.difference.shape == (3, 6)
        assert np.isfinite(t.pearson) and np.isfinite(t.spearman)
    total = sum(t.difference for t in g.terms)
    np.testing.assert_allclose(total, g.deltas["cold_loo"] - g.deltas["influence"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(total, g.total, rtol=1e-12, atol=1e-15)
    # each term really is the difference of its two objects
    t = g.term("linearization_error")
    np.testing.assert_allclose(t.difference, g.deltas["pbrf"] - g.deltas["linearized"])
    assert g.vs_cold["cold_loo"]["pearson"] == pytest.approx(1.0)
    assert g.vs_pbrf["pbrf"]["mean_abs"] == 0.0


def test_objects_match_response_functions(decomposition):
    g, obj, init, params, train, test = decomposition
    r = response.pbrf(obj, params, train, REMOVED, test=test, damping=0.05, optimizer=NEWTON, steps=30,
                      tol=1e-8, keep_params=False, warn=False)
    np.testing.assert_allclose(g.deltas["pbrf"], np.asarray(r.delta), rtol=1e-10, atol=1e-15)
    assert g.diagnostics["pbrf"]["fraction_converged"] == 1.0


def test_metagradient_object(decomposition):
    """The extra metagradient object is influx.metagradients of the original run, restricted to
    the removed examples, in the LOO sign and scale, outside the chain of five terms."""
    import influx

    g, obj, init, params, train, test = decomposition
    assert "metagradient" in g.deltas and "metagradient" not in gaps.OBJECTS
    s = influx.metagradients(obj, init, train, test, optimizer=TRAIN_OPT, steps=150)
    np.testing.assert_allclose(g.deltas["metagradient"], np.asarray(s)[:, REMOVED].T, rtol=1e-10, atol=1e-15)
    # reported next to the other objects (its accuracy against finite differences of the run is
    # tested in test_metagrad; with Adam on 24 examples the cold LOO is far from linear in w)
    assert np.isfinite(g.vs_cold["metagradient"]["pearson"])
    assert np.isfinite(g.vs_pbrf["metagradient"]["pearson"])
    assert "| metagradient |" in str(g)
    assert all(len(t.difference) == 3 for t in g.terms) and "metagradient" not in [t.upper for t in g.terms]


def test_table_and_json(decomposition):
    g = decomposition[0]
    text = str(g)
    for name in gaps.TERMS + gaps.OBJECTS:
        assert name in text
    d = json.loads(g.to_json())
    assert [t["name"] for t in d["terms"]] == list(gaps.TERMS)
    assert "deltas" in g.to_dict(arrays=True)


def test_requires_original_training(decomposition):
    _, obj, init, params, train, test = decomposition
    with pytest.raises(ValueError, match="train_optimizer"):
        gaps.decompose(obj, init, params, train, test, [0], damping=0.1)


def test_relative_to_the_compared_objects(decomposition):
    g = decomposition[0]
    for t in g.terms:
        scale = 0.5 * (np.mean(np.abs(g.deltas[t.upper])) + np.mean(np.abs(g.deltas[t.lower])))
        assert t.relative_objects == pytest.approx(t.mean_abs / scale, rel=1e-12)
        assert t.relative == pytest.approx(t.mean_abs / np.mean(np.abs(g.deltas["cold_loo"])), rel=1e-12)
    assert "relative to its objects" in str(g)
    d = json.loads(g.to_json())
    assert d["terms"][0]["relative_objects"] == pytest.approx(g.terms[0].relative_objects)


def test_notes_name_the_configuration(decomposition):
    g = decomposition[0]
    # the rough practical solver (max_steps=3) is noted with its configuration and residual
    (note,) = [n for n in g.notes if n.startswith("influence (")]
    assert "max_steps=3" in note and "damping 0.05" in note and "residual" in note
    _, obj, init, params, train, test = decomposition
    g1 = gaps.decompose(obj, init, params, train, test, REMOVED, damping=0.05, solver=solvers.direct(),
                        optimizer=NEWTON, steps=1, train_optimizer=TRAIN_OPT, train_steps=150)
    warm = [n for n in g1.notes if n.startswith("warm_loo (")]
    assert len(warm) == 1 and "1 steps, tol 1e-08" in warm[0] and "of 3 solves converged" in warm[0]
    assert g1.diagnostics["warm_loo"]["config"] in warm[0]
    assert "Notes:" in str(g1)


@pytest.mark.parametrize("bad, match", [
    (dict(damping=-1.0), "damping"), (dict(steps=0), "steps"), (dict(tol=-1.0), "tol"),
    (dict(on_failure="zero"), "on_failure"), (dict(removed=[0, 99]), "out of range"),
    (dict(train_batch_size=1000), "train_batch_size"), (dict(chunk_size=0), "chunk_size"),
])
def test_bad_options_raise_before_any_retraining(decomposition, monkeypatch, bad, match):
    _, obj, init, params, train, test = decomposition

    def no_run(*a, **k):
        raise AssertionError("a retraining ran before the bad option was refused")

    monkeypatch.setattr(response, "_run", no_run)
    kw = dict(damping=0.05, optimizer=NEWTON, steps=30, train_optimizer=TRAIN_OPT, train_steps=150)
    removed = bad.pop("removed", REMOVED)
    kw.update(bad)
    with pytest.raises(InputError, match=match):
        gaps.decompose(obj, init, params, train, test, removed, **kw)
