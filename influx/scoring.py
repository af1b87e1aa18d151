"""Whole-dataset batch scoring: streaming, sharded over devices, resumable on disk.

:func:`score` computes the influence matrix of :func:`influx.influence` for a training
set that need not fit in memory::

    score[t, m] = (1/N) grad f_t^T (C + (l2 + damping) I)^-1 grad L(z_m)
                ~= f_t(theta without m) - f_t(theta_s)      (positive: m helpful)

1. Every input and option is checked, and ``out_dir`` is opened (created, or verified
   and locked for a resume), **before** any solve: bad input raises
   :class:`~influx.errors.InputError` with nothing written.
2. The test side is solved **once**: ``s_t = A^-1 grad f_t`` for all test points (and, with
   ``out_dir``, saved to ``vectors.npy`` so a resumed run reuses the same vectors). A
   failed solve follows ``on_failure``: ``"raise"`` (default) raises
   :class:`~influx.errors.SolveError` naming how many solves failed, why and the fix;
   ``"nan"`` scores its test point as NaN (never 0) and reports the per-test status.
3. The training set is streamed in chunks of exactly ``chunk_size`` examples (the last one
   shorter) from

   * arrays ``(x, y)`` (a *tuple*) with a leading example axis,
   * any iterable of ``(x, y)`` batches of any sizes (re-chunked), or a zero-argument
     callable returning a fresh iterator,
   * a random-access source with ``__len__`` and ``__getitem__`` returning one record
     per index -- e.g. ``tfds.data_source(...)`` (no TensorFlow needed) -- turned into
     ``(x, y)`` by ``decode(record)`` (default ``(record["image"], record["label"])``).

4. Each chunk is scored by JVPs of the per-example loss along the ``s_t`` or by
   per-example gradients and a matmul (:func:`influx.attribution.choose_method`,
   overridable with ``method=``), split over ``devices`` (default all of
   ``jax.devices()``, all processes' devices in a multi-host run -- see below) with
   ``jax.shard_map`` on a one-axis mesh (one device is a one-device mesh): the chunk is
   padded to a multiple of the device count by repeating its last example and the
   padded columns are dropped.
5. Scores go to ``out_dir/scores.npy`` (a preallocated ``.npy`` memmap of shape
   ``(n_test, N)``, the free disk space checked first) chunk by chunk through
   :mod:`influx._store`: after each chunk the running top-k is written to a new file and
   ``manifest.json`` -- the chunks done, a checksum of each, the top-k file's name and
   checksum -- is replaced atomically. The manifest is the commit point, so a kill at any
   moment leaves a consistent state; a killed run, restarted with the same arguments,
   resumes after the last committed chunk and yields the identical matrix. On resume
   every committed chunk and file is verified (size, header, checksum): damaged or
   missing results raise :class:`~influx.errors.StateError` naming the file, never come
   back as zeros. The directory is locked (``fcntl.flock``) while a run uses it; one
   holding files influx did not write, or written for other inputs (the manifest's
   fingerprint: a hash of the parameters, the test set, the training set's size and first
   chunk -- or all of it when given as arrays --, and every option) is refused naming the
   files or the inputs that differ.

The curvature ``C`` is a mean over training examples: for array sources it uses the
whole training set; for streams it uses ``curvature_data`` if given, else the first
``curvature_examples`` examples of the stream (a subsample estimate: pass a shuffled
stream or explicit ``curvature_data`` when the order is not random).

``N`` (the ``1/N`` of the score) must be known in advance: arrays and random-access
sources know it; for iterables pass ``num_train`` or a callable source (then one extra
pass counts the examples).

Structure: :func:`score` composes four parts -- a *communication strategy*
(:class:`_OneProcess` or :class:`_ManyProcesses`), a *placement* on a device mesh
(:class:`_Placement`), a *chunk reader* (:class:`_ChunkReader`) and a *sink*
(:class:`_Sink`: in-memory or :mod:`influx._store`, plus the running top-k).

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
* **Test side.** Process 0 alone opens ``out_dir`` and solves the test vectors (or loads
  them when resuming) and broadcasts them (``broadcast_one_to_all``, exact: the other
  processes contribute zeros to a sum), so all processes score with bit-identical
  vectors. Cost: one broadcast of ``n_test * P`` numbers.
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
  own error, the others an ``InputError`` naming them), and processes called with
  different parameters, data, options or devices all raise an ``InputError`` naming what
  differs. Each later chunk's reading and input check is agreed the same way (one small
  all-gather per chunk: a source that raises or ends early on one process makes all
  raise), and process 0's ``out_dir`` refusal and solve errors are broadcast (raised
  with the same exception class on every process).
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
import json
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from influx import _memory, _store, errors
from influx import _progress as _progress_mod
from influx import measurements as _measurements
from influx.attribution import (
    METHODS,
    PER_EXAMPLE_OVERHEAD,
    _first,
    choose_method,
    chunk_scorer,
    default_solver,
    forward_flops,
    measurements,
    per_example_block,
    score_chunk_size,
    solve_test_vectors,
)
from influx.curvature import KINDS, pad_rows
from influx.errors import InputError, SolveError, StateError
from influx.objective import Objective, check_data, num_examples
from influx.solvers import Solver, status_message
from influx.solvers import saved as _saved
from influx.validation import boundary as _boundary
from influx.validation import (
    check_choice,
    check_nonnegative,
    check_on_failure,
    check_positive_int,
    check_test,
)

__all__ = ["score", "ScoreResult", "TopK", "load", "ON_FAILURE"]

MANIFEST = _store.MANIFEST  # the commit point (see influx._store)
FORMAT = _store.FORMAT
SCORES = "scores.npy"
VECTORS = "vectors.npy"
TOPK = "topk.{:06d}.npz"  # one file per committed chunk count; the manifest names the current one
_OWNED = (VECTORS, "topk.*.npz")  # the side files a scoring directory may hold
_KIND = "scoring"
ON_FAILURE = ("raise", "nan")


class TopK(NamedTuple):
    """Running top-k per test point (all ``(n_test, k)``).

    helpful_indices / helpful_scores: the ``k`` largest scores (removing them raises
    the measurement most), in descending order. harmful_indices / harmful_scores: the
    ``k`` most negative scores, in ascending order. Ties go to the lower index. A test
    point whose solve failed (``on_failure="nan"``) has indices ``-1`` and NaN scores.
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
    manifest: the manifest dict (fingerprint inputs, progress, checksums, ``meta``).
    info: dict with ``method``, ``devices``, ``n_train``, ``n_test``, ``resumed_from``,
      ``scored``, ``seconds`` and ``examples_per_s`` of this call, and the solves'
      ``worst_residual``, ``all_converged``, per-test ``solve_status`` (codes of
      :class:`influx.solvers.Status`) and ``failed_tests`` (indices scored NaN).
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
            raise InputError(f"train_source: batch {i} is a {type(b).__name__}, expected a pair (x, y)")
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
        raise InputError("train_source records are dicts without 'image'/'label' keys "
                         f"(keys: {sorted(record)}); pass decode=lambda r: (x, y)")
    if isinstance(record, (tuple, list)) and len(record) == 2:
        return tuple(record)
    raise TypeError(f"cannot decode a record of type {type(record).__name__}; pass decode=")


class _Source:
    """Uniform view of a training source: ``n``, ``num_chunks``, ``chunk(k)`` (sequential for
    streams), ``read(a, b)`` (arrays / random access) and ``head(n)``."""

    def __init__(self, src, size: int, *, decode=None, num_train=None):
        self.size, self.kind, self.buffer = size, None, []
        if _is_arrays(src):
            self.kind, self.arrays = "arrays", src
            self.n = num_examples(src, name="train_source")
        elif hasattr(src, "__len__") and hasattr(src, "__getitem__") and not isinstance(src, (list, tuple)):
            self.kind, self.ra = "random_access", src
            self.decode = decode or _default_decode
            self.n = len(src)
        elif callable(src) or isinstance(src, Iterable):
            self.kind = "iterable"
            factory = src if callable(src) else None
            if num_train is not None:
                self.n = int(num_train)
            elif factory is not None:
                self.n = sum(num_examples(_np_tree(tuple(b)), name="train_source batch") for b in factory())
            else:
                raise InputError("train_source: an iterator of batches needs num_train= (or pass a "
                                 "callable returning a fresh iterator, then N is counted)")
            self._stream = _rechunk(factory() if factory is not None else iter(src), size)
        else:
            raise TypeError("train_source must be a tuple (x, y) of arrays, an iterable of (x, y) batches, "
                            "a callable returning one, or a random-access source (__len__/__getitem__); "
                            f"got {type(src).__name__}")
        if self.n <= 0:
            raise InputError("train_source: the dataset is empty (0 examples)")
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

    def _next_stream_chunk(self):
        return next(self._stream, None)

    def chunk(self, k):
        """Chunk ``k``: random access for arrays and records; for streams ``k`` must be the
        next chunk or a buffered one (chunks read by :meth:`head` are kept)."""
        a, b = k * self.size, min((k + 1) * self.size, self.n)
        if self.kind == "arrays":
            return _slice(self.arrays, a, b)
        if self.kind == "random_access":
            return self._ra_chunk(a, b)
        while len(self.buffer) <= k:
            nxt = self._next_stream_chunk()
            if nxt is None:
                return None
            self.buffer.append(nxt)
        return self.buffer[k]

    def release(self, k):
        """Drops a buffered stream chunk that no later read needs."""
        if self.kind == "iterable" and k < len(self.buffer):
            self.buffer[k] = None

    def read(self, a: int, b: int):
        """Examples ``a:b`` as numpy (arrays and random-access sources only: reads just those)."""
        if self.kind == "arrays":
            return _np_tree(_slice(self.arrays, a, b))
        return self._ra_chunk(a, b)

    def exhausted(self) -> bool:
        """For streams: no data after the last chunk (``True`` for the other sources)."""
        return self.kind != "iterable" or self._next_stream_chunk() is None

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


# ------------------------------------------------------------------ fingerprint
# the digests live in influx._store (shared with the saved solver states of influx.solvers.saved)
_digest, _fn_name, _stable_repr = _store.digest_tree, _store.fn_name, _store.stable_repr


# ------------------------------------------------------------------ input checks
def _resolve_method(method, n_test, params, obj, x) -> str:
    """``method="auto"``: :func:`influx.attribution.choose_method` on the forward flops."""
    if method != "auto":
        return method
    leaves = jax.tree_util.tree_leaves(params)
    flops = forward_flops(obj, params, x) if n_test > PER_EXAMPLE_OVERHEAD else None
    return choose_method(n_test, sum(int(np.size(l)) for l in leaves),
                         itemsize=max(jnp.result_type(l).itemsize for l in leaves), flops_per_example=flops)


def _resolve_devices(devices):
    if devices is None:
        return list(jax.devices())
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        all_ = jax.devices()
        if not 1 <= devices <= len(all_):
            raise InputError(f"devices={devices}: need 1..{len(all_)} (jax.devices() has {len(all_)})")
        return list(all_[:devices])
    devices = list(devices)
    if not devices:
        raise InputError("devices: empty list")
    if jax.process_count() > 1:
        _check_multiprocess_devices(devices)
    return devices


def _check_multiprocess_devices(devices):
    nproc = jax.process_count()
    if jax.device_count() != nproc * jax.local_device_count():
        raise InputError(f"multi-process scoring needs the same number of devices on every process "
                         f"({jax.device_count()} devices over {nproc} processes)")
    have = {d.process_index for d in devices}
    if have != set(range(nproc)):
        raise InputError(
            f"devices: in a multi-process run (jax.process_count() = {nproc}) the devices must include "
            f"devices of every process (got devices of process(es) {sorted(have)}); pass devices=None for "
            "all of jax.devices(), or score without jax.distributed for independent per-process runs"
        )


class _Plan(NamedTuple):
    """Everything :func:`score` needs, checked before any work or side effect."""

    chunk_size: int
    devices: list
    src: _Source
    n_test: int
    f: Any
    curv: Any
    method: str
    solver: Any
    kind: str
    damping: float
    k: int | None
    keep_scores: bool
    on_failure: str
    dtype: Any
    out_dir: Path | None
    fp_parts: dict
    prepared: Any = None  # an influx.Prepared (state=), verified against the curvature data
    memory_budget: int | None = None
    progress: bool | None = False

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.fp_parts, sort_keys=True).encode()).hexdigest()[:32]

    def store_inputs(self) -> dict:
        """The fingerprint as the store's flat inputs: one key per option (named when it differs)."""
        flat = {k: v for k, v in self.fp_parts.items() if k != "options"}
        flat.update({f"options.{k}": v for k, v in self.fp_parts["options"].items()})
        return flat


def _check_options(chunk_size, kind, damping, method, top_k, keep_scores, on_failure, solver, out_dir,
                   curvature_examples, progress):
    """The option checks that need no data (InputError / TypeError)."""
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    check_choice(kind, "kind", KINDS)
    damping = check_nonnegative(damping, "damping")
    check_choice(method, "method", METHODS)
    check_on_failure(on_failure, allowed=ON_FAILURE)
    check_positive_int(curvature_examples, "curvature_examples")
    if top_k is not None:
        check_positive_int(top_k, "top_k")
    if not keep_scores and top_k is None:
        raise InputError("keep_scores=False needs top_k (otherwise nothing would be kept)")
    if progress is not None and not isinstance(progress, bool):
        raise InputError(f"progress must be None, True or False, got {progress!r}")
    if solver is not None and not isinstance(solver, Solver):
        raise TypeError(f"solver must be an influx.solvers.Solver, got {type(solver).__name__}")
    if out_dir is not None and not isinstance(out_dir, (str, Path)) and not hasattr(out_dir, "__fspath__"):
        raise InputError(f"out_dir must be a path or None, got {type(out_dir).__name__}")
    return chunk_size, damping


def _plan(obj, params, train_source, test, *, chunk_size, kind, damping, solver, measurement, method,
          top_k, keep_scores, on_failure, out_dir, progress, devices, decode, num_train, curvature_data,
          curvature_examples, memory_budget=None) -> _Plan:
    """Checks every input and computes the fingerprint (no solve, no scoring, nothing written)."""
    chunk_size, damping = _check_options(chunk_size, kind, damping, method, top_k, keep_scores, on_failure,
                                         solver, out_dir, curvature_examples, progress)
    if memory_budget is not None:
        memory_budget = _memory.resolve_budget(memory_budget)
    devices = _resolve_devices(devices)
    if num_train is not None:
        num_train = check_positive_int(num_train, "num_train")
    if decode is not None and not callable(decode):
        raise InputError(f"decode must be a callable record -> (x, y), got {type(decode).__name__}")
    src = _Source(train_source, chunk_size, decode=decode, num_train=num_train)
    first = src.chunk(0)
    if first is None:
        raise InputError("train_source: the dataset is empty (0 examples)")
    check_data(obj, params, first, name="train_source (first chunk)")
    f = _measurements.bind(obj, measurement)
    n_test = check_test(obj, params, test)
    _measurements.check(f, params, tuple(test))
    if src.kind == "arrays":
        curv = src.arrays
    elif curvature_data is not None:
        curv = curvature_data
        check_data(obj, params, curv, name="curvature_data")
    else:
        curv = src.head(int(curvature_examples))
    method = _resolve_method(method, n_test, params, obj, first[0])
    solver = default_solver(params) if solver is None else solver
    k = None if top_k is None else min(int(top_k), src.n)
    dtype = np.dtype(jnp.result_type(*jax.tree_util.tree_leaves(params)))
    fp_parts = {
        "params": _digest(params),
        "test": _digest(_np_tree(test)),
        "train": _digest(_np_tree(curv)) if src.kind == "arrays" else _digest(first),
        "curvature_data": _digest(_np_tree(curv)),
        "n_train": src.n,
        "n_test": n_test,
        "options": {
            "kind": kind, "damping": damping, "l2": obj.l2, "solver": _stable_repr(solver),
            "measurement": _stable_repr(measurement if measurement is not None else measurements.loss()),
            "method": method, "chunk_size": chunk_size, "top_k": k, "keep_scores": bool(keep_scores),
            "apply_fn": _fn_name(obj.apply_fn), "loss_fn": _fn_name(obj.loss_fn), "dtype": str(dtype),
        },
    }
    return _Plan(chunk_size, devices, src, n_test, f, curv, method, solver, kind, damping, k,
                 bool(keep_scores), on_failure, dtype, None if out_dir is None else Path(out_dir), fp_parts,
                 memory_budget=memory_budget, progress=progress)


# ------------------------------------------------------------------ communication strategies
_MSG_BYTES = 1024  # error messages exchanged between processes are cut to this many bytes
_DIGEST_KEYS = ["params", "test", "train", "curvature_data", "n_train", "n_test", "options", "devices"]


def _encode(msg: str, size: int = _MSG_BYTES) -> np.ndarray:
    b = msg.encode("utf-8", "replace")[:size]
    out = np.zeros(size, np.uint8)
    out[:len(b)] = np.frombuffer(b, np.uint8)
    return out


def _decode(row) -> str:
    return bytes(np.asarray(row, np.uint8)).rstrip(b"\0").decode("utf-8", "replace")


def _digest16(value) -> np.ndarray:
    raw = json.dumps(value, sort_keys=True).encode()
    return np.frombuffer(hashlib.sha256(raw).digest()[:16], np.uint8)


def _rebuild_error(name: str, message: str) -> Exception:
    """An exception of influx's class ``name`` (else ValueError) carrying process 0's message."""
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.InfluxError)):
        return ValueError(f"influx.scoring.score failed on process 0: {name}: {message}")
    return cls(f"on process 0: {message}")


class _OneProcess:
    """The communication strategy of an ordinary run: nothing to agree, share or gather."""

    lead = True
    count = 1
    reads_whole_chunks = True  # this process reads every row of a chunk

    def plan(self, make_plan: Callable[[], _Plan]) -> _Plan:
        return make_plan()

    def agree(self, exc: BaseException | None):
        if exc is not None:
            raise exc

    def on_lead(self, fn: Callable[[], tuple[Any, dict]]) -> tuple[Any, dict]:
        return fn()

    def share(self, flat, status: dict):
        return flat

    def gather(self, arr) -> np.ndarray:
        return np.asarray(arr)

    def barrier(self, name: str):
        pass

    def info(self) -> dict:
        return {}


class _ManyProcesses:
    """``jax.distributed``: errors agreed by all-gather, process 0's results broadcast."""

    def __init__(self):
        from jax.experimental import multihost_utils

        self._mh = multihost_utils
        self.lead = jax.process_index() == 0
        self.count = jax.process_count()
        self.reads_whole_chunks = False  # random-access sources: only this process's rows

    def _allgather(self, x) -> np.ndarray:
        return np.asarray(self._mh.process_allgather(np.asarray(x)))

    def _broadcast(self, x) -> np.ndarray:
        return np.asarray(self._mh.broadcast_one_to_all(np.asarray(x)))

    def _broadcast_json(self, d: dict | None) -> dict:
        payload = json.dumps(d, sort_keys=True).encode() if self.lead else b""
        size = int(self._broadcast(np.asarray(len(payload), np.int64)))
        buf = np.zeros(size, np.uint8)
        if payload:
            buf[:] = np.frombuffer(payload, np.uint8)
        return json.loads(bytes(self._broadcast(buf)))

    def agree(self, exc: BaseException | None, digests: np.ndarray | None = None):
        """One allgather of (error message, input digests); then every process raises or none does.

        A process whose own step failed re-raises its exception (so an input error reads the
        same as in a single-process run); the others raise an ``InputError`` (a ``ValueError``)
        naming the failed processes and their messages. With ``digests``
        (``(len(_DIGEST_KEYS), 16)`` uint8, zeros on a failed process), processes that agree
        on no error but hold different digests raise an ``InputError`` naming the differing keys.
        """
        row = _encode("" if exc is None else f"{type(exc).__name__}: {exc}")
        if digests is not None:
            row = np.concatenate([row, digests.ravel()])
        rows = self._allgather(row)
        failed = [(i, _decode(r[:_MSG_BYTES])) for i, r in enumerate(rows) if r[:_MSG_BYTES].any()]
        if exc is not None:
            raise exc
        if failed:
            raise InputError(f"influx.scoring.score failed on process(es) {[i for i, _ in failed]} of "
                             f"{len(rows)}: " + "; ".join(f"process {i}: {m}" for i, m in failed))
        if digests is not None:
            g = rows[:, _MSG_BYTES:].reshape(len(rows), len(_DIGEST_KEYS), -1)
            differ = [key for j, key in enumerate(_DIGEST_KEYS) if not (g[:, j] == g[0, j]).all()]
            if differ:
                procs = [i for i in range(len(g)) if not (g[i] == g[0]).all()]
                raise InputError(
                    f"processes disagree on the scoring inputs: {', '.join(differ)} differ between process "
                    f"0 and process(es) {procs}. Every process must call influx.scoring.score with the same "
                    "parameters, data, options and devices.")

    def plan(self, make_plan: Callable[[], _Plan]) -> _Plan:
        plan, err = None, None
        try:
            plan = make_plan()
        except Exception as e:  # noqa: BLE001 -- agreed below, then re-raised
            err = e
        digests = np.zeros((len(_DIGEST_KEYS), 16), np.uint8)
        if plan is not None:
            values = {**plan.fp_parts, "devices": [int(d.id) for d in plan.devices]}
            digests = np.stack([_digest16(values[key]) for key in _DIGEST_KEYS])
        self.agree(err, digests)
        return plan

    def on_lead(self, fn: Callable[[], tuple[Any, dict]]) -> tuple[Any, dict]:
        """Runs ``fn`` on process 0 only; its JSON status (or its error) reaches every process."""
        local, status, err = None, None, None
        if self.lead:
            try:
                local, status = fn()
            except Exception as e:  # noqa: BLE001 -- broadcast below, then re-raised
                err, status = e, {"error": [type(e).__name__, str(e)]}
        status = self._broadcast_json(status)
        if err is not None:
            raise err
        if "error" in status:
            raise _rebuild_error(*status["error"])
        return local, status

    def share(self, flat, status: dict):
        """Process 0's solved vectors on every process (exact)."""
        if not self.lead:
            flat = np.zeros(status["shape"], status["dtype"])
        return self._broadcast(np.asarray(flat, status["dtype"]))

    def gather(self, arr) -> np.ndarray:
        """A global (not fully addressable) array as a full numpy array on every process."""
        return np.asarray(self._mh.process_allgather(arr, tiled=True))

    def barrier(self, name: str):
        self._mh.sync_global_devices(name)

    def info(self) -> dict:
        return {"process_index": jax.process_index(), "process_count": self.count}


# ------------------------------------------------------------------ placement
class _Placement:
    """The devices as a one-axis mesh (one device is a one-device mesh): replicated parameters
    and vectors, chunks of ``c_pad`` rows split over the mesh axis, the compiled scorer."""

    def __init__(self, obj, method: str, devices: list, c_pad: int, sub: int | None = None,
                 block: int | None = None):
        self.mesh = Mesh(np.array(devices), ("data",))
        self.data = NamedSharding(self.mesh, PartitionSpec("data"))
        self.repl = NamedSharding(self.mesh, PartitionSpec())
        self.c_pad = c_pad
        self.index_map = self.data.addressable_devices_indices_map((c_pad,))
        self._fn = chunk_scorer(obj, method, self.mesh, sub=sub, block=block)

    def replicate(self, tree):
        """A host pytree as global arrays replicated over the mesh (each process puts its copy)."""
        def one(a):
            a = np.asarray(a)
            return jax.make_array_from_callback(a.shape, self.repl, lambda idx: a[idx])

        return jax.tree_util.tree_map(one, tree)

    def pieces(self, read: Callable[[int, int], Any], m: int) -> list:
        """``[(device, rows)]`` for this process's devices: their slices of the padded chunk.

        ``read(a, b)`` returns chunk rows ``a:b`` as numpy; rows ``>= m`` (padding) repeat row
        ``m - 1``.
        """
        pieces = []
        for dev, index in self.index_map.items():
            a, b, _ = index[0].indices(self.c_pad)
            lo = min(a, m - 1)
            hi = max(min(b, m), lo + 1)
            pieces.append((dev, pad_rows(read(lo, hi), b - a)))
        return pieces

    def put(self, pieces: list):
        """Per-device row blocks as one global ``(c_pad, ...)`` pytree sharded on axis 0."""
        treedef = jax.tree_util.tree_structure(pieces[0][1])
        per_dev = [jax.tree_util.tree_leaves(t) for _, t in pieces]
        leaves = []
        for j, leaf in enumerate(per_dev[0]):
            bufs = [jax.device_put(pl[j], d) for (d, _), pl in zip(pieces, per_dev)]
            shape = (self.c_pad,) + tuple(leaf.shape[1:])
            leaves.append(jax.make_array_from_single_device_arrays(shape, self.data, bufs))
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def score(self, params, vecs, chunk, scale):
        """``(n_test, c_pad)`` scores of a placed chunk (a global array)."""
        return self._fn(params, vecs, chunk, scale)


# ------------------------------------------------------------------ chunk reader
class _Chunk(NamedTuple):
    index: int
    start: int
    m: int  # examples in the chunk (before padding)
    pieces: list  # [(device, rows)] of this process (see _Placement.pieces)


class _ChunkReader:
    """Reads chunk ``k`` of the source, checks it and cuts this process's device pieces.

    One process (or any stream) reads the whole chunk once; with several processes an
    array or random-access source is read only at this process's rows. The length of a
    stream is checked chunk by chunk against ``N``.
    """

    def __init__(self, obj, params, src: _Source, placement: _Placement, *, whole: bool):
        self.obj, self.params, self.src, self.placement = obj, params, src, placement
        self.whole = whole or src.kind == "iterable"

    def _stream_chunk(self, k: int, start: int, want: int):
        chunk = self.src.chunk(k)
        got = 0 if chunk is None else num_examples(chunk)
        if got < want:
            raise InputError(f"train_source yielded {start + got} examples, but N = {self.src.n} was given "
                             "/ counted")
        if got > want or (k == self.src.num_chunks - 1 and not self.src.exhausted()):
            raise InputError(f"train_source yielded more than N = {self.src.n} examples")
        return chunk

    def skip(self, k: int):
        """Consumes chunk ``k`` of a stream without scoring it (resume)."""
        if self.src.kind == "iterable":
            start = k * self.src.size
            self._stream_chunk(k, start, min(self.src.size, self.src.n - start))
            self.src.release(k)

    def read(self, k: int) -> _Chunk:
        start = k * self.src.size
        m = min(self.src.size, self.src.n - start)
        if self.whole:
            chunk = (self._stream_chunk(k, start, m) if self.src.kind == "iterable"
                     else _np_tree(self.src.chunk(k)))
            self.src.release(k)
            pieces = self.placement.pieces(lambda a, b: _np_tree(_slice(chunk, a, b)), m)
            local = chunk
        else:
            pieces = self.placement.pieces(lambda a, b: self.src.read(start + a, start + b), m)
            local = _concat([p for _, p in pieces])
        if k > 0:  # chunk 0 was checked by the plan (whole, on every process)
            check_data(self.obj, self.params, local, name=f"train_source (chunk {k})")
        return _Chunk(k, start, m, pieces)

    def chunks(self, first: int, comm) -> Iterator[_Chunk]:
        """Chunks ``first..`` in order; reading errors are agreed between processes."""
        for k in range(first if self.src.kind == "iterable" else 0):
            err = None
            try:
                self.skip(k)
            except Exception as e:  # noqa: BLE001 -- agreed, then re-raised
                err = e
            comm.agree(err)
        for k in range(first, self.src.num_chunks):
            err, chunk = None, None
            try:
                chunk = self.read(k)
            except Exception as e:  # noqa: BLE001 -- agreed, then re-raised
                err = e
            comm.agree(err)
            yield chunk


# ------------------------------------------------------------------ top-k
def _topk_init(n_test, k, dtype) -> TopK:
    return TopK(np.full((n_test, k), -1, np.int64), np.full((n_test, k), -np.inf, dtype),
                np.full((n_test, k), -1, np.int64), np.full((n_test, k), np.inf, dtype))


def _topk_update(tk: TopK, block: np.ndarray, offset: int, failed: np.ndarray | None = None) -> TopK:
    k = tk.helpful_scores.shape[1]
    idx = np.broadcast_to(np.arange(offset, offset + block.shape[1]), block.shape)
    out = []
    for vals0, idx0, sign in ((tk.helpful_scores, tk.helpful_indices, -1.0),
                              (tk.harmful_scores, tk.harmful_indices, 1.0)):
        vals = np.concatenate([vals0, block], axis=1)
        ids = np.concatenate([idx0, idx], axis=1)
        order = np.argsort(sign * vals, axis=1, kind="stable")[:, :k]
        ids, vals = np.take_along_axis(ids, order, 1), np.take_along_axis(vals, order, 1)
        if failed is not None and failed.any():  # a failed solve ranks nothing
            ids[failed], vals[failed] = -1, np.nan
        out.append((ids, vals))
    (hi, hs), (li, ls) = out
    return TopK(hi, hs, li, ls)


def _save_topk(tk: TopK):
    return lambda fh: np.savez(fh, **tk._asdict())


def _load_topk(path: Path) -> TopK:
    try:
        with np.load(path) as z:
            return TopK(**{k: z[k] for k in TopK._fields})
    except (OSError, ValueError, KeyError) as e:
        raise StateError(f"{path}: not a readable top-k file ({type(e).__name__}: {e}); delete "
                         f"{str(path.parent)!r} or pass a new out_dir") from None


# ------------------------------------------------------------------ test side and failure policy
def _solve_report(sol, flat: np.ndarray, n_test: int) -> dict:
    """Per-test solve status (JSON-able); a non-finite vector counts as failed."""
    status = np.broadcast_to(np.asarray(sol.status), (n_test,)).astype(int).copy()
    converged = np.broadcast_to(np.asarray(sol.converged), (n_test,))
    status[(status == 0) & ~converged] = 1
    status[(status == 0) & ~np.isfinite(flat).all(axis=1)] = 5  # Status.NONFINITE
    residual = np.broadcast_to(np.asarray(sol.residual_norm, np.float64), (n_test,))
    return {"worst_residual": float(np.nanmax(residual)) if np.isfinite(residual).any() else float("nan"),
            "all_converged": bool((status == 0).all()), "solve_status": status.tolist(),
            "failed_tests": np.flatnonzero(status != 0).tolist()}


def _check_solves(report: dict, solver, on_failure: str):
    """``on_failure="raise"``: SolveError when any test-vector solve failed."""
    failed = report["failed_tests"]
    if not failed or on_failure != "raise":
        return
    codes = sorted({report["solve_status"][i] for i in failed})
    raise SolveError(
        f"influx.scoring.score: {len(failed)} of {len(report['solve_status'])} test-vector solves failed "
        f"({_stable_repr(solver)}; worst residual {report['worst_residual']:.3g}; test points "
        f"{failed[:10]}{' ...' if len(failed) > 10 else ''}): "
        + "; ".join(status_message(c) for c in codes)
        + ". Fix the solve (damping, tolerance, steps, or solver=influx.solvers.direct() for small "
        "models), or pass on_failure='nan' to score the other test points (the failed ones are NaN)."
    )


def _solve_flat(obj, params, test, plan: _Plan):
    """The solved test vectors, flattened ``(n_test, P)`` (NaN rows for failed solves), and the
    solve report; raises SolveError under ``on_failure="raise"``."""
    kw = dict(kind=plan.kind, damping=plan.damping, solver=plan.solver, measurement=plan.f,
              chunk_size=plan.chunk_size, on_failure="nan",  # the policy is applied here, once
              memory_budget=plan.memory_budget, progress=plan.progress)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*did not converge", category=RuntimeWarning)
        vecs, sol = solve_test_vectors(obj, params, plan.curv, test, state=plan.prepared, **kw)
    flat = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(vecs))
    report = _solve_report(sol, flat, plan.n_test)
    _check_solves(report, plan.solver, plan.on_failure)
    if report["failed_tests"]:
        flat = flat.copy()
        flat[report["failed_tests"]] = np.nan  # never a plausible score from a failed solve
    return flat, report


def _resumed_chunks(store: _store.Store, plan: _Plan) -> int:
    """Committed chunks of a resumed store, checked against this plan's chunking."""
    n, cs = plan.src.n, plan.chunk_size
    grid = [(k * cs, min((k + 1) * cs, n)) for k in range(len(store.chunks))]
    if store.chunks != grid:
        raise StateError(f"{store.path / _store.MANIFEST}: committed chunks {store.chunks[:4]}... are not "
                         f"chunks of {cs} examples; delete {str(store.path)!r} or pass a new out_dir")
    if store.chunks and plan.k is not None and store.file("topk") is None:
        raise StateError(f"{store.path / _store.MANIFEST}: {len(grid)} committed chunk(s) but no top-k file; "
                         f"delete {str(store.path)!r} or pass a new out_dir")
    if store.chunks and store.file("vectors") is None:
        raise StateError(f"{store.path / _store.MANIFEST}: committed chunks without the solved test vectors "
                         f"({VECTORS}); delete {str(store.path)!r} or pass a new out_dir")
    return len(grid)


def _load_vectors(store: _store.Store, n_test: int):
    path, report = store.file("vectors"), store.meta.get("solves")
    try:
        flat = np.load(path)
        ok = flat.ndim == 2 and flat.shape[0] == n_test and isinstance(report, dict)
        ok = ok and len(report.get("solve_status", ())) == n_test
    except (OSError, ValueError) as e:
        ok, flat = False, f"{type(e).__name__}: {e}"
    if not ok:
        raise StateError(f"{path}: not the solved test vectors of this run ({n_test} rows with their solve "
                         f"report); delete {str(store.path)!r} or pass a new out_dir")
    return flat, report


def _open_store(plan: _Plan) -> _store.Store:
    shape = (plan.n_test, plan.src.n) if plan.keep_scores else None
    return _store.open_store(plan.out_dir, kind=_KIND, inputs=plan.store_inputs(), shape=shape,
                             dtype=plan.dtype, axis=1, array=SCORES, owned=_OWNED,
                             space_hint="keep only the top-k (keep_scores=False, top_k=k)")


def _open_and_solve(obj, params, test, plan: _Plan):
    """Opens ``out_dir`` (before any solve) and solves the test side unless resuming.

    Returns ``((store, flat_vectors, top_k), status)``; ``status`` is JSON (broadcast to the
    other processes of a multi-process run).
    """
    store = _open_store(plan) if plan.out_dir is not None else None
    try:
        done, flat, report, tk = 0, None, None, None
        if store is not None:
            done = _resumed_chunks(store, plan)
            if store.file("vectors") is not None:
                flat, report = _load_vectors(store, plan.n_test)
                _check_solves(report, plan.solver, plan.on_failure)
            if plan.k is not None and store.file("topk") is not None:
                tk = _load_topk(store.file("topk"))
        if flat is None:
            flat, report = _solve_flat(obj, params, test, plan)
            if store is not None:
                meta = {"n_train": plan.src.n, "n_test": plan.n_test, "chunk_size": plan.chunk_size,
                        "num_chunks": plan.src.num_chunks, "method": plan.method, "solves": report}
                store.put_file("vectors", VECTORS, lambda fh: np.save(fh, flat), meta=meta)
        flat = np.asarray(flat, dtype=plan.dtype)
    except BaseException:
        if store is not None:
            store.close()
        raise
    status = {"done_chunks": done, "resumed_from": min(done * plan.chunk_size, plan.src.n),
              "solves": report, "shape": list(flat.shape), "dtype": str(flat.dtype)}
    return (store, flat, tk), status


# ------------------------------------------------------------------ sink
class _Sink:
    """Where scored blocks go: the full matrix (in memory, or ``scores.npy`` through the
    store) and the running top-k, committed chunk by chunk when a store is open.

    ``keep``: whether this process keeps results (always without ``out_dir``; with
    ``out_dir`` only the writing process -- the others load the finished files).
    """

    def __init__(self, plan: _Plan, store: _store.Store | None, tk: TopK | None, failed, *, keep: bool):
        self.plan, self.store, self.keep = plan, store, keep
        self.failed = np.zeros(plan.n_test, bool)
        self.failed[list(failed)] = True
        self.scores, self.tk = None, tk
        if keep and plan.keep_scores:
            shape = (plan.n_test, plan.src.n)
            self.scores = store.array if store is not None else np.empty(shape, plan.dtype)
        if keep and plan.k is not None and tk is None:
            self.tk = _topk_init(plan.n_test, plan.k, plan.dtype)

    def put(self, chunk: _Chunk, block: np.ndarray):
        if not self.keep:
            return
        if self.failed.any():
            block = np.array(block)
            block[self.failed] = np.nan  # never 0 (nor any number) for a failed solve
        if self.tk is not None:
            self.tk = _topk_update(self.tk, block, chunk.start, self.failed)
        stop = chunk.start + chunk.m
        if self.store is None:
            if self.scores is not None:
                self.scores[:, chunk.start:stop] = block
            return
        files = None if self.tk is None else {"topk": (TOPK.format(chunk.index + 1), _save_topk(self.tk))}
        self.store.commit(stop, block if self.plan.keep_scores else None, files=files)

    def finish(self, comm) -> tuple[Any, TopK | None, dict]:
        """Commits completion, releases the directory; other processes then load it."""
        plan, scores, tk, manifest = self.plan, self.scores, self.tk, None
        if self.store is not None:
            self.store.finish()
            manifest = self.store.manifest
            self.store.close()
            if scores is not None:
                scores = np.load(self.store.path / SCORES, mmap_mode="r")
        comm.barrier("influx.scoring.score: done")  # process 0 has committed
        if plan.out_dir is not None and not self.keep:
            done = load(plan.out_dir, verify=False)
            scores = done.scores if plan.keep_scores else None
            tk, manifest = done.top_k, done.manifest
        if manifest is None:
            manifest = {"fingerprint": plan.fingerprint, "inputs": plan.store_inputs()}
        return scores, tk, manifest


# ------------------------------------------------------------------ progress
_StderrProgress, _NoProgress = _progress_mod._StderrProgress, _progress_mod._NoProgress


def _progress(progress: bool | None, *, total: int, initial: int):
    """A tqdm bar (imported only here: an optional dependency), a plain stderr line without it,
    or nothing; ``progress=None``: when stderr is a terminal (:func:`influx._progress.bar`)."""
    return _progress_mod.bar(progress, total=total, initial=initial, desc="influx.score")


# ------------------------------------------------------------------ entry points
@_boundary
def score(obj: Objective, params, train_source, test, *, out_dir=None, chunk_size: int = 256,
          kind: str = "gnh", damping=1e-3, solver=None, measurement=None, method: str = "auto",
          top_k: int | None = None, keep_scores: bool = True, on_failure: str = "raise",
          progress: bool | None = None, devices=None, decode: Callable | None = None,
          num_train: int | None = None, curvature_data=None, curvature_examples: int = 4096,
          state=None, memory_budget: int | None = None) -> ScoreResult:
    """Scores every training example of ``train_source`` against every test point.

    See the module docstring for sources, the curvature data, sharding, on-disk output,
    resume and multi-process (``jax.distributed``) runs. Options as
    :func:`influx.influence` plus:

    Args:
      out_dir: directory for ``scores.npy`` (memmap ``(n_test, N)``), ``vectors.npy``
        (the solved test vectors, ``(n_test, P)``), ``topk.<chunks>.npz`` and
        ``manifest.json`` (see :mod:`influx._store`); ``None`` keeps everything in memory
        (no resume). It must be new, empty or a directory influx wrote for the same inputs.
        In a multi-process run it must be on a filesystem shared by all processes (only
        process 0 writes).
      chunk_size: training examples per step (rounded up to a multiple of the device
        count for the computation; the chunking itself never depends on the devices).
      top_k: keep the ``k`` most helpful and most harmful training examples per test
        point (:class:`TopK`).
      keep_scores: ``False`` to keep only the top-k (the full matrix is never stored).
      on_failure: ``"raise"`` (default): a test-vector solve that did not converge raises
        :class:`~influx.errors.SolveError` before any scoring; ``"nan"``: its row of scores
        (and top-k) is NaN and ``info["failed_tests"]`` / ``info["solve_status"]`` (also in
        the manifest's ``meta``) say which and why.
      progress: a progress bar (tqdm when installed, else a plain stderr line); default
        when stderr is a terminal (process 0 only in a multi-process run).
      devices: devices to shard chunks over (default ``jax.devices()`` -- all processes'
        devices in a multi-process run), or a count.
      decode: ``record -> (x, y)`` for random-access sources.
      num_train: ``N`` for a one-shot iterator source.
      curvature_data, curvature_examples: the data of the curvature operator for stream
        sources (see the module docstring).
      state: an :class:`influx.Prepared` (:func:`influx.prepare` on the curvature data --
        the training arrays, or ``curvature_data`` -- with the same ``kind``, ``damping``
        and solver; ``solver=None`` takes the state's): the solver is not prepared again.
        A state for other inputs is refused before any work (``InputError``).
      memory_budget: bytes each pass may use (the fit, the test gradients, the solves'
        products, each scoring step); ``None``: :func:`influx._memory.default_budget`. A
        chunk whose scoring step would not fit is scored in sub-batches inside the step
        (the chunks, the files and the fingerprint do not depend on the budget). Too small
        for one example: :class:`~influx.errors.ResourceError` with both sizes.

    Cost: the test side once (see :func:`influx.attribution.solve_test_vectors`), then per chunk
    ``n_test`` JVPs or one per-example-gradient pass, divided over the devices; with
    ``out_dir``, a resume reads the committed scores once to verify their checksums.

    Raises:
      InputError / TypeError: bad options, data that does not fit ``apply_fn`` (checked on
        the first chunk and the test set before any solve or file), labels out of range, an
        empty dataset, a stream whose length differs from ``N``, or -- multi-process --
        processes called with different inputs or devices that leave out a process.
      StateError: an ``out_dir`` that is not writable, holds files influx did not write, is
        in use by another process, was written for other inputs (naming what differs), or
        whose committed results are damaged or missing (naming the file).
      ResourceError: not enough free disk space for ``scores.npy``.
      SolveError: a failed test-vector solve with ``on_failure="raise"``.
    """
    t_start = time.perf_counter()
    comm = _ManyProcesses() if jax.process_count() > 1 else _OneProcess()
    solver = _saved.resolve_solver(state, solver)  # prepared state (influx.solvers.saved)
    plan = comm.plan(lambda: _plan(
        obj, params, train_source, test, chunk_size=chunk_size, kind=kind, damping=damping, solver=solver,
        measurement=measurement, method=method, top_k=top_k, keep_scores=keep_scores, on_failure=on_failure,
        out_dir=out_dir, progress=progress, devices=devices, decode=decode, num_train=num_train,
        curvature_data=curvature_data, curvature_examples=curvature_examples, memory_budget=memory_budget))
    if state is not None:  # refused before out_dir is touched or anything is solved
        _saved.verify(state, obj, params, plan.curv, kind=plan.kind, damping=plan.damping, solver=plan.solver)
        plan = plan._replace(prepared=state)
    local, status = comm.on_lead(lambda: _open_and_solve(obj, params, test, plan))
    store, flat, tk = local if local is not None else (None, None, None)
    try:
        flat = comm.share(flat, status)
        return _run(obj, params, plan, comm, store, flat, tk, status, progress=progress, t_start=t_start)
    finally:
        if store is not None:
            store.close()


def _run(obj, params, plan: _Plan, comm, store, flat, tk, status, *, progress, t_start) -> ScoreResult:
    """The scoring loop: place, read, score, gather, sink."""
    n, ndev = plan.src.n, len(plan.devices)
    c_pad = -(-min(plan.chunk_size, n) // ndev) * ndev
    unravel = ravel_pytree(params)[1]
    # examples per device per kernel step: the device's slice of the chunk, or fewer when the
    # step would not fit the memory budget (then a lax.map over sub-batches inside the kernel)
    vec_shapes = jax.eval_shape(jax.vmap(unravel), jax.ShapeDtypeStruct(np.shape(flat), plan.dtype))
    block = (per_example_block(obj, params, _first(plan.curv[0], lead=1)) if plan.method == "per_example"
             else None)
    sub = score_chunk_size(obj, plan.method, params, vec_shapes, plan.curv, chunk_size=c_pad // ndev,
                           memory_budget=plan.memory_budget, block=block)
    placement = _Placement(obj, plan.method, plan.devices, c_pad, None if sub >= c_pad // ndev else sub,
                           block=block)
    p_dev = placement.replicate(params)
    v_dev = placement.replicate(jax.vmap(unravel)(jnp.asarray(flat)))
    scale = placement.replicate(np.asarray(1.0 / n, dtype=plan.dtype))
    sink = _Sink(plan, store, tk, status["solves"]["failed_tests"], keep=plan.out_dir is None or comm.lead)
    reader = _ChunkReader(obj, params, plan.src, placement, whole=comm.reads_whole_chunks)
    bar = _progress(progress if comm.lead else False, total=n, initial=status["resumed_from"])
    t_loop, scored = time.perf_counter(), 0
    try:
        for chunk in reader.chunks(status["done_chunks"], comm):
            block = comm.gather(placement.score(p_dev, v_dev, placement.put(chunk.pieces), scale))
            sink.put(chunk, block[:, :chunk.m])
            scored += chunk.m
            bar.update(chunk.m)
    finally:
        bar.close()
    elapsed = time.perf_counter() - t_loop
    scores, tk, manifest = sink.finish(comm)
    solves = status["solves"]
    info = {"method": plan.method, "devices": [str(d) for d in plan.devices], "n_train": n,
            "n_test": plan.n_test, "resumed_from": status["resumed_from"], "scored": scored,
            "seconds": time.perf_counter() - t_start, "scoring_seconds": elapsed,
            "examples_per_s": scored / elapsed if elapsed > 0 else float("nan"), **solves, **comm.info()}
    return ScoreResult(scores, tk, manifest, info)


def load(out_dir, *, verify: bool = True) -> ScoreResult:
    """Opens a finished (or partial) scoring directory read-only: scores as a read-only memmap.

    ``verify`` checks every committed chunk and file against the manifest's checksums first
    (reads the scores once); damaged or missing files raise :class:`~influx.errors.StateError`.
    """
    st = _store.load_store(out_dir, kind=_KIND, owned=_OWNED, verify=verify)
    tk = _load_topk(st.file("topk")) if st.file("topk") is not None else None
    return ScoreResult(st.array, tk, st.manifest, {})
