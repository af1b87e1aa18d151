"""Subset retraining: ``influx.response.retrain`` (vmapped) vs a loop of compiled single retrainings.

M = 128 random subsets of the digits training set (each drops 10% of the 1,438 examples,
``influx.response.random_subsets``) are retrained from the original initialisation with
the original optimizer, steps, minibatch order and seed, two ways, side by side in one run:

* ``vmapped``: ``influx.response.retrain(..., weights=(128, N) masks)`` -- the public call
  (validation and the extra all-ones baseline run included), ``chunk_size`` runs per
  ``vmap`` inside one compiled program; with ``chunk_size`` 128, 32 and 8;
* ``loop of compiled single retrainings``: ``influx.models.train``'s compiled loop
  (``models._train_jit`` with the mask as its per-example weights, compiled once) and a
  compiled test measurement, called once per mask from Python -- what one writes with
  ``models.train`` alone.

Problem: digits MLP 64-32-10 tanh, softmax cross-entropy, l2 = 1e-3, float32; two
regimes: SGD with momentum on minibatches of 32 (``steps_mb`` steps, a few epochs) and
full-batch Adam (``steps_fb`` steps). Compile time is excluded (every variant runs once
first) and reported separately; times are the minimum of ``repeats`` interleaved runs (the
least disturbed on a shared machine; medians are saved too).
The FLOP bound is computed as in ``benchmarks/response.py``: XLA's FLOP count of one
run's step (the weighted objective's gradient on one batch) times steps times M, at the
machine's measured peak float32 GEMM rate; the loop's time over that is the largest
speed-up any program could reach over the loop on this machine.

Target (issue 12): vmapped >= 2x faster than the loop for M = 128 on the CPU.

Run: ``python -m benchmarks.retrain [--quick]`` (writes ``benchmarks/results/retrain.json``).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import influx
from benchmarks import common
from benchmarks.response import peak_gflops
from influx import data as ixdata
from influx import models, response

MB = 32


def _problem():
    d = ixdata.load("digits", seed=0)
    model = models.MLP(widths=(32,), out=10)
    obj = influx.Objective(models.apply_fn(model), influx.losses.softmax_cross_entropy, l2=1e-3)
    train = (jnp.asarray(d.train[0]), jnp.asarray(d.train[1]))
    test = (jnp.asarray(d.test[0][:64]), jnp.asarray(d.test[1][:64]))
    return obj, models.init(model, train[0][:1], seed=0), train, test


def bench_regime(obj, init, train, test, masks, *, opt, steps, batch_size, repeats):
    n = train[0].shape[0]
    m = masks.shape[0]
    kw = dict(test=test, optimizer=opt, steps=steps, batch_size=batch_size, seed=0)

    def vmapped(chunk):
        return lambda: response.retrain(obj, init, train, masks, chunk_size=chunk, **kw).delta

    variants = {"vmapped": vmapped(m), "vmapped, chunks of 32": vmapped(32),
                "vmapped, chunks of 8": vmapped(8)}

    # the loop: models.train's own compiled program, one call per mask (weights are traced)
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(init))
    l2 = jnp.asarray(obj.l2, dtype)
    key = jax.random.key(0)
    measure = jax.jit(lambda p: obj.per_example_loss(p, test))
    ws = [jnp.asarray(w, dtype) for w in masks]
    ones = jnp.ones((n,), dtype)

    def single(w):
        p, _ = models._train_jit(init, train[0], train[1], l2, key, w, f=obj.apply_fn,
                                 loss_fn=obj.loss_fn, opt=opt, steps=steps, batch_size=batch_size)
        return measure(p)

    def loop():
        base = single(ones)
        return jax.block_until_ready(jnp.stack([single(w) - base for w in ws]))

    variants["loop of compiled single retrainings"] = loop
    first = {}
    out = {}
    for name, fn in variants.items():
        t0 = time.perf_counter()
        out[name] = np.asarray(jax.block_until_ready(fn()))
        first[name] = time.perf_counter() - t0
    times = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    # the minimum over interleaved repeats: the least disturbed run (the machine is shared)
    total = {k: float(np.min(v)) for k, v in times.items()}
    median = {k: float(np.median(v)) for k, v in times.items()}
    ref = out["loop of compiled single retrainings"]
    scale = float(np.max(np.abs(ref))) + 1e-30
    disagree = float(np.max(np.abs(out["vmapped"] - ref))) / scale

    # XLA's FLOPs of one run's step: the gradient of the weighted objective on one batch
    idx = (None if batch_size is None
           else models.minibatch_indices(n, batch_size=batch_size, steps=1, seed=0)[0])

    def grad_step(p):
        xb, yb, wb = (train[0], train[1], ones) if idx is None else (train[0][idx], train[1][idx], ones[idx])
        J = lambda q: jnp.mean(wb * obj.loss_fn(obj.apply_fn(q, xb), yb)) + 0.5 * l2 * sum(
            jnp.vdot(a, a) for a in jax.tree_util.tree_leaves(q))
        return jax.grad(J)(p)

    cost = jax.jit(grad_step).lower(init).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    step_flops = float(cost.get("flops", float("nan")))
    return {
        "rows": m, "steps": steps, "batch_size": batch_size, "n_train": n,
        "total_s": total, "median_s": median, "first_call_s": first,
        "speedup_vs_loop": total["loop of compiled single retrainings"] / total["vmapped"],
        "speedup_chunks32_vs_loop": (total["loop of compiled single retrainings"]
                                     / total["vmapped, chunks of 32"]),
        "speedup_chunks8_vs_loop": (total["loop of compiled single retrainings"]
                                    / total["vmapped, chunks of 8"]),
        "relative_disagreement_vs_loop": disagree,
        "step_flops": step_flops, "total_flops": step_flops * steps * m,
        "load_average_1min": os.getloadavg()[0],
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer subsets and steps (smoke run)")
    args = ap.parse_args(argv)
    quick = args.quick
    m = 16 if quick else 128
    steps_mb, steps_fb = (20, 5) if quick else (200, 20)
    repeats = 1 if quick else 3
    load_start = os.getloadavg()[0]
    peak = peak_gflops()
    obj, init, train, test = _problem()
    masks = response.random_subsets(train[0].shape[0], m, alpha=0.1, seed=0)
    regimes = {f"minibatch {MB}, SGD momentum, {steps_mb} steps": (optax.sgd(0.05, momentum=0.9), steps_mb,
                                                                    MB),
               f"full batch, Adam, {steps_fb} steps": (optax.adam(1e-2), steps_fb, None)}
    results = {}
    for name, (opt, steps, bs) in regimes.items():
        r = bench_regime(obj, init, train, test, masks, opt=opt, steps=steps, batch_size=bs, repeats=repeats)
        r["flop_bound_vs_loop"] = r["total_s"]["loop of compiled single retrainings"] / (
            r["total_flops"] / (peak * 1e9))
        r["target_2x_met"] = max(r["speedup_vs_loop"], r["speedup_chunks32_vs_loop"],
                                 r["speedup_chunks8_vs_loop"]) >= 2.0
        results[name] = r
        print(name, {k: round(v, 3) for k, v in r["total_s"].items()}, f"x{r['speedup_vs_loop']:.2f}",
              f"(chunks of 32: x{r['speedup_chunks32_vs_loop']:.2f}, "
              f"of 8: x{r['speedup_chunks8_vs_loop']:.2f}; "
              f"FLOP bound x{r['flop_bound_vs_loop']:.1f})",
              f"disagreement {r['relative_disagreement_vs_loop']:.2g}", f"load {r['load_average_1min']:.1f}",
              flush=True)
    payload = {"machine": common.machine(), "quick": quick, "subsets": m, "alpha": 0.1,
               "problem": "digits MLP 64-32-10 tanh, float32, l2=1e-3, 64 test points", "results": results,
               "peak_gflops": peak, "load_average_1min_start_end": (load_start, os.getloadavg()[0]),
               "notes": "vmapped = the public influx.response.retrain call (validation and the all-ones "
                        "baseline run included, so it trains M + 1 models); the loop trains M + 1 too "
                        "(its baseline is one more call)."}
    if not quick:  # a smoke run writes nothing
        print("wrote", common.save_json("retrain", payload))


if __name__ == "__main__":
    main()
