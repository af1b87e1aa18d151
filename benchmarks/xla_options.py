"""influx's CPU compile options (``influx._xla``) on and off, side by side.

``influx.influence`` end to end (test gradients, solver preparation, 16 solves, scoring) with
every solver family on the peer benchmark's problems (``benchmarks/peers/problem.py``: the
same trained weights, damping and test points), float32, Hessian. Each family is timed
round-robin with the options on and off in the same process (``influx._xla.set_enabled``;
the two compiled programs are cached separately), median of the timed rounds after a
compiling call. The scores of the two runs are compared (they differ only by float32
rounding of differently ordered products).

Run: ``python -m benchmarks.xla_options [--quick] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import influx
from benchmarks import common
from benchmarks.compare_peers import make_influx_solver
from benchmarks.peers import jax_side
from benchmarks.peers.problem import PROBLEMS, test_indices
from influx import _xla

FAMILIES = {
    "digits": ["direct", "cg", "lissa", "arnoldi", "ekfac", "kfac"],
    "mnist": ["cg", "lissa", "arnoldi", "ekfac", "kfac"],
}


def run_problem(name: str, workdir: Path, rounds: int) -> list[dict]:
    problem = PROBLEMS[name]
    weights, data, _ = jax_side.load_or_train(problem, workdir)
    params = jax_side.weights_to_params(weights, jnp.float32)
    train = (jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"]))
    ti = test_indices(problem, len(data["x_test"]))
    test = (jnp.asarray(data["x_test"][ti]), jnp.asarray(data["y_test"][ti]))
    obj = influx.Objective(jax_side.apply_fn, influx.losses.softmax_cross_entropy, l2=problem.l2)
    rows = []
    for family in FAMILIES[name]:
        solver = make_influx_solver(family, problem)

        def call(on: bool, solver=solver):
            _xla.set_enabled(on)
            t0 = time.perf_counter()
            s = jax.block_until_ready(influx.influence(
                obj, params, train, test, kind="hessian", damping=problem.damping, solver=solver))
            return time.perf_counter() - t0, np.asarray(s, np.float64)

        first = {on: call(on)[0] for on in (True, False)}  # compiles both programs
        times = {True: [], False: []}
        scores = {}
        for _ in range(rounds):
            for on in (True, False):
                dt, scores[on] = call(on)
                times[on].append(dt)
        _xla.set_enabled(True)
        on_s, off_s = statistics.median(times[True]), statistics.median(times[False])
        diff = float(np.linalg.norm(scores[True] - scores[False]) / np.linalg.norm(scores[False]))
        rows.append({"problem": name, "family": family, "on_s": on_s, "off_s": off_s,
                     "speedup": off_s / on_s, "first_on_s": first[True],
                     "first_off_s": first[False], "rounds": rounds, "score_rel_diff": diff})
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="digits only, 2 rounds")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/influx-peers"),
                    help="cache of trained weights shared with compare_peers.py")
    args = ap.parse_args(argv)
    m = common.machine()
    t0 = time.perf_counter()
    problems = ["digits"] if args.quick else ["digits", "mnist"]
    rows, skipped = [], {}
    for p in problems:
        try:
            rows += run_problem(p, args.workdir, rounds=2 if args.quick else (5 if p == "digits" else 3))
        except FileNotFoundError as e:  # MNIST lives in ../shared/data (not in the repository)
            skipped[p] = f"data not found: {e}"
    payload = {"machine": m, "quick": args.quick, "options": _xla.CPU_OPTIONS,
               "options_applied": jax.default_backend() == "cpu", "results": rows, "skipped": skipped,
               "seconds": time.perf_counter() - t0}
    common.save_json("xla_options", payload)
    body = [
        "`python -m benchmarks.xla_options` -- `influx.influence` end to end (Hessian, float32, "
        "16 test points, the peer benchmark's problems and solver settings) with influx's CPU "
        f"compile options `{_xla.CPU_OPTIONS}` on and off, alternating in one process, median "
        "of the timed rounds after a compiling call each. The option keeps XLA's own dot "
        "emitter instead of YNNPACK library fusions, which are slower for the skinny "
        "products of these workloads (16 right-hand sides times hidden widths of 16-32).",
        "",
        common.machine_line(m),
        "",
        common.md_table(
            ["problem", "family", "options on s", "options off s", "off / on", "rounds",
             "scores rel. diff"],
            [[r["problem"], r["family"], r["on_s"], r["off_s"], r["speedup"], r["rounds"],
              r["score_rel_diff"]] for r in rows]),
        "",
        "`influx._xla.jit` applies the options to influx's solver, curvature and scoring "
        "programs (not to the response programs, where they measured slower for the vmapped "
        "minibatch steps); `INFLUX_XLA_OPTIONS=0` turns them off.",
    ]
    if skipped:
        body.append("\nSkipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()))
    if not payload["options_applied"]:
        body.insert(1, "\nThe default backend is not the CPU: the options were not applied "
                       "(both columns run the same program).\n")
    common.write_section("XLA compile options", "\n".join(body))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
