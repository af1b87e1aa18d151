"""Peak process memory of EK-FAC influence on a ~100k-parameter CNN (issue 15, item 4).

Workload: a linen CNN (conv 16 - pool - conv 32 - pool - dense 64 - dense 10, 106k
parameters, float32) on ``N`` MNIST images (``../shared/data``, the t10k file split as
the data README says), briefly trained with Adam; then
``influx.influence(..., solver=influx.solvers.ekfac(tol=inf))`` of all ``N`` training
images on 20 test images (the EK-FAC factor passes, the eigen-correction, the batched
residual check of the 20 solved vectors, the test gradients and the scoring pass).

Every configuration runs in a fresh subprocess; its peak resident memory is the child's
own ``VmHWM`` at its end (for a run killed at the timeout, the parent's
``getrusage(RUSAGE_CHILDREN)``), so the number is the whole process: Python, JAX, XLA's
buffers and temporaries. Writes
``benchmarks/results/memory.json`` (peak RSS, wall time, load average before and after,
the chunk sizes chosen) and the "Memory" section of ``benchmarks/README.md``.

Usage::

    python benchmarks/memory.py                    # N=5000, default budget and 256 MiB
    python benchmarks/memory.py --n 1000 --budgets default
    python benchmarks/memory.py --child '{"n": 5000, "budget": null}'   # one run, JSON to stdout
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = ROOT.parent / "shared" / "data"


def _peak_rss_bytes() -> int:
    """This process's peak resident memory: ``VmHWM`` from ``/proc`` (``ru_maxrss`` is carried
    over from the parent across ``exec``, so a child of a large parent would report the
    parent's peak), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(cfg: dict) -> dict:
    """One measured run (in its own process)."""
    import math

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    import influx
    from influx import data as _data
    from influx import models

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.avg_pool(jnp.tanh(nn.Conv(16, (3, 3), padding="SAME")(x)), (2, 2), (2, 2))
            x = nn.avg_pool(jnp.tanh(nn.Conv(32, (3, 3), padding="SAME")(x)), (2, 2), (2, 2))
            x = jnp.tanh(nn.Dense(64)(x.reshape(x.shape[:-3] + (-1,))))
            return nn.Dense(10)(x)

    n, n_test = int(cfg["n"]), 20
    ds = _data.load("mnist", data_dir=cfg.get("data_dir", str(DATA)), n_train=n, n_test=n_test,
                    flatten=False)
    xtr, ytr = np.asarray(ds.train[0], np.float32), np.asarray(ds.train[1])
    xte, yte = np.asarray(ds.test[0], np.float32), np.asarray(ds.test[1])
    model = Net()
    params = models.init(model, xtr[:1], dtype=jnp.float32)
    obj = influx.Objective(models.apply_fn(model), influx.losses.softmax_cross_entropy, l2=1e-4)
    t0 = time.perf_counter()
    params = models.train(model, influx.losses.softmax_cross_entropy, params, (xtr, ytr), l2=1e-4,
                          steps=int(cfg.get("train_steps", 100)), batch_size=128).params
    jax.block_until_ready(params)
    t_train = time.perf_counter() - t0
    rss_trained = _peak_rss_bytes()
    kw = {} if cfg.get("budget") is None else {"memory_budget": int(cfg["budget"])}
    t0 = time.perf_counter()
    scores, info = influx.influence(obj, params, (xtr, ytr), (xte, yte), damping=1e-3,
                                    solver=influx.solvers.ekfac(tol=math.inf), on_failure="keep",
                                    return_info=True, **kw)
    scores = np.asarray(scores)
    t_inf = time.perf_counter() - t0
    n_params = int(sum(np.size(l) for l in jax.tree_util.tree_leaves(params)))
    return {"n": n, "n_test": n_test, "params": n_params,
            "budget": cfg.get("budget"), "train_s": t_train, "influence_s": t_inf,
            "peak_rss_after_training": rss_trained, "finite": bool(np.isfinite(scores).all()),
            "scores_shape": list(scores.shape), "method": info.method,
            "relative_residual_max": float(np.nanmax(np.asarray(info.residual_norm))),
            "peak_rss_self": _peak_rss_bytes()}


def _measure(cfg: dict, timeout: float) -> dict:
    """Runs :func:`_child` in a fresh process; peak RSS of that process, time, load."""
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        status = f"timeout after {timeout:.0f} s"
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    res = {"config": cfg, "status": status, "wall_s": time.perf_counter() - t0,
           "peak_rss_bytes": peak * 1024 if peak > before else None,
           "load_before": load0, "load_after": os.getloadavg()}
    if status == "ok":
        res.update(json.loads(out.strip().splitlines()[-1]))
        res["peak_rss_bytes"] = res["peak_rss_self"]  # its own peak (RUSAGE_CHILDREN: max over all)
    else:
        res["stderr_tail"] = err[-2000:]
    return res


def _record(common, runs_by_label: dict, *, readme: bool = True):
    """Merges ``{label: [run, ...]}`` into ``results/memory.json`` and rewrites the README section."""
    path = common.RESULTS / "memory.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    old.setdefault("runs", {}).update(runs_by_label)
    old["machine"] = common.machine()
    common.save_json("memory", old)
    if not readme:
        return
    rows = []
    for label, rs in old["runs"].items():
        for r in rs:
            peak = r.get("peak_rss_bytes")
            rows.append([label, r["config"]["n"], r["config"]["budget"] or "default", r["status"],
                         f"{peak / 2**30:.2f} GiB" if peak else "-", f"{r['wall_s']:.0f} s",
                         f"{r.get('influence_s', float('nan')):.0f} s", f"{r['load_before'][0]:.1f}"])
    body = ("EK-FAC influence of N MNIST images on 20 queries, 106k-parameter linen CNN (float32), "
            "peak RSS of the whole process (`benchmarks/memory.py`). Target: below 1.5 GiB at "
            "N = 5000. 'before': the code before memory budgets (every pass in chunks of 256); "
            "a timed-out run reports the peak reached until then. 'load': the machine's load "
            "average at the start (2 cores, shared).\n\n"
            + common.md_table(["run", "N", "memory_budget", "status", "peak RSS", "wall", "influence",
                               "load"], rows))
    common.write_section("Memory", body)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--budgets", default="default,268435456",
                    help="comma-separated memory budgets in bytes ('default': the library's default)")
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--label", default="after", help="name of this set of runs in the results file")
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument("--collect", nargs="*", metavar="RESULTS_JSON",
                    help="merge the runs of other memory.json files (e.g. from other checkouts) and stop")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    sys.path.insert(0, str(HERE))
    import common

    if args.collect is not None:
        merged = {}
        for f in args.collect:
            merged.update(json.loads(Path(f).read_text()).get("runs", {}))
        _record(common, merged, readme=not args.no_readme)
        return 0

    runs = []
    for b in args.budgets.split(","):
        cfg = {"n": args.n, "budget": None if b == "default" else int(b)}
        r = _measure(cfg, args.timeout)
        runs.append(r)
        print(json.dumps(r), flush=True)
    _record(common, {args.label: runs}, readme=not args.no_readme)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
