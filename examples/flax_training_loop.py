"""Train a Flax MLP on scikit-learn digits, then explain a misclassified test image.

    python examples/flax_training_loop.py influence_digits.png

1. A linen MLP (64-64-10, tanh) is trained with optax (Adam, minibatches) on the
   objective influx assumes: mean cross-entropy + l2/2 ||theta||^2.
2. ``influx.flax.from_linen`` turns the module and its variables into ``(apply_fn,
   params)``; ``influx.influence`` scores every training image against a misclassified
   test image (GNH curvature, CG solver, JVP scoring: no per-example gradients).
3. The most helpful (removing them would raise the test loss most) and most harmful
   (removing them would lower it most) training images are listed and saved as a PNG
   grid (first row: the test image and the helpful ones; second row: the harmful ones).

Runs in well under a minute on a CPU.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

import influx
from influx import data as idata

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class MLP(nn.Module):
    hidden: int = 64
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(self.hidden)(x))
        return nn.Dense(self.classes)(x)


def train(module, params, x, y, *, l2, steps=1500, batch=128, lr=3e-3, seed=0):
    opt = optax.adam(lr)

    def loss(p, xb, yb):
        logits = module.apply({"params": p}, xb)
        ce = influx.losses.softmax_cross_entropy(logits, yb).mean()
        return ce + 0.5 * l2 * sum(jnp.vdot(a, a) for a in jax.tree_util.tree_leaves(p))

    @jax.jit
    def step(p, s, idx):
        val, g = jax.value_and_grad(loss)(p, x[idx], y[idx])
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, val

    rng = np.random.default_rng(seed)
    s = opt.init(params)
    for _ in range(steps):
        params, s, val = step(params, s, rng.choice(len(y), batch, replace=False))
    return params, float(loss(params, x, y))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("out", nargs="?", default="influence_digits.png", help="output PNG path")
    ap.add_argument("--top", type=int, default=6, help="images per row")
    ap.add_argument("--l2", type=float, default=1e-3)
    ap.add_argument("--damping", type=float, default=1e-3)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    ds = idata.load("digits", seed=0)
    (xtr, ytr), (xte, yte) = ds.train, ds.test
    xtr, xte = jnp.asarray(xtr), jnp.asarray(xte)
    ytr, yte = jnp.asarray(ytr), jnp.asarray(yte)
    module = MLP()
    variables = module.init(jax.random.PRNGKey(0), xtr[:1])
    params, final = train(module, variables["params"], xtr, ytr, l2=args.l2)
    variables = {**variables, "params": params}

    apply_fn, params = influx.flax.from_linen(module, variables)
    obj = influx.Objective(apply_fn, influx.losses.softmax_cross_entropy, l2=args.l2)
    pred = np.asarray(jnp.argmax(apply_fn(params, xte), -1))
    acc = float(np.mean(pred == np.asarray(yte)))
    wrong = np.nonzero(pred != np.asarray(yte))[0]
    print(f"trained: objective {final:.4f}, test accuracy {acc:.3f}, {len(wrong)} misclassified "
          f"({time.perf_counter() - t0:.1f}s)")
    if len(wrong) == 0:
        print("no misclassified test image; nothing to explain")
        return
    t = int(wrong[0])
    test = (xte[t:t + 1], yte[t:t + 1])
    solver = influx.solvers.cg(tol=1e-4, max_steps=500)  # float32: do not ask for more
    scores, info = influx.influence(obj, params, (xtr, ytr), test, kind="gnh", damping=args.damping,
                                    solver=solver, return_info=True)
    s = np.asarray(scores[0])
    print(f"test image {t}: label {int(yte[t])}, predicted {int(pred[t])}; scored {len(s)} training "
          f"images ({info.method} path, CG {int(info.iterations[0])} steps, "
          f"converged={bool(info.converged[0])}) in {time.perf_counter() - t0:.1f}s total")
    k = args.top
    helpful = np.argsort(-s)[:k]
    harmful = np.argsort(s)[:k]
    ytr_np = np.asarray(ytr)
    print("most helpful (removing raises the test loss):")
    for i in helpful:
        print(f"  train #{i:4d} label {ytr_np[i]}  score {s[i]:+.3e}")
    print("most harmful (removing lowers the test loss):")
    for i in harmful:
        print(f"  train #{i:4d} label {ytr_np[i]}  score {s[i]:+.3e}")

    img = lambda v: np.asarray(v).reshape(8, 8)
    fig, axes = plt.subplots(2, k + 1, figsize=(1.6 * (k + 1), 4.2))
    axes[0, 0].imshow(img(xte[t]), cmap="gray_r")
    axes[0, 0].set_title(f"test: y={int(yte[t])}\npred={int(pred[t])}", fontsize=8)
    axes[1, 0].axis("off")
    for row, idx, name in ((0, helpful, "helpful"), (1, harmful, "harmful")):
        for j, i in enumerate(idx):
            ax = axes[row, j + 1]
            ax.imshow(img(xtr[i]), cmap="gray_r")
            ax.set_title(f"{name} #{i}\ny={ytr_np[i]} {s[i]:+.1e}", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("influx: training images that most raise / lower the test loss when removed", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"saved {args.out} ({time.perf_counter() - t0:.1f}s)")


if __name__ == "__main__":
    main()
