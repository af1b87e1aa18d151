"""Linear datamodeling score (LDS) of every attribution method against subset retraining.

Question: which attribution method predicts what happens when *sets* of training examples
are removed, and at what cost? On one trained model (the run ``models.train(init,
optimizer, steps, batch_size, seed)``), every method gives ``(n_test, N)`` scores in
influx's sign (predicted change of the test measurement when ``m`` is removed):

* ``grad_dot``: ``(1/N) grad f_t^T grad L_m`` (no curvature);
* ``tracin``: gradient dot products summed over checkpoints of the run (TracIn-CP);
* ``influence_cg`` / ``influence_ekfac`` / ``influence_arnoldi`` / ``influence_lissa``:
  ``influx.influence`` (Gauss-Newton, damping ``lambda``) with that iHVP solver;
* ``linearized_pbrf``: the first-order PBRF, influence with an exact (direct) solve;
* ``metagradients``: ``-d f_t(theta_T(w)) / d w_m`` through the training run itself.

Ground truth: for each drop fraction ``alpha`` (default 1%, 5%, 10%, 50%), ``M`` random
subsets ``S_s`` of ``round(alpha N)`` examples are removed (weight 0) and the *same* run
is repeated from the same initialisation, schedule and seed (``influx.response.retrain``
when available, else a vmapped replay of :mod:`influx.metagrad`): ``actual[s, t] =
f_t(theta_T(1 - 1_S)) - f_t(theta_T(1))``. The LDS of a method (Park et al. 2023) is

    LDS = mean_t spearman_s( sum_{m in S_s} score[t, m],  actual[s, t] ),

with a bootstrap 95% interval over test points. Cost is reported in seconds and in
training-run equivalents (seconds / seconds of one training run, both measured the same
way: ``warm_timing`` repeats each call and keeps the compiled second one).

Problems: ``digits`` (MLP on scikit-learn's bundled digits), ``mnist`` (MLP on MNIST from
``data_dir``), ``mnist_cnn`` (:class:`influx.models.CNN` on MNIST images).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from functools import partial
from typing import NamedTuple

import jax
import numpy as np

from influx.errors import InputError
from influx.studies import _common as C
from influx.validation import check_fraction

__all__ = ["LDSConfig", "LDSEstimate", "LDSResult", "LDSRow", "METHODS", "PROBLEMS", "lds", "plot",
           "quick", "run", "subsets"]

METHODS = ("grad_dot", "tracin", "influence_cg", "influence_ekfac", "influence_arnoldi", "influence_lissa",
           "linearized_pbrf", "metagradients")
PROBLEMS = ("digits", "mnist", "mnist_cnn")
FRACTIONS = (0.01, 0.05, 0.1, 0.5)
OPTIMIZERS = ("sgd", "momentum", "adam")
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.05, "adam": 1e-2}
MNIST_SGD_LR = 0.03


# --------------------------------------------------------------------------- pieces
def _check_alpha(alpha) -> float:
    return check_fraction(alpha, "alpha (drop fraction)")


def subsets(n: int, alpha: float, m: int, *, seed=0) -> np.ndarray:
    """``(m, n)`` boolean masks of *removed* examples: each row removes a uniformly random
    set of ``max(1, round(alpha n))`` examples (rows independent, seeded).

    ``alpha`` must be in (0, 1) and leave at least one example; ``m >= 2`` (an LDS needs
    two subsets to rank).
    """
    a = _check_alpha(alpha)
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 2:
        raise InputError(f"the number of subsets M must be an integer >= 2 (LDS ranks subsets), got {m!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise InputError(f"n must be an integer >= 2, got {n!r}")
    k = max(1, int(round(a * n)))
    if k >= n:
        raise InputError(f"alpha={a} removes all {n} examples")
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random((int(m), int(n))), axis=1)[:, :k]
    masks = np.zeros((int(m), int(n)), bool)
    np.put_along_axis(masks, order, True, axis=1)
    return masks


class LDSEstimate(NamedTuple):
    """LDS with a bootstrap interval over test points.

    score: mean over valid test points of the per-test Spearman correlation. low, high:
    the ``level`` percentile interval of that mean over ``n_boot`` resamples of test points.
    per_test: (n_test,) correlations (NaN where undefined). n_valid: defined test points.
    """

    score: float
    low: float
    high: float
    per_test: np.ndarray
    n_valid: int


def lds(scores, removed, actual, *, n_boot: int = 1000, level: float = 0.95, seed=0) -> LDSEstimate:
    """LDS of ``scores`` ``(n_test, N)`` against ``actual`` ``(M, n_test)`` effects of removing
    the subsets ``removed`` ``(M, N)`` (boolean masks), with a bootstrap interval.

    Uses :func:`influx.metrics.linear_datamodeling_score` for the score; the interval
    resamples test points with replacement (``n_boot`` times) and takes the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of the mean. ``M < 2`` and
    ``level`` outside (0, 1) raise ``InputError``.
    """
    from influx import metrics

    removed = np.asarray(removed)
    if removed.ndim != 2 or removed.shape[0] < 2:
        raise InputError(f"removed must be (M, N) masks with M >= 2 subsets, got shape {removed.shape}")
    if not 0 < level < 1:
        raise InputError(f"level must be in (0, 1), got {level!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise InputError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    try:
        r = metrics.linear_datamodeling_score(scores, removed, actual)
    except ValueError as e:
        raise InputError(str(e)) from e
    valid = r.per_test[np.isfinite(r.per_test)]
    if valid.size == 0:
        return LDSEstimate(float("nan"), float("nan"), float("nan"), r.per_test, 0)
    rng = np.random.default_rng(seed)
    means = valid[rng.integers(0, valid.size, (int(n_boot), valid.size))].mean(axis=1)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return LDSEstimate(float(r.score), float(lo), float(hi), r.per_test, int(valid.size))


# --------------------------------------------------------------------------- retraining
@partial(jax.jit, static_argnames=("obj", "opt", "f", "steps", "batch_size"))
def _replay_many(init, x, y, test, ws, key, *, obj, opt, f, steps, batch_size):
    from influx import metagrad

    n = jax.tree_util.tree_leaves(x)[0].shape[0]
    idx = None if batch_size is None else metagrad.minibatch_indices(n, batch_size=batch_size, steps=steps,
                                                                      seed=key)

    def one(w):
        theta = metagrad._run(obj, opt, init, x, y, w, idx, steps=steps, segment=None)
        return jax.vmap(lambda ex: f(theta, ex))(test)

    return jax.vmap(one)(ws)


def retrain_delta(obj, init, train, test, weights, *, optimizer, steps, batch_size=None, seed=0,
                  measurement=None, chunk: int = 32) -> np.ndarray:
    """``(M, n_test)`` change of each test measurement when the run is repeated with each row
    of ``weights`` ``(M, N)`` instead of all ones.

    ``influx.response.retrain`` when it exists; otherwise the weighted replay of
    :mod:`influx.metagrad` (the same run as ``models.train`` at ``w = 1``), vmapped over
    ``chunk`` weight vectors at a time. Non-finite results raise ``SolveError``.
    """
    import jax
    import jax.numpy as jnp

    from influx import response
    from influx.errors import SolveError

    weights = np.asarray(weights)
    retrain = getattr(response, "retrain", None)
    if retrain is not None:
        kw = {} if measurement is None else {"measurement": measurement}
        r = retrain(obj, init, train, weights, test=test, optimizer=optimizer, steps=steps,
                    batch_size=batch_size, seed=seed, **kw)
        delta = np.asarray(r.delta)
    else:
        from influx import metagrad
        from influx.measurements import bind as _bind_measurement

        n = weights.shape[1]
        f = _bind_measurement(obj, measurement)
        bs = metagrad._check_batch_size(batch_size, n)
        x, y = (jnp.asarray(a) for a in train)
        test = jax.tree_util.tree_map(jnp.asarray, tuple(test))
        dt = metagrad._float_dtype(init)
        key = jax.random.key(seed)
        call = partial(_replay_many, init, x, y, test, key=key, obj=obj, opt=optimizer, f=f, steps=steps,
                       batch_size=bs)
        base = np.asarray(call(jnp.ones((1, n), dt)))[0]
        out = []
        for a in range(0, weights.shape[0], chunk):
            w = weights[a:a + chunk]
            pad = chunk - w.shape[0] if weights.shape[0] > chunk else 0
            w = np.concatenate([w, np.ones((pad, n))]) if pad else w
            out.append(np.asarray(call(jnp.asarray(w, dt)))[: w.shape[0] - pad])
        delta = np.concatenate(out) - base
    if not np.all(np.isfinite(delta)):
        raise SolveError(f"subset retraining gave non-finite test measurements in "
                         f"{int((~np.all(np.isfinite(delta), axis=1)).sum())} of {delta.shape[0]} runs "
                         "(the run diverges for some subsets: lower the learning rate)")
    return delta


# --------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class LDSConfig:
    """Options of the LDS study.

    problem: ``digits`` | ``mnist`` | ``mnist_cnn``. data_dir, n_train, n_test: data.
    width, depth, channels, activation, l2: the model (MLP, or CNN channels).
    optimizer, learning_rate, steps, batch_size: the training run: ``"sgd"`` (default),
      ``"momentum"`` (SGD with momentum 0.9) or ``"adam"`` (with ``eps_root=1e-16``,
      differentiable everywhere); ``learning_rate=None``: SGD 0.1 (0.03 on MNIST), momentum
      0.05, Adam 0.01; ``batch_size=None``: full batch. Plain SGD well inside its stable step
      size is the default because that run is nearly linear in the example weights: the
      metagradient LDS at 1% / 5% drop measured 0.986 / 0.982 on digits (SGD 0.1, N=400, 200
      steps), 0.947 / 0.898 at SGD 0.3, 0.64 / 0.64 with Adam (its first steps are close to
      ``sign(g)``: locally flat in the weights, but a finite removal flips the signs of small
      gradient coordinates); on MNIST (N=500, 100 steps) 0.977 / 0.973 at SGD 0.03 and 0.58 /
      0.47 at 0.3 (the edge of stability of full-batch GD on 784 inputs).
    fractions: drop fractions ``alpha`` in (0, 1). n_subsets: ``M`` subsets per fraction.
    n_test_points: test measurements (test losses). methods: from :data:`METHODS`.
    damping: ``lambda`` of the influence methods (GNH). arnoldi_rank, lissa_depth,
    cg_max_steps: solver options. tracin_checkpoints: checkpoints of the run for TracIn.
    n_boot: bootstrap resamples. warm_timing: time each method's second (compiled) call.
    """

    problem: str = "digits"
    data_dir: str | None = None
    n_train: int | None = 500
    n_test: int | None = None
    width: int = 32
    depth: int = 1
    channels: tuple[int, ...] = (4, 8)
    activation: str = "tanh"
    l2: float = 1e-3
    optimizer: str = "sgd"
    learning_rate: float | None = None
    steps: int = 300
    batch_size: int | None = None
    fractions: tuple[float, ...] = FRACTIONS
    n_subsets: int = 64
    n_test_points: int = 50
    methods: tuple[str, ...] = METHODS
    damping: float = 1e-3
    arnoldi_rank: int = 50
    lissa_depth: int = 500
    cg_max_steps: int = 500
    tracin_checkpoints: int = 5
    n_boot: int = 1000
    warm_timing: bool = False
    seed: int = 0
    dtype: str = "float64"
    progress: bool = True

    def __post_init__(self):
        s = object.__setattr__
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.problem not in PROBLEMS:
            raise InputError(f"problem must be one of {PROBLEMS}, got {self.problem!r}")
        if isinstance(self.methods, str):
            s(self, "methods", tuple(m.strip() for m in self.methods.split(",") if m.strip()))
        s(self, "methods", tuple(self.methods))
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise InputError(f"methods must be a non-empty subset of {METHODS}, got {self.methods!r}")
        try:
            fr = C.check_grid(self.fractions, "fractions", kind=float)
        except ValueError as e:
            raise InputError(str(e)) from e
        s(self, "fractions", tuple(_check_alpha(a) for a in fr))
        if isinstance(self.n_subsets, bool) or not isinstance(self.n_subsets, (int, np.integer)) \
                or self.n_subsets < 2:
            raise InputError(f"n_subsets (M) must be an integer >= 2, got {self.n_subsets!r}")
        for name in ("width", "depth", "steps", "n_test_points", "arnoldi_rank", "lissa_depth",
                     "cg_max_steps", "tracin_checkpoints", "n_boot"):
            try:
                C.check_grid((getattr(self, name),), name, minimum=1)
            except ValueError as e:
                raise InputError(str(e)) from e
        s(self, "channels", tuple(int(c) for c in self.channels))
        if self.batch_size is not None:
            C.check_grid((self.batch_size,), "batch_size", minimum=1)
        for name in ("l2", "damping"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and np.isfinite(v) and v >= 0):
                raise InputError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.learning_rate is None:
            lr = DEFAULT_LR[self.optimizer]
            if self.optimizer == "sgd" and self.problem != "digits":
                lr = MNIST_SGD_LR
            s(self, "learning_rate", lr)
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise InputError(f"learning_rate must be > 0, got {self.learning_rate!r}")

    @classmethod
    def quick(cls, **overrides) -> LDSConfig:
        """Small: 200 digits, width 16, 100 steps, M = 16 subsets, 20 test points."""
        kw = dict(n_train=200, width=16, steps=100, n_subsets=16, n_test_points=20, arnoldi_rank=20,
                  lissa_depth=200, n_boot=200)
        kw.update(overrides)
        return cls(**kw)


def quick(**overrides) -> LDSConfig:
    """Shorthand for :meth:`LDSConfig.quick`."""
    return LDSConfig.quick(**overrides)


# --------------------------------------------------------------------------- results
@dataclasses.dataclass
class LDSRow:
    """One method: cost and LDS per drop fraction (``{"alpha": {score, low, high, n_valid}}``)."""

    method: str
    seconds: float | None
    train_equiv: float | None
    lds: dict
    notes: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class LDSResult:
    """The LDS study on one problem: ``to_dict()``, ``to_markdown()``, ``plot(path)``.

    train_seconds: one training run (the cost unit). retrain_seconds: per fraction, the
    ``M`` subset retrainings. effect: per fraction, mean ``|actual|`` (the size of what is
    predicted). grad_norm: ``||grad J||`` of the trained model (how far from a minimiser).
    """

    config: LDSConfig
    problem: str
    n_train: int
    n_test: int
    n_params: int
    train_seconds: float
    retrain_seconds: dict
    effect: dict
    grad_norm: float
    rows: list
    seconds: float

    def row(self, method: str) -> LDSRow:
        for r in self.rows:
            if r.method == method:
                return r
        raise KeyError(method)

    def to_dict(self) -> dict:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return C.jsonable({"study": "lds", **fields})

    def to_markdown(self) -> str:
        cfg = self.config
        head = ("method", "seconds", "x train run",
                *(f"LDS {a:g} [95% CI]" for a in cfg.fractions))
        rows = []
        for r in self.rows:
            cells = []
            for a in cfg.fractions:
                e = r.lds.get(f"{a:g}")
                cells.append("-" if e is None else
                             f"{C.fmt(e['score'])} [{C.fmt(e['low'])}, {C.fmt(e['high'])}]")
            rows.append((r.method, r.seconds, r.train_equiv, *cells))
        notes = [f"{r.method}: {n}" for r in self.rows for n in r.notes]
        retrain = ", ".join(f"{a}: {C.fmt(s)} s" for a, s in self.retrain_seconds.items())
        return (
            f"### LDS ({self.problem}): N={self.n_train}, {self.n_params} parameters, "
            f"{self.n_test} test losses, M={cfg.n_subsets} subsets per drop fraction, "
            f"{cfg.steps} {cfg.optimizer} steps (lr {cfg.learning_rate:g}, "
            f"batch {cfg.batch_size or 'full'}), "
            f"damping={cfg.damping:g}\n\n"
            "LDS = mean over test points of the Spearman correlation over subsets between the summed "
            "scores of the removed examples and the actual change of the test loss after retraining "
            "(same init, schedule and seed); bootstrap 95% interval over test points. Cost in seconds and "
            f"in training runs (one run: {C.fmt(self.train_seconds)} s).\n\n"
            + C.markdown_table(head, rows)
            + f"\n\nRetraining ({cfg.n_subsets} runs per fraction): {retrain}. Mean |actual change| per "
            + "fraction: " + ", ".join(f"{a}: {C.fmt(v)}" for a, v in self.effect.items())
            + f". ||grad J|| at the trained model: {C.fmt(self.grad_norm)}."
            + ("\n\nNotes: " + "; ".join(notes) if notes else ""))

    __str__ = to_markdown

    def plot(self, path):
        """LDS vs cost, one point per method and drop fraction (see :func:`plot`)."""
        return plot(self, path)


def plot(result: LDSResult, path):
    """LDS (with its 95% interval) against cost in training runs (log scale), one marker per
    method, one colour per drop fraction. Returns the path written."""
    from influx import plots

    fig, axes = plots.new_figure(size=(6.4, 4.4))
    ax = axes[0, 0]
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    markers = "osD^v<>p*hX"
    for i, a in enumerate(result.config.fractions):
        for j, r in enumerate(result.rows):
            e = r.lds.get(f"{a:g}")
            if e is None or r.train_equiv is None or e["score"] is None or not np.isfinite(e["score"]):
                continue
            ax.errorbar([max(r.train_equiv, 1e-3)], [e["score"]],
                        yerr=[[e["score"] - e["low"]], [e["high"] - e["score"]]],
                        fmt=markers[j % len(markers)], color=colors[i % len(colors)], ms=6, capsize=2)
    for j, r in enumerate(result.rows):
        ax.plot([], [], markers[j % len(markers)], color="0.35", label=r.method)
    for i, a in enumerate(result.config.fractions):
        ax.plot([], [], "s", color=colors[i % len(colors)], label=f"drop {a:g}")
    ax.set_xscale("log")
    ax.set_xlabel("cost (training-run equivalents)")
    ax.set_ylabel("LDS (Spearman)")
    ax.set_title(f"LDS vs cost: {result.problem}")
    ax.axhline(0, color="0.7", lw=0.8)
    ax.legend(fontsize=7, loc="best", ncol=2)
    return plots.save(fig, path)


# --------------------------------------------------------------------------- the study
_OPTS: dict = {}


def _optimizer(name: str, lr: float):
    """One optax object per (name, learning rate): compiled runs are keyed on it."""
    import optax

    key = (name, float(lr))
    if key not in _OPTS:
        _OPTS[key] = {"adam": lambda: optax.adam(key[1], eps_root=1e-16),
                      "sgd": lambda: optax.sgd(key[1]),
                      "momentum": lambda: optax.sgd(key[1], momentum=0.9)}[name]()
    return _OPTS[key]


def _problem(cfg: LDSConfig, dtype):
    from influx import data as _data
    from influx import models

    name = "digits" if cfg.problem == "digits" else "mnist"
    ds = _data.load(name, data_dir=cfg.data_dir, n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.seed,
                    standardize=True, dtype=dtype, flatten=cfg.problem != "mnist_cnn")
    if cfg.problem == "mnist_cnn":
        model = models.CNN(channels=cfg.channels, out=ds.output_dim, activation=cfg.activation)
    else:
        model = models.mlp(cfg.depth, cfg.width, ds.output_dim, cfg.activation)
    return ds, model


def _timed(fn, warm: bool):
    """(result, seconds) of ``fn()``; with ``warm`` the second call is timed."""
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    sec = time.perf_counter() - t0
    if warm:
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        sec = time.perf_counter() - t0
    return out, sec


def _method_fn(method, cfg, obj, init, params, train, test, opt, n_params):
    import influx
    from influx import metagrad, solvers

    damping = cfg.damping
    if method == "grad_dot":
        return lambda: influx.grad_dot(obj, params, train, test)
    if method == "tracin":
        def tracin():
            every = max(1, cfg.steps // cfg.tracin_checkpoints)
            ck = metagrad.trajectory(obj, init, train, optimizer=opt, steps=cfg.steps, every=every,
                                     batch_size=cfg.batch_size, seed=cfg.seed)
            return influx.tracin(obj, ck, train, test, cfg.learning_rate * every)
        return tracin
    if method == "metagradients":
        return lambda: influx.metagradients(obj, init, train, test, optimizer=opt, steps=cfg.steps,
                                            batch_size=cfg.batch_size, seed=cfg.seed)
    tol = 1e-8 if cfg.dtype == "float64" else 1e-4
    solver = {
        "influence_cg": lambda: solvers.cg(tol=tol, max_steps=cfg.cg_max_steps, block=True),
        "influence_ekfac": lambda: solvers.ekfac(),
        "influence_arnoldi": lambda: solvers.arnoldi(rank=min(cfg.arnoldi_rank, n_params - 1)),
        "influence_lissa": lambda: solvers.lissa(depth=cfg.lissa_depth, batch_size=min(128, len(train[0]))),
        # the exact solve of response.linearized: dense up to 4096 parameters, converged CG beyond
        "linearized_pbrf": lambda: solvers.direct() if n_params <= 4096 else solvers.cg(
            tol=1e-10 if cfg.dtype == "float64" else 1e-5, max_steps=10 * cfg.cg_max_steps, block=True),
    }[method]()
    if method in _APPROXIMATE:
        # an approximate solver is scored on its own answer (kronfluence's practice); the
        # residual it leaves is reported in the row's notes (see _residual_note)
        return lambda: influx.influence(obj, params, train, test, kind="gnh", damping=damping, solver=solver,
                                        on_failure="keep", return_info=True)
    return lambda: influx.influence(obj, params, train, test, kind="gnh", damping=damping, solver=solver)


#: Methods whose iHVP is an approximation by design (not an iterative solve to a tolerance).
_APPROXIMATE = ("influence_ekfac", "influence_arnoldi", "influence_lissa")


def _residual_note(info) -> list[str]:
    """A note when an approximate solver's answers did not meet its own residual check."""
    conv = getattr(info, "converged", None)
    if conv is None or bool(np.all(conv)):
        return []
    res = getattr(info, "residual_norm", None)
    worst = "" if res is None else f", worst residual norm {float(np.nanmax(np.asarray(res))):.3g}"
    return [f"{int(np.sum(~np.asarray(conv, bool)))} of {np.size(conv)} solves above the solver's residual "
            f"tolerance (scored on the solver's own answer{worst})"]


def run(config: LDSConfig | None = None) -> LDSResult:
    """Runs the LDS study (module docstring) on ``config.problem``."""
    import jax
    import jax.numpy as jnp

    import influx
    from influx import models

    cfg = LDSConfig() if config is None else config
    if not isinstance(cfg, LDSConfig):
        raise InputError(f"config must be an LDSConfig, got {type(cfg).__name__}")
    t_start = time.perf_counter()
    with C.precision(cfg.dtype) as dtype:
        ds, model = _problem(cfg, dtype)
        train = tuple(jnp.asarray(a) for a in ds.train)
        n = int(train[0].shape[0])
        rng = np.random.default_rng(cfg.seed)
        t_idx = np.sort(rng.choice(ds.test[0].shape[0], size=min(cfg.n_test_points, ds.test[0].shape[0]),
                                   replace=False))
        test = tuple(jnp.asarray(a[t_idx]) for a in ds.test)
        masks = {a: subsets(n, a, cfg.n_subsets, seed=cfg.seed + i + 1) for i, a in enumerate(cfg.fractions)}
        loss_fn = C.loss_for(ds.task)
        obj = influx.Objective(C.apply_for(model), loss_fn, l2=cfg.l2)
        init = models.init(model, train[0][:1], seed=cfg.seed)
        opt = _optimizer(cfg.optimizer, cfg.learning_rate)
        n_params = sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(init))

        res, train_seconds = _timed(lambda: models.train(
            model, loss_fn, init, train, l2=cfg.l2, optimizer=opt, steps=cfg.steps, batch_size=cfg.batch_size,
            seed=cfg.seed), cfg.warm_timing)
        params = res.params
        grad_norm = float(jnp.sqrt(sum(jnp.vdot(g, g) for g in
                                       jax.tree_util.tree_leaves(jax.grad(obj)(params, train)))))

        actual, retrain_seconds, effect = {}, {}, {}
        bar = C.progress(list(cfg.fractions) + list(cfg.methods), enabled=cfg.progress, desc="lds")
        it = iter(bar)
        for a in cfg.fractions:
            next(it, None)
            t0 = time.perf_counter()
            actual[a] = retrain_delta(obj, init, train, test, 1.0 - masks[a], optimizer=opt, steps=cfg.steps,
                                      batch_size=cfg.batch_size, seed=cfg.seed)
            retrain_seconds[f"{a:g}"] = time.perf_counter() - t0
            effect[f"{a:g}"] = float(np.mean(np.abs(actual[a])))

        rows = []
        for method in cfg.methods:
            next(it, None)
            notes: list[str] = []
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    scores, sec = _timed(_method_fn(method, cfg, obj, init, params, train, test, opt,
                                                    n_params), cfg.warm_timing)
                    if method in _APPROXIMATE:
                        scores, info = scores
                        notes += _residual_note(info)
                    scores = np.asarray(scores, np.float64)
                except Exception as e:  # noqa: BLE001 -- a failed method is a row with its error
                    scores, sec = None, None
                    notes.append(f"failed: {type(e).__name__}: {' '.join(str(e).split())[:160]}")
            notes += sorted({_note(str(w.message)) for w in caught if issubclass(w.category, RuntimeWarning)})
            per = {}
            if scores is not None:
                for a in cfg.fractions:
                    e = lds(scores, masks[a], actual[a], n_boot=cfg.n_boot, seed=cfg.seed)
                    per[f"{a:g}"] = {"score": e.score, "low": e.low, "high": e.high, "n_valid": e.n_valid}
            rows.append(LDSRow(method=method, seconds=sec,
                               train_equiv=None if sec is None else sec / train_seconds, lds=per,
                               notes=notes))
        for _ in it:
            pass
    return LDSResult(config=cfg, problem=cfg.problem, n_train=n, n_test=int(t_idx.size), n_params=n_params,
                     train_seconds=train_seconds, retrain_seconds=retrain_seconds, effect=effect,
                     grad_norm=grad_norm, rows=rows, seconds=time.perf_counter() - t_start)


def _note(msg: str) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= 140 else msg[:137] + "..."
