"""The three studies: small configurations in the default run, the full grids marked slow.

Each test checks more than "it runs": the shallow, weight-decayed net's influence must
track leave-one-out (fragility), the gaps must bound the total discrepancy and the
linearised PBRF must track the PBRF (gaps), self-influence must beat a random ranking
(mislabel), and every reported number must be finite and in range.
"""

import json
import math

import numpy as np
import pytest

from influx import studies
from influx.errors import InputError
from influx.studies import _common, fragility, gaps, mislabel


def _in_range(v, lo=-1.0, hi=1.0, *, allow_nan=True):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return allow_nan
    return lo - 1e-12 <= v <= hi + 1e-12


# --------------------------------------------------------------------------- fragility


@pytest.fixture(scope="module")
def frag_result():
    cfg = fragility.quick(depths=(1,), weight_decays=(1e-3,), top_k=6, n_test_points=3, progress=False)
    return fragility.run(cfg)


def test_fragility_quick_shallow_net_tracks_loo(frag_result, tmp_path):
    (row,) = frag_result.rows
    assert row.depth == 1 and row.l2 == 1e-3 and row.n_points == 3
    assert row.converged and row.grad_norm < 1e-5  # theta_s is a minimiser
    assert row.loo_converged == 1.0
    # Basu et al.: influence is accurate for shallow, weight-decayed nets.
    assert row.pearson > 0.7, row
    for v in (row.pearson, row.spearman, row.pearson_mean, row.pearson_min, row.pearson_max,
              row.spearman_mean):
        assert _in_range(v)
    assert row.pearson_min <= row.pearson_mean <= row.pearson_max
    # the highest-loss test point comes first
    losses = [p["test_loss"] for p in row.points]
    assert losses[0] == max(losses)
    for p in row.points:
        assert len(p["pred"]) == len(p["actual"]) == 6
        # top-k by |influence|: sorted by decreasing magnitude
        assert np.all(np.diff(np.abs(p["pred"])) <= 1e-15)
    d = frag_result.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["rows"][0]["depth"] == 1
    md = str(frag_result)
    assert "pearson" in md and md.count("\n|") >= 2
    path = frag_result.plot(tmp_path / "f.png")
    assert path.stat().st_size > 1000


def test_fragility_sign_matches_loo(frag_result):
    """Predicted and actual changes agree in sign for the largest predicted effect, and in
    sign for most of the top-k (the sign convention of influence and LOO is the same)."""
    row = frag_result.rows[0]
    p = row.points[0]
    pred, act = np.asarray(p["pred"]), np.asarray(p["actual"])
    assert np.sign(pred[0]) == np.sign(act[0])
    assert np.mean(np.sign(pred) == np.sign(act)) >= 0.5


def test_fragility_plot_explains_every_marker_and_has_no_offsets():
    """fragility.png: the legend names both kinds of points; panels of very different scales
    (1e-4 next to 1) all use plain tick labels, none an offset or multiplier."""
    import types

    from influx import plots

    rng = np.random.default_rng(0)

    def row(depth, l2, scale):
        draw = lambda: (scale * rng.normal(size=8)).tolist()
        pts = [{"pred": draw(), "actual": draw()} for _ in range(3)]
        return types.SimpleNamespace(depth=depth, width=8, l2=l2, pearson=0.9, pearson_mean=0.8, n_valid=3,
                                     points=pts)

    res = types.SimpleNamespace(rows=[row(1, 0.0, 1e-4), row(1, 1e-3, 1.0), row(3, 0.0, 2e-3)],
                                config=fragility.quick(top_k=8))
    fig = plots.fragility_figure(res)
    fig.canvas.draw()
    for ax in fig.axes:
        assert ax.xaxis.get_offset_text().get_text() == ""
        assert ax.yaxis.get_offset_text().get_text() == ""
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[0] == "highest-loss test point" and "other 2 test points" in labels[1]
    assert "top-8" in legend.get_title().get_text()


def test_fragility_config_validation():
    with pytest.raises(ValueError, match="depths"):
        fragility.FragilityConfig(depths=(0, 1))
    with pytest.raises(ValueError, match="depths"):
        fragility.FragilityConfig(depths=(1.5,))
    with pytest.raises(ValueError, match="depths"):
        fragility.FragilityConfig(depths=())
    with pytest.raises(ValueError, match="weight_decays"):
        fragility.FragilityConfig(weight_decays=(-1.0,))
    with pytest.raises(ValueError, match="solver"):
        fragility.FragilityConfig(solver="magic")
    with pytest.raises(TypeError):
        fragility.run("iris")
    # sizes too small for the study are refused before any work
    with pytest.raises(InputError, match="top_k"):
        fragility.FragilityConfig(top_k=2)
    with pytest.raises(InputError, match="n_train=5 is too small"):
        fragility.FragilityConfig(n_train=5, top_k=6)


def test_unknown_dataset_is_a_value_error():
    with pytest.raises(ValueError, match="unknown data set"):
        fragility.run(fragility.quick(dataset="nope", progress=False))
    with pytest.raises(FileNotFoundError):
        gaps.run(gaps.quick(datasets=("concrete",), data_dir="/nonexistent/dir", progress=False))


# --------------------------------------------------------------------------- gaps


@pytest.fixture(scope="module")
def gaps_result():
    cfg = gaps.quick(datasets=("diabetes",), steps=(200,), n_removed=5, n_test_points=8, progress=False)
    return gaps.run(cfg)


def test_gaps_quick(gaps_result, tmp_path):
    (row,) = gaps_result.rows
    assert row.dataset == "diabetes" and row.task == "regression"
    assert set(row.gaps) == set(gaps.GAP_NAMES)
    for v in row.gaps.values():
        assert np.isfinite(v) and v >= 0
    # the gaps telescope: mean |cold LOO - influence| <= sum of the mean |gaps|
    d = {k: np.asarray(v) for k, v in row.deltas.items()}
    total = float(np.mean(np.abs(d["cold_loo"] - d["influence"])))
    assert total <= sum(row.gaps.values()) * (1 + 1e-9)
    for ref in (row.corr_loo, row.corr_pbrf):
        for o in gaps.OBJECTS:
            assert _in_range(ref[o]["pearson"]) and _in_range(ref[o]["spearman"])
    assert row.corr_pbrf["pbrf"]["pearson"] == pytest.approx(1.0)
    # Bae et al.: the linearised PBRF (= exact GNH influence) tracks the PBRF closely
    assert row.corr_pbrf["linearized"]["pearson"] > 0.8
    s = gaps_result.summary()
    assert abs(sum(s["gap_share"].values()) - 1.0) < 1e-9
    json.dumps(gaps_result.to_dict(), allow_nan=False)
    assert "warm start gap" in str(gaps_result)
    assert gaps_result.plot(tmp_path / "g.png").stat().st_size > 1000


def test_gaps_config_validation():
    with pytest.raises(ValueError, match="widths"):
        gaps.GapsConfig(widths=(0,))
    with pytest.raises(ValueError, match="steps"):
        gaps.GapsConfig(steps=("10",))
    with pytest.raises(ValueError, match="solver"):
        gaps.GapsConfig(solver="x")
    assert gaps.GapsConfig(datasets="diabetes,digits").datasets == ("diabetes", "digits")
    for bad in ("", ("",), ("diabetes", " ")):
        with pytest.raises(InputError, match="datasets"):
            gaps.GapsConfig(datasets=bad)
    with pytest.raises(InputError, match="n_train=10 is too small"):
        gaps.GapsConfig(n_train=10, n_removed=10)


# --------------------------------------------------------------------------- mislabel


@pytest.fixture(scope="module")
def mis_result():
    cfg = mislabel.quick(n_train=200, methods=("direct", "arnoldi", "loss", "random"), progress=False)
    return mislabel.run(cfg)


def test_mislabel_quick(mis_result, tmp_path):
    r = mis_result
    assert r.n_train == 200 and r.n_flipped == 20
    by = {row.method: row for row in r.rows}
    assert list(by) == ["direct", "arnoldi", "loss", "random"]
    for row in r.rows:
        vals = [row.found[f"{q:g}"] for q in r.config.fractions]
        assert all(_in_range(v, 0.0, 1.0, allow_nan=False) for v in vals)
        assert np.all(np.diff(vals) >= 0)  # more inspected, more found
        assert _in_range(row.auc, 0.0, 1.0, allow_nan=False)
        c = np.asarray(row.curve["found"])
        assert c[0] == 0 and c[-1] == pytest.approx(1.0) and np.all(np.diff(c) >= -1e-12)
    # self-influence finds flipped labels far better than chance
    assert by["direct"].found["0.3"] > by["random"].found["0.3"] + 0.3
    assert by["direct"].auc > 0.75
    json.dumps(r.to_dict(), allow_nan=False)
    assert "found @30%" in str(r)
    assert r.plot(tmp_path / "m.png").stat().st_size > 1000


def test_mislabel_config_validation():
    with pytest.raises(ValueError, match="unknown method"):
        mislabel.MislabelConfig(methods=("direct", "oracle"))
    with pytest.raises(ValueError, match="fraction"):
        mislabel.MislabelConfig(fraction=1.5)
    with pytest.raises(ValueError, match="fractions"):
        mislabel.MislabelConfig(fractions=(0.1, 2.0))
    with pytest.raises(ValueError, match="classification"):
        mislabel.run(mislabel.quick(dataset="diabetes", n_train=None, progress=False))
    # one example flips no label (the study reported all-NaN before): refused
    with pytest.raises(InputError, match="n_train=1 is too small"):
        mislabel.quick(n_train=1)
    with pytest.raises(InputError, match="at least 20"):
        mislabel.quick(n_train=19)
    assert mislabel.quick(n_train=20).n_train == 20


def test_small_loaded_split_is_refused(tmp_path):
    """A data file smaller than the study needs fails after loading, before training."""
    rows = np.random.default_rng(0).normal(size=(12, 3))
    rows[:, -1] = np.arange(12) % 3
    path = tmp_path / "tiny.txt"
    np.savetxt(path, rows)
    with pytest.raises(InputError, match="too small"):
        gaps.run(gaps.quick(datasets=(str(path),), n_train=None, progress=False))


# --------------------------------------------------------------------------- helpers


def test_common_helpers():
    assert _common.check_grid((1, 2), "g") == (1, 2)
    with pytest.raises(ValueError):
        _common.check_grid((True,), "g")
    assert _common.jsonable({"a": float("nan"), "b": np.arange(2)}) == {"a": None, "b": [0, 1]}
    table = _common.markdown_table(("a", "b"), [(1, 0.5), (2, float("nan"))])
    assert table.splitlines()[0].startswith("|") and "nan" in table
    assert studies.FragilityConfig is fragility.FragilityConfig


# --------------------------------------------------------------------------- full grids


@pytest.mark.slow
def test_fragility_full_grid():
    res = fragility.run(fragility.FragilityConfig(progress=False))
    assert len(res.rows) == 16
    for row in res.rows:
        assert _in_range(row.pearson) and _in_range(row.pearson_mean)
    s = res.summary()
    assert set(s["by_depth"]) == set(range(1, 9))


@pytest.mark.slow
def test_gaps_full_grid():
    res = gaps.run(gaps.GapsConfig(progress=False))
    assert len(res.rows) == 8
    for row in res.rows:
        assert all(np.isfinite(v) for v in row.gaps.values())


@pytest.mark.slow
def test_mislabel_full():
    res = mislabel.run(mislabel.MislabelConfig(progress=False))
    by = {row.method: row for row in res.rows}
    assert by["direct"].auc > by["random"].auc
