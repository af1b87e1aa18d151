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
relative to the mean ``|cold LOO|`` and relative to the mean ``|delta|`` of the two
objects it compares (``relative_objects``), and the Pearson/Spearman correlation of the
two objects; each object is also correlated with cold LOO and with the PBRF.

Failures follow influx's policy (``on_failure``): by default a failed solve in any object
raises :class:`influx.errors.SolveError`; with ``on_failure="nan"`` the removed examples
(rows) and test points (columns) with a failed solve are dropped from every object (listed
in ``dropped`` / ``dropped_test``), so all statistics use the same pairs. ``notes`` names
each object's configuration next to its unconverged or failed solves.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import warnings

import numpy as np

from influx import response as _response
from influx.errors import InputError, SolveError
from influx.objective import Objective, check_data, check_like
from influx.validation import boundary as _boundary
from influx.validation import check_int, check_nonnegative

__all__ = ["GapDecomposition", "GapTerm", "decompose", "OBJECTS", "TERMS"]

OBJECTS = ("cold_loo", "warm_loo", "proximal", "pbrf", "linearized", "influence")
TERMS = ("warm_start_gap", "proximity_gap", "non_convergence_gap", "linearization_error", "solver_error")


@dataclasses.dataclass(frozen=True)
class GapTerm:
    """One gap ``upper - lower`` between consecutive objects.

    difference: ``(n_removed, n_test)`` array ``delta_upper - delta_lower``.
    mean_abs: mean ``|difference|``; relative: ``mean_abs / mean |delta_cold_loo|``;
    relative_objects: ``mean_abs`` relative to the scale of the two objects it compares,
    ``mean_abs / ((mean |delta_upper| + mean |delta_lower|) / 2)`` (a term of 5e-4 is
    negligible only if the objects themselves are much larger).
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
    relative_objects: float = float("nan")

    def to_dict(self, *, arrays: bool = False) -> dict:
        d = {"name": self.name, "upper": self.upper, "lower": self.lower, "mean_abs": self.mean_abs,
             "relative": self.relative, "relative_objects": self.relative_objects, "pearson": self.pearson,
             "spearman": self.spearman}
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
    removed: removed indices used; dropped: indices dropped for non-finite solves (with
      ``on_failure="nan"``).
    diagnostics: object name -> convergence summary (its configuration, max gradient norm,
      fraction converged).
    settings: the options used.
    notes: one line per object with unconverged or failed solves, naming the object's
      configuration (inner solver, steps, tol), e.g. ``"warm_loo (NewtonCG(...), 30 steps,
      tol 1e-08): 3 of 10 solves converged (30%), worst ||grad|| 2e-05"``.
    dropped_test: test indices (columns) dropped because a solve of theirs failed.
    """

    deltas: dict
    terms: tuple
    vs_cold: dict
    vs_pbrf: dict
    removed: np.ndarray
    dropped: np.ndarray
    diagnostics: dict
    settings: dict
    notes: tuple = ()
    dropped_test: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.int64))

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
            "notes": list(self.notes),
            "dropped_test": np.asarray(self.dropped_test).tolist(),
            "mean_abs_cold_loo": float(np.mean(np.abs(self.deltas["cold_loo"]))),
            "mean_abs": {k: float(np.mean(np.abs(v))) for k, v in self.deltas.items()},
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
                 "| term | objects | mean abs diff | relative to cold LOO | relative to its objects | "
                 "pearson | spearman |",
                 "|---|---|---|---|---|---|---|"]
        for t in self.terms:
            lines.append(f"| {t.name} | {t.upper} - {t.lower} | {f(t.mean_abs)} | {f(t.relative)} | "
                         f"{f(t.relative_objects)} | {f(t.pearson)} | {f(t.spearman)} |")
        lines += ["", "| object | mean abs delta | pearson vs cold LOO | spearman vs cold LOO | "
                      "pearson vs PBRF | spearman vs PBRF | max grad norm | converged |",
                  "|---|---|---|---|---|---|---|---|"]
        for name in OBJECTS + tuple(k for k in self.deltas if k not in OBJECTS):
            c, p, dg = self.vs_cold[name], self.vs_pbrf[name], self.diagnostics.get(name, {})
            lines.append(
                f"| {name} | {f(float(np.mean(np.abs(self.deltas[name]))))} | {f(c['pearson'])} | "
                f"{f(c['spearman'])} | {f(p['pearson'])} | {f(p['spearman'])} | "
                f"{f(dg.get('max_grad_norm'))} | {f(dg.get('fraction_converged'))} |")
        if self.notes:
            lines += ["", "Notes:"] + [f"- {n}" for n in self.notes]
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
    """:func:`influx.metrics.correlations` of two objects as a dict (``nan`` below 2 pairs)."""
    from influx import metrics

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 2:
        return {"pearson": float("nan"), "spearman": float("nan"), "mean_abs": float(np.mean(np.abs(a - b)))}
    c = metrics.correlations(a, b)
    return {"pearson": c.pearson, "spearman": c.spearman, "mean_abs": c.mean_abs_diff}


def _diag(r, config: str) -> dict:
    gn = np.asarray(r.grad_norm, np.float64)
    return {"config": config,
            "max_grad_norm": float(np.nanmax(gn)) if np.any(np.isfinite(gn)) else float("nan"),
            "fraction_converged": float(np.mean(np.asarray(r.converged))),
            "converged": int(np.sum(np.asarray(r.converged))), "solves": int(np.size(r.converged)),
            "failed": np.asarray(r.failed).tolist()}


def _notes(diagnostics: dict) -> tuple:
    """One line per object with unconverged or failed solves, naming its configuration."""
    notes = []
    for name in OBJECTS:
        d = diagnostics.get(name, {})
        where = f"{name} ({d.get('config', '')})"
        if d.get("failed"):
            notes.append(f"{where}: {len(d['failed'])} solves non-finite (removed {d['failed'][:10]}), "
                         "dropped")
        if name == "cold_loo":  # a replay of the training: not expected to reach tol
            continue
        if d.get("failed_test"):
            notes.append(f"{where}: {len(d['failed_test'])} test-point solves failed "
                         f"(test indices {d['failed_test'][:10]}), dropped")
        if "solves" in d and d["converged"] < d["solves"]:
            notes.append(f"{where}: {d['converged']} of {d['solves']} solves converged "
                         f"({d['fraction_converged']:.0%}), worst ||grad|| {d['max_grad_norm']:.3g}")
        if d.get("unconverged_test"):
            notes.append(f"{where}: {d['unconverged_test']} test-point solves did not reach the solver's tol "
                         f"(worst relative residual {d['worst_residual']:.3g}); kept as the practical answer")
        elif d.get("warning"):
            notes.append(f"{where}: {d['warning']}")
    return tuple(notes)


@_boundary
def decompose(obj: Objective, init_params, params, train, test, removed, *, damping: float,
              solver=None, optimizer=None, steps: int = 50, train_optimizer=None,
              train_steps: int | None = None, train_batch_size: int | None = None, seed: int = 0,
              baseline: str = "params", exact_solver=None, chunk_size: int = 64, tol: float = 1e-8,
              measurement=None, on_failure: str = "raise", metagradient: bool = True) -> GapDecomposition:
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
      on_failure: a failed solve in any object (non-finite retraining, an iHVP solve that
        did not converge): ``"raise"`` (default, :class:`influx.errors.SolveError`) or
        ``"nan"`` (the affected removed examples / test points are dropped from every
        object and listed in ``dropped`` / ``dropped_test`` and ``notes``).
      metagradient: also compute the exact metagradient of the original training run
        (:func:`influx.metagradients`, same init, optimizer, steps, batches and seed as the
        cold LOO) as an extra object ``"metagradient"`` outside the chain of gaps: its
        correlations with the cold LOO and with the PBRF are in ``vs_cold`` / ``vs_pbrf``.
        It is the first-order answer to the cold LOO itself, so it closes the warm-start,
        proximity and non-convergence gaps that influence leaves open.

    Every option is validated (one :class:`influx.response.ResponseOptions` per object,
    the data, indices and measurement) before the first retraining, so a bad value such as
    ``damping=-1`` raises :class:`influx.errors.InputError` at once.

    Cost: ``len(removed) x (train_steps + 3 x steps)`` (mini)batch gradient evaluations
    (Newton steps cost a few HVPs more) and two influence computations.

    (Over 80 lines only by this docstring: about 50 lines of code.)
    """
    if train_optimizer is None or train_steps is None:
        raise InputError("decompose: train_optimizer and train_steps (the original training) are "
                         "required for the cold-start LOO")
    n, removed, damping = _check_inputs(obj, init_params, params, train, test, removed, damping=damping,
                                        measurement=measurement, train_batch_size=train_batch_size)
    common = dict(chunk_size=chunk_size, measurement=measurement, warn=False, keep_params=False, tol=tol,
                  on_failure=on_failure)
    cold_opts = _response.ResponseOptions(optimizer=train_optimizer, steps=train_steps,
                                          batch_size=train_batch_size, seed=seed, baseline=baseline, **common)
    warm_opts = _response.ResponseOptions(optimizer=optimizer, steps=steps, **common)
    prox_opts = warm_opts.replace(damping=damping)

    run = functools.partial(_response.respond, obj=obj, params=params, train=train, removed=removed,
                            test=test)
    objs = {"cold_loo": run("loo", init=init_params, options=cold_opts),
            "warm_loo": run("loo", options=warm_opts),
            "proximal": run("proximal", options=prox_opts),
            "pbrf": run("pbrf", options=prox_opts),
            "linearized": _response.linearized(obj, params, train, removed, test=test, damping=damping,
                                               solver=exact_solver, measurement=measurement,
                                               chunk_size=cold_opts.chunk_size, on_failure=on_failure)}
    deltas = {k: np.asarray(v.delta, np.float64) for k, v in objs.items()}
    deltas["influence"], inf_diag = _practical(obj, params, train, test, removed, damping=damping,
                                               solver=solver, measurement=measurement, on_failure=on_failure)
    deltas, rows, dropped_test = _drop_failed(deltas)
    if metagradient:  # an extra object: a failed metagradient is NaN here, it drops nothing else
        meta = _metagradient(obj, init_params, train, test, removed, options=cold_opts)
        deltas["metagradient"] = np.delete(meta[rows], dropped_test, axis=1)

    warm_cfg = f"{_describe(warm_opts.optimizer)}, {steps} steps, tol {tol:g}"
    configs = {"cold_loo": f"{_describe(train_optimizer)}, {train_steps} steps, "
                           f"batch_size {train_batch_size}, seed {seed}, baseline {baseline}",
               "warm_loo": warm_cfg, "proximal": f"{warm_cfg}, damping {damping:g}",
               "pbrf": f"{warm_cfg}, damping {damping:g}"}
    diagnostics = {k: _diag(objs[k], cfg) for k, cfg in configs.items()}
    lin = objs["linearized"]
    diagnostics["linearized"] = {"config": f"{lin.info['solver']}, damping {damping:g}",
                                 "solver": lin.info["solver"],
                                 "fraction_converged": float(np.mean(lin.converged)),
                                 "failed_test": np.asarray(lin.info["failed_test"]).tolist()}
    diagnostics["influence"] = inf_diag
    settings = {"damping": float(damping), "steps": steps, "optimizer": _describe(warm_opts.optimizer),
                "train_optimizer": _describe(train_optimizer), "train_steps": train_steps,
                "train_batch_size": train_batch_size, "seed": seed, "baseline": baseline,
                "n_train": n, "l2": obj.l2, "tol": tol, "solver": _describe(solver),
                "measurement": repr(measurement) if measurement is not None else "loss",
                "on_failure": on_failure}
    return GapDecomposition(deltas=deltas, terms=_terms(deltas),
                            vs_cold={k: _corr(v, deltas["cold_loo"]) for k, v in deltas.items()},
                            vs_pbrf={k: _corr(v, deltas["pbrf"]) for k, v in deltas.items()},
                            removed=removed[rows], dropped=removed[~rows], diagnostics=diagnostics,
                            settings=settings, notes=_notes(diagnostics), dropped_test=dropped_test)


def _check_inputs(obj, init_params, params, train, test, removed, *, damping, measurement, train_batch_size):
    """Every data check of :func:`decompose`, before the first (costly) retraining."""
    if not isinstance(obj, Objective):
        raise InputError(f"obj must be an influx.Objective, got {type(obj).__name__}")
    n = check_data(obj, params, train, name="train")
    removed = _response._check_removed(removed, n)
    _response._check_test(obj, params, test, measurement)
    check_like(params, init_params, name="init_params")
    damping = check_nonnegative(damping, "damping")
    if train_batch_size is not None and check_int(train_batch_size, "train_batch_size", minimum=1) > n:
        raise InputError(f"train_batch_size must be <= the number of training examples {n}, "
                         f"got {train_batch_size}")
    return n, removed, damping


def _practical(obj, params, train, test, removed, *, damping, solver, measurement, on_failure):
    """Object (f), influence with the practical solver, as ``(n_removed, n_test)``, and its diagnostics.

    It is the practical solver's answer, converged or not: that inexactness is the solver
    error being measured (noted with its residual). Non-finite values are failures.
    """
    from influx.attribution import influence

    kw = {"on_failure": "keep"}  # an unconverged answer is the solver error; other failures are NaN
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores, info = influence(obj, params, tuple(train), tuple(test), kind="gnh", damping=damping,
                                 solver=solver, measurement=measurement, return_info=True, **kw)
    delta = np.asarray(scores, np.float64)[:, removed].T  # eps = -1/N already
    bad = ~np.all(np.isfinite(delta), axis=0)
    unconv = np.zeros_like(bad) if info.converged is None else ~np.asarray(info.converged, bool).reshape(-1)
    worst = float("nan") if info.residual_norm is None else float(np.nanmax(np.asarray(info.residual_norm)))
    if bad.any():
        if on_failure == "raise":
            raise SolveError(
                f"decompose: the practical solver {_describe(solver)} gave non-finite scores for "
                f"{int(bad.sum())} of {bad.size} test points (worst relative residual {worst:.3g}). "
                "Fix: add damping or choose another solver; pass on_failure='nan' to drop those test points")
        delta[:, bad] = np.nan
    diag = {"config": f"{_describe(solver)}, damping {damping:g}", "solver": _describe(solver),
            "warning": "; ".join(" ".join(str(w.message).split()) for w in caught) or None,
            "failed_test": np.flatnonzero(bad).tolist(), "unconverged_test": int(unconv.sum()),
            "worst_residual": worst}
    return delta, diag


def _metagradient(obj, init_params, train, test, removed, *, options):
    """The metagradient object, ``(n_removed, n_test)``: ``-d f_t / d w_m`` through the
    original training run (``options`` of the cold LOO), in the same sign and scale as the
    LOO deltas (predicted ``f(theta without m) - f(theta_s)``)."""
    from influx.metagrad import metagradients

    scores = metagradients(obj, init_params, tuple(train), tuple(test), optimizer=options.optimizer,
                           steps=options.steps, batch_size=options.batch_size, seed=options.seed,
                           measurement=options.measurement, on_failure="nan")
    return np.asarray(scores, np.float64)[:, removed].T


def _drop_failed(deltas: dict):
    """Drops failed test points (columns with no finite entry in some object), then removed
    examples (rows) with a non-finite entry, from every object; returns them and the masks."""
    cols = np.ones(deltas["cold_loo"].shape[1], bool)
    for d in deltas.values():
        cols &= np.any(np.isfinite(d), axis=0)
    rows = np.ones(deltas["cold_loo"].shape[0], bool)
    for d in deltas.values():
        rows &= np.all(np.isfinite(d[:, cols]), axis=1)
    if not rows.any() or not cols.any():
        raise SolveError("decompose: every removed example or every test point failed (non-finite or "
                         "unconverged) in some object; see the notes of on_failure='nan' runs")
    return {k: v[rows][:, cols] for k, v in deltas.items()}, rows, np.flatnonzero(~cols)


def _terms(deltas: dict) -> tuple:
    """The five :class:`GapTerm` (differences of consecutive objects) with their scales."""
    cold_scale = float(np.mean(np.abs(deltas["cold_loo"])))
    terms = []
    for name, upper, lower in zip(TERMS, OBJECTS[:-1], OBJECTS[1:]):
        diff = deltas[upper] - deltas[lower]
        c = _corr(deltas[upper], deltas[lower])
        mean_abs = float(np.mean(np.abs(diff)))
        pair_scale = 0.5 * (float(np.mean(np.abs(deltas[upper]))) + float(np.mean(np.abs(deltas[lower]))))
        terms.append(GapTerm(name, upper, lower, diff, mean_abs,
                             mean_abs / cold_scale if cold_scale > 0 else float("nan"),
                             c["pearson"], c["spearman"],
                             mean_abs / pair_scale if pair_scale > 0 else float("nan")))
    return tuple(terms)
