"""Smoke test of examples/cnn_mnist.py (NNX CNN with BatchNorm, EK-FAC influence)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def _example():
    spec = importlib.util.spec_from_file_location("cnn_mnist", ROOT / "examples" / "cnn_mnist.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


needs_mnist = pytest.mark.skipif(not (DATA / "mnist-t10k-images-idx3-ubyte.gz").exists(),
                                 reason="MNIST file not in ../shared/data")


@needs_mnist
def test_cnn_example_smoke(tmp_path):
    """A tiny run end to end: conv layers in Kronecker blocks, finite scores, a PNG."""
    out = tmp_path / "cnn.png"
    r = _example().main(["--data-dir", str(DATA), "--quick", "--n-train", "200", "--steps", "30",
                         "--out", str(out)])
    assert r["coverage"] >= 0.9  # convolutions and dense layers are blocks; BatchNorm is not
    assert r["scores"].shape == (3, 200) and np.all(np.isfinite(r["scores"]))
    assert r["self_influence"].shape == (200,) and np.all(r["self_influence"] > 0)
    assert out.exists() and out.stat().st_size > 10_000


def test_cnn_example_missing_data(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        _example().main(["--data-dir", str(tmp_path), "--quick", "--out", str(tmp_path / "x.png")])


@needs_mnist
@pytest.mark.slow
def test_cnn_example_quick_finds_flipped_labels(tmp_path):
    """The --quick run: self-influence flags flipped labels far above chance (10%)."""
    r = _example().main(["--data-dir", str(DATA), "--quick", "--out", str(tmp_path / "cnn.png")])
    assert r["test_accuracy"] > 0.8
    assert r["precision_self"] > 3 * r["flipped"].mean()


@pytest.mark.parametrize("name,n_params", [("cnn", 105_866), ("transformer", 1_002_372)])
def test_benchmark_models_are_covered_by_kronecker_blocks(name, n_params):
    """benchmarks/models.py: the CNN and the transformer get EK-FAC blocks for >= 90% of
    their parameters (issue 15's coverage target), at the sizes the benchmark states."""
    import jax
    import jax.numpy as jnp

    import influx
    from benchmarks import models

    spec = models.QUICK[name]
    params = jax.tree_util.tree_map(jnp.asarray, models.init_params(spec))
    assert sum(p.size for p in jax.tree_util.tree_leaves(params)) == n_params
    f = models.apply_fn_for(name)
    x = (jnp.zeros((1, 28, 28, 1), jnp.float32) if name == "cnn"
         else jnp.arange(models.TF["seq"], dtype=jnp.int32)[None] % models.TF["vocab"])
    assert f(params, x).shape == (1, 10 if name == "cnn" else models.TF["classes"])
    assert influx.solvers.ekfac.coverage(f, params, x) >= 0.9
