"""Fragility of influence functions in deep networks (Basu, Pope and Feizi, ICLR 2021).

Question: does the influence function predict what actually happens when a training
example is removed, and how does that depend on the network's depth, width and weight
decay?

Protocol, for every configuration (depth, width, weight decay) of the grid:

1. Train ``MLP(depth x width)`` on the training split to a minimiser ``theta_s`` of
   ``J(theta) = mean_i L(z_i, theta) + l2/2 ||theta||^2``: optax (Adam) warm-up, then
   full-batch L-BFGS until ``||grad J|| < tol`` (the reported ``grad_norm`` says how
   close it got; influence functions assume a minimiser).
2. Pick test points: the one with the highest test loss, plus ``n_test_points - 1``
   others drawn at random (seeded).
3. Predicted effect of removing training example ``m`` on the test loss ``f_j``
   (influx's sign: ``f(theta without m) - f(theta_s)``)::

       I_jm = (1/N) grad f_j(theta_s)^T (H + lambda I)^-1 grad L(z_m, theta_s)

   with the exact Hessian ``H`` of ``J`` (``kind="hessian"``, as in the paper) and a
   small damping ``lambda``, solved directly (dense Cholesky) for Iris-sized models.
   If ``H + lambda I`` is not positive definite (an undamped non-convex net, or one
   without weight decay) the damping is raised tenfold until it is; the damping used is
   reported per configuration.
4. For each test point, the ``top_k`` training examples by ``|I_jm|`` are removed one at
   a time and the model is retrained from ``theta_s`` (warm-start leave-one-out), giving
   the actual change ``f_j(theta_-m) - f_j(theta_s)``.
5. Report, per configuration, the Pearson and Spearman correlation between predicted
   and actual changes for the highest-loss test point, and their mean / spread / range
   across all selected test points.

Cost per configuration: one dense Hessian (``P`` Hessian-vector products over the
training set, ``P^2`` memory) and ``<= n_test_points * top_k`` leave-one-out retrainings
(L-BFGS, one after the other, with the default ``loo_method="lbfgs"``; Newton-CG vmapped
over the removed examples by :func:`influx.response.loo` with ``loo_method="response"``).

Failure modes: deep nets without weight decay may not reach ``tol`` (see
``grad_norm``/``converged`` in the rows) -- the paper's point is precisely that the
influence function is then unreliable. Without weight decay (``l2 = 0``) a classifier
that separates its training set (Iris does) has no minimiser at all: L-BFGS drives the
training loss towards 0, every per-example gradient vanishes with it, the warm-start
retraining stops at once (its gradient is already below ``tol``) and both the predicted
and the actual changes are ~0 -- the correlations are then undefined and reported as
``nan`` (``n_valid`` counts the test points where they are defined). Very small actual
changes (well-fit test points) make correlations noisy.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import numpy as np

from influx.errors import InputError, SolveError
from influx.studies import _common as C

__all__ = ["FragilityConfig", "FragilityRow", "FragilityResult", "run", "quick"]


_MIN_TOP_K = 3


@dataclasses.dataclass(frozen=True)
class FragilityConfig:
    """Options of the fragility study (defaults: the full Iris grid).

    dataset, data_dir, n_train, n_test: passed to :func:`influx.data.load`.
    depths: numbers of hidden layers (each >= 1). widths: hidden units per layer.
    weight_decays: ``l2`` values; ``0.0`` is "weight decay off".
    activation: hidden activation (smooth, so the Hessian exists everywhere).
    kind: ``"hessian"`` (the paper) or ``"gnh"``. damping: ``lambda`` added to the
      curvature (raised tenfold, up to ``max_damping``, if not positive definite).
    solver: iHVP solver name (``direct`` for small models; ``cg``/``arnoldi``/``lissa``).
    top_k: training examples per test point whose removal is simulated.
    n_test_points: the highest-loss test point plus ``n_test_points - 1`` random ones.
    train_steps, learning_rate: Adam warm-up; then full-batch L-BFGS up to ``lbfgs_steps``
      steps or until ``||grad J|| < tol``.
    loo_method: ``"lbfgs"`` (default: :func:`influx.models.train_to_convergence` from
      ``theta_s`` on the ``N - 1`` remaining examples with weight decay ``l2 N/(N-1)``,
      one removed example after the other, L-BFGS to ``tol``) or ``"response"``
      (:func:`influx.response.loo`: the same objective, vmapped over the removed
      examples, with its default inner solver -- full-batch Newton-CG, at most
      ``loo_steps`` steps, an example stops as soon as its gradient norm reaches ``tol``).
      How the two compare in accuracy and time is measured in ``benchmarks/README.md``.
    seed: seeds the data split, initialisation and test-point sample.
    dtype: ``"float64"`` (default; LOO differences are tiny) or ``"float32"``.
    progress: show tqdm progress bars on stderr.
    """

    dataset: str = "iris"
    data_dir: str | None = None
    n_train: int | None = None
    n_test: int | None = None
    depths: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    widths: tuple[int, ...] = (8,)
    weight_decays: tuple[float, ...] = (0.0, 1e-3)
    activation: str = "tanh"
    kind: str = "hessian"
    damping: float = 1e-3
    max_damping: float = 10.0
    solver: str = "direct"
    top_k: int = 10
    n_test_points: int = 5
    train_steps: int = 1000
    learning_rate: float = 1e-2
    lbfgs_steps: int = 3000
    tol: float = 1e-7
    loo_method: str = "lbfgs"
    loo_steps: int = 300
    seed: int = 0
    dtype: str = "float64"
    progress: bool = True

    def __post_init__(self):
        s = object.__setattr__
        s(self, "depths", C.check_grid(self.depths, "depths", minimum=1))
        s(self, "widths", C.check_grid(self.widths, "widths", minimum=1))
        s(self, "weight_decays", C.check_grid(self.weight_decays, "weight_decays", kind=float, minimum=0.0))
        for name in ("top_k", "n_test_points", "train_steps", "lbfgs_steps", "loo_steps"):
            C.check_grid((getattr(self, name),), name, minimum=1 if name != "train_steps" else 0)
        if self.kind not in ("hessian", "gnh"):
            raise InputError(f"kind must be 'hessian' or 'gnh', got {self.kind!r}")
        if self.solver not in C.SOLVERS:
            raise InputError(f"unknown solver {self.solver!r}; known: {', '.join(C.SOLVERS)}")
        if self.loo_method not in ("response", "lbfgs"):
            raise InputError(f"loo_method must be 'response' or 'lbfgs', got {self.loo_method!r}")
        if not (np.isfinite(self.damping) and self.damping >= 0):
            raise InputError(f"damping must be finite and >= 0, got {self.damping!r}")
        if self.top_k < _MIN_TOP_K:
            raise InputError(f"top_k={self.top_k} is too small: a correlation over fewer than "
                             f"{_MIN_TOP_K} removed examples is undefined or trivially +-1")
        C.check_size(self.n_train, "n_train", self.top_k,
                     f"top_k={self.top_k} training examples are removed per test point")

    @classmethod
    def quick(cls, **overrides) -> FragilityConfig:
        """A small grid for smoke runs and the demo: depths 1 and 3, width 8, wd on/off."""
        kw = dict(depths=(1, 3), widths=(8,), top_k=8, n_test_points=3, train_steps=500,
                  lbfgs_steps=1500)
        kw.update(overrides)
        return cls(**kw)


def quick(**overrides) -> FragilityConfig:
    """Shorthand for :meth:`FragilityConfig.quick`."""
    return FragilityConfig.quick(**overrides)


@dataclasses.dataclass
class FragilityRow:
    """One configuration's outcome.

    pearson / spearman: for the highest-loss test point.
    *_mean / *_std / *_min / *_max: across the ``n_points`` selected test points, of
      which ``n_valid`` have a defined correlation (a test point the model fits perfectly
      has zero gradient: constant predictions, correlation ``nan``).
    grad_norm / converged: ``||grad J(theta_s)||`` after training and whether it is < tol.
    loo_converged: fraction of the leave-one-out retrainings that reached ``tol``.
    damping: the damping actually used (may exceed the requested one, see the module doc).
    points: per test point ``{"test_index", "test_loss", "pred", "actual", "train_index"}``
      (the data behind the scatter plot; left out of the markdown table).
    """

    depth: int
    width: int
    l2: float
    n_params: int
    train_loss: float
    test_accuracy: float | None
    grad_norm: float
    converged: bool
    damping: float
    pearson: float
    spearman: float
    pearson_mean: float
    pearson_std: float
    pearson_min: float
    pearson_max: float
    spearman_mean: float
    spearman_std: float
    n_points: int
    n_valid: int
    loo_converged: float
    seconds: float
    points: list = dataclasses.field(default_factory=list, repr=False)


_HEADER = ("depth", "width", "l2", "params", "grad norm", "damping", "pearson*", "spearman*",
           "pearson mean", "pearson std", "pearson min", "pearson max", "spearman mean", "valid pts",
           "train loss", "test acc")


@dataclasses.dataclass
class FragilityResult:
    """Rows of the fragility study plus the config that produced them.

    ``to_dict()`` is JSON-ready; ``to_markdown()``/``str()`` give the table;
    ``plot(path)`` writes the predicted-vs-actual scatter for a few configurations.
    """

    config: FragilityConfig
    rows: list[FragilityRow]
    seconds: float

    def to_dict(self) -> dict:
        return C.jsonable({"study": "fragility", "config": self.config, "rows": self.rows,
                           "summary": self.summary(), "seconds": self.seconds})

    def to_markdown(self) -> str:
        cfg = self.config
        body = C.markdown_table(_HEADER, [
            (r.depth, r.width, r.l2, r.n_params, r.grad_norm, r.damping, r.pearson, r.spearman,
             r.pearson_mean, r.pearson_std, r.pearson_min, r.pearson_max, r.spearman_mean,
             f"{r.n_valid}/{r.n_points}", r.train_loss, r.test_accuracy) for r in self.rows])
        return (
            f"### Fragility (Basu et al. 2021): {cfg.dataset}, kind={cfg.kind}, solver={cfg.solver}, "
            f"top-{cfg.top_k} of {self.rows[0].n_points if self.rows else 0} test points\n\n"
            f"Correlation between predicted (influence) and actual (warm-start LOO, {cfg.loo_method}) "
            "change of the test loss; `*` = highest-loss test point, mean/std/min/max across "
            "test points.\n\n" + body + self._summary_line()
        )

    def _summary_line(self) -> str:
        if not self.rows:
            return ""
        parts = []
        for l2, by_d in self.summary()["by_l2_depth"].items():
            cells = ", ".join(f"depth {d}: {C.fmt(v['pearson_star'])} / {C.fmt(v['pearson_mean'])}"
                              for d, v in by_d.items())
            parts.append(f"l2={l2:g}: {cells}")
        spread = C.fmt(_nan(np.nanmean, [r.pearson_std for r in self.rows]))
        return ("\n\nPearson, highest-loss test point / mean across test points: " + "; ".join(parts)
                + f". Mean spread (std) across test points: {spread}.")

    __str__ = to_markdown

    def summary(self) -> dict:
        """Mean Pearson/Spearman across test points, by weight decay and depth.

        ``{"by_l2_depth": {l2: {depth: {...}}}, "by_depth": ..., "by_l2": ...}``; each leaf
        holds ``pearson_mean``, ``spearman_mean`` (averaged over widths, ``nan`` skipped)
        and ``pearson_star`` (the highest-loss test point).
        """

        def agg(rs):
            m = lambda xs: _nan(np.nanmean, xs)
            return {"pearson_mean": m([r.pearson_mean for r in rs]),
                    "spearman_mean": m([r.spearman_mean for r in rs]),
                    "pearson_star": m([r.pearson for r in rs])}

        def group(rows, attr):
            out = {}
            for r in rows:
                out.setdefault(getattr(r, attr), []).append(r)
            return dict(sorted(out.items()))

        return {"by_l2_depth": {l2: {d: agg(g) for d, g in group(rs, "depth").items()}
                                for l2, rs in group(self.rows, "l2").items()},
                "by_depth": {d: agg(g) for d, g in group(self.rows, "depth").items()},
                "by_l2": {l2: agg(g) for l2, g in group(self.rows, "l2").items()}}

    def plot(self, path, *, max_panels: int = 6):
        """Predicted vs actual scatter, one panel per configuration (up to ``max_panels``)."""
        from influx import plots

        return plots.fragility_scatter(self, path, max_panels=max_panels)


# --------------------------------------------------------------------------- the study


def run(config: FragilityConfig | None = None) -> FragilityResult:
    """Runs the fragility study over ``config``'s grid (see the module docstring)."""
    config = FragilityConfig() if config is None else config
    if not isinstance(config, FragilityConfig):
        raise TypeError(f"config must be a FragilityConfig, got {type(config).__name__}")
    t0 = time.perf_counter()
    with C.precision(config.dtype) as dtype:
        ds = C.load_dataset(config.dataset, data_dir=config.data_dir, n_train=config.n_train,
                            n_test=config.n_test, seed=config.seed, dtype=dtype)
        C.check_size(ds.n_train, f"the training split of {config.dataset!r}", config.top_k,
                     f"top_k={config.top_k} training examples are removed per test point")
        grid = list(itertools.product(config.depths, config.widths, config.weight_decays))
        rows = []
        bar = C.progress(grid, enabled=config.progress, desc="fragility", unit="config")
        for depth, width, l2 in bar:
            bar.set_postfix_str(f"depth={depth} width={width} l2={l2:g}")
            rows.append(_one_config(config, ds, depth, width, l2))
    return FragilityResult(config=config, rows=rows, seconds=time.perf_counter() - t0)


def _one_config(cfg: FragilityConfig, ds, depth: int, width: int, l2: float) -> FragilityRow:
    import jax
    import jax.numpy as jnp

    import influx
    from influx import metrics, models

    t0 = time.perf_counter()
    train = tuple(jnp.asarray(a) for a in ds.train)
    test = tuple(jnp.asarray(a) for a in ds.test)
    loss_fn = C.loss_for(ds.task)
    model = models.mlp(depth, width, ds.output_dim, cfg.activation)
    apply = C.apply_for(model)
    obj = influx.Objective(apply, loss_fn, l2=l2)
    params0 = models.init(model, train[0][:1], seed=cfg.seed)
    fit = models.train_to_convergence(
        model, loss_fn, params0, train, l2=l2, optimizer=C.adam(cfg.learning_rate),
        steps=cfg.train_steps, seed=cfg.seed, tol=cfg.tol, max_lbfgs_steps=cfg.lbfgs_steps)
    params = fit.params
    n_params = sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(params))

    # test points: the highest-loss one, then a seeded sample of the others
    test_losses = np.asarray(obj.per_example_loss(params, test))
    rng = np.random.default_rng(cfg.seed)
    worst = int(np.argmax(test_losses))
    others = np.setdiff1d(np.arange(len(test_losses)), [worst])
    n_pts = min(cfg.n_test_points, len(test_losses))
    sel = np.r_[worst, rng.choice(others, size=n_pts - 1, replace=False)].astype(int)
    test_sel = tuple(a[sel] for a in test)

    scores, damping = _influence_with_fallback(cfg, obj, params, train, test_sel)
    k = min(cfg.top_k, scores.shape[1])
    top = np.argsort(-np.abs(scores), axis=1, kind="stable")[:, :k]  # (n_pts, k)
    removed = np.unique(top)
    actual, loo_conv = _loo(cfg, obj, model, loss_fn, params, train, test_sel, removed)  # (n_removed, n_pts)
    pos = {int(m): i for i, m in enumerate(removed)}

    pear, spear, points = [], [], []
    for j in range(n_pts):
        idx = top[j]
        pred = scores[j, idx]
        act = actual[[pos[int(m)] for m in idx], j]
        c = metrics.correlations(pred, act)
        pear.append(c.pearson)
        spear.append(c.spearman)
        points.append({"test_index": int(sel[j]), "test_loss": float(test_losses[sel[j]]),
                       "pred": pred.tolist(), "actual": act.tolist(), "train_index": idx.tolist(),
                       "pearson": c.pearson, "spearman": c.spearman})
    pear, spear = np.asarray(pear), np.asarray(spear)
    acc = None
    if ds.task == "classification":
        acc = float(np.mean(np.argmax(np.asarray(apply(params, test[0])), -1) == np.asarray(test[1])))
    return FragilityRow(
        depth=depth, width=width, l2=l2, n_params=n_params,
        train_loss=float(np.mean(np.asarray(obj.per_example_loss(params, train)))),
        test_accuracy=acc, grad_norm=float(fit.grad_norm), converged=bool(fit.converged),
        damping=damping, pearson=float(pear[0]), spearman=float(spear[0]),
        pearson_mean=_nan(np.nanmean, pear), pearson_std=_nan(np.nanstd, pear),
        pearson_min=_nan(np.nanmin, pear), pearson_max=_nan(np.nanmax, pear),
        spearman_mean=_nan(np.nanmean, spear), spearman_std=_nan(np.nanstd, spear),
        n_points=n_pts, n_valid=int(np.isfinite(pear).sum()), loo_converged=loo_conv,
        seconds=time.perf_counter() - t0, points=points)


def _nan(fn, a) -> float:
    a = np.asarray(a, dtype=float)
    return float(fn(a)) if np.isfinite(a).any() else float("nan")


def _influence_with_fallback(cfg, obj, params, train, test_sel):
    """Influence scores; raises damping tenfold while the curvature is not positive definite."""
    from influx.attribution import influence

    damping = float(cfg.damping)
    while True:
        solver = C.make_solver(cfg.solver)
        try:
            s = influence(obj, params, train, test_sel, kind=cfg.kind, damping=damping,
                                 solver=solver)
            s = np.asarray(s)
            if np.all(np.isfinite(s)):
                return s, damping
            err = ValueError("non-finite influence scores")
        except (ValueError, RuntimeError) as e:  # not positive definite / not converged
            err = e
        nxt = max(damping * 10.0, 1e-6)
        if nxt > cfg.max_damping:
            raise SolveError(f"influence failed even with damping={damping:g}: {err}") from err
        damping = nxt


def _loo(cfg, obj, model, loss_fn, params, train, test_sel, removed):
    """Actual change of each selected test loss for each removed example: (n_removed, n_test)."""
    import jax.numpy as jnp

    if cfg.loo_method == "response":
        from influx import response

        r = response.loo(obj, params, train, np.asarray(removed), test=test_sel, init=None,
                         steps=cfg.loo_steps, tol=cfg.tol, warn=False)
        return np.asarray(r.delta), float(np.mean(np.asarray(r.converged)))

    from influx import models

    base = np.asarray(obj.per_example_loss(params, test_sel))
    out = np.zeros((len(removed), len(base)))
    x, y = (np.asarray(a) for a in train)
    n = x.shape[0]
    # J - L_m / N = (N-1)/N [mean over the N-1 kept examples + N/(N-1) l2/2 ||theta||^2]:
    # the same minimiser as influx's eps = -1/N convention.
    l2_loo = obj.l2 * n / (n - 1)
    conv = []
    bar = C.progress(removed, enabled=cfg.progress, desc="  LOO retraining", unit="ex")
    for i, m in enumerate(bar):
        keep = np.delete(np.arange(x.shape[0]), int(m))
        kept = (jnp.asarray(x[keep]), jnp.asarray(y[keep]))
        fit = models.train_to_convergence(model, loss_fn, params, kept, l2=l2_loo, steps=0, tol=cfg.tol,
                                          max_lbfgs_steps=cfg.lbfgs_steps)
        out[i] = np.asarray(obj.per_example_loss(fit.params, test_sel)) - base
        conv.append(bool(fit.converged))
    return out, float(np.mean(conv))
