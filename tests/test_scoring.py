"""Batch scoring: sources, sharding over forced CPU devices, on-disk output and resume."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import influx
from influx import _store, scoring, solvers
from tests.conftest import make_problem

ROOT = Path(__file__).resolve().parents[1]
DIRECT = solvers.direct()
N_TRAIN, N_TEST, CHUNK = 45, 4, 8


def _setup():
    obj, params, (x, y) = make_problem("tanh_mlp", n=N_TRAIN + N_TEST, seed=3)
    train = (np.asarray(x[:N_TRAIN]), np.asarray(y[:N_TRAIN]))
    test = (np.asarray(x[N_TRAIN:]), np.asarray(y[N_TRAIN:]))
    return obj, params, train, test


OBJ, PARAMS, TRAIN, TEST = _setup()
OPTS = dict(damping=0.05, solver=DIRECT, chunk_size=CHUNK, progress=False)


@pytest.fixture(scope="module")
def reference():
    return np.asarray(influx.influence(OBJ, PARAMS, TRAIN, TEST, damping=0.05, solver=DIRECT,
                                       chunk_size=CHUNK))


def _batches(sizes=(5, 11, 3, 20, 6)):
    """A generator of uneven (x, y) batches covering the training set."""
    assert sum(sizes) == N_TRAIN
    start = 0
    for s in sizes:
        yield TRAIN[0][start:start + s], TRAIN[1][start:start + s]
        start += s


def test_arrays_match_influence_and_top_k(reference):
    r = scoring.score(OBJ, PARAMS, TRAIN, TEST, top_k=5, **OPTS)
    np.testing.assert_allclose(r.scores, reference, rtol=1e-12, atol=1e-15)
    order = np.argsort(-reference, axis=1, kind="stable")
    np.testing.assert_array_equal(r.top_k.helpful_indices, order[:, :5])
    harmful = np.argsort(reference, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(r.top_k.harmful_indices, harmful)
    np.testing.assert_allclose(r.top_k.helpful_scores, np.take_along_axis(reference, order[:, :5], 1))
    assert r.info["method"] == "jvp" and r.info["n_train"] == N_TRAIN
    # forcing the per-example path gives the same matrix
    r2 = scoring.score(OBJ, PARAMS, TRAIN, TEST, method="per_example", **OPTS)
    np.testing.assert_allclose(r2.scores, reference, rtol=1e-10, atol=1e-14)


def test_stream_from_generator(reference):
    # a callable returning a fresh generator: N is counted; the curvature comes from curvature_data
    r = scoring.score(OBJ, PARAMS, lambda: _batches(), TEST, curvature_data=TRAIN, **OPTS)
    np.testing.assert_allclose(r.scores, reference, rtol=1e-12, atol=1e-15)
    # a one-shot generator with num_train; curvature from the stream head (all 45 examples here)
    r = scoring.score(OBJ, PARAMS, _batches(), TEST, num_train=N_TRAIN, curvature_examples=100, **OPTS)
    np.testing.assert_allclose(r.scores, reference, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="num_train"):
        scoring.score(OBJ, PARAMS, _batches(), TEST, **OPTS)
    with pytest.raises(ValueError, match="yielded 45 examples"):
        scoring.score(OBJ, PARAMS, _batches(), TEST, num_train=50, curvature_data=TRAIN, **OPTS)


class FakeDataSource:
    """The tfds.data_source protocol: __len__ and __getitem__ returning one dict record."""

    def __init__(self, x, y):
        self.x, self.y = x, y
        self.reads = 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.reads += 1
        return {"image": self.x[i], "label": self.y[i], "id": i}


def test_random_access_data_source(reference):
    src = FakeDataSource(*TRAIN)
    r = scoring.score(OBJ, PARAMS, src, TEST, curvature_data=TRAIN, **OPTS)
    np.testing.assert_allclose(r.scores, reference, rtol=1e-12, atol=1e-15)
    r = scoring.score(OBJ, PARAMS, src, TEST, curvature_data=TRAIN,
                      decode=lambda rec: (rec["image"], rec["label"]), **OPTS)
    np.testing.assert_allclose(r.scores, reference, rtol=1e-12, atol=1e-15)
    bad = FakeDataSource(TRAIN[0], TRAIN[1] + 7)
    with pytest.raises(ValueError, match="out of range"):
        scoring.score(OBJ, PARAMS, bad, TEST, curvature_data=TRAIN, **OPTS)


def test_tfds_mock_data_source():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=20):
        src = tfds.data_source("mnist", split="train")
        x0 = np.asarray(src[0]["image"], np.float64).reshape(-1)
        assert len(src) == 20 and x0.shape == (784,)
        rng = np.random.default_rng(0)
        params = [{"w": rng.normal(size=(784, 10)) * 0.01, "b": np.zeros(10)}]
        obj = influx.Objective(lambda p, x: x @ p[0]["w"] + p[0]["b"],
                               influx.losses.softmax_cross_entropy, l2=1e-2)
        decode = lambda r: (np.asarray(r["image"], np.float64).reshape(-1) / 255.0,
                            np.asarray(r["label"], np.int32))
        arrays = tuple(np.stack(a) for a in zip(*(decode(src[i]) for i in range(20))))
        test = (arrays[0][:3], arrays[1][:3])
        ref = influx.influence(obj, params, arrays, test, solver=solvers.cg(tol=1e-10))
        r = scoring.score(obj, params, src, test, decode=decode, curvature_data=arrays,
                          solver=solvers.cg(tol=1e-10), chunk_size=8, progress=False)
        np.testing.assert_allclose(r.scores, ref, rtol=1e-6, atol=1e-9)


def test_kill_and_resume_gives_identical_file(tmp_path, reference):
    full_dir, crash_dir = tmp_path / "full", tmp_path / "crash"
    full = scoring.score(OBJ, PARAMS, TRAIN, TEST, out_dir=full_dir, top_k=3, **OPTS)

    def crashing(after_chunks):
        x, y = TRAIN
        for k in range(0, N_TRAIN, CHUNK):
            if k // CHUNK == after_chunks:
                raise RuntimeError("simulated crash")
            yield x[k:k + CHUNK], y[k:k + CHUNK]

    opts = dict(OPTS, out_dir=crash_dir, top_k=3, curvature_data=TRAIN, num_train=N_TRAIN)
    with pytest.raises(RuntimeError, match="simulated crash"):
        scoring.score(OBJ, PARAMS, crashing(3), TEST, **opts)
    man = json.loads((crash_dir / "manifest.json").read_text())
    assert man["done_chunks"] == 3 and man["done"] == 3 * CHUNK and not man["complete"]
    resumed = scoring.score(OBJ, PARAMS, crashing(-1), TEST, **opts)
    assert resumed.info["resumed_from"] == 3 * CHUNK and resumed.info["scored"] == N_TRAIN - 3 * CHUNK
    assert resumed.manifest["complete"]
    assert (crash_dir / "scores.npy").read_bytes() == (full_dir / "scores.npy").read_bytes()
    for a, b in zip(resumed.top_k, full.top_k):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.load(crash_dir / "scores.npy"), reference, rtol=1e-12, atol=1e-15)
    # a finished directory is reloaded, not recomputed
    again = scoring.score(OBJ, PARAMS, TRAIN, TEST, out_dir=full_dir, top_k=3, **OPTS)
    assert again.info["scored"] == 0
    np.testing.assert_array_equal(np.asarray(scoring.load(full_dir).scores), np.asarray(full.scores))


def test_kill_between_writes_and_commit(tmp_path, monkeypatch):
    """A kill after chunk 3's scores and top-k were written but before the manifest commit."""
    full = scoring.score(OBJ, PARAMS, TRAIN, TEST, out_dir=tmp_path / "full", top_k=3, **OPTS)
    real = _store._write_manifest

    def dies_at_commit(path, d):
        if d.get("done_chunks") == 3:
            raise KeyboardInterrupt("killed")
        real(path, d)

    monkeypatch.setattr(_store, "_write_manifest", dies_at_commit)
    with pytest.raises(KeyboardInterrupt):
        scoring.score(OBJ, PARAMS, TRAIN, TEST, out_dir=tmp_path / "crash", top_k=3, **OPTS)
    monkeypatch.setattr(_store, "_write_manifest", real)
    assert json.loads((tmp_path / "crash" / "manifest.json").read_text())["done_chunks"] == 2
    resumed = scoring.score(OBJ, PARAMS, TRAIN, TEST, out_dir=tmp_path / "crash", top_k=3, **OPTS)
    assert resumed.info["resumed_from"] == 2 * CHUNK
    for a, b in zip(resumed.top_k, full.top_k):  # chunk 3 is not counted twice
        np.testing.assert_array_equal(a, b)
    assert (tmp_path / "crash" / "scores.npy").read_bytes() == (tmp_path / "full" / "scores.npy").read_bytes()
    assert len(list((tmp_path / "crash").glob("topk.*.npz"))) == 1


def test_resume_dir_for_other_inputs_is_refused(tmp_path):
    scoring.score(OBJ, PARAMS, TRAIN, TEST, out_dir=tmp_path, **OPTS)
    with pytest.raises(ValueError, match="different inputs.*options"):
        scoring.score(OBJ, PARAMS, TRAIN, TEST, out_dir=tmp_path, **dict(OPTS, damping=0.1))
    other = [{k: v * 1.01 for k, v in layer.items()} for layer in PARAMS]
    with pytest.raises(ValueError, match="different inputs.*params"):
        scoring.score(OBJ, other, TRAIN, TEST, out_dir=tmp_path, **OPTS)
    with pytest.raises(ValueError, match="different inputs.*test"):
        scoring.score(OBJ, PARAMS, TRAIN, (TEST[0][:2], TEST[1][:2]), out_dir=tmp_path, **OPTS)


def test_top_k_only(tmp_path, reference):
    r = scoring.score(OBJ, PARAMS, TRAIN, TEST, out_dir=tmp_path, top_k=4, keep_scores=False, **OPTS)
    assert r.scores is None and not (tmp_path / "scores.npy").exists()
    np.testing.assert_array_equal(r.top_k.harmful_indices,
                                  np.argsort(reference, axis=1, kind="stable")[:, :4])
    with pytest.raises(ValueError, match="top_k"):
        scoring.score(OBJ, PARAMS, TRAIN, TEST, keep_scores=False, **OPTS)


def test_bad_inputs():
    x, y = TRAIN
    with pytest.raises(ValueError, match="apply_fn does not accept"):
        scoring.score(OBJ, PARAMS, (x[:, :2], y), TEST, **OPTS)
    with pytest.raises(ValueError, match="empty"):
        scoring.score(OBJ, PARAMS, (x[:0], y[:0]), TEST, **OPTS)
    with pytest.raises(ValueError, match="empty"):
        scoring.score(OBJ, PARAMS, lambda: iter([]), TEST, curvature_data=TRAIN, **OPTS)
    with pytest.raises(ValueError, match="out of range"):
        scoring.score(OBJ, PARAMS, TRAIN, (TEST[0], TEST[1] + 9), **OPTS)
    with pytest.raises(ValueError, match="method"):
        scoring.score(OBJ, PARAMS, TRAIN, TEST, **dict(OPTS, method="x"))
    with pytest.raises(TypeError, match="train_source"):
        scoring.score(OBJ, PARAMS, 3, TEST, **OPTS)


_SHARDED = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_enable_x64", True)
    import numpy as np
    sys.path.insert(0, {root!r})
    from influx import _store, scoring, solvers
    from tests.test_scoring import OBJ, PARAMS, TRAIN, TEST, CHUNK
    assert len(jax.devices()) == 4, jax.devices()
    for method in ("jvp", "per_example"):
        r = scoring.score(OBJ, PARAMS, TRAIN, TEST, damping=0.05, solver=solvers.direct(),
                          chunk_size=CHUNK + 2, progress=False, method=method)  # 10: padded to 12
        assert len(r.info["devices"]) == 4
        np.save({out!r} + method + ".npy", np.asarray(r.scores))
""")


def test_four_forced_devices_match_one(tmp_path, reference):
    script = _SHARDED.format(root=str(ROOT), out=str(tmp_path / "s_"))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for method in ("jvp", "per_example"):
        np.testing.assert_allclose(np.load(tmp_path / f"s_{method}.npy"), reference, rtol=1e-12,
                                   atol=1e-15)
