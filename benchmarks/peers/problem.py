"""The shared problem definition for the peer benchmark (pure numpy, importable anywhere).

Both environments (influx's JAX venv and the peers' torch venv) import this file, so the
data, the architecture, the regularisation, the damping, the test points and the solver
settings are defined exactly once.

Model: an MLP ``sizes = (d_in, h_1, ..., d_out)`` with ``tanh`` hidden activations and
linear logits; loss: mean softmax cross-entropy. Training objective (influx convention,
DESIGN.md)::

    J(theta) = mean_i CE(f(theta, x_i), y_i) + l2/2 ||theta||^2

Curvature solved by every method: ``H_loss + (l2 + damping) I`` where ``H_loss`` is the
Hessian (or GNH) of the *mean* loss only. Peers never see the l2 term in their loss, so
they are given ``regularization = l2 + damping`` (pyDVL) / ``damping_factor = l2 + damping``
(kronfluence), which is the same matrix.

Score convention (influx, DESIGN.md): ``S[t, m] = (1/N) g_t^T (H + lambda I)^{-1} g_m``, the
predicted change of test loss t when training example m is removed. pyDVL's
``influences(..., mode=Up)`` and kronfluence's pairwise scores both return
``g_t^T (H + lambda I)^{-1} g_m`` (no 1/N, same sign), so peer scores are divided by N.

Weights file (``.npz``): keys ``w0, b0, w1, b1, ...``; ``w_i`` has shape ``(fan_in, fan_out)``
(JAX convention ``y = x @ w + b``); ``torch.nn.Linear(fan_in, fan_out).weight = w_i.T``.
The flat parameter vector used for the dense reference is
``jax.flatten_util.ravel_pytree(params)`` of ``params = [{"b": b0, "w": w0}, {"b": b1, ...}]``,
i.e. per layer ``b_i`` then ``w_i`` (row-major); scores do not depend on this order.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    """``$INFLUX_DATA_DIR`` or ``<repo>/../shared/data``."""
    env = os.environ.get("INFLUX_DATA_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@dataclass(frozen=True)
class Problem:
    """Everything both sides need to build the same influence problem."""

    name: str
    dataset: str  # "digits" | "mnist"
    sizes: tuple[int, ...]
    l2: float = 1e-3
    damping: float = 1e-3
    n_test: int = 16  # test points (fixed indices into the test split, see test_indices)
    train_steps: int = 3000  # full-batch Adam steps (JAX side)
    learning_rate: float = 3e-3
    seed: int = 0
    # solver settings shared by influx and the peers
    cg_tol: float = 1e-4  # pyDVL CgInfluence default rtol
    # CG stops at ||r|| <= cg_tol ||b|| or after cg_max_steps on both sides (pyDVL 0.10.0's
    # own rtol test, rtol**2 times a norm over the batch axis, is below float32 round-off and
    # its default maxiter is 10 P: torch_side.py expresses the same rule through its atol).
    cg_max_steps: int = 1000
    lissa_depth: int = 1000  # pyDVL LissaInfluence default maxiter
    lissa_batch_size: int = 128
    arnoldi_rank: int = 32
    # float64 reference: "dense" (Cholesky of the materialised P x P matrix) or "cg"
    # (float64 CG to ``reference_cg_tol`` on the n_test right-hand sides; needs a positive
    # definite damped matrix)
    reference: str = "dense"
    reference_cg_tol: float = 1e-10
    kfac_batch_size: int = 512
    dense_feasible: bool = True
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def regularization(self) -> float:
        """Total diagonal shift seen by a peer: l2 (part of J) + damping."""
        return self.l2 + self.damping

    @property
    def arnoldi_krylov(self) -> int:
        """Krylov dimension used by both sides: scipy ``eigsh``'s default ``ncv`` as pyDVL
        calls it (``min(P, max(2 rank + 1, 20))``); influx's Lanczos runs that many steps
        (pyDVL's implicitly restarted ARPACK may restart and use more products)."""
        return min(self.n_params, max(2 * self.arnoldi_rank + 1, 20))

    @property
    def n_params(self) -> int:
        return sum(a * b + b for a, b in zip(self.sizes[:-1], self.sizes[1:]))


PROBLEMS = {
    "digits": Problem(name="digits", dataset="digits", sizes=(64, 32, 10)),
    "mnist": Problem(
        # damping 1e-2: the undamped mean-loss Hessian has eigenvalues down to -0.0037, so
        # damping 1e-3 (lambda = 0.002) leaves an indefinite system; lambda = 0.011 is PD.
        # P = 12,730: a dense float64 reference costs ~40 min on 2 cores, CG seconds.
        name="mnist", dataset="mnist", sizes=(784, 16, 10), damping=1e-2, train_steps=2000,
        kfac_batch_size=1024, reference="cg",
    ),
}


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_data(problem: Problem) -> dict[str, np.ndarray]:
    """Standardised float32 features and int32 labels: x_train, y_train, x_test, y_test.

    digits: scikit-learn's bundled 8x8 digits (1,797), permuted with ``seed``, 80/20 split,
    per-feature standardisation with train statistics (std floored at 1e-2 for constant
    pixels). mnist: the 10k IDX images of ../shared/data, permuted with ``seed``, 8,000 train
    / 2,000 test, pixels/255 standardised with the scalar train mean and std.
    """
    rng = np.random.default_rng(problem.seed)
    if problem.dataset == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = d.data.astype(np.float64), d.target.astype(np.int32)
        perm = rng.permutation(len(x))
        x, y = x[perm], y[perm]
        n_tr = int(0.8 * len(x))
        xtr, xte = x[:n_tr], x[n_tr:]
        mu, sd = xtr.mean(0), np.maximum(xtr.std(0), 1e-2)
    elif problem.dataset == "mnist":
        dd = data_dir()
        x = _read_idx(dd / "mnist-t10k-images-idx3-ubyte.gz").reshape(-1, 784) / 255.0
        y = _read_idx(dd / "mnist-t10k-labels-idx1-ubyte.gz").astype(np.int32)
        perm = rng.permutation(len(x))
        x, y = x[perm], y[perm]
        n_tr = 8000
        xtr, xte = x[:n_tr], x[n_tr:]
        mu, sd = xtr.mean(), xtr.std()
    else:
        raise ValueError(f"unknown dataset {problem.dataset!r}")
    return {
        "x_train": ((xtr - mu) / sd).astype(np.float32),
        "y_train": y[:n_tr].astype(np.int32),
        "x_test": ((xte - mu) / sd).astype(np.float32),
        "y_test": y[n_tr:].astype(np.int32),
    }


def test_indices(problem: Problem, n_test_pool: int) -> np.ndarray:
    """The fixed test points: ``n_test`` indices drawn without replacement (seed + 1)."""
    rng = np.random.default_rng(problem.seed + 1)
    return np.sort(rng.choice(n_test_pool, size=problem.n_test, replace=False))


def init_weights(problem: Problem) -> dict[str, np.ndarray]:
    """LeCun-normal weights, zero biases (float32), in the .npz layout described above."""
    rng = np.random.default_rng(problem.seed + 2)
    out = {}
    for i, (a, b) in enumerate(zip(problem.sizes[:-1], problem.sizes[1:])):
        out[f"w{i}"] = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        out[f"b{i}"] = np.zeros((b,), np.float32)
    return out


def forward_numpy(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Logits in float64 numpy: the arbiter for the JAX/torch output-equality check."""
    n_layers = len([k for k in weights if k.startswith("w")])
    h = x.astype(np.float64)
    for i in range(n_layers):
        h = h @ weights[f"w{i}"].astype(np.float64) + weights[f"b{i}"].astype(np.float64)
        if i < n_layers - 1:
            h = np.tanh(h)
    return h


def per_example_ce_numpy(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    m = logits.max(1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(1)) + m[:, 0]
    return lse - logits[np.arange(len(y)), y]


def to_influx_scale(peer_scores: np.ndarray, n_train: int) -> np.ndarray:
    """pyDVL / kronfluence ``g_t^T (H+lambda I)^-1 g_m`` -> influx ``(1/N)`` times it."""
    return np.asarray(peer_scores, np.float64) / n_train


def score_accuracy(scores: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Pearson correlation (flattened) and relative Frobenius error against a reference."""
    s = np.asarray(scores, np.float64).ravel()
    r = np.asarray(reference, np.float64).ravel()
    if not np.all(np.isfinite(s)):
        return {"pearson": float("nan"), "rel_error": float("nan"), "finite": False}
    sc, rc = s - s.mean(), r - r.mean()
    denom = np.linalg.norm(sc) * np.linalg.norm(rc)
    pearson = float(sc @ rc / denom) if denom > 0 else float("nan")
    rel = float(np.linalg.norm(s - r) / np.linalg.norm(r))
    return {"pearson": pearson, "rel_error": rel, "finite": True}
