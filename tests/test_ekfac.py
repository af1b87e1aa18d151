"""K-FAC / EK-FAC solver against dense float64 references.

References are computed independently of the solver: the dense Gauss-Newton matrix
(``curvature.dense``, itself tested against explicit Jacobians), explicit layer inputs
from a hand-written forward pass, explicit output Jacobians (``jax.jacfwd``), and
``numpy.linalg.solve``.
"""

import importlib
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import influx
from influx import curvature, losses, solvers
from influx.errors import InputError, SolveError
from tests.conftest import make_problem

E = importlib.import_module("influx.solvers.ekfac")


def _gnh(op):
    """Undamped dense GNH (float64) of ``op``."""
    return np.asarray(curvature.dense(op)) - float(op.shift) * np.eye(op.dim)


def _layer_index(params, layer):
    """Flat (ravel order) indices of a layer's ``(d_in (+1), d_out)`` matrix."""
    leaves = jax.tree_util.tree_leaves(params)
    offs = np.cumsum([0] + [l.size for l in leaves])
    idx = np.arange(offs[layer.kernel], offs[layer.kernel + 1]).reshape(leaves[layer.kernel].shape)
    if layer.transposed:
        idx = idx.T
    if layer.bias is not None:
        idx = np.concatenate([idx, np.arange(offs[layer.bias], offs[layer.bias + 1])[None]], 0)
    return idx


def _rand_like(params, seed=0):
    flat, unravel = ravel_pytree(params)
    return unravel(jax.random.normal(jax.random.PRNGKey(seed), flat.shape, flat.dtype))


# ------------------------------------------------------------------ layer discovery
def test_layers_found_for_flax_and_hand_written_models():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.tanh(nn.Dense(5)(x))
            x = nn.Dense(4, use_bias=False)(x)
            return nn.Dense(3)(jnp.tanh(x))

    x = jnp.ones((1, 6))
    p = M().init(jax.random.PRNGKey(0), x)["params"]
    lyr = E.blocks(lambda q, xx: M().apply({"params": q}, xx), p, x)
    assert [(l.path, l.d_in, l.d_out, l.bias is not None, l.transposed) for l in lyr] == [
        ("['Dense_0']['kernel']", 6, 5, True, False),
        ("['Dense_1']['kernel']", 5, 4, False, False),
        ("['Dense_2']['kernel']", 4, 3, True, False)]

    # torch layout (d_out, d_in) used as x @ W.T inside a jit-ed helper, and a tied weight
    @jax.jit
    def linear(w, b, h):
        return jnp.matmul(h, w.T) + b

    def apply(q, h):
        h = jnp.tanh(linear(q["w1"], q["b1"], h))
        h = jnp.tanh(h @ q["tied"])
        return h @ q["tied"].T

    q = {"w1": jnp.ones((4, 6)), "b1": jnp.ones(4), "tied": jnp.ones((4, 4))}
    lyr = E.blocks(apply, q, x)
    assert [(l.path, l.d_in, l.d_out, l.bias is not None, l.transposed) for l in lyr] == [
        ("['w1']", 6, 4, True, True)]  # the tied kernel (used twice) falls back to the diagonal


# ------------------------------------------------------------------ factors vs references
@pytest.mark.parametrize("name", ["tanh_mlp", "binary_mlp", "cnn"])
def test_ekfac_eigenvalues_are_the_gnh_diagonal_in_the_kronecker_eigenbasis(name):
    obj, params, data = make_problem(name)
    op = curvature.operator(obj, params, data, kind="gnh", damping=1e-2, chunk_size=10)
    g = _gnh(op)
    st = solvers.ekfac().prepare(op)
    lyr = E.blocks(obj.apply_fn, params, data[0][:1])
    assert lyr
    for k, layer in enumerate(lyr):
        idx = _layer_index(params, layer).reshape(-1)
        q = np.kron(np.asarray(st.qa[k]), np.asarray(st.qs[k]))
        want = np.diag(q.T @ g[np.ix_(idx, idx)] @ q).reshape(st.lam[k].shape)
        np.testing.assert_allclose(np.asarray(st.lam[k]), want, rtol=1e-10, atol=1e-14)
    # leaves outside any dense layer (the CNN's convolution kernel) get the exact GNH diagonal
    leaves = jax.tree_util.tree_leaves(params)
    offs = np.cumsum([0] + [l.size for l in leaves])
    used = {i for l in lyr for i in (l.kernel, l.bias)}
    for i, d in enumerate(jax.tree_util.tree_leaves(st.diag)):
        want = np.diag(g)[offs[i]:offs[i + 1]] if i not in used else 0.0
        np.testing.assert_allclose(np.asarray(d).reshape(-1), want, rtol=1e-10, atol=1e-14)


def test_kfac_factors_equal_explicit_activations_and_output_jacobians():
    obj, params, data = make_problem("tanh_mlp")
    x, y = data
    n = x.shape[0]
    op = curvature.operator(obj, params, data, kind="gnh", damping=1e-2, chunk_size=8)
    st = solvers.kfac().prepare(op)
    w1, b1, w2, b2 = params[0]["w"], params[0]["b"], params[1]["w"], params[1]["b"]
    h = jnp.tanh(x @ w1 + b1)
    aug = lambda a: np.concatenate([a, np.ones((a.shape[0], 1))], 1)
    a1, a2 = aug(np.asarray(x)), aug(np.asarray(h))
    p = jax.nn.softmax(h @ w2 + b2)
    hz = jax.vmap(lambda pi: jnp.diag(pi) - jnp.outer(pi, pi))(p)  # output Hessians (n, 3, 3)
    # d z / d y1 for y1 = x W1 + b1: W2^T diag(1 - h^2)
    j1 = jax.vmap(lambda yi: jax.jacfwd(lambda u: jnp.tanh(u) @ w2 + b2)(yi))(x @ w1 + b1)
    s1 = np.asarray(jnp.einsum("nzi,nzw,nwj->ij", j1, hz, j1)) / n
    s2 = np.asarray(jnp.sum(hz, 0)) / n
    for k, (a, s) in enumerate([(a1, s1), (a2, s2)]):
        amat = a.T @ a / n
        kron_eigs = np.outer(np.linalg.eigvalsh(amat), np.linalg.eigvalsh(s))
        np.testing.assert_allclose(np.sort(np.asarray(st.lam[k]).ravel()),
                                   np.sort(np.clip(kron_eigs, 0, None).ravel()), rtol=1e-8, atol=1e-13)
        qa, qs = np.asarray(st.qa[k]), np.asarray(st.qs[k])
        np.testing.assert_allclose(qa @ np.diag(np.linalg.eigvalsh(amat)) @ qa.T, amat, atol=1e-12)
        np.testing.assert_allclose(qs @ np.diag(np.linalg.eigvalsh(s)) @ qs.T, s, atol=1e-12)


@pytest.mark.parametrize("correct", [True, False])
def test_exact_for_multi_output_linear_regression(correct):
    # GNH = A (x) I exactly for a linear model with squared error: (E)K-FAC is the exact inverse
    kx, ky, kw = jax.random.split(jax.random.PRNGKey(3), 3)
    x = jax.random.normal(kx, (29, 4))
    y = jax.random.normal(ky, (29, 2))
    params = {"w": jax.random.normal(kw, (4, 2)), "b": jnp.zeros(2)}
    obj = influx.Objective(lambda p, xx: xx @ p["w"] + p["b"], losses.squared_error, l2=1e-3)
    op = curvature.operator(obj, params, (x, y), kind="gnh", damping=1e-2, chunk_size=7)
    b = _rand_like(params)
    sol = solvers.ekfac(correct=correct)(op, b)
    want = np.linalg.solve(np.asarray(curvature.dense(op)), np.asarray(ravel_pytree(b)[0]))
    np.testing.assert_allclose(np.asarray(ravel_pytree(sol.x)[0]), want, rtol=1e-10)
    assert float(sol.residual_norm) < 1e-10 and bool(sol.converged)


def test_apply_equals_the_inverse_of_the_factored_matrix_and_batches():
    obj, params, data = make_problem("tanh_mlp")
    op = curvature.operator(obj, params, data, kind="gnh", damping=1e-2, chunk_size=10)
    solver = solvers.ekfac()
    st = solver.prepare(op)
    lyr = E.blocks(obj.apply_fn, params, data[0][:1])
    # the approximating matrix, assembled densely: block-diagonal over layers + diagonal
    p = op.dim
    approx = np.diag(np.asarray(ravel_pytree(st.diag)[0]))
    for k, layer in enumerate(lyr):
        idx = _layer_index(params, layer).reshape(-1)
        q = np.kron(np.asarray(st.qa[k]), np.asarray(st.qs[k]))
        approx[np.ix_(idx, idx)] = q @ np.diag(np.asarray(st.lam[k]).ravel()) @ q.T
    approx += float(op.shift) * np.eye(p)
    bs = jax.vmap(lambda s: _rand_like(params, s))(jnp.arange(3))
    sols = solver.apply_batch(st, op, bs)
    for i in range(3):
        b = jax.tree_util.tree_map(lambda a, i=i: a[i], bs)
        want = np.linalg.solve(approx, np.asarray(ravel_pytree(b)[0]))
        got = np.asarray(ravel_pytree(jax.tree_util.tree_map(lambda a, i=i: a[i], sols.x))[0])
        np.testing.assert_allclose(got, want, rtol=1e-10)
        # the reported residual is the true one against the operator
        r = ravel_pytree(op(jax.tree_util.tree_map(lambda a, i=i: a[i], sols.x)))[0] - ravel_pytree(b)[0]
        np.testing.assert_allclose(float(sols.residual_norm[i]), float(jnp.linalg.norm(r)), rtol=1e-8)


def test_ekfac_beats_kfac_and_approximates_the_gnh_solve():
    obj, params, data = make_problem("tanh_mlp", n=60)
    op = curvature.operator(obj, params, data, kind="gnh", damping=1e-2, chunk_size=16)
    b = _rand_like(params, 5)
    want = np.linalg.solve(np.asarray(curvature.dense(op)), np.asarray(ravel_pytree(b)[0]))
    err = {}
    for name, s in (("ekfac", solvers.ekfac()), ("kfac", solvers.kfac())):
        x = np.asarray(ravel_pytree(s(op, b).x)[0])
        err[name] = np.linalg.norm(x - want) / np.linalg.norm(want)
    assert err["ekfac"] < 0.6 and err["ekfac"] <= err["kfac"] * 1.05, err


def test_self_influence_uses_the_factors_and_matches_influence_diagonal():
    obj, params, data = make_problem("cnn", n=24)
    # the closed form against the solves it stands for, whatever their accuracy (their true
    # relative residuals reach ~2 here: with the default tol=1 influence() refuses them)
    solver = solvers.ekfac(tol=np.inf)
    si = influx.self_influence(obj, params, data, damping=1e-2, solver=solver, chunk_size=10)
    full = influx.influence(obj, params, data, data, damping=1e-2, solver=solver, chunk_size=10)
    np.testing.assert_allclose(np.asarray(si), np.diagonal(np.asarray(full)), rtol=1e-9)
    assert np.all(np.asarray(si) > 0)
    with pytest.raises(SolveError, match="did not converge"):
        influx.influence(obj, params, data, (data[0][:3], data[1][:3]),
                         damping=1e-2, solver=solvers.ekfac(), chunk_size=10)


def test_float32_and_bad_input():
    obj, params, data = make_problem("tanh_mlp")
    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    d32 = (data[0].astype(jnp.float32), data[1])
    op = curvature.operator(obj, p32, d32, kind="gnh", damping=1e-2, chunk_size=10)
    sol = solvers.ekfac()(op, _rand_like(p32))
    assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(sol.x))
    assert np.isfinite(float(sol.residual_norm))
    op0 = curvature.operator(influx.Objective(obj.apply_fn, obj.loss_fn, l2=0.0), params, data,
                             kind="gnh", damping=0.0)
    with pytest.raises(ValueError, match="shift"):
        solvers.ekfac().prepare(op0)
    with pytest.raises(InputError, match="Operator"):
        solvers.ekfac().prepare(lambda v: v)
    op = curvature.operator(obj, params, data, kind="gnh", damping=1e-2)
    bad = jax.tree_util.tree_map(lambda a: a.at[(0,) * a.ndim].set(jnp.nan), params)
    with pytest.raises(ValueError, match="finite"):
        solvers.ekfac()(op, bad)
    with pytest.raises(ValueError, match="tol"):
        solvers.ekfac(tol=-1.0)
    # tol: the approximation's residual is reported honestly as MAX_STEPS
    sol = solvers.ekfac(tol=1e-12)(op, _rand_like(params))
    assert int(sol.status) == solvers.Status.MAX_STEPS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solvers.ekfac(residual=False)(op, _rand_like(params))


# ------------------------------------------------------------------ residual, tol, kind, samples
def test_status_is_converged_only_below_tol_with_the_true_relative_residual():
    obj, params, data = make_problem("tanh_mlp")
    op = curvature.operator(obj, params, data, kind="gnh", damping=1e-2, chunk_size=37)
    dense = np.asarray(curvature.dense(op))
    bs = jax.vmap(lambda s: _rand_like(params, s))(jnp.arange(4))
    st = solvers.ekfac().prepare(op)
    flat = jax.vmap(lambda t: ravel_pytree(t)[0])
    b = np.asarray(flat(bs))
    x = np.linalg.solve(_approx(st, params, op), b.T).T  # the factored inverse, densely
    rel = np.linalg.norm(x @ dense - b, axis=1) / np.linalg.norm(b, axis=1)
    tol = float(np.median(rel))  # half the solves pass, half fail
    with pytest.warns(RuntimeWarning, match="relative residual above tol.*Add damping"):
        sol = solvers.ekfac(tol=tol).apply_batch(st, op, bs)
    np.testing.assert_allclose(np.asarray(flat(sol.x)), x, rtol=1e-9)
    np.testing.assert_allclose(np.asarray(sol.stats["relative_residual"]), rel, rtol=1e-8)
    np.testing.assert_array_equal(np.asarray(sol.converged), rel <= tol)
    np.testing.assert_array_equal(np.asarray(sol.status)[rel > tol], solvers.Status.MAX_STEPS)
    # the default tol is the residual of x = 0; more damping makes the approximation pass it
    op_big = curvature.operator(obj, params, data, kind="gnh", damping=1.0, chunk_size=37)
    assert bool(solvers.ekfac()(op_big, _rand_like(params)).converged)


def _approx(st, params, op):
    """The dense damped matrix K-FAC/EK-FAC inverts: Kronecker blocks plus the diagonal."""
    approx = np.diag(np.asarray(ravel_pytree(st.diag)[0]))
    for k, layer in enumerate(st.blocks):
        idx = _layer_index(params, layer).reshape(-1)
        q = np.kron(np.asarray(st.qa[k]), np.asarray(st.qs[k]))
        approx[np.ix_(idx, idx)] = q @ np.diag(np.asarray(st.lam[k]).ravel()) @ q.T
    return approx + float(op.shift) * np.eye(op.dim)


def test_hessian_kind_warns_that_only_the_gauss_newton_part_is_approximated():
    obj, params, data = make_problem("tanh_mlp")
    op = curvature.operator(obj, params, data, kind="hessian", damping=1e-2, chunk_size=10)
    with pytest.warns(RuntimeWarning, match="only the Gauss-Newton part"):
        solvers.kfac().prepare(op)


def test_sampled_fisher_converges_to_the_exact_factor():
    obj, params, data = make_problem("tanh_mlp", n=12)
    op = curvature.operator(obj, params, data, kind="gnh", damping=1e-2, chunk_size=12)
    exact = solvers.kfac(samples=0).prepare(op)
    # the K-FAC block A (x) S (A is exact: its relative error is the error of S)
    def block(st, k):
        q = np.kron(np.asarray(st.qa[k]), np.asarray(st.qs[k]))
        return q @ np.diag(np.asarray(st.lam[k]).ravel()) @ q.T

    errs = []
    for samples in (4, 64, 1024):
        st = solvers.kfac(samples=samples, key=1).prepare(op)
        errs.append(max(np.linalg.norm(block(st, k) - block(exact, k))
                        / np.linalg.norm(block(exact, k)) for k in range(2)))
    assert errs[2] < errs[0] and errs[2] < 0.15, errs
    # different keys give different factors, equal keys identical ones
    a1 = solvers.kfac(samples=4, key=1).prepare(op)
    a2 = solvers.kfac(samples=4, key=jax.random.PRNGKey(1)).prepare(op)
    a3 = solvers.kfac(samples=4, key=2).prepare(op)
    np.testing.assert_array_equal(np.asarray(a1.lam[1]), np.asarray(a2.lam[1]))
    assert not np.allclose(np.asarray(a1.lam[1]), np.asarray(a3.lam[1]))
    with pytest.raises(InputError, match="samples"):
        solvers.ekfac(samples=-1)


def test_equal_solver_values_share_compiled_programs(caplog):
    # the solver is a value hashing by its options: a second identical prepare + solve (with a
    # new but equal solver and operator) compiles nothing
    obj, params, data = make_problem("tanh_mlp", n=20)
    b = _rand_like(params)

    def run():
        op = curvature.operator(obj, params, data, kind="gnh", damping=1e-2, chunk_size=8)
        return solvers.ekfac(tol=np.inf)(op, b)

    run()
    assert solvers.ekfac(tol=np.inf) == solvers.ekfac(tol=np.inf)
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        run()
    compiles = [r for r in caplog.records if "Compiling" in r.getMessage()]
    assert not compiles, [r.getMessage()[:120] for r in compiles]


def test_output_factor_chosen_automatically_above_the_documented_size():
    # D = 300 outputs per example > EXACT_MAX_OUTPUTS: the automatic choice is the sampled Fisher
    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (4, 3))
    params = {"w": jax.random.normal(kw, (3, 300))}
    obj = influx.Objective(lambda p, xx: jnp.tanh(xx @ p["w"]), losses.squared_error, l2=1e-3)
    op = curvature.operator(obj, params, (x, jnp.zeros((4, 300))), kind="gnh", damping=1e-2)
    assert 300 > E.EXACT_MAX_OUTPUTS
    auto = solvers.kfac().prepare(op)
    sampled = solvers.kfac(samples=E.AUTO_SAMPLES).prepare(op)
    exact = solvers.kfac(samples=0).prepare(op)
    np.testing.assert_array_equal(np.asarray(auto.lam[0]), np.asarray(sampled.lam[0]))
    assert not np.allclose(np.asarray(auto.lam[0]), np.asarray(exact.lam[0]))


def test_eigenvalue_correction_in_bounded_memory_equals_the_one_pass(monkeypatch):
    ar = jax.random.normal(jax.random.PRNGKey(0), (10, 5, 7))
    gr = jax.random.normal(jax.random.PRNGKey(1), (10, 3, 5, 4))
    want = np.einsum("bkij->ij", np.einsum("bti,bktj->bkij", ar, gr) ** 2)
    np.testing.assert_allclose(np.asarray(E._squared_projections(ar, gr)), want, rtol=1e-12)
    monkeypatch.setattr(E, "_CORRECTION_BYTES", 3 * 7 * 4 * 8 * 3)  # three examples at a time
    np.testing.assert_allclose(np.asarray(E._squared_projections(ar, gr)), want, rtol=1e-12)


def test_uneven_fit_chunks_count_every_example_once():
    """Chunks that do not divide N (the last one moved back over examples of the one before,
    those masked): the factors, eigenvalues and diagonal equal one chunk, for an embedding
    (token counts), a dense layer at every position, a diagonal leaf, and sampled labels."""
    rng = np.random.default_rng(0)
    n, t, vocab, d = 20, 3, 7, 4
    params = {"emb": jnp.asarray(rng.normal(size=(vocab, d))), "scale": jnp.asarray(rng.normal(size=d)),
              "w": jnp.asarray(rng.normal(size=(d, 3))), "b": jnp.zeros(3)}

    def apply_fn(p, ids):
        h = jnp.tanh(p["emb"][ids] * p["scale"])
        return jnp.mean(h @ p["w"] + p["b"], axis=-2)

    ids = jnp.asarray(rng.integers(0, vocab, size=(n, t)))
    y = jnp.asarray(rng.integers(0, 3, size=n))
    obj = influx.Objective(apply_fn, losses.softmax_cross_entropy, l2=1e-3)
    op = curvature.operator(obj, params, (ids, y), kind="gnh", damping=1e-2, chunk_size=n)
    for samples in (0, 2):
        one = solvers.ekfac(samples=samples, chunk_size=n).prepare(op)
        for c in (7, 6, 3):
            split = solvers.ekfac(samples=samples, chunk_size=c).prepare(op)
            for a, b in zip(jax.tree_util.tree_leaves(split), jax.tree_util.tree_leaves(one)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)


def test_fit_passes_are_traced_once_beyond_sizing(monkeypatch):
    """The model program of the fit (forward and backward to the block outputs) is traced
    once by the chunk sizing and once by its compiled call, shared by both passes, and each
    pass's sums are traced by the sizing and once by their compiled call: the accumulator's
    shapes come from the sizing's trace, not from another trace (on the 1M-parameter
    transformer of benchmarks/models.py a trace of the model program costs about 0.5 s)."""
    obj, params, (x, y) = make_problem("tanh_mlp", n=20)
    calls = {"model": 0, "factors": 0, "correction": 0}
    stats, corr, model = E._factor_stats, E._correction_stats, E._pseudo_fn

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(E, "_factor_stats", count("factors", stats))
    monkeypatch.setattr(E, "_correction_stats", count("correction", corr))
    monkeypatch.setattr(E, "_pseudo_fn", count("model", model))
    obj = influx.Objective(obj.apply_fn, obj.loss_fn, l2=1.2345e-3)  # programs no other test compiled
    op = curvature.operator(obj, params, (x, y), damping=1e-2)
    solvers.ekfac(chunk_size=7).prepare(op)
    assert calls == {"model": 2, "factors": 2, "correction": 2}, calls
