"""Shared plumbing of the studies: precision, data, models, solvers, tables, JSON.

Nothing here is a study; these helpers keep the three studies short and consistent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np

from influx.errors import InputError

__all__ = [
    "adam",
    "apply_for",
    "precision",
    "progress",
    "load_dataset",
    "loss_for",
    "make_solver",
    "SOLVERS",
    "jsonable",
    "markdown_table",
    "fmt",
    "check_grid",
    "check_size",
]

SOLVERS = ("direct", "cg", "lissa", "arnoldi", "ekfac", "kfac")


@contextlib.contextmanager
def precision(dtype: str):
    """Run a study in ``dtype`` ("float64" or "float32").

    float64 is scoped with ``jax.enable_x64(True)`` (a context manager, so the caller's
    global configuration is left as it was). Leave-one-out differences are O(1/N) of the
    loss, so studies default to float64: in float32 they drown in rounding noise.
    """
    if dtype not in ("float64", "float32"):
        raise InputError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
    if dtype == "float64":
        with jax.enable_x64(True):
            yield np.float64
    else:
        yield np.float32


def progress(iterable: Iterable | None = None, *, enabled: bool = True, **kw):
    """A tqdm progress bar on stderr (a silent pass-through when ``enabled`` is false)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not enabled, file=sys.stderr, dynamic_ncols=True, leave=False, **kw)


# The two caches below are not about solvers (those hash by their options): they keep one
# ``apply_fn`` closure per model and one ``optax`` optimizer per learning rate. Closures and
# optax's ``GradientTransformation`` (a NamedTuple of closures) compare by identity, and both
# are static arguments of influx's compiled programs (``Objective`` holds ``apply_fn``; the
# training loops of :mod:`influx.models` are keyed on the optimizer), so building them anew
# for each configuration of a grid would compile the same programs again.
_APPLY_FNS: dict = {}


def apply_for(model):
    """``influx.models.apply_fn(model)``, one closure per (hashable) model.

    :class:`influx.Objective` is a static argument of compiled functions and hashes its
    ``apply_fn`` by identity: reusing the closure lets configurations that share a model
    (and shapes) share compilations.
    """
    from influx import models

    try:
        return _APPLY_FNS.setdefault(model, models.apply_fn(model))
    except TypeError:  # unhashable module
        return models.apply_fn(model)


_OPTIMIZERS: dict = {}


def adam(learning_rate: float):
    """One ``optax.adam`` object per learning rate (compiled training loops are keyed on it)."""
    import optax

    key = ("adam", float(learning_rate))
    if key not in _OPTIMIZERS:
        _OPTIMIZERS[key] = optax.adam(float(learning_rate))
    return _OPTIMIZERS[key]


def load_dataset(name: str, *, data_dir=None, n_train=None, n_test=None, seed=0, dtype=np.float64):
    """``influx.data.load`` with the studies' defaults (standardised, flat features)."""
    from influx import data as _data

    return _data.load(name, data_dir=data_dir, n_train=n_train, n_test=n_test, seed=seed,
                      standardize=True, dtype=dtype)


def loss_for(task: str):
    """Softmax cross-entropy for classification, squared error for regression."""
    from influx import losses

    if task == "classification":
        return losses.softmax_cross_entropy
    if task == "regression":
        return losses.squared_error
    raise InputError(f"unknown task {task!r}")


def make_solver(name: str, *, cg_tol: float = 1e-8, max_steps: int = 2000, rank: int = 50,
                lissa_depth: int = 1000, lissa_batch_size: int = 128):
    """An :mod:`influx.solvers` solver from its name (``direct | cg | lissa | arnoldi | ekfac |
    kfac``).

    Raises :class:`influx.errors.InputError` for an unknown name.
    """
    from influx import solvers

    if name not in SOLVERS:
        raise InputError(f"unknown solver {name!r}; known: {', '.join(SOLVERS)}")
    if name in ("direct", "ekfac", "kfac"):
        return getattr(solvers, name)()
    if name == "cg":
        return solvers.cg(tol=cg_tol, max_steps=max_steps)
    if name == "arnoldi":
        return solvers.arnoldi(rank=rank)
    return solvers.lissa(depth=lissa_depth, batch_size=lissa_batch_size)


def jsonable(obj: Any):
    """Converts dataclasses, NamedTuples, numpy/jax values to JSON-safe Python values.

    Non-finite floats become ``None`` (strict JSON has no NaN).
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.name.startswith("_")}
    if isinstance(obj, tuple) and hasattr(obj, "_asdict"):
        return {k: jsonable(v) for k, v in obj._asdict().items()}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.ndarray, jax.Array)):
        return jsonable(np.asarray(obj).tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def fmt(v, digits: int = 3) -> str:
    """A compact table cell: floats to ``digits`` significant places, nan as 'nan'."""
    if v is None:
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if not math.isfinite(v):
            return "nan"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
            return f"{v:.{max(digits - 1, 1)}e}"
        return f"{v:.{digits}f}" if abs(v) < 10 else f"{v:.{max(digits - 2, 1)}f}"
    return str(v)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table (cells through :func:`fmt`)."""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in cells])


def check_grid(values, name: str, *, kind=int, minimum=None) -> tuple:
    """Validates a non-empty grid of numbers; returns it as a tuple.

    Raises :class:`influx.errors.InputError` (a ``ValueError``) naming ``name`` for an
    empty grid, a wrong type (a float where an integer is needed, a bool) or a value below
    ``minimum``.
    """
    if isinstance(values, (int, float, np.integer, np.floating)) and not isinstance(values, bool):
        values = (values,)
    try:
        vals = tuple(values)
    except TypeError as e:
        raise InputError(f"{name} must be a sequence of numbers, got {values!r}") from e
    if not vals:
        raise InputError(f"{name} must not be empty")
    out = []
    for v in vals:
        if isinstance(v, (bool, np.bool_)):
            raise InputError(f"{name}: expected {kind.__name__} values, got {v!r}")
        if kind is int:
            if not isinstance(v, (int, np.integer)):
                raise InputError(f"{name}: expected integers, got {v!r}")
            v = int(v)
        else:
            if not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(float(v)):
                raise InputError(f"{name}: expected finite numbers, got {v!r}")
            v = float(v)
        if minimum is not None and v < minimum:
            raise InputError(f"{name}: values must be >= {minimum}, got {v!r}")
        out.append(v)
    return tuple(out)


def check_size(n, name: str, minimum: int, why: str) -> None:
    """Refuses a data size too small for a study: :class:`influx.errors.InputError` naming
    ``name``, its value, the minimum and ``why`` the study needs it. ``None`` (= all) passes."""
    if n is not None:
        n = check_grid((n,), name, minimum=1)[0] if name.isidentifier() else n
    if n is not None and n < minimum:
        raise InputError(f"{size_label(name, n)} is too small for this study: it needs at least {minimum} "
                         f"({why})")


def size_label(name: str, n: int) -> str:
    """``n_train=5`` for an option, ``the training split of 'x' (5 examples)`` otherwise."""
    return f"{name}={n}" if name.isidentifier() else f"{name} ({n} examples)"
