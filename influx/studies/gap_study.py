"""The five-gap decomposition study (Bae, Ng, Lo, Ghassemi and Grosse, NeurIPS 2022).

Question: influence functions disagree with leave-one-out retraining in neural nets --
which of the approximations behind them is responsible? Bae et al. split the
difference between cold-start LOO and the practical influence estimate into five gaps
between consecutive response objects (signs and names as in ``DESIGN.md``)::

    (a) cold-start LOO    retrain from the original init without z_m (same optimiser, steps)
    (b) warm-start LOO    start at theta_s, minimise J without z_m
    (c) proximal LOO      (b) + lambda/2 ||theta - theta_s||^2
    (d) PBRF              proximal Bregman response function
    (e) linearised PBRF   influence with an exact iHVP (Gauss-Newton, damping lambda)
    (f) influence         with the practical solver

    warm-start gap = a-b, proximity gap = b-c, non-convergence gap = c-d,
    linearisation error = d-e, solver error = e-f.

Each object is the change of every selected test loss when each selected training
example is removed, a ``(n_removed, n_test)`` array; a gap is reported as the mean
absolute difference between consecutive arrays. The study also reports each object's
Pearson/Spearman correlation with cold LOO and with the PBRF. The expected picture:
influence tracks the PBRF far better than LOO, and the first three gaps dominate.

The sweep: data sets (a regression MLP -- diabetes, concrete, energy -- and a
classifier -- digits, mnist), widths and training lengths (optimizer steps; a model
trained briefly is far from a minimiser, which is what the PBRF accounts for).
Every configuration runs :func:`influx.gaps.decompose`.

Cost per configuration: one training run, ``n_removed`` cold retrainings of the same
length (vmapped), three warm-started optimisations per removed example, and the
linearised / practical solves.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
import warnings

import numpy as np

from influx.errors import InputError
from influx.studies import _common as C

__all__ = ["GapsConfig", "GapsRow", "GapsResult", "run", "quick", "GAP_NAMES", "OBJECTS"]

OBJECTS = ("cold_loo", "warm_loo", "proximal", "pbrf", "linearized", "influence", "metagradient")
GAP_NAMES = ("warm_start_gap", "proximity_gap", "non_convergence_gap", "linearization_error", "solver_error")


@dataclasses.dataclass(frozen=True)
class GapsConfig:
    """Options of the gap-decomposition study.

    datasets: data sets to run (each regression or classification).
    data_dir, n_train, n_test: passed to :func:`influx.data.load`.
    depth, widths, activation, l2: the MLPs (one run per width).
    steps: training lengths (Adam steps from the same init; one run per value).
    learning_rate, batch_size: the training optimiser (``None`` = full batch).
    n_removed: training examples removed (a seeded sample). n_test_points: test points.
    damping: ``lambda`` of the proximal term, the PBRF and the influence estimates.
    solver: the practical iHVP solver of the last object (``direct|cg|arnoldi|lissa``).
    response_steps: inner steps of the warm-start/proximal/PBRF optimisations (``None``:
      the default of :func:`influx.gaps.decompose`, converged Newton-CG).
    seed: split, init, sample of removed examples and test points.
    """

    datasets: tuple[str, ...] = ("diabetes", "digits")
    data_dir: str | None = None
    n_train: int | None = 800
    n_test: int | None = None
    depth: int = 1
    widths: tuple[int, ...] = (16, 64)
    activation: str = "tanh"
    l2: float = 1e-3
    steps: tuple[int, ...] = (300, 3000)
    learning_rate: float = 1e-2
    batch_size: int | None = None
    n_removed: int = 20
    n_test_points: int = 50
    damping: float = 1e-3
    solver: str = "arnoldi"
    arnoldi_rank: int = 20
    cg_max_steps: int = 50
    lissa_depth: int = 200
    response_steps: int | None = None
    seed: int = 0
    dtype: str = "float64"
    progress: bool = True

    def __post_init__(self):
        s = object.__setattr__
        if isinstance(self.datasets, str):
            s(self, "datasets", tuple(d.strip() for d in self.datasets.split(",") if d.strip()))
        s(self, "datasets", tuple(self.datasets))
        if (not self.datasets or not all(isinstance(d, str) for d in self.datasets)
                or not all(d.strip() for d in self.datasets)):
            raise InputError(f"datasets must be a non-empty sequence of data set names, "
                             f"got {self.datasets!r}")
        s(self, "widths", C.check_grid(self.widths, "widths", minimum=1))
        s(self, "steps", C.check_grid(self.steps, "steps", minimum=1))
        C.check_grid((self.depth,), "depth", minimum=1)
        if self.response_steps is not None:
            C.check_grid((self.response_steps,), "response_steps", minimum=1)
        for name in ("n_removed", "n_test_points", "arnoldi_rank", "cg_max_steps", "lissa_depth"):
            C.check_grid((getattr(self, name),), name, minimum=1)
        if self.n_removed < 2 or self.n_test_points < 1:
            raise InputError("n_removed must be >= 2 (correlations) and n_test_points >= 1")
        C.check_size(self.n_train, "n_train", self.n_removed + 1,
                     f"n_removed={self.n_removed} training examples are removed, and one must remain")
        C.check_grid((self.l2,), "l2", kind=float, minimum=0.0)
        C.check_grid((self.damping,), "damping", kind=float, minimum=0.0)
        if self.batch_size is not None:
            C.check_grid((self.batch_size,), "batch_size", minimum=1)
        if self.solver not in C.SOLVERS:
            raise InputError(f"unknown solver {self.solver!r}; known: {', '.join(C.SOLVERS)}")

    @classmethod
    def quick(cls, **overrides) -> GapsConfig:
        """Small: diabetes and digits (500 examples), width 16, 200 and 1000 steps."""
        kw = dict(widths=(16,), steps=(200, 1000), n_removed=10, n_test_points=20, n_train=500)
        kw.update(overrides)
        return cls(**kw)


def quick(**overrides) -> GapsConfig:
    """Shorthand for :meth:`GapsConfig.quick`."""
    return GapsConfig.quick(**overrides)


@dataclasses.dataclass
class GapsRow:
    """One configuration: the five gaps and each object's agreement with LOO and PBRF.

    gaps: gap name -> mean |difference| of consecutive objects.
    corr_loo / corr_pbrf: object name -> {"pearson", "spearman"} against cold LOO / PBRF.
    scale: mean |cold LOO change| (the size of the effect the gaps are compared to).
    grad_norm: ``||grad J(theta_s)||`` after training (how far from a minimiser).
    """

    dataset: str
    task: str
    width: int
    steps: int
    n_params: int
    grad_norm: float
    train_loss: float
    scale: float
    gaps: dict
    corr_loo: dict
    corr_pbrf: dict
    seconds: float
    notes: list = dataclasses.field(default_factory=list)
    deltas: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        return f"{self.dataset} w{self.width} s{self.steps}"


@dataclasses.dataclass
class GapsResult:
    """Rows of the gap study; ``to_dict()``, ``to_markdown()``, ``plot(path)`` (gap bars)."""

    config: GapsConfig
    rows: list[GapsRow]
    seconds: float
    gap_names: tuple = GAP_NAMES

    def to_dict(self) -> dict:
        d = {"study": "gaps", "config": self.config, "gap_names": list(self.gap_names),
             "rows": [{k: v for k, v in dataclasses.asdict(r).items() if k != "deltas"} for r in self.rows],
             "summary": self.summary(), "seconds": self.seconds}
        return C.jsonable(d)

    def to_markdown(self) -> str:
        cfg = self.config
        g_head = ("config", "params", "grad norm", "mean abs LOO",
                  *(n.replace("_", " ") for n in self.gap_names))
        g_rows = [(r.label, r.n_params, r.grad_norm, r.scale, *(r.gaps.get(n) for n in self.gap_names))
                  for r in self.rows]
        c_head = ("config", "vs", *OBJECTS[1:])
        c_rows = []
        for r in self.rows:
            c_rows.append((r.label, "LOO (pearson)", *(r.corr_loo.get(o, {}).get("pearson")
                                                      for o in OBJECTS[1:])))
            c_rows.append((r.label, "PBRF (pearson)", *(r.corr_pbrf.get(o, {}).get("pearson")
                                                       for o in OBJECTS[1:])))
        notes = sorted({f"{r.label}: {n}" for r in self.rows for n in r.notes})  # which configuration
        return (
            f"### Gap decomposition (Bae et al. 2022): damping={cfg.damping:g}, "
            f"practical solver={cfg.solver}, "
            f"{cfg.n_removed} removed x {cfg.n_test_points} test points\n\n"
            "Mean |difference| between consecutive response objects (change of test loss): "
            "warm-start = cold LOO - warm LOO, proximity = warm LOO - proximal LOO, "
            "non-convergence = proximal LOO - PBRF, linearization = PBRF - linearised PBRF, "
            "solver = linearised PBRF - influence (practical solver).\n\n"
            + C.markdown_table(g_head, g_rows)
            + "\n\nPearson correlation of each object with cold-start LOO and with the PBRF:\n\n"
            + C.markdown_table(c_head, c_rows)
            + self._summary_line()
            + ("\n\nNotes: " + "; ".join(notes) if notes else "")
        )

    def _summary_line(self) -> str:
        if not self.rows:
            return ""
        s = self.summary()
        shares = ", ".join(f"{k.replace('_', ' ')} {v:.0%}" for k, v in s["gap_share"].items()
                           if np.isfinite(v))
        return (f"\n\nMean Pearson of influence ({self.config.solver}) with cold LOO "
                f"{C.fmt(s['influence_vs_loo'])}, with PBRF {C.fmt(s['influence_vs_pbrf'])}; of the "
                f"linearised PBRF with LOO {C.fmt(s['linearized_vs_loo'])}, with PBRF "
                f"{C.fmt(s['linearized_vs_pbrf'])}. Share of the summed gaps: {shares}.")

    __str__ = to_markdown

    def summary(self) -> dict:
        """Mean correlation of the influence estimate with LOO and with PBRF, and gap shares."""
        inf_loo = [r.corr_loo.get("influence", {}).get("pearson") for r in self.rows]
        inf_pbrf = [r.corr_pbrf.get("influence", {}).get("pearson") for r in self.rows]
        lin_loo = [r.corr_loo.get("linearized", {}).get("pearson") for r in self.rows]
        lin_pbrf = [r.corr_pbrf.get("linearized", {}).get("pearson") for r in self.rows]
        m = lambda v: float(np.nanmean(np.asarray([np.nan if x is None else x for x in v], float))) \
            if v else float("nan")
        shares = {}
        for name in self.gap_names:
            tot = [sum(r.gaps.values()) for r in self.rows]
            shares[name] = m([r.gaps[name] / t if t > 0 else np.nan for r, t in zip(self.rows, tot)])
        return {"influence_vs_loo": m(inf_loo), "influence_vs_pbrf": m(inf_pbrf),
                "linearized_vs_loo": m(lin_loo), "linearized_vs_pbrf": m(lin_pbrf), "gap_share": shares}

    def plot(self, path):
        """Grouped bars of the five gaps per configuration."""
        from influx import plots

        return plots.gap_bars(self, path)


# --------------------------------------------------------------------------- the study


def run(config: GapsConfig | None = None) -> GapsResult:
    """Runs the gap decomposition over ``config``'s grid (see the module docstring)."""
    config = GapsConfig() if config is None else config
    if not isinstance(config, GapsConfig):
        raise TypeError(f"config must be a GapsConfig, got {type(config).__name__}")
    t0 = time.perf_counter()
    rows = []
    with C.precision(config.dtype) as dtype:
        sets = {name: C.load_dataset(name, data_dir=config.data_dir, n_train=_n(config.n_train, name),
                                     n_test=config.n_test, seed=config.seed, dtype=dtype)
                for name in config.datasets}  # load all first: bad names fail before any training
        for name, ds in sets.items():
            C.check_size(ds.n_train, f"the training split of {name!r}", config.n_removed + 1,
                         f"n_removed={config.n_removed} training examples are removed, and one must remain")
        grid = list(itertools.product(config.datasets, config.widths, config.steps))
        bar = C.progress(grid, enabled=config.progress, desc="gaps", unit="config")
        for name, width, steps in bar:
            bar.set_postfix_str(f"{name} width={width} steps={steps}")
            rows.append(_one_config(config, sets[name], width, steps))
    return GapsResult(config=config, rows=rows, seconds=time.perf_counter() - t0)


def _n(n_train, name):
    """``n_train`` capped for the small bundled sets (diabetes has 442 examples in all)."""
    if n_train is None:
        return None
    caps = {"iris": 120, "diabetes": 353}
    return min(n_train, caps[name]) if name in caps else n_train


def _one_config(cfg: GapsConfig, ds, width: int, steps: int) -> GapsRow:
    import jax
    import jax.numpy as jnp

    import influx
    from influx import models

    t0 = time.perf_counter()
    train = tuple(jnp.asarray(a) for a in ds.train)
    rng = np.random.default_rng(cfg.seed)
    n, nt = ds.n_train, ds.n_test
    removed = np.sort(rng.choice(n, size=min(cfg.n_removed, n), replace=False))
    t_idx = np.sort(rng.choice(nt, size=min(cfg.n_test_points, nt), replace=False))
    test = tuple(jnp.asarray(a[t_idx]) for a in ds.test)
    loss_fn = C.loss_for(ds.task)
    model = models.mlp(cfg.depth, width, ds.output_dim, cfg.activation)
    obj = influx.Objective(C.apply_for(model), loss_fn, l2=cfg.l2)
    init = models.init(model, train[0][:1], seed=cfg.seed)
    opt = C.adam(cfg.learning_rate)
    params = models.train(model, loss_fn, init, train, l2=cfg.l2, optimizer=opt, steps=steps,
                          batch_size=cfg.batch_size, seed=cfg.seed).params
    grad_norm = float(jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree_util.tree_leaves(
        jax.grad(obj)(params, train)))))
    n_params = sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(params))
    solver = C.make_solver(cfg.solver, rank=min(cfg.arnoldi_rank, n_params), max_steps=cfg.cg_max_steps,
                           cg_tol=1e-4, lissa_depth=cfg.lissa_depth)
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        g = _decompose(cfg, obj, init, params, train, test, removed, solver, opt, steps)
    for w in caught:
        notes.append(_note(str(w.message)))
    if len(g.dropped):
        notes.append(f"{len(g.dropped)} removed examples dropped (non-finite solve)")
    deltas = {k: np.asarray(v, np.float64) for k, v in g.deltas.items()}
    cold = deltas["cold_loo"]
    gaps = {t.name: float(t.mean_abs) for t in g.terms}
    keep = ("pearson", "spearman")
    corr_loo = {o: {k: float(g.vs_cold[o][k]) for k in keep} for o in OBJECTS if o in g.vs_cold}
    corr_pbrf = {o: {k: float(g.vs_pbrf[o][k]) for k in keep} for o in OBJECTS if o in g.vs_pbrf}
    notes.extend(g.notes)  # each names the object's configuration (solver, steps, tol)
    return GapsRow(
        dataset=ds.name, task=ds.task, width=width, steps=steps, n_params=n_params, grad_norm=grad_norm,
        train_loss=float(jnp.mean(obj.per_example_loss(params, train))),
        scale=float(np.nanmean(np.abs(cold))), gaps=gaps, corr_loo=corr_loo, corr_pbrf=corr_pbrf,
        seconds=time.perf_counter() - t0, notes=sorted(set(notes)),
        deltas={k: np.asarray(v).tolist() for k, v in deltas.items()})


def _note(msg: str) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= 120 else msg[:117] + "..."


def _decompose(cfg, obj, init, params, train, test, removed, solver, opt, steps):
    """Runs :func:`influx.gaps.decompose`; returns it and the six ``(n_removed, n_test)`` arrays."""
    from influx import gaps as _gaps

    kw = {} if cfg.response_steps is None else {"steps": cfg.response_steps}
    g = _gaps.decompose(obj, init, params, train, test, removed, damping=cfg.damping, solver=solver,
                        train_optimizer=opt, train_steps=steps, train_batch_size=cfg.batch_size,
                        seed=cfg.seed, baseline="retrain", **kw)
    return g
