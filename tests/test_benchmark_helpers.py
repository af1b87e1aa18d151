"""Fast tests of the peer-benchmark helpers (no peer venv, no torch, no training)."""

import importlib
import json

import numpy as np
import pytest

from benchmarks.peers import problem as pb
from benchmarks.peers.report import fmt, replace_section, table


def test_to_influx_scale_divides_by_n_and_casts():
    raw = np.arange(6, dtype=np.float32).reshape(2, 3) * 10
    out = pb.to_influx_scale(raw, 5)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, raw.astype(np.float64) / 5)


def test_to_influx_scale_matches_influx_convention():
    # peers: g_t^T (H + lam I)^-1 g_m; influx: the same divided by N
    rng = np.random.default_rng(0)
    P, T, N = 7, 3, 11
    A = rng.standard_normal((P, P))
    H = A @ A.T + 0.1 * np.eye(P)
    gt, gm = rng.standard_normal((T, P)), rng.standard_normal((N, P))
    peer = gt @ np.linalg.solve(H, gm.T)
    influx = (1.0 / N) * gt @ np.linalg.solve(H, gm.T)
    np.testing.assert_allclose(pb.to_influx_scale(peer, N), influx, rtol=1e-12)


def test_score_accuracy_identity_and_scaling():
    rng = np.random.default_rng(1)
    r = rng.standard_normal((4, 9))
    a = pb.score_accuracy(r, r)
    assert a["finite"] and a["pearson"] == pytest.approx(1.0) and a["rel_error"] == 0.0
    # a positive scale keeps the correlation at 1 but shows in the relative error
    b = pb.score_accuracy(2.0 * r, r)
    assert b["pearson"] == pytest.approx(1.0)
    assert b["rel_error"] == pytest.approx(1.0)
    c = pb.score_accuracy(-r, r)
    assert c["pearson"] == pytest.approx(-1.0) and c["rel_error"] == pytest.approx(2.0)


def test_score_accuracy_matches_numpy_corrcoef():
    rng = np.random.default_rng(2)
    r = rng.standard_normal((3, 20))
    s = r + 0.5 * rng.standard_normal((3, 20))
    a = pb.score_accuracy(s, r)
    assert a["pearson"] == pytest.approx(np.corrcoef(s.ravel(), r.ravel())[0, 1], rel=1e-12)
    assert a["rel_error"] == pytest.approx(np.linalg.norm(s - r) / np.linalg.norm(r))


def test_score_accuracy_nonfinite_is_flagged():
    r = np.ones((2, 3))
    s = r.copy()
    s[0, 1] = np.nan
    a = pb.score_accuracy(s, r)
    assert a["finite"] is False and np.isnan(a["pearson"]) and np.isnan(a["rel_error"])


def test_problem_definitions():
    d, m = pb.PROBLEMS["digits"], pb.PROBLEMS["mnist"]
    assert d.n_params == 64 * 32 + 32 + 32 * 10 + 10 == 2410
    assert m.n_params == 784 * 16 + 16 + 16 * 10 + 10 == 12730
    assert d.regularization == pytest.approx(d.l2 + d.damping)
    # MNIST's damped Hessian must be PD for the CG reference: damping >= 1e-2
    assert m.reference == "cg" and m.damping >= 1e-2
    assert d.reference == "dense"
    # pyDVL's Krylov dimension (scipy eigsh's default ncv) for rank 32
    assert d.arnoldi_krylov == 65 and m.arnoldi_krylov == 65


def test_forward_and_ce_numpy():
    w = pb.init_weights(pb.Problem(name="t", dataset="digits", sizes=(3, 4, 2)))
    assert w["w0"].shape == (3, 4) and w["b1"].shape == (2,)
    x = np.random.default_rng(3).standard_normal((5, 3)).astype(np.float32)
    z = pb.forward_numpy(w, x)
    expect = np.tanh(x.astype(np.float64) @ w["w0"] + w["b0"]) @ w["w1"] + w["b1"]
    np.testing.assert_allclose(z, expect, rtol=1e-12)
    y = np.array([0, 1, 1, 0, 1])
    ce = pb.per_example_ce_numpy(z, y)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    np.testing.assert_allclose(ce, -np.log(p[np.arange(5), y]), rtol=1e-12)


def test_test_indices_fixed_and_distinct():
    p = pb.PROBLEMS["digits"]
    a, b = pb.test_indices(p, 360), pb.test_indices(p, 360)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) == p.n_test and a.max() < 360


def test_report_helpers(tmp_path):
    assert fmt(None) == "-" and fmt(float("nan")) == "nan" and fmt(3) == "3"
    assert fmt(1.23456) == "1.23" and fmt(1e-5) == "1.00e-05"
    t = table(["a", "b"], [[1, None]])
    assert t.splitlines()[2] == "| 1 | - |"
    readme = tmp_path / "README.md"
    replace_section(readme, "## Peers", "first")
    replace_section(readme, "## Other", "other")
    replace_section(readme, "## Peers", "second")
    text = readme.read_text()
    assert "second" in text and "first" not in text and "other" in text


@pytest.mark.parametrize("mod", ["benchmarks.peers.problem", "benchmarks.peers.measure",
                                 "benchmarks.peers.report", "benchmarks.peers.jax_side",
                                 "benchmarks.compare_peers", "benchmarks.run_all"])
def test_torch_free_modules_import(mod):
    import sys

    had_torch = "torch" in sys.modules
    importlib.import_module(mod)
    assert had_torch or "torch" not in sys.modules, f"{mod} imported torch"


def test_family_summary_and_target():
    from benchmarks import compare_peers as cp

    acc = {"pearson": 0.99, "rel_error": 0.01, "finite": True}
    res = {"problems": [{"problem": "p", "families": [{"family": "cg", "entries": {
        "influx_cg": {"method": "influx_cg", "seconds": 1.0, "vs_hessian": acc},
        "slow": {"method": "slow", "seconds": 20.0, "vs_hessian": acc},
        "fast": {"method": "fast", "seconds": 3.0, "vs_hessian": acc},
        "out": {"method": "out", "error": "timeout", "timeout": True, "timeout_s": 30.0},
    }}]}]}
    rows = cp.family_summary(res)
    assert rows[0][4] == "fast" and rows[0][6] == "3" and rows[0][7].startswith("missed")
    res["problems"][0]["families"][0]["entries"]["fast"]["seconds"] = 6.0
    assert cp.family_summary(res)[0][7] == "met"
    json.dumps(rows)


def test_measure_peak_rss():
    from benchmarks.peers.measure import PeakRSS

    with PeakRSS() as m:
        buf = np.ones(8 * 2**20 // 8)  # 8 MiB
        buf += 1
    assert m.increase >= 0 and m.peak >= m.base


def test_merge_problems_later_entries_win_unless_skipped():
    from benchmarks import compare_peers as cp

    a = {"problem": "p", "families": [{"family": "cg", "entries": {
        "x": {"seconds": 1.0}, "y": {"seconds": 2.0}}}]}
    b = {"problem": "p", "families": [
        {"family": "cg", "entries": {"x": {"skipped": "no"}, "y": {"seconds": 3.0}}},
        {"family": "lissa", "entries": {"z": {"seconds": 4.0}}}]}
    (m,) = cp.merge_problems([a, b])
    fams = {f["family"]: f["entries"] for f in m["families"]}
    assert fams["cg"]["x"] == {"seconds": 1.0} and fams["cg"]["y"] == {"seconds": 3.0}
    assert fams["lissa"]["z"] == {"seconds": 4.0}
    assert a["families"][0]["entries"]["y"] == {"seconds": 2.0}  # inputs untouched


def test_skip_rules_and_timeouts():
    import argparse
    import time

    from benchmarks import compare_peers as cp

    args = argparse.Namespace(skip=[], full=False, quick=False, peer_timeout=None,
                              budget=1000.0, t_start=time.perf_counter())
    mnist, digits = pb.PROBLEMS["mnist"], pb.PROBLEMS["digits"]
    assert cp.skip_reason("pydvl_direct", mnist, args) is not None
    assert cp.skip_reason("pydvl_direct", digits, args) is None
    assert cp.peer_timeout("pydvl_cg", digits, args) == cp.SLOW_PEERS["pydvl_cg"]
    assert cp.peer_timeout("pydvl_cg_block", digits, args) == cp.PEER_TIMEOUT["digits"]
    args.quick = True
    assert cp.skip_reason("pydvl_lissa", digits, args) is not None
    args.quick, args.full = False, True
    assert cp.skip_reason("pydvl_direct", mnist, args) is None


@pytest.mark.slow
def test_cg_reference_matches_dense_reference():
    """The MNIST reference path (float64 CG) against the digits one (dense Cholesky) on a tiny
    MLP, and the dense curvature builder against jax.hessian."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from benchmarks.peers import jax_side

    prob = pb.Problem(name="tiny", dataset="digits", sizes=(5, 4, 3), n_test=3, damping=0.5)
    rng = np.random.default_rng(0)
    data = {"x_train": rng.standard_normal((40, 5)).astype(np.float32),
            "y_train": rng.integers(0, 3, 40).astype(np.int32),
            "x_test": rng.standard_normal((6, 5)).astype(np.float32),
            "y_test": rng.integers(0, 3, 6).astype(np.int32)}
    w = pb.init_weights(prob)
    dense = jax_side.dense_reference(prob, w, data)
    cg = jax_side.cg_reference(prob, w, data)
    for k in ("scores_hessian", "scores_gnh"):
        np.testing.assert_allclose(cg[k], dense[k], rtol=1e-7, atol=1e-12)
    assert cg["info_hessian"]["max_rel_residual"] <= 1e-9
    params = jax_side.weights_to_params(w, jnp.float64)
    flat, unravel = ravel_pytree(params)
    x, y = jnp.asarray(data["x_train"], jnp.float64), jnp.asarray(data["y_train"])

    def mean_loss(f):
        return jnp.mean(jax_side.ce_per_example(jax_side.apply_fn(unravel(f), x), y))

    H = np.asarray(jax.jit(jax.hessian(mean_loss))(flat))
    np.testing.assert_allclose(jax_side.dense_curvature(params, x, y, kind="hessian"), H,
                               atol=1e-12)
    ext = jax_side.lanczos_extremes(lambda v: H @ v, H.shape[0])
    ev = np.linalg.eigvalsh(H)
    assert ext["eig_max"] == pytest.approx(ev[-1]) and ext["eig_min"] == pytest.approx(ev[0])
