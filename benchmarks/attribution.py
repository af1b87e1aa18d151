"""Attribution against ground truth: LDS of every method, metagradient cost, remat memory.

Three measurements, written to ``benchmarks/results/attribution.json``:

1. **LDS** (``influx.studies.lds``) on the digits MLP 64-32-10 (tanh, l2 = 1e-3, float64,
   full batch): every attribution method at drop fractions 1%, 5%, 10%, 50%, ``M``
   random subsets each, with bootstrap 95% intervals and cost (warm: the second, compiled
   call) in seconds and in training runs. ``--problem mnist`` / ``mnist_cnn``: the MNIST MLP
   (784-32-10) / small CNN (data in ``../shared/data``). ``--optimizer``: the training run
   (SGD by default; Adam's normalisation makes the run far less linear in the weights).
2. **Metagradient cost** vs one training run (both warm) for growing numbers of test
   measurements (one reverse pass, vmapped cotangents).
3. **Peak memory** of the compiled metagradient program, rematerialised (segments of
   ``ceil(sqrt(T))`` steps under ``jax.checkpoint``) vs plain reverse mode, for growing
   ``T``: XLA's ``memory_analysis()`` temp bytes of the compiled program (nothing is run).

Run: ``python -m benchmarks.attribution [--quick] [--only memory|cost|lds] [--problem digits|mnist|
mnist_cnn] [--optimizer sgd|momentum|adam] [--readme]``; each run updates its sections of the
results file and keeps the others (so every run stays under ~4 minutes on 2 cores);
``--readme`` replaces the "Attribution (LDS)" section of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import influx
from benchmarks import common
from influx import data as ixdata
from influx import metagrad, models
from influx.attribution import _bind_measurement
from influx.studies import lds


def lds_section(problem: str, optimizer: str, quick: bool) -> dict:
    kw = dict(problem=problem, optimizer=optimizer, warm_timing=True, progress=False)
    if problem == "digits":
        kw.update(n_train=400, width=32, steps=200, n_subsets=32, n_test_points=30)
    else:
        kw.update(n_train=500, width=32, steps=100, n_subsets=16, n_test_points=10,
                  data_dir=str(common.HERE.parent.parent / "shared" / "data"))
        if problem == "mnist_cnn":
            # XLA:CPU runs this CNN's training step far below its FLOP rate and vmapped runs become
            # grouped convolutions (retrain then runs one plain run at a time). At N=200, 40 steps,
            # channels (4, 8) the study did not finish in 40 minutes on the shared 2-core machine
            # (load ~20; the linearised PBRF alone is a 5000-step CG on 4,266 parameters). These
            # sizes finished in 13 minutes there: 2,158 parameters (exact dense PBRF solve), cold
            # timing (each method once, compilation included).
            kw.update(n_train=100, steps=30, channels=(4, 4), n_subsets=8, n_test_points=4, cg_max_steps=100,
                      lissa_depth=100, arnoldi_rank=20, warm_timing=False)
    if quick:
        kw.update(n_train=150, steps=60, n_subsets=8, n_test_points=8, fractions=(0.05, 0.5))
    res = lds.run(lds.LDSConfig(**kw))
    print(res.to_markdown(), flush=True)
    return res.to_dict()


def cost_section(optimizer: str, quick: bool, repeats: int = 3) -> dict:
    """Metagradient seconds / one training run, all warm, for n_test test measurements.

    Side by side, interleaved, minimum of ``repeats`` (the machine is shared): the public
    call (hand-written step rule, remat ``sqrt`` and ``none``) and the same compiled program
    with JAX's own reverse mode through each step (``rule="autodiff"``, the previous
    implementation). Per row: the ratio to one training run; over rows, the fixed cost
    (``n_test = 1``) and the marginal cost of each further measurement.
    """
    with jax.enable_x64(True):
        ds = ixdata.load("digits", n_train=400, seed=0, dtype=np.float64)
        model = models.mlp(1, 32, 10)
        obj = influx.Objective(models.apply_fn(model), influx.losses.softmax_cross_entropy, l2=1e-3)
        train = tuple(jnp.asarray(a) for a in ds.train)
        x, y = train
        init = models.init(model, train[0][:1], seed=0)
        opt = lds._optimizer(optimizer, lds.DEFAULT_LR[optimizer])
        steps = 60 if quick else 200
        f = _bind_measurement(obj, None)
        n = x.shape[0]

        def one_run():
            return models.train(model, obj.loss_fn, init, train, l2=obj.l2, optimizer=opt, steps=steps).params

        rows = []
        for n_test in ((1, 8) if quick else (1, 8, 32)):
            test = tuple(jnp.asarray(a[:n_test]) for a in ds.test)
            fns = {"train": one_run}
            for remat in ("sqrt", "none"):
                fns[f"custom_{remat}"] = lambda test=test, remat=remat: influx.metagradients(
                    obj, init, train, test, optimizer=opt, steps=steps, remat=remat)
                seg = metagrad.segment_length(steps, remat)
                fns[f"autodiff_{remat}"] = lambda test=test, seg=seg, k=n_test: metagrad._metagrad_jit(
                    init, x, y, test, jnp.ones((n,)), jax.random.key(0), jnp.eye(k), obj=obj, opt=opt, f=f,
                    steps=steps, batch_size=None, segment=seg, rule="autodiff")[2]
            first = {}
            for k, fn in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn())
                first[k] = time.perf_counter() - t0
            times = {k: [] for k in fns}
            cpu = {k: [] for k in fns}
            for _ in range(repeats):
                for k, fn in fns.items():
                    t0, c0 = time.perf_counter(), time.process_time()
                    jax.block_until_ready(fn())
                    times[k].append(time.perf_counter() - t0)
                    cpu[k].append(time.process_time() - c0)
            best = {k: float(np.min(v)) for k, v in times.items()}
            best_cpu = {k: float(np.min(v)) for k, v in cpu.items()}
            t_train = best.pop("train")
            c_train = best_cpu.pop("train")
            rows.append({"n_test": n_test, "steps": steps, "train_s": t_train, "seconds": best,
                         "ratio": {k: v / t_train for k, v in best.items()},
                         # CPU seconds of this process (all threads): stable on a loaded machine
                         "train_cpu_s": c_train, "cpu_seconds": best_cpu,
                         "cpu_ratio": {k: v / c_train for k, v in best_cpu.items()},
                         "first_call_s": first, "load_average_1min": os.getloadavg()[0],
                         # the names of the previous results file
                         "metagrad_s": best["custom_sqrt"], "plain_s": best["custom_none"],
                         "ratio_sqrt": best["custom_sqrt"] / t_train})
            print("wall", {k: round(v, 2) for k, v in rows[-1]["ratio"].items()},
                  "cpu", {k: round(v, 2) for k, v in rows[-1]["cpu_ratio"].items()},
                  f"n_test={n_test} train {t_train * 1e3:.1f} ms load {rows[-1]['load_average_1min']:.1f}",
                  flush=True)
        marginal = {}
        if len(rows) > 1:
            r0, r1 = rows[0], rows[-1]
            dn = r1["n_test"] - r0["n_test"]
            for k in r0["ratio"]:
                marginal[k] = (r1["ratio"][k] - r0["ratio"][k]) / dn
                marginal[f"{k}_cpu"] = (r1["cpu_ratio"][k] - r0["cpu_ratio"][k]) / dn
    return {"problem": f"digits MLP 64-32-10, N=400, full-batch {optimizer}, float64", "rows": rows,
            "marginal_ratio_per_measurement": marginal, "repeats": repeats}


def memory_section(quick: bool) -> dict:
    """Temp bytes of the compiled metagradient program, remat vs plain, growing steps."""
    with jax.enable_x64(True):
        ds = ixdata.load("digits", n_train=400, seed=0, dtype=np.float64)
        model = models.mlp(1, 32, 10)
        obj = influx.Objective(models.apply_fn(model), influx.losses.softmax_cross_entropy, l2=1e-3)
        x, y = (jnp.asarray(a) for a in ds.train)
        test = tuple(jnp.asarray(a[:8]) for a in ds.test)
        init = models.init(model, x[:1], seed=0)
        opt = lds._optimizer("adam", 1e-2)
        f = _bind_measurement(obj, None)
        n = x.shape[0]
        p_bytes = sum(int(np.size(a)) * 8 for a in jax.tree_util.tree_leaves(init))
        rows = []
        for steps in ((16, 64, 256) if quick else (16, 64, 256, 1024, 4096)):
            row = {"steps": steps, "param_bytes": p_bytes}
            for remat in ("sqrt", "none"):
                seg = metagrad.segment_length(steps, remat)
                lowered = metagrad._metagrad_jit.lower(
                    init, x, y, test, jnp.ones((n,)), jax.random.key(0), jnp.eye(8), obj=obj, opt=opt, f=f,
                    steps=steps, batch_size=64, segment=seg)
                mem = lowered.compile().memory_analysis()
                row[f"{remat}_temp_bytes"] = int(mem.temp_size_in_bytes)
                row["segment"] = seg if remat == "sqrt" else row.get("segment")
            rows.append(row)
            print(row, flush=True)
    return {"problem": "digits MLP 64-32-10 (2,410 params), N=400, minibatch 64, Adam, 8 test cotangents",
            "rows": rows}


def render(payload: dict) -> str:
    parts = [f"Load average at start {payload['loadavg_start']}, at end {payload['loadavg_end']}; "
             f"total {payload['seconds']:.0f} s. " + common.machine_line(payload["machine"])]
    for name, d in sorted(payload.get("lds", {}).items()):
        fr = d["config"]["fractions"]
        rows = [[r["method"], r["seconds"], r["train_equiv"],
                 *(f"{e['score']:.3f} [{e['low']:.3f}, {e['high']:.3f}]" if (e := r["lds"].get(f"{a:g}"))
                   else "-" for a in fr)] for r in d["rows"]]
        parts.append(f"**{name}** (N={d['n_train']}, {d['n_params']} params, M={d['config']['n_subsets']}, "
                     f"{d['n_test']} test losses, one training run {d['train_seconds']:.3g} s):\n\n"
                     + common.md_table(["method", "s", "x train", *(f"LDS {a:g}" for a in fr)], rows)
                     + (f"\n\n{d['note']}" if d.get("note") else "")
                     + "".join(f"\n\n{r['method']}: {'; '.join(r['notes'])}"
                               for r in d["rows"] if r.get("notes")))
    c = payload.get("cost", {}).get("rows", [])
    what = payload.get("cost", {}).get("problem")
    if c and "ratio" in c[0] and isinstance(c[0]["ratio"], dict):
        kinds = ["custom_sqrt", "custom_none", "autodiff_sqrt", "autodiff_none"]
        marg = payload["cost"].get("marginal_ratio_per_measurement", {})
        parts.append(
            f"Metagradient cost (warm, min of {payload['cost'].get('repeats')} interleaved runs) "
            "in training runs "
            f"({what}); `custom` = the step rule of `metagrad._step_rev` (the library), `autodiff` = JAX's "
            "reverse mode through each step (before), `sqrt` / `none` = remat:\n\n"
            + common.md_table(["n_test", "steps", "train s", *kinds, "load"],
                              [[r["n_test"], r["steps"], r["train_s"], *(r["ratio"][k] for k in kinds),
                                r["load_average_1min"]] for r in c])
            + ("\n\nThe same in CPU seconds of the process (all threads; steadier on a loaded machine):\n\n"
               + common.md_table(["n_test", "train CPU s", *kinds],
                                 [[r["n_test"], r["train_cpu_s"], *(r["cpu_ratio"][k] for k in kinds)]
                                  for r in c]) if "cpu_ratio" in c[0] else "")
            + ("\n\nEach further test measurement adds (training runs, wall / CPU): "
               + ", ".join(f"{k} {marg[k]:.2f} / {marg.get(k + '_cpu', float('nan')):.2f}"
                           for k in kinds if k in marg) if marg else ""))
    else:
        parts.append(f"Metagradient cost (warm) vs one training run ({what}):\n\n"
                     + common.md_table(
            ["n_test", "steps", "train s", "metagrad s (remat)", "x train", "plain s", "x train"],
            [[r["n_test"], r["steps"], r["train_s"], r["metagrad_s"], r["ratio"], r["plain_s"],
              r["plain_ratio"]] for r in c]))
    m = payload.get("memory", {}).get("rows", [])
    parts.append("Compiled temp memory, remat (sqrt(T) segments) vs plain reverse mode:\n\n"
                 + common.md_table(
        ["steps", "segment", "remat MiB", "plain MiB", "plain / remat"],
        [[r["steps"], r["segment"], r["sqrt_temp_bytes"] / 2**20, r["none_temp_bytes"] / 2**20,
          r["none_temp_bytes"] / max(r["sqrt_temp_bytes"], 1)] for r in m]))
    return "\n\n".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=("memory", "cost", "lds"), action="append",
                    help="run only these sections (repeatable); the others keep their stored results")
    ap.add_argument("--problem", choices=lds.PROBLEMS, default="digits", help="LDS problem (default digits)")
    ap.add_argument("--optimizer", choices=lds.OPTIMIZERS, default="sgd",
                    help="training optimizer of the LDS and cost sections (default sgd)")
    ap.add_argument("--readme", action="store_true", help="write the README section")
    args = ap.parse_args(argv)
    only = set(args.only or ("memory", "cost", "lds"))
    name = "attribution" + ("_quick" if args.quick else "")
    path = common.RESULTS / f"{name}.json"
    payload = json.loads(path.read_text()) if path.exists() else {}
    t0 = time.perf_counter()
    payload.update(machine=common.machine(), quick=args.quick, loadavg_start=os.getloadavg())
    if "memory" in only:
        payload["memory"] = memory_section(args.quick)
    if "cost" in only:
        payload["cost"] = cost_section(args.optimizer, args.quick)
    if "lds" in only:
        payload.setdefault("lds", {})[f"{args.problem}/{args.optimizer}"] = lds_section(
            args.problem, args.optimizer, args.quick)
    payload["loadavg_end"] = os.getloadavg()
    payload["seconds"] = time.perf_counter() - t0
    path = common.save_json(name, payload)
    body = render(payload)
    print(body)
    if args.readme:
        common.write_section("Attribution (LDS)", body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
