"""EK-FAC influence on an NNX CNN with BatchNorm: explain predictions, find flipped labels.

    python examples/cnn_mnist.py [--data-dir ../shared/data] [--out cnn_mnist.png] [--quick]

1. MNIST (the 10,000-image IDX file in ``--data-dir`` or ``$INFLUX_DATA_DIR``; default
   ``../shared/data``) is split into training and test images; ``--flip`` of the training
   labels (10% by default) are flipped to a different class.
2. A ``flax.nnx`` CNN (two 3x3 convolutions with BatchNorm and ReLU, 2x2 average pooling,
   two dense layers; ~106k parameters) is trained with a user-written optax loop (Adam,
   minibatches, BatchNorm in training mode) on ``mean CE + l2/2 ||theta||^2``, the
   objective influence assumes.
3. ``module.eval()`` then :func:`influx.flax.from_nnx` give ``(apply_fn, params)``: the
   convolutions and dense layers get Kronecker-factored EK-FAC blocks, the BatchNorm
   scales and biases the exact Gauss-Newton diagonal (``influx.solvers.ekfac.layers``);
   BatchNorm's running statistics are held fixed (inference mode).
4. :func:`influx.influence` with :func:`influx.solvers.ekfac` scores every training image
   against a few test images (``S[t, m]`` = predicted change of test loss ``t`` when
   training image ``m`` is removed: positive = helpful, negative = harmful), and
   :func:`influx.self_influence` ranks the training images by how much the model bends to
   fit them. The flipped images should be at the top: precision and recall of the top
   ``n_flipped`` against the flipped ones are printed next to the training loss and a
   random ranking (its expectation: precision = recall = the flip fraction).
5. A PNG shows, for each query, the test image and its most helpful and most harmful
   training images (with their possibly flipped labels).

About 2-4 minutes on 2 CPU cores (``--quick``: under a minute, a smaller run).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import nnx

import influx
from influx import data as idata

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class CNN(nnx.Module):
    """conv3x3(c1) - BN - ReLU - avgpool2 - conv3x3(c2) - BN - ReLU - avgpool2 - dense - dense."""

    def __init__(self, *, c1: int = 16, c2: int = 32, hidden: int = 64, classes: int = 10,
                 rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, c1, kernel_size=(3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(c1, rngs=rngs)
        self.conv2 = nnx.Conv(c1, c2, kernel_size=(3, 3), rngs=rngs)
        self.bn2 = nnx.BatchNorm(c2, rngs=rngs)
        self.fc1 = nnx.Linear(7 * 7 * c2, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.avg_pool(nnx.relu(self.bn1(self.conv1(x))), (2, 2), strides=(2, 2))
        x = nnx.avg_pool(nnx.relu(self.bn2(self.conv2(x))), (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[:-3] + (-1,))
        return self.fc2(nnx.relu(self.fc1(x)))


def load_mnist(data_dir, n_train: int, n_test: int, *, seed: int = 0):
    """``(x_train, y_train, x_test, y_test)`` images ``(N, 28, 28, 1)``, standardised."""
    d = Path(data_dir).expanduser() if data_dir else idata.default_data_dir()
    if d is None or not (d / "mnist-t10k-images-idx3-ubyte.gz").exists():
        raise SystemExit(
            f"cnn_mnist: MNIST file mnist-t10k-images-idx3-ubyte.gz not found in {str(d)!r}: "
            "pass --data-dir DIR or set INFLUX_DATA_DIR to the directory holding the MNIST "
            "IDX files")
    ds = idata.load("mnist", data_dir=d, n_train=n_train, n_test=n_test, seed=seed, flatten=False)
    (xtr, ytr), (xte, yte) = ds.train, ds.test
    return xtr.reshape(-1, 28, 28, 1), ytr, xte.reshape(-1, 28, 28, 1), yte


def train(model: CNN, x, y, *, l2: float, steps: int, batch: int = 128, lr: float = 3e-3,
          seed: int = 0) -> list[float]:
    """A user's optax loop: Adam on ``mean CE + l2/2 ||params||^2``, BatchNorm in train mode."""
    model.train()
    opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    def objective(m, xb, yb):
        ce = influx.losses.softmax_cross_entropy(m(xb), yb).mean()
        sq = sum(jnp.vdot(p, p) for p in jax.tree_util.tree_leaves(nnx.state(m, nnx.Param)))
        return ce + 0.5 * l2 * sq

    @nnx.jit
    def step(m, o, xb, yb):
        val, g = nnx.value_and_grad(objective)(m, xb, yb)
        o.update(m, g)
        return val

    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        idx = rng.choice(len(x), size=batch, replace=False)
        losses.append(float(step(model, opt, jnp.asarray(x[idx]), jnp.asarray(y[idx]))))
    model.eval()
    return losses


def precision_recall(scores, flipped) -> tuple[float, float]:
    """Precision and recall of the top ``flipped.sum()`` scores against the flipped mask."""
    k = int(flipped.sum())
    top = np.argsort(-np.asarray(scores))[:k]
    hits = int(flipped[top].sum())
    return hits / k, hits / k  # equal when the flagged count is the flipped count


def grid(path, x_test, y_test, queries, x_train, y_train, flipped, S, k: int = 5):
    """For each query one row: the test image, its ``k`` most helpful and ``k`` most harmful."""
    fig, axes = plt.subplots(len(queries), 2 * k + 1, figsize=(1.3 * (2 * k + 1), 1.5 * len(queries)),
                             squeeze=False)
    for r, (q, row) in enumerate(zip(queries, S)):
        helpful, harmful = np.argsort(-row)[:k], np.argsort(row)[:k]
        cells = [(x_test[q], f"query {q}\ny={y_test[q]}", "k")]
        cells += [(x_train[m], f"+{row[m]:.1e}\ny={y_train[m]}" + ("*" if flipped[m] else ""), "g")
                  for m in helpful]
        cells += [(x_train[m], f"{row[m]:.1e}\ny={y_train[m]}" + ("*" if flipped[m] else ""), "r")
                  for m in harmful]
        for ax, (img, title, color) in zip(axes[r], cells):
            ax.imshow(np.asarray(img)[..., 0], cmap="gray")
            ax.set_title(title, fontsize=7, color=color)
            ax.axis("off")
    fig.suptitle(f"EK-FAC influence: query | {k} most helpful (green) | {k} most harmful (red); "
                 "* = flipped label", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("INFLUX_DATA_DIR"),
                    help="directory with mnist-t10k-*-idx*-ubyte.gz (default $INFLUX_DATA_DIR "
                         "or ../shared/data)")
    ap.add_argument("--out", default="cnn_mnist.png", help="PNG of helpful/harmful images")
    ap.add_argument("--quick", action="store_true", help="smaller run (< 60 s)")
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="training steps")
    ap.add_argument("--flip", type=float, default=0.1, help="fraction of training labels flipped")
    ap.add_argument("--l2", type=float, default=1e-4)
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    n_train = args.n_train or (1000 if args.quick else 4000)
    steps = args.steps or (300 if args.quick else 1200)
    t_start = time.perf_counter()

    x_train, y_clean, x_test, y_test = load_mnist(args.data_dir, n_train, 500, seed=args.seed)
    y_train, flipped = idata.flip_labels(y_clean, args.flip, 10, seed=args.seed)
    flipped = np.asarray(flipped)

    model = CNN(rngs=nnx.Rngs(args.seed))
    t0 = time.perf_counter()
    losses = train(model, x_train, y_train, l2=args.l2, steps=steps, seed=args.seed)
    t_train = time.perf_counter() - t0
    apply_fn, params = influx.flax.from_nnx(model)
    obj = influx.Objective(apply_fn, influx.losses.softmax_cross_entropy, l2=args.l2)
    acc = float(np.mean(np.argmax(np.asarray(apply_fn(params, jnp.asarray(x_test))), -1) == y_test))
    n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
    cov = influx.solvers.ekfac.coverage(apply_fn, params, jnp.asarray(x_train[:1]))
    print(f"CNN: {n_params:,} parameters ({cov:.1%} in Kronecker blocks), trained {steps} steps "
          f"in {t_train:.1f} s (final minibatch objective {np.mean(losses[-20:]):.3f}); "
          f"test accuracy {acc:.3f}; {int(flipped.sum())} of {n_train} training labels flipped")

    train_set = (jnp.asarray(x_train), jnp.asarray(y_train))
    queries = [0, 1, 2] if args.quick else [0, 1, 2, 3]
    test_set = (jnp.asarray(x_test[queries]), jnp.asarray(y_test[queries]))
    # EK-FAC with no residual check (like kronfluence): the residual product would cost one
    # more pass over the data per query, and Kronecker factors are an approximation anyway
    solver = influx.solvers.ekfac(residual=False)
    t0 = time.perf_counter()
    S = np.asarray(influx.influence(obj, params, train_set, test_set, damping=args.damping, solver=solver))
    t_inf = time.perf_counter() - t0
    t0 = time.perf_counter()
    self_inf = np.asarray(influx.self_influence(obj, params, train_set, damping=args.damping, solver=solver))
    t_self = time.perf_counter() - t0

    train_loss = np.asarray(influx.losses.softmax_cross_entropy(apply_fn(params, train_set[0]), train_set[1]))
    p_self, r_self = precision_recall(self_inf, flipped)
    p_loss, r_loss = precision_recall(train_loss, flipped)
    print(f"influence of {n_train} training images on {len(queries)} test images: {t_inf:.1f} s; "
          f"self-influence of all {n_train}: {t_self:.1f} s")
    print(f"flag the top {int(flipped.sum())} as mislabelled:  self-influence precision/recall "
          f"{p_self:.2f}/{r_self:.2f}   training loss {p_loss:.2f}/{r_loss:.2f}   random "
          f"{flipped.mean():.2f}/{flipped.mean():.2f} (expected)")
    for q, row in zip(queries, S):
        top = np.argsort(-row)[:5]
        print(f"  query {q} (label {y_test[q]}): most helpful {top.tolist()} with labels "
              f"{y_train[top].tolist()}; most harmful {np.argsort(row)[:5].tolist()}")
    path = grid(args.out, x_test, y_test, queries, x_train, y_train, flipped, S)
    print(f"wrote {path}; total {time.perf_counter() - t_start:.1f} s")
    return {"scores": S, "self_influence": self_inf, "flipped": flipped, "precision_self": p_self,
            "precision_loss": p_loss, "test_accuracy": acc, "coverage": cov, "png": str(path)}


if __name__ == "__main__":
    main()
