"""Adapters from Flax models to influx's ``(apply_fn, params)``, and parameter subsets.

influx differentiates with respect to ``params`` only; everything else a Flax model
carries (batch statistics, RNG state, constants) is held fixed at its current value,
as influence functions assume: the curvature and gradients are taken at ``theta_s``
with the model in inference mode.

* :func:`from_linen` ``(module, variables)``: ``apply_fn(p, x) = module.apply({"params":
  p, **other_collections}, x, **apply_kwargs)``. Pass ``train=False`` or similar through
  ``apply_kwargs`` when the module switches BatchNorm/Dropout on a flag; the other
  collections (``batch_stats``) are never mutated.
* :func:`from_nnx` ``(module, **call_kwargs)``: ``graphdef, params, rest =
  nnx.split(module, nnx.Param, ...)``; ``apply_fn(p, x) = nnx.merge(graphdef, p,
  rest)(x, **call_kwargs)``. Call ``module.eval()`` first for BatchNorm/Dropout modules.
* :func:`from_train_state` ``(state, **apply_kwargs)``: ``apply_fn(p, x) =
  state.apply_fn({"params": p, ...}, x, **apply_kwargs)``, including
  ``state.batch_stats`` when the state carries it (pass ``train=False`` or similar).
* :func:`subset` ``(params, pattern)`` -> ``(trainable, merge)``: influence on a subset
  of parameters (e.g. the last layer). ``trainable`` keeps the pytree structure with
  the unselected leaves replaced by ``None`` (empty subtrees); ``merge(trainable)``
  rebuilds the full parameters. :func:`restrict` wraps an ``apply_fn`` accordingly.
  Paths are ``"/"``-joined keys, e.g. ``"Dense_1/kernel"`` (linen) or
  ``"l2/kernel/value"`` (nnx); ``pattern`` is a regular expression searched in them.

All returned ``apply_fn`` are plain functions of ``(params, x)``: use them in
``influx.Objective(apply_fn, loss_fn, l2=...)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax

from influx.validation import InputError, InputTypeError

__all__ = ["from_linen", "from_nnx", "from_train_state", "subset", "restrict", "param_paths"]


def from_linen(module, variables: Mapping, *, params_key: str = "params",
               **apply_kwargs) -> tuple[Callable, Any]:
    """``(apply_fn, params)`` for a linen ``module`` and its ``variables``.

    Collections other than ``params_key`` (e.g. ``batch_stats``) are closed over and
    held constant. Extra keyword arguments go to every ``module.apply`` call (e.g.
    ``train=False``). Raises ``KeyError`` when ``params_key`` is missing.
    """
    if not hasattr(module, "apply"):
        raise InputTypeError(f"from_linen: expected a flax.linen Module, got {type(module).__name__}")
    if not isinstance(variables, Mapping):
        raise InputTypeError("from_linen: variables must be a mapping of collections, "
                        f"got {type(variables).__name__}")
    if params_key not in variables:
        raise KeyError(f"from_linen: variables have no {params_key!r} collection (have {sorted(variables)})")
    params = variables[params_key]
    rest = {k: v for k, v in variables.items() if k != params_key}

    def apply_fn(p, x):
        return module.apply({params_key: p, **rest}, x, **apply_kwargs)

    return apply_fn, params


def from_nnx(module, **call_kwargs) -> tuple[Callable, Any]:
    """``(apply_fn, params)`` for an ``nnx.Module`` (params: its ``nnx.Param`` state).

    The module is split once (``nnx.split(module, nnx.Param, ...)``); every call merges
    the given params with the frozen non-parameter state, so the module object itself is
    never mutated. The params are an ``nnx.State`` (a pytree; works everywhere in influx).
    Extra keyword arguments go to every call of the module (``module(x, **call_kwargs)``).
    """
    from flax import nnx

    if not isinstance(module, nnx.Module):
        raise InputTypeError(f"from_nnx: expected an nnx.Module, got {type(module).__name__}")
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def apply_fn(p, x):
        return nnx.merge(graphdef, p, rest)(x, **call_kwargs)

    return apply_fn, params


def from_train_state(state, *, extra_variables: Mapping | None = None,
                     **apply_kwargs) -> tuple[Callable, Any]:
    """``(apply_fn, params)`` from a ``flax.training.train_state.TrainState``.

    ``state.apply_fn`` (usually ``module.apply``) is called with ``{"params": p}`` plus
    ``state.batch_stats`` when present and any ``extra_variables``; extra keyword
    arguments go to every call (e.g. ``train=False`` for a model whose BatchNorm/Dropout
    switch on a flag): ``state.apply_fn(variables, x, **apply_kwargs)``.
    """
    if not (hasattr(state, "apply_fn") and hasattr(state, "params")):
        raise InputTypeError(f"from_train_state: expected a TrainState, got {type(state).__name__}")
    rest = dict(extra_variables or {})
    if getattr(state, "batch_stats", None) is not None:
        rest.setdefault("batch_stats", state.batch_stats)
    f = state.apply_fn

    def apply_fn(p, x):
        return f({"params": p, **rest}, x, **apply_kwargs)

    return apply_fn, state.params


def param_paths(params) -> list[str]:
    """The ``"/"``-joined paths of the leaves of ``params``, in leaf order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    return [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in leaves]


def subset(params, pattern: str) -> tuple[Any, Callable]:
    """Selects the leaves whose path matches ``pattern`` (``re.search``).

    Returns ``(trainable, merge)``: ``trainable`` has the structure of ``params`` with
    every unselected leaf replaced by ``None``; ``merge(t)`` puts the leaves of ``t``
    back into the full parameters (the unselected leaves keep their values).
    Raises ``ValueError`` listing the available paths when nothing matches.
    """
    if not isinstance(pattern, str):
        raise InputTypeError(f"subset: pattern must be a regex string, got {type(pattern).__name__}")
    rx = re.compile(pattern)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in leaves]
    sel = [rx.search(nm) is not None for nm in names]
    if not any(sel):
        raise InputError(f"subset: pattern {pattern!r} matches no parameter; paths: {names}")
    values = [leaf for _, leaf in leaves]
    trainable = jax.tree_util.tree_unflatten(treedef, [v if s else None for v, s in zip(values, sel)])

    def merge(t):
        t_leaves = jax.tree_util.tree_leaves(t, is_leaf=lambda x: x is None)
        if len(t_leaves) != len(values):
            raise InputError(f"merge: expected a pytree like the subset ({len(values)} slots), "
                             f"got {len(t_leaves)}")
        return jax.tree_util.tree_unflatten(
            treedef, [tv if s else v for tv, v, s in zip(t_leaves, values, sel)])

    return trainable, merge


def restrict(apply_fn: Callable, params, pattern: str) -> tuple[Callable, Any]:
    """``(apply_fn_subset, trainable)``: ``apply_fn`` as a function of the subset only.

    ``apply_fn_subset(t, x) = apply_fn(merge(t), x)`` with ``(trainable, merge) =
    subset(params, pattern)``; use it in an ``Objective`` to compute influence on the
    selected parameters (the curvature is then the corresponding diagonal block).
    """
    trainable, merge = subset(params, pattern)

    def apply_fn_subset(t, x):
        return apply_fn(merge(t), x)

    return apply_fn_subset, trainable
