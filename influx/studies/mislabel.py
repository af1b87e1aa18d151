"""Mislabel detection: do influence scores find training examples with flipped labels?

Protocol (Koh and Liang 2017, Section 5.4; Pruthi et al. 2020):

1. Flip ``fraction`` (default 10%) of the training labels, each to a different random
   class (:func:`influx.data.flip_labels`, seeded).
2. Train an MLP on the noisy labels to (near) a minimiser of
   ``J(theta) = mean_i L(z_i, theta) + l2/2 ||theta||^2`` (Adam, then L-BFGS).
3. Rank the training examples by a suspicion score (largest first) and inspect them in
   that order. Scores:

   * ``direct`` / ``cg`` / ``arnoldi`` / ``lissa`` / ``ekfac`` / ``kfac``: self-influence
     ``(1/N) g_m^T (C + (l2 + lambda) I)^-1 g_m`` (:func:`influx.self_influence`) with
     that iHVP solver (``C`` the Gauss-Newton matrix by default): how much the model
     bends to fit example ``m``;
   * ``pbrf`` (optional, one PBRF solve per training example): the actual change of
     ``L(z_m)`` under the proximal Bregman response function when ``m`` is removed;
   * ``grad_dot``: ``(1/N) ||g_m||^2`` (identity curvature);
   * ``loss``: the training loss ``L(z_m, theta_s)``;
   * ``random``: a seeded random order (the diagonal baseline).

4. Report the fraction of flipped labels found after inspecting 5/10/20/30% of the
   training set and the area under the whole detection curve
   (:func:`influx.metrics.mislabel_detection_curve`; random ~ 0.5).

Cost: one training run; ``direct`` one dense ``(P, P)`` matrix; ``arnoldi`` about
``2 * rank`` products; ``ekfac`` two passes over the data for its factors (no solve per
example); ``cg`` and ``lissa`` one iterative solve per training example
(``N`` solves -- the expensive ones); ``pbrf`` ``N`` short optimisations.
"""

from __future__ import annotations

import dataclasses
import time
import warnings

import numpy as np

from influx.errors import InputError
from influx.studies import _common as C

__all__ = ["MislabelConfig", "MislabelRow", "MislabelResult", "run", "quick", "METHODS"]

METHODS = ("direct", "cg", "arnoldi", "lissa", "ekfac", "kfac", "pbrf", "grad_dot", "loss", "random")


@dataclasses.dataclass(frozen=True)
class MislabelConfig:
    """Options of the mislabel-detection study (defaults: digits, all affordable methods).

    dataset, data_dir, n_train, n_test: passed to :func:`influx.data.load` (a
      classification set).
    fraction: share of training labels flipped.
    depth, width, activation, l2: the MLP and its weight decay.
    methods: scores to rank by (see :data:`METHODS`).
    kind, damping: curvature (``"gnh"`` or ``"hessian"``) and ``lambda`` of self-influence.
    fractions: inspected fractions reported in the table.
    train_steps, learning_rate, lbfgs_steps, tol: Adam warm-up then L-BFGS.
    cg_max_steps, cg_tol, arnoldi_rank, lissa_depth: options of the iterative solvers (CG's
      relative tolerance 1e-3 is ample for a ranking).
    pbrf_steps: L-BFGS steps of each PBRF solve (``pbrf`` method).
    seed: seeds the split, the flips, initialisation and the random baseline.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    n_train: int | None = None
    n_test: int | None = None
    fraction: float = 0.1
    depth: int = 1
    width: int = 32
    activation: str = "tanh"
    l2: float = 1e-3
    methods: tuple[str, ...] = ("direct", "cg", "arnoldi", "lissa", "ekfac", "grad_dot", "loss", "random")
    kind: str = "gnh"
    damping: float = 1e-3
    fractions: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)
    train_steps: int = 1000
    learning_rate: float = 1e-2
    lbfgs_steps: int = 500
    tol: float = 1e-6
    cg_max_steps: int = 100
    cg_tol: float = 1e-3
    arnoldi_rank: int = 50
    lissa_depth: int = 200
    pbrf_steps: int = 50
    seed: int = 0
    dtype: str = "float64"
    progress: bool = True

    def __post_init__(self):
        s = object.__setattr__
        if isinstance(self.methods, str):
            s(self, "methods", tuple(m.strip() for m in self.methods.split(",") if m.strip()))
        s(self, "methods", tuple(self.methods))
        if not self.methods:
            raise InputError("methods must not be empty")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise InputError(f"unknown method(s) {', '.join(map(repr, bad))}; known: {', '.join(METHODS)}")
        s(self, "fractions", C.check_grid(self.fractions, "fractions", kind=float, minimum=0.0))
        if any(q > 1 for q in self.fractions):
            raise InputError(f"fractions must lie in [0, 1], got {self.fractions}")
        if not (isinstance(self.fraction, (int, float)) and 0.0 < float(self.fraction) < 1.0):
            raise InputError(f"fraction must be in (0, 1), got {self.fraction!r}")
        C.check_grid((self.depth,), "depth", minimum=0)
        C.check_grid((self.width,), "width", minimum=1)
        for name in ("lbfgs_steps", "cg_max_steps", "arnoldi_rank", "lissa_depth", "pbrf_steps"):
            C.check_grid((getattr(self, name),), name, minimum=1)
        C.check_grid((self.train_steps,), "train_steps", minimum=0)
        C.check_grid((self.l2,), "l2", kind=float, minimum=0.0)
        C.check_grid((self.damping,), "damping", kind=float, minimum=0.0)
        C.check_grid((self.cg_tol,), "cg_tol", kind=float, minimum=0.0)
        if self.kind not in ("hessian", "gnh"):
            raise InputError(f"kind must be 'hessian' or 'gnh', got {self.kind!r}")
        if self.n_train is not None:
            C.check_grid((self.n_train,), "n_train", minimum=1)
            _check_n_train(self.n_train, self.fraction, self.fractions)

    @classmethod
    def quick(cls, **overrides) -> MislabelConfig:
        """Small and fast: 500 digits, width 16, the cheap solvers (no LiSSA, no PBRF)."""
        kw = dict(n_train=500, width=16, methods=("direct", "arnoldi", "grad_dot", "loss", "random"),
                  train_steps=500, lbfgs_steps=300, arnoldi_rank=30)
        kw.update(overrides)
        return cls(**kw)


def _check_n_train(n: int, fraction: float, fractions, *, what: str = "n_train") -> None:
    """Refuses a training set too small for the detection table: at least one flipped and one
    clean label (else recall and AUC are undefined), and at least one example inspected at
    the smallest reported fraction."""
    n_flip = int(np.floor(float(fraction) * n + 0.5))  # as influx.data.flip_labels
    q = min((f for f in fractions if f > 0), default=None)
    if n_flip < 1 or n - n_flip < 1:
        raise InputError(f"{C.size_label(what, n)} is too small for this study: flipping "
                         f"{float(fraction):.0%} of it flips {n_flip} of {n} labels; it needs at least "
                         "one flipped and one clean label")
    if q is not None and q * n < 1:
        need = int(np.ceil(1 / q))
        raise InputError(f"{C.size_label(what, n)} is too small for this study: it needs at least {need} "
                         f"examples (the table inspects {q:.0%} of the training set, at least one example)")


def quick(**overrides) -> MislabelConfig:
    """Shorthand for :meth:`MislabelConfig.quick`."""
    return MislabelConfig.quick(**overrides)


@dataclasses.dataclass
class MislabelRow:
    """One ranking method: found fraction at each inspected fraction, AUC, time."""

    method: str
    found: dict
    auc: float
    seconds: float
    note: str = ""
    curve: dict = dataclasses.field(default_factory=dict, repr=False)


@dataclasses.dataclass
class MislabelResult:
    """Detection results per method; ``to_dict()``, ``to_markdown()``, ``plot(path)``."""

    config: MislabelConfig
    rows: list[MislabelRow]
    n_train: int
    n_flipped: int
    train_accuracy_noisy: float
    test_accuracy: float
    grad_norm: float
    n_params: int
    seconds: float

    def to_dict(self) -> dict:
        d = {"study": "mislabel"}
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        return C.jsonable(d)

    def to_markdown(self) -> str:
        cfg = self.config
        qs = cfg.fractions
        header = ("method", *(f"found @{q:.0%}" for q in qs), "AUC", "seconds", "note")
        rows = [(r.method, *(r.found[f"{q:g}"] for q in qs), r.auc, f"{r.seconds:.1f}", r.note or "")
                for r in self.rows]
        return (
            f"### Mislabel detection: {cfg.dataset}, {self.n_flipped} of {self.n_train} training labels "
            f"flipped ({cfg.fraction:.0%})\n\n"
            f"MLP {cfg.depth}x{cfg.width}, l2={cfg.l2:g}, {self.n_params} parameters, "
            f"||grad J|| = {C.fmt(self.grad_norm)}, train accuracy on noisy labels "
            f"{self.train_accuracy_noisy:.3f}, test accuracy {self.test_accuracy:.3f}. Self-influence: "
            f"kind={cfg.kind}, damping={cfg.damping:g}. Fraction of flipped labels found after "
            "inspecting the top-scored share of the training set (random ~ that share).\n\n"
            + C.markdown_table(header, rows)
        )

    __str__ = to_markdown

    def plot(self, path):
        """Detection curves (found fraction vs inspected fraction), one line per method."""
        from influx import plots

        return plots.detection_curves(self, path)


# --------------------------------------------------------------------------- the study


def run(config: MislabelConfig | None = None) -> MislabelResult:
    """Runs the mislabel-detection study (see the module docstring)."""
    config = MislabelConfig() if config is None else config
    if not isinstance(config, MislabelConfig):
        raise TypeError(f"config must be a MislabelConfig, got {type(config).__name__}")
    t0 = time.perf_counter()
    with C.precision(config.dtype) as dtype:
        out = _run(config, dtype)
    out.seconds = time.perf_counter() - t0
    return out


def _run(cfg: MislabelConfig, dtype) -> MislabelResult:
    import jax
    import jax.numpy as jnp

    import influx
    from influx import curvature, data, metrics, models, response

    ds = C.load_dataset(cfg.dataset, data_dir=cfg.data_dir, n_train=cfg.n_train, n_test=cfg.n_test,
                        seed=cfg.seed, dtype=dtype)
    if ds.task != "classification":
        raise InputError(f"mislabel detection needs a classification data set; {cfg.dataset!r} is {ds.task}")
    _check_n_train(ds.n_train, cfg.fraction, cfg.fractions, what=f"the training split of {cfg.dataset!r}")
    y_noisy, flipped = data.flip_labels(ds.train[1], cfg.fraction, ds.num_classes, seed=cfg.seed)
    train = (jnp.asarray(ds.train[0]), jnp.asarray(y_noisy))
    test = tuple(jnp.asarray(a) for a in ds.test)
    loss_fn = C.loss_for(ds.task)
    model = models.mlp(cfg.depth, cfg.width, ds.output_dim, cfg.activation)
    apply = C.apply_for(model)
    obj = influx.Objective(apply, loss_fn, l2=cfg.l2)
    params0 = models.init(model, train[0][:1], seed=cfg.seed)
    fit = models.train_to_convergence(model, loss_fn, params0, train, l2=cfg.l2,
                                      optimizer=C.adam(cfg.learning_rate), steps=cfg.train_steps,
                                      seed=cfg.seed, tol=cfg.tol, max_lbfgs_steps=cfg.lbfgs_steps)
    params = fit.params
    n = int(train[0].shape[0])
    n_params = sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(params))
    acc = lambda d: float(np.mean(np.argmax(np.asarray(apply(params, d[0])), -1) == np.asarray(d[1])))

    rows = []
    bar = C.progress(cfg.methods, enabled=cfg.progress, desc="mislabel", unit="method")
    for method in bar:
        bar.set_postfix_str(method)
        t = time.perf_counter()
        note = ""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            if method in C.SOLVERS:
                solver = C.make_solver(method, max_steps=cfg.cg_max_steps, cg_tol=cfg.cg_tol,
                                       rank=min(cfg.arnoldi_rank, n_params), lissa_depth=cfg.lissa_depth)
                scores = influx.self_influence(obj, params, train, kind=cfg.kind, damping=cfg.damping,
                                               solver=solver, on_failure="nan")
            elif method == "grad_dot":
                g = curvature.per_example_grads_flat(obj, params, train)
                scores = jnp.sum(g * g, axis=1) / n
            elif method == "loss":
                scores = obj.per_example_loss(params, train)
            elif method == "random":
                scores = np.random.default_rng(cfg.seed + 1).random(n)
            else:  # pbrf
                r = response.pbrf(obj, params, train, np.arange(n), test=train, damping=cfg.damping,
                                  steps=cfg.pbrf_steps, keep_params=False, warn=False,
                                  on_failure="nan")  # non-finite rows are ranked last below
                scores = np.diagonal(np.asarray(r.delta))
                note = f"{float(np.mean(np.asarray(r.converged))):.0%} converged"
            scores = np.asarray(scores, dtype=np.float64)
        if caught:
            note = (note + "; " if note else "") + _short(str(caught[-1].message))
        if not np.all(np.isfinite(scores)):
            bad = int(np.sum(~np.isfinite(scores)))
            note = (note + "; " if note else "") + f"{bad} non-finite scores ranked last"
            floor = np.min(scores[np.isfinite(scores)], initial=0.0) - 1.0
            scores = np.where(np.isfinite(scores), scores, floor)
        curve = metrics.mislabel_detection_curve(scores, flipped, fractions=cfg.fractions)
        grid = np.linspace(0, 1, 101)
        rows.append(MislabelRow(
            method=method, found={f"{q:g}": float(v) for q, v in zip(cfg.fractions, curve.found)},
            auc=float(curve.auc), seconds=time.perf_counter() - t, note=note,
            curve={"inspected": grid.tolist(),
                   "found": np.interp(grid, curve.inspected, curve.recall).tolist()}))
    return MislabelResult(
        config=cfg, rows=rows, n_train=n, n_flipped=int(flipped.sum()),
        train_accuracy_noisy=acc(train), test_accuracy=acc(test), grad_norm=float(fit.grad_norm),
        n_params=n_params, seconds=0.0)


def _short(msg: str, limit: int = 90) -> str:
    import re

    msg = " ".join(msg.split())
    m = re.search(r"\d+ of \d+ solves did not converge( \(worst residual [^)]*\))?", msg)
    if m:
        return m.group(0)
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."
