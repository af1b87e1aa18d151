"""Tests for influx.data: loaders, splits, standardisation, batching, label flips."""

import gzip
import json
import os
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import sklearn.datasets

from influx import data

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("INFLUX_DATA_DIR", REPO.parent / "shared" / "data"))
needs_data = pytest.mark.skipif(
    not DATA_DIR.is_dir(),
    reason=f"reference data directory {DATA_DIR} absent (set INFLUX_DATA_DIR)",
)
MNIST_IMAGES_MD5 = "2646ac647ad5339dbf082846283269ea"


# --------------------------------------------------------------------------- bundled sets


@pytest.mark.parametrize(
    "name, n, d, task, k",
    [
        ("iris", 150, 4, "classification", 3),
        ("digits", 1797, 64, "classification", 10),
        ("diabetes", 442, 10, "regression", None),
    ],
)
def test_sklearn_shapes_and_dtypes(name, n, d, task, k):
    ds = data.load(name)
    (xtr, ytr), (xte, yte) = ds.train, ds.test
    assert ds.task == task and ds.num_classes == k and ds.name == name
    assert ds.n_test == round(0.2 * n) and ds.n_train == n - ds.n_test
    assert xtr.shape == (ds.n_train, d) and xte.shape == (ds.n_test, d)
    assert xtr.dtype == xte.dtype == np.float32
    if task == "classification":
        assert ytr.dtype == yte.dtype == np.int32 and ytr.shape == (ds.n_train,)
        assert ytr.min() >= 0 and ytr.max() < k
        assert ds.output_dim == k
    else:
        assert ytr.shape == (ds.n_train, 1) and ytr.dtype == np.float32
        assert ds.output_dim == 1


def test_bundled_sets_load_offline(monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("a bundled loader tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for name in ("iris", "digits", "diabetes"):
        ds = data.load(name)
        assert repr(ds).startswith(f"Dataset(name={name!r}")


def test_split_seeded_disjoint_and_matches_source():
    raw = sklearn.datasets.load_diabetes()
    a = data.load("diabetes", seed=3, standardize=False, dtype=np.float64)
    b = data.load("diabetes", seed=3, standardize=False, dtype=np.float64)
    c = data.load("diabetes", seed=4, standardize=False, dtype=np.float64)
    tr, te = a.index
    assert len(np.intersect1d(tr, te)) == 0
    assert len(tr) + len(te) == 442
    np.testing.assert_array_equal(a.train[0], b.train[0])
    assert not np.array_equal(a.train[0], c.train[0])
    np.testing.assert_array_equal(a.train[0], raw.data[tr])
    np.testing.assert_array_equal(a.test[1][:, 0], raw.target[te])
    # explicit sizes
    d = data.load("iris", n_train=50, n_test=20, seed=1)
    assert d.n_train == 50 and d.n_test == 20
    assert len(np.intersect1d(*d.index)) == 0


def test_standardisation_uses_training_stats():
    raw = sklearn.datasets.load_diabetes()
    ds = data.load("diabetes", seed=0, dtype=np.float64)
    xtr, ytr = ds.train
    np.testing.assert_allclose(xtr.mean(0), 0, atol=1e-10)
    np.testing.assert_allclose(xtr.std(0), 1, atol=1e-10)
    np.testing.assert_allclose(ytr.mean(0), 0, atol=1e-10)
    np.testing.assert_allclose(ytr.std(0), 1, atol=1e-10)
    tr, te = ds.index
    mu, sd = raw.data[tr].mean(0), raw.data[tr].std(0)
    np.testing.assert_allclose(ds.test[0], (raw.data[te] - mu) / sd, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ds.unstandardize_y(ds.test[1])[:, 0], raw.target[te], rtol=1e-10)
    np.testing.assert_allclose(ds.unstandardize_x(ds.train[0]), raw.data[tr], atol=1e-10)


def test_digits_images_global_stats_and_unflattened():
    ds = data.load("digits", flatten=False, dtype=np.float64)
    assert ds.train[0].shape == (ds.n_train, 8, 8, 1) and ds.input_shape == (8, 8, 1)
    assert ds.x_mean.shape == () and ds.x_std.shape == ()
    assert ds.train[0].mean() == pytest.approx(0, abs=1e-10)
    assert ds.train[0].std() == pytest.approx(1, abs=1e-10)
    raw = data.load("digits", standardize=False)
    assert raw.train[0].min() >= 0 and raw.train[0].max() <= 1


# --------------------------------------------------------------------------- local files


@needs_data
def test_mnist_from_shared_data():
    ds = data.load("mnist", data_dir=DATA_DIR)
    assert ds.n_train == 8000 and ds.n_test == 2000
    assert ds.train[0].shape == (8000, 784) and ds.train[0].dtype == np.float32
    assert ds.train[1].dtype == np.int32 and set(np.unique(ds.train[1])) == set(range(10))
    assert len(np.intersect1d(*ds.index)) == 0
    assert abs(float(ds.train[0].mean())) < 1e-4 and abs(float(ds.train[0].std()) - 1) < 1e-4
    small = data.load("mnist", data_dir=DATA_DIR, n_train=64, n_test=32, flatten=False, standardize=False)
    assert small.train[0].shape == (64, 28, 28, 1) and small.test[0].shape == (32, 28, 28, 1)
    assert small.train[0].min() == 0.0 and small.train[0].max() == 1.0


@needs_data
def test_mnist_md5():
    assert data.md5_decompressed(DATA_DIR / "mnist-t10k-images-idx3-ubyte.gz") == MNIST_IMAGES_MD5


@needs_data
@pytest.mark.parametrize("name, n", [("concrete", 1030), ("energy", 768)])
def test_uci_from_shared_data(name, n):
    ds = data.load(name, data_dir=DATA_DIR, dtype=np.float64)
    assert ds.task == "regression" and ds.num_classes is None
    assert ds.n_train + ds.n_test == n and ds.train[0].shape[1] == 8
    assert ds.train[1].shape == (ds.n_train, 1)
    raw = np.loadtxt(DATA_DIR / f"uci-{name}.txt")
    tr, _ = ds.index
    np.testing.assert_allclose(ds.unstandardize_y(ds.train[1])[:, 0], raw[tr, -1], rtol=1e-10)
    # any .txt path works the same way
    by_path = data.load(str(DATA_DIR / f"uci-{name}.txt"), dtype=np.float64)
    np.testing.assert_array_equal(by_path.train[0], ds.train[0])


@needs_data
def test_default_data_dir_env_and_cwd(monkeypatch, tmp_path):
    monkeypatch.setenv("INFLUX_DATA_DIR", str(DATA_DIR))
    assert data.default_data_dir() == DATA_DIR
    assert data.load("energy").n_train > 0
    monkeypatch.delenv("INFLUX_DATA_DIR")
    monkeypatch.chdir(REPO)
    assert data.default_data_dir() == REPO.parent / "shared" / "data"
    monkeypatch.chdir(tmp_path)
    if not (tmp_path.parent / "shared" / "data").is_dir():
        assert data.default_data_dir() is None
        with pytest.raises(FileNotFoundError, match="data_dir"):
            data.load("mnist")


def _write_idx(path, arr, compress):
    arr = np.asarray(arr, dtype=np.uint8)
    head = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as fh:
        fh.write(head + arr.tobytes())


@pytest.mark.parametrize("compress", [True, False])
def test_idx_roundtrip_and_train_file_split(tmp_path, compress):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    lab = rng.integers(0, 10, size=30, dtype=np.uint8)
    sfx = ".gz" if compress else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{sfx}", img, compress)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{sfx}", lab, compress)
    np.testing.assert_array_equal(data.read_idx(tmp_path / f"t10k-images-idx3-ubyte{sfx}"), img)
    ds = data.load("mnist", data_dir=tmp_path, n_train=20, n_test=10, standardize=False, dtype=np.float64)
    tr, te = ds.index
    np.testing.assert_allclose(ds.train[0], img[tr].reshape(20, -1) / 255.0)
    np.testing.assert_array_equal(ds.test[1], lab[te])
    # with train files present: train from them, test from t10k
    img2 = rng.integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
    lab2 = rng.integers(0, 10, size=12, dtype=np.uint8)
    _write_idx(tmp_path / f"train-images-idx3-ubyte{sfx}", img2, compress)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{sfx}", lab2, compress)
    ds = data.load("mnist", data_dir=tmp_path, n_train=12, n_test=30, standardize=False)
    tr, te = ds.index
    np.testing.assert_array_equal(ds.train[1], lab2[tr])
    np.testing.assert_array_equal(ds.test[1], lab[te])
    with pytest.raises(ValueError, match="exceed"):
        data.load("mnist", data_dir=tmp_path, n_train=13, n_test=5)


def test_idx_malformed(tmp_path):
    p = tmp_path / "bad-idx"
    p.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(p)
    p.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 5)
    with pytest.raises(ValueError, match="bytes"):
        data.read_idx(p)


# --------------------------------------------------------------------------- errors


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="known: iris, digits, diabetes, mnist"):
        data.load("cifar")


def test_missing_dir_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load("concrete", data_dir=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"uci-concrete\.txt.*" + str(tmp_path.name)):
        data.load("concrete", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        data.load("mnist", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        data.load(str(tmp_path / "missing.txt"))


def test_bad_sizes():
    with pytest.raises(ValueError, match="n_train"):
        data.load("iris", n_train=0)
    with pytest.raises(ValueError, match="fit the 150"):
        data.load("iris", n_train=140, n_test=20)
    with pytest.raises(ValueError, match="test_fraction"):
        data.load("iris", test_fraction=1.0)


def test_tfds_not_installed_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'influx\[tfds\]'"):
        data.load("tfds:mnist")


def _fake_tfds(calls):
    mod = types.ModuleType("tensorflow_datasets")
    rng = np.random.default_rng(0)

    def data_source(name, *, data_dir, download):
        if name == "broken":
            raise NotImplementedError("tfrecord format not supported")
        calls.append(dict(name=name, download=download))
        mk = lambda n: [
            {"image": rng.integers(0, 256, (4, 4, 1), dtype=np.uint8), "label": np.int64(i % 3)}
            for i in range(n)
        ]
        return {"train": mk(9), "test": mk(6)}

    def builder(*a, **k):
        raise RuntimeError("no builder offline")

    mod.data_source, mod.builder = data_source, builder
    return mod


def test_tfds_offline_refuses_fast_and_loads_prepared(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", _fake_tfds(calls))
    with pytest.raises(FileNotFoundError, match="not prepared.*tfds build toy"):
        data.load("tfds:toy", data_dir=tmp_path)
    assert calls == []  # never reached tfds (no download attempt)
    prepared = tmp_path / "toy" / "1.0.0"
    prepared.mkdir(parents=True)
    (prepared / "dataset_info.json").write_text(json.dumps({"name": "toy"}))
    ds = data.load("tfds:toy", data_dir=tmp_path, flatten=False)
    assert calls == [dict(name="toy", download=False)]
    assert ds.task == "classification" and ds.num_classes == 3
    assert ds.train[0].shape == (9, 4, 4, 1) and ds.test[0].shape == (6, 4, 4, 1)
    assert ds.train[1].dtype == np.int32
    with pytest.raises(ValueError, match="tfds_keys"):
        data.load("tfds:toy", data_dir=tmp_path, tfds_keys=("pixels", "label"))
    (tmp_path / "broken" / "1.0.0").mkdir(parents=True)
    (tmp_path / "broken" / "1.0.0" / "dataset_info.json").write_text("{}")
    with pytest.raises(ValueError, match="array_record"):
        data.load("tfds:broken", data_dir=tmp_path)


# --------------------------------------------------------------------------- utilities


def test_batches():
    x = np.arange(10 * 3).reshape(10, 3)
    y = np.arange(10)
    chunks = list(data.batches((x, y), 4))
    assert [c[0].shape[0] for c in chunks] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([c[0] for c in chunks]), x)
    np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), y)
    assert [c[1].shape[0] for c in data.batches((x, y), 4, drop_remainder=True)] == [4, 4]
    assert len(list(data.batches({"x": x}, 100))) == 1
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            list(data.batches((x, y), bad))
    with pytest.raises(ValueError, match="leading size"):
        list(data.batches((x, y[:5]), 2))


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.333, 1.0])
def test_flip_labels(fraction):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=101).astype(np.int32)
    yn, mask = data.flip_labels(y, fraction, 4, seed=7)
    assert yn.dtype == np.int32 and mask.dtype == bool and yn.shape == y.shape
    assert mask.sum() == int(np.floor(fraction * 101 + 0.5))
    assert np.all(yn[mask] != y[mask]) and np.all(yn[~mask] == y[~mask])
    assert yn.min() >= 0 and yn.max() < 4
    yn2, mask2 = data.flip_labels(y, fraction, 4, seed=7)
    np.testing.assert_array_equal(yn, yn2)
    np.testing.assert_array_equal(mask, mask2)


def test_flip_labels_binary_and_errors():
    y = np.array([0, 1] * 10)
    yn, mask = data.flip_labels(y, 1.0, 2, seed=0)
    np.testing.assert_array_equal(yn, 1 - y)
    for frac in (-0.1, 1.1, "x"):
        with pytest.raises(ValueError, match="fraction"):
            data.flip_labels(y, frac, 2)
    with pytest.raises(ValueError, match="num_classes"):
        data.flip_labels(y, 0.1, 1)
    with pytest.raises(ValueError, match="labels must lie"):
        data.flip_labels(y + 5, 0.1, 2)
    with pytest.raises(ValueError, match="integer labels"):
        data.flip_labels(y.astype(float), 0.1, 2)
