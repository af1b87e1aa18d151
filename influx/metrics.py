"""Agreement metrics between predicted and actual effects.

Everything here is plain numpy on host arrays (jax arrays are accepted and copied to the
host); the metrics are computed once per study, never inside compiled code.

* :func:`pearson`, :func:`spearman`: correlation coefficients over all entries of two
  arrays of the same shape. Spearman is the Pearson correlation of the *average ranks*
  (ties share the mean of the ranks they span), identical to ``scipy.stats.spearmanr``.
* :func:`correlations`: Pearson, Spearman, mean absolute difference and the count, the
  summary used by the fragility and gap studies.
* :func:`linear_datamodeling_score`: LDS (Park et al., 2023), the Spearman correlation,
  per test point, between predicted group effects (sum of scores over a removed subset)
  and actual effects, averaged over test points.
* :func:`topk_overlap`: fraction of the top-k entries two rankings share.
* :func:`mislabel_detection_curve`: the fraction of flipped labels found after inspecting
  the highest-scored fraction of the training set, and the area under that curve.

Undefined values. A correlation is undefined when either input is constant (zero
variance). Then the functions return ``nan`` (they never raise for it and never warn):
the caller sees ``nan`` in a table rather than a crash in the middle of a study. Averages
over test points (LDS) skip ``nan`` entries and report how many were valid. Anything else
that is wrong with the input -- shapes that differ, fewer than two entries, non-finite
values, a bad ``k`` or fraction -- raises ``ValueError`` naming the argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from influx.errors import InputError
from influx.validation import InputTypeError, check_choice, check_int

__all__ = [
    "Correlations",
    "DetectionCurve",
    "LDSResult",
    "correlations",
    "linear_datamodeling_score",
    "mislabel_detection_curve",
    "pearson",
    "rankdata",
    "spearman",
    "topk_overlap",
]


# --------------------------------------------------------------------------- helpers


def _as_float(x, name: str) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputTypeError(f"{name} must be a numeric array, got {type(x).__name__}") from e
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name} contains non-finite values (nan or inf)")
    return arr


def _pair(a, b, names=("a", "b")) -> tuple[np.ndarray, np.ndarray]:
    """Validate two same-shape finite arrays with >= 2 entries; return them flattened."""
    a = _as_float(a, names[0])
    b = _as_float(b, names[1])
    if a.shape != b.shape:
        raise InputError(f"{names[0]} and {names[1]} must have the same shape, got {a.shape} and {b.shape}")
    if a.size < 2:
        raise InputError(f"{names[0]} and {names[1]} need at least 2 entries, got {a.size}")
    return a.ravel(), b.ravel()


def _pearson_flat(a: np.ndarray, b: np.ndarray) -> float:
    da = a - a.mean()
    db = b - b.mean()
    na = np.sqrt(np.dot(da, da))
    nb = np.sqrt(np.dot(db, db))
    # Constant input (up to rounding relative to the values' scale): undefined -> nan.
    scale_a = max(np.max(np.abs(a)), np.finfo(np.float64).tiny)
    scale_b = max(np.max(np.abs(b)), np.finfo(np.float64).tiny)
    eps = 64 * np.finfo(np.float64).eps
    if na <= eps * scale_a * np.sqrt(a.size) or nb <= eps * scale_b * np.sqrt(b.size):
        return float("nan")
    r = np.dot(da, db) / (na * nb)
    return float(np.clip(r, -1.0, 1.0))


def rankdata(a) -> np.ndarray:
    """Average ranks (1-based) of the entries of a 1-D array; ties get the mean rank.

    Same result as ``scipy.stats.rankdata(a, method="average")``. Cost O(n log n).
    """
    a = np.asarray(a)
    if a.ndim != 1:
        raise InputError(f"rankdata expects a 1-D array, got shape {a.shape}")
    n = a.size
    sorter = np.argsort(a, kind="mergesort")
    inv = np.empty(n, dtype=np.intp)
    inv[sorter] = np.arange(n)
    a_sorted = a[sorter]
    first = np.r_[True, a_sorted[1:] != a_sorted[:-1]]
    dense = np.cumsum(first)[inv]  # 1-based tie-group id of each entry
    bounds = np.r_[np.nonzero(first)[0], n]  # start of each group, then n
    # Group g (1-based) spans sorted positions bounds[g-1] .. bounds[g]-1, i.e. ranks
    # bounds[g-1]+1 .. bounds[g]; their mean is (bounds[g-1] + 1 + bounds[g]) / 2.
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


# --------------------------------------------------------------------------- correlations


def pearson(a, b) -> float:
    """Pearson correlation ``cov(a, b) / (std(a) std(b))`` over all entries.

    ``a`` and ``b`` must have the same shape (any shape; entries are paired elementwise)
    and at least 2 finite entries. Returns ``nan`` if either is constant.
    """
    a, b = _pair(a, b)
    return _pearson_flat(a, b)


def spearman(a, b) -> float:
    """Spearman rank correlation: Pearson correlation of the average ranks.

    Ties receive the mean of the ranks they occupy (as ``scipy.stats.spearmanr``).
    Same shape rules as :func:`pearson`; ``nan`` if either input is constant.
    """
    a, b = _pair(a, b)
    return _pearson_flat(rankdata(a), rankdata(b))


class Correlations(NamedTuple):
    """Agreement between predicted and actual effects (see :func:`correlations`)."""

    pearson: float
    spearman: float
    mean_abs_diff: float
    n: int


def correlations(pred, actual) -> Correlations:
    """Pearson, Spearman, mean ``|pred - actual|`` and count ``n`` of two same-shape arrays.

    Used by the fragility and gap studies to compare predicted changes (influence) with
    actual changes (LOO/PBRF retraining). Correlations are ``nan`` for constant input.
    """
    p, a = _pair(pred, actual, ("pred", "actual"))
    return Correlations(
        pearson=_pearson_flat(p, a),
        spearman=_pearson_flat(rankdata(p), rankdata(a)),
        mean_abs_diff=float(np.mean(np.abs(p - a))),
        n=int(p.size),
    )


# --------------------------------------------------------------------------- LDS


class LDSResult(NamedTuple):
    """Linear datamodeling score.

    score: mean over test points of ``per_test`` ignoring ``nan`` (``nan`` if none valid).
    per_test: (n_test,) Spearman correlation across subsets for each test point.
    predicted: (n_subsets, n_test) predicted group effects.
    n_valid: number of test points whose correlation is defined.
    """

    score: float
    per_test: np.ndarray
    predicted: np.ndarray
    n_valid: int


def linear_datamodeling_score(scores, subsets, actual, *, kept: bool = False) -> LDSResult:
    """Linear datamodeling score (LDS) of pairwise influence scores.

    Args:
      scores: (n_test, n_train) pairwise scores ``S[j, m]``: predicted change of test
        measurement ``f_j`` when training example ``m`` is removed (influx's sign).
      subsets: (n_subsets, n_train) boolean masks of the *removed* examples (or of the
        *kept* examples when ``kept=True``; then the removed set is the complement).
      actual: (n_subsets, n_test) actual effects ``f_j(theta_without_S) - f_j(theta_s)``.
      kept: interpret ``subsets`` as the retained examples.

    Math: predicted group effect ``g[s, j] = sum_{m in S_s} S[j, m]`` (additivity of
    first-order influence); ``LDS = mean_j spearman_s(g[:, j], actual[:, j])``.
    Cost: one (n_subsets x n_train) @ (n_train x n_test) product plus the ranks.

    Test points whose correlation is undefined (a constant column) get ``nan`` in
    ``per_test`` and are left out of the mean.
    """
    S = _as_float(scores, "scores")
    A = _as_float(actual, "actual")
    M = np.asarray(subsets)
    if S.ndim != 2:
        raise InputError(f"scores must be (n_test, n_train), got shape {S.shape}")
    if M.ndim != 2 or M.shape[1] != S.shape[1]:
        raise InputError(f"subsets must be (n_subsets, n_train={S.shape[1]}) masks, got shape {M.shape}")
    if M.dtype != np.bool_:
        if not np.all((M == 0) | (M == 1)):
            raise InputError("subsets must be boolean (or 0/1) masks")
        M = M.astype(bool)
    if A.shape != (M.shape[0], S.shape[0]):
        raise InputError(f"actual must be (n_subsets={M.shape[0]}, n_test={S.shape[0]}), got {A.shape}")
    if M.shape[0] < 2:
        raise InputError(f"subsets needs at least 2 subsets, got {M.shape[0]}")
    removed = ~M if kept else M
    pred = removed.astype(np.float64) @ S.T  # (n_subsets, n_test)
    per_test = np.array([_pearson_flat(rankdata(pred[:, j]), rankdata(A[:, j])) for j in range(S.shape[0])])
    valid = np.isfinite(per_test)
    score = float(np.mean(per_test[valid])) if valid.any() else float("nan")
    return LDSResult(score=score, per_test=per_test, predicted=pred, n_valid=int(valid.sum()))


# --------------------------------------------------------------------------- top-k


def topk_overlap(a, b, k: int, *, by: str = "value"):
    """Fraction of the top-``k`` entries (largest first) that two score vectors share.

    ``a``, ``b``: (n,) or (rows, n) arrays of the same shape; rows are ranked separately
    and the result has shape (rows,). ``by="value"`` ranks by the scores themselves,
    ``by="abs"`` by their magnitude. Ties are broken by index (stable sort).
    Returns ``|topk(a) & topk(b)| / k`` in [0, 1].
    """
    A = _as_float(a, "a")
    B = _as_float(b, "b")
    if A.shape != B.shape:
        raise InputError(f"a and b must have the same shape, got {A.shape} and {B.shape}")
    if A.ndim not in (1, 2):
        raise InputError(f"a and b must be 1-D or 2-D, got shape {A.shape}")
    check_choice(by, "by", ("value", "abs"))
    n = A.shape[-1]
    k = check_int(k, "k", minimum=1, maximum=n)
    if by == "abs":
        A, B = np.abs(A), np.abs(B)
    A2, B2 = np.atleast_2d(A), np.atleast_2d(B)
    ia = np.argsort(-A2, axis=-1, kind="stable")[:, :k]
    ib = np.argsort(-B2, axis=-1, kind="stable")[:, :k]
    out = np.array([len(np.intersect1d(x, y)) / k for x, y in zip(ia, ib)])
    return float(out[0]) if A.ndim == 1 else out


# --------------------------------------------------------------------------- mislabels


class DetectionCurve(NamedTuple):
    """Mislabel detection curve (see :func:`mislabel_detection_curve`).

    fractions: the requested inspected fractions.
    found: fraction of flipped labels found after inspecting each of ``fractions``.
    auc: area under the full curve (inspected fraction 0..1 vs found fraction);
      ~0.5 for a random ranking, ``1 - n_flipped / (2 n)`` for a perfect one.
    inspected: (n + 1,) inspected fraction ``k / n`` for k = 0..n.
    recall: (n + 1,) fraction of flipped labels found after inspecting k examples.
    n_flipped: number of flipped labels.
    """

    fractions: np.ndarray
    found: np.ndarray
    auc: float
    inspected: np.ndarray
    recall: np.ndarray
    n_flipped: int


def mislabel_detection_curve(
    scores, is_flipped, *, fractions: Sequence[float] = (0.05, 0.1, 0.2, 0.3)
) -> DetectionCurve:
    """Fraction of flipped labels found when inspecting examples by decreasing score.

    Args:
      scores: (n,) suspicion scores, larger = inspected first (self-influence, training
        loss, ...).
      is_flipped: (n,) boolean mask of the examples whose label was flipped.
      fractions: inspected fractions in [0, 1] at which to report the found fraction;
        inspecting fraction ``q`` means the top ``floor(q n + 1/2)`` examples.

    Ties in ``scores`` are handled as a uniformly random order within the tie: the curve
    is the *expected* recall, exact at tie-group boundaries and linear inside a group
    (so a constant score gives the diagonal, AUC 0.5, and no index order leaks in).

    If no label is flipped the recall is undefined: ``found``, ``recall`` and ``auc`` are
    ``nan``. Cost: one sort, O(n log n).
    """
    s = _as_float(scores, "scores")
    f = np.asarray(is_flipped)
    if s.ndim != 1:
        raise InputError(f"scores must be 1-D, got shape {s.shape}")
    if f.shape != s.shape:
        raise InputError(f"is_flipped must have shape {s.shape}, got {f.shape}")
    if f.dtype != np.bool_:
        if not np.all((f == 0) | (f == 1)):
            raise InputError("is_flipped must be a boolean (or 0/1) mask")
        f = f.astype(bool)
    q = np.asarray(fractions, dtype=np.float64).reshape(-1)
    if q.size == 0 or not np.all(np.isfinite(q)) or np.any((q < 0) | (q > 1)):
        raise InputError(f"fractions must be a non-empty sequence in [0, 1], got {fractions!r}")
    n = s.size
    if n == 0:
        raise InputError("scores must not be empty")
    n_flipped = int(f.sum())
    inspected = np.arange(n + 1) / n
    if n_flipped == 0:
        nan_curve = np.full(n + 1, np.nan)
        return DetectionCurve(q, np.full(q.shape, np.nan), float("nan"), inspected, nan_curve, 0)
    order = np.argsort(-s, kind="stable")
    s_sorted, f_sorted = s[order], f[order]
    cum = np.r_[0, np.cumsum(f_sorted)]  # flipped found after inspecting k examples
    # tie-group boundaries (positions k where a new score value starts) plus 0 and n
    bounds = np.r_[0, np.nonzero(s_sorted[1:] != s_sorted[:-1])[0] + 1, n]
    recall = np.interp(np.arange(n + 1), bounds, cum[bounds]) / n_flipped
    ks = np.floor(q * n + 0.5).astype(int)
    auc = float(np.sum(0.5 * (recall[1:] + recall[:-1])) / n)
    return DetectionCurve(q, recall[ks], auc, inspected, recall, n_flipped)
