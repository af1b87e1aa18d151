"""A resumable on-disk store: one 2-D array filled chunk by chunk, with a manifest as commit point.

Long computations that produce a ``(rows, cols)`` array piece by piece -- whole-dataset
scores (:func:`influx.scoring.score`: ``(n_test, N)``, committed along the columns),
grids of retrainings (``(masks, n_test)``, committed along the rows) -- keep their
progress in a directory that this module owns::

    manifest.json   the single commit point, replaced atomically (write a temporary file,
                    ``os.replace``); everything it names is complete and verified
    <array>.npy     the preallocated ``.npy`` array (``np.lib.format.open_memmap``), or none
    <side files>    named files of the caller (solved vectors, a running top-k, ...), each
                    recorded in the manifest under a *role* with its checksum
    .influx.lock    exclusive ``fcntl.flock`` lock and the pid of the process holding it

The committed part of the array is ``[0, done)`` along ``axis``, as a list of contiguous
chunks ``[start, stop)`` with a BLAKE2b checksum each, taken from the block at commit time.
A commit writes the block into the array, writes the side files under new names, then
replaces the manifest; a kill at any moment leaves the previous manifest, which names only
complete data (``durable=True`` also syncs each commit to the disk, for OS crashes).
On reopening, the store verifies everything the manifest names before any new work (the
array's header, size and every committed chunk's checksum, each side file's checksum,
every path inside the directory), and refuses with a
:class:`~influx.errors.StateError` naming the file and the remedy instead of resuming from
zeros: a missing, truncated or altered array, a hand-edited manifest, an invalid or empty
manifest, a deleted side file, a path leading outside the directory, a directory holding
files the store does not own, or a directory locked by another live process.

Usage (rows = test points, columns = training examples committed in chunks)::

    with open_store(out_dir, kind="scoring", inputs={"params": digest, "options.damping": 1e-3},
                    shape=(n_test, n), dtype=np.float32, axis=1, array="scores.npy",
                    owned=("vectors.npy", "topk.*.npz")) as store:
        vec = store.file("vectors")                        # a verified Path, or None
        if vec is None:
            store.put_file("vectors", "vectors.npy", lambda fh: np.save(fh, vectors))
        for start in range(store.done, n, chunk):
            block = compute(start, min(start + chunk, n))   # (n_test, stop - start)
            store.commit(start + block.shape[1], block,
                         files={"topk": (f"topk.{start}.npz", write_topk)}, meta={...})
        store.finish()

Rows committed instead of columns (``axis=0``), e.g. a grid of retrainings, ``(M masks, n_test)``,
``M`` large, resumed after a kill::

    with open_store(out_dir, kind="retrain", inputs={"masks": digest_of_masks, "steps": T, ...},
                    shape=(M, n_test), dtype=np.float64, axis=0, array="delta.npy") as store:
        for start in range(store.done, M, rows_per_chunk):    # store.done: rows already committed
            stop = min(start + rows_per_chunk, M)
            store.commit(stop, retrain(masks[start:stop]))    # (stop - start, n_test)
        store.finish(meta={"seconds": ...})
        delta = np.array(store.array)                         # all rows, verified on reopening

:func:`load_store` opens a finished (or partial) directory read-only, verified the same way.

The ``inputs`` fingerprint (a flat dict of JSON values: digests of the data, every option)
is compared on reopening; a directory written for other inputs is refused naming the keys
that differ, with both values when they are short. A directory with nothing committed yet
(no chunk, no side file) is re-initialised for new inputs instead.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from influx._memory import format_bytes
from influx.errors import ResourceError, StateError

__all__ = ["Store", "open_store", "load_store", "InputsMismatch", "MANIFEST", "LOCK", "FORMAT", "digest_tree",
           "fn_name", "stable_repr"]

MANIFEST = "manifest.json"
LOCK = ".influx.lock"
FORMAT = 2  # format 1 (influx <= 0.1.0 scoring) had no checksums: refused, never resumed
_MARKER = "influx.store"


class InputsMismatch(StateError, ValueError):
    """The directory holds results for other inputs (also a ``ValueError``, as before)."""


def _remedy(path: Path) -> str:
    return f"delete {str(path)!r} or pass a new out_dir"


# ------------------------------------------------------------------ fingerprints of inputs
def digest_tree(tree) -> str:
    """SHA-256 (32 hex digits) of a pytree: its structure, and every leaf's dtype, shape and bytes."""
    import jax  # here, not at the top: the store itself needs only numpy

    h = hashlib.sha256()
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    h.update(str(treedef).encode())
    for leaf in leaves:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:32]


def fn_name(f) -> str:
    """``module.qualname`` of a function (its ``repr`` for other callables)."""
    if hasattr(f, "__qualname__"):
        return f"{getattr(f, '__module__', '')}.{f.__qualname__}"
    return repr(f)


def stable_repr(x) -> str:
    """``repr`` without memory addresses (``<function f at 0x7f..>`` -> ``<function f>``), so a
    fingerprint is the same in every process and in a resumed run."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(x))


# ------------------------------------------------------------------ files and paths
def _inside(root: Path, name: Any, *, what: str, manifest: Path) -> Path:
    """``root / name`` for a plain file name that resolves inside ``root``; else StateError."""
    bad = (not isinstance(name, str) or name in ("", ".", "..") or os.path.isabs(name)
           or Path(name).name != name or "/" in name or "\\" in name)
    path = None if bad else root / name
    if path is not None:
        try:
            real = path.resolve()
        except OSError:
            real = None
        bad = real is None or real.parent != root.resolve()
    if bad:
        raise StateError(f"{manifest}: the {what} path {name!r} is not a file inside {str(root)!r}; "
                         f"refusing to read or delete it ({_remedy(root)})")
    return path


def _digest_bytes(data) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def digest_block(block: np.ndarray) -> str:
    """Checksum of an array block's bytes in C order (as committed)."""
    return _digest_bytes(memoryview(np.ascontiguousarray(block)).cast("B"))


def _digest_file(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for piece in iter(lambda: fh.read(1 << 22), b""):
            h.update(piece)
    return h.hexdigest()


def _fsync_dir(path: Path):
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, write: Callable[[BinaryIO], None], durable: bool = False):
    """Writes ``path`` through ``path.tmp`` and ``os.replace`` (readers see old or new, never half)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_manifest(path: Path, manifest: dict, durable: bool = False):
    """The commit point: the manifest replaced atomically."""
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    _atomic_write(path / MANIFEST, lambda fh: fh.write(data), durable)
    if durable:
        _fsync_dir(path)


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    try:
        text = path.read_text()
        man = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        why = "empty" if isinstance(e, ValueError) and not text.strip() else f"{type(e).__name__}: {e}"
        raise StateError(f"{path}: not a valid influx manifest ({why}); {_remedy(root)}") from None
    if isinstance(man, dict) and "influx" not in man and man.get("format") == 1 and "fingerprint" in man:
        raise StateError(f"{path}: written by an earlier influx (format 1, without checksums), so its "
                         f"results cannot be verified and are not resumed; {_remedy(root)}")
    if not isinstance(man, dict) or man.get("influx") != _MARKER:
        raise StateError(f"{path}: not a manifest written by influx's store; {_remedy(root)}")
    return man


# ------------------------------------------------------------------ lock
def _lock(root: Path) -> int:
    """Takes the exclusive lock on ``root`` (non-blocking) and records this process's pid."""
    import fcntl

    path = root / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise StateError(f"cannot write to out_dir {str(root)!r} ({e.strerror}); pass a writable "
                         "directory") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateError(f"out_dir {str(root)!r}: directory in use by process {holder} (it holds "
                         f"{LOCK}); wait for it to finish or pass another out_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _unlock(fd: int):
    import fcntl

    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        os.close(fd)


# ------------------------------------------------------------------ the array file
def _read_header(path: Path, root: Path):
    """``(shape, dtype, fortran_order, data_offset)`` of an ``.npy`` file, or StateError."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read(fh)
            return tuple(shape), np.dtype(dtype), fortran, fh.tell()
    except (OSError, ValueError, EOFError, SyntaxError) as e:
        raise StateError(f"{path}: not a readable .npy file ({type(e).__name__}: {e}); "
                         f"{_remedy(root)}") from None


def _check_array(root: Path, path: Path, shape, dtype, chunks, axis: int):
    """Header, size and every committed chunk's checksum of the array file."""
    have_shape, have_dtype, fortran, offset = _read_header(path, root)
    if have_shape != tuple(shape) or have_dtype != np.dtype(dtype) or fortran:
        raise StateError(f"{path}: header says shape {have_shape}, dtype {have_dtype}"
                         f"{', Fortran order' if fortran else ''}; the manifest expects {tuple(shape)}, "
                         f"{np.dtype(dtype)}; {_remedy(root)}")
    want = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size != want:
        raise StateError(f"{path}: {size} bytes, expected {want} (truncated or extended after it was "
                         f"written); its committed chunks cannot be trusted; {_remedy(root)}")
    if not chunks:
        return
    arr = np.load(path, mmap_mode="r")
    for start, stop, digest in chunks:
        block = arr[start:stop] if axis == 0 else arr[:, start:stop]
        if digest_block(block) != digest:
            raise StateError(f"{path}: the committed chunk [{start}, {stop}) along axis {axis} does not "
                             f"match its checksum in {MANIFEST} (the file was altered or damaged); "
                             f"{_remedy(root)}")
    del arr


def _check_space(root: Path, path: Path, nbytes: int, hint: str):
    """Refuses (ResourceError) when the free disk space cannot hold the rest of ``path``."""
    allocated = 0
    with contextlib.suppress(OSError):
        allocated = path.stat().st_blocks * 512
    need = max(0, nbytes - allocated)
    try:
        free = shutil.disk_usage(root).free
    except OSError:  # a filesystem that does not say: the write itself will tell
        return
    if need > free:
        raise ResourceError(f"{path} needs {format_bytes(need)} of disk space but only {format_bytes(free)} "
                            f"is free on {str(root)!r}; free space or pass an out_dir on another "
                            "filesystem" + (f", or {hint}" if hint else ""))


def _create_array(path: Path, shape, dtype):
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
    with contextlib.suppress(OSError, AttributeError):  # reserve the blocks: no SIGBUS on a full disk
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, path.stat().st_size)
        finally:
            os.close(fd)
    return arr


# ------------------------------------------------------------------ the store
class Store:
    """An open, locked store directory (see the module docstring). Use :func:`open_store`.

    Attributes:
      path: the directory. kind: the caller's name for its contents (e.g. ``"scoring"``).
      array: the ``np.memmap`` (mode ``r+``) of shape ``shape``, or ``None`` without an array.
      axis: the axis along which chunks are committed (0 rows, 1 columns).
      manifest: the last committed manifest (a dict; treat as read-only).
      resumed: whether the directory held committed work when it was opened.
      durable: whether each commit is flushed to the disk (see :func:`open_store`).
    """

    def __init__(self, path: Path, manifest: dict, array, lock_fd: int | None, resumed: bool,
                 durable: bool = False):
        self.path, self.manifest, self.array, self._fd, self.resumed = path, manifest, array, lock_fd, resumed
        self.durable = durable
        self.kind, self.axis = manifest["kind"], int(manifest["axis"])
        self.shape = None if manifest["shape"] is None else tuple(manifest["shape"])

    # -- what is committed
    @property
    def done(self) -> int:
        """The committed extent along ``axis``: entries ``[0, done)`` are final."""
        return int(self.manifest["done"])

    @property
    def chunks(self) -> list[tuple[int, int]]:
        """The committed chunks ``[(start, stop), ...]``, contiguous from 0."""
        return [(int(a), int(b)) for a, b, _ in self.manifest["chunks"]]

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def meta(self) -> dict:
        """The caller's JSON metadata, as last committed."""
        return self.manifest["meta"]

    def file(self, role: str) -> Path | None:
        """The verified path of the side file committed under ``role``, or ``None``."""
        entry = self.manifest["files"].get(role)
        return None if entry is None else self.path / entry["name"]

    # -- commits
    def _commit(self, manifest: dict, files: Mapping[str, tuple[str, Callable]] | None):
        old = {role: e["name"] for role, e in manifest["files"].items()}
        for role, (name, write) in (files or {}).items():
            path = _inside(self.path, name, what=f"{role} file", manifest=self.path / MANIFEST)
            _atomic_write(path, write, self.durable)
            manifest["files"][role] = {"name": name, "digest": _digest_file(path)}
        _write_manifest(self.path, manifest, self.durable)  # the commit point
        self.manifest = manifest
        for role, name in old.items():
            if manifest["files"][role]["name"] != name:
                (self.path / name).unlink(missing_ok=True)

    def _next(self, meta: Mapping | None) -> dict:
        if self._fd is None:
            raise StateError(f"store {str(self.path)!r} is closed (or opened read-only)")
        manifest = json.loads(json.dumps(self.manifest))
        if meta:
            manifest["meta"].update(meta)
        return manifest

    def put_file(self, role: str, name: str, write: Callable[[BinaryIO], None], *, meta=None):
        """Writes a side file (``write(fh)`` into a binary file) and commits it under ``role``;
        the file it replaces, if any, is deleted after the commit."""
        self._commit(self._next(meta), {role: (name, write)})

    def commit(self, stop: int, block: np.ndarray | None = None, *,
               files: Mapping[str, tuple[str, Callable]] | None = None, meta: Mapping | None = None):
        """Commits entries ``[done, stop)`` along ``axis``.

        ``block`` holds them (shape ``(rows, stop - done)`` for ``axis=1``, ``(stop - done,
        cols)`` for ``axis=0``); it is written into the array, flushed and checksummed.
        Without an array, ``block`` may be ``None`` (the extent is then only a count, e.g.
        when only side files such as a top-k are kept). ``files`` maps roles to ``(name,
        write)`` side files written before the manifest; ``meta`` updates the metadata.
        """
        start, stop = self.done, int(stop)
        if not start < stop <= (self.shape[self.axis] if self.shape else stop):
            raise ValueError(f"commit: stop={stop} must be in ({start}, {self.shape[self.axis]}]")
        manifest = self._next(meta)
        digest = None
        if self.array is not None:
            block = np.asarray(block, self.array.dtype)
            want = (stop - start, self.shape[1]) if self.axis == 0 else (self.shape[0], stop - start)
            if block.shape != want:
                raise ValueError(f"commit: block has shape {block.shape}, expected {want}")
            if self.axis == 0:
                self.array[start:stop] = block
            else:
                self.array[:, start:stop] = block
            if self.durable:
                self.array.flush()
            digest = digest_block(block)
        manifest["chunks"].append([start, stop, digest])
        manifest["done_chunks"] = len(manifest["chunks"])
        manifest["done"] = stop
        self._commit(manifest, files)

    def finish(self, *, meta: Mapping | None = None):
        """Marks the store complete (committed with ``meta``)."""
        manifest = self._next(meta)
        manifest["complete"] = True
        self._commit(manifest, None)

    def close(self):
        """Flushes the array and releases the lock (idempotent)."""
        if self.array is not None and self._fd is not None:
            self.array.flush()
        if self._fd is not None:
            _unlock(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _new_manifest(kind, inputs, shape, dtype, axis, array) -> dict:
    inputs = json.loads(json.dumps(dict(inputs), sort_keys=True, default=str))  # JSON values only
    return {"influx": _MARKER, "format": FORMAT, "kind": kind, "inputs": inputs,
            "fingerprint": _fingerprint(inputs), "shape": None if shape is None else list(shape),
            "dtype": np.dtype(dtype).str, "axis": int(axis), "array": array if shape is not None else None,
            "chunks": [], "done_chunks": 0, "done": 0, "files": {}, "meta": {}, "complete": False}


def _fingerprint(inputs: Mapping) -> str:
    raw = json.dumps(dict(inputs), sort_keys=True, default=str).encode()
    return hashlib.sha256(raw).hexdigest()[:32]


def _short(v) -> str | None:
    r = json.dumps(v, default=str)
    return r if len(r) <= 40 else None


def _inputs_differ(root: Path, old: Mapping, new: Mapping) -> InputsMismatch:
    parts = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            a, b = _short(new.get(key)), _short(old.get(key))
            parts.append(f"{key} ({a} now, {b} in the directory)" if a and b else key)
    return InputsMismatch(f"out_dir {str(root)!r} holds results written for different inputs "
                          f"(differs in: {', '.join(parts) or 'format'}); results are never mixed: "
                          f"{_remedy(root)}, or call with the directory's inputs to resume")


def _foreign(root: Path, names: list[str], owned: tuple[str, ...], array: str | None) -> list[str]:
    mine = {MANIFEST, LOCK} | ({array} if array else set())
    out = []
    for name in names:
        base = name[:-4] if name.endswith(".tmp") else name
        if base in mine or any(fnmatch.fnmatchcase(base, p) for p in owned):
            continue
        out.append(name)
    return sorted(out)


def _check_layout(man: dict, root: Path, *, kind, shape, dtype, axis, array):
    mpath = root / MANIFEST
    if man.get("format") != FORMAT:
        raise StateError(f"{mpath}: format {man.get('format')!r}, this influx reads format {FORMAT} "
                         f"(earlier formats have no checksums and are not resumed); {_remedy(root)}")
    want = {"kind": kind, "shape": None if shape is None else list(shape), "dtype": np.dtype(dtype).str,
            "axis": int(axis), "array": array if shape is not None else None}
    for key, value in want.items():
        if man.get(key) != value:
            raise InputsMismatch(f"out_dir {str(root)!r} holds a {man.get('kind')!r} store with {key} = "
                                 f"{man.get(key)!r}, expected {value!r}; {_remedy(root)}")


def _check_progress(man: dict, root: Path):
    """The chunk list is contiguous from 0 and agrees with done / done_chunks (no hand edits)."""
    mpath = root / MANIFEST
    try:
        chunks = [(int(a), int(b), d) for a, b, d in man["chunks"]]
        ok = (man["done_chunks"] == len(chunks) and man["done"] == (chunks[-1][1] if chunks else 0)
              and isinstance(man["files"], dict) and isinstance(man["meta"], dict)
              and isinstance(man["complete"], bool))
        pos = 0
        for a, b, d in chunks:
            ok = ok and a == pos and b > a and (man["shape"] is None or d is not None)
            pos = b
        ok = ok and (man["shape"] is None or pos <= man["shape"][man["axis"]])
    except (KeyError, TypeError, ValueError, IndexError):
        ok = False
    if not ok:
        raise StateError(f"{mpath}: the progress record is inconsistent (done_chunks / done do not match "
                         f"the list of committed chunks and their checksums: edited by hand?); "
                         f"{_remedy(root)}")


def _verify(root: Path, man: dict, owned: tuple[str, ...]):
    """Everything the manifest names exists, lies inside ``root`` and matches its checksum."""
    mpath = root / MANIFEST
    if man["array"] is not None:
        apath = _inside(root, man["array"], what="array", manifest=mpath)
        if apath.exists():
            _check_array(root, apath, man["shape"], np.dtype(man["dtype"]), man["chunks"], man["axis"])
        elif man["chunks"]:
            raise StateError(f"{apath} is missing, but {MANIFEST} records {len(man['chunks'])} committed "
                             f"chunk(s) in it; results are never resumed as zeros: {_remedy(root)}")
    for role, entry in man["files"].items():
        name = entry.get("name") if isinstance(entry, dict) else None
        path = _inside(root, name, what=f"{role} file", manifest=mpath)
        if not any(fnmatch.fnmatchcase(name, p) for p in owned):
            raise StateError(f"{mpath}: the {role} file {name!r} is not one this store writes; "
                             f"{_remedy(root)}")
        if not path.is_file():
            raise StateError(f"{path} is missing, but {MANIFEST} records it as the committed {role} "
                             f"file; {_remedy(root)}")
        if _digest_file(path) != entry.get("digest"):
            raise StateError(f"{path} does not match its checksum in {MANIFEST} (altered or damaged); "
                             f"{_remedy(root)}")


def _prepare_dir(root: Path) -> bool:
    """Creates ``root`` or checks that it is influx's; returns whether a manifest exists."""
    if root.exists() and not root.is_dir():
        raise StateError(f"out_dir {str(root)!r} exists and is not a directory; pass a directory")
    if not root.exists():
        try:
            root.mkdir(parents=True)
        except OSError as e:
            raise StateError(f"cannot create out_dir {str(root)!r} ({e.strerror}); pass a writable "
                             "directory") from None
        return False
    try:
        names = sorted(p.name for p in root.iterdir())
    except OSError as e:
        raise StateError(f"cannot read out_dir {str(root)!r} ({e.strerror}); pass a readable, writable "
                         "directory") from None
    has_manifest = MANIFEST in names
    foreign = [n for n in names if n not in (LOCK, MANIFEST + ".tmp")] if not has_manifest else []
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise StateError(f"out_dir {str(root)!r} is not empty and was not created by influx (no "
                         f"{MANIFEST}; it holds {shown}); refusing to overwrite: pass an empty or new "
                         "directory")
    return has_manifest


def open_store(path, *, kind: str, inputs: Mapping[str, Any], shape: tuple[int, int] | None,
               dtype=np.float64, axis: int = 0, array: str = "array.npy", owned: tuple[str, ...] = (),
               space_hint: str = "", durable: bool = False) -> Store:
    """Opens (creating or resuming) the store directory ``path``, locked for this process.

    Args:
      kind: what the store holds (``"scoring"``, ``"retrain"``); a store of another kind is refused.
      inputs: the fingerprint, a flat dict of JSON values (digests of data, every option that
        changes the results); a directory for other inputs is refused with
        :class:`InputsMismatch` naming the differing keys (re-initialised if nothing is
        committed yet).
      shape, dtype, axis: the array (``None`` shape: no array, only side files and a count);
        chunks are committed along ``axis``.
      array: the array's file name. owned: glob patterns of the side files the caller writes
        (any other file in the directory is refused as foreign).
      space_hint: an alternative named when the disk cannot hold the array.
      durable: ``fsync`` the array, the side files, the manifest and the directory at every
        commit (survives a power loss or OS crash, at the cost of a few disk syncs per
        commit). Without it (the default) every commit survives a killed process (the data is
        in the page cache before the manifest names it); after an OS crash the manifest may
        name data that did not reach the disk, which the checksums then detect on reopening
        (an error, never wrong numbers).

    Raises:
      StateError: a path that is not a writable directory, a non-empty directory influx did not
        create (naming the files), a directory locked by another process, an invalid manifest,
        a store of another kind/format, or committed data that is missing or fails its
        checksum. ResourceError: not enough free disk space for the array.
    """
    if axis not in (0, 1) or (shape is not None and len(shape) != 2):
        raise ValueError(f"open_store: need a 2-D shape and axis 0 or 1, got shape={shape}, axis={axis}")
    root = Path(path)
    owned = tuple(owned)
    has_manifest = _prepare_dir(root)
    fd = _lock(root)
    try:
        store = _open_locked(root, fd, has_manifest, kind=kind, inputs=inputs, shape=shape, dtype=dtype,
                             axis=axis, array=array, owned=owned, space_hint=space_hint)
        store.durable = bool(durable)
    except BaseException:
        _unlock(fd)
        raise
    return store


def _open_locked(root, fd, has_manifest, *, kind, inputs, shape, dtype, axis, array, owned, space_hint):
    new = _new_manifest(kind, inputs, shape, dtype, axis, array)
    man = _read_manifest(root) if has_manifest else None
    if man is not None:
        _check_progress(man, root)
        nothing = not man["chunks"] and not man["files"]
        if man.get("fingerprint") != new["fingerprint"] or man.get("format") != FORMAT:
            if not nothing:
                if man.get("format") != FORMAT:
                    _check_layout(man, root, kind=kind, shape=shape, dtype=dtype, axis=axis, array=array)
                raise _inputs_differ(root, man.get("inputs", {}), new["inputs"])
            man = None  # nothing committed: start over for the new inputs
        else:
            _check_layout(man, root, kind=kind, shape=shape, dtype=dtype, axis=axis, array=array)
    names = sorted(p.name for p in root.iterdir())
    foreign = _foreign(root, names, owned, array if shape is not None else None)
    if foreign:
        raise StateError(f"out_dir {str(root)!r} holds files this store does not own: {', '.join(foreign)}; "
                         "move them elsewhere or pass another out_dir")
    if man is not None:
        _verify(root, man, owned)
    resumed = man is not None and bool(man["chunks"] or man["files"])
    manifest = man if man is not None else new
    _remove_strays(root, names, manifest)
    arr = None
    if shape is not None:
        apath = root / array
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        fresh = not manifest["chunks"] or not apath.exists()
        _check_space(root, apath, nbytes + 4096, space_hint)  # 4096: at most the .npy header
        arr = _create_array(apath, shape, dtype) if fresh else np.load(apath, mmap_mode="r+")
    if man is None:
        _write_manifest(root, manifest)  # influx owns the directory from here on
    return Store(root, manifest, arr, fd, resumed)


def _remove_strays(root: Path, names: list[str], manifest: dict):
    """Temporary files and side files of uncommitted work (a kill between write and commit)."""
    keep = {MANIFEST, LOCK} | {e["name"] for e in manifest["files"].values()}
    if manifest["array"]:
        keep.add(manifest["array"])
    for name in names:
        if name not in keep:
            (root / name).unlink(missing_ok=True)


def load_store(path, *, kind: str, owned: tuple[str, ...] = (), verify: bool = True) -> Store:
    """Opens a store read-only (no lock, nothing written): the array as a read-only memmap.

    ``verify`` checks everything the manifest names as on resume (reads the committed data once).
    """
    root = Path(path)
    if not (root / MANIFEST).is_file():
        raise StateError(f"{str(root)!r} holds no {MANIFEST}: not an influx {kind} directory "
                         "(or the run never started)")
    man = _read_manifest(root)
    _check_progress(man, root)
    if man.get("kind") != kind or man.get("format") != FORMAT:
        raise StateError(f"{root / MANIFEST}: a {man.get('kind')!r} store of format {man.get('format')!r}, "
                         f"expected {kind!r} format {FORMAT}; {_remedy(root)}")
    if verify:
        _verify(root, man, tuple(owned))
    arr = None
    if man["array"] is not None:
        apath = _inside(root, man["array"], what="array", manifest=root / MANIFEST)
        if apath.exists():
            arr = np.load(apath, mmap_mode="r")
    return Store(root, man, arr, None, bool(man["chunks"]))
