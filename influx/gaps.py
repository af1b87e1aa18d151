"""The five-gap decomposition of the discrepancy between influence and cold-start LOO.

Six objects, each the change ``delta[m, t] = f_t(theta_m) - f_t(theta_s)`` of test
measurement ``t`` when training example ``m`` is removed (``eps = -1/N``, see
:mod:`influx.response`), on the same removed examples and test points:

====  ======================  ==========================================================
 (a)  ``cold_loo``            retrain from ``init_params`` without ``z_m`` (the original
                              training's optimizer, steps, batches)
 (b)  ``warm_loo``            minimise ``J_m`` starting at ``theta_s``
 (c)  ``proximal``            (b) plus ``damping/2 ||theta - theta_s||^2``
 (d)  ``pbrf``                proximal Bregman response function
 (e)  ``linearized``          first-order PBRF = influence with an exact iHVP
 (f)  ``influence``           influence with the practical ``solver``
====  ======================  ==========================================================

The five gaps are the differences of consecutive objects (Bae et al. 2022)::

    warm-start gap      = a - b      (non-convex: the retrained net lands elsewhere)
    proximity gap       = b - c      (the proximity term of the damping)
    non-convergence gap = c - d      (theta_s is not a minimiser; Bregman vs loss)
    linearisation error = d - e      (second-order effects of the removal)
    solver error        = e - f      (the practical iHVP solver is inexact)

so they telescope: their sum is ``a - f``, cold LOO minus practical influence. Each term
is reported as the mean ``|difference|`` over all (removed, test) pairs, that mean
relative to the mean ``|cold LOO|``, and the Pearson/Spearman correlation of the two
objects; each object is also correlated with cold LOO and with the PBRF.

Removed examples whose solve became non-finite in any object are dropped from every
object (listed in ``dropped``), so all statistics use the same pairs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import jax
import numpy as np

from influx import response as _response
from influx.objective import Objective

__all__ = ["GapDecomposition", "GapTerm", "decompose", "OBJECTS", "TERMS"]

OBJECTS = ("cold_loo", "warm_loo", "proximal", "pbrf", "linearized", "influence")
TERMS = ("warm_start_gap", "proximity_gap", "non_convergence_gap", "linearization_error", "solver_error")


def _metrics():
    from influx import metrics

    return metrics.pearson, metrics.spearman


@dataclasses.dataclass(frozen=True)
class GapTerm:
    """One gap ``upper - lower`` between consecutive objects.

    difference: ``(n_removed, n_test)`` array ``delta_upper - delta_lower``.
    mean_abs: mean ``|difference|``; relative: ``mean_abs / mean |delta_cold_loo|``.
    pearson, spearman: correlation of the two objects' deltas (``nan`` when constant).
    """

    name: str
    upper: str
    lower: str
    difference: np.ndarray
    mean_abs: float
    relative: float
    pearson: float
    spearman: float

    def to_dict(self, *, arrays: bool = False) -> dict:
        d = {"name": self.name, "upper": self.upper, "lower": self.lower, "mean_abs": self.mean_abs,
             "relative": self.relative, "pearson": self.pearson, "spearman": self.spearman}
        if arrays:
            d["difference"] = self.difference.tolist()
        return d


@dataclasses.dataclass(frozen=True)
class GapDecomposition:
    """Result of :func:`decompose`; ``str()`` is a table, :meth:`to_dict`/:meth:`to_json` serialise.

    deltas: object name -> ``(n_removed, n_test)`` array (rows of ``removed``).
    terms: the five :class:`GapTerm` in order.
    vs_cold, vs_pbrf: object name -> ``{"pearson", "spearman", "mean_abs"}`` against cold
      LOO / PBRF.
    removed: removed indices used; dropped: indices dropped for non-finite solves.
    diagnostics: object name -> convergence summary (max gradient norm, fraction converged).
    settings: the options used.
    """

    deltas: dict
    terms: tuple
    vs_cold: dict
    vs_pbrf: dict
    removed: np.ndarray
    dropped: np.ndarray
    diagnostics: dict
    settings: dict

    def term(self, name: str) -> GapTerm:
        for t in self.terms:
            if t.name == name:
                return t
        raise KeyError(f"unknown term {name!r}; known: {', '.join(TERMS)}")

    @property
    def total(self) -> np.ndarray:
        """``cold LOO - practical influence``, the sum of the five differences."""
        return self.deltas["cold_loo"] - self.deltas["influence"]

    def to_dict(self, *, arrays: bool = False) -> dict:
        d = {
            "terms": [t.to_dict(arrays=arrays) for t in self.terms],
            "vs_cold": self.vs_cold,
            "vs_pbrf": self.vs_pbrf,
            "removed": self.removed.tolist(),
            "dropped": self.dropped.tolist(),
            "diagnostics": self.diagnostics,
            "settings": self.settings,
            "mean_abs_cold_loo": float(np.mean(np.abs(self.deltas["cold_loo"]))),
        }
        if arrays:
            d["deltas"] = {k: np.asarray(v).tolist() for k, v in self.deltas.items()}
        return d

    def to_json(self, *, arrays: bool = False, **kwargs) -> str:
        return json.dumps(self.to_dict(arrays=arrays), default=_json_default, **kwargs)

    def __str__(self) -> str:
        def f(x):
            return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"

        lines = [f"Five-gap decomposition: {len(self.removed)} removed x "
                 f"{self.deltas['cold_loo'].shape[1]} test"
                 + (f" ({len(self.dropped)} dropped: non-finite)" if len(self.dropped) else ""),
                 "",
                 "| term | objects | mean abs diff | relative to cold LOO | pearson | spearman |",
                 "|---|---|---|---|---|---|"]
        for t in self.terms:
            lines.append(f"| {t.name} | {t.upper} - {t.lower} | {f(t.mean_abs)} | {f(t.relative)} | "
                         f"{f(t.pearson)} | {f(t.spearman)} |")
        lines += ["", "| object | mean abs delta | pearson vs cold LOO | spearman vs cold LOO | "
                      "pearson vs PBRF | spearman vs PBRF | max grad norm | converged |",
                  "|---|---|---|---|---|---|---|---|"]
        for name in OBJECTS:
            c, p, dg = self.vs_cold[name], self.vs_pbrf[name], self.diagnostics.get(name, {})
            lines.append(
                f"| {name} | {f(float(np.mean(np.abs(self.deltas[name]))))} | {f(c['pearson'])} | "
                f"{f(c['spearman'])} | {f(p['pearson'])} | {f(p['spearman'])} | "
                f"{f(dg.get('max_grad_norm'))} | {f(dg.get('fraction_converged'))} |")
        return "\n".join(lines)


def _describe(opt) -> str:
    if opt is None:
        return "default"
    if isinstance(opt, _response.NewtonCG):
        return repr(opt)
    return type(opt).__name__ if hasattr(opt, "update") and not hasattr(opt, "options") else repr(opt)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return repr(o)


def _corr(a, b) -> dict:
    pearson, spearman = _metrics()
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 2:
        return {"pearson": float("nan"), "spearman": float("nan"),
                "mean_abs": float(np.mean(np.abs(a - b)))}
    return {"pearson": float(pearson(a, b)), "spearman": float(spearman(a, b)),
            "mean_abs": float(np.mean(np.abs(a - b)))}


def _diag(r) -> dict:
    gn = np.asarray(r.grad_norm, np.float64)
    return {"max_grad_norm": float(np.nanmax(gn)) if np.any(np.isfinite(gn)) else float("nan"),
            "fraction_converged": float(np.mean(np.asarray(r.converged))),
            "failed": np.asarray(r.failed).tolist()}


def decompose(obj: Objective, init_params, params, train, test, removed, *, damping: float,
              solver=None, optimizer=None, steps: int = 50, train_optimizer=None,
              train_steps: int | None = None, train_batch_size: int | None = None, seed: int = 0,
              baseline: str = "params", exact_solver=None, chunk_size: int = 64, tol: float = 1e-8,
              measurement=None) -> GapDecomposition:
    """Computes the six objects and the five gaps (see the module docstring).

    Args:
      obj: the :class:`influx.Objective`.
      init_params: the initialisation the model was trained from (cold start).
      params: the trained ``theta_s``.
      train, test: ``(x, y)`` data sets.
      removed: distinct training indices.
      damping: ``lambda`` shared by the proximal LOO, the PBRF and both influences.
      solver: the practical iHVP solver of object (f) (default: influence's default).
      optimizer, steps: inner solver of the warm LOO, proximal LOO and PBRF (default
        :func:`influx.response.newton`, 50 steps: converged objects, so the gaps measure
        the definitions, not optimisation error).
      train_optimizer, train_steps, train_batch_size, seed: the original training, repeated
        for the cold-start LOO (required: the same optimizer object and settings that
        produced ``params`` from ``init_params``).
      baseline: ``"params"`` or ``"retrain"`` for the cold LOO (see :func:`influx.response.loo`).
      exact_solver: solver of the linearised PBRF (default: direct up to 4096 parameters,
        converged CG beyond).
      tol: gradient-norm tolerance reported as converged for (b)-(d).
      measurement: the test measurement (default: test loss), as in :func:`influx.influence`.

    Cost: ``len(removed) x (train_steps + 3 x steps)`` (mini)batch gradient evaluations
    (Newton steps cost a few HVPs more) and two influence computations.
    """
    from influx.influence import influence

    if train_optimizer is None or train_steps is None:
        raise ValueError("decompose: train_optimizer and train_steps (the original training) are "
                         "required for the cold-start LOO")
    n = len(jax.tree_util.tree_leaves(train)[0])
    common = dict(test=test, chunk_size=chunk_size, measurement=measurement, warn=False)
    opt = _response.DEFAULT_OPTIMIZER if optimizer is None else optimizer
    objs = {}
    objs["cold_loo"] = _response.loo(obj, params, train, removed, init=init_params, optimizer=train_optimizer,
                                     steps=train_steps, batch_size=train_batch_size, seed=seed,
                                     baseline=baseline, keep_params=False, tol=tol, **common)
    removed = objs["cold_loo"].removed
    objs["warm_loo"] = _response.loo(obj, params, train, removed, optimizer=opt, steps=steps,
                                     keep_params=False, tol=tol, **common)
    objs["proximal"] = _response.proximal(obj, params, train, removed, damping=damping, optimizer=opt,
                                          steps=steps, keep_params=False, tol=tol, **common)
    objs["pbrf"] = _response.pbrf(obj, params, train, removed, damping=damping, optimizer=opt, steps=steps,
                                  keep_params=False, tol=tol, **common)
    objs["linearized"] = _response.linearized(obj, params, train, removed, test=test, damping=damping,
                                              solver=exact_solver, measurement=measurement,
                                              chunk_size=max(chunk_size, 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = influence(obj, params, tuple(train), tuple(test), kind="gnh", damping=damping,
                           solver=solver, measurement=measurement)
    practical_warning = "; ".join(str(w.message) for w in caught) or None
    deltas = {k: np.asarray(v.delta, np.float64) for k, v in objs.items()}
    deltas["influence"] = np.asarray(scores, np.float64)[:, removed].T  # eps = -1/N already

    rows = np.ones(len(removed), bool)
    for d in deltas.values():
        rows &= np.all(np.isfinite(d), axis=1)
    dropped = removed[~rows]
    if not rows.any():
        raise FloatingPointError("decompose: every removed example failed (non-finite) in some object")
    deltas = {k: v[rows] for k, v in deltas.items()}
    cold_scale = float(np.mean(np.abs(deltas["cold_loo"])))
    terms = []
    for name, upper, lower in zip(TERMS, OBJECTS[:-1], OBJECTS[1:]):
        diff = deltas[upper] - deltas[lower]
        c = _corr(deltas[upper], deltas[lower])
        mean_abs = float(np.mean(np.abs(diff)))
        terms.append(GapTerm(name, upper, lower, diff, mean_abs,
                             mean_abs / cold_scale if cold_scale > 0 else float("nan"),
                             c["pearson"], c["spearman"]))
    vs_cold = {k: _corr(v, deltas["cold_loo"]) for k, v in deltas.items()}
    vs_pbrf = {k: _corr(v, deltas["pbrf"]) for k, v in deltas.items()}
    diagnostics = {k: _diag(v) for k, v in objs.items() if k != "linearized"}
    diagnostics["linearized"] = {"solver": objs["linearized"].info["solver"],
                                 "fraction_converged": float(np.mean(objs["linearized"].converged))}
    diagnostics["influence"] = {"solver": _describe(solver), "warning": practical_warning}
    settings = {"damping": float(damping), "steps": steps, "optimizer": _describe(opt),
                "train_optimizer": _describe(train_optimizer), "train_steps": train_steps,
                "train_batch_size": train_batch_size, "seed": seed, "baseline": baseline,
                "n_train": n, "l2": obj.l2, "tol": tol, "solver": _describe(solver),
                "measurement": repr(measurement) if measurement is not None else "loss"}
    return GapDecomposition(deltas=deltas, terms=tuple(terms), vs_cold=vs_cold, vs_pbrf=vs_pbrf,
                            removed=removed[rows], dropped=dropped, diagnostics=diagnostics,
                            settings=settings)
