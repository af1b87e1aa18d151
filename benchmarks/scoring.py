"""Scoring throughput: training examples scored per second, JVP vs per-example path.

MLP 784-256-10 (tanh), float32, softmax cross-entropy; MNIST images from
``../shared/data`` (``$INFLUX_DATA_DIR``) when present, synthetic otherwise. The solved
test vectors are random (the solve is done once and is not part of the per-example cost;
see benchmarks/solvers.py). Every configuration runs in a **fresh subprocess** so that
its peak memory (``ru_maxrss``, which sees XLA's buffers, unlike ``tracemalloc``) is its
own; the chunk scorer (``influx.attribution.chunk_scorer``, the kernel of
``influx.scoring.score``) is compiled, warmed up, then timed over the whole training set
(best of ``--repeats`` passes).

* path x number of test vectors: ``jvp`` (one forward-mode pass of the per-example loss
  per test vector) vs ``per_example`` (per-example gradients + matmul) for 1, 4, 16, 64,
  256 test vectors: where they cross is the cost rule of ``method="auto"``.
* sharding: the same over 1/2/4 forced CPU devices
  (``XLA_FLAGS=--xla_force_host_platform_device_count``), chunks split with
  ``jax.shard_map``. On a 2-core CPU the forced devices share the same cores, so this
  measures the overhead of sharding rather than a speed-up.
* end to end: one ``influx.scoring.score`` call (test gradients, CG solve, scoring, top-k,
  writing to disk) for context.

Run: ``python -m benchmarks.scoring [--quick]`` (or ``python benchmarks/scoring.py``).
Writes benchmarks/results/scoring.json and the ``## Scoring`` section of the README.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WIDTHS = (784, 256, 10)


def _data(n_train, n_test=64):
    import numpy as np

    d = os.environ.get("INFLUX_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    try:
        from influx import data as idata

        ds = idata.load("mnist", data_dir=d, n_train=n_train, n_test=n_test, dtype=np.float32)
        return ds.train, ds.test, "mnist"
    except (FileNotFoundError, ValueError):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(n_train + n_test, WIDTHS[0])).astype(np.float32)
        y = rng.integers(0, WIDTHS[-1], n_train + n_test).astype(np.int32)
        return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:]), "synthetic"


def _model(kind="mlp"):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import influx

    if kind == "cnn":
        from influx import models

        m = models.CNN(channels=(16, 32), out=10)
        params = models.init(m, np.zeros((1, 28, 28, 1), np.float32))
        return influx.Objective(models.apply_fn(m), influx.losses.softmax_cross_entropy, l2=1e-3), params

    keys = jax.random.split(jax.random.PRNGKey(0), len(WIDTHS))
    params = [{"w": jax.random.normal(k, (a, b), jnp.float32) / np.sqrt(a), "b": jnp.zeros((b,), jnp.float32)}
              for k, a, b in zip(keys, WIDTHS[:-1], WIDTHS[1:])]

    def apply_fn(p, x):
        h = jnp.tanh(x @ p[0]["w"] + p[0]["b"])
        return h @ p[1]["w"] + p[1]["b"]

    return influx.Objective(apply_fn, influx.losses.softmax_cross_entropy, l2=1e-3), params


def _maxrss_mb():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(cfg: dict) -> dict:
    """One configuration (runs in its own process)."""
    import jax
    import numpy as np

    from influx import scoring
    from influx.attribution import chunk_scorer

    obj, params = _model(cfg.get("model", "mlp"))
    train, _, source = _data(cfg["n_train"])
    if cfg.get("model") == "cnn":
        train = (train[0].reshape(-1, 28, 28, 1), train[1])
    n, chunk, n_test, ndev = cfg["n_train"], cfg["chunk"], cfg["n_test"], cfg["devices"]
    devices = jax.devices()[:ndev]
    assert len(devices) == ndev, (jax.devices(), ndev)
    key = jax.random.PRNGKey(1)
    vecs = jax.tree_util.tree_map(
        lambda p: 1e-2 * jax.random.normal(key, (n_test,) + p.shape, p.dtype), params)
    # the placement influx.scoring.score uses: a mesh over the devices (one device: a one-device mesh)
    c_pad = -(-chunk // ndev) * ndev
    pl = scoring._Placement(obj, cfg["method"], devices, c_pad)
    p_dev, v_dev, scale = pl.replicate(params), pl.replicate(vecs), pl.replicate(np.float32(1.0 / n))
    chunks = []
    for s in range(0, n, chunk):
        block = scoring._np_tree(scoring._slice(train, s, s + chunk))
        m = scoring.num_examples(block)
        chunks.append(pl.put(pl.pieces(lambda a, b, c=block: scoring._slice(c, a, b), m)))
    rss_base = _maxrss_mb()
    t0 = time.perf_counter()
    jax.block_until_ready(pl.score(p_dev, v_dev, chunks[0], scale))
    first = time.perf_counter() - t0
    plain = None
    if ndev == 1:  # the former single-device path, plain jit without a mesh, for comparison
        fn = chunk_scorer(obj, cfg["method"])
        d0 = devices[0]
        plain = (fn, jax.device_put(params, d0), jax.device_put(vecs, d0),
                 [jax.device_put(c, d0) for c in chunks], jax.device_put(np.float32(1.0 / n), d0))
        jax.block_until_ready(fn(*plain[1:3], plain[3][0], plain[4]))
    times, plain_times = [], []
    for _ in range(cfg["repeats"]):  # interleaved, so that load from other jobs hits both alike
        t0 = time.perf_counter()
        jax.block_until_ready([pl.score(p_dev, v_dev, c, scale) for c in chunks])
        times.append(time.perf_counter() - t0)
        if plain is not None:
            fn, pp, vv, cc, sc = plain
            t0 = time.perf_counter()
            jax.block_until_ready([fn(pp, vv, c, sc) for c in cc])
            plain_times.append(time.perf_counter() - t0)
    best = min(times)
    from influx.attribution import choose_method, forward_flops

    flops = forward_flops(obj, params, train[0])
    n_params = sum(int(np.size(l)) for l in jax.tree_util.tree_leaves(params))
    return {**cfg, "source": source, "examples_per_s": n / best, "flops_per_example": flops,
            "auto_choice": choose_method(n_test, n_params, flops_per_example=flops), "pass_s": best,
            "first_call_s": first, "peak_rss_mb": _maxrss_mb(), "rss_before_first_call_mb": rss_base,
            "n_params": n_params,
            **({"plain_jit_examples_per_s": n / min(plain_times)} if plain_times else {})}


def end_to_end(cfg: dict) -> dict:
    import tempfile

    import influx

    obj, params = _model()
    train, test, source = _data(cfg["n_train"], cfg["n_test"])
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        r = influx.scoring.score(obj, params, train, test, out_dir=d, chunk_size=cfg["chunk"], top_k=10,
                                 damping=1e-2, progress=False, curvature_data=None)
        total = time.perf_counter() - t0
    return {**cfg, "source": source, "seconds": total, "scoring_examples_per_s": r.info["examples_per_s"],
            "method": r.info["method"], "peak_rss_mb": _maxrss_mb(),
            "all_converged": r.info.get("all_converged")}


def _run(cfg: dict, *, timeout: int = 600) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if cfg.get("devices", 1) > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={cfg['devices']}"
    else:
        env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)],
                          env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        return {**cfg, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--placement", action="store_true",
                    help="only compare the one-device mesh of score() with plain jit (2 configurations)")
    ap.add_argument("--from-json", action="store_true",
                    help="only rewrite the README section from benchmarks/results/scoring.json")
    args = ap.parse_args(argv)
    if args.from_json:
        from benchmarks import common

        payload = json.loads((common.RESULTS / "scoring.json").read_text())
        common.write_section("Scoring", report(payload))
        print(report(payload))
        return
    if args.worker:
        cfg = json.loads(args.worker)
        out = end_to_end(cfg) if cfg.get("kind") == "end_to_end" else worker(cfg)
        print(json.dumps(out))
        return

    from benchmarks import common

    n_train = args.n_train or (512 if args.quick else 1024)
    repeats = args.repeats or 1
    if args.placement:
        for method, n_test in (("jvp", 16), ("per_example", 64)):
            r = _run(dict(method=method, n_test=n_test, devices=1, n_train=n_train, chunk=256,
                          repeats=args.repeats or 5))
            print(json.dumps({k: r.get(k) for k in ("method", "n_test", "examples_per_s",
                                                    "plain_jit_examples_per_s", "error")}), flush=True)
        print(f"load average: {os.getloadavg()}")
        return
    chunk = 256
    n_tests = (1, 16, 64) if args.quick else (1, 4, 16, 64, 256)
    dev_counts = (1, 2) if args.quick else (1, 2, 4)
    t_start = time.perf_counter()
    rows = []
    for n_test in n_tests:
        for method in ("jvp", "per_example"):
            cfg = dict(method=method, n_test=n_test, devices=1, n_train=n_train, chunk=chunk, repeats=repeats)
            r = _run(cfg)
            print(json.dumps(r), flush=True)
            rows.append(r)
    shard_rows = []
    for method, n_test in (("jvp", 16), ("per_example", 64)):
        for ndev in dev_counts:
            same = [r for r in rows if r["method"] == method and r["n_test"] == n_test and ndev == 1]
            if same:
                shard_rows.append(same[0])
                continue
            cfg = dict(method=method, n_test=n_test, devices=ndev, n_train=n_train, chunk=chunk,
                       repeats=repeats)
            r = _run(cfg)
            print(json.dumps(r), flush=True)
            shard_rows.append(r)
    cnn_rows = []
    for n_test in ((4, 64) if args.quick else (4, 16, 64)):  # the CNN crossover lies in 16-64
        for method in ("jvp", "per_example"):
            cfg = dict(model="cnn", method=method, n_test=n_test, devices=1, n_train=256, chunk=128,
                       repeats=repeats)
            r = _run(cfg)
            print(json.dumps(r), flush=True)
            cnn_rows.append(r)
    e2e = _run(dict(kind="end_to_end", n_train=min(n_train, 512), n_test=4, chunk=chunk, devices=1))
    print(json.dumps(e2e), flush=True)

    from influx.attribution import CONTRACTION_FACTOR, PER_EXAMPLE_OVERHEAD

    payload = {"machine": common.machine(), "model": "MLP 784-256-10 tanh float32", "n_train": n_train,
               "chunk": chunk, "repeats": repeats, "paths": rows, "sharding": shard_rows,
               "cnn_paths": cnn_rows, "end_to_end": e2e, "per_example_overhead": PER_EXAMPLE_OVERHEAD,
               "contraction_factor": CONTRACTION_FACTOR, "quick": args.quick,
               "seconds": time.perf_counter() - t_start}
    payload["crossover_n_test"] = _crossover(rows)
    payload["cnn_crossover_n_test"] = _crossover(cnn_rows)
    path = common.save_json("scoring", payload)
    body = report(payload)
    common.write_section("Scoring", body)
    print(body)
    print(f"wrote {path} ({time.perf_counter() - t_start:.0f}s)")


def _crossover(rows):
    """The smallest number of test vectors at which the per-example path is faster."""
    for n_test in sorted({r["n_test"] for r in rows}):
        j = [r for r in rows if r["n_test"] == n_test and r["method"] == "jvp" and "error" not in r]
        p = [r for r in rows if r["n_test"] == n_test and r["method"] == "per_example" and "error" not in r]
        if j and p and p[0]["examples_per_s"] > j[0]["examples_per_s"]:
            return n_test
    return None


def _fmt_row(r):
    if "error" in r:
        return [r["method"], r["n_test"], r.get("devices", 1), "error", "", "", r["error"][:60], ""]
    return [r["method"], r["n_test"], r["devices"], round(r["examples_per_s"]), r["first_call_s"],
            round(r["peak_rss_mb"]), round(r["peak_rss_mb"] - r["rss_before_first_call_mb"]),
            r.get("auto_choice", "")]


def report(payload: dict) -> str:
    """The markdown section of benchmarks/README.md from a results payload."""
    from benchmarks import common
    from influx.attribution import CONTRACTION_FACTOR, PER_EXAMPLE_OVERHEAD, choose_method

    rows, cnn_rows, shard_rows, e2e = (payload["paths"], payload.get("cnn_paths", []), payload["sharding"],
                                       payload["end_to_end"])
    for r in rows + cnn_rows + shard_rows:  # the rule as it stands now
        if "error" not in r:
            r["auto_choice"] = choose_method(r["n_test"], r["n_params"],
                                             flops_per_example=r.get("flops_per_example"))
    headers = ["path", "test vectors", "devices", "examples/s", "first call s (compile)", "peak RSS MB",
               "RSS growth in scoring MB", "auto picks"]
    cross, cnn_cross = _crossover(rows), _crossover(cnn_rows)
    r0 = rows[0]
    flops = r0.get("flops_per_example")
    body = [
        "`python -m benchmarks.scoring` -- training examples scored per second by the chunk scorer "
        f"of `influx.scoring.score`: MLP 784-256-10 (tanh, float32, P = {r0.get('n_params', '?')}, "
        f"F = {flops:.3g} forward flops per example), {payload['n_train']} {r0.get('source', '?')} training "
        f"images, chunks of {payload['chunk']}, best of {payload.get('repeats', 1)} pass(es) after a warm-up "
        "call; each configuration in a fresh process (peak memory = `ru_maxrss`, which includes XLA's "
        "buffers and the ~350 MB of the process itself). The machine was shared with other jobs: expect "
        "+-30% noise.",
        "",
        common.machine_line(payload["machine"]),
        "",
        "### JVP path vs per-example path",
        "",
        common.md_table(headers, [_fmt_row(r) for r in rows]),
        "",
        (f"Crossover (MLP): the per-example path is faster from **{cross} test vectors**. "
         if cross else "The JVP path was faster or level at every tested number of test vectors (MLP). ")
        + "A dense layer uses each weight once per example (F ~ 2P), so a tangent pass costs about as much "
        "as contracting one per-example gradient with one test vector; the per-example gradient itself is "
        "the extra cost. `method=\"auto\"` (`influx.attribution.choose_method`) picks per-example when "
        f"`n_test (1 - {CONTRACTION_FACTOR} * 2P/F) > {PER_EXAMPLE_OVERHEAD}`, F from XLA's cost analysis "
        "of `apply_fn` (the `auto picks` column).",
        "",
        "### CNN (weight sharing: F >> P)",
        "",
        "`influx.models.CNN(channels=(16, 32))` on 28x28x1 MNIST, 256 examples, chunks of 128"
        + (f", P = {cnn_rows[0].get('n_params')}, F = {cnn_rows[0].get('flops_per_example', 0):.3g}."
           if cnn_rows and "error" not in cnn_rows[0] else "."),
        "",
        common.md_table(headers, [_fmt_row(r) for r in cnn_rows]),
        "",
        (f"Crossover (CNN): per-example faster from **{cnn_cross} test vectors**." if cnn_cross
         else "JVP faster at every tested number of test vectors (CNN)."),
        "",
        "### Sharded over forced CPU devices",
        "",
        common.md_table(headers, [_fmt_row(r) for r in shard_rows]),
        "",
        "The forced devices share the same 2 CPU cores, so this measures the overhead of sharding "
        "(padding, `shard_map`), not a speed-up; the scores are identical (tests/test_scoring.py).",
        "",
        "### End to end",
        "",
        (f"`influx.scoring.score` with {e2e.get('n_test')} test points, default CG (float32, tol 1e-4), "
         f"damping 1e-2, top-10 and on-disk output: {e2e.get('seconds', float('nan')):.1f} s in total for "
         f"{e2e.get('n_train')} examples, including compilation and the solve (scoring loop "
         f"{e2e.get('scoring_examples_per_s', float('nan')):.0f} examples/s, {e2e.get('method')} path; "
         f"peak RSS {e2e.get('peak_rss_mb', float('nan')):.0f} MB)."
         if "error" not in e2e else f"end-to-end run failed: {e2e['error']}"),
    ]
    return "\n".join(body)


if __name__ == "__main__":
    main()
