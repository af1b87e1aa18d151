"""iHVP solvers: cost to reach a relative error, compile time, batched vs sequential.

Problems (float32, softmax cross-entropy, ``l2 = 1e-3``, GNH), trained full batch with
optax adam inside one ``lax.scan``, each at several dampings (the shift is
``l2 + damping``) to show where each solver family is usable:

* ``digits``: scikit-learn digits (standardised), MLP 64-32-10 tanh (P = 2,410),
  1,437 train, dampings 0, 1e-2, 1e-1; reference: the dense float64 GNH (``P`` products,
  once) eigendecomposed, solved for every damping (``--quick``: float64 CG, tol 1e-9).
* ``mnist``: MNIST t10k IDX from ``../shared/data`` (``influx.data.load``), 2,000 train
  (``--quick``: 1,000), MLP 784-32-10 tanh (P = 25,450), dampings 0 and 1e-1
  (``--quick``: 1e-1); reference: long CG in float64 (its relative residual is
  reported). A batched product of 16 vectors costs ~0.1 s on 2 CPU cores, so the grid
  is small.

Right-hand sides: gradients of the test loss of 16 test examples. For every damping,
solver and configuration (CG tolerance, LiSSA depth, Arnoldi rank) we record the worst
relative error ``max_j ||x_j - x*_j|| / ||x*_j||`` over the 16, the curvature products per
right-hand side in full-data-product equivalents (``prepare`` products divided by 16
when shared), the wall time of ``prepare`` + the batched solve of all 16 (compiled; AOT
compile time separately, once per configuration: the damping is an array leaf of the
operator, so the compiled code is reused across dampings), then for targets 1e-1, 1e-2,
1e-3 the cheapest configuration that reaches each. EK-FAC / K-FAC (``solvers.ekfac()``,
``solvers.kfac()``) use no products per solve except the one for their reported
residual; their factor passes are counted as ``(1 + K)/3`` products per pass (``K = 10``
outputs: one forward pass and ``K`` VJPs per example). Finally: batched (one ``vmap``-ed
call) vs sequential (16 calls) right-hand sides at one configuration per solver
(damping 0); ``cg (block)`` is ``cg(block=True)``, whose batched call is block CG (one
Krylov space for all 16) while its sequential calls are plain CG.

Preconditioned CG (``--only precond [--parts ...]``, ``results/solvers_precond.json``): a
dense float64 diagnosis of ``M^-1 A`` on a trained two-layer ReLU net (``diagnosis``); CG
steps, products and time to a relative residual of 1e-3 (float32) without and with EK-FAC /
K-FAC as preconditioner (``cg(preconditioner=ekfac(), precond_damping=...)``) and with
deflation (``cg(deflate=k)``) on a tanh CNN (two convolutions, P = 105,866, MNIST, N = 256)
and a two-block transformer (P ~ 26k, N = 256) at shift 2e-3 (``cnn``, ``transformer``; plus
host-driven vs compiled loops on the CNN and one GNH product standalone vs inside a
compiled ``fori_loop``), and on the trained ReLU CNN (N = 2000) and GELU transformer (P =
1.0M, N = 500) of ``benchmarks/models.py`` at its shift 1e-4 + 1e-2 (``cnn trained``,
``transformer trained``; ``--quick``: its quick sizes). Parts run separately are merged
into the results file.

Run: ``python -m benchmarks.solvers [--quick] [--only digits|mnist|precond] [--from-json]``.
Runtime on 2 shared CPU cores: default < 5 min, ``--quick`` < 90 s (both printed at the
end with the load average).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)  # float64 references; measured runs are float32

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import influx  # noqa: E402
from benchmarks import common  # noqa: E402
from influx import curvature, solvers  # noqa: E402
from influx.solvers._base import compiled  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (1e-1, 1e-2, 1e-3)
N_RHS = 16
DAMPINGS = {"digits": (0.0, 1e-2, 1e-1), "mnist": (0.0, 1e-1)}
QUICK_DAMPINGS = {"digits": (0.0, 1e-1), "mnist": (1e-1,)}


# ------------------------------------------------------------------ problems
def mlp_apply(params, x):
    h = x
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def init_mlp(key, widths, dtype=jnp.float32):
    keys = jax.random.split(key, len(widths) - 1)
    return [{"w": jax.random.normal(k, (a, b), dtype) / np.sqrt(a).astype(np.float32),
             "b": jnp.zeros((b,), dtype)} for k, a, b in zip(keys, widths[:-1], widths[1:])]


def train(obj, params, data, *, steps, lr):
    opt = optax.adam(lr)

    @jax.jit
    def run(params):
        def step(carry, _):
            p, s = carry
            loss, g = jax.value_and_grad(obj)(p, data)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), loss

        (p, _), losses = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
        return p, losses

    p, losses = run(params)
    gnorm = float(jnp.linalg.norm(ravel_pytree(jax.grad(obj)(p, data))[0]))
    return p, float(losses[-1]), gnorm


def load_problem(name, quick):
    from influx import data as D

    if name == "digits":
        ds = D.load("digits", seed=0)
        widths, steps, lr = (64, 32, 10), (500 if quick else 1000), 1e-2
    else:
        data_dir = os.environ.get("INFLUX_DATA_DIR", str(ROOT.parent / "shared" / "data"))
        ds = D.load("mnist", data_dir=data_dir, n_train=1000 if quick else 2000, n_test=N_RHS, seed=0)
        widths, steps, lr = (784, 32, 10), (200 if quick else 800), 3e-3
    train_data = (jnp.asarray(ds.train[0], jnp.float32), jnp.asarray(ds.train[1], jnp.int32))
    test_data = (jnp.asarray(ds.test[0][:N_RHS], jnp.float32), jnp.asarray(ds.test[1][:N_RHS], jnp.int32))
    obj = influx.Objective(mlp_apply, influx.losses.softmax_cross_entropy, l2=1e-3)
    params = init_mlp(jax.random.PRNGKey(0), widths)
    t0 = time.perf_counter()
    params, loss, gnorm = train(obj, params, train_data, steps=steps, lr=lr)
    info = {"n_train": int(train_data[0].shape[0]), "widths": list(widths),
            "P": int(ravel_pytree(params)[0].size), "train_steps": steps, "final_objective": loss,
            "grad_norm": gnorm, "train_s": time.perf_counter() - t0}
    rhs = curvature.per_example_grads(obj, params, test_data)
    return obj, params, train_data, rhs, info


# ------------------------------------------------------------------ measurement
def rel_errors(sol_x, ref):
    x = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(sol_x), np.float64)
    return np.linalg.norm(x - ref, axis=1) / np.linalg.norm(ref, axis=1)


def _timed(fn, *args, budget_s: float = 0.5, max_repeats: int = 3):
    """Result and wall time of ``fn(*args)``: the minimum over repeats while cheap."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    best = spent = time.perf_counter() - t0
    for _ in range(max_repeats - 1):
        if spent + best > budget_s:
            break
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return out, best


def measure(solver, op, rhs, ref, *, shared_prepare_products=0.0, cache=None):
    """Prepare + batched apply; AOT compile timed separately from the run.

    ``cache`` (a dict) keeps the compiled executables of ``solver`` so that later calls
    with an operator of the same structure (another damping) skip compilation; the
    compile time reported is the first one."""
    cache = {} if cache is None else cache
    hit = cache.get(id(solver))
    if hit is None:
        compile_s = 0.0
        inner = getattr(type(solver), "_prepare", None)  # the traced part of prepare, if any
        if inner is not None:
            t0 = time.perf_counter()
            prep_c = compiled(inner).lower(solver, op).compile()
            compile_s = time.perf_counter() - t0
        else:  # nothing to compile, or a Python-level prepare: compile + run together
            prep_c, compile_s = solver.prepare, float("nan")
        state = jax.block_until_ready(prep_c(op))
        t0 = time.perf_counter()
        apply_c = compiled(type(solver).apply_many).lower(solver, state, op, rhs).compile()
        compile_s += time.perf_counter() - t0
        hit = cache[id(solver)] = (prep_c, apply_c, compile_s)
    prep_c, apply_c, compile_s = hit
    state, prep_s = _timed(prep_c, op)
    sol, apply_s = _timed(apply_c, state, op, rhs)
    err = rel_errors(sol.x, ref)
    if "products" in sol.stats:  # lissa: minibatch products in full-product equivalents
        per_rhs = float(np.mean(np.asarray(sol.stats["products"])))
    else:
        per_rhs = float(np.mean(np.asarray(sol.iterations)))
    products = per_rhs + shared_prepare_products / rhs_count(rhs)
    if solver.name == "direct":
        products = float(np.asarray(sol.iterations).reshape(-1)[0]) / rhs_count(rhs)
    return {
        "solver": solver.name, "options": {k: str(v) for k, v in solver.options.items()},
        "max_rel_error": float(np.max(err)), "median_rel_error": float(np.median(err)),
        "products_per_rhs": products, "prepare_s": prep_s, "solve_s": apply_s,
        "total_s": prep_s + apply_s, "compile_s": compile_s,
        "converged": int(np.sum(np.asarray(sol.converged))),
        "status": sorted({int(s) for s in np.asarray(sol.status).reshape(-1)}),
        "max_rel_residual": float(np.max(np.asarray(sol.residual_norm) / rhs_norms(rhs))),
        **({"scale": float(np.max(np.asarray(sol.stats["scale"])))} if "scale" in sol.stats else {}),
    }


def rhs_count(rhs):
    return int(jax.tree_util.tree_leaves(rhs)[0].shape[0])


def rhs_norms(rhs):
    return np.asarray(jax.vmap(lambda t: jnp.linalg.norm(ravel_pytree(t)[0]))(rhs), np.float64)


def to64(tree):
    return jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def reference(name, obj, params, data, rhs, dampings, quick):
    """float64 solutions for every damping: ``{damping: (x (16, P), info)}``."""
    op64 = curvature.operator(obj, to64(params), to64(data), kind="gnh", damping=np.float64(0.0),
                              chunk_size=2048)
    b = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(to64(rhs)))
    out = {}
    if name == "digits" and not quick:
        t0 = time.perf_counter()
        a = np.asarray(curvature.dense(op64))  # C + l2 I, P products
        w, v = np.linalg.eigh((a + a.T) / 2)
        dt = (time.perf_counter() - t0) / len(dampings)
        for d in dampings:
            x = (v @ ((v.T @ b.T) / (w + d)[:, None])).T
            res = np.linalg.norm(x @ a.T + d * x - b, axis=1) / np.linalg.norm(b, axis=1)
            out[d] = x, {"method": "dense GNH (float64) + eigh", "max_rel_residual": float(res.max()),
                         "time_s": dt, "iterations": int(a.shape[0])}
        return out
    steps = 400
    tol = 1e-9 if name == "digits" else 1e-7
    for d in dampings:
        t0 = time.perf_counter()
        sol = solvers.cg(tol=tol, max_steps=steps, stagnation_window=steps)(
            op64.replace(damping=jnp.asarray(d, jnp.float64)), to64(rhs), batched=True)
        x = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(sol.x))
        rel_res = float(np.max(np.asarray(sol.residual_norm) / rhs_norms(rhs)))
        out[d] = x, {"method": f"CG float64, tol {tol:g}, max_steps {steps}", "max_rel_residual": rel_res,
                     "time_s": time.perf_counter() - t0,
                     "iterations": int(np.max(np.asarray(sol.iterations)))}
    return out


def configs(name, quick):
    big = name == "mnist"
    if quick:
        cg_tols, pre_tols = ([1e-1], []) if big else ([1e-1, 1e-2], [])
        depths, ranks, comp = ([] if big else [300]), [(10, 20)], []
    elif big:  # one batched product costs ~0.1 s here (2 CPU cores): keep the grid small
        cg_tols, pre_tols, depths = [1e-1, 1e-2, 1e-3], [], [300]
        ranks, comp = [(20, 40)], [(20, 40)]
    else:
        cg_tols, pre_tols = [1e-1, 1e-2, 1e-3, 3e-4], [1e-2]
        depths, ranks, comp = [1000], [(50, 100)], [(50, 100)]
    out = []
    if not big and not quick:
        out.append(("direct", solvers.direct()))
    for t in cg_tols:
        out.append(("cg", solvers.cg(tol=t, max_steps=2000)))
    for t in pre_tols:
        out.append(("cg+jacobi", solvers.cg(tol=t, max_steps=2000, preconditioner="jacobi",
                                            precond_samples=32)))
    bs = 256 if big else 128
    for d in depths:
        out.append(("lissa", solvers.lissa(depth=d, batch_size=bs, samples=1)))
    for r, it in ranks:  # projection only (the default)
        out.append(("arnoldi", solvers.arnoldi(rank=r, iterations=it, complement=False)))
    for r, it in comp:
        out.append(("arnoldi+complement", solvers.arnoldi(rank=r, iterations=it, complement=True)))
    out.append(("ekfac", solvers.ekfac()))
    out.append(("kfac", solvers.kfac()))
    return out


def run_problem(name, quick):
    obj, params, data, rhs, info = load_problem(name, quick)
    print(f"[{name}] trained: {info}", flush=True)
    dampings = (QUICK_DAMPINGS if quick else DAMPINGS)[name]
    refs = reference(name, obj, params, data, rhs, dampings, quick)
    for d, (_, ref_info) in refs.items():
        print(f"[{name}] reference (damping {d:g}): {ref_info}", flush=True)
    op0 = curvature.operator(obj, params, data, kind="gnh", damping=np.float32(0.0), chunk_size=2048)
    rows, cache = [], {}
    cfgs = configs(name, quick)
    for d in dampings:
        op = op0.replace(damping=jnp.asarray(d, jnp.float32))
        for label, solver in cfgs:
            if solver.name == "direct" and d != dampings[0]:
                continue  # its prepare is not cached (Python wrapper): once is enough
            shared = 0.0
            if solver.name == "arnoldi":
                shared = float(solver.options["iterations"])
            elif solver.name == "cg" and solver.options.get("preconditioner") == "jacobi":
                shared = 32.0
            elif solver.name in ("ekfac", "kfac"):
                # factor passes: a forward pass and one VJP per output (K = 10) per example,
                # about (1 + K) / 3 GNH products per pass (a product: forward, JVP, VJP);
                # EK-FAC makes two passes
                shared = (2 if solver.name == "ekfac" else 1) * (1 + 10) / 3
            elif solver.name == "lissa":
                it = 20
                frac = min(solver.options["batch_size"], info["n_train"]) / info["n_train"]
                shared = it + 4 * it * frac  # Lanczos on the full op + 4 minibatch estimates
            r = measure(solver, op, rhs, refs[d][0], shared_prepare_products=shared, cache=cache)
            r["label"], r["damping"] = label, d
            rows.append(r)
            print(f"[{name}] damping {d:g} {label:10s} {r['options']}: err {r['max_rel_error']:.2e} "
                  f"products/rhs {r['products_per_rhs']:.1f} time {r['total_s']:.2f}s "
                  f"compile {r['compile_s']:.2f}s status {r['status']}", flush=True)
    best = {}
    for d in dampings:
        best[str(d)] = {}
        for label in dict.fromkeys(r["label"] for r in rows):
            mine = [r for r in rows if r["label"] == label and r["damping"] == d]
            if not mine:
                continue
            best[str(d)][label] = {}
            for t in TARGETS:
                ok = [r for r in mine if r["max_rel_error"] <= t]
                if ok:
                    b = min(ok, key=lambda r: r["products_per_rhs"])
                    best[str(d)][label][str(t)] = {
                        "products_per_rhs": b["products_per_rhs"], "total_s": b["total_s"],
                        "compile_s": b["compile_s"], "options": b["options"]}
                else:
                    best[str(d)][label][str(t)] = None
    batch = batched_vs_sequential(name, op0, rhs, quick)
    return {"problem": info, "dampings": list(dampings),
            "reference": {str(d): v[1] for d, v in refs.items()}, "runs": rows, "best": best,
            "batched_vs_sequential": batch}


def batched_vs_sequential(name, op, rhs, quick):
    out = {}
    big = name == "mnist"
    picks = [("cg", solvers.cg(tol=1e-1 if big else 1e-3, max_steps=2000)),
             ("arnoldi", solvers.arnoldi(rank=20, iterations=40, complement=False)),
             ("cg (block)", solvers.cg(tol=1e-1 if big else 1e-3, max_steps=2000, block=True)),
             ("lissa", solvers.lissa(depth=100, batch_size=128))]
    if big:  # LiSSA's sequential/batched ratio is shown on digits (compiling it here costs ~15 s)
        picks = picks[:1] if quick else picks[:3]
    elif quick:
        picks = picks[:2]
    n = rhs_count(rhs)
    for label, solver in picks:
        state = jax.block_until_ready(solver.prepare(op))
        one = lambda i, solver=solver, state=state: solver.apply(
            state, op, jax.tree_util.tree_map(lambda a: a[i], rhs))
        jax.block_until_ready(solver.apply_batch(state, op, rhs))  # compile
        jax.block_until_ready(one(0))  # compile
        _, t_b = _timed(solver.apply_batch, state, op, rhs)
        t0 = time.perf_counter()
        for i in range(n):
            jax.block_until_ready(one(i))
        t_s = time.perf_counter() - t0
        out[label] = {"options": {k: str(v) for k, v in solver.options.items()}, "batched_s": t_b,
                      "sequential_s": t_s, "speedup": t_s / t_b}
        print(f"[{name}] batched vs sequential {label}: {t_b:.3f}s vs {t_s:.3f}s "
              f"({t_s / t_b:.1f}x)", flush=True)
    return out


# ------------------------------------------------------------------ report
def markdown(results, machine, quick, runtime_s=None, load=None):
    lines = [
        "`python -m benchmarks.solvers" + (" --quick" if quick else "") + "` -- GNH, float32, "
        "l2 = 1e-3, shift = l2 + damping, 16 test-loss gradients as right-hand sides, worst "
        "relative error over the 16 against a float64 reference. Products: curvature products "
        "per right-hand side in full-data equivalents (shared `prepare` work divided by 16). "
        "Time: `prepare` + one batched solve of all 16, compiled; compile time (AOT, once per "
        "configuration, reused across dampings) separately.",
        "",
        common.machine_line(machine),
    ]
    if runtime_s is not None:
        lines += ["", f"Benchmark runtime {runtime_s:.0f} s; load average (1, 5, 15 min) at the "
                      f"start {load[0]}, at the end {load[1]} on this 2-core machine: the machine "
                      "was shared with other jobs, compare products rather than seconds."]
    lines += [
        "",
        "Where each solver family is usable (see the per-damping tables). CG (float32) "
        "reaches every target at every damping (1e-3 may need tol 3e-4: the error can exceed "
        "the relative residual); its cost grows as the shift shrinks (condition number "
        "lambda_max / shift). At damping 0 the shift is only l2 = 1e-3: "
        "LiSSA's deterministic error decays like (1 - shift/S)^depth with S ~ lambda_max, so "
        "thousands of steps are needed and it reaches no target; Arnoldi (projection onto its "
        "top-eigenvector space, the default) misses everything outside that space (error ~1), "
        "and with `complement=True` maps that whole complement with 1/shift = 1000 (errors "
        "> 1). At damping 1e-2 and 1e-1 the shift is 10-100x larger: in the runs below LiSSA "
        "gets to about 1e-1 (reached on digits at 1e-2 and MNIST at 1e-1, 0.12 on digits at "
        "1e-1) and stalls at its minibatch noise (samples=1; tighter targets need more "
        "samples and depth) and Arnoldi with the complement reaches 1e-1 at damping 1e-1 "
        "(digits, rank 50); the projection-only default stays near 1. Neither family reaches "
        "1e-2 in this grid: for tight targets use CG (or direct on small models). LiSSA and "
        "Arnoldi have status 0 because neither has a tolerance unless `tol=` is given; the "
        "residual they report shows the problem. `direct`'s time includes its compilation "
        "(its `prepare` is a Python wrapper that may raise); it is run at damping 0 only. The "
        "Jacobi preconditioner (Hutchinson, 32 samples) is too noisy to help here.",
    ]
    for name, res in results.items():
        p = res["problem"]
        lines += ["", f"### {name}: MLP {'-'.join(map(str, p['widths']))}, N = {p['n_train']}, "
                      f"P = {p['P']} (objective {p['final_objective']:.4f}, ||grad J|| = "
                      f"{p['grad_norm']:.2e})", ""]
        for d in res["dampings"]:
            ref = res["reference"][str(d)]
            lines += [f"Damping {d:g} (shift {1e-3 + d:g}); reference: {ref['method']} (relative "
                      f"residual {ref['max_rel_residual']:.1e}):", ""]
            headers = ["solver"] + [f"err <= {t:g}: products / time s / compile s" for t in TARGETS]
            rows = []
            for label, best in res["best"][str(d)].items():
                row = [label]
                for t in TARGETS:
                    b = best[str(t)]
                    row.append("not reached" if b is None else
                               f"{b['products_per_rhs']:.0f} / {b['total_s']:.2f} / {b['compile_s']:.1f}")
                rows.append(row)
            lines += [common.md_table(headers, rows), ""]
        lines += ["All configurations:", ""]
        rows = [[f"{r['damping']:g}", r["label"], ", ".join(f"{k}={v}" for k, v in r["options"].items()),
                 f"{r['max_rel_error']:.2e}", f"{r['products_per_rhs']:.1f}", f"{r['total_s']:.2f}",
                 f"{r['compile_s']:.1f}", f"{r['max_rel_residual']:.1e}", str(r["status"])]
                for r in res["runs"]]
        lines.append(common.md_table(["damping", "solver", "options", "max rel err", "products/rhs",
                                      "time s", "compile s", "max rel residual", "statuses"], rows))
        lines += ["", "Batched vs sequential right-hand sides (16, compiled, damping 0):", ""]
        rows = [[k, ", ".join(f"{a}={b}" for a, b in v["options"].items()), f"{v['batched_s']:.3f}",
                 f"{v['sequential_s']:.3f}", f"{v['speedup']:.1f}x"]
                for k, v in res["batched_vs_sequential"].items()]
        lines.append(common.md_table(["solver", "options", "batched s", "sequential s", "speed-up"], rows))
    return "\n".join(lines)


# ------------------------------------------------------ preconditioned CG on a CNN and a transformer
LOOP_STEPS = 6  # CG steps timed per loop kind on the CNN
PRECOND_TOL = 1e-3  # float32 reaches ~1e-4..1e-5 (module docstring of influx.solvers.cg)


def conv_apply(params, x):
    """conv 3x3 (1->16), tanh, 2x2 avg pool, conv 3x3 (16->32), tanh, pool, dense 64, tanh,
    dense 10 (P = 105,866 on 28x28 inputs)."""
    h = x
    for k in ("conv1", "conv2"):
        h = jax.lax.conv_general_dilated(h, params[k]["w"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC")) + params[k]["b"]
        h = jnp.tanh(h)
        h = jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4
    h = h.reshape(h.shape[0], -1)
    h = jnp.tanh(h @ params["fc1"]["w"] + params["fc1"]["b"])
    return h @ params["fc2"]["w"] + params["fc2"]["b"]


def init_cnn(key):
    ks = jax.random.split(key, 4)
    he = lambda k, shape, fan: jax.random.normal(k, shape, jnp.float32) / np.float32(np.sqrt(fan))
    return {"conv1": {"w": he(ks[0], (3, 3, 1, 16), 9), "b": jnp.zeros(16, jnp.float32)},
            "conv2": {"w": he(ks[1], (3, 3, 16, 32), 144), "b": jnp.zeros(32, jnp.float32)},
            "fc1": {"w": he(ks[2], (7 * 7 * 32, 64), 1568), "b": jnp.zeros(64, jnp.float32)},
            "fc2": {"w": he(ks[3], (64, 10), 64), "b": jnp.zeros(10, jnp.float32)}}


def _layer_norm(h, p):
    mu = jnp.mean(h, -1, keepdims=True)
    var = jnp.var(h, -1, keepdims=True)
    return (h - mu) / jnp.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def transformer_apply(params, tokens):
    """Token + position embedding, ``len(params["blocks"])`` pre-LN blocks (2-head attention
    with DenseGeneral-style ``(d, heads, d_head)`` projections, MLP 4d), mean pool, class head."""
    h = params["embed"][tokens] + params["pos"][None, : tokens.shape[1]]
    for blk in params["blocks"]:
        a = _layer_norm(h, blk["ln1"])
        q = jnp.einsum("btd,dhk->bthk", a, blk["q"])
        k = jnp.einsum("btd,dhk->bthk", a, blk["k"])
        v = jnp.einsum("btd,dhk->bthk", a, blk["v"])
        w = jax.nn.softmax(jnp.einsum("bthk,bshk->bhts", q, k) / np.float32(np.sqrt(q.shape[-1])), -1)
        h = h + jnp.einsum("bhts,bshk,hkd->btd", w, v, blk["o"])
        m = _layer_norm(h, blk["ln2"])
        h = h + jnp.tanh(m @ blk["fc1"]["w"] + blk["fc1"]["b"]) @ blk["fc2"]["w"] + blk["fc2"]["b"]
    return jnp.mean(h, axis=1) @ params["head"]["w"] + params["head"]["b"]


def init_transformer(key, *, vocab=16, length=16, d=32, heads=2, blocks=2, classes=4):
    ks = iter(jax.random.split(key, 3 + 6 * blocks))
    nrm = lambda shape, fan: jax.random.normal(next(ks), shape, jnp.float32) / np.float32(np.sqrt(fan))
    ln = lambda: {"scale": jnp.ones(d, jnp.float32), "bias": jnp.zeros(d, jnp.float32)}
    dh = d // heads
    return {"embed": nrm((vocab, d), 1), "pos": nrm((length, d), 1) * 0.1,
            "blocks": [{"ln1": ln(), "q": nrm((d, heads, dh), d), "k": nrm((d, heads, dh), d),
                        "v": nrm((d, heads, dh), d), "o": nrm((heads, dh, d), d), "ln2": ln(),
                        "fc1": {"w": nrm((d, 4 * d), d), "b": jnp.zeros(4 * d, jnp.float32)},
                        "fc2": {"w": nrm((4 * d, d), 4 * d), "b": jnp.zeros(d, jnp.float32)}}
                       for _ in range(blocks)],
            "head": {"w": nrm((d, classes), d), "b": jnp.zeros(classes, jnp.float32)}}


def precond_problem(name, quick):
    """``(obj, params, train, test)`` in float32, trained with adam (full batch)."""
    key = jax.random.PRNGKey(0)
    loss = influx.losses.softmax_cross_entropy
    if name == "cnn":
        from influx import data as D

        n = 256 if quick else 512
        data_dir = os.environ.get("INFLUX_DATA_DIR", str(ROOT.parent / "shared" / "data"))
        ds = D.load("mnist", data_dir=data_dir, n_train=n, n_test=64, flatten=False, seed=0)
        x = jnp.asarray(ds.train[0], jnp.float32).reshape(-1, 28, 28, 1)
        xt = jnp.asarray(ds.test[0], jnp.float32).reshape(-1, 28, 28, 1)
        train_, test = (x, jnp.asarray(ds.train[1])), (xt, jnp.asarray(ds.test[1]))
        obj = influx.Objective(conv_apply, loss, l2=1e-3)
        params, steps = init_cnn(key), (30 if quick else 100)
    else:  # sequences of 16 tokens; class = the most frequent of tokens 0..3 (ties: lowest)
        n, length = (256 if quick else 512), 16
        toks = jax.random.randint(key, (n + 64, length), 0, 16)
        counts = jnp.stack([jnp.sum(toks == c, axis=1) for c in range(4)], axis=1)
        y = jnp.argmax(counts, axis=1)
        train_, test = (toks[:n], y[:n]), (toks[n:], y[n:])
        obj = influx.Objective(transformer_apply, loss, l2=1e-3)
        params, steps = init_transformer(key), (100 if quick else 300)
    params = train(obj, params, train_, steps=steps, lr=3e-3)[0]
    return obj, params, train_, test


def conv_loop_timing(op, repeats=3):
    """One curvature product standalone (one program per product, called from Python)
    vs ``repeats`` products inside a compiled ``fori_loop`` (per product), seconds."""
    v = jax.tree_util.tree_map(jnp.ones_like, op.params)
    one = jax.jit(lambda o, u: o(u))
    loop = jax.jit(lambda o, u: jax.lax.fori_loop(
        0, repeats, lambda i, w: jax.tree_util.tree_map(lambda a: a / 1e3, o(w)), u))
    common.block(one(op, v))
    common.block(loop(op, v))
    t0 = time.perf_counter()
    w = v
    for _ in range(repeats):
        w = jax.tree_util.tree_map(lambda a: a / 1e3, one(op, w))
    common.block(w)
    standalone = (time.perf_counter() - t0) / repeats
    t0 = time.perf_counter()
    common.block(loop(op, v))
    in_loop = (time.perf_counter() - t0) / repeats
    return {"product_standalone_s": standalone, "product_in_fori_loop_s": in_loop,
            "slowdown_in_loop": in_loop / standalone}


def _cg_row(solver, op, rhs, **info):
    t0 = time.perf_counter()
    state = solver.prepare(op)
    common.block(state)
    t_prep = time.perf_counter() - t0
    t0 = time.perf_counter()
    sols = solver.apply_batch(state, op, rhs)
    common.block(sols)
    t_solve = time.perf_counter() - t0  # includes compiling (one call per configuration)
    steps = np.asarray(sols.stats["steps"])
    if isinstance(state, dict) and "deflation" in state:  # Ritz values of c^-1 M^-1 A (descending)
        dfl = state["deflation"]
        ritz = np.sort(np.asarray(dfl["ritz"], np.float64) * float(dfl["scale"]))[::-1]
        info["ritz"] = [float(v) for v in ritz]
    return {**info, "prepare_s": t_prep, "solve_s": t_solve,
            "steps": [int(s) for s in steps],
            "products": [int(s) for s in np.asarray(sols.iterations)],
            "relative_residual": [float(r) for r in np.asarray(sols.stats["relative_residual"])],
            "status": [solvers.status_message(s).split(" ")[0].rstrip(":,") for s in np.asarray(sols.status)]}


def run_precond(name, quick):
    """CG to ``PRECOND_TOL`` (float32, GNH, shift 2e-3) on test-loss gradients, without and
    with EK-FAC/K-FAC preconditioning (``precond_damping`` 0 and 0.1); on the CNN also the
    cost of a CG step in the host-driven and the compiled loop (``LOOP_STEPS`` steps each)
    and of one curvature product standalone vs inside a compiled ``fori_loop``."""
    obj, params, train_, test = precond_problem(name, quick)
    op = curvature.operator(obj, params, train_, kind="gnh", damping=np.float32(1e-3), chunk_size=256)
    k = 2
    rhs = curvature.per_example_grads(obj, params, jax.tree_util.tree_map(lambda a: a[:k], test))
    out = {"n_train": int(train_[1].shape[0]), "params": int(ravel_pytree(params)[0].size),
           "tol": PRECOND_TOL, "rhs": k, "rows": []}
    out["coverage"] = float(solvers.ekfac.coverage(obj.apply_fn, params, train_[0][:1]))
    _precond_rows(name, op, rhs, SMALL_CONFIGS, 150 if quick else 300, out)
    if name == "cnn":
        timing = {}
        for loop in ("host", "compiled"):  # a fixed number of steps (tol 0 never stops early)
            solver = solvers.cg(tol=0.0, max_steps=LOOP_STEPS, loop=loop)
            row = _cg_row(solver, op, jax.tree_util.tree_map(lambda a: a[:1], rhs), loop=loop)
            t0 = time.perf_counter()  # again, compiled: the time of the steps alone
            common.block(solver.apply_batch(solver.prepare(op), op,
                                            jax.tree_util.tree_map(lambda a: a[:1], rhs)))
            timing[loop] = {"steps": row["steps"][0], "products": row["products"][0],
                            "first_call_s": row["solve_s"], "s_per_product": (time.perf_counter() - t0)
                            / row["products"][0]}
        out["loop_timing"] = {**timing, **conv_loop_timing(op)}
        print(name, out["loop_timing"], flush=True)
    return out


# configurations of the preconditioned-CG benchmark: (label, preconditioner, precond_damping, deflate)
PRECOND_CONFIGS = [("none", None, 0.0, 0), ("none", None, 0.0, 20), ("none", None, 0.0, 50),
                   ("ekfac", "ekfac", 0.0, 0), ("ekfac", "ekfac", 0.1, 0), ("ekfac", "ekfac", 0.0, 50),
                   ("kfac", "kfac", 0.0, 0)]
# the small problems at the harder shift: cheap products (N = 256), so also a deeper deflation
SMALL_CONFIGS = PRECOND_CONFIGS[:3] + [("none", None, 0.0, 100)] + PRECOND_CONFIGS[3:]
AMORTISE_OVER = 100  # queries sharing one prepare (issue 15's benchmark: 100 queries)


def _precond_rows(name, op, rhs, configs, max_steps, out):
    for label, pre, gamma, deflate in configs:
        pre = {"ekfac": solvers.ekfac, "kfac": solvers.kfac}.get(pre, lambda: None)()
        solver = solvers.cg(tol=PRECOND_TOL, max_steps=max_steps, preconditioner=pre,
                            precond_damping=gamma, deflate=deflate)  # loop="auto": host for a CNN on CPU
        row = _cg_row(solver, op, rhs, loop="auto", preconditioner=label, precond_damping=gamma,
                      deflate=deflate)
        # products per query when one prepare (deflate Lanczos steps) serves AMORTISE_OVER queries
        row["products_amortised"] = max(row["products"]) + deflate / AMORTISE_OVER
        print(name, {k: v for k, v in row.items() if k != "ritz"}, flush=True)
        out["rows"].append(row)


# full-size trained models: K-FAC (as EK-FAC, slower) and EK-FAC + deflation (between the two) only in
# the quick run and on the small problems, to keep the run within ~30 min on 2 shared cores
TRAINED_CONFIGS = [c for c in PRECOND_CONFIGS if c[0] != "kfac" and not (c[0] == "ekfac" and c[3])]
# the trained transformer (P = 1.0M) costs ~12 s per product here and plain CG needs 6 steps: the
# deflate=50 row (50 Lanczos products) is left out of the full run
TRAINED_CONFIGS_BY_MODEL = {"transformer": [c for c in TRAINED_CONFIGS if c[3] != 50]}
TRAINED_MAX_STEPS = 100  # plain CG needs ~50 there: "not converged in 100" already answers


def precond_diagnosis(seed=0):
    """Dense float64 diagnosis on a trained two-layer ReLU net (6-12-4, softmax, N = 200,
    l2 = damping = 1e-3, P = 136): spectra of ``A`` and of ``M^-1 A`` for EK-FAC, K-FAC, the
    exact per-layer block diagonal of ``A`` and deflation (``cg(deflate=k)``), and CG steps to
    1e-6 (float64, ``loop="compiled"``) on 3 random right-hand sides."""
    n, d, h, k = 200, 6, 12, 4
    kx, ky, k1, k2 = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(kx, (n, d), jnp.float64)
    y = jnp.argmax(x @ jax.random.normal(ky, (d, k)) + 0.5 * jax.random.normal(ky, (n, k)), 1)
    params = [{"w": jax.random.normal(k1, (d, h), jnp.float64) * np.sqrt(2 / d), "b": jnp.zeros(h)},
              {"w": jax.random.normal(k2, (h, k), jnp.float64) / np.sqrt(h), "b": jnp.zeros(k)}]
    obj = influx.Objective(lambda p, x: jax.nn.relu(x @ p[0]["w"] + p[0]["b"]) @ p[1]["w"] + p[1]["b"],
                           influx.losses.softmax_cross_entropy, l2=1e-3)
    params = train(obj, params, (x, y), steps=300, lr=1e-2)[0]
    op = curvature.operator(obj, params, (x, y), kind="gnh", damping=1e-3)
    a = np.asarray(curvature.dense(op))
    flat, unravel = ravel_pytree(params)
    p_ = flat.shape[0]
    shift = float(op.shift)
    chol = np.linalg.cholesky(a)

    def dense_psolve(solver):
        state = solver.prepare(op)
        return np.asarray(jax.vmap(solver._psolve(state, unravel, flat.dtype))(jnp.eye(p_))).T

    sizes = np.cumsum([0] + [int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(params)])
    block = np.zeros_like(a)
    for lo, hi in ((sizes[0], sizes[2]), (sizes[2], sizes[4])):  # leaves: b0, w0 | b1, w1
        block[lo:hi, lo:hi] = a[lo:hi, lo:hi]
    ev_a = np.linalg.eigvalsh(a)
    out = {"params": int(p_), "shift": shift, "cond_A": float(ev_a[-1] / ev_a[0]),
           "share_A_below_3_shift": float(np.mean(ev_a < 3 * shift)), "rows": []}
    rng = np.random.default_rng(seed)
    bs = rng.standard_normal((3, p_))
    binv = np.linalg.inv(block)
    exact_blocks = solvers.cg(tol=1e-6, loop="compiled", preconditioner=lambda v: unravel(
        jnp.asarray(binv) @ ravel_pytree(v)[0]))
    preconds = [("exact layer blocks", binv, exact_blocks)]
    for label, solver in (("none", solvers.cg(tol=1e-6, loop="compiled")),
                          ("ekfac", solvers.cg(tol=1e-6, loop="compiled", preconditioner="ekfac")),
                          ("kfac", solvers.cg(tol=1e-6, loop="compiled", preconditioner="kfac")),
                          ("deflate=20", solvers.cg(tol=1e-6, loop="compiled", deflate=20)),
                          ("deflate=40", solvers.cg(tol=1e-6, loop="compiled", deflate=40)),
                          ("ekfac, deflate=40", solvers.cg(tol=1e-6, loop="compiled", deflate=40,
                                                           preconditioner="ekfac"))):
        preconds.append((label, None if label == "none" else dense_psolve(solver), solver))
    for label, minv, solver in preconds:
        ev = ev_a if minv is None else np.linalg.eigvalsh(chol.T @ (0.5 * (minv + minv.T)) @ chol)
        row = {"preconditioner": label, "min": float(ev[0]), "max": float(ev[-1]),
               "cond": float(ev[-1] / ev[0]), "share_below_3_min": float(np.mean(ev < 3 * ev[0]))}
        if solver is not None:
            sols = solver.apply_batch(solver.prepare(op), op, jax.vmap(unravel)(jnp.asarray(bs)))
            row["steps"] = [int(v) for v in np.asarray(sols.stats["steps"])]
            row["converged"] = bool(np.all(np.asarray(sols.converged)))
        out["rows"].append(row)
        print("diagnosis", row, flush=True)
    return out


def _diagnosis_markdown(r):
    rows = [[x["preconditioner"], x["min"], x["max"], x["cond"], f"{x['share_below_3_min']:.0%}",
             max(x["steps"]) if "steps" in x else "-"] for x in r["rows"]]
    return (f"\n**Diagnosis, dense float64** (`precond_diagnosis`): a trained two-layer ReLU net "
            f"(6-12-4, N = 200, P = {r['params']}, shift {r['shift']:g}). {r['share_A_below_3_shift']:.0%} "
            "of the eigenvalues of `A` lie below 3x the shift (the GNH is low rank plus shift). Spectrum "
            "of `M^-1 A` and CG steps to 1e-6 (max over 3 random right-hand sides):\n\n"
            + common.md_table(["M", "min eig", "max eig", "cond", "eigs < 3 min", "CG steps"], rows))


def run_precond_trained(name, quick):
    """As :func:`run_precond` on the trained models of ``benchmarks/models.py`` (its data,
    initialisation, minibatch training and ``apply_fn``; ReLU CNN with N = 2000 / 500 quick,
    GELU transformer with N = 500 / 300) at its shift ``l2 + damping = 1e-4 + 1e-2``."""
    from benchmarks import models as M

    spec = (M.QUICK if quick else M.FULL)[name]
    data = M.make_data(spec)
    params, log = M.train(spec, data)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    obj = influx.Objective(M.apply_fn_for(name), influx.losses.softmax_cross_entropy, l2=spec.l2)
    train_ = (jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"]))
    # one data chunk (the memory budget may split it): the scoring chunk of benchmarks/models.py (256)
    # puts the convolutions inside a scan, where XLA:CPU runs them ~10x slower (20.9 s against 2.0 s
    # per product on the CNN at N = 2000, jax issue 12868)
    op = curvature.operator(obj, params, train_, kind="gnh", damping=np.float32(spec.damping),
                            chunk_size=spec.n_train)
    k = 2
    rhs = curvature.per_example_grads(obj, params, (jnp.asarray(data["x_query"][:k]),
                                                    jnp.asarray(data["y_query"][:k])))
    out = {"n_train": spec.n_train, "params": int(ravel_pytree(params)[0].size), "tol": PRECOND_TOL,
           "rhs": k, "l2": spec.l2, "damping": spec.damping, "train": log, "rows": []}
    out["coverage"] = float(solvers.ekfac.coverage(obj.apply_fn, params, train_[0][:1]))
    configs = PRECOND_CONFIGS if quick else TRAINED_CONFIGS_BY_MODEL.get(name, TRAINED_CONFIGS)
    _precond_rows(f"{name} (trained)", op, rhs, configs, 150 if quick else TRAINED_MAX_STEPS, out)
    return out


def _precond_table(r):
    rows = []
    for x in r["rows"]:
        top = f"{x['ritz'][0]:.3g}" if x.get("ritz") else "-"
        rows.append([x["preconditioner"], x["precond_damping"], x["deflate"], max(x["steps"]),
                     max(x["products"]), f"{x['products_amortised']:.1f}", max(x["relative_residual"]),
                     ",".join(sorted(set(x["status"]))), top, x["prepare_s"], x["solve_s"]])
    return common.md_table(["preconditioner", "precond_damping", "deflate", "steps", "products",
                            f"products/query ({AMORTISE_OVER} queries)", "rel. residual", "status",
                            "top Ritz value", "prepare s", "solve s"], rows)


def precond_markdown(res, load, runtime):
    lines = [f"CG to relative residual {PRECOND_TOL:g} (float32, GNH) on test-loss gradients of "
             "2 queries, without and with a preconditioner: Kronecker-factored "
             "(`cg(preconditioner=ekfac(), precond_damping=...)`) and/or deflation "
             "(`cg(deflate=k)`: `k` Lanczos steps on `M^-1 A` in `prepare`, top Ritz pairs mapped to 1; "
             "`influx/solvers/cg.py`). Steps and products per right-hand side (max over them); "
             f"products/query counts the `deflate` Lanczos products of `prepare` shared by {AMORTISE_OVER} "
             "queries; top Ritz value: of `M^-1 A / c` (`c` = the shift without a preconditioner, "
             "so the condition number of `A`; 1 with one). Times for the batch (solve time includes "
             "compiling; the CNN runs with the host-driven loop, `loop=\"auto\"`). "
             "Run: `python -m benchmarks.solvers --only precond`."]
    for key, r in res.items():
        if key == "diagnosis":
            lines.append(_diagnosis_markdown(r))
            continue
        if key.endswith("trained"):
            name = key.split(" ")[0]
            lines.append(f"\n**{name}, trained** (`benchmarks/models.py`: P = {r['params']:,}, N = "
                         f"{r['n_train']}, l2 = {r['l2']:g}, damping = {r['damping']:g}, Kronecker coverage "
                         f"{r['coverage']:.0%})\n")
        else:
            lines.append(f"\n**{key}, harder shift** (l2 = 1e-3, damping 1e-3: shift 2e-3; P = "
                         f"{r['params']:,}, N = {r['n_train']}, Kronecker coverage {r['coverage']:.0%})\n")
        lines.append(_precond_table(r))
        if "loop_timing" in r:
            c = r["loop_timing"]
            lines.append(f"\nCost per curvature product on the CNN: {c['product_standalone_s']:.3g} s "
                         f"standalone, {c['product_in_fori_loop_s']:.3g} s inside a compiled `fori_loop` "
                         f"({c['slowdown_in_loop']:.2g}x); in CG ({LOOP_STEPS} steps, compiled program "
                         f"reused): {c['host']['s_per_product']:.3g} s with `loop=\"host\"`, "
                         f"{c['compiled']['s_per_product']:.3g} s with `loop=\"compiled\"`.")
    lines.append(_precond_findings(res))
    lines.append(f"\nLoad average (1, 5, 15 min) before / after: {load[0]} / {load[1]}; "
                 f"runtime {runtime:.0f} s.")
    return "\n".join(lines)


def _steps_of(r, pre, gamma=0.0, deflate=0):
    for x in r["rows"]:
        if (x["preconditioner"], x["precond_damping"], x["deflate"]) == (pre, gamma, deflate):
            ok = all(st == "converged" for st in x["status"])
            return max(x["steps"]) if ok else f"not converged in {max(x['steps'])}"
    return "-"


def _precond_findings(res):
    rows = []
    for key, r in res.items():
        if key == "diagnosis":
            continue
        best = min((x for x in r["rows"] if x["deflate"] and x["preconditioner"] == "none"
                    and all(st == "converged" for st in x["status"])),
                   key=lambda x: x["products_amortised"], default=None)
        rows.append([key, _steps_of(r, "none"), _steps_of(r, "ekfac"), _steps_of(r, "ekfac", 0.1),
                     "-" if best is None else f"{max(best['steps'])} (deflate={best['deflate']})",
                     "-" if best is None else f"{best['products_amortised']:.1f}"])
    return ("\n**Summary** (CG steps to the tolerance; the target of issue 15 is \"a few dozen steps\"):\n\n"
            + common.md_table(["problem", "plain CG", "EK-FAC", "EK-FAC, precond_damping 0.1",
                               "deflated CG", f"its products/query ({AMORTISE_OVER} queries)"], rows)
            + "\n\nTarget (\"EK-FAC or K-FAC as a preconditioner for CG, so that CG reaches its tolerance "
            "on the transformer and the CNN in a few dozen steps\"): **met with deflation, not with a "
            "Kronecker preconditioner.** `cg(deflate=k)` reaches 1e-3 in at most 31 steps on all four "
            "problems (the CNN at the harder shift needs `deflate=100`; `deflate=50` gives 45 steps there). "
            "EK-FAC/K-FAC preconditioning never beats plain CG on these models, with or without "
            "`precond_damping` or deflation on top, for the reason below. At the models benchmark's "
            "damping plain CG already needs only a few dozen steps (CNN) or a handful (transformer: "
            "`A / shift` has condition number ~5 there, see its top Ritz value).\n\n"
            "Why EK-FAC does not help here (dense diagnosis above): the GNH of a trained net is "
            "low rank plus shift, half or more of the eigenvalues of `A` sit at the shift where CG "
            "resolves them together, and a few large ones set the step count. A block-diagonal Kronecker "
            "`M` has curvature where the GNH has none (cross-layer cancellation such as the ReLU rescaling "
            "symmetry; a Kronecker product's rank exceeds the GNH's), so `M^-1 A ~ shift / (lambda_kron + "
            "shift)` there: the cluster at the shift is spread over two to three decades. Even the exact "
            "per-layer block diagonal of `A` does not reduce the steps; EK-FAC and K-FAC add up to 2x "
            "(trained CNN) or fail to converge in 150 steps (harder shift). "
            "`precond_damping` moves `M` towards a multiple of `I` (plain CG) and so only interpolates. "
            "Deflation keeps the cluster and removes the top: `cg(deflate=k)` maps the top `k` Ritz "
            "pairs of `A` (Lanczos in `prepare`, `k` products shared by every query) to the bottom of "
            "the spectrum, and CG then needs a handful to a few dozen steps. Stacking it on EK-FAC "
            "(`preconditioner=ekfac(), deflate=k`) inherits EK-FAC's spread bottom and stays worse "
            "than deflation alone.")


PRECOND_PARTS = ("diagnosis", "cnn", "transformer", "cnn trained", "transformer trained")


def precond_main(quick, parts=PRECOND_PARTS):
    """Runs ``parts`` (the harder-shift problems at N = 256 as in earlier runs, the trained
    models at ``benchmarks/models.py``'s sizes, ``--quick``: its quick sizes), merging them into
    ``results/solvers_precond.json`` (earlier parts kept), then rewrites the README section."""
    import json

    path = common.RESULTS / "solvers_precond.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    res = old.get("results", {}) if old.get("version") == 2 else {}
    t_start, load0 = time.perf_counter(), _load()
    for part in parts:
        name = part.split(" ")[0]
        if part == "diagnosis":
            res[part] = precond_diagnosis()
        else:
            trained = part.endswith("trained")
            res[part] = run_precond_trained(name, quick) if trained else run_precond(name, True)
    runtime, load = time.perf_counter() - t_start, [load0, _load()]
    if old.get("version") == 2 and set(parts) != set(PRECOND_PARTS):
        runtime += old.get("runtime_s", 0.0)
        load = [old["load_average"][0], load[1]] if old.get("load_average") else load
    payload = {"version": 2, "machine": common.machine(), "quick": quick, "results": res,
               "runtime_s": runtime, "load_average": load}
    path = common.save_json("solvers_precond", payload)
    md = precond_markdown({k: res[k] for k in PRECOND_PARTS if k in res}, load, runtime)
    common.write_section("Preconditioned CG", md)
    print(md)
    print(f"wrote {path}")


def _load():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: short training, few configs")
    ap.add_argument("--only", choices=["digits", "mnist", "precond"], default=None,
                    help="one problem; 'precond': preconditioned CG on a CNN and a transformer "
                         "(results/solvers_precond.json)")
    ap.add_argument("--parts", default=None,
                    help="with --only precond: comma-separated subset of " + ",".join(PRECOND_PARTS)
                         + " (merged into results/solvers_precond.json)")
    ap.add_argument("--from-json", action="store_true",
                    help="only re-render the README section from results/solvers.json "
                         "(with --only precond: from results/solvers_precond.json)")
    args = ap.parse_args()
    if args.only == "precond" and args.from_json:
        import json

        payload = json.loads((common.RESULTS / "solvers_precond.json").read_text())
        res = payload["results"]
        md = precond_markdown({k: res[k] for k in PRECOND_PARTS if k in res}, payload["load_average"],
                              payload["runtime_s"])
        common.write_section("Preconditioned CG", md)
        print(md)
        return
    if args.from_json:
        import json

        payload = json.loads((common.RESULTS / "solvers.json").read_text())
        md = markdown(payload["results"], payload["machine"], payload["quick"],
                      payload.get("runtime_s"), payload.get("load_average"))
        common.write_section("Solvers", md)
        print(md)
        return
    if args.only == "precond":
        precond_main(args.quick, tuple(args.parts.split(",")) if args.parts else PRECOND_PARTS)
        return
    t_start, load0 = time.perf_counter(), _load()
    machine = common.machine()
    results = {}
    for name in ("digits", "mnist"):
        if args.only and name != args.only:
            continue
        results[name] = run_problem(name, args.quick)
    runtime, load = time.perf_counter() - t_start, [load0, _load()]
    payload = {"machine": machine, "quick": args.quick, "targets": TARGETS, "results": results,
               "runtime_s": runtime, "load_average": load}
    path = common.save_json("solvers", payload)
    md = markdown(results, machine, args.quick, runtime, load)
    common.write_section("Solvers", md)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
