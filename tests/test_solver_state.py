"""Fit once, query many: prepared solver states in memory and on disk (influx.solvers.saved)."""

import json
import math

import jax
import numpy as np
import pytest

import influx
from influx import solvers
from influx.errors import InputError, StateError
from tests.conftest import make_problem

DAMPING = 1e-2
KW = dict(damping=DAMPING, on_failure="keep", method="jvp")
SOLVERS = {
    "ekfac": lambda: solvers.ekfac(tol=math.inf),
    "arnoldi": lambda: solvers.arnoldi(rank=8),
    "direct": lambda: solvers.direct(),
}


@pytest.fixture(scope="module")
def problem():
    obj, params, (x, y) = make_problem("logistic", n=24)
    return obj, params, (x[:20], y[:20]), (x[20:], y[20:])


@pytest.fixture
def count_prepare(monkeypatch):
    """Counts ``prepare`` calls of a solver class (the fit)."""
    calls = []

    def patch(cls):
        orig = cls.prepare

        def counting(self, op):
            calls.append(cls.__name__)
            return orig(self, op)

        monkeypatch.setattr(cls, "prepare", counting)
        return calls

    return patch


@pytest.mark.parametrize("name", list(SOLVERS))
def test_prepared_and_loaded_states_give_identical_scores_without_preparing(name, problem, tmp_path,
                                                                            count_prepare, caplog):
    obj, params, train, test = problem
    solver = SOLVERS[name]()
    calls = count_prepare(type(solver))
    s0 = influx.influence(obj, params, train, test, solver=solver, **KW)
    assert len(calls) == 1
    prepared = influx.prepare(obj, params, train, damping=DAMPING, solver=solver)
    assert len(calls) == 2 and prepared.solver == solver and prepared.damping == DAMPING
    s1 = influx.influence(obj, params, train, test, state=prepared, **KW)  # solver taken from the state
    np.testing.assert_array_equal(np.asarray(s0), np.asarray(s1))

    influx.solvers.save_state(prepared, tmp_path / "state")
    loaded = influx.solvers.load_state(tmp_path / "state", obj, params, train, damping=DAMPING)
    assert loaded.solver == solver and loaded.fingerprint == prepared.fingerprint
    for a, b in zip(jax.tree_util.tree_leaves(prepared.state), jax.tree_util.tree_leaves(loaded.state)):
        assert a.dtype == b.dtype and a.weak_type == b.weak_type
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        s2 = influx.influence(obj, params, train, test, state=loaded, **KW)
    compiles = [r.getMessage()[:120] for r in caplog.records if "Compiling" in r.getMessage()]
    assert not compiles, compiles  # the loaded state hits the programs of the original one
    np.testing.assert_array_equal(np.asarray(s0), np.asarray(s2))
    assert len(calls) == 2  # neither the in-memory nor the loaded state was prepared again
    if name == "ekfac":  # self and group influence take the state too (closed forms of the state)
        v0 = influx.self_influence(obj, params, train, solver=solver, damping=DAMPING)
        v1 = influx.self_influence(obj, params, train, state=loaded, damping=DAMPING)
        np.testing.assert_array_equal(np.asarray(v0), np.asarray(v1))
        g = influx.group_influence(obj, params, train, test, [[0, 1], [2]], state=loaded, **KW)
        np.testing.assert_allclose(np.asarray(g), np.stack([s0[:, 0] + s0[:, 1], s0[:, 2]], axis=1),
                                   rtol=1e-12, atol=0)
        assert len(calls) == 3  # only the stateless self_influence prepared


@pytest.fixture(scope="module")
def saved(problem, tmp_path_factory):
    obj, params, train, _ = problem
    prepared = influx.prepare(obj, params, train, damping=DAMPING, solver=solvers.ekfac(tol=math.inf))
    root = tmp_path_factory.mktemp("ekfac") / "state"
    influx.solvers.save_state(prepared, root)
    return prepared, root


def test_directory_is_inspectable(saved):
    prepared, root = saved
    man = json.loads((root / "manifest.json").read_text())
    assert man["kind"] == "solver_state" and man["complete"]
    assert set(man["inputs"]) >= {"params", "data", "kind", "damping", "l2", "solver", "loss_fn", "apply_fn"}
    assert man["inputs"]["damping"] == DAMPING and man["meta"]["solver"] == repr(prepared.solver)
    assert man["meta"]["influx_version"] == influx.__version__
    names = {e["name"] for e in man["files"].values()}
    assert {"qa.0.npy", "qs.0.npy", "lam.0.npy", "shift.npy"} <= names
    lam = np.load(root / "lam.0.npy")
    np.testing.assert_array_equal(lam, np.asarray(prepared.state.lam[0]))
    assert man["meta"]["arrays"]["lam.0.npy"]["shape"] == list(lam.shape)


def _perturbed(params):
    return jax.tree_util.tree_map(lambda a: a + 1e-3, params)


def test_a_state_for_other_inputs_is_refused(problem, saved):
    obj, params, train, test = problem
    prepared, root = saved
    cases = {
        "params": dict(params=_perturbed(params)),
        "data": dict(train=(train[0].at[0, 0].add(1.0), train[1])),
        "damping": dict(damping=0.1),
        "kind": dict(kind="hessian"),
        "l2": dict(obj=influx.Objective(obj.apply_fn, obj.loss_fn, l2=0.5)),
    }
    for what, change in cases.items():
        args = dict(obj=obj, params=params, train=train, damping=DAMPING, kind="gnh") | change
        with pytest.raises(InputError, match=what):
            influx.influence(args["obj"], args["params"], args["train"], test, state=prepared,
                             damping=args["damping"], kind=args["kind"])
        with pytest.raises(InputError, match=what):
            influx.solvers.load_state(root, args["obj"], args["params"], args["train"],
                                      damping=args["damping"], kind=args["kind"])
    with pytest.raises(InputError, match="differs from the solver of the prepared state"):
        influx.influence(obj, params, train, test, state=prepared, damping=DAMPING,
                         solver=solvers.ekfac(tol=2.0))
    with pytest.raises(InputError, match="solver"):  # same class, other options
        influx.solvers.load_state(root, obj, params, train, damping=DAMPING, solver=solvers.ekfac(tol=2.0))
    with pytest.raises(InputError, match="influx.Prepared"):  # a bare state has no fingerprint
        influx.self_influence(obj, params, train, state=prepared.state, damping=DAMPING)
    with pytest.raises(InputError, match="params"):
        influx.scoring.score(obj, _perturbed(params), train, test, state=prepared, damping=DAMPING)


def test_a_state_of_another_layout_is_refused(problem, saved, monkeypatch):
    # a state saved by an influx whose states are laid out otherwise (e.g. conv rows in
    # another order) is refused, in memory and on disk, naming the format
    obj, params, train, test = problem
    prepared, root = saved
    assert json.loads((root / "manifest.json").read_text())["inputs"]["format"] == solvers.saved.STATE_FORMAT
    monkeypatch.setattr(solvers.saved, "STATE_FORMAT", solvers.saved.STATE_FORMAT + 1)
    with pytest.raises(InputError, match="format"):
        influx.influence(obj, params, train, test, state=prepared, damping=DAMPING)
    with pytest.raises(InputError, match="format"):
        influx.solvers.load_state(root, obj, params, train, damping=DAMPING)


def test_damaged_or_incomplete_state_directories_are_refused(problem, saved, tmp_path):
    import shutil

    obj, params, train, _ = problem
    prepared, root = saved

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(root, dst)
        return dst

    bad = copy("flipped")
    raw = bytearray((bad / "lam.0.npy").read_bytes())
    raw[-1] ^= 0x01  # one bit of one eigenvalue
    (bad / "lam.0.npy").write_bytes(bytes(raw))
    with pytest.raises(StateError, match="lam.0.npy.*checksum"):
        influx.solvers.load_state(bad, obj, params, train, damping=DAMPING)

    gone = copy("missing")
    (gone / "qs.0.npy").unlink()
    with pytest.raises(StateError, match="qs.0.npy.*missing"):
        influx.solvers.load_state(gone, obj, params, train, damping=DAMPING)

    cut = copy("interrupted")
    man = json.loads((cut / "manifest.json").read_text())
    man["complete"] = False
    (cut / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StateError, match="did not finish"):
        influx.solvers.load_state(cut, obj, params, train, damping=DAMPING)

    with pytest.raises(StateError, match="manifest.json"):
        influx.solvers.load_state(tmp_path / "nothing-here", obj, params, train, damping=DAMPING)

    other = influx.prepare(obj, params, train, damping=0.1, solver=solvers.ekfac(tol=math.inf))
    with pytest.raises(StateError, match="damping"):  # never overwrites a state of other inputs
        influx.solvers.save_state(other, copy("occupied"))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(StateError, match="not empty"):
        influx.solvers.save_state(prepared, tmp_path / "foreign")


def test_score_with_a_state_equals_score_without(problem, saved, tmp_path, count_prepare):
    obj, params, train, test = problem
    prepared, root = saved
    solver = prepared.solver
    # one curvature chunk (chunk_size >= N), as influx.prepare's default: the same factor sums
    without = influx.scoring.score(obj, params, train, test, damping=DAMPING, solver=solver)
    calls = count_prepare(type(solver))
    loaded = influx.solvers.load_state(root, obj, params, train, damping=DAMPING)
    with_state = influx.scoring.score(obj, params, train, test, damping=DAMPING, state=loaded,
                                      out_dir=tmp_path / "scores")
    assert not calls
    np.testing.assert_array_equal(np.asarray(without.scores), np.asarray(with_state.scores))


@pytest.mark.parametrize("solver", [solvers.cg(preconditioner="jacobi", precond_samples=4),
                                    solvers.lissa(depth=10, scale=10.0),
                                    solvers.kfac(tol=math.inf)], ids=["cg-jacobi", "lissa", "kfac"])
def test_every_stateful_solver_round_trips(solver, problem, tmp_path):
    # CG's Jacobi diagonal, LiSSA's scale (NaN estimates: a given scale), K-FAC's factors: exactly,
    # the solver rebuilt from its saved options
    obj, params, train, _ = problem
    prepared = influx.prepare(obj, params, train, damping=DAMPING, solver=solver)
    assert jax.tree_util.tree_leaves(prepared.state)  # there is a state to save
    influx.solvers.save_state(prepared, tmp_path / "s")
    loaded = influx.solvers.load_state(tmp_path / "s", obj, params, train, damping=DAMPING)
    assert loaded.solver == solver and type(loaded.state) is type(prepared.state)
    assert jax.tree_util.tree_structure(loaded.state) == jax.tree_util.tree_structure(prepared.state)
    for a, b in zip(jax.tree_util.tree_leaves(prepared.state), jax.tree_util.tree_leaves(loaded.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_state_that_would_not_fit_in_memory_is_refused_before_reading(problem, saved, monkeypatch):
    from influx import _memory
    from influx.errors import ResourceError

    obj, params, train, _ = problem
    _, root = saved
    monkeypatch.setattr(_memory, "available_bytes", lambda device=None: 1000)
    with pytest.raises(ResourceError, match="load_state"):
        influx.solvers.load_state(root, obj, params, train, damping=DAMPING)
