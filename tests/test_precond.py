"""Preconditioned CG (EK-FAC / K-FAC / Jacobi) and CG's host-driven loop, against dense
float64 solves (``np.linalg.solve``)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import influx
from influx import curvature, losses, solvers
from influx.errors import InputError
from influx.solvers import Status
from influx.solvers.cg import has_convolution
from tests.conftest import make_problem

jax.config.update("jax_enable_x64", True)


def flat(tree):
    return ravel_pytree(tree)[0]


@functools.cache
def _scaled_logistic():
    """Softmax regression on features scaled over three decades: the GNH is badly
    conditioned (cond ~5e4) but close to Kronecker-factored (one dense layer), the case
    where K-FAC preconditioning pays off most."""
    n, d, k = 64, 16, 4
    kx, ky, kp = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (n, d)) * jnp.logspace(-1.5, 1.5, d)
    y = jax.random.randint(ky, (n,), 0, k)
    params = {"w": 0.1 * jax.random.normal(kp, (d, k)), "b": jnp.zeros(k)}
    obj = influx.Objective(lambda p, x: x @ p["w"] + p["b"], losses.softmax_cross_entropy, l2=1e-3)
    op = curvature.operator(obj, params, (x, y), kind="gnh", damping=1e-3)
    return op, _reference(op, seed=1, k=2)


@functools.cache
def _cnn():
    """The conftest conv net (a convolution and a dense layer, 117 parameters)."""
    obj, params, data = make_problem("cnn")
    op = curvature.operator(obj, params, data, kind="gnh", damping=1e-3)
    return op, _reference(op, seed=2, k=2)


def _reference(op, *, seed, k):
    a = np.asarray(curvature.dense(op))
    _, unravel = ravel_pytree(op.params)
    bs = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (k, a.shape[0])))
    return {"unravel": unravel, "bs": bs, "xs": np.linalg.solve(a, bs.T).T, "a": a}


def _rel(x, ref):
    return float(np.linalg.norm(np.asarray(flat(x)) - ref) / np.linalg.norm(ref))


def test_ekfac_preconditioner_converges_in_far_fewer_steps():
    op, ref = _scaled_logistic()
    b = ref["unravel"](jnp.asarray(ref["bs"][0]))
    plain = solvers.cg(tol=1e-10, max_steps=1000)(op, b)
    pre = solvers.cg(tol=1e-10, max_steps=1000, preconditioner=solvers.ekfac())(op, b)
    for sol in (plain, pre):
        assert int(sol.status) == Status.CONVERGED, solvers.status_message(sol.status)
        assert _rel(sol.x, ref["xs"][0]) < 1e-8
    # the reported residual is the true one
    true_res = np.linalg.norm(ref["a"] @ np.asarray(flat(pre.x)) - ref["bs"][0])
    np.testing.assert_allclose(float(pre.residual_norm), true_res, rtol=1e-2)
    # measured: 222 steps without, 43 with EK-FAC (the bound leaves room for rounding)
    steps_plain, steps_pre = int(plain.stats["steps"]), int(pre.stats["steps"])
    assert 3 * steps_pre < steps_plain, (steps_pre, steps_plain)


def test_kfac_preconditioned_block_cg_on_a_conv_net():
    """Block PCG with K-FAC on a batch (Jacobi-preconditioned CG: tests/test_solvers.py)."""
    op, ref = _cnn()
    bs = jax.vmap(ref["unravel"])(jnp.asarray(ref["bs"]))
    solver = solvers.cg(tol=1e-10, max_steps=500, preconditioner="kfac", block=True, loop="compiled")
    sols = solver(op, bs, batched=True)
    assert np.all(np.asarray(sols.status) == Status.CONVERGED), sols.status
    for i in range(2):
        assert _rel(jax.tree_util.tree_map(lambda a, i=i: a[i], sols.x), ref["xs"][i]) < 1e-8
    assert solvers.cg(preconditioner="kfac") == solvers.cg(preconditioner=solvers.kfac())
    # precond_damping shifts the preconditioner only
    state = solvers.cg(preconditioner="kfac", precond_damping=0.5).prepare(op)
    np.testing.assert_allclose(float(state["precond"].shift), float(op.shift) + 0.5)


def test_host_loop_equals_compiled_loop_and_auto_picks_host_for_convolutions(capsys):
    op, ref = _cnn()
    b = ref["unravel"](jnp.asarray(ref["bs"][0]))
    # a fixed number of steps below the tolerance: the iterates themselves are compared
    opts = dict(tol=1e-14, max_steps=12, recompute_every=5, preconditioner="kfac")
    host = solvers.cg(loop="host", progress=True, **opts)(op, b)
    comp = solvers.cg(loop="compiled", **opts)(op, b)
    assert int(host.status) == int(comp.status) == Status.MAX_STEPS
    assert int(host.iterations) == int(comp.iterations) and int(host.stats["steps"]) == 12
    np.testing.assert_allclose(flat(host.x), flat(comp.x), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(float(host.residual_norm), float(comp.residual_norm), rtol=1e-9)
    assert "influx.cg" in capsys.readouterr().err  # the progress bar
    # "auto": host-driven for a conv net on CPU, compiled for an MLP, compiled under a trace
    assert has_convolution(op)
    mlp_op = curvature.operator(*make_problem("tanh_mlp"), kind="gnh", damping=1e-2)
    assert not has_convolution(mlp_op)
    auto = solvers.cg(**opts)
    assert auto._on_host({}, op, b) == (jax.default_backend() == "cpu")
    assert not auto._on_host({}, mlp_op, jax.tree_util.tree_map(jnp.zeros_like, mlp_op.params))
    assert auto.host_driven(op) == (jax.default_backend() == "cpu")
    assert not solvers.cg(loop="compiled").host_driven(op)
    assert solvers.cg(progress=True) == solvers.cg(progress=False)  # not part of the identity


def test_bad_preconditioners_are_refused_with_what_to_use():
    with pytest.raises(InputError, match="fixed linear"):
        solvers.cg(preconditioner=solvers.cg())
    with pytest.raises(InputError, match="fixed linear"):
        solvers.cg(preconditioner=solvers.lissa())
    with pytest.raises(InputError, match="preconditioner must be"):
        solvers.cg(preconditioner="ekfac2")
    with pytest.raises(InputError, match="loop must be"):
        solvers.cg(loop="python")
    with pytest.raises(InputError, match="progress"):
        solvers.cg(progress="yes")
    with pytest.raises(InputError, match="precond_damping"):
        solvers.cg(preconditioner="ekfac", precond_damping=-1.0)
    # a Kronecker-factored preconditioner needs a positive shift (its eigenvalues can be 0)
    obj, params, data = make_problem("logistic")
    obj0 = influx.Objective(obj.apply_fn, obj.loss_fn, l2=0.0)
    op0 = curvature.operator(obj0, params, data, kind="gnh", damping=0.0)
    with pytest.raises(InputError, match=r"cg: the preconditioner .*ekfac.* shift"):
        solvers.cg(preconditioner=solvers.ekfac()).prepare(op0)


# ------------------------------------------------------------------ deflation (cg(deflate=k))
@functools.cache
def _relu_net():
    """A trained two-layer ReLU net (6-12-4, softmax, N = 200): its GNH is "low rank plus
    shift" (half of its eigenvalues within 3x of the shift, ReLU rescaling symmetry between
    the layers), the case where EK-FAC preconditioning *adds* CG steps (its Kronecker
    blocks have curvature where the GNH has none) and deflating the top of the spectrum
    removes most of them."""
    import optax

    n, d, h, k = 200, 6, 12, 4
    kx, ky, k1, k2 = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(kx, (n, d))
    y = jnp.argmax(x @ jax.random.normal(ky, (d, k)) + 0.5 * jax.random.normal(ky, (n, k)), 1)
    params = [{"w": jax.random.normal(k1, (d, h)) * np.sqrt(2 / d), "b": jnp.zeros(h)},
              {"w": jax.random.normal(k2, (h, k)) / np.sqrt(h), "b": jnp.zeros(k)}]

    def apply(p, x):
        return jax.nn.relu(x @ p[0]["w"] + p[0]["b"]) @ p[1]["w"] + p[1]["b"]

    obj = influx.Objective(apply, losses.softmax_cross_entropy, l2=1e-3)
    opt = optax.adam(1e-2)

    @jax.jit
    def train(p):
        def step(c, _):
            p, s = c
            u, s = opt.update(jax.grad(obj)(p, (x, y)), s, p)
            return (optax.apply_updates(p, u), s), None
        return jax.lax.scan(step, (p, opt.init(p)), None, length=300)[0][0]

    op = curvature.operator(obj, train(params), (x, y), kind="gnh", damping=1e-3)
    return op, _reference(op, seed=3, k=2)


# shared solver values: equal values share their compiled programs across the tests below
_OPTS = dict(tol=1e-10, max_steps=1000, loop="compiled")
_PLAIN, _EK = solvers.cg(**_OPTS), solvers.cg(preconditioner="ekfac", **_OPTS)
_DEFL, _EK_DEFL = solvers.cg(deflate=30, **_OPTS), solvers.cg(deflate=30, preconditioner="ekfac", **_OPTS)


def _dense_psolve(solver, state, op):
    flat_p, unravel = ravel_pytree(op.params)
    psolve = solver._psolve(state, unravel, flat_p.dtype)
    return np.asarray(jax.vmap(psolve)(jnp.eye(flat_p.shape[0]))).T


def test_deflation_matches_dense_solve_and_cuts_steps_where_ekfac_does_not():
    op, ref = _relu_net()
    b = ref["unravel"](jnp.asarray(ref["bs"][0]))
    plain, ek, defl = _PLAIN(op, b), _EK(op, b), _DEFL(op, b)
    for sol in (plain, ek, defl):
        assert int(sol.status) == Status.CONVERGED, solvers.status_message(sol.status)
        assert _rel(sol.x, ref["xs"][0]) < 1e-7
    steps = {k: int(s.stats["steps"]) for k, s in (("plain", plain), ("ekfac", ek), ("deflate", defl))}
    # measured: plain 128, EK-FAC 185-190, deflate=30 46 steps (P = 136)
    assert steps["ekfac"] > steps["plain"], steps  # the old preconditioner does not help here
    assert 2 * steps["deflate"] < steps["plain"], steps
    np.testing.assert_allclose(float(defl.residual_norm),
                               np.linalg.norm(ref["a"] @ np.asarray(flat(defl.x)) - ref["bs"][0]), rtol=1e-2)


def test_deflation_preconditioner_is_spd_and_maps_the_ritz_pairs_to_one():
    """Without a preconditioner the Ritz values are the top eigenvalues of A (Lanczos
    converges at the ends first) and ``M^-1 = I/s + U (Theta^-1 - 1/s) U^T``; with EK-FAC they
    are the top eigenvalues of ``M_ek^-1 A`` and ``M^-1 = M_ek^-1 + U (Theta^-1 - 1) U^T``
    (``U`` M_ek-orthonormal). Either way ``M^-1 A u_i = u_i`` for every converged Ritz pair."""
    op, ref = _relu_net()
    a = ref["a"]
    shift = float(op.shift)
    for pre, solver in ((None, _DEFL), ("ekfac", _EK_DEFL)):
        state = solver.prepare(op)
        minv = _dense_psolve(solver, state, op)
        np.testing.assert_allclose(minv, minv.T, atol=1e-10 * np.abs(minv).max())
        assert np.linalg.eigvalsh(0.5 * (minv + minv.T)).min() > 0
        if pre is None:
            base = np.eye(a.shape[0])
            np.testing.assert_allclose(np.asarray(state["deflation"]["scale"]), 1 / shift)
        else:
            base = _dense_psolve(_EK, {"precond": state["precond"]}, op)
        chol = np.linalg.cholesky(a)
        want = np.sort(np.linalg.eigvalsh(chol.T @ base @ chol))[::-1][:4]
        ritz = np.sort(np.asarray(state["deflation"]["ritz"]))[::-1][:4]
        np.testing.assert_allclose(ritz, want, rtol=1e-6)
        # the top Ritz vectors (converged) are mapped to eigenvalue 1 of M^-1 A
        u = np.asarray(state["deflation"]["u"])[np.argsort(-np.asarray(state["deflation"]["ritz"]))[:4]]
        np.testing.assert_allclose(minv @ (a @ u.T), u.T, atol=1e-5 * np.abs(u).max())
        # the spectrum of M^-1 A is narrower than that of M_base^-1 A
        ev_new = np.linalg.eigvalsh(chol.T @ minv @ chol)
        ev_old = np.linalg.eigvalsh(chol.T @ base @ chol)
        assert ev_new.max() / ev_new.min() < 0.5 * ev_old.max() / ev_old.min()


@pytest.mark.slow
def test_deflation_host_loop_and_block_cg():
    op, ref = _relu_net()
    bs = jax.vmap(ref["unravel"])(jnp.asarray(ref["bs"]))
    comp = solvers.cg(deflate=12, loop="compiled")
    host = solvers.cg(deflate=12, loop="host")
    s_c, s_h = comp.prepare(op), host.prepare(op)
    np.testing.assert_allclose(s_h["deflation"]["u"], s_c["deflation"]["u"], rtol=1e-8, atol=1e-10)
    sols = solvers.cg(deflate=12, block=True, tol=1e-10, loop="compiled")(op, bs, batched=True)
    assert np.all(np.asarray(sols.status) == Status.CONVERGED)
    for i in range(2):
        assert _rel(jax.tree_util.tree_map(lambda a, i=i: a[i], sols.x), ref["xs"][i]) < 1e-7


def test_deflation_is_an_option_of_the_value_and_bad_input_is_refused():
    assert solvers.cg(deflate=12) == solvers.cg(deflate=12) != solvers.cg(deflate=13)
    assert hash(solvers.cg(deflate=12)) == hash(solvers.cg(deflate=12))
    with pytest.raises(InputError, match="deflate"):
        solvers.cg(deflate=-1)
    obj, params, data = make_problem("logistic")
    op0 = curvature.operator(influx.Objective(obj.apply_fn, obj.loss_fn, l2=0.0), params, data,
                             kind="gnh", damping=0.0)
    with pytest.raises(InputError, match="deflate=4 without a preconditioner"):
        solvers.cg(deflate=4).prepare(op0)


def test_kronecker_preconditioner_is_built_for_exactly_the_operator_cg_solves():
    """One example and one dense layer with bias: K-FAC and EK-FAC are exact, so ``M`` as CG
    applies it must equal ``A`` (same mean over the data, same l2 + damping shift, same
    output factor) and PCG must converge in one step; a mismatch of scale or shift fails."""
    obj, params, (x, y) = make_problem("logistic")
    op = curvature.operator(obj, params, (x[:1], y[:1]), kind="gnh", damping=3e-3)
    a = np.asarray(curvature.dense(op))
    b = jax.tree_util.tree_map(lambda l: jnp.ones_like(l), params)
    for pre in ("kfac", "ekfac"):
        solver = solvers.cg(preconditioner=pre, tol=1e-10, loop="compiled")
        minv = _dense_psolve(solver, solver.prepare(op), op)
        np.testing.assert_allclose(minv @ a, np.eye(a.shape[0]), atol=1e-8)
        sol = solver(op, b)
        assert int(sol.status) == Status.CONVERGED and int(sol.stats["steps"]) == 1
