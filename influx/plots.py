"""Matplotlib figures of the studies, written straight to image files.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas, never through
``pyplot``: no GUI backend is touched, nothing global changes, and it works on a headless
machine. Each function takes a study result and a path (the format follows the suffix,
``.png`` by default) and returns the path written.

* :func:`fragility_scatter` (:func:`fragility_figure`): predicted (influence) vs actual
  (LOO) change of the test loss, one panel per configuration of the fragility study.
* :func:`gap_bars`: the five gaps of the gap-decomposition study, grouped per configuration.
* :func:`detection_curves`: fraction of flipped labels found vs fraction inspected.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["fragility_scatter", "fragility_figure", "gap_bars", "detection_curves", "new_figure", "save"]


def new_figure(ncols: int = 1, nrows: int = 1, *, size=(4.0, 3.4)):
    """A ``Figure`` on the Agg canvas with a grid of axes (always a 2-D array)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save(fig, path) -> Path:
    """Writes ``fig`` to ``path`` (parents created), returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _finite_pairs(pred, actual):
    p = np.asarray(pred, dtype=float)
    a = np.asarray(actual, dtype=float)
    ok = np.isfinite(p) & np.isfinite(a)
    return p[ok], a[ok]


def fragility_scatter(result, path, *, max_panels: int = 6) -> Path:
    """Predicted vs actual change of the test loss per configuration (fragility study).

    Writes :func:`fragility_figure` to ``path``.
    """
    return save(fragility_figure(result, max_panels=max_panels), path)


def fragility_figure(result, *, max_panels: int = 6):
    """The fragility scatter as a ``Figure``: one panel per configuration.

    Each marker is one removed training example (one of a test point's top-k by
    |influence|): x its predicted, y its actual change of that test point's loss. Red: the
    highest-loss test point; blue: the other test points (a seeded random sample). The
    dashed line is ``actual = predicted``; titles give the Pearson correlation of the
    highest-loss point (``r*``) and its mean across test points. Tick labels are plain
    numbers on every panel (no offset or multiplier). With more rows than ``max_panels``,
    rows whose correlations are all undefined are skipped first.
    """
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    rows = list(result.rows)
    valid = [r for r in rows if getattr(r, "n_valid", 1) > 0]
    if len(rows) > max_panels and valid:  # configurations with defined correlations first
        rows = valid
    if len(rows) > max_panels:  # spread the panels over the grid
        idx = np.unique(np.linspace(0, len(rows) - 1, max_panels).round().astype(int))
        rows = [rows[i] for i in idx]
    n = max(len(rows), 1)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = new_figure(ncols, nrows, size=(4.0, 3.6))
    for ax in axes.ravel()[len(rows):]:
        ax.set_visible(False)
    ticks = FuncFormatter(lambda v, _: f"{v:.2g}")
    for ax, row in zip(axes.ravel(), rows):
        lo, hi = np.inf, -np.inf
        for j, pt in enumerate(row.points):
            p, a = _finite_pairs(pt["pred"], pt["actual"])
            if not p.size:
                continue
            lo, hi = min(lo, p.min(), a.min()), max(hi, p.max(), a.max())
            ax.scatter(p, a, s=14 if j else 22, alpha=0.7 if j else 1.0, zorder=2 if j else 3,
                       color="tab:blue" if j else "tab:red")
        if np.isfinite(lo):
            pad = 0.05 * (hi - lo or 1.0)
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.5", lw=0.8, ls="--")
        ax.set_title(f"depth {row.depth}, width {row.width}, l2={row.l2:g}\n"
                     f"r*={_f(row.pearson)}  mean r={_f(row.pearson_mean)}", fontsize=9)
        ax.set_xlabel("predicted change (influence)", fontsize=8)
        ax.set_ylabel("actual change (LOO)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_formatter(ticks)
        ax.yaxis.set_major_formatter(ticks)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))  # room for labels like -0.0014
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5))
    if rows:
        from matplotlib.lines import Line2D

        k = result.config.top_k
        others = max((len(r.points) for r in rows), default=1) - 1
        marker = lambda c, s: Line2D([], [], ls="", marker="o", color=c, markersize=s)
        diagonal = Line2D([], [], color="0.5", lw=0.8, ls="--")
        wide = ncols >= 2  # one row of entries; a single panel stacks them
        fig.legend([marker("tab:red", 5), marker("tab:blue", 4), diagonal],
                   ["highest-loss test point",
                    f"the other {others} test points (random)" if others != 1
                    else "the other test point (random)",
                    "actual = predicted"],
                   loc="outside lower center", ncols=3 if wide else 1, fontsize=7, frameon=False,
                   title=(f"each marker: removing one of a test point's{' ' if wide else chr(10)}"
                          f"top-{k} training examples by |influence|"),
                   title_fontsize=7)
    fig.suptitle(f"Fragility: {result.config.dataset}, influence vs leave-one-out", fontsize=10)
    return fig


def gap_bars(result, path) -> Path:
    """The five gaps (mean |difference| between consecutive response objects) per configuration."""
    rows = list(result.rows)
    names = list(result.gap_names)
    fig, axes = new_figure(1, 1, size=(max(5.0, 1.2 * len(rows) + 3), 3.8))
    ax = axes[0, 0]
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(rows))
    for k, name in enumerate(names):
        vals = np.array([r.gaps.get(name, np.nan) for r in rows], dtype=float)
        ax.bar(x + (k - (len(names) - 1) / 2) * width, np.where(np.isfinite(vals), vals, 0.0), width,
               label=name.replace("_", " "))
    ax.set_xticks(x, [r.label for r in rows], fontsize=7, rotation=20 if len(rows) > 4 else 0)
    ax.set_ylabel("mean |difference| of test-loss change", fontsize=8)
    if all(np.all(np.asarray([r.gaps.get(n, 0) for n in names], float) >= 0) for r in rows):
        vals = [r.gaps.get(n) for r in rows for n in names]
        vals = np.asarray([v for v in vals if v is not None], float)
        if vals.size and np.nanmax(vals) > 0 and np.nanmin(vals[vals > 0], initial=np.inf) > 0:
            ax.set_yscale("log")
    ax.legend(fontsize=7, ncols=min(len(names), 3), loc="upper center", bbox_to_anchor=(0.5, -0.12),
              frameon=False)
    ax.set_title("Gap decomposition (Bae et al. 2022): " + ", ".join(result.config.datasets), fontsize=10)
    return save(fig, path)


def detection_curves(result, path) -> Path:
    """Fraction of flipped labels found vs fraction of the training set inspected."""
    fig, axes = new_figure(1, 1, size=(5.0, 4.0))
    ax = axes[0, 0]
    for row in result.rows:
        c = row.curve
        ax.plot(c["inspected"], c["found"], lw=1.4 if row.method != "random" else 1.0,
                ls="--" if row.method == "random" else "-", label=f"{row.method} (AUC {row.auc:.2f})")
    for q in result.config.fractions:
        ax.axvline(q, color="0.85", lw=0.6, zorder=0)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("fraction of training data inspected", fontsize=9)
    ax.set_ylabel("fraction of flipped labels found", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"Mislabel detection: {result.config.dataset}, {result.n_flipped} flipped of "
                 f"{result.n_train}", fontsize=10)
    return save(fig, path)


def _f(v) -> str:
    return "nan" if v is None or not np.isfinite(v) else f"{v:.2f}"
