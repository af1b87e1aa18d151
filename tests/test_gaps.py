"""The five-gap decomposition on a tiny non-convex problem."""

import jax

jax.config.update("jax_enable_x64", True)

import json  # noqa: E402

import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

from influx import gaps, models, response, solvers  # noqa: E402
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
