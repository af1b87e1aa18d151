"""Throughput of the compiled response functions: vmapped vs a loop of single solves vs Python.

For 64 removed training examples, the PBRF and the warm-start LOO are solved with 100
full-batch Adam steps each, and with 500 Adam steps on minibatches of 32 (``tol=0``: every
variant runs all steps), three ways:

* ``vmapped``: ``influx.response.pbrf/loo(..., removed=64 indices)`` -- one compiled
  program (``lax.scan`` over steps, ``vmap`` over the 64 examples);
* ``loop of compiled single solves``: the same compiled program for one removed example,
  called 64 times (compiled once; the internal compiled function is called directly, so
  argument validation is not counted against the loop);
* ``Python loop``: a ``jax.jit``-ed step function (value-and-grad + optax update) called
  from a Python ``for`` loop over steps, for each removed example in turn -- what one
  writes without influx.

Problems (float32, on the default device):

* digits MLP 64-32-10 tanh, softmax cross-entropy, l2 = 1e-3 (scikit-learn digits,
  1,438 training examples);
* UCI Concrete MLP 8-32-1 tanh, squared error, l2 = 1e-3 (../shared/data/uci-concrete.txt,
  standardised, 824 training examples).

``theta_s`` comes from 2,000 full-batch Adam steps. The vmapped variant is run with all
64 examples in one ``vmap`` and with ``chunk_size=8`` (``lax.map`` over chunks of 8).
Compile time is excluded (every variant is run once before timing) and reported
separately. Steps/s counts optimizer steps summed over the removed examples.
Target (issue 5): vmapped >= 8x faster than the loop of compiled single solves on CPU.

Run: ``python -m benchmarks.response [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import influx
from benchmarks import common
from influx import data as ixdata
from influx import models, response
from influx.attribution import _bind_measurement

MB = 32  # minibatch size of the minibatch rows


def problems(quick: bool):
    out = {}
    d = ixdata.load("digits", seed=0)
    model = models.MLP(widths=(32,), out=10)
    obj = influx.Objective(models.apply_fn(model), influx.losses.softmax_cross_entropy, l2=1e-3)
    out["digits 64-32-10"] = (obj, models.init(model, d.train[0][:1], seed=0), d)
    c = ixdata.load("concrete", data_dir=common.HERE.parent.parent / "shared" / "data", seed=0)
    model = models.MLP(widths=(32,), out=1)
    obj = influx.Objective(models.apply_fn(model), influx.losses.squared_error, l2=1e-3)
    out["concrete 8-32-1"] = (obj, models.init(model, c.train[0][:1], seed=0), c)
    return out


def bench_one(obj, params, train, test, removed, *, kind, opt, steps, damping, repeats, batch_size=None):
    # tol=0: no example is frozen or stops early, so every variant runs exactly `steps` steps
    kw = dict(test=test, optimizer=opt, steps=steps, warn=False, keep_params=False, batch_size=batch_size,
              tol=0.0)
    if kind == "pbrf":
        kw["damping"] = damping
        call = lambda rem, chunk: response.pbrf(obj, params, train, rem, chunk_size=chunk, **kw)
    else:
        call = lambda rem, chunk: response.loo(obj, params, train, rem, chunk_size=chunk, **kw)
    n = len(train[0])
    r = len(removed)

    # vmapped: one call, public API (validation included); all 64 in one vmap, and
    # lax.map over chunks of 8 vmapped examples (smaller working set: fits the CPU caches)
    compile_v = {}
    for chunk in (r, 8):
        t0 = time.perf_counter()
        jax.block_until_ready(call(removed, chunk).delta)
        compile_v[chunk] = time.perf_counter() - t0

    def vmapped():
        return jax.block_until_ready(call(removed, r).delta)

    def vmapped8():
        return jax.block_until_ready(call(removed, 8).delta)

    # loop of compiled single solves: the compiled program itself, one example per call
    measure = _bind_measurement(obj, None)
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
    coef = jnp.asarray(response._coefficients(kind, obj.l2, damping if kind == "pbrf" else 0.0), dtype)
    program = response._Program(step=response._step_adapter(opt, params), steps=steps, batch_size=batch_size,
                                chunk_size=1, keep_params=False, measure=measure, observe=None)
    a = jnp.asarray(1.0 / n, dtype)
    eps1 = jnp.full((1,), -1.0 / n, dtype)
    tol = jnp.asarray(0.0, dtype)  # as in the vmapped call
    key = jax.random.key(0)
    rems = [jnp.asarray([m], jnp.int32) for m in removed]

    def single(m):
        return response._run(params, params, train, test, m, eps1, a, coef, tol, tol, key,
                             obj=obj, program=program)["delta"]

    t0 = time.perf_counter()
    jax.block_until_ready(single(rems[0]))
    compile_s = time.perf_counter() - t0

    def loop_single():
        return jax.block_until_ready(jnp.concatenate([single(m) for m in rems]))

    # plain Python loop: jit per step, Python for-loop over steps and removed examples
    aux = response._pbrf_aux(obj, params, train)
    F = response._make_objective(obj, params, train, aux, a, coef, n)

    @jax.jit
    def step(th, st, m, idx):
        g = jax.grad(F)(th, m, eps1[0], idx)
        upd, st = opt.update(g, st, th)
        return optax.apply_updates(th, upd), st

    if batch_size is None:
        batches = [None] * steps
    else:  # the data order of response._run and models.train (seed 0)
        batches = list(models.minibatch_indices(n, batch_size=batch_size, steps=steps, seed=key))
    # XLA's count of the FLOPs of one solve's step (the gradient of its objective on one
    # batch; the optimizer update is not counted): the arithmetic every variant must do
    idx0 = None if batch_size is None else batches[0]
    cost = jax.jit(lambda th: jax.grad(F)(th, jnp.int32(removed[0]), eps1[0], idx0)).lower(
        params).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    step_flops = float(cost.get("flops", float("nan")))
    f = jax.jit(lambda p: jax.vmap(lambda ex: measure(p, ex))(test))
    f_s = f(params)
    jax.block_until_ready(step(params, opt.init(params), jnp.int32(0), batches[0]))

    def python_loop(subset=removed):
        rows = []
        for m in subset:
            th, st = params, opt.init(params)
            mm = jnp.int32(m)
            for idx in batches:
                th, st = step(th, st, mm, idx)
            rows.append(f(th) - f_s)
        return jax.block_until_ready(jnp.stack(rows))

    # agreement of the three (same math, same steps)
    dv, dl, dp = np.asarray(vmapped()), np.asarray(loop_single()), np.asarray(python_loop(removed[:4]))
    scale = float(np.max(np.abs(dv))) + 1e-30
    agree = {"vmapped_vs_loop": float(np.max(np.abs(dv - dl))) / scale,
             "vmapped_vs_python": float(np.max(np.abs(dv[:4] - dp))) / scale}

    times = {"vmapped": [], "vmapped, chunks of 8": [], "loop of compiled single solves": [],
             "Python loop": []}
    for _ in range(repeats):
        for name, fn in (("vmapped", vmapped), ("vmapped, chunks of 8", vmapped8),
                         ("loop of compiled single solves", loop_single), ("Python loop", python_loop)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    total = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "kind": kind, "removed": r, "steps": steps, "n_train": n, "batch_size": batch_size,
        "load_average_1min": os.getloadavg()[0],
        "total_s": total,
        "steps_per_s": {k: r * steps / v for k, v in total.items()},
        "speedup_vs_loop": total["loop of compiled single solves"] / total["vmapped"],
        "speedup_vs_python": total["Python loop"] / total["vmapped"],
        "speedup_chunks8_vs_loop": total["loop of compiled single solves"] / total["vmapped, chunks of 8"],
        "speedup_chunks8_vs_python": total["Python loop"] / total["vmapped, chunks of 8"],
        "first_call_s": {"vmapped": compile_v[r], "vmapped, chunks of 8": compile_v[8], "single": compile_s},
        "relative_disagreement": agree,
        "step_flops": step_flops,
        "total_flops": step_flops * r * steps,
    }


def peak_gflops(n: int = 1024, repeats: int = 10) -> float:
    """The default device's float32 rate on one large (n x n) @ (n x n) product, GFLOP/s."""
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    jax.block_until_ready(mm(a))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(mm(a))
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / float(np.median(ts)) / 1e9


def bound(r: dict, peak: float) -> float:
    """Largest possible vmapped speed-up over the loop of single solves on this machine:
    the loop's time over the time of the vmapped program's FLOPs at the peak GEMM rate."""
    return r["total_s"]["loop of compiled single solves"] / (r["total_flops"] / (peak * 1e9))


def render(payload: dict) -> str:
    """The README section (table and explanation) from a saved payload."""
    rows = []
    for key, r in payload["results"].items():
        t, sp = r["total_s"], r["steps_per_s"]
        regime = "full batch" if r["batch_size"] is None else f"batch {r['batch_size']}"
        rows.append([key.split(" / ")[0], "PBRF" if r["kind"] == "pbrf" else "warm LOO",
                     f"{regime}, {r['steps']} steps",
                     t["vmapped"], t["vmapped, chunks of 8"], t["loop of compiled single solves"],
                     t["Python loop"], sp["vmapped"], sp["loop of compiled single solves"],
                     r["speedup_vs_loop"], r["speedup_chunks8_vs_loop"], r["speedup_vs_python"],
                     r["total_flops"] / 1e9, r["total_flops"] / t["vmapped"] / 1e9,
                     bound(r, payload["peak_gflops"]),
                     r["relative_disagreement"]["vmapped_vs_loop"], r["load_average_1min"]])
    table = common.md_table(
        ["problem", "object", "regime", "vmapped s", "vmapped/8 s", "single loop s", "Python loop s",
         "vmapped steps/s", "single steps/s", "vmapped x single", "vmapped/8 x single", "vmapped x Python",
         "GFLOP", "vmapped GFLOP/s", "bound x single", "rel. disagreement", "load"],
        rows)
    m, load, quick = payload["machine"], payload["load_average_1min_start_end"], payload["quick"]
    rates = [r["total_flops"] / r["total_s"]["vmapped"] / 1e9 for r in payload["results"].values()]
    target = payload["target_vmapped_ge_8x_loop"]
    return "\n".join([
        f"`python -m benchmarks.response{' --quick' if quick else ''}` -- {payload['removed']} removed "
        "examples, Adam(1e-3), float32, tol=0 (every variant runs all steps): "
        f"{payload['steps_full_batch']} full-batch steps, or {payload['steps_minibatch']} steps on "
        f"minibatches of {payload['minibatch_size']} "
        "(seeded per-epoch permutations shared by all removed examples: a few epochs of SGD-style "
        "retraining). Median of 2 interleaved runs after a compiling run: compare the ratios within a "
        "row, not seconds across rows. 'vmapped': all removed examples in one vmap (chunk_size=64); "
        "'vmapped/8': lax.map over chunks of 8 vmapped examples; 'single loop' calls the same compiled "
        "program (chunk_size=1, compiled once) once per removed example; 'Python loop' is a jit-ed step "
        "in a Python for-loop. Steps/s = removed x steps / time. 'rel. disagreement': max |delta "
        "difference| vmapped vs single loop relative to max |delta|; 'load': 1-minute load average "
        "after the row (another process shared the 2 cores). 'GFLOP': XLA's cost analysis of one "
        "solve's step (the objective's gradient on its batch; optimizer update not counted) times "
        "removed x steps; 'bound x single': the single loop's time over the time those FLOPs take "
        f"at this machine's peak float32 GEMM rate ({payload['peak_gflops']:.0f} GFLOP/s on one "
        "1024 x 1024 product, measured in this run) -- no vmapped program can beat the loop by "
        "more on this machine, and the real ceiling is lower (small products and tanh run far "
        "below the large-GEMM rate).",
        "",
        common.machine_line(m)
        + f" 1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the end"
        + (" (other processes shared the cores: timings are noisy)." if max(load) > 1.5 else "."),
        "",
        table,
        "",
        "Target vmapped >= 8x the loop of compiled single solves: "
        + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in target.items()) + ".",
        "",
        "Unreachable on this machine (bound < 8): "
        + (", ".join(k for k, r in payload["results"].items() if bound(r, payload["peak_gflops"]) < 8)
           or "none") + ".",
        "",
        "Why (measured with XLA's profiler and HLO dumps):",
        "",
        "* Full batch (~1,000 examples per step): a single solve is already compute-bound on a CPU "
        "(dense layers and tanh over all N examples; per-step overhead is a small share), so "
        "vmapping can only remove that overhead and spread the elementwise work over both cores. "
        "Earlier the vmapped program lost to the loop (0.5-1.0x, previous table): with inputs shared "
        "by the vmapped solves XLA turns the first layer into one (n, d) @ (d, 64 h) product and "
        "transposes its output and gradient to and from (64, n, h) with a strided copy every step (as "
        "costly as the layer itself on the Concrete MLP), and the per-step objective value (used only "
        "for a finiteness check) added a slow fused reduction. Now each vmapped solve gets its own "
        "copy of the inputs while the copies are small (CPU only, <= 8 MiB: every layer becomes a "
        "batched product in its natural layout), first-order steps compute only the gradient, and a "
        "full-batch chunk stops as soon as all its examples have converged (not exercised here: "
        "tol=0). The digits MLP (64 inputs, 1,438 examples) stays compute-bound: vmapped and single "
        "solves do the same FLOPs at about the same rate.",
        "* Minibatches: a single solve's step is small and overhead-bound (dozens of tiny kernels per "
        "step), so vmapping 64 solves pays off more, but on a CPU the batched step soon becomes "
        "compute-bound too (tanh and the batched products of 64 x 32 examples).",
        "* Disagreement: float32 Adam amplifies rounding where the true gradient is ~0 (Adam steps "
        "~lr whatever the gradient's size): the minibatch PBRF, whose Bregman gradient is exactly 0 "
        "at theta_s and is a cancelling sum scaled by N/B, shows it most. In float64 the vmapped, "
        "replicated and single programs agree to 1e-9 (tests/test_response.py).",
        "* The 8x target assumes per-step overhead dominates; on this 2-core CPU it does not. "
        "Where the 'bound' column is below 8 the target is out of reach on this machine whatever "
        "the program (the FLOPs alone, at the large-GEMM rate, take more than 1/8 of the loop's "
        "time). Elsewhere the vmapped programs run at "
        f"{min(rates):.0f}-{max(rates):.0f} GFLOP/s against the {payload['peak_gflops']:.0f} of "
        "one large product: a vmapped step is about 50 small kernels (batched products with "
        "8-64 wide operands, tanh, the Adam update and the per-step finiteness bookkeeping over "
        "64 copies of the parameters), which XLA's CPU backend runs far below its GEMM rate. "
        "The batched program's advantage is expected on accelerators (one large kernel per layer "
        "instead of 64 small ones); none was available to measure it.",
    ])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few steps and removed examples (smoke run)")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite the README section from benchmarks/results/response.json")
    args = ap.parse_args(argv)
    if args.render:
        payload = json.loads((common.RESULTS / "response.json").read_text())
        common.write_section("Response functions", render(payload))
        return
    quick = args.quick
    steps = 20 if quick else 100
    mb_steps = 50 if quick else 500
    n_removed = 16 if quick else 64
    repeats = 1 if quick else 2
    regimes = (("full batch", None, steps), (f"batch {MB}", MB, mb_steps))
    opt = optax.adam(1e-3)
    load_start = os.getloadavg()[0]
    peak = peak_gflops()
    results = {}
    for name, (obj, init, ds) in problems(quick).items():
        train = (jnp.asarray(ds.train[0]), jnp.asarray(ds.train[1]))
        test = (jnp.asarray(ds.test[0][:32]), jnp.asarray(ds.test[1][:32]))
        params = models.train(obj.apply_fn, obj.loss_fn, init, train, l2=obj.l2,
                              optimizer=optax.adam(1e-2), steps=200 if quick else 2000).params
        removed = list(np.random.default_rng(0).choice(len(train[0]), n_removed, replace=False))
        for regime, bs, st in regimes:
            for kind in ("pbrf", "loo"):
                r = bench_one(obj, params, train, test, [int(m) for m in removed], kind=kind, opt=opt,
                              steps=st, damping=1e-3, repeats=repeats, batch_size=bs)
                results[f"{name} / {regime} / {kind}"] = r
                print(name, regime, kind, {k: round(v, 3) for k, v in r["total_s"].items()},
                      f"x{r['speedup_vs_loop']:.2f}", f"load {r['load_average_1min']:.1f}", flush=True)
    target = {k: max(v["speedup_vs_loop"], v["speedup_chunks8_vs_loop"]) >= 8.0 for k, v in results.items()}
    payload = {"machine": common.machine(), "quick": quick, "steps_full_batch": steps,
               "steps_minibatch": mb_steps, "minibatch_size": MB, "removed": n_removed,
               "optimizer": "adam(1e-3)", "results": results, "target_vmapped_ge_8x_loop": target,
               "peak_gflops": peak,
               "load_average_1min_start_end": (load_start, os.getloadavg()[0])}
    path = common.save_json("response", payload)
    body = render(payload)
    common.write_section("Response functions", body)
    print(body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
