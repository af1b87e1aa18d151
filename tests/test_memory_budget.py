"""Memory budgets (issue 15, item 4): chunk sizes chosen from ``memory_budget`` give the same
numbers as one chunk; budgets too small for one example and dense methods on a large ``P``
are refused before anything runs, naming the sizes."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import influx
from influx import _memory, attribution, curvature, scoring, solvers
from influx.errors import InputError, ResourceError
from tests.conftest import make_problem

N = 24


@pytest.fixture(scope="module")
def cnn():
    obj, params, (x, y) = make_problem("cnn", n=N + 3)
    return obj, params, (x[:N], y[:N]), (x[N:], y[N:])


def _smallest_budget(obj, params, train, n_test):
    """The smallest power-of-two budget (from 32 KiB) that fits one example of every pass."""
    op = curvature.operator(obj, params, train, damping=1e-2)
    vecs = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((n_test,) + a.shape, a.dtype), params)
    budget = 1 << 15
    while True:
        try:
            op.replace(memory_budget=budget).product_chunk(n_test)
            solvers.ekfac(memory_budget=budget).fit_chunk(op)
            attribution.score_chunk_size(obj, "jvp", params, vecs, train, chunk_size=N, memory_budget=budget)
            return budget
        except ResourceError:
            budget *= 2


@pytest.fixture(scope="module")
def small(cnn):
    obj, params, train, test = cnn
    return _smallest_budget(obj, params, train, n_test=3)


def test_small_budget_forces_chunks(cnn, small):
    """The budget the equality tests use really splits every pass into several chunks."""
    obj, params, train, _ = cnn
    op = curvature.operator(obj, params, train, damping=1e-2, chunk_size=N)
    vecs = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((3,) + a.shape, a.dtype), params)
    assert op.product_chunk(3) == N  # default budget: one chunk
    assert solvers.ekfac().fit_chunk(op) == N
    assert op.replace(memory_budget=small).product_chunk(3) < N // 2
    assert solvers.ekfac(memory_budget=small).fit_chunk(op) < N // 2
    assert attribution.score_chunk_size(obj, "jvp", params, vecs, train, chunk_size=N,
                                        memory_budget=small) < N // 2


def test_influence_with_a_tiny_budget_equals_one_chunk(cnn, small, monkeypatch, capsys):
    """Same scores to 1e-12 with every pass in small chunks; the fit, the solves and the scoring
    show progress (a plain stderr line without tqdm)."""
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    obj, params, train, test = cnn
    kw = dict(damping=1e-2, solver=solvers.ekfac(tol=math.inf), chunk_size=N)
    ref = influx.influence(obj, params, train, test, **kw)
    got = influx.influence(obj, params, train, test, memory_budget=small, progress=True, **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-9, atol=1e-12)
    err = capsys.readouterr().err
    for line in (f"influx.ekfac: factors (1/2): {N}/{N} examples",
                 f"influx.ekfac: eigenvalues (2/2): {N}/{N}", "influx: solves (ekfac): 3/3 solves",
                 f"influx: scoring: {N}/{N} examples"):
        assert line in err, err


def test_self_influence_and_ekfac_state_with_a_tiny_budget(cnn, small):
    obj, params, train, _ = cnn
    op = curvature.operator(obj, params, train, damping=1e-2, chunk_size=N)
    sv = solvers.ekfac(tol=math.inf)
    ref, got = sv.prepare(op), sv.prepare(op.replace(memory_budget=small))
    for a, b in zip(got.lam, ref.lam):  # the corrected eigenvalues (eigenvectors: up to sign/order)
        np.testing.assert_allclose(np.sort(np.asarray(a), axis=None), np.sort(np.asarray(b), axis=None),
                                   rtol=1e-9, atol=1e-12)
    kw = dict(damping=1e-2, solver=solvers.ekfac(tol=math.inf), chunk_size=N)
    s_ref = influx.self_influence(obj, params, train, **kw)
    s_got = influx.self_influence(obj, params, train, memory_budget=small, **kw)
    np.testing.assert_allclose(np.asarray(s_got), np.asarray(s_ref), rtol=1e-9, atol=1e-12)


def test_scoring_with_a_tiny_budget_equals_one_chunk(cnn, small):
    obj, params, train, test = cnn
    kw = dict(damping=1e-2, solver=solvers.ekfac(tol=math.inf), chunk_size=N, progress=False)
    ref = scoring.score(obj, params, train, test, **kw)
    got = scoring.score(obj, params, train, test, memory_budget=small, **kw)
    np.testing.assert_allclose(np.asarray(got.scores), np.asarray(ref.scores), rtol=1e-9, atol=1e-12)
    assert got.manifest["fingerprint"] == ref.manifest["fingerprint"]  # the budget is no input


def test_budget_below_one_example_names_the_sizes(cnn):
    obj, params, train, test = cnn
    with pytest.raises(ResourceError, match=r"one example needs .* but memory_budget is 1\.0 KB"):
        influx.influence(obj, params, train, test, damping=1e-2, solver=solvers.ekfac(tol=math.inf),
                         memory_budget=1024)
    op = curvature.operator(obj, params, train, damping=1e-2)
    with pytest.raises(ResourceError, match=r"ekfac.prepare \(factor passes\): one example needs"):
        solvers.ekfac(memory_budget=1024).prepare(op)
    with pytest.raises(ResourceError, match=r"product with 1 vector"):
        op.replace(memory_budget=1024)(params)
    for bad in (0, -5, "1GB", True, float("nan")):
        with pytest.raises(InputError, match="memory_budget"):
            influx.influence(obj, params, train, test, memory_budget=bad)


def test_dense_methods_on_a_large_model_are_refused_before_allocation(cnn):
    """P = 2,000,000 parameters as shapes only (nothing allocated): the dense matrix is
    refused with its size, before any program runs."""
    obj, _, train, _ = cnn
    big = {"w": jax.ShapeDtypeStruct((2000, 1000), jnp.float64)}
    op = curvature.operator_unchecked(obj, big, train, kind="gnh", damping=1e-2, chunk_size=8)
    with pytest.raises(ResourceError, match=r"2,000,000 x 2,000,000 matrix needs 58\.2 TB"):
        curvature.dense(op)
    with pytest.raises(ResourceError, match=r"P = 2,000,000 parameters.*needs 87\.3 TB"):
        solvers.direct().prepare(op)


def test_peak_bytes_follows_the_program():
    """The jaxpr estimate grows with the chunk and frees dead values (a chain of n
    elementwise steps needs two buffers beyond its input, not n)."""
    def chain(x):
        for _ in range(10):
            x = jnp.sin(x)
        return x
    one = 8 * 1000
    assert _memory.peak_bytes(chain, jax.ShapeDtypeStruct((1000,), jnp.float64)) == 2 * one
    mat = _memory.peak_bytes(lambda a: a @ a.T, jax.ShapeDtypeStruct((100, 10), jnp.float64))
    assert mat == 8 * (100 * 10 + 100 * 100)  # the transpose and the product (not the input)
    c = _memory.chunk_size_for(lambda k: 1000 + 100 * k, budget=5000, limit=1000, what="x")
    assert c == 40
    with pytest.raises(ResourceError, match="one example needs 1.1 KB"):
        _memory.chunk_size_for(lambda k: 1000 + 100 * k, budget=1000, limit=10, what="x")


# ------------------------------------------------------------------ the query side (fused per batch)
@pytest.fixture(scope="module")
def mlp():
    obj, params, (x, y) = make_problem("tanh_mlp", n=31)
    return obj, params, (x[:24], y[:24]), (x[24:], y[24:])  # 7 test examples


def _all_gradients_first(obj, params, train, test, solver, batch):
    """The former query side: every test gradient, then ``apply_many`` on ``[0, batch),
    [batch, 2 batch), ...`` (block CG shares a Krylov space within a batch)."""
    grads = attribution._measurement_grads(influx.measurements.bind(obj, None), params, test,
                                           batch_size=len(test[1]))
    op = curvature.operator(obj, params, train, damping=1e-2)
    state = solver.prepare(op)
    parts = [solver.apply_batch(state, op, jax.tree_util.tree_map(lambda a: a[s:s + batch], grads))
             for s in range(0, len(test[1]), batch)]
    return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *[p.x for p in parts])


@pytest.mark.parametrize("solver", [solvers.cg(tol=1e-10, block=True), solvers.ekfac(tol=math.inf)],
                         ids=["block_cg", "ekfac"])
def test_fused_query_batches_equal_all_gradients_first(mlp, solver):
    """Gradients and solves per batch of 3 (batches 3 + 3 + 1, each written in place into the
    answer) give the vectors of forming all 7 gradients first, to 1e-9 (EK-FAC; block CG to
    1e-7: gradients formed 3 at a time round differently, and CG to tol 1e-10 carries that
    over); so do EK-FAC's scores with every pass split by a tiny budget."""
    obj, params, train, test = mlp
    rtol = 1e-7 if solver.name == "cg" else 1e-9
    ref = _all_gradients_first(obj, params, train, test, solver, 3)
    got, sol = attribution.solve_test_vectors(obj, params, train, test, damping=1e-2, solver=solver,
                                              rhs_batch_size=3)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=1e-14)
    assert np.asarray(sol.status).shape == (7,) and (np.asarray(sol.status) == 0).all()
    if solver.name == "cg":
        return
    one = influx.influence(obj, params, train, test, damping=1e-2, solver=solver)  # one batch of 7
    many = influx.influence(obj, params, train, test, damping=1e-2, solver=solver,
                            memory_budget=_smallest_budget(obj, params, train, n_test=1))
    np.testing.assert_allclose(np.asarray(many), np.asarray(one), rtol=1e-9, atol=1e-12)


@dataclasses.dataclass(frozen=True, repr=False)
class _FailsNegative(type(solvers.ekfac())):
    """EK-FAC that reports MAX_STEPS for every right-hand side whose first entry is negative."""

    def apply_many(self, state, op, bs):
        sol = super().apply_many(state, op, bs)
        bad = jax.tree_util.tree_leaves(bs)[0].reshape(len(sol.status), -1)[:, 0] < 0
        status = jnp.where(bad, solvers.Status.MAX_STEPS, sol.status)
        return sol._replace(status=status, converged=status == solvers.Status.CONVERGED)


def test_failed_solves_in_fused_batches_are_nan_rows(mlp):
    """A failed solve in any batch gives a NaN row (never 0, never the unfinished answer), the
    other rows are the converged answers, and the status of every row is reported."""
    obj, params, train, test = mlp
    solver = _FailsNegative(tol=math.inf)
    grads = jax.vmap(lambda ex: jax.grad(lambda p, e: obj.per_example_loss(p, jax.tree_util.tree_map(
        lambda a: a[None], e))[0])(params, ex))(test)
    bad = np.asarray(jax.tree_util.tree_leaves(grads)[0].reshape(7, -1)[:, 0] < 0)
    assert 0 < bad.sum() < 7  # some rows fail, some do not
    ref = _all_gradients_first(obj, params, train, test, solvers.ekfac(tol=math.inf), 2)
    with pytest.raises(influx.errors.SolveError, match=f"{bad.sum()} of 7"):
        attribution.solve_test_vectors(obj, params, train, test, damping=1e-2, solver=solver,
                                       rhs_batch_size=2)
    vecs, sol = attribution.solve_test_vectors(obj, params, train, test, damping=1e-2, solver=solver,
                                               rhs_batch_size=2, on_failure="nan")
    assert (np.asarray(sol.status)[bad] == solvers.Status.MAX_STEPS).all()
    for a, b in zip(jax.tree_util.tree_leaves(vecs), jax.tree_util.tree_leaves(ref)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.isnan(a[bad]).all()
        np.testing.assert_allclose(a[~bad], b[~bad], rtol=1e-9, atol=1e-14)
    scores = influx.influence(obj, params, train, test, damping=1e-2, solver=solver, on_failure="nan")
    assert np.isnan(np.asarray(scores)[bad]).all() and np.isfinite(np.asarray(scores)[~bad]).all()


def test_tiny_budget_splits_the_query_side(cnn, small):
    """The budget of the equality tests also splits the query side (gradients and solves of
    fewer test examples than n_test at a time)."""
    obj, params, train, test = cnn
    op = curvature.operator(obj, params, train, damping=1e-2, chunk_size=N)
    solver = solvers.ekfac(tol=math.inf)
    state = solver.prepare(op)
    f = influx.measurements.bind(obj, None)
    assert attribution._query_batch(f, solver, state, op, params, test, limit=3, budget=None) == 3
    assert attribution._query_batch(f, solver, state, op, params, test, limit=3, budget=small) < 3


def test_ekfac_apply_many_in_small_batches_equals_one_at_a_time(cnn):
    """EK-FAC's apply_many (APPLY_BATCH right-hand sides per vmapped step, 11 = 8 + 3) equals
    apply on each right-hand side alone."""
    obj, params, train, _ = cnn
    op = curvature.operator(obj, params, train, damping=1e-2)
    solver = solvers.ekfac(residual=False)
    state = solver.prepare(op)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    bs = jax.tree_util.tree_unflatten(treedef, [jax.random.normal(k, (11,) + l.shape)
                                                for k, l in zip(keys, leaves)])
    many = solver.apply_batch(state, op, bs)
    one_at_a_time = jax.jit(lambda b: solver.apply(state, op, b))
    for i in range(11):
        one = one_at_a_time(jax.tree_util.tree_map(lambda a: a[i], bs))
        for a, b in zip(jax.tree_util.tree_leaves(many.x), jax.tree_util.tree_leaves(one.x)):
            np.testing.assert_allclose(np.asarray(a[i]), np.asarray(b), rtol=1e-12, atol=1e-15)


def test_chunk_size_for_traces_an_affine_pass_three_times():
    """Each call of ``bytes_at`` traces a whole pass (about 0.5 s on the 1M-parameter
    transformer): an affine pass is sized from the limit, one example and the chord between
    them, exactly, and no size is asked for twice; a convex one (the peak over program
    points) fits on the first guess."""
    for bytes_at, budget, best in [(lambda k: 1000 + 100 * k, 5000, 40),
                                   (lambda k: max(5000 + 10 * k, 1000 + 100 * k), 30_000, 290)]:
        asked = []
        c = _memory.chunk_size_for(lambda k: asked.append(k) or bytes_at(k), budget=budget, limit=1000,
                                   what="x")
        assert bytes_at(c) <= budget < bytes_at(best + 1)
        assert c == best or bytes_at(c) >= _memory.GOOD_ENOUGH * budget, (c, best)
        assert len(asked) == len(set(asked)) <= 3, asked
    assert c < best  # the convex one: the chord lies above it, so its guess is on the safe side


def test_chunk_size_for_nonlinear_passes_always_fits():
    """A pass whose bytes grow faster than the small-chunk slope (a sub-step that switches on
    with size): the chunk returned fits, and is at least 3/4 of the largest that does."""
    def bytes_at(c):
        return 1000 + 100 * c + (50_000 + 300 * c if c > 40 else 0)

    for budget in (3000, 20_000, 70_000, 200_000):
        c = _memory.chunk_size_for(bytes_at, budget=budget, limit=5000, what="x")
        assert bytes_at(c) <= budget
        best = max(k for k in range(1, 5001) if bytes_at(k) <= budget)
        assert c >= 0.75 * best, (budget, c, best)


def test_short_last_query_batch_reuses_the_solve_program(mlp):
    """7 queries in batches of 3: the short last batch is a full-size window over the last 3
    rows, so ``apply_many`` is traced for one batch shape only (a 1-row batch would trace and
    compile it a second time), and every row still holds the answer of its own batch."""
    obj, params, train, test = mlp
    shapes = []

    @dataclasses.dataclass(frozen=True, repr=False)
    class Counting(type(solvers.ekfac())):
        def apply_many(self, state, op, bs):
            shapes.append(jax.tree_util.tree_leaves(bs)[0].shape[0])
            return super().apply_many(state, op, bs)

    solver = Counting(tol=math.inf)
    ref = _all_gradients_first(obj, params, train, test, solvers.ekfac(tol=math.inf), 3)
    got, sol = attribution.solve_test_vectors(obj, params, train, test, damping=1e-2, solver=solver,
                                              rhs_batch_size=3)
    assert set(shapes) == {3}, shapes
    assert np.asarray(sol.status).shape == (7,)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-14)


def test_default_budget_on_cpu_scales_with_the_gradient(monkeypatch):
    """On a CPU host the default is at most 256 MiB, and given the parameters at most the
    larger of 64 MiB and 16 per-example gradients (whole 64 MiB steps): small models get
    small chunks (no slower on CPU, a lower peak), a 10M-parameter one keeps 256 MiB."""
    monkeypatch.setattr(_memory, "available_bytes", lambda device=None: 8 << 30)
    cpu = jax.devices("cpu")[0]

    def params(p):
        return {"w": jax.ShapeDtypeStruct((p,), jnp.float32)}

    assert _memory.default_budget(cpu) == _memory.HOST_CAP == 256 << 20
    assert _memory.default_budget(cpu, params=params(100_000)) == _memory.HOST_FLOOR == 64 << 20
    assert _memory.default_budget(cpu, params=params(3_000_000)) == 128 << 20  # 183 MiB, floored
    assert _memory.default_budget(cpu, params=params(10_000_000)) == 256 << 20
    assert _memory.resolve_budget(None, params=params(100_000)) == 64 << 20
    assert _memory.resolve_budget(12345, params=params(100_000)) == 12345  # a given budget is kept


# ------------------------------------------------------------------ sizes from one symbolic trace
def _counting(fn):
    """``fn`` and a list that grows by one per trace of it."""
    traces = []

    def counted(*a):
        traces.append(1)
        return fn(*a)

    return counted, traces


def _check_sized(fn, make_args, sizes=(1, 3, 17, 64)):
    """``_memory.sized`` traced ``fn`` once, and gives what a trace at each size gives."""
    counted, traces = _counting(fn)
    at = _memory.sized(counted, make_args)
    assert len(traces) == 1
    for c in sizes:
        got, shapes = at(c)
        want, want_shapes = _memory.peak_bytes(fn, *make_args(c), return_shape=True)
        assert got == want, (c, got, want)
        assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(want_shapes)
        assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in
                   zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(want_shapes)))
    assert len(traces) == 1  # asking sizes traced nothing


def test_sized_gives_every_chunk_size_from_one_trace():
    """Per-example gradients (vmap of grad), a Gram matrix (``c x c``: degree 2), and the EK-FAC
    model program of a convolutional net and of a sequence model (exact and sampled factor):
    the symbolic trace's bytes and output shapes equal a trace's at each size."""
    E = importlib.import_module("influx.solvers.ekfac")

    obj, params, (x, y) = make_problem("tanh_mlp", n=8)
    p = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)

    def ex(c):
        return (jax.ShapeDtypeStruct((c,) + x.shape[1:], x.dtype),
                jax.ShapeDtypeStruct((c,) + y.shape[1:], y.dtype))

    def grads(q, t):
        one = jax.grad(lambda r, e: obj.data_loss(r, jax.tree_util.tree_map(lambda a: a[None], e)))
        return jax.vmap(lambda e: one(q, e))(t)

    _check_sized(grads, lambda c: (p, ex(c)))
    _check_sized(lambda a: jnp.tanh(a @ a.T).sum(0), lambda c: (jax.ShapeDtypeStruct((c, 5), jnp.float64),))

    def conv_apply(q, xb):
        h = jax.lax.conv_general_dilated(xb, q["k"], (2, 2), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.tanh(h).reshape(xb.shape[0], -1) @ q["w"]

    for apply_fn, pq, xs in [
        (conv_apply, {"k": jnp.ones((3, 3, 2, 4)) * 0.1, "w": jnp.ones((4 * 4 * 4, 3)) * 0.01},
         jnp.ones((1, 8, 8, 2))),
        (lambda q, xb: jnp.tanh(q["e"][xb] @ q["w"]).mean(-2) @ q["o"],
         {"e": jnp.ones((11, 6)) * 0.1, "w": jnp.ones((6, 5)) * 0.1, "o": jnp.ones((5, 3)) * 0.1},
         jnp.zeros((1, 7), jnp.int32)),
    ]:
        o = influx.Objective(apply_fn, influx.losses.softmax_cross_entropy)
        blks = tuple(E.blocks(apply_fn, pq, xs))
        assert blks
        ps = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), pq)
        for samples in (0, 2):
            def make(c):
                return (ps, (jax.ShapeDtypeStruct((c,) + xs.shape[1:], xs.dtype),
                             jax.ShapeDtypeStruct((c,), jnp.int32)),
                        jax.ShapeDtypeStruct((c,), jnp.int32), jax.ShapeDtypeStruct((c,), jnp.bool_),
                        jax.ShapeDtypeStruct((2,), jnp.uint32))
            _check_sized(functools.partial(E._per_chunk, o, blks, samples), make)


def test_sized_traces_each_size_where_the_program_compares_it():
    """A program that branches on its chunk size (or forms ``c // k``) cannot be traced at a
    symbolic size: ``sized`` then traces it at each size asked, with the same answers."""
    def branchy(a):
        return jnp.sin(a) if a.shape[0] > 4 else jnp.concatenate([a, a])

    def split(a):
        return a.reshape(-1, 2, a.shape[1]).sum(1)

    for fn, sizes in ((branchy, (1, 3, 17)), (split, (2, 8, 40))):
        counted, traces = _counting(fn)
        at = _memory.sized(counted, lambda c: (jax.ShapeDtypeStruct((c, 3), jnp.float32),))
        for c in sizes:
            assert at(c)[0] == _memory.peak_bytes(fn, jax.ShapeDtypeStruct((c, 3), jnp.float32))
        assert len(traces) == 1 + len(sizes)  # the failed symbolic attempt, then one per size


def test_symbolic_sizes_are_polynomials_of_degree_two():
    (c,) = jax.export.symbolic_shape("c")
    np.testing.assert_array_equal(_memory.as_poly(3 * c * c + 2 * c + 5), [5, 2, 3])
    np.testing.assert_array_equal(_memory.as_poly(7), [7, 0, 0])
    for bad in (c // 8, c * c * c):
        with pytest.raises(_memory.NotPolynomial):
            _memory.as_poly(bad)
    b = _memory.Bytes([[10, 3, 0], [0, 5, 0]])
    assert b(1) == 13 and b(10) == 50  # max(10 + 3c, 5c)


def test_fit_sizing_traces_the_model_once_for_any_number_of_sizes(monkeypatch):
    """With a budget that makes the chunk search try several sizes, the EK-FAC model program
    is still traced once by the sizing (at a symbolic size) and once by its call."""
    E = importlib.import_module("influx.solvers.ekfac")

    obj, params, (x, y) = make_problem("tanh_mlp", n=40)
    o1 = influx.Objective(obj.apply_fn, obj.loss_fn, l2=2.345e-3)
    blks = tuple(E.blocks(o1.apply_fn, params, x[:1]))
    row_key = E._row_key(_memory.shape_key((x, y)))
    need = E._model_bytes(o1, blks, 0, _memory.shape_key(params), row_key)(40)[0]
    calls = []
    model = E._pseudo_fn
    monkeypatch.setattr(E, "_pseudo_fn", lambda *a: calls.append(1) or model(*a))
    o2 = influx.Objective(obj.apply_fn, obj.loss_fn, l2=3.456e-3)  # programs no other test traced
    op = curvature.operator(o2, params, (x, y), damping=1e-2)
    solver = solvers.ekfac(memory_budget=need // 3)
    assert 1 < solver.fit_chunk(op) < 40
    solver.prepare(op)
    assert len(calls) == 2, len(calls)
