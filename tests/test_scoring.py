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
from influx._memory import format_bytes
from influx.errors import InputError, ResourceError, SolveError, StateError
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

    def dies_at_commit(path, d, *rest):
        if d.get("done_chunks") == 3:
            raise KeyboardInterrupt("killed")
        real(path, d, *rest)

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
    from influx import scoring, solvers
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


# ------------------------------------------------------------------ hardening (issue 14)
def _finished(path, **kw):
    return scoring.score(OBJ, PARAMS, TRAIN, TEST, out_dir=path, top_k=3, **dict(OPTS, **kw))


@pytest.fixture
def solves(monkeypatch):
    """Counts test-side solves (to check that refusals come before any)."""
    calls = []
    real = scoring.solve_test_vectors

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(scoring, "solve_test_vectors", counting)
    return calls


def test_missing_or_damaged_scores_never_resume_as_zeros(tmp_path, reference):
    """14.7: a deleted, truncated or altered scores.npy raises StateError naming it."""
    _finished(tmp_path)
    spath = tmp_path / "scores.npy"
    good = spath.read_bytes()
    spath.unlink()
    with pytest.raises(StateError, match="scores.npy is missing"):
        _finished(tmp_path)
    spath.write_bytes(good[: len(good) // 2])
    with pytest.raises(StateError, match="scores.npy: .* bytes, expected"):
        _finished(tmp_path)
    bad = bytearray(good)
    bad[-8] ^= 0x10
    spath.write_bytes(bytes(bad))
    with pytest.raises(StateError, match="scores.npy: the committed chunk .*checksum"):
        _finished(tmp_path)
    with pytest.raises(StateError, match="checksum"):
        scoring.load(tmp_path)
    spath.write_bytes(good)
    np.testing.assert_allclose(_finished(tmp_path).scores, reference, rtol=1e-12, atol=1e-15)


def test_partial_run_with_deleted_scores_or_edited_manifest(tmp_path, monkeypatch):
    """14.7: under a partial manifest, or with done_chunks edited upward: an error, never zeros."""
    real = _store._write_manifest

    def dies(path, d, *rest):
        if d.get("done_chunks") == 3:
            raise KeyboardInterrupt("killed")
        real(path, d, *rest)

    monkeypatch.setattr(_store, "_write_manifest", dies)
    with pytest.raises(KeyboardInterrupt):
        _finished(tmp_path)
    monkeypatch.setattr(_store, "_write_manifest", real)
    mpath = tmp_path / "manifest.json"
    man = json.loads(mpath.read_text())
    assert man["done_chunks"] == 2
    mpath.write_text(json.dumps({**man, "done_chunks": 5, "done": 40}))
    with pytest.raises(StateError, match="manifest.json: the progress record is inconsistent"):
        _finished(tmp_path)
    mpath.write_text(json.dumps(man))
    (tmp_path / "scores.npy").unlink()
    with pytest.raises(StateError, match="scores.npy is missing.*never resumed as zeros"):
        _finished(tmp_path)


def test_foreign_directory_is_refused_untouched(tmp_path, solves):
    """14.8: a user's scores.npy / vectors.npy without a manifest are never overwritten."""
    (tmp_path / "scores.npy").write_bytes(b"my own scores")
    (tmp_path / "vectors.npy").write_bytes(b"my own vectors")
    with pytest.raises(StateError, match="not created by influx.*scores.npy, vectors.npy"):
        _finished(tmp_path)
    assert (tmp_path / "scores.npy").read_bytes() == b"my own scores"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.npy", "vectors.npy"] and not solves
    d = tmp_path / "run"
    _finished(d)
    (d / "notes.txt").write_text("mine")
    with pytest.raises(StateError, match="does not own: notes.txt"):
        _finished(d)


def test_directory_in_use_is_refused(tmp_path, solves):
    """14.9: a second run on a directory in use fails naming the process (lock held here)."""
    fd = _store._lock(Path(tmp_path))  # what a running score() holds
    try:
        with pytest.raises(StateError, match=f"directory in use by process {os.getpid()}"):
            _finished(tmp_path)
    finally:
        _store._unlock(fd)
    assert not solves
    _finished(tmp_path)


def test_manifest_path_outside_out_dir_is_refused(tmp_path):
    """14.10: a top-k file named outside out_dir is neither loaded nor deleted."""
    d = tmp_path / "run"
    _finished(d)
    outside = tmp_path / "x.npz"
    outside.write_bytes((d / json.loads((d / "manifest.json").read_text())["files"]["topk"]["name"])
                        .read_bytes())
    man = json.loads((d / "manifest.json").read_text())
    man["files"]["topk"]["name"] = "../x.npz"
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StateError, match="'../x.npz' is not a file inside"):
        _finished(d)
    with pytest.raises(StateError, match="not a file inside"):
        scoring.load(d)
    assert outside.exists()


def test_disk_space_is_checked_before_the_solve(tmp_path, monkeypatch, solves):
    """14.11: not enough free space for scores.npy: ResourceError with the size, before any solve."""
    class Usage:
        free = 1000

    monkeypatch.setattr(_store.shutil, "disk_usage", lambda p: Usage)
    need = format_bytes(N_TEST * N_TRAIN * 8 + 4096)
    with pytest.raises(ResourceError, match=f"scores.npy needs {need} of disk space but only 1000 B"):
        _finished(tmp_path / "d")
    assert not solves and not (tmp_path / "d" / "scores.npy").exists()
    # keep_scores=False needs no space for scores.npy
    r = scoring.score(OBJ, PARAMS, TRAIN, TEST, out_dir=tmp_path / "k", top_k=2, keep_scores=False, **OPTS)
    assert r.top_k is not None


@pytest.mark.parametrize("damage", ["empty", "invalid", "topk_deleted", "bad_header", "vectors_deleted"])
def test_damaged_directory_gives_one_clear_error(tmp_path, damage):
    """14.11: one StateError naming the file and the remedy (no JSONDecodeError/FileNotFoundError)."""
    _finished(tmp_path)
    man = json.loads((tmp_path / "manifest.json").read_text())
    if damage == "empty":
        (tmp_path / "manifest.json").write_text("")
        match = "manifest.json: not a valid influx manifest \\(empty\\)"
    elif damage == "invalid":
        (tmp_path / "manifest.json").write_text('{"done_chunks": 3,')
        match = "manifest.json: not a valid influx manifest \\(JSONDecodeError"
    elif damage == "topk_deleted":
        (tmp_path / man["files"]["topk"]["name"]).unlink()
        match = "topk.000006.npz is missing"
    elif damage == "vectors_deleted":
        (tmp_path / "vectors.npy").unlink()
        match = "vectors.npy is missing"
    else:
        raw = bytearray((tmp_path / "scores.npy").read_bytes())
        raw[:6] = b"NOTNPY"
        (tmp_path / "scores.npy").write_bytes(bytes(raw))
        match = "scores.npy: not a readable .npy file"
    with pytest.raises(StateError, match=match) as e:
        _finished(tmp_path)
    assert "delete" in str(e.value) and "new out_dir" in str(e.value)


def test_bad_options_fail_before_any_side_effect(tmp_path, solves):
    """14.14: nothing is created and nothing solved when an option is bad."""
    d = tmp_path / "new"
    for bad in (dict(kind="gnhh"), dict(damping=-1.0), dict(on_failure="zero"), dict(method="x"),
                dict(chunk_size=0), dict(top_k=0), dict(curvature_examples=0), dict(num_train=0),
                dict(decode=3), dict(progress="yes"), dict(devices=0)):
        with pytest.raises(InputError):
            scoring.score(OBJ, PARAMS, TRAIN, TEST, out_dir=d, **dict(OPTS, **bad))
        assert not d.exists(), bad
    with pytest.raises(TypeError, match="solver"):
        scoring.score(OBJ, PARAMS, TRAIN, TEST, out_dir=d, **dict(OPTS, solver="cg"))
    assert not d.exists() and not solves


def test_unwritable_out_dir_fails_before_the_solve(tmp_path, solves):
    """14.14: an out_dir that cannot be written fails before the test-side solve."""
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StateError, match="cannot create out_dir"):
        _finished(f / "run")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        with pytest.raises(StateError, match="cannot write to out_dir"):
            _finished(ro)
    assert not solves


FAILING = solvers.cg(tol=1e-12, max_steps=1)  # one CG step cannot reach 1e-12


def test_failed_solves_raise_by_default(tmp_path, solves):
    """14.1: a failed test-vector solve raises SolveError (never scores of 0)."""
    with pytest.raises(SolveError, match=r"4 of 4 test-vector solves failed.*on_failure='nan'"):
        scoring.score(OBJ, PARAMS, TRAIN, TEST, **dict(OPTS, solver=FAILING))
    with pytest.raises(SolveError):
        _finished(tmp_path, solver=FAILING)
    # nothing but the manifest was committed: the directory is re-used with a working solver
    assert sorted(p.name for p in tmp_path.iterdir()) == [".influx.lock", "manifest.json", "scores.npy"]
    assert _finished(tmp_path).manifest["complete"]


def test_failed_solves_are_nan_rows_with_status(tmp_path, monkeypatch, reference):
    """14.1: on_failure="nan": the failed test points' rows and top-k are NaN, the status is recorded."""
    real = scoring.solve_test_vectors

    def one_fails(*a, **kw):  # test point 2's solve reports MAX_STEPS, the others converged
        vecs, sol = real(*a, **kw)
        status = np.zeros(N_TEST, int)
        status[2] = solvers.Status.MAX_STEPS
        return vecs, sol._replace(status=status, converged=status == 0)

    monkeypatch.setattr(scoring, "solve_test_vectors", one_fails)
    with pytest.raises(SolveError, match=r"1 of 4 test-vector solves failed .*test points \[2\]"):
        _finished(tmp_path / "raise")
    r = _finished(tmp_path / "nan", on_failure="nan")
    assert np.isnan(r.scores[2]).all() and not np.isnan(np.delete(np.asarray(r.scores), 2, 0)).any()
    np.testing.assert_allclose(np.delete(np.asarray(r.scores), 2, 0), np.delete(reference, 2, 0),
                               rtol=1e-12, atol=1e-15)
    assert (r.top_k.helpful_indices[2] == -1).all() and np.isnan(r.top_k.harmful_scores[2]).all()
    assert r.info["failed_tests"] == [2] and r.info["solve_status"][2] == solvers.Status.MAX_STEPS
    assert r.manifest["meta"]["solves"]["failed_tests"] == [2]
    # resuming that directory under the default policy raises: the failure is on record
    monkeypatch.setattr(scoring, "solve_test_vectors", real)
    with pytest.raises(SolveError, match="test points \\[2\\]"):
        _finished(tmp_path / "nan")
    # in memory, a real failing solver: every row NaN, never 0
    r = scoring.score(OBJ, PARAMS, TRAIN, TEST, on_failure="nan", **dict(OPTS, solver=FAILING))
    assert np.isnan(r.scores).all() and r.info["failed_tests"] == list(range(N_TEST))


def test_changed_option_is_named(tmp_path):
    """14.19: the refusal names the option that differs, with both values."""
    _finished(tmp_path)
    with pytest.raises(StateError, match=r"differs in: options.damping \(0.1 now, 0.05 in the directory\)"):
        _finished(tmp_path, damping=0.1)


def test_progress_without_tqdm(monkeypatch, capsys):
    """tqdm is optional: without it progress=True prints a plain line on stderr."""
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    r = scoring.score(OBJ, PARAMS, TRAIN, TEST, **dict(OPTS, progress=True))
    assert r.scores.shape == (N_TEST, N_TRAIN)
    assert f"influx.score: {N_TRAIN}/{N_TRAIN} examples" in capsys.readouterr().err


def test_import_does_not_import_tqdm():
    code = "import sys, influx.scoring; assert 'tqdm' not in sys.modules, 'tqdm imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow  # ~20 s of CPU (training, solves, reference); fast: test_changed_option_is_named
def test_example_names_the_changed_option(tmp_path, capsys):
    """14.19: examples/score_dataset.py on a resumed directory with another --damping."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import score_dataset
    finally:
        sys.path.remove(str(ROOT / "examples"))
    args = [str(tmp_path), "--devices", "1", "--crash-after", "1", "--n-test", "2", "--steps", "20",
            "--chunk", "128", "--n-train", "300"]
    assert score_dataset.main(args) == 0
    capsys.readouterr()
    assert score_dataset.main(args + ["--damping", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "options.damping (0.01 now, 0.001 in the directory)" in err and "Traceback" not in err
