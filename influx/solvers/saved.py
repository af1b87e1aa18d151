"""Fit once, query many: a solver's prepared state as a value, saved to and loaded from a directory.

Everything a solver does before its first right-hand side -- EK-FAC/K-FAC's Kronecker
factors, eigenbases and corrected eigenvalues, Arnoldi's eigenpairs, the direct solver's
dense matrix and Cholesky (or eigh) factor, CG's Jacobi diagonal, LiSSA's scale -- depends
only on the damped operator ``A = C + (l2 + damping) I``, i.e. on the objective, the
parameters, the curvature data, ``kind``, ``damping`` and the solver's options. A
:class:`Prepared` value holds that state with a *fingerprint* of those inputs; every
function that solves (:func:`influx.influence`, :func:`influx.self_influence`,
:func:`influx.group_influence`, :func:`influx.attribution.solve_test_vectors`,
:func:`influx.scoring.score`) accepts it as ``state=`` and then prepares nothing::

    prepared = influx.prepare(obj, params, train, kind="gnh", damping=1e-3,
                              solver=influx.solvers.ekfac())          # the fit: once
    S1 = influx.influence(obj, params, train, test1, damping=1e-3, state=prepared)
    influx.solvers.save_state(prepared, "factors/")                   # to disk
    ...                                                               # later, another process
    prepared = influx.solvers.load_state("factors/", obj, params, train, damping=1e-3)
    S2 = influx.influence(obj, params, train, test2, damping=1e-3, state=prepared)

(kronfluence's ``fit_all_factors`` then ``compute_pairwise_scores``). The fingerprint is
checked every time a state is used or loaded: a state prepared for other parameters, other
curvature data, another ``kind``/``damping``/``l2``, another model or loss, or another
solver (or solver options) is refused with an :class:`~influx.errors.InputError` naming
what differs -- never used silently. With a state, scores are bit-identical to the scores
without one (the same state, the same programs).

The directory (an :mod:`influx._store` of kind ``"solver_state"``: the same manifest,
checksums and atomic commit as a scoring directory) is meant to be read by people too::

    manifest.json   "inputs": the fingerprint (digests of params and data; kind, damping,
                    l2, apply_fn, loss_fn, dtype, the solver's repr, the state format);
                    "files": every array
                    file with its BLAKE2b checksum; "meta": the solver's class and options,
                    the influx version, the number of parameters, every array's dtype and
                    shape, and "structure", how the arrays make up the state (EK-FAC's
                    static block descriptions included); "complete": the save finished
    <name>.npy      one array per leaf of the state, named after where it sits:
                    qa.0.npy, qs.0.npy, lam.0.npy, diag.<param path>.npy, shift.npy (EK-FAC),
                    eigvals.npy, eigvecs.npy (Arnoldi), a.npy, factor.npy (direct), ...

``np.load("factors/lam.0.npy")`` reads one. :func:`load_state` verifies every file's
checksum (a damaged, truncated or missing file, a hand-edited manifest or an interrupted
save is a :class:`~influx.errors.StateError` naming the file), then the fingerprint against
the inputs it is given, before it reads any array into memory.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from influx import _memory, _store
from influx import curvature as _curvature
from influx import validation as _validation
from influx.errors import InputError, StateError
from influx.objective import Objective, check_data, num_examples
from influx.solvers._base import Solver

__all__ = ["Prepared", "prepare", "save_state", "load_state", "fingerprint_inputs", "resolve_solver",
           "verify", "KIND"]

KIND = "solver_state"  # the store kind of a saved state directory
_OWNED = ("*.npy",)


# ------------------------------------------------------------------ the value
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Prepared:
    """A solver with its prepared state and the fingerprint of what it was prepared for.

    Made by :func:`prepare` or :func:`load_state`; pass it as ``state=`` to
    :func:`influx.influence` and friends. Attributes: ``solver`` (the solver value),
    ``state`` (its ``solver.prepare(op)`` pytree), ``inputs`` (the fingerprint, a flat dict
    of JSON values: see :func:`fingerprint_inputs`). ``fingerprint`` is their hash.
    """

    solver: Solver
    state: Any
    inputs: Mapping[str, Any]
    param_structure: Any = None  # jax treedef of the parameters (rebuilds parameter-shaped state)
    param_names: tuple = ()  # a file-name-safe path per parameter leaf (names the saved arrays)

    @property
    def fingerprint(self) -> str:
        return _store._fingerprint(self.inputs)

    @property
    def kind(self) -> str:
        return self.inputs["kind"]

    @property
    def damping(self) -> float:
        return self.inputs["damping"]

    def __repr__(self) -> str:
        return (f"influx.Prepared(solver={self.solver!r}, kind={self.kind!r}, damping={self.damping!r}, "
                f"fingerprint={self.fingerprint[:12]!r})")


# ------------------------------------------------------------------ fingerprint
def _hashable_params(params):
    """Half-precision leaves as float32, as every solving function sees them (so a state
    prepared through one entry point matches the others)."""
    def cast(a):
        dt = jnp.result_type(a)
        if jnp.issubdtype(dt, jnp.floating) and jnp.finfo(dt).bits < 32:
            return np.asarray(a, np.float32)
        return a
    return jax.tree_util.tree_map(cast, params)


# The layout of what states hold, raised whenever a state saved before would be read wrongly
# now. 2: a convolution block's rows are its patches offset-major, ``(*filter, C_in)``
# (format 1, no key: channel-major).
STATE_FORMAT = 2


def fingerprint_inputs(obj: Objective, params, data, *, kind: str, damping, solver: Solver) -> dict:
    """The inputs a prepared state depends on, as a flat dict of JSON values.

    ``params`` and ``data``: SHA-256 digests of every leaf's dtype, shape and bytes (and the
    tree structure); ``n_data``; ``kind``, ``damping``, ``l2``; the model and loss
    functions by name; the parameters' dtype; the solver's ``repr`` (its class and every
    option); the state ``format`` (:data:`STATE_FORMAT`). Cost: one pass over the bytes of
    ``params`` and ``data`` (hashing).
    """
    p = _hashable_params(params)
    leaves = jax.tree_util.tree_leaves(p)
    return {
        "params": _store.digest_tree(p),
        "data": _store.digest_tree(data),
        "n_data": int(num_examples(jax.tree_util.tree_leaves(data)[0], name="data")),
        "kind": str(kind),
        "damping": float(damping),
        "l2": float(obj.l2),
        "apply_fn": _store.fn_name(obj.apply_fn),
        "loss_fn": _store.fn_name(obj.loss_fn),
        "dtype": str(jnp.result_type(*leaves)) if leaves else "none",
        "solver": _store.stable_repr(solver),
        "format": STATE_FORMAT,
    }


_WHAT = {
    "params": "params (other parameter values or shapes)",
    "data": "data (another curvature/training set)",
    "n_data": "n_data (the number of curvature examples)",
    "apply_fn": "apply_fn (another model function)",
    "loss_fn": "loss_fn (another loss)",
    "solver": "solver (another solver or other solver options)",
    "format": "format (the state layout: saved by another influx version)",
}


def _differences(have: Mapping, now: Mapping) -> list[str]:
    out = []
    for key in sorted(set(have) | set(now)):
        a, b = have.get(key), now.get(key)
        if a == b:
            continue
        if key in ("params", "data"):
            out.append(_WHAT[key])
        else:
            out.append(f"{_WHAT.get(key, key)}: {a!r} in the state, {b!r} now")
    return out


def _refuse(differ: list[str], where: str):
    raise InputError(f"state: {where} was prepared for other inputs; it differs in {'; '.join(differ)}. "
                     "A state is only valid for the inputs it was prepared for: prepare it again "
                     "(influx.prepare) for these inputs, or call with the state's inputs")


# ------------------------------------------------------------------ checks used by the solving functions
def _check_is_prepared(state):
    if not isinstance(state, Prepared):
        raise InputError(f"state must be an influx.Prepared (from influx.prepare(...) or "
                         f"influx.solvers.load_state(...)), got {type(state).__name__}; a bare solver "
                         "state carries no fingerprint and is not accepted")


def resolve_solver(state: Prepared | None, solver: Solver | None) -> Solver | None:
    """The solver of a call given ``state=``: the state's solver when ``solver`` is ``None``;
    a different ``solver`` is refused (``InputError``). Without a state, ``solver``."""
    if state is None:
        return solver
    _check_is_prepared(state)
    if solver is not None and solver != state.solver:
        raise InputError(f"solver={solver!r} differs from the solver of the prepared state "
                         f"({state.solver!r}); pass solver=None (or the state's solver) with state=")
    return state.solver


def verify(state: Prepared | None, obj: Objective, params, data, *, kind: str, damping,
           solver: Solver) -> None:
    """Refuses (``InputError``, naming what differs) a state prepared for other inputs than
    ``(obj, params, data, kind, damping, solver)``; nothing to do for ``state=None``.
    Cost: hashing ``params`` and ``data`` once."""
    if state is None:
        return
    _check_is_prepared(state)
    now = fingerprint_inputs(obj, params, data, kind=kind, damping=damping, solver=solver)
    differ = _differences(state.inputs, now)
    if differ:
        _refuse(differ, "the prepared state")


# ------------------------------------------------------------------ prepare
def _param_names(params) -> tuple:
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    return tuple(_safe(jax.tree_util.keystr(path)) or str(i) for i, (path, _) in enumerate(paths))


def prepare(obj: Objective, params, data, *, kind: str = "gnh", damping=1e-3, solver: Solver | None = None,
            chunk_size: int = 256) -> Prepared:
    """Prepares ``solver`` (default: :func:`influx.attribution.default_solver`, as
    :func:`influx.influence`) for the damped operator ``C + (l2 + damping) I`` of ``kind``
    over ``data`` at ``params``: the fit, done once.

    Returns a :class:`Prepared` to pass as ``state=`` (same ``kind``, ``damping`` and
    ``data`` -- for :func:`influx.influence` the training set, for
    :func:`influx.scoring.score` its curvature data) and to save with :func:`save_state`.
    Cost: exactly one ``solver.prepare`` (EK-FAC: two passes over ``data``; direct: the
    dense matrix and its factorisation; Arnoldi: its Lanczos products) plus hashing
    ``params`` and ``data``. ``chunk_size``: examples per curvature chunk.

    Raises ``InputError`` for bad options or data (before any work), and whatever the
    solver's ``prepare`` raises (e.g. ``SolveError`` for a direct factorisation of a
    matrix that is not positive definite, ``ResourceError`` for one that would not fit).
    """
    from influx.attribution import _upcast_params, default_solver  # a higher layer: imported on use

    chunk_size = _validation.check_positive_int(chunk_size, "chunk_size")
    _validation.check_choice(kind, "kind", _curvature.KINDS)
    _validation.check_damping(damping)
    if solver is not None and not isinstance(solver, Solver):
        raise InputError(f"solver must be an influx.solvers.Solver, got {type(solver).__name__}")
    params = _upcast_params(params)
    check_data(obj, params, data, name="data")
    solver = default_solver(params) if solver is None else solver
    inputs = fingerprint_inputs(obj, params, data, kind=kind, damping=damping, solver=solver)
    op = _curvature.operator_unchecked(obj, params, data, kind=kind, damping=damping, chunk_size=chunk_size)
    state = solver.prepare(op)
    return Prepared(solver, state, inputs, jax.tree_util.tree_structure(params), _param_names(params))


# ------------------------------------------------------------------ encoding a state as JSON + arrays
def _safe(s: str) -> str:
    s = re.sub(r"[\[\]'\"()]+", ".", str(s))
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", s)
    return re.sub(r"\.{2,}", ".", s).strip("._-")


def _is_array(x) -> bool:
    return isinstance(x, (np.ndarray, np.generic, jax.Array))


def _class_name(cls) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


class _Encoder:
    """A state pytree -> (JSON structure, {name: array}); parameter-shaped subtrees (EK-FAC's
    diagonal) are stored leaf by leaf and rebuilt with the parameters' structure."""

    def __init__(self, prepared: Prepared):
        self.treedef, self.names = prepared.param_structure, prepared.param_names
        self.arrays: dict[str, np.ndarray] = {}

    def _array(self, x, name: str) -> dict:
        a = np.asarray(x)
        if a.dtype.kind not in "biufc":
            raise InputError(f"save_state: the state's array {name!r} has dtype {a.dtype}, which .npy "
                             "cannot hold portably")
        base, k = name or "state", 1
        while name in self.arrays or not name:
            name, k = f"{base}.{k}", k + 1
        self.arrays[name] = a
        node = {"type": "array", "file": name + ".npy", "dtype": a.dtype.str, "shape": list(a.shape)}
        if getattr(x, "weak_type", False):  # restored on load: equal states share compiled programs
            node["weak_type"] = True
        return node

    def encode(self, x, name: str = "") -> dict:
        join = (lambda part: f"{name}.{part}" if name else str(part))
        if x is None:
            return {"type": "none"}
        if isinstance(x, (bool, int, float, str)) and not isinstance(x, np.generic):
            return {"type": "scalar", "value": x}
        if _is_array(x):
            return self._array(x, name)
        if (self.treedef is not None and not isinstance(x, (str, bytes))
                and jax.tree_util.tree_structure(x) == self.treedef
                and all(_is_array(l) for l in jax.tree_util.tree_leaves(x))):
            leaves = jax.tree_util.tree_leaves(x)
            return {"type": "params", "leaves": [self._array(l, join(n)) for l, n in zip(leaves, self.names)]}
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            return {"type": "namedtuple", "class": _class_name(type(x)),
                    "fields": {f: self.encode(getattr(x, f), join(f)) for f in x._fields}}
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return {"type": "dataclass", "class": _class_name(type(x)),
                    "fields": {f.name: self.encode(getattr(x, f.name), join(f.name))
                               for f in dataclasses.fields(x) if f.init}}
        if isinstance(x, dict):
            if not all(isinstance(k, str) for k in x):
                raise InputError(f"save_state: the state holds a dict with non-string keys at {name!r}")
            return {"type": "dict", "items": {k: self.encode(v, join(_safe(k))) for k, v in x.items()}}
        if isinstance(x, (tuple, list)):
            return {"type": type(x).__name__, "items": [self.encode(v, join(i)) for i, v in enumerate(x)]}
        if isinstance(x, frozenset):  # e.g. a kron.Block's opened leaves (ints)
            return {"type": "frozenset", "items": [self.encode(v, join(i)) for i, v in enumerate(sorted(x))]}
        raise InputError(f"save_state: cannot save a {type(x).__name__} (at {name or 'the root'!r} of the "
                         "state); saved states hold arrays, numbers, strings, None, tuples, lists, "
                         "frozensets, dicts, NamedTuples and dataclasses of influx")


def _lookup_class(name: Any, where: Path):
    mod, _, qual = str(name).partition(":")
    ok = (mod == "influx" or mod.startswith("influx.")) and qual
    cls = None
    if ok:
        try:
            cls = importlib.import_module(mod)
            for part in qual.split("."):
                cls = getattr(cls, part)
        except (ImportError, AttributeError):
            cls = None
    if not isinstance(cls, type):
        raise StateError(f"{where}: the state names the class {name!r}, which this influx does not have "
                         "(saved by another version?); prepare the state again")
    return cls


def _weak(a: np.ndarray) -> jax.Array:
    """A weakly typed array (as JAX makes from a Python scalar, e.g. a solver's shift), so a
    loaded state hits the same compiled programs as the one that was saved."""
    if a.ndim == 0:
        out = jnp.asarray(a.item())
        if out.dtype == a.dtype:
            return out
    try:
        from jax._src.lax.lax import _convert_element_type  # no public way to ask for a weak type

        return _convert_element_type(jnp.asarray(a), a.dtype, weak_type=True)
    except (ImportError, TypeError):  # a strong type only costs one compilation
        return jnp.asarray(a)


class _Decoder:
    def __init__(self, root: Path, treedef):
        self.root, self.treedef = root, treedef
        self.where = root / _store.MANIFEST

    def _array(self, node) -> jax.Array:
        path = _store._inside(self.root, node.get("file"), what="array", manifest=self.where)
        a = np.load(path, allow_pickle=False)
        if a.dtype.str != node.get("dtype") or list(a.shape) != node.get("shape"):
            raise StateError(f"{path}: holds {a.dtype} {a.shape}, the manifest says {node.get('dtype')} "
                             f"{tuple(node.get('shape') or ())}; delete {str(self.root)!r} and save again")
        out = _weak(a) if node.get("weak_type") else jnp.asarray(a)
        if out.dtype != a.dtype:
            raise InputError(f"load_state: {path.name} is {a.dtype}, but JAX makes it {out.dtype} (64-bit "
                             "types are off): enable jax_enable_x64 to use this state, or prepare it again "
                             "in this precision")
        return out

    def decode(self, node):
        t = node.get("type") if isinstance(node, dict) else None
        try:
            if t == "none":
                return None
            if t == "scalar":
                return node["value"]
            if t == "array":
                return self._array(node)
            if t == "params":
                leaves = [self._array(n) for n in node["leaves"]]
                return jax.tree_util.tree_unflatten(self.treedef, leaves)
            if t == "dict":
                return {k: self.decode(v) for k, v in node["items"].items()}
            if t in ("tuple", "list"):
                items = [self.decode(v) for v in node["items"]]
                return tuple(items) if t == "tuple" else items
            if t == "frozenset":
                return frozenset(self.decode(v) for v in node["items"])
            if t in ("namedtuple", "dataclass"):
                cls = _lookup_class(node["class"], self.where)
                return cls(**{k: self.decode(v) for k, v in node["fields"].items()})
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, InputError):
                raise
            raise StateError(f"{self.where}: the state structure does not fit this influx "
                             f"({type(e).__name__}: {e}); saved by another version? prepare the state "
                             "again") from None
        raise StateError(f"{self.where}: unknown node {t!r} in the state structure; prepare the state again")


# ------------------------------------------------------------------ save / load
def _json_options(solver: Solver):
    """The solver's options as JSON (tuples as lists), or ``None`` when one is not JSON
    (e.g. a callable preconditioner): then :func:`load_state` needs ``solver=``."""
    try:
        opts = solver.options
    except (AttributeError, TypeError):
        return None
    out = {}
    for k, v in opts.items():
        v = list(v) if isinstance(v, tuple) else v
        if not (v is None or isinstance(v, (bool, int, float, str))
                or (isinstance(v, list) and all(isinstance(e, (bool, int, float, str)) for e in v))):
            return None
        out[k] = v
    return out


def save_state(prepared: Prepared, path, *, durable: bool = False) -> Path:
    """Saves a :class:`Prepared` to the directory ``path`` (module docstring: ``manifest.json``
    and one ``.npy`` per array); returns the path.

    ``path`` must be new, empty, or a state directory saved for the same inputs (then it is
    rewritten); a directory for other inputs or with foreign files is refused
    (:class:`~influx.errors.StateError`). Each array is written atomically and committed
    with its checksum; the manifest marks the save complete last, so an interrupted save is
    never loaded. ``durable=True`` also syncs every file to the disk. Cost: writing the
    state's bytes once (the direct solver's state holds two ``P x P`` matrices).
    """
    import influx

    _check_is_prepared(prepared)
    enc = _Encoder(prepared)
    structure = enc.encode(prepared.state)
    solver = prepared.solver
    meta = {
        "solver": _store.stable_repr(solver),
        "solver_class": _class_name(type(solver)),
        "solver_options": _json_options(solver),
        "influx_version": getattr(influx, "__version__", "unknown"),
        "arrays": {n + ".npy": {"dtype": a.dtype.str, "shape": list(a.shape)} for n, a in enc.arrays.items()},
        "structure": structure,
    }
    if prepared.param_structure is not None:
        meta["parameter_leaves"] = list(prepared.param_names)
    nbytes = sum(a.nbytes for a in enc.arrays.values())
    root = Path(path)
    with _store.open_store(root, kind=KIND, inputs=dict(prepared.inputs), shape=None, owned=_OWNED,
                           durable=durable) as st:
        _store._check_space(root, root / "state", nbytes + 4096 * len(enc.arrays), "")
        for name, arr in enc.arrays.items():
            st.put_file(name, name + ".npy", lambda fh, a=arr: np.save(fh, a, allow_pickle=False))
        st.finish(meta=meta)
    return root


def _rebuild_solver(meta: Mapping, where: Path) -> Solver:
    opts = meta.get("solver_options")
    if opts is None:
        raise InputError(f"load_state: the solver of {where.parent} ({meta.get('solver')}) has options that "
                         "are not stored (e.g. a callable preconditioner): pass solver= (the same solver)")
    cls = _lookup_class(meta.get("solver_class"), where)
    if not (isinstance(cls, type) and issubclass(cls, Solver)):
        raise StateError(f"{where}: {meta.get('solver_class')!r} is not an influx solver")
    try:
        solver = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()})
    except (TypeError, ValueError) as e:
        raise StateError(f"{where}: cannot rebuild the solver {meta.get('solver')} ({e}); "
                         "pass solver=") from None
    if _store.stable_repr(solver) != meta.get("solver"):
        raise StateError(f"{where}: the solver rebuilt from its options is {solver!r}, not the saved "
                         f"{meta.get('solver')}; pass solver=")
    return solver


def load_state(path, obj: Objective, params, data, *, kind: str = "gnh", damping=1e-3,
               solver: Solver | None = None) -> Prepared:
    """Loads a state saved by :func:`save_state` for ``(obj, params, data, kind, damping)``.

    ``solver``: ``None`` rebuilds it from the saved options (or give the same solver; any
    other is refused). In order, before anything is used: every file named in the
    manifest is verified against its checksum (:class:`~influx.errors.StateError` naming a
    damaged, missing or altered file, an interrupted save, or a directory that is not a
    saved state); the options and data are checked; the fingerprint is compared with these
    inputs (:class:`~influx.errors.InputError` naming what differs: params, data, kind,
    damping, l2, model, loss, solver options); then the arrays are read. Cost: reading the
    files twice (checksum, load) and hashing ``params`` and ``data``; a state that would
    not fit in memory (twice its size: host copy and device copy) is refused before it is
    read (:class:`~influx.errors.ResourceError`).
    """
    from influx.attribution import _upcast_params

    root = Path(path)
    st = _store.load_store(root, kind=KIND, owned=_OWNED, verify=True)
    where = root / _store.MANIFEST
    if not st.complete:
        raise StateError(f"{where}: the save did not finish (interrupted?); save the state again")
    meta = st.meta
    if "structure" not in meta:
        raise StateError(f"{where}: no state structure in the manifest; save the state again")
    if solver is None:
        solver = _rebuild_solver(meta, where)
    elif not isinstance(solver, Solver):
        raise InputError(f"solver must be an influx.solvers.Solver or None, got {type(solver).__name__}")
    _validation.check_choice(kind, "kind", _curvature.KINDS)
    _validation.check_damping(damping)
    params = _upcast_params(params)
    check_data(obj, params, data, name="data")
    now = fingerprint_inputs(obj, params, data, kind=kind, damping=damping, solver=solver)
    differ = _differences(st.manifest.get("inputs", {}), now)
    if differ:
        _refuse(differ, f"the state saved in {str(root)!r}")
    arrays = meta.get("arrays") if isinstance(meta.get("arrays"), dict) else {}
    nbytes = sum(int(np.prod(a.get("shape", ()))) * np.dtype(a.get("dtype", "f8")).itemsize
                 for a in arrays.values() if isinstance(a, dict))
    _memory.check_fits(2 * nbytes, what=f"load_state: the state in {str(root)!r} (read from disk, then "
                       "placed on the device)", alternative="load it on a machine with more memory")
    treedef = jax.tree_util.tree_structure(params)
    state = _Decoder(root, treedef).decode(meta["structure"])
    return Prepared(solver, state, now, treedef, _param_names(params))

