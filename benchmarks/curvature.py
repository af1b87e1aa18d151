"""Cost of curvature-vector products relative to one gradient.

MLP 784-256-256-10 (tanh), batch 1024, float32, softmax cross-entropy, on the default
JAX device. Every function is jitted; each is timed round-robin with the others (median
of many runs after warm-up) so that load drifts hit all alike. Reported as ratios to one
gradient:

* ``influx.hvp``       forward-over-reverse Hessian-vector product on the objective
* ``influx.gnhvp``     ``jax.linearize`` + closed-form output Hessian + transpose
* ``operator(gnh)``    the dataset-level damped operator (one chunk of 1024)
* ``operator(hessian)``
* raw JAX HVP          ``jvp(grad(f))`` written by hand
* raw JAX GNHVP        ``jvp`` for ``J v``, ``vjp`` for ``J^T u``, written by hand

Targets (issue 2): HVP <= 2.0x grad, GNHVP <= 1.6x grad, influx within 5% of raw JAX.
Run: ``python -m benchmarks.curvature [--quick]``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import influx
from benchmarks import common


def build(batch=1024, widths=(784, 256, 256, 10), seed=0):
    key = jax.random.PRNGKey(seed)
    keys = jax.random.split(key, len(widths) + 2)
    params = [
        {"w": jax.random.normal(k, (a, b), jnp.float32) / np.sqrt(a), "b": jnp.zeros((b,), jnp.float32)}
        for k, a, b in zip(keys, widths[:-1], widths[1:])
    ]
    x = jax.random.normal(keys[-2], (batch, widths[0]), jnp.float32)
    y = jax.random.randint(keys[-1], (batch,), 0, widths[-1])

    def apply_fn(p, x):
        h = x
        for layer in p[:-1]:
            h = jnp.tanh(h @ layer["w"] + layer["b"])
        return h @ p[-1]["w"] + p[-1]["b"]

    return apply_fn, params, x, y


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few repeats (smoke run)")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 60)

    apply_fn, params, x, y = build()
    loss = influx.losses.softmax_cross_entropy
    obj = influx.Objective(apply_fn, loss, l2=0.0)
    data = (x, y)
    v = jax.tree_util.tree_map(lambda a: jnp.ones_like(a) * 0.01, params)

    f = lambda p: jnp.mean(loss(apply_fn(p, x), y))
    net = lambda p: apply_fn(p, x)
    out_loss = lambda z: jnp.mean(loss(z, y))

    def raw_hvp(p, v):
        return jax.jvp(jax.grad(f), (p,), (v,))[1]

    def raw_gnhvp(p, v):
        z, jv = jax.jvp(net, (p,), (v,))
        pr = jax.nn.softmax(z)
        hjv = (pr * jv - pr * jnp.sum(pr * jv, -1, keepdims=True)) / z.shape[0]
        _, vjp = jax.vjp(net, p)
        return vjp(hjv)[0]

    op_g = influx.curvature.operator(obj, params, data, kind="gnh", chunk_size=1024)
    op_h = influx.curvature.operator(obj, params, data, kind="hessian", chunk_size=1024)

    fns = {
        "loss": jax.jit(f),
        "grad": jax.jit(jax.grad(f)),
        "influx.hvp": jax.jit(lambda p, v: influx.hvp(f, p, v)),
        "raw JAX hvp": jax.jit(raw_hvp),
        "influx.gnhvp": jax.jit(lambda p, v: influx.gnhvp(net, out_loss, p, v)),
        "raw JAX gnhvp": jax.jit(raw_gnhvp),
        "operator(gnh)": jax.jit(lambda o, v: o.curvature(v)),
        "operator(hessian)": jax.jit(lambda o, v: o.curvature(v)),
    }
    calls = {
        "loss": lambda: fns["loss"](params),
        "grad": lambda: fns["grad"](params),
        "influx.hvp": lambda: fns["influx.hvp"](params, v),
        "raw JAX hvp": lambda: fns["raw JAX hvp"](params, v),
        "influx.gnhvp": lambda: fns["influx.gnhvp"](params, v),
        "raw JAX gnhvp": lambda: fns["raw JAX gnhvp"](params, v),
        "operator(gnh)": lambda: fns["operator(gnh)"](op_g, v),
        "operator(hessian)": lambda: fns["operator(hessian)"](op_h, v),
    }
    t = common.interleaved(calls, repeats=repeats)
    # correctness (after timing, so first-call times include compilation)
    a, b = calls["influx.gnhvp"](), calls["raw JAX gnhvp"]()
    c = calls["operator(gnh)"]()
    for other in (b, c):
        err = max(float(jnp.max(jnp.abs(p - q))) for p, q in zip(jax.tree_util.tree_leaves(a),
                                                                   jax.tree_util.tree_leaves(other)))
        assert err < 1e-5, f"GNHVP variants disagree: {err}"
    g = t["grad"]["median_s"]
    rows = []
    for name, r in t.items():
        r["ratio_to_grad"] = r["median_s"] / g
        rows.append([name, r["median_s"] * 1e3, r["ratio_to_grad"], r["first_s"] * 1e3])
    ratios = {
        "hvp_over_grad": t["influx.hvp"]["ratio_to_grad"],
        "gnhvp_over_grad": t["influx.gnhvp"]["ratio_to_grad"],
        "operator_gnh_over_grad": t["operator(gnh)"]["ratio_to_grad"],
        "influx_hvp_over_raw": t["influx.hvp"]["median_s"] / t["raw JAX hvp"]["median_s"],
        "influx_gnhvp_over_raw": t["influx.gnhvp"]["median_s"] / t["raw JAX gnhvp"]["median_s"],
        "operator_gnh_over_raw": t["operator(gnh)"]["median_s"] / t["raw JAX gnhvp"]["median_s"],
    }
    targets = {
        "hvp_over_grad <= 2.0": ratios["hvp_over_grad"] <= 2.0,
        "gnhvp_over_grad <= 1.6": ratios["gnhvp_over_grad"] <= 1.6,
        "influx within 5% of raw (hvp)": ratios["influx_hvp_over_raw"] <= 1.05,
        "influx within 5% of raw (gnhvp)": ratios["influx_gnhvp_over_raw"] <= 1.05,
    }
    m = common.machine()
    payload = {"machine": m, "problem": "MLP 784-256-256-10 tanh, batch 1024, float32",
               "repeats": repeats, "timings": t, "ratios": ratios, "targets_met": targets}
    path = common.save_json("curvature", payload)
    table = common.md_table(["function", "median ms", "x grad", "first call ms (compile)"], rows)
    body = "\n".join([
        "`python -m benchmarks.curvature` -- MLP 784-256-256-10 (tanh), batch 1024, float32, "
        f"median of {repeats} interleaved runs after warm-up.",
        "",
        common.machine_line(m),
        "",
        table,
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| HVP <= 2.0x grad | {ratios['hvp_over_grad']:.2f}x | {targets['hvp_over_grad <= 2.0']} |",
        f"| GNHVP <= 1.6x grad | {ratios['gnhvp_over_grad']:.2f}x | {targets['gnhvp_over_grad <= 1.6']} |",
        f"| influx HVP within 5% of raw JAX | {ratios['influx_hvp_over_raw']:.3f} | "
        f"{targets['influx within 5% of raw (hvp)']} |",
        f"| influx GNHVP within 5% of raw JAX | {ratios['influx_gnhvp_over_raw']:.3f} | "
        f"{targets['influx within 5% of raw (gnhvp)']} |",
    ])
    common.write_section("Curvature products", body)
    print(table)
    print(ratios)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
