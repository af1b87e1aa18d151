"""Input validation at influx's public boundary: one module, one exception class.

Every check here raises :class:`influx.errors.InputError` (a ``ValueError``) naming the
argument and what is expected, before any heavy work or side effect. A wrong *type*
raises :class:`InputTypeError`, an ``InputError`` that is also a ``TypeError``, so code
written against the older ``TypeError``s keeps working while ``except InputError``
catches every bad input.

Options
  :func:`check_int` / :func:`check_positive_int` (Python or NumPy integers, never bools),
  :func:`check_nonnegative` (finite ``>= 0`` scalars; tracers pass), :func:`check_damping`,
  :func:`check_fraction` (in ``(0, 1)``), :func:`check_choice`, :func:`check_on_failure`
  (the failure policy, :data:`ON_FAILURE`), :func:`check_callable`, :func:`check_apply_fn`
  (recognises a Flax module or ``module.apply`` passed where a ``(params, x) -> outputs``
  function is expected).

Data and parameters
  A dataset is a pair ``(x, y)`` of pytrees of arrays with a shared leading example axis.
  :func:`check_data` is the check every public entry point runs on its data; it covers

  * the pair and its leading axis (:func:`num_examples`; Python lists of numbers are
    refused with what to pass instead);
  * finite inputs and targets (:func:`check_finite`: one reduction per floating leaf, on
    the device for JAX arrays, nothing copied to the host);
  * the parameters (:func:`check_params`: every leaf floating point and finite, errors
    name the leaf path, e.g. ``params['Dense_1']['kernel'] has 3 inf values``; one fused
    program counting non-finite entries of all leaves);
  * that ``apply_fn`` accepts the inputs and ``loss_fn`` returns one loss **per example**
    (``jax.eval_shape`` on a batch of two examples: shapes only, no computation);
  * targets that fit the outputs (:func:`influx.losses.check_targets`).

  Cost: one pass over each floating array (data and parameters) plus two abstract
  evaluations (cached by JAX across calls).

Checking once per call
  A public function that calls several others which each validate the same data
  (``influence`` -> ``solve_test_vectors`` -> ``operator``) runs inside :func:`boundary`:
  within one such scope a dataset (the same array objects with the same objective and
  parameters) and a parameter pytree are scanned once; the scope holds references to what
  it checked, so identities cannot be reused while it is open. Outside a scope every call
  checks. The public entry points open one: ``influence``, ``self_influence``,
  ``group_influence``, ``grad_dot``, ``tracin``, ``solve_test_vectors``,
  ``curvature.operator``, ``ihvp``, ``scoring.score``, the response functions
  (``respond``, ``loo``, ``proximal``, ``pbrf``, ``linearized``, ``retrain``),
  ``gaps.decompose`` and ``metagradients``.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import numbers
import sys
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from influx.errors import InputError

__all__ = [
    "InputError",
    "InputTypeError",
    "boundary",
    "check_apply_fn",
    "check_callable",
    "check_choice",
    "check_damping",
    "check_data",
    "check_finite",
    "check_fraction",
    "check_int",
    "check_like",
    "check_nonnegative",
    "check_on_failure",
    "check_params",
    "check_positive_int",
    "check_test",
    "num_examples",
    "ON_FAILURE",
]


class InputTypeError(InputError, TypeError):
    """An :class:`~influx.errors.InputError` for an argument of the wrong type (also a ``TypeError``)."""


# ------------------------------------------------------------------ options
def check_int(value, name: str, *, minimum: int | None = 1, maximum: int | None = None,
              allow_none: bool = False) -> int | None:
    """``value`` as a Python ``int`` in ``[minimum, maximum]``.

    Accepts Python and NumPy integers (not ``bool``); ``None`` when ``allow_none``. Raises
    :class:`InputError` (:class:`InputTypeError` for a non-integer) naming ``name``.
    """
    if value is None and allow_none:
        return None
    lo = "" if minimum is None else f" >= {minimum}"
    hi = "" if maximum is None else f" <= {maximum}"
    want = f"an integer{lo}{' and' if lo and hi else ''}{hi}"
    if allow_none:
        want += " or None"
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise InputTypeError(f"{name} must be {want}, got {value!r}")
    v = int(value)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        raise InputError(f"{name} must be {want}, got {v}")
    return v


def check_positive_int(value, name: str, *, allow_none: bool = False) -> int | None:
    """``value`` as an ``int >= 1`` (see :func:`check_int`)."""
    return check_int(value, name, minimum=1, allow_none=allow_none)


def check_nonnegative(value, name: str, *, as_float: bool = True):
    """A finite scalar ``>= 0``.

    Returns ``float(value)`` (``as_float=True``) or ``value`` unchanged (e.g. a JAX scalar
    that must stay a pytree leaf). Tracers are returned unchecked (inside ``jit`` the
    value is not known).
    """
    if isinstance(value, jax.core.Tracer):
        return value
    if isinstance(value, (str, bytes)) or value is None:
        raise InputTypeError(f"{name} must be a finite number >= 0, got {value!r}")
    try:
        arr = np.asarray(value)
    except Exception as e:  # noqa: BLE001 -- anything not array-like is a type error
        raise InputTypeError(f"{name} must be a finite number >= 0, got {value!r}") from e
    if arr.shape != ():
        raise InputError(f"{name} must be a scalar, got shape {arr.shape}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise InputTypeError(f"{name} must be a finite real number >= 0, got {value!r}")
    f = float(arr)
    if not np.isfinite(f) or f < 0:
        raise InputError(f"{name} must be finite and >= 0, got {f}")
    return f if as_float else value


def check_fraction(value, name: str) -> float:
    """``float(value)`` for a real number strictly between 0 and 1; else :class:`InputError`."""
    if isinstance(value, (str, bytes, bool)) or value is None:
        raise InputTypeError(f"{name} must be a number in (0, 1), got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError) as e:
        raise InputTypeError(f"{name} must be a number in (0, 1), got {value!r}") from e
    if not 0.0 < f < 1.0:
        raise InputError(f"{name} must be in (0, 1), got {value!r}")
    return f


def check_choice(value, name: str, choices: Iterable):
    """``value`` if it is one of ``choices``; else :class:`InputError` listing them."""
    choices = tuple(choices)
    try:
        ok = value in choices
    except TypeError:  # unhashable or incomparable value
        ok = False
    if not ok:
        raise InputError(f"{name} must be one of {choices}, got {value!r}")
    return value


ON_FAILURE = ("raise", "nan", "warn", "keep")
"""Every value of influx's failure policy; an entry point lists the subset it supports."""


def check_on_failure(value, *, allowed: Iterable = ON_FAILURE) -> str:
    """``value`` if it is one of the failure policies ``allowed`` (default: all of
    :data:`ON_FAILURE`); else :class:`InputError` listing them."""
    return check_choice(value, "on_failure", allowed)


def check_damping(value, name: str = "damping"):
    """A finite scalar ``>= 0``, returned unchanged (a JAX scalar stays a leaf; tracers pass)."""
    return check_nonnegative(value, name, as_float=False)


def check_callable(value, name: str):
    """``value`` if it is callable; else :class:`InputTypeError`."""
    if not callable(value):
        raise InputTypeError(f"{name} must be callable, got {type(value).__name__}")
    return value


_FLAX_HELP = ("influx needs a plain function apply_fn(params, x) -> outputs; get one with "
              "`apply_fn, params = influx.flax.from_linen(module, variables)` (linen), "
              "`influx.flax.from_nnx(module)` (nnx), `influx.flax.from_train_state(state)` "
              "(a TrainState), or `influx.models.apply_fn(model)` (influx's reference models)")


def check_apply_fn(apply_fn, *, name: str = "apply_fn"):
    """``apply_fn`` if it is a ``(params, x) -> outputs`` function.

    Recognises the common mistakes of passing a Flax linen/nnx module or a linen
    ``module.apply`` (which takes a variables dict ``{"params": ...}``, not params), and
    says which adapter of :mod:`influx.flax` to use. Never imports Flax itself.
    """
    linen = sys.modules.get("flax.linen")
    nnx = sys.modules.get("flax.nnx")
    # the function itself, and what jax.jit / functools.wraps / functools.partial wrap
    for fn in (apply_fn, getattr(apply_fn, "__wrapped__", None), getattr(apply_fn, "func", None)):
        if fn is None:
            continue
        if linen is not None:
            if isinstance(fn, linen.Module):
                raise InputTypeError(f"{name} is a flax.linen module ({type(fn).__name__}), "
                                     "not a function; " + _FLAX_HELP)
            owner = getattr(fn, "__self__", None)
            if isinstance(owner, linen.Module) and getattr(fn, "__name__", "") == "apply":
                raise InputTypeError(
                    f"{name} is {type(owner).__name__}.apply, which takes a variables dict "
                    "({'params': ...}) instead of params; " + _FLAX_HELP)
        if nnx is not None and isinstance(fn, nnx.Module):
            raise InputTypeError(f"{name} is a flax.nnx module ({type(fn).__name__}), "
                                 "not a function; " + _FLAX_HELP)
    return check_callable(apply_fn, name)


# ------------------------------------------------------------------ one-scan-per-call scope
_SCOPE: contextvars.ContextVar = contextvars.ContextVar("influx_validation_scope", default=None)


class _Scope:
    """What one public call has validated: keys of identities, and the objects behind them."""

    def __init__(self):
        self.done: dict = {}
        self.keep: list = []

    def get(self, key):
        return self.done.get(key)

    def put(self, key, value, objects):
        self.done[key] = value
        self.keep.append(objects)  # the ids in ``key`` stay valid while the scope is open


@contextlib.contextmanager
def _open_scope():
    if _SCOPE.get() is not None:  # nested public calls share the outermost scope
        yield
        return
    token = _SCOPE.set(_Scope())
    try:
        yield
    finally:
        _SCOPE.reset(token)


def boundary(fn: Callable | None = None):
    """Marks a public entry point: validations inside it scan each dataset/params once.

    Use as a decorator (``@boundary``) or a context manager (``with boundary():``). Nested
    public calls share the outermost scope.
    """
    if fn is None:
        return _open_scope()

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _open_scope():
            return fn(*args, **kwargs)

    return wrapper


def _memo(kind, objects: tuple, compute: Callable):
    scope = _SCOPE.get()
    if scope is None:
        return compute()
    key = (kind,) + tuple(id(o) for o in objects)
    hit = scope.get(key)
    if hit is not None:
        return hit[0]
    value = compute()
    scope.put(key, (value,), objects)
    return value


# ------------------------------------------------------------------ finiteness
def _leaf_path(prefix: str, path) -> str:
    return prefix + jax.tree_util.keystr(path)


@jax.jit
def _nonfinite_counts(leaves):
    """Number of NaN/inf entries of each leaf: one fused reduction per leaf, one program."""
    return jnp.stack([jnp.sum(~jnp.isfinite(leaf), dtype=jnp.int32) for leaf in leaves])


def _is_inexact(leaf) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def _on_host(leaf) -> bool:
    """A JAX array whose data NumPy can read in place (CPU, one addressable copy)."""
    try:
        return leaf.is_fully_addressable and all(d.platform == "cpu" for d in leaf.devices())
    except Exception:  # noqa: BLE001 -- a deleted or exotic array: reduce it on its device
        return False


def _nonfinite_leaves(tree) -> list[tuple[object, object]]:
    """``[(path, leaf)]`` of the concrete floating leaves of ``tree`` holding NaN or inf.

    JAX arrays on an accelerator are reduced there (one program for all of them, one small
    transfer of counts); NumPy arrays and CPU JAX arrays (read in place, no copy) on the
    host.
    """
    bad, on_device = [], []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.core.Tracer) or not _is_inexact(leaf) or np.size(leaf) == 0:
            continue
        if isinstance(leaf, jax.Array) and not _on_host(leaf):
            on_device.append((path, leaf))
            continue
        arr = np.asarray(leaf)
        if not np.isfinite(arr).all():
            bad.append((path, arr))
    if on_device:
        counts = np.asarray(_nonfinite_counts([leaf for _, leaf in on_device]))
        bad += [pl for pl, c in zip(on_device, counts) if c]
    return bad


def _describe_nonfinite(leaf) -> str:
    arr = np.asarray(leaf)
    n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
    parts = [f"{n} {what} value{'s' if n != 1 else ''}" for n, what in ((n_nan, "NaN"), (n_inf, "inf")) if n]
    return " and ".join(parts) + f" (of {arr.size})"


def check_finite(tree, *, name: str):
    """Raises :class:`InputError` if a concrete floating leaf of ``tree`` holds NaN or inf.

    The message names the leaf (when ``tree`` has more than one) and the counts. Tracers
    and non-floating leaves pass.
    """
    bad = _nonfinite_leaves(tree)
    if bad:
        path, leaf = bad[0]
        where = "" if not path else f" (leaf {jax.tree_util.keystr(path)})"
        raise InputError(f"{name}: contains NaN or inf{where}: {_describe_nonfinite(leaf)}")


def check_params(params, *, name: str = "params"):
    """Every leaf of ``params`` is a floating-point array with finite values.

    influx differentiates every leaf, so an integer leaf (a step counter, an embedding
    index table) is refused by path, as is a leaf holding NaN or inf (which would give
    NaN scores or a failed factorisation). Tracers pass. Within a :func:`boundary` scope
    the same pytree is checked once.
    """
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if not leaves:
        raise InputError(f"{name}: no parameters (an empty pytree)")
    for path, leaf in leaves:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None:
            dtype = np.asarray(leaf).dtype
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise InputTypeError(
                f"{_leaf_path(name, path)} has dtype {dtype}: influx differentiates every parameter "
                "leaf, so each must be floating point; keep integer state out of params (close over "
                "it in apply_fn) or select the float leaves with influx.flax.subset/restrict")

    def scan():
        bad = _nonfinite_leaves(params)
        if bad:
            msgs = [f"{_leaf_path(name, p)} has {_describe_nonfinite(leaf)}" for p, leaf in bad]
            raise InputError("non-finite parameters: " + "; ".join(msgs)
                             + " (influence is taken at trained, finite parameters)")
        return True

    _memo("params", tuple(leaf for _, leaf in leaves), scan)


# ------------------------------------------------------------------ data
def _is_python_number(leaf) -> bool:
    return isinstance(leaf, (numbers.Number, np.generic)) and not isinstance(leaf, np.ndarray)


def num_examples(data, *, name: str = "data") -> int:
    """Length of the shared leading axis of a dataset ``(x, y)``; :class:`InputError` otherwise.

    Python lists of numbers are refused (their elements would be read as separate
    arrays): pass arrays with a leading example axis, e.g. ``np.asarray(x)``.
    """
    leaves = jax.tree_util.tree_leaves(data)
    if not leaves:
        raise InputError(f"{name}: empty pytree (expected a pair (x, y) of arrays)")
    if any(_is_python_number(leaf) for leaf in leaves):
        raise InputTypeError(
            f"{name}: found Python numbers where arrays were expected (a Python list of values?); "
            "pass arrays with a leading example axis, e.g. (np.asarray(x), np.asarray(y)) with "
            "x of shape (N, ...) and y of shape (N, ...)")
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if None in sizes:
        raise InputError(f"{name}: every array needs a leading example axis; found a scalar leaf")
    if len(sizes) != 1:
        parts = data if isinstance(data, (tuple, list)) else (data,)
        hint = ("; a Python list is a pytree of separate arrays, not one array: pass "
                "np.stack(...)/np.asarray(...) with a leading example axis"
                if any(isinstance(p, list) for p in parts) else "")
        raise InputError(f"{name}: arrays disagree on the number of examples: {sorted(sizes)}{hint}")
    n = sizes.pop()
    if n == 0:
        raise InputError(f"{name}: the dataset is empty (0 examples)")
    return int(n)


def check_like(params, v, *, name: str = "v", batched: bool = False):
    """Checks that ``v`` has the pytree structure and leaf shapes of ``params``.

    With ``batched=True`` every leaf of ``v`` carries one extra leading axis (a batch of
    vectors). Returns ``v`` with each leaf cast to the dtype of the matching parameter
    leaf (so products preserve the parameters' dtype). Raises :class:`InputError`
    (:class:`InputTypeError` for a different structure) naming ``name`` otherwise.
    """
    p_def = jax.tree_util.tree_structure(params)
    v_def = jax.tree_util.tree_structure(v)
    if p_def != v_def:
        raise InputTypeError(
            f"{name}: pytree structure differs from params.\n  params: {p_def}\n  {name}: {v_def}"
        )
    p_leaves = jax.tree_util.tree_leaves(params)
    v_leaves = jax.tree_util.tree_leaves(v)
    out = []
    batch = None
    for i, (p, x) in enumerate(zip(p_leaves, v_leaves)):
        ps, xs = tuple(np.shape(p)), tuple(np.shape(x))
        if batched:
            if len(xs) != len(ps) + 1 or xs[1:] != ps:
                raise InputError(
                    f"{name}: leaf {i} has shape {xs}, expected (batch, *{ps}) for a batch of vectors"
                )
            if batch is None:
                batch = xs[0]
            elif xs[0] != batch:
                raise InputError(f"{name}: leaves disagree on the batch size ({batch} vs {xs[0]})")
        elif xs != ps:
            raise InputError(f"{name}: leaf {i} has shape {xs}, but the parameter has shape {ps}")
        out.append(jnp.asarray(x, dtype=jnp.result_type(p)))
    return jax.tree_util.tree_unflatten(v_def, out)


_PROBE = 2  # examples in the abstract batch that checks apply_fn and the per-example loss


def _abstract_batch(tree, batch: int):
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct((batch,) + tuple(np.shape(a))[1:], jnp.result_type(a)), tree)


def _output_struct(obj, params, x, *, name: str):
    """``jax.eval_shape`` of ``apply_fn`` on an abstract batch of :data:`_PROBE` inputs."""
    try:
        return jax.eval_shape(obj.apply_fn, params, _abstract_batch(x, _PROBE))
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 -- re-raised with the shapes that caused it
        shapes = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)[1:]), x)
        raise InputError(
            f"{name}: apply_fn does not accept inputs with per-example shape {shapes}: "
            f"{type(e).__name__}: {e}"
        ) from e


def _check_per_example_loss(obj, out, y, *, name: str):
    """``loss_fn(outputs, y)`` on an abstract batch of two must have shape ``(2,)``."""
    try:
        loss = jax.eval_shape(obj.loss_fn, out, _abstract_batch(y, _PROBE))
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 -- re-raised with context
        raise InputError(f"{name}: loss_fn(outputs, targets) failed on a batch of {_PROBE} examples: "
                         f"{type(e).__name__}: {e}") from e
    shape = getattr(loss, "shape", None)
    if shape != (_PROBE,):
        got = f"shape {shape}" if shape is not None else type(loss).__name__
        hint = (" -- it looks reduced over the batch (a mean or sum); influx takes the mean itself, "
                "so return the unreduced per-example values" if shape == () else "")
        if shape == () and getattr(obj.loss_fn, "name", "").startswith("token_cross_entropy"):
            hint = (f" -- {obj.loss_fn!r} needs token logits of shape (T, V) per example, got per-example "
                    f"outputs of shape {tuple(getattr(out, 'shape', (0,))[1:])}")
        if shape is not None and len(shape) > 1 and shape[0] == _PROBE:  # e.g. (B, T, V) token logits
            hint = (f" (a loss per position of per-example outputs {tuple(out.shape[1:])}): for a sequence "
                    "model use influx.losses.token_cross_entropy, which sums over the token axis and masks "
                    "labels < 0") if hasattr(out, "shape") else hint
        raise InputError(
            f"{name}: loss_fn must return one loss per example, shape (B,) for B examples; on a batch "
            f"of {_PROBE} it returned {got}{hint}")
    if not jnp.issubdtype(loss.dtype, jnp.floating):
        raise InputTypeError(f"{name}: loss_fn must return floating-point losses, got dtype {loss.dtype}")


def _signature(tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((tuple(np.shape(a)[1:]), jnp.result_type(a)) for a in leaves)


# Probe results by value: (objective, parameter shapes, per-example input and target shapes)
# -> per-example output structs: a repeated check costs a key lookup instead of two traces.
_PROBES: collections.OrderedDict = collections.OrderedDict()
_PROBES_MAX = 64


def _probe(obj, params, x, y, *, name: str):
    """The outputs' ``ShapeDtypeStruct`` pytree (batch :data:`_PROBE`), checking ``apply_fn``
    and (unless ``y`` is ``None``) the per-example loss; successful probes are cached."""
    p_leaves, p_def = jax.tree_util.tree_flatten(params)
    key = (obj, p_def, tuple((tuple(np.shape(a)), jnp.result_type(a)) for a in p_leaves),
           _signature(x), None if y is None else _signature(y))
    try:
        hit = _PROBES.get(key)
    except TypeError:  # an unhashable objective or pytree node: no caching
        key, hit = None, None
    if hit is not None:
        _PROBES.move_to_end(key)
        return hit
    out = _output_struct(obj, params, x, name=name)
    if y is not None:
        _check_per_example_loss(obj, out, y, name=name)
    if key is not None:
        _PROBES[key] = out
        while len(_PROBES) > _PROBES_MAX:
            _PROBES.popitem(last=False)
    return out


def _check_pair(data, name: str):
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise InputTypeError(f"{name}: expected a pair (x, y) of arrays with a leading example axis, "
                             f"got {type(data).__name__}")


def check_data(obj, params, data, *, name: str = "data") -> int:
    """Validates a dataset and the parameters against the objective; returns ``N``.

    Checks, before any heavy work: ``data`` is a pair ``(x, y)`` with a shared, non-empty
    leading axis; inputs and targets are finite; the parameters are floating point and
    finite (:func:`check_params`); ``apply_fn`` accepts ``x`` and ``loss_fn`` returns one
    loss per example (``jax.eval_shape`` on two examples: no computation); targets fit
    the outputs (shape, dtype and, for concrete labels, range). Cost: one pass over each
    floating array; within a :func:`boundary` scope, once per call.
    """
    _check_pair(data, name)
    leaves = tuple(jax.tree_util.tree_leaves(data)) + tuple(jax.tree_util.tree_leaves(params))
    return _memo(("data", obj), leaves, lambda: _check_data(obj, params, data, name=name))


def _check_data(obj, params, data, *, name: str) -> int:
    from influx import losses as _losses  # losses imports this module's errors

    n = num_examples(data, name=name)
    x, y = data
    check_finite(x, name=f"{name} inputs")
    check_finite(y, name=f"{name} targets")
    check_params(params)
    out = _probe(obj, params, x, y, name=name)
    out_leaves = jax.tree_util.tree_leaves(out)
    if len(out_leaves) == 1:
        z_shape = (n,) + tuple(out_leaves[0].shape[1:])
        _losses.check_targets(obj.loss_fn, z_shape, y)
    return n


def check_test(obj, params, test, *, name: str = "test") -> int:
    """Validates a test set; ``(x, None)`` (no labels) is allowed for label-free measurements."""
    if isinstance(test, (tuple, list)) and len(test) == 2 and test[1] is None:
        x = test[0]

        def run():
            n = num_examples(x, name=f"{name} inputs")
            check_finite(x, name=f"{name} inputs")
            check_params(params)
            _probe(obj, params, x, None, name=name)
            return n

        leaves = tuple(jax.tree_util.tree_leaves(x)) + tuple(jax.tree_util.tree_leaves(params))
        return _memo(("test-inputs", obj), leaves, run)
    return check_data(obj, params, test, name=name)
