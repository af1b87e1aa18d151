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
