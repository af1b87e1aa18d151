"""Whole-dataset batch scoring: streaming, sharded over devices, resumable on disk.

:func:`score` computes the influence matrix of :func:`influx.influence` for a training
set that need not fit in memory::

    score[t, m] = (1/N) grad f_t^T (C + (l2 + damping) I)^-1 grad L(z_m)
                ~= f_t(theta without m) - f_t(theta_s)      (positive: m helpful)

1. The test side is solved **once**: ``s_t = A^-1 grad f_t`` for all test points (and, with
   ``out_dir``, saved to ``vectors.npy`` so a resumed run reuses the same vectors).
2. The training set is streamed in chunks of exactly ``chunk_size`` examples (the last one
   shorter) from

   * arrays ``(x, y)`` (a *tuple*) with a leading example axis,
   * any iterable of ``(x, y)`` batches of any sizes (re-chunked), or a zero-argument
     callable returning a fresh iterator,
   * a random-access source with ``__len__`` and ``__getitem__`` returning one record
     per index -- e.g. ``tfds.data_source(...)`` (no TensorFlow needed) -- turned into
     ``(x, y)`` by ``decode(record)`` (default ``(record["image"], record["label"])``).

3. Each chunk is scored by JVPs of the per-example loss along the ``s_t`` or by
   per-example gradients and a matmul (:func:`influx.influence.choose_method`,
   overridable with ``method=``), split over ``devices`` (default all of
   ``jax.devices()``) with ``jax.shard_map``: the chunk is padded to a multiple of the
   device count by repeating its last example and the padded columns are dropped.
4. Scores go to ``out_dir/scores.npy`` (a preallocated ``.npy`` memmap of shape
   ``(n_test, N)``) chunk by chunk; after each chunk the running top-k is written to a
   new file and ``manifest.json`` (the number of examples done and the name of that
   top-k file) is replaced atomically -- the manifest is the commit point, so a kill at
   any moment leaves a consistent state. A killed
   run, restarted with the same arguments, resumes after the last completed chunk and
   yields the identical matrix. The manifest holds a fingerprint (a hash of the
   parameters, the test set, the training set's size and first chunk -- or all of it
   when given as arrays --, and every option); a directory written for other inputs is
   refused with a ``ValueError`` naming what differs.

The curvature ``C`` is a mean over training examples: for array sources it uses the
whole training set; for streams it uses ``curvature_data`` if given, else the first
``curvature_examples`` examples of the stream (a subsample estimate: pass a shuffled
stream or explicit ``curvature_data`` when the order is not random).

``N`` (the ``1/N`` of the score) must be known in advance: arrays and random-access
sources know it; for iterables pass ``num_train`` or a callable source (then one extra
pass counts the examples).

Multi-host: every process must call :func:`score` with the same arguments after
``jax.distributed.initialize()``; only the local devices are used here (process-local
scoring of the full stream), and multi-host sharding is not tested.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from influx.influence import (
    _bind_measurement,
    _check_chunk_size,
    _check_measurement,
    _check_method,
    _check_test,
    _pad_to,
    _resolve_method,
    chunk_scorer,
    default_solver,
    measurements,
    solve_test_vectors,
)
from influx.objective import Objective, check_data, num_examples

__all__ = ["score", "ScoreResult", "TopK", "load"]

MANIFEST = "manifest.json"
SCORES = "scores.npy"
VECTORS = "vectors.npy"
TOPK = "topk.{:06d}.npz"  # one file per committed chunk count; the manifest names the current one
FORMAT = 1


class TopK(NamedTuple):
    """Running top-k per test point (all ``(n_test, k)``).

    helpful_indices / helpful_scores: the ``k`` largest scores (removing them raises
    the measurement most), in descending order. harmful_indices / harmful_scores: the
    ``k`` most negative scores, in ascending order. Ties go to the lower index.
    """

    helpful_indices: np.ndarray
    helpful_scores: np.ndarray
    harmful_indices: np.ndarray
    harmful_scores: np.ndarray


class ScoreResult(NamedTuple):
    """Result of :func:`score`.

    scores: ``(n_test, N)`` -- a read-only ``np.memmap`` of ``out_dir/scores.npy``, an
      in-memory array without ``out_dir``, or ``None`` with ``keep_scores=False``.
    top_k: a :class:`TopK` or ``None``.
    manifest: the manifest dict (fingerprint, options, progress).
    info: dict with ``method``, ``devices``, ``n_train``, ``n_test``, ``resumed_from``,
      ``seconds`` and ``examples_per_s`` of this call, and the solves' worst residual.
    """

    scores: Any
    top_k: TopK | None
    manifest: dict
    info: dict


# ------------------------------------------------------------------ sources
def _np_tree(t):
    return jax.tree_util.tree_map(np.asarray, t)


def _concat(chunks):
    return jax.tree_util.tree_map(lambda *a: np.concatenate(a, axis=0), *chunks)


def _slice(t, a, b):
    return jax.tree_util.tree_map(lambda x: x[a:b], t)


def _rechunk(batches: Iterable, size: int) -> Iterator:
    """Re-chunks an iterable of ``(x, y)`` batches into chunks of exactly ``size``."""
    buf, have = [], 0
    for i, b in enumerate(batches):
        if not (isinstance(b, (tuple, list)) and len(b) == 2):
            raise TypeError(f"train_source: batch {i} is a {type(b).__name__}, expected a pair (x, y)")
        b = _np_tree(tuple(b))
        n = num_examples(b, name=f"train_source batch {i}")
        buf.append(b)
        have += n
        while have >= size:
            cat = _concat(buf) if len(buf) > 1 else buf[0]
            yield _slice(cat, 0, size)
            rest = num_examples(cat) - size
            buf, have = ([_slice(cat, size, None)], rest) if rest else ([], 0)
    if have:
        yield _concat(buf) if len(buf) > 1 else buf[0]


def _is_arrays(src) -> bool:
    return (isinstance(src, tuple) and len(src) == 2
            and all(hasattr(l, "shape") for l in jax.tree_util.tree_leaves(src))
            and bool(jax.tree_util.tree_leaves(src)))


def _default_decode(record):
    if isinstance(record, dict):
        if "image" in record and "label" in record:
            return record["image"], record["label"]
        raise ValueError("train_source records are dicts without 'image'/'label' keys "
                         f"(keys: {sorted(record)}); pass decode=lambda r: (x, y)")
    if isinstance(record, (tuple, list)) and len(record) == 2:
        return tuple(record)
    raise TypeError(f"cannot decode a record of type {type(record).__name__}; pass decode=")


class _Source:
    """Uniform view: ``n`` and ``chunks(start)`` -> chunks of ``size`` starting at ``start``."""

    def __init__(self, src, size: int, *, decode=None, num_train=None):
        self.size = size
        self.kind = None
        if _is_arrays(src):
            self.kind, self.arrays = "arrays", src
            self.n = num_examples(src, name="train_source")
        elif hasattr(src, "__len__") and hasattr(src, "__getitem__") and not isinstance(src, (list, tuple)):
            self.kind, self.ra = "random_access", src
            self.decode = decode or _default_decode
            self.n = len(src)
            if self.n == 0:
                raise ValueError("train_source: the dataset is empty (0 examples)")
        elif callable(src) or isinstance(src, Iterable):
            self.kind = "iterable"
            self.factory = src if callable(src) else None
            self.iterator = None if callable(src) else iter(src)
            self.buffer: list = []
            if num_train is not None:
                self.n = int(num_train)
            elif self.factory is not None:
                self.n = sum(num_examples(_np_tree(tuple(b)), name="train_source batch")
                             for b in self.factory())
            else:
                raise ValueError("train_source: an iterator of batches needs num_train= (or pass a "
                                 "callable returning a fresh iterator, then N is counted)")
            if self.n == 0:
                raise ValueError("train_source: the dataset is empty (0 examples)")
            if self.iterator is None:
                self.iterator = self.factory()
            self._stream = _rechunk(self.iterator, size)
        else:
            raise TypeError("train_source must be a tuple (x, y) of arrays, an iterable of (x, y) batches, "
                            "a callable returning one, or a random-access source (__len__/__getitem__); "
                            f"got {type(src).__name__}")
        if self.n <= 0:
            raise ValueError("train_source: the dataset is empty (0 examples)")
        self.num_chunks = -(-self.n // size)

    def _ra_chunk(self, a, b):
        records = None
        if hasattr(self.ra, "__getitems__"):  # batched read (tfds / grain sources)
            try:
                records = self.ra.__getitems__(list(range(a, b)))
            except TypeError:  # e.g. tfds.testing.mock_data's source lacks a working one
                records = None
        if records is None:
            records = [self.ra[i] for i in range(a, b)]
        pairs = [self.decode(r) for r in records]
        return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *pairs)

    def _buffered(self, k):
        while len(self.buffer) <= k:
            nxt = next(self._stream, None)
            if nxt is None:
                return None
            self.buffer.append(nxt)
        return self.buffer[k]

    def chunk(self, k):
        """Chunk ``k`` (random access; for streams only buffered chunks -- see ``chunks``)."""
        a, b = k * self.size, min((k + 1) * self.size, self.n)
        if self.kind == "arrays":
            return _slice(self.arrays, a, b)
        if self.kind == "random_access":
            return self._ra_chunk(a, b)
        return self._buffered(k)

    def chunks(self, start_chunk: int):
        if self.kind != "iterable":
            for k in range(start_chunk, self.num_chunks):
                yield self.chunk(k)
            return
        seen = 0
        for k in itertools.count():
            c = self._buffered(k) if k < len(self.buffer) else next(self._stream, None)
            if c is None:
                break
            seen += num_examples(c)
            if k >= start_chunk:
                yield c
        if seen != self.n:
            raise ValueError(f"train_source yielded {seen} examples, but N = {self.n} was given / counted")

    def head(self, n_examples: int):
        """The first ``n_examples`` (or all) examples as arrays (buffered for streams)."""
        if self.kind == "arrays":
            return _slice(self.arrays, 0, n_examples)
        out, have, k = [], 0, 0
        while have < n_examples and k < self.num_chunks:
            c = self.chunk(k)
            if c is None:
                break
            out.append(c)
            have += num_examples(c)
            k += 1
        return _slice(_concat(out), 0, n_examples)


# ------------------------------------------------------------------ fingerprint / files
def _hash_tree(h, tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    h.update(str(treedef).encode())
    for l in leaves:
        a = np.ascontiguousarray(np.asarray(l))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())


def _digest(tree) -> str:
    h = hashlib.sha256()
    _hash_tree(h, tree)
    return h.hexdigest()[:32]


def _fn_name(f) -> str:
    if hasattr(f, "__qualname__"):
        return f"{getattr(f, '__module__', '')}.{f.__qualname__}"
    return repr(f)


def _atomic_write(path: Path, write: Callable):
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, d: dict):
    _atomic_write(path, lambda p: p.write_text(json.dumps(d, indent=2, sort_keys=True)))


def _save_topk(path: Path, tk: TopK):
    def w(p):
        with open(p, "wb") as fh:
            np.savez(fh, **tk._asdict())

    _atomic_write(path, w)


def _load_topk(path: Path) -> TopK:
    with np.load(path) as z:
        return TopK(**{k: z[k] for k in TopK._fields})


def load(out_dir) -> ScoreResult:
    """Opens a finished (or partial) scoring directory: scores as a read-only memmap."""
    d = Path(out_dir)
    man = json.loads((d / MANIFEST).read_text())
    scores = np.load(d / SCORES, mmap_mode="r") if (d / SCORES).exists() else None
    tk = _load_topk(d / man["topk_file"]) if man.get("topk_file") else None
    return ScoreResult(scores, tk, man, {})


# ------------------------------------------------------------------ top-k
def _topk_init(n_test, k, dtype) -> TopK:
    return TopK(np.full((n_test, k), -1, np.int64), np.full((n_test, k), -np.inf, dtype),
                np.full((n_test, k), -1, np.int64), np.full((n_test, k), np.inf, dtype))


def _topk_update(tk: TopK, block: np.ndarray, offset: int) -> TopK:
    k = tk.helpful_scores.shape[1]
    idx = np.broadcast_to(np.arange(offset, offset + block.shape[1]), block.shape)
    out = []
    for vals0, idx0, sign in ((tk.helpful_scores, tk.helpful_indices, -1.0),
                              (tk.harmful_scores, tk.harmful_indices, 1.0)):
        vals = np.concatenate([vals0, block], axis=1)
        ids = np.concatenate([idx0, idx], axis=1)
        order = np.argsort(sign * vals, axis=1, kind="stable")[:, :k]
        out.append((np.take_along_axis(ids, order, 1), np.take_along_axis(vals, order, 1)))
    (hi, hs), (li, ls) = out
    return TopK(hi, hs, li, ls)


# ------------------------------------------------------------------ main entry point
def _resolve_devices(devices):
    if devices is None:
        return list(jax.devices())
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        all_ = jax.devices()
        if not 1 <= devices <= len(all_):
            raise ValueError(f"devices={devices}: need 1..{len(all_)} (jax.devices() has {len(all_)})")
        return list(all_[:devices])
    devices = list(devices)
    if not devices:
        raise ValueError("devices: empty list")
    return devices


def _want_progress(progress):
    if progress is None:
        return sys.stderr.isatty()
    return bool(progress)


def score(obj: Objective, params, train_source, test, *, out_dir=None, chunk_size: int = 256,
          kind: str = "gnh", damping=1e-3, solver=None, measurement=None, method: str = "auto",
          top_k: int | None = None, keep_scores: bool = True, progress: bool | None = None,
          devices=None, decode: Callable | None = None, num_train: int | None = None,
          curvature_data=None, curvature_examples: int = 4096) -> ScoreResult:
    """Scores every training example of ``train_source`` against every test point.

    See the module docstring for sources, the curvature data, sharding, on-disk output
    and resume. Options as :func:`influx.influence` plus:

    Args:
      out_dir: directory for ``scores.npy`` (memmap ``(n_test, N)``), ``vectors.npy``
        (the solved test vectors, ``(n_test, P)``), ``topk.<chunks>.npz`` and
        ``manifest.json``;
        ``None`` keeps everything in memory (no resume).
      chunk_size: training examples per step (rounded up to a multiple of the device
        count for the computation; the chunking itself never depends on the devices).
      top_k: keep the ``k`` most helpful and most harmful training examples per test
        point (:class:`TopK`).
      keep_scores: ``False`` to keep only the top-k (the full matrix is never stored).
      progress: a tqdm bar (examples/s, ETA); default when stderr is a terminal.
      devices: devices to shard chunks over (default ``jax.devices()``), or a count.
      decode: ``record -> (x, y)`` for random-access sources.
      num_train: ``N`` for a one-shot iterator source.
      curvature_data, curvature_examples: the data of the curvature operator for stream
        sources (see the module docstring).

    Cost: the test side once (see :func:`influx.influence.solve_test_vectors`), then per chunk
    ``n_test`` JVPs or one per-example-gradient pass, divided over the devices.

    Raises:
      ValueError/TypeError: bad options, data that does not fit ``apply_fn`` (checked on
      the first chunk and the test set before any solve), labels out of range, an empty
      dataset, a stream whose length differs from ``N``, or an ``out_dir`` written for
      other inputs (fingerprint mismatch).
    """
    t_start = time.perf_counter()
    chunk_size = _check_chunk_size(chunk_size)
    _check_method(method)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                              or top_k < 1):
        raise ValueError(f"top_k must be None or a positive int, got {top_k!r}")
    if not keep_scores and top_k is None:
        raise ValueError("keep_scores=False needs top_k (otherwise nothing would be kept)")
    devices = _resolve_devices(devices)
    src = _Source(train_source, chunk_size, decode=decode, num_train=num_train)
    n = src.n
    first = src.chunk(0)
    check_data(obj, params, first, name="train_source (first chunk)")
    n_test = _check_test(obj, params, test)
    f = _bind_measurement(obj, measurement)
    _check_measurement(f, params, test)
    if src.kind == "arrays":
        curv = src.arrays
    elif curvature_data is not None:
        curv = curvature_data
        check_data(obj, params, curv, name="curvature_data")
    else:
        curv = src.head(int(curvature_examples))
    resolved = _resolve_method(method, n_test, params, chunk_size, first[0], obj)
    if solver is None:
        solver = default_solver(params)
    k = None if top_k is None else min(int(top_k), n)
    dtype = np.dtype(jnp.result_type(*jax.tree_util.tree_leaves(params)))

    fp_parts = {
        "params": _digest(params),
        "test": _digest(_np_tree(test)),
        "train": _digest(_np_tree(curv)) if src.kind == "arrays" else _digest(first),
        "curvature_data": _digest(_np_tree(curv)),
        "n_train": n,
        "n_test": n_test,
        "options": json.dumps({
            "kind": kind, "damping": float(damping), "l2": obj.l2, "solver": repr(solver),
            "measurement": repr(measurement if measurement is not None else measurements.loss()),
            "method": resolved, "chunk_size": chunk_size, "top_k": k, "keep_scores": bool(keep_scores),
            "apply_fn": _fn_name(obj.apply_fn), "loss_fn": _fn_name(obj.loss_fn), "dtype": str(dtype),
        }, sort_keys=True),
    }
    fingerprint = hashlib.sha256(json.dumps(fp_parts, sort_keys=True).encode()).hexdigest()[:32]

    done_chunks, tk, vecs, resumed_from = 0, None, None, 0
    out = Path(out_dir) if out_dir is not None else None
    manifest = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        mpath = out / MANIFEST
        if mpath.exists():
            old = json.loads(mpath.read_text())
            if old.get("fingerprint") != fingerprint:
                diff = [key for key in fp_parts if old.get("parts", {}).get(key) != fp_parts[key]]
                raise ValueError(
                    f"out_dir {str(out)!r} holds scores written for different inputs "
                    f"(fingerprint mismatch; differs in: {', '.join(diff) or 'format'}). "
                    "Use a new directory or delete this one; results are never mixed."
                )
            manifest = old
            done_chunks = int(old["done_chunks"])
            resumed_from = int(old["done_examples"])
            if (out / VECTORS).exists():
                flat = np.load(out / VECTORS)
                _, unravel = ravel_pytree(params)
                vecs = jax.vmap(unravel)(jnp.asarray(flat))
            if k is not None and old.get("topk_file"):
                tk = _load_topk(out / old["topk_file"])
        else:
            manifest = {"format": FORMAT, "fingerprint": fingerprint, "parts": fp_parts,
                        "n_train": n, "n_test": n_test, "chunk_size": chunk_size, "method": resolved,
                        "done_chunks": 0, "done_examples": 0, "num_chunks": src.num_chunks,
                        "complete": False}

    sol_info = {}
    if vecs is None:
        vecs, sol = solve_test_vectors(obj, params, curv, test, kind=kind, damping=damping, solver=solver,
                                      measurement=f, chunk_size=chunk_size)
        sol_info = {"worst_residual": float(np.nanmax(np.asarray(sol.residual_norm))),
                    "all_converged": bool(np.all(np.asarray(sol.converged)))}
        if out is not None:
            flat = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(vecs))
            def _w(p, flat=flat):
                with open(p, "wb") as fh:
                    np.save(fh, flat)

            _atomic_write(out / VECTORS, _w)

    scores = None
    if keep_scores:
        if out is not None:
            spath = out / SCORES
            if spath.exists() and done_chunks > 0:
                scores = np.load(spath, mmap_mode="r+")
            else:
                scores = np.lib.format.open_memmap(spath, mode="w+", dtype=dtype, shape=(n_test, n))
        else:
            scores = np.empty((n_test, n), dtype)
    if k is not None and tk is None:
        tk = _topk_init(n_test, k, dtype)
    if out is not None:
        if manifest.get("sol_info") is None and sol_info:
            manifest["sol_info"] = sol_info
        _write_json(out / MANIFEST, manifest)

    ndev = len(devices)
    c_pad = -(-min(chunk_size, n) // ndev) * ndev
    if ndev > 1:
        mesh = Mesh(np.array(devices), ("data",))
        data_sharding = NamedSharding(mesh, PartitionSpec("data"))
        repl = NamedSharding(mesh, PartitionSpec())
        fn = chunk_scorer(obj, resolved, mesh)
        p_dev = jax.device_put(params, repl)
        v_dev = jax.device_put(vecs, repl)
    else:
        mesh = None
        fn = chunk_scorer(obj, resolved)
        data_sharding = repl = devices[0]
        p_dev = jax.device_put(params, devices[0])
        v_dev = jax.device_put(vecs, devices[0])
    scale = jax.device_put(jnp.asarray(1.0 / n, dtype=dtype), repl)

    bar = None
    if _want_progress(progress):
        from tqdm.auto import tqdm

        bar = tqdm(total=n, initial=min(done_chunks * chunk_size, n), unit="ex", unit_scale=True,
                   desc="influx.score", dynamic_ncols=True)
    t_loop = time.perf_counter()
    scored = 0
    try:
        for kc, chunk in zip(itertools.count(done_chunks), src.chunks(done_chunks)):
            start = kc * chunk_size
            m = num_examples(chunk)
            if start + m > n:
                raise ValueError(f"train_source yielded more than N = {n} examples")
            if kc > 0:  # chunk 0 was checked above
                check_data(obj, params, chunk, name=f"train_source (chunk {kc})")
            padded = jax.device_put(_pad_to(_np_tree(chunk), c_pad), data_sharding)
            block = np.asarray(fn(p_dev, v_dev, padded, scale))[:, :m]
            if scores is not None:
                scores[:, start:start + m] = block
            if tk is not None:
                tk = _topk_update(tk, block, start)
            scored += m
            if out is not None:
                if isinstance(scores, np.memmap):
                    scores.flush()
                previous = manifest.get("topk_file")
                if tk is not None:  # the manifest is the commit point: it names the top-k file
                    manifest["topk_file"] = TOPK.format(kc + 1)
                    _save_topk(out / manifest["topk_file"], tk)
                manifest["done_chunks"] = kc + 1
                manifest["done_examples"] = start + m
                _write_json(out / MANIFEST, manifest)
                if previous and previous != manifest.get("topk_file"):
                    (out / previous).unlink(missing_ok=True)
            if bar is not None:
                bar.update(m)
    finally:
        if bar is not None:
            bar.close()
    if out is not None:
        manifest["complete"] = True
        _write_json(out / MANIFEST, manifest)
        if scores is not None:
            del scores
            scores = np.load(out / SCORES, mmap_mode="r")
    elapsed = time.perf_counter() - t_loop
    info = {"method": resolved, "devices": [str(d) for d in devices], "n_train": n, "n_test": n_test,
            "resumed_from": resumed_from, "scored": scored, "seconds": time.perf_counter() - t_start,
            "scoring_seconds": elapsed, "examples_per_s": scored / elapsed if elapsed > 0 else float("nan"),
            **sol_info}
    return ScoreResult(scores, tk, manifest if manifest is not None else {"fingerprint": fingerprint,
                                                                          "parts": fp_parts}, info)
