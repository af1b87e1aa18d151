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
   ``jax.devices()``, all processes' devices in a multi-host run -- see below) with
   ``jax.shard_map``: the chunk is padded to a multiple of the
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

Multi-host (``jax.distributed``)
--------------------------------
After ``jax.distributed.initialize(...)`` (``jax.process_count() > 1``) every process calls
:func:`score` with the same arguments; nothing else changes for the caller::

    jax.distributed.initialize(coordinator_address="10.0.0.1:1234", num_processes=2,
                               process_id=i)      # CPU: gloo collectives (jax's default)
    r = influx.scoring.score(obj, params, train, test, out_dir="/shared/run", top_k=10)

* **Mesh.** The chunk axis is split over all global devices (``devices=None``: every
  process's devices; an explicit ``devices`` must include devices of every process and
  be the same on all). Parameters, vectors and ``1/N`` are replicated global arrays
  (``jax.make_array_from_callback``); the ``shard_map`` kernel is the single-process
  one, with no communication inside.
* **Reading.** Chunk ``k`` padded to ``c_pad`` rows is laid out by the data sharding;
  each process builds only its addressable shards (``jax.make_array_from_single_device_arrays``)
  and, for array and random-access sources, reads only those rows (padding rows repeat
  the chunk's last example, as in one process). Streams (iterables) cannot be indexed:
  every process iterates the whole stream -- which must yield the same batches on every
  process -- and keeps only its rows. Chunk 0 and the curvature data are read whole by
  every process (input checks, fingerprint), and array sources are hashed whole.
* **Test side.** Process 0 alone solves the test vectors (or loads them from
  ``out_dir`` when resuming) and broadcasts them (``broadcast_one_to_all``, exact:
  the other processes contribute zeros to a sum), so all processes score with
  bit-identical vectors. Cost: one broadcast of ``n_test * P`` numbers.
* **Results.** The ``(n_test, c_pad)`` block of each chunk is all-gathered
  (``process_allgather``: ``n_test * c_pad`` numbers to every process per chunk). Only
  process 0 writes ``out_dir`` (scores memmap, top-k, manifest -- the commit protocol
  is the single-process one); ``out_dir`` must therefore be on a filesystem shared by
  all processes: after a final barrier the others open the finished ``scores.npy`` /
  top-k / manifest (read-only) and return them. Without ``out_dir`` every process
  keeps the full in-memory matrix and top-k. Resume needs nothing else: process 0
  reads the manifest, broadcasts where to start, and a resumed run yields the
  identical file (same device layout).
* **Agreement.** Before any heavy work one small all-gather exchanges every process's
  input-check error (if any) and digests of the fingerprint parts and the device list:
  an input error on some processes makes every process raise (the failing ones their
  own error, the others a ``ValueError`` naming them), and processes called with
  different parameters, data, options or devices all raise a ``ValueError`` naming what
  differs. Each later chunk's reading and input check is agreed the same way (one small
  all-gather per chunk: a source that raises or ends early on one process makes all
  raise), and process 0's ``out_dir`` refusal and solve errors are broadcast.
* **Failure modes.** A process that dies or raises outside these agreed steps (a
  kill, an out-of-memory in the kernel) leaves the others blocked in their next
  collective until the distributed runtime's heartbeat timeout
  (``jax.distributed.initialize(heartbeat_timeout_seconds=100)`` by default), after
  which it aborts them; the manifest on disk stays consistent, so restarting all
  processes with the same arguments resumes. Every process must have the same number
  of local devices.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
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

    def read(self, a: int, b: int):
        """Examples ``a:b`` as numpy (arrays and random-access sources only: reads just those)."""
        if self.kind == "arrays":
            return _np_tree(_slice(self.arrays, a, b))
        if self.kind == "random_access":
            return self._ra_chunk(a, b)
        raise TypeError("read() needs an array or random-access source")

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


# ------------------------------------------------------------------ multi-process helpers
_MSG_BYTES = 1024  # error messages exchanged between processes are cut to this many bytes


def _encode(msg: str, size: int = _MSG_BYTES) -> np.ndarray:
    b = msg.encode("utf-8", "replace")[:size]
    out = np.zeros(size, np.uint8)
    out[:len(b)] = np.frombuffer(b, np.uint8)
    return out


def _decode(row) -> str:
    return bytes(np.asarray(row, np.uint8)).rstrip(b"\0").decode("utf-8", "replace")


def _allgather(x) -> np.ndarray:
    """``(process_count, *x.shape)``: every process's ``x`` (numpy in, numpy out)."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x)))


def _broadcast(x) -> np.ndarray:
    """Process 0's ``x`` on every process (the others pass a placeholder of the same shape)."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(x)))


def _broadcast_json(d: dict | None) -> dict:
    """Process 0's JSON-able ``d`` on every process (two small broadcasts: length, bytes)."""
    payload = json.dumps(d, sort_keys=True).encode() if jax.process_index() == 0 else b""
    size = int(_broadcast(np.asarray(len(payload), np.int64)))
    buf = np.zeros(size, np.uint8)
    if payload:
        buf[:] = np.frombuffer(payload, np.uint8)
    return json.loads(bytes(_broadcast(buf)))


def _raise_together(local_exc: BaseException | None, digests: np.ndarray | None = None,
                    keys: list[str] | None = None):
    """One allgather of (error message, input digests); then every process raises or none does.

    A process whose own step failed re-raises its exception (so an input error reads the
    same as in a single-process run); the others raise a ``ValueError`` naming the failed
    processes and their messages. With ``digests`` (``(len(keys), 16)`` uint8, zeros on a
    failed process), processes that agree on no error but hold different digests raise a
    ``ValueError`` naming the differing ``keys``.
    """
    msg = "" if local_exc is None else f"{type(local_exc).__name__}: {local_exc}"
    row = _encode(msg)
    if digests is not None:
        row = np.concatenate([row, digests.ravel()])
    rows = _allgather(row)
    failed = [(i, _decode(r[:_MSG_BYTES])) for i, r in enumerate(rows) if r[:_MSG_BYTES].any()]
    if local_exc is not None:
        raise local_exc
    if failed:
        raise ValueError(f"influx.scoring.score failed on process(es) {[i for i, _ in failed]} of "
                         f"{len(rows)}: " + "; ".join(f"process {i}: {m}" for i, m in failed))
    if digests is not None:
        g = rows[:, _MSG_BYTES:].reshape(len(rows), len(keys), -1)
        differ = [key for j, key in enumerate(keys) if not (g[:, j] == g[0, j]).all()]
        if differ:
            procs = [i for i in range(len(g)) if not (g[i] == g[0]).all()]
            raise ValueError(
                f"processes disagree on the scoring inputs: {', '.join(differ)} differ between process 0 "
                f"and process(es) {procs}. Every process must call influx.scoring.score with the same "
                "parameters, data, options and devices."
            )


def _digest16(value) -> np.ndarray:
    raw = json.dumps(value, sort_keys=True).encode()
    return np.frombuffer(hashlib.sha256(raw).digest()[:16], np.uint8)


def _replicate(tree, sharding):
    """A host pytree as global arrays replicated over ``sharding`` (each process puts its own copy)."""
    def one(a):
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

    return jax.tree_util.tree_map(one, tree)


def _agreed_items(chunk_iter):
    """``(kc, chunk, None)`` items; an exception of the source becomes a final
    ``(None, None, exc)`` item so that it can be agreed with the other processes."""
    it = iter(chunk_iter)
    while True:
        try:
            kc, chunk = next(it)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 -- agreed by the caller, then re-raised
            yield None, None, e
            return
        yield kc, chunk, None


def _local_pieces(read, m: int, c_pad: int, index_map) -> list:
    """``[(device, rows)]`` for this process's devices: its slices of the padded chunk.

    ``read(a, b)`` returns chunk rows ``a:b`` as numpy; rows ``>= m`` (padding) repeat row
    ``m - 1``, exactly as :func:`influx.influence._pad_to` pads the whole chunk.
    """
    pieces = []
    for dev, index in index_map.items():
        a, b, _ = index[0].indices(c_pad)
        lo = min(a, m - 1)
        hi = max(min(b, m), lo + 1)
        pieces.append((dev, _pad_to(read(lo, hi), b - a)))
    return pieces


def _global_chunk(pieces: list, sharding, c_pad: int):
    """Assembles per-device row blocks into a global ``(c_pad, ...)`` pytree sharded on axis 0."""
    treedef = jax.tree_util.tree_structure(pieces[0][1])
    per_dev = [jax.tree_util.tree_leaves(t) for _, t in pieces]
    leaves = []
    for j, leaf in enumerate(per_dev[0]):
        bufs = [jax.device_put(pl[j], d) for (d, _), pl in zip(pieces, per_dev)]
        shape = (c_pad,) + tuple(leaf.shape[1:])
        leaves.append(jax.make_array_from_single_device_arrays(shape, sharding, bufs))
    return jax.tree_util.tree_unflatten(treedef, leaves)


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


def _check_multiprocess_devices(devices):
    nproc = jax.process_count()
    if jax.device_count() != nproc * jax.local_device_count():
        raise ValueError(f"multi-process scoring needs the same number of devices on every process "
                         f"({jax.device_count()} devices over {nproc} processes)")
    have = {d.process_index for d in devices}
    if have != set(range(nproc)):
        raise ValueError(
            f"devices: in a multi-process run (jax.process_count() = {nproc}) the devices must include "
            f"devices of every process (got devices of process(es) {sorted(have)}); pass devices=None for "
            "all of jax.devices(), or score without jax.distributed for independent per-process runs"
        )


def _want_progress(progress):
    if progress is None:
        return sys.stderr.isatty()
    return bool(progress)


def _stable_repr(x) -> str:
    """``repr`` without memory addresses (``<function f at 0x7f..>`` -> ``<function f>``), so a
    fingerprint is the same in every process and in a resumed run."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(x))


class _Plan(NamedTuple):
    chunk_size: int
    devices: list
    src: _Source
    first: Any
    n_test: int
    f: Any
    curv: Any
    resolved: str
    solver: Any
    k: int | None
    dtype: Any
    fp_parts: dict
    fingerprint: str


def _plan(obj, params, train_source, test, *, chunk_size, kind, damping, solver, measurement, method,
          top_k, keep_scores, devices, decode, num_train, curvature_data, curvature_examples) -> _Plan:
    """Checks every input and computes the fingerprint (no solves, no scoring)."""
    chunk_size = _check_chunk_size(chunk_size)
    _check_method(method)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                              or top_k < 1):
        raise ValueError(f"top_k must be None or a positive int, got {top_k!r}")
    if not keep_scores and top_k is None:
        raise ValueError("keep_scores=False needs top_k (otherwise nothing would be kept)")
    devices = _resolve_devices(devices)
    if jax.process_count() > 1:
        _check_multiprocess_devices(devices)
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
            "kind": kind, "damping": float(damping), "l2": obj.l2, "solver": _stable_repr(solver),
            "measurement": _stable_repr(measurement if measurement is not None else measurements.loss()),
            "method": resolved, "chunk_size": chunk_size, "top_k": k, "keep_scores": bool(keep_scores),
            "apply_fn": _fn_name(obj.apply_fn), "loss_fn": _fn_name(obj.loss_fn), "dtype": str(dtype),
        }, sort_keys=True),
    }
    fingerprint = hashlib.sha256(json.dumps(fp_parts, sort_keys=True).encode()).hexdigest()[:32]
    return _Plan(chunk_size, devices, src, first, n_test, f, curv, resolved, solver, k, dtype,
                 fp_parts, fingerprint)


def _open_out_dir(out: Path, plan: _Plan):
    """Creates or resumes ``out``: ``(manifest, done_chunks, resumed_from, flat_vectors, top_k)``.

    Raises ``ValueError`` when ``out`` holds a manifest with another fingerprint.
    """
    out.mkdir(parents=True, exist_ok=True)
    mpath = out / MANIFEST
    if not mpath.exists():
        manifest = {"format": FORMAT, "fingerprint": plan.fingerprint, "parts": plan.fp_parts,
                    "n_train": plan.src.n, "n_test": plan.n_test, "chunk_size": plan.chunk_size,
                    "method": plan.resolved, "done_chunks": 0, "done_examples": 0,
                    "num_chunks": plan.src.num_chunks, "complete": False}
        return manifest, 0, 0, None, None
    old = json.loads(mpath.read_text())
    if old.get("fingerprint") != plan.fingerprint:
        diff = [key for key in plan.fp_parts if old.get("parts", {}).get(key) != plan.fp_parts[key]]
        raise ValueError(
            f"out_dir {str(out)!r} holds scores written for different inputs "
            f"(fingerprint mismatch; differs in: {', '.join(diff) or 'format'}). "
            "Use a new directory or delete this one; results are never mixed."
        )
    flat = np.load(out / VECTORS) if (out / VECTORS).exists() else None
    tk = None
    if plan.k is not None and old.get("topk_file"):
        tk = _load_topk(out / old["topk_file"])
    return old, int(old["done_chunks"]), int(old["done_examples"]), flat, tk


def _solve_flat(obj, params, test, plan: _Plan, *, kind, damping):
    """The solved test vectors, flattened ``(n_test, P)``, and the solve diagnostics."""
    vecs, sol = solve_test_vectors(obj, params, plan.curv, test, kind=kind, damping=damping,
                                   solver=plan.solver, measurement=plan.f, chunk_size=plan.chunk_size)
    sol_info = {"worst_residual": float(np.nanmax(np.asarray(sol.residual_norm))),
                "all_converged": bool(np.all(np.asarray(sol.converged)))}
    return np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(vecs)), sol_info


def _save_vectors(out: Path, flat):
    def _w(p):
        with open(p, "wb") as fh:
            np.save(fh, flat)

    _atomic_write(out / VECTORS, _w)


def score(obj: Objective, params, train_source, test, *, out_dir=None, chunk_size: int = 256,
          kind: str = "gnh", damping=1e-3, solver=None, measurement=None, method: str = "auto",
          top_k: int | None = None, keep_scores: bool = True, progress: bool | None = None,
          devices=None, decode: Callable | None = None, num_train: int | None = None,
          curvature_data=None, curvature_examples: int = 4096) -> ScoreResult:
    """Scores every training example of ``train_source`` against every test point.

    See the module docstring for sources, the curvature data, sharding, on-disk output,
    resume and multi-process (``jax.distributed``) runs. Options as
    :func:`influx.influence` plus:

    Args:
      out_dir: directory for ``scores.npy`` (memmap ``(n_test, N)``), ``vectors.npy``
        (the solved test vectors, ``(n_test, P)``), ``topk.<chunks>.npz`` and
        ``manifest.json``;
        ``None`` keeps everything in memory (no resume). In a multi-process run it must
        be on a filesystem shared by all processes (only process 0 writes).
      chunk_size: training examples per step (rounded up to a multiple of the device
        count for the computation; the chunking itself never depends on the devices).
      top_k: keep the ``k`` most helpful and most harmful training examples per test
        point (:class:`TopK`).
      keep_scores: ``False`` to keep only the top-k (the full matrix is never stored).
      progress: a tqdm bar (examples/s, ETA); default when stderr is a terminal (process
        0 only in a multi-process run).
      devices: devices to shard chunks over (default ``jax.devices()`` -- all processes'
        devices in a multi-process run), or a count.
      decode: ``record -> (x, y)`` for random-access sources.
      num_train: ``N`` for a one-shot iterator source.
      curvature_data, curvature_examples: the data of the curvature operator for stream
        sources (see the module docstring).

    Cost: the test side once (see :func:`influx.influence.solve_test_vectors`), then per chunk
    ``n_test`` JVPs or one per-example-gradient pass, divided over the devices.

    Raises:
      ValueError/TypeError: bad options, data that does not fit ``apply_fn`` (checked on
      the first chunk and the test set before any solve), labels out of range, an empty
      dataset, a stream whose length differs from ``N``, an ``out_dir`` written for
      other inputs (fingerprint mismatch), or -- multi-process -- processes called with
      different inputs or devices that leave out a process.
    """
    t_start = time.perf_counter()
    multi = jax.process_count() > 1
    lead = jax.process_index() == 0  # the only writer of out_dir in a multi-process run
    plan_kwargs = dict(chunk_size=chunk_size, kind=kind, damping=damping, solver=solver,
                       measurement=measurement, method=method, top_k=top_k, keep_scores=keep_scores,
                       devices=devices, decode=decode, num_train=num_train, curvature_data=curvature_data,
                       curvature_examples=curvature_examples)
    if not multi:
        plan = _plan(obj, params, train_source, test, **plan_kwargs)
    else:
        plan, err = None, None
        try:
            plan = _plan(obj, params, train_source, test, **plan_kwargs)
        except Exception as e:  # noqa: BLE001 -- agreed below, then re-raised
            err = e
        keys = ["params", "test", "train", "curvature_data", "n_train", "n_test", "options", "devices"]
        digests = np.zeros((len(keys), 16), np.uint8)
        if plan is not None:
            values = {**plan.fp_parts, "devices": [int(d.id) for d in plan.devices]}
            digests = np.stack([_digest16(values[key]) for key in keys])
        _raise_together(err, digests, keys)
    chunk_size, devices, src, n, n_test = plan.chunk_size, plan.devices, plan.src, plan.src.n, plan.n_test
    resolved, k, dtype, fingerprint = plan.resolved, plan.k, plan.dtype, plan.fingerprint
    _, unravel = ravel_pytree(params)

    done_chunks, tk, flat, resumed_from = 0, None, None, 0
    out = Path(out_dir) if out_dir is not None else None
    manifest = None
    sol_info = {}

    def open_and_solve():
        """Opens/validates ``out_dir`` (resume) and solves the test side when not resumed."""
        manifest, done_chunks, resumed_from, flat, tk = None, 0, 0, None, None
        if out is not None:
            manifest, done_chunks, resumed_from, flat, tk = _open_out_dir(out, plan)
        sol_info = {}
        if flat is None:
            flat, sol_info = _solve_flat(obj, params, test, plan, kind=kind, damping=damping)
            if out is not None:
                _save_vectors(out, flat)
        return manifest, done_chunks, resumed_from, flat, tk, sol_info

    if not multi:
        manifest, done_chunks, resumed_from, flat, tk, sol_info = open_and_solve()
    else:
        # Process 0 opens/validates out_dir and solves the test side; the others receive the
        # outcome and the vectors (never reading out_dir before the run is finished).
        status, err = None, None
        if lead:
            try:
                manifest, done_chunks, resumed_from, flat, tk, sol_info = open_and_solve()
                flat = np.asarray(flat, dtype=ravel_pytree(params)[0].dtype)
                status = {"done_chunks": done_chunks, "resumed_from": resumed_from, "sol_info": sol_info,
                          "shape": list(flat.shape), "dtype": str(flat.dtype)}
            except Exception as e:  # noqa: BLE001 -- agreed below, then re-raised
                err = e
                status = {"error": f"{type(e).__name__}: {e}"}
        status = _broadcast_json(status)
        if err is not None:
            raise err
        if "error" in status:
            raise ValueError(f"influx.scoring.score failed on process 0: {status['error']}")
        done_chunks, resumed_from = status["done_chunks"], status["resumed_from"]
        sol_info = status["sol_info"]
        if not lead:
            flat = np.zeros(status["shape"], status["dtype"])
        flat = _broadcast(flat)
    vecs = jax.vmap(unravel)(jnp.asarray(flat))
    writer = out is not None and (lead or not multi)  # the one process that writes out_dir
    # Non-writing processes with an out_dir keep neither scores nor top-k: they open the
    # finished files at the end (shared filesystem).
    keep_local = out is None or writer

    scores = None
    if keep_scores and keep_local:
        if out is not None:
            spath = out / SCORES
            if spath.exists() and done_chunks > 0:
                scores = np.load(spath, mmap_mode="r+")
            else:
                scores = np.lib.format.open_memmap(spath, mode="w+", dtype=dtype, shape=(n_test, n))
        else:
            scores = np.empty((n_test, n), dtype)
    if k is not None and tk is None and keep_local:
        tk = _topk_init(n_test, k, dtype)
    if writer:
        if manifest.get("sol_info") is None and sol_info:
            manifest["sol_info"] = sol_info
        _write_json(out / MANIFEST, manifest)

    ndev = len(devices)
    c_pad = -(-min(chunk_size, n) // ndev) * ndev
    if multi:
        mesh = Mesh(np.array(devices), ("data",))
        data_sharding = NamedSharding(mesh, PartitionSpec("data"))
        repl = NamedSharding(mesh, PartitionSpec())
        fn = chunk_scorer(obj, resolved, mesh)
        p_dev = _replicate(params, repl)
        v_dev = _replicate(vecs, repl)
        scale = _replicate(np.asarray(1.0 / n, dtype=dtype), repl)
        index_map = data_sharding.addressable_devices_indices_map((c_pad,))
    elif ndev > 1:
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
    if not multi:
        scale = jax.device_put(jnp.asarray(1.0 / n, dtype=dtype), repl)

    if multi and src.kind != "iterable":
        # random access: each process reads only its own devices' rows of every chunk
        chunk_iter = ((kc, None) for kc in range(done_chunks, src.num_chunks))
    else:
        chunk_iter = zip(itertools.count(done_chunks), src.chunks(done_chunks))

    bar = None
    if _want_progress(progress) and lead:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, initial=min(done_chunks * chunk_size, n), unit="ex", unit_scale=True,
                   desc="influx.score", dynamic_ncols=True)
    t_loop = time.perf_counter()
    scored = 0
    try:
        for kc, chunk, fetch_err in (_agreed_items(chunk_iter) if multi else
                                     ((kc, chunk, None) for kc, chunk in chunk_iter)):
            if fetch_err is not None:  # this process's stream raised (multi-process only)
                _raise_together(fetch_err)
            start = kc * chunk_size
            if not multi:
                m = num_examples(chunk)
                if start + m > n:
                    raise ValueError(f"train_source yielded more than N = {n} examples")
                if kc > 0:  # chunk 0 was checked above
                    check_data(obj, params, chunk, name=f"train_source (chunk {kc})")
                padded = jax.device_put(_pad_to(_np_tree(chunk), c_pad), data_sharding)
                block = np.asarray(fn(p_dev, v_dev, padded, scale))[:, :m]
            else:
                err, pieces = None, None
                try:
                    if chunk is None:
                        m = min(chunk_size, n - start)
                        read = lambda a, b, s=start: src.read(s + a, s + b)
                    else:
                        m = num_examples(chunk)
                        if start + m > n:
                            raise ValueError(f"train_source yielded more than N = {n} examples")
                        read = lambda a, b, c=chunk: _np_tree(_slice(c, a, b))
                    pieces = _local_pieces(read, m, c_pad, index_map)
                    if kc > 0:  # chunk 0 was checked above (whole, on every process)
                        check_data(obj, params, _concat([p for _, p in pieces]),
                                   name=f"train_source (chunk {kc})")
                except Exception as e:  # noqa: BLE001 -- agreed below, then re-raised
                    err = e
                _raise_together(err)
                padded = _global_chunk(pieces, data_sharding, c_pad)
                block = _allgather_global(fn(p_dev, v_dev, padded, scale))[:, :m]
            if scores is not None:
                scores[:, start:start + m] = block
            if tk is not None:
                tk = _topk_update(tk, block, start)
            scored += m
            if writer:
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
    if writer:
        manifest["complete"] = True
        _write_json(out / MANIFEST, manifest)
        if scores is not None:
            del scores
            scores = np.load(out / SCORES, mmap_mode="r")
    if multi:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("influx.scoring.score: done")  # process 0 has committed
        if out is not None and not lead:
            done = load(out)
            scores = done.scores if keep_scores else None
            tk, manifest = done.top_k, done.manifest
    elapsed = time.perf_counter() - t_loop
    info = {"method": resolved, "devices": [str(d) for d in devices], "n_train": n, "n_test": n_test,
            "resumed_from": resumed_from, "scored": scored, "seconds": time.perf_counter() - t_start,
            "scoring_seconds": elapsed, "examples_per_s": scored / elapsed if elapsed > 0 else float("nan"),
            **sol_info}
    if multi:
        info.update(process_index=jax.process_index(), process_count=jax.process_count())
    return ScoreResult(scores, tk, manifest if manifest is not None else {"fingerprint": fingerprint,
                                                                          "parts": plan.fp_parts}, info)


def _allgather_global(arr) -> np.ndarray:
    """A global (not fully addressable) array as a full numpy array on every process."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(arr, tiled=True))
