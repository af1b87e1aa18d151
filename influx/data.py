"""Data sets for the studies: loaders, seeded splits, standardisation, batching, label noise.

Everything returned is numpy (host) data; jax converts it on first use.

Sources (``load(name, ...)``):

* ``"iris"``, ``"digits"`` (8x8 images), ``"diabetes"`` (regression): bundled with
  scikit-learn, offline (the ``load_*`` functions read files shipped inside the package).
* ``"mnist"``: IDX files (``.gz`` or raw) in a data directory. Only the 10,000-image
  ``t10k`` file is needed: it is split into a training pool and a test set (default
  8,000 / 2,000). If ``train-images-idx3-ubyte`` files are present as well, training
  examples come from them and test examples from ``t10k`` (the standard split).
* ``"concrete"``, ``"energy"``: UCI whitespace-separated text (``uci-concrete.txt``,
  ``uci-energy.txt``) in a data directory, last column the target. Any path to a
  ``.txt`` file is loaded the same way (as a regression set).
* ``"tfds:<name>"``: a *prepared* tensorflow-datasets set through ``tfds.data_source``
  (optional extra ``pip install 'influx[tfds]'``). influx never downloads: if the set is
  not prepared in the tfds data directory it fails at once with the command to prepare it.

Conventions:

* Classification: ``y`` is ``int32`` of shape (N,), ``num_classes`` set.
  Regression: ``y`` is float of shape (N, 1) (so a squared error on (N, 1) outputs works),
  standardised with the *training* mean/std when ``standardize=True``; ``y_mean`` and
  ``y_std`` undo it (:meth:`Dataset.unstandardize_y`).
* Features are standardised with training-split statistics: per feature for tabular
  data (a feature with zero spread keeps std 1), one global mean/std for images
  (``digits``, ``mnist``), whose pixels are first scaled to [0, 1]. Per-pixel statistics
  would blow up rarely-inked pixels.
* Splits: a seeded permutation of the pool; test and train are disjoint slices of it.

Missing files raise ``FileNotFoundError`` saying which names were looked for and where;
unknown names and bad sizes raise :class:`influx.errors.InputError` (a ``ValueError``)
listing the known ones.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from influx.errors import InputError
from influx.validation import InputTypeError, check_fraction, check_int, check_positive_int

__all__ = [
    "Dataset",
    "KNOWN",
    "batches",
    "default_data_dir",
    "flip_labels",
    "load",
    "md5_decompressed",
    "read_idx",
]

KNOWN = ("iris", "digits", "diabetes", "mnist", "concrete", "energy", "tfds:<name>")

_MNIST_DEFAULT_N_TRAIN = 8000
_MNIST_DEFAULT_N_TEST = 2000
_DEFAULT_TEST_FRACTION = 0.2


class Dataset(NamedTuple):
    """A train/test split with the statistics used to standardise it.

    train, test: ``(x, y)`` numpy arrays with a leading example axis.
    name: the name passed to :func:`load`.
    task: ``"classification"`` or ``"regression"``.
    num_classes: number of classes (``None`` for regression).
    x_mean, x_std: feature statistics of the training split (applied as
      ``(x - x_mean) / x_std``; mean 0 / std 1 when ``standardize=False``); arrays that
      broadcast against one example (per feature, or shape () for images).
    y_mean, y_std: target statistics (regression; ``None`` for classification).
    index: ``(train_idx, test_idx)`` rows of the source each example came from (of the
      single pool, or of the source's own train / test files).
    """

    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    name: str
    task: str
    num_classes: int | None
    x_mean: np.ndarray
    x_std: np.ndarray
    y_mean: np.ndarray | None = None
    y_std: np.ndarray | None = None
    index: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def n_train(self) -> int:
        return int(self.train[0].shape[0])

    @property
    def n_test(self) -> int:
        return int(self.test[0].shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example's features."""
        return tuple(self.train[0].shape[1:])

    @property
    def output_dim(self) -> int:
        """Width of the model output: ``num_classes`` or the target dimension."""
        return int(self.num_classes) if self.num_classes else int(self.train[1].shape[-1])

    def unstandardize_y(self, y):
        """Map standardised regression targets/predictions back to original units."""
        if self.y_mean is None:
            return y
        return np.asarray(y) * self.y_std + self.y_mean

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, task={self.task!r}, num_classes={self.num_classes}, "
            f"train=(x{tuple(self.train[0].shape)}, y{tuple(self.train[1].shape)}), "
            f"test=(x{tuple(self.test[0].shape)}, y{tuple(self.test[1].shape)}), "
            f"dtype={self.train[0].dtype})"
        )

    def unstandardize_x(self, x):
        """Map standardised features back to the (scaled) input units."""
        return np.asarray(x) * self.x_std + self.x_mean


# --------------------------------------------------------------------------- data dir


def default_data_dir() -> Path | None:
    """``$INFLUX_DATA_DIR`` if set, else ``../shared/data`` (from the cwd) if it exists."""
    env = os.environ.get("INFLUX_DATA_DIR")
    if env:
        return Path(env).expanduser()
    cand = Path.cwd().parent / "shared" / "data"
    return cand if cand.is_dir() else None


def _resolve_dir(data_dir, name: str) -> Path:
    d = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
    if d is None:
        raise FileNotFoundError(
            f"data set {name!r} needs a data directory: pass data_dir=... or set "
            "INFLUX_DATA_DIR (no ../shared/data found next to the current directory)"
        )
    if not d.is_dir():
        raise FileNotFoundError(f"data directory {str(d)!r} for data set {name!r} does not exist")
    return d


def _find(d: Path, candidates: tuple[str, ...], what: str) -> Path:
    for c in candidates:
        p = d / c
        if p.is_file():
            return p
    raise FileNotFoundError(f"{what}: none of {', '.join(candidates)} found in data directory {str(d)!r}")


def _find_optional(d: Path, candidates: tuple[str, ...]) -> Path | None:
    for c in candidates:
        if (d / c).is_file():
            return d / c
    return None


def _idx_names(stem: str) -> tuple[str, ...]:
    # e.g. stem = "t10k-images-idx3-ubyte"
    alt = stem.replace("-idx", ".idx")
    names = []
    for s in (f"mnist-{stem}", stem, alt):
        names += [s + ".gz", s]
    return tuple(names)


# --------------------------------------------------------------------------- IDX files


_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as fh:
        head = fh.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    with opener(path, "rb") as fh:
        return fh.read()


def read_idx(path) -> np.ndarray:
    """Read an IDX file (MNIST format), gzip-compressed or raw (detected by magic bytes).

    Raises :class:`influx.errors.InputError` (a ``ValueError``) on a malformed header or a
    size that does not match it.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise InputError(f"{str(path)!r} is not an IDX file (bad magic number)")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise InputError(f"{str(path)!r}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(body) != expected:
        raise InputError(
            f"{str(path)!r}: IDX header says shape {shape} ({expected} bytes), file holds {len(body)} bytes"
        )
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def md5_decompressed(path) -> str:
    """MD5 hex digest of a file's content after gzip decompression (if compressed)."""
    return hashlib.md5(_read_bytes(Path(path))).hexdigest()


# --------------------------------------------------------------------------- raw sources


def _sklearn(name: str):
    try:
        import sklearn.datasets as skd
    except ImportError as e:
        raise ImportError(f"the bundled data set {name!r} comes with scikit-learn, which is not installed: "
                          'pip install "influx[studies]" (or scikit-learn)') from e

    loader = {"iris": skd.load_iris, "digits": skd.load_digits, "diabetes": skd.load_diabetes}
    bunch = loader[name]()
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target)
    if name == "iris":
        return x, y, "classification", 3, False
    if name == "digits":
        return (x / 16.0).reshape(-1, 8, 8, 1), y, "classification", 10, True
    return x, y.astype(np.float64), "regression", None, False


def _uci(path: Path):
    try:
        arr = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as e:
        msg = f"could not parse {str(path)!r} as whitespace-separated numbers: {e}"
        raise InputError(msg) from e
    if arr.shape[1] < 2:
        raise InputError(f"{str(path)!r} needs at least 2 columns (features, target)")
    return arr[:, :-1], arr[:, -1], "regression", None, False


def _mnist_pools(d: Path):
    """Return (train pool or None, test pool) as (x, y) with x (N, 28, 28, 1) in [0, 1]."""
    t_img = _find(d, _idx_names("t10k-images-idx3-ubyte"), "MNIST test images")
    t_lab = _find(d, _idx_names("t10k-labels-idx1-ubyte"), "MNIST test labels")
    test = _mnist_pair(t_img, t_lab)
    tr_img = _find_optional(d, _idx_names("train-images-idx3-ubyte"))
    tr_lab = _find_optional(d, _idx_names("train-labels-idx1-ubyte"))
    train = _mnist_pair(tr_img, tr_lab) if tr_img and tr_lab else None
    return train, test


def _mnist_pair(img: Path, lab: Path):
    x = read_idx(img)
    y = read_idx(lab)
    if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise InputError(f"MNIST files {img.name} {x.shape} and {lab.name} {y.shape} do not match")
    return (x.astype(np.float64) / 255.0)[..., None], y


# --------------------------------------------------------------------------- tfds


def _tfds_dir(data_dir) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("TFDS_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / "tensorflow_datasets"


def _tfds(spec: str, data_dir, keys: tuple[str, str]):
    name = spec[len("tfds:") :]
    if not name:
        raise InputError("tfds data set name missing: use 'tfds:<name>', e.g. 'tfds:mnist'")
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise InputError(f"loading {spec!r} needs tensorflow-datasets: pip install 'influx[tfds]'") from e
    root = _tfds_dir(data_dir)
    base = name.split(":")[0].split("/")[0]
    # Refuse to touch the network: tfds retries downloads for minutes when offline.
    prepared = sorted((root / base).glob("**/dataset_info.json")) if (root / base).is_dir() else []
    if not prepared:
        raise FileNotFoundError(
            f"tfds data set {name!r} is not prepared in {str(root)!r} and influx does not "
            f"download. Prepare it once with network access: "
            f"`tfds build {name} --data_dir {root}` (or pass data_dir= / set TFDS_DATA_DIR)"
        )
    try:
        sources = tfds.data_source(name, data_dir=str(root), download=False)
    except Exception as e:  # noqa: BLE001 -- tfds raises many types; say what to do
        raise InputError(
            f"tfds could not open prepared data set {name!r} in {str(root)!r}: {e}. "
            "tfds.data_source needs the array_record format: "
            f"`tfds build {name} --file_format=array_record --data_dir {root}`"
        ) from e
    xk, yk = keys
    out = {}
    for split in ("train", "test"):
        if split not in sources:
            raise InputError(f"tfds data set {name!r} has no {split!r} split ({list(sources)})")
        src = sources[split]
        idx = list(range(len(src)))
        items = src.__getitems__(idx) if hasattr(src, "__getitems__") else [src[i] for i in idx]
        try:
            x = np.stack([np.asarray(it[xk]) for it in items])
            y = np.stack([np.asarray(it[yk]) for it in items])
        except KeyError as e:
            raise InputError(
                f"tfds data set {name!r} has no feature {e.args[0]!r}; pass tfds_keys=(x, y)"
            ) from None
        out[split] = (x, y)
    num_classes = None
    try:
        builder = tfds.builder(name, data_dir=str(root), try_gcs=False)
        num_classes = int(builder.info.features[yk].num_classes)
    except Exception:  # noqa: BLE001 -- fall back to the labels themselves
        pass
    return out["train"], out["test"], num_classes


# --------------------------------------------------------------------------- load


def _read_source(name: str, *, data_dir, n_train, n_test, tfds_keys):
    """The examples of ``name``: ``(x, y, pools, task, num_classes, image, n_train, n_test)``.

    ``pools`` is ``(train_pool, test_pool)`` when the source has its own split (then ``x``,
    ``y`` are ``None``); MNIST fills in its default sizes.
    """
    x = y = None
    key = name.lower()
    image = False
    pools = None  # (train_pool, test_pool) when the source has its own split
    if key in ("iris", "digits", "diabetes"):
        x, y, task, num_classes, image = _sklearn(key)
    elif key in ("concrete", "energy"):
        d = _resolve_dir(data_dir, key)
        path = _find(d, (f"uci-{key}.txt", f"{key}.txt"), f"UCI {key} data")
        x, y, task, num_classes, image = _uci(path)
    elif name.endswith(".txt"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"UCI text file {str(path)!r} does not exist")
        x, y, task, num_classes, image = _uci(path)
    elif key == "mnist":
        d = _resolve_dir(data_dir, key)
        train_pool, test_pool = _mnist_pools(d)
        task, num_classes, image = "classification", 10, True
        n_train = _MNIST_DEFAULT_N_TRAIN if n_train is None else n_train
        n_test = _MNIST_DEFAULT_N_TEST if n_test is None else n_test
        if train_pool is None:
            x, y = test_pool
        else:
            pools = (train_pool, test_pool)
    elif key.startswith("tfds:"):
        train_pool, test_pool, num_classes = _tfds(name, data_dir, tfds_keys)
        y_is_int = np.issubdtype(train_pool[1].dtype, np.integer)
        task = "classification" if y_is_int else "regression"
        if task == "classification" and num_classes is None:
            num_classes = int(max(train_pool[1].max(), test_pool[1].max())) + 1
        if not y_is_int:
            num_classes = None
        image = train_pool[0].ndim == 4
        if image and np.issubdtype(train_pool[0].dtype, np.integer):
            train_pool = (train_pool[0] / 255.0, train_pool[1])
            test_pool = (test_pool[0] / 255.0, test_pool[1])
        pools = (train_pool, test_pool)
    else:
        raise InputError(f"unknown data set {name!r}; known: {', '.join(KNOWN)}, or a path to a .txt file")
    return x, y, pools, task, num_classes, image, n_train, n_test


def _split(name: str, x, y, pools, *, n_train, n_test, test_fraction, rng):
    """Seeded train/test selection: ``(xtr, ytr, xte, yte, train_index, test_index)``."""
    if pools is None:
        n = x.shape[0]
        nte = n_test if n_test is not None else int(round(test_fraction * n))
        ntr = n_train if n_train is not None else n - nte
        if nte < 1 or ntr < 1 or nte + ntr > n:
            raise InputError(
                f"n_train={ntr} + n_test={nte} must be >= 1 each and fit the {n} examples of {name!r}"
            )
        perm = rng.permutation(n)
        te, tr = perm[:nte], perm[nte : nte + ntr]
        xtr, ytr, xte, yte = x[tr], y[tr], x[te], y[te]
    else:
        (xa, ya), (xb, yb) = pools
        ntr = xa.shape[0] if n_train is None else n_train
        nte = xb.shape[0] if n_test is None else n_test
        if ntr > xa.shape[0] or nte > xb.shape[0]:
            raise InputError(
                f"n_train={ntr} / n_test={nte} exceed the {xa.shape[0]} / {xb.shape[0]} examples of {name!r}"
            )
        tr = rng.permutation(xa.shape[0])[:ntr]
        te = rng.permutation(xb.shape[0])[:nte]
        xtr, ytr, xte, yte = xa[tr], ya[tr], xb[te], yb[te]
    return xtr, ytr, xte, yte, tr, te


def _standardize_inputs(xtr, xte, *, image: bool, standardize: bool, flatten: bool):
    """Inputs in float64, standardised with training statistics (one scalar for images, per
    feature otherwise; constant features keep scale 1), images flattened if asked:
    ``(xtr, xte, x_mean, x_std)``."""
    xtr = np.asarray(xtr, dtype=np.float64)
    xte = np.asarray(xte, dtype=np.float64)
    if standardize:
        if image:
            x_mean = np.asarray(xtr.mean())
            x_std = np.asarray(xtr.std())
            x_std = x_std if x_std > 0 else np.asarray(1.0)
        else:
            x_mean = xtr.mean(axis=0)
            x_std = xtr.std(axis=0)
            x_std = np.where(x_std > 1e-12 * np.maximum(np.abs(x_mean), 1.0), x_std, 1.0)
    else:
        x_mean, x_std = np.zeros(()), np.ones(())
    xtr = (xtr - x_mean) / x_std
    xte = (xte - x_mean) / x_std
    if image and flatten:
        xtr = xtr.reshape(xtr.shape[0], -1)
        xte = xte.reshape(xte.shape[0], -1)
        if x_mean.ndim:
            x_mean, x_std = x_mean.reshape(-1), x_std.reshape(-1)
    return xtr, xte, x_mean, x_std


def load(
    name: str,
    *,
    data_dir=None,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    standardize: bool = True,
    dtype: Any = np.float32,
    flatten: bool = True,
    test_fraction: float = _DEFAULT_TEST_FRACTION,
    tfds_keys: tuple[str, str] = ("image", "label"),
) -> Dataset:
    """Load a data set, split it with a seeded permutation, and standardise it.

    Args:
      name: ``"iris" | "digits" | "diabetes" | "mnist" | "concrete" | "energy"``, a path
        to a UCI-style ``.txt`` file, or ``"tfds:<name>"``.
      data_dir: directory with the files (``mnist``, ``concrete``, ``energy``) or the tfds
        data directory; default :func:`default_data_dir` (tfds: ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``).
      n_train, n_test: sizes of the splits (subsampled, seeded). Defaults: MNIST 8000 /
        2000; single-pool sets ``test_fraction`` of the pool for test, the rest train;
        sets that come with their own train/test (tfds, full MNIST) use everything.
      seed: seed of the permutation.
      standardize: standardise features (and regression targets) with training stats.
      dtype: float dtype of features and regression targets.
      flatten: images as flat vectors (default) or (N, H, W, C) for a CNN.
      test_fraction: test share of a single pool when ``n_test`` is not given.
      tfds_keys: feature names of inputs and labels for ``tfds:`` sets.

    Raises:
      InputError: (a ``ValueError``) unknown name, bad sizes, malformed files, tfds extra not
        installed.
      FileNotFoundError: missing data directory or file (message names both).
    """
    if not isinstance(name, str):
        raise InputTypeError(f"name must be a string, got {type(name).__name__}")
    check_positive_int(n_train, "n_train", allow_none=True)
    check_positive_int(n_test, "n_test", allow_none=True)
    check_fraction(test_fraction, "test_fraction")
    x, y, pools, task, num_classes, image, n_train, n_test = _read_source(
        name, data_dir=data_dir, n_train=n_train, n_test=n_test, tfds_keys=tfds_keys)
    xtr, ytr, xte, yte, tr, te = _split(name, x, y, pools, n_train=n_train, n_test=n_test,
                                        test_fraction=test_fraction, rng=np.random.default_rng(seed))

    xtr, xte, x_mean, x_std = _standardize_inputs(xtr, xte, image=image, standardize=standardize,
                                                  flatten=flatten)

    y_mean = y_std = None
    if task == "classification":
        ytr = np.asarray(ytr).astype(np.int32).reshape(-1)
        yte = np.asarray(yte).astype(np.int32).reshape(-1)
    else:
        ytr = np.asarray(ytr, dtype=np.float64).reshape(len(ytr), -1)
        yte = np.asarray(yte, dtype=np.float64).reshape(len(yte), -1)
        if standardize:
            y_mean = ytr.mean(axis=0)
            y_std = ytr.std(axis=0)
            y_std = np.where(y_std > 0, y_std, 1.0)
        else:
            y_mean, y_std = np.zeros(ytr.shape[1]), np.ones(ytr.shape[1])
        ytr = ((ytr - y_mean) / y_std).astype(dtype)
        yte = ((yte - y_mean) / y_std).astype(dtype)
        y_mean, y_std = y_mean.astype(dtype), y_std.astype(dtype)

    return Dataset(
        train=(xtr.astype(dtype), ytr),
        test=(xte.astype(dtype), yte),
        name=name,
        task=task,
        num_classes=num_classes,
        x_mean=np.asarray(x_mean, dtype=dtype),
        x_std=np.asarray(x_std, dtype=dtype),
        y_mean=y_mean,
        y_std=y_std,
        index=(np.asarray(tr), np.asarray(te)),
    )


# --------------------------------------------------------------------------- utilities


def batches(data, batch_size: int, *, drop_remainder: bool = False) -> Iterator[Any]:
    """Yield consecutive chunks of a pytree of arrays along the leading axis.

    ``data`` is e.g. ``(x, y)`` or a :class:`Dataset` split; every leaf must have the same
    leading size N. Yields ``ceil(N / batch_size)`` chunks in order (the last one smaller
    unless ``drop_remainder``), suitable as the iterable-of-chunks data form.
    """
    batch_size = check_positive_int(batch_size, "batch_size")
    leaves = jax.tree_util.tree_leaves(data)
    if not leaves:
        raise InputError("data has no arrays")
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise InputError(f"all arrays in data need the same leading size, got {sizes}")
    (n,) = sizes
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, n)
        yield jax.tree_util.tree_map(lambda a, s=start, e=end: a[s:e], data)


def flip_labels(y, fraction: float, num_classes: int, *, seed: int = 0):
    """Flip exactly ``floor(fraction * N + 1/2)`` labels (N * fraction rounded half up),
    each to a different, random class.

    Returns ``(y_noisy, flipped)``: ``int32`` labels and the boolean mask of flipped
    examples. The flipped examples are a seeded uniform sample without replacement; each
    gets ``(y + r) mod num_classes`` with ``r`` uniform in ``1..num_classes-1``.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise InputError(f"y must be a 1-D array of integer labels, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"y must hold integer labels, got dtype {y.dtype}")
    num_classes = check_int(num_classes, "num_classes", minimum=2)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise InputError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    try:
        fraction = float(fraction)
    except (TypeError, ValueError) as e:
        raise InputError(f"fraction must be a number in [0, 1], got {fraction!r}") from e
    if not 0.0 <= fraction <= 1.0:
        raise InputError(f"fraction must be in [0, 1], got {fraction!r}")
    n = y.size
    k = int(np.floor(fraction * n + 0.5))
    rng = np.random.default_rng(seed)
    idx = rng.choice(n, size=k, replace=False)
    shift = rng.integers(1, num_classes, size=k)
    y_noisy = y.astype(np.int32).copy()
    y_noisy[idx] = (y_noisy[idx] + shift) % num_classes
    flipped = np.zeros(n, dtype=bool)
    flipped[idx] = True
    return y_noisy, flipped
