"""EK-FAC influence on real architectures: influx against kronfluence (issue 15's benchmark).

    python -m benchmarks.models [--quick] [--only cnn,transformer,mlp10m] [--workdir DIR]

Models (float32, CPU; weights trained here with optax and copied into the torch model):

* ``cnn``: MNIST CNN, conv3x3(16)-ReLU-avgpool2-conv3x3(32)-ReLU-avgpool2-dense(64)-dense(10),
  105,962 parameters (no BatchNorm: kronfluence tracks only ``Linear``/``Conv2d``, so both
  sides see the same parameters; ``examples/cnn_mnist.py`` shows BatchNorm).
* ``transformer``: a 5-block pre-LayerNorm encoder (d = 128, 4 heads, MLP 512, GELU), token
  and position embeddings, mean pooling and a linear **sequence-classification head** (4
  classes) on generated sequences (length 16, vocabulary 64; the class is the marker token
  that occurs most often), about 1.0M parameters. kronfluence tracks its ``Linear`` layers
  only (embeddings and LayerNorms, ~1% of the parameters, are left out of its scores);
  influx covers all of them (embeddings as Kronecker blocks, LayerNorm with the diagonal).
* ``mlp10m`` (influx only, item (c)): MLP 784-4096-1536-10 (ReLU), 9.5M parameters, 10,000
  MNIST images scored against 100 queries: time and peak memory on this machine.

Sizes (``FULL``): CNN N = 2,000 training images, transformer N = 500 sequences (300 Adam
steps), 100 queries each, float64 reference on 2 queries; mlp10m N = 10,000, 100 queries,
sampled Fisher (``samples=1``), ``chunk_size=32``. ``--quick``: N = 500 / 300 / 1,000 and 20
queries. Each subprocess is stopped above ``MAX_RSS_MB`` resident (half the machine's memory;
``$INFLUX_BENCH_MAX_RSS_MB``) and after ``--timeout`` seconds; its peak so far is recorded.

Per model (a, b): EK-FAC influence of all ``N`` training examples on 100 queries,
``S[t, m] = (1/N) g_t^T (G + lambda I)^{-1} g_m`` (influx convention; kronfluence's pairwise
scores divided by ``N``), ``lambda = l2 + damping`` on both sides (kronfluence's
``damping_factor = lambda``; influx ``Objective(l2=l2)`` and ``damping=damping``, as
``benchmarks/compare_peers.py``). influx: ``influx.influence(..., solver=ekfac(residual=False))``
(exact output-Hessian factors; no residual check, kronfluence checks none). kronfluence 1.0.1:
``fit_all_factors(strategy="ekfac")`` then ``compute_pairwise_scores`` (its defaults: sampled
Fisher, float32). Each side runs in its own subprocess; wall time of the whole call (influx:
the first call, compilation included, and a second, compiled call) and the peak RSS of the
subprocess. influx also runs at kronfluence's setting (``samples=1``), with
``memory_budget=64 MiB``, and in a new process whose JAX persistent compilation cache
(``CACHE_ENV``) a first process filled (what a user's second script run sees: no XLA
compilation of programs the cache holds, tracing and chunk sizing still run). Peak RSS:
its ``VmHWM`` read from ``/proc`` by the parent while it runs (imports, data and model
included, the number ``top`` shows). Not ``ru_maxrss``: Linux carries a process's
``maxrss`` across ``fork``/``exec``, so a child of the large parent that trained the models
reports the parent's peak (both sides read 1332 MB on the CNN in the run that found this).

Accuracy: Pearson correlation (flattened) with a float64 reference on a subset: the first
``n_ref`` queries against all ``N`` training examples, ``x_t = (G + lambda I)^{-1} g_t`` by
conjugate gradients on the exact float64 Gauss-Newton product over all ``N`` (host-driven
loop of compiled products: XLA:CPU runs convolutions slowly inside ``while_loop``), stopped at
relative residual ``ref_tol`` (recomputed and reported); scores ``(1/N) g_m^T x_t`` by one
JVP per query over the training set.

Targets (issue 15): influx >= 5x faster than kronfluence at equal or better Pearson, peak
memory no larger; the 10M-parameter model finishes without running out of memory.
Writes ``benchmarks/results/models.json`` (``models_quick.json`` with ``--quick``), prints
markdown tables and the load average at start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Spec:
    name: str
    n_train: int
    n_query: int = 100
    n_ref: int = 4  # queries in the float64 reference subset
    l2: float = 1e-4
    damping: float = 1e-2
    train_steps: int = 1000
    batch: int = 128
    lr: float = 2e-3
    chunk_size: int = 256
    ref_tol: float = 1e-4
    ref_max_steps: int = 300
    samples: int | None = None  # EK-FAC output factor: None = exact (D <= 256), k = sampled Fisher
    peer: bool = True
    seed: int = 0

    @property
    def lam(self) -> float:
        return self.l2 + self.damping


FULL = {
    "cnn": Spec("cnn", n_train=2000, n_ref=2),
    "transformer": Spec("transformer", n_train=500, n_ref=2, chunk_size=128, lr=1e-3, train_steps=300),
    "mlp10m": Spec("mlp10m", n_train=10_000, n_ref=0, train_steps=300, chunk_size=32, peer=False,
                   samples=1),
}
QUICK = {
    "cnn": replace(FULL["cnn"], n_train=500, n_query=20, n_ref=2, train_steps=200),
    "transformer": replace(FULL["transformer"], n_train=300, n_query=20, n_ref=2, train_steps=200),
    "mlp10m": replace(FULL["mlp10m"], n_train=1000, n_query=20, train_steps=50),
}

# the sides of a model's row: influx with the spec's output factor (exact for these models),
# influx with kronfluence's default (sampled Fisher, one label per example), kronfluence
# (and influx with a smaller memory budget than the CPU default, SMALL_BUDGET_MB)
SMALL_BUDGET_MB = 64
SIDES = ("influx", "influx_sampled", "influx_budget", "influx_cached", "kronfluence")
SIDE_NAMES = {"influx": "influx", "influx_sampled": "influx (samples=1)",
              "influx_budget": f"influx (memory_budget={SMALL_BUDGET_MB} MiB)",
              "influx_cached": "influx (new process, persistent compilation cache)",
              "kronfluence": "kronfluence"}
# JAX's persistent compilation cache (a directory of compiled programs, keyed by program and
# options): a first process fills it, a second one (the row) compiles nothing it holds
CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": "{workdir}/jax_cache",
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}

TF = {"vocab": 64, "seq": 16, "d": 128, "heads": 4, "mlp": 512, "blocks": 5, "classes": 4}


def peer_python() -> Path:
    venv = Path(os.environ.get("PEER_VENV", "/work/main/.peer-venv"))
    if not (venv / "bin" / "python").exists():
        venv = ROOT / ".peer-venv"
    return venv / "bin" / "python"


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------ data
def make_data(spec: Spec) -> dict[str, np.ndarray]:
    """Training set and queries as numpy arrays (x_train, y_train, x_query, y_query)."""
    rng = np.random.default_rng(spec.seed)
    if spec.name in ("cnn", "mlp10m"):
        from influx import data as idata

        n_test = max(spec.n_query, 100)
        ds = idata.load("mnist", n_train=min(spec.n_train, 10_000 - n_test) if spec.n_train < 10_000
                        else 9_900, n_test=n_test, seed=spec.seed, flatten=spec.name == "mlp10m")
        (xtr, ytr), (xte, yte) = ds.train, ds.test
        if spec.n_train > len(xtr):  # 10k training examples from the 10k pool: reuse the queries
            xtr = np.concatenate([xtr, xte])[: spec.n_train]
            ytr = np.concatenate([ytr, yte])[: spec.n_train]
        if spec.name == "cnn":
            xtr, xte = xtr.reshape(-1, 28, 28, 1), xte.reshape(-1, 28, 28, 1)
        return {"x_train": xtr.astype(np.float32), "y_train": ytr.astype(np.int32),
                "x_query": xte[: spec.n_query].astype(np.float32),
                "y_query": yte[: spec.n_query].astype(np.int32)}
    if spec.name == "transformer":
        n = spec.n_train + spec.n_query
        V, T, C = TF["vocab"], TF["seq"], TF["classes"]
        x = rng.integers(C, V, size=(n, T))
        y = rng.integers(0, C, size=n)
        for i in range(n):  # 3 copies of the class marker, 2 distractor markers
            pos = rng.choice(T, size=5, replace=False)
            x[i, pos[:3]] = y[i]
            x[i, pos[3:]] = rng.choice([c for c in range(C) if c != y[i]], size=2, replace=False)
        return {"x_train": x[: spec.n_train].astype(np.int32), "y_train": y[: spec.n_train].astype(np.int32),
                "x_query": x[spec.n_train:].astype(np.int32), "y_query": y[spec.n_train:].astype(np.int32)}
    raise ValueError(spec.name)


# ---------------------------------------------------------------------------- models
def init_params(spec: Spec):
    """Parameters as nested dicts of float32 numpy arrays (layout shared with the torch side)."""
    rng = np.random.default_rng(spec.seed + 1)

    def dense(i, o, scale=None):
        s = scale if scale is not None else np.sqrt(2.0 / i)
        return {"w": (rng.standard_normal((i, o)) * s).astype(np.float32), "b": np.zeros(o, np.float32)}

    if spec.name == "cnn":
        def conv(cin, cout):
            return {"w": (rng.standard_normal((3, 3, cin, cout)) * np.sqrt(2 / (9 * cin))).astype(np.float32),
                    "b": np.zeros(cout, np.float32)}
        return {"conv1": conv(1, 16), "conv2": conv(16, 32), "fc1": dense(7 * 7 * 32, 64),
                "fc2": dense(64, 10)}
    if spec.name == "mlp10m":
        return {"fc1": dense(784, 4096), "fc2": dense(4096, 1536), "fc3": dense(1536, 10)}
    if spec.name == "transformer":
        d, m = TF["d"], TF["mlp"]

        def ln():
            return {"scale": np.ones(d, np.float32), "bias": np.zeros(d, np.float32)}
        p = {"emb": (rng.standard_normal((TF["vocab"], d)) * 0.5).astype(np.float32),
             "pos": (rng.standard_normal((TF["seq"], d)) * 0.1).astype(np.float32),
             "lnf": ln(), "head": dense(d, TF["classes"], 1 / np.sqrt(d))}
        for i in range(TF["blocks"]):
            p[f"block{i}"] = {"ln1": ln(), "q": dense(d, d, 1 / np.sqrt(d)), "k": dense(d, d, 1 / np.sqrt(d)),
                              "v": dense(d, d, 1 / np.sqrt(d)), "o": dense(d, d, 0.5 / np.sqrt(d)),
                              "ln2": ln(), "fc1": dense(d, m), "fc2": dense(m, d, 0.5 / np.sqrt(m))}
        return p
    raise ValueError(spec.name)


def apply_fn_for(name: str):
    """``apply_fn(params, x) -> logits`` in JAX (batched or unbatched inputs)."""
    import jax
    import jax.numpy as jnp

    if name == "cnn":
        def conv(p, x):
            y = jax.lax.conv_general_dilated(x, p["w"], (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return y + p["b"]

        def pool(x):
            return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4

        def apply_fn(params, x):
            single = x.ndim == 3
            x = x[None] if single else x
            h = pool(jax.nn.relu(conv(params["conv1"], x)))
            h = pool(jax.nn.relu(conv(params["conv2"], h)))
            h = h.reshape(h.shape[0], -1)
            h = jax.nn.relu(h @ params["fc1"]["w"] + params["fc1"]["b"])
            out = h @ params["fc2"]["w"] + params["fc2"]["b"]
            return out[0] if single else out
        return apply_fn
    if name == "mlp10m":
        def apply_fn(params, x):
            h = jax.nn.relu(x @ params["fc1"]["w"] + params["fc1"]["b"])
            h = jax.nn.relu(h @ params["fc2"]["w"] + params["fc2"]["b"])
            return h @ params["fc3"]["w"] + params["fc3"]["b"]
        return apply_fn
    if name == "transformer":
        H = TF["heads"]

        def ln(p, h):
            mu = h.mean(-1, keepdims=True)
            var = ((h - mu) ** 2).mean(-1, keepdims=True)
            return (h - mu) / jnp.sqrt(var + 1e-5) * p["scale"] + p["bias"]

        def lin(p, h):
            return h @ p["w"] + p["b"]

        def apply_fn(params, x):
            h = params["emb"][x] + params["pos"]  # (..., T, d)
            d = h.shape[-1]
            for i in range(TF["blocks"]):
                b = params[f"block{i}"]
                a = ln(b["ln1"], h)
                q, k, v = (lin(b[n], a).reshape(*a.shape[:-1], H, d // H) for n in "qkv")
                att = jax.nn.softmax(jnp.einsum("...thc,...shc->...hts", q, k) / np.sqrt(d // H), -1)
                o = jnp.einsum("...hts,...shc->...thc", att, v).reshape(*a.shape[:-1], d)
                h = h + lin(b["o"], o)
                h = h + lin(b["fc2"], jax.nn.gelu(lin(b["fc1"], ln(b["ln2"], h)), approximate=True))
            h = ln(params["lnf"], h).mean(-2)
            return lin(params["head"], h)
        return apply_fn
    raise ValueError(name)


def train(spec: Spec, data) -> tuple[dict, dict]:
    """Minibatch Adam on ``mean CE + l2/2 ||theta||^2`` (float32); weights as numpy."""
    import jax
    import jax.numpy as jnp
    import optax

    import influx

    f = apply_fn_for(spec.name)
    params = jax.tree_util.tree_map(jnp.asarray, init_params(spec))
    opt = optax.adam(spec.lr)
    x, y = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])

    def objective(p, xb, yb):
        ce = influx.losses.softmax_cross_entropy(f(p, xb), yb).mean()
        return ce + 0.5 * spec.l2 * sum(jnp.vdot(a, a) for a in jax.tree_util.tree_leaves(p))

    @jax.jit
    def step(p, s, idx):
        v, g = jax.value_and_grad(objective)(p, x[idx], y[idx])
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, v

    rng = np.random.default_rng(spec.seed)
    s = opt.init(params)
    t0 = time.perf_counter()
    for _ in range(spec.train_steps):
        params, s, v = step(params, s, jnp.asarray(rng.choice(len(x), spec.batch, replace=False)))
    pred = jnp.argmax(f(params, jnp.asarray(data["x_query"])), -1)
    acc = float(jnp.mean(pred == jnp.asarray(data["y_query"])))
    log = {"train_seconds": time.perf_counter() - t0, "last_minibatch_objective": float(v),
           "query_accuracy": acc}
    return jax.tree_util.tree_map(np.asarray, params), log


def flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def unflatten(flat: dict):
    out: dict = {}
    for key, v in flat.items():
        d = out
        *path, last = key.split("/")
        for p in path:
            d = d.setdefault(p, {})
        d[last] = v
    return out


# ------------------------------------------------------------------------ the sides
def influx_side(spec: Spec, workdir: Path, samples: int | None = None, tag: str = "influx",
                budget_mb: int | None = None) -> dict:
    """EK-FAC influence with influx (run in its own process); twice: cold and compiled.
    ``samples``: the output factor (``None``: the spec's; 1: kronfluence's default, one
    sampled label per example); ``budget_mb``: ``memory_budget`` in MiB (``None``: the
    default); scores saved as ``scores_<tag>.npy``."""
    import jax
    import jax.numpy as jnp

    import influx

    data = dict(np.load(workdir / "data.npz"))
    params = jax.tree_util.tree_map(jnp.asarray, unflatten(dict(np.load(workdir / "weights.npz"))))
    f = apply_fn_for(spec.name)
    obj = influx.Objective(f, influx.losses.softmax_cross_entropy, l2=spec.l2)
    train_set = (jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"]))
    query = (jnp.asarray(data["x_query"]), jnp.asarray(data["y_query"]))
    solver = influx.solvers.ekfac(residual=False, samples=spec.samples if samples is None else samples)
    rss0 = peak_rss_mb()
    out = {"coverage": float(influx.solvers.ekfac.coverage(f, params, train_set[0][:1]))}
    times = []
    for _ in range(1 if spec.name == "mlp10m" else 2):
        t0 = time.perf_counter()
        S = influx.influence(obj, params, train_set, query, damping=spec.damping, solver=solver,
                             chunk_size=spec.chunk_size,
                             memory_budget=None if budget_mb is None else budget_mb << 20)
        S = np.asarray(jax.block_until_ready(S))
        times.append(time.perf_counter() - t0)
    np.save(workdir / f"scores_{tag}.npy", S)
    out.update(seconds_cold=times[0], seconds_warm=times[-1] if len(times) > 1 else None,
               peak_rss_mb=peak_rss_mb(), rss_before_mb=rss0, finite=bool(np.all(np.isfinite(S))))
    return out


def reference(spec: Spec, workdir: Path) -> dict:
    """Float64 CG GNH-influence of the first ``n_ref`` queries on all training examples."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    jax.config.update("jax_enable_x64", True)
    data = dict(np.load(workdir / "data.npz"))
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64),
                                    unflatten(dict(np.load(workdir / "weights.npz"))))
    f = apply_fn_for(spec.name)
    flat, unravel = ravel_pytree(params)
    xd = data["x_train"].astype(np.float64) if data["x_train"].dtype.kind == "f" else data["x_train"]
    x, y = jnp.asarray(xd), jnp.asarray(data["y_train"])
    xq = data["x_query"][: spec.n_ref]
    xq = jnp.asarray(xq.astype(np.float64) if xq.dtype.kind == "f" else xq)
    yq = jnp.asarray(data["y_query"][: spec.n_ref])
    N, lam, chunk = len(x), spec.lam, 250

    def ce(z, t):
        return -jnp.take_along_axis(jax.nn.log_softmax(z), t[..., None], -1)[..., 0]

    @jax.jit
    def gnh_chunk(V, fl, xc):  # sum over the chunk of J^T H_z J v, for each row of V
        def net(ff):
            return f(unravel(ff), xc)

        z, vjp = jax.vjp(net, fl)
        p = jax.nn.softmax(z)

        def one(v):
            jv = jax.jvp(net, (fl,), (v,))[1]
            return vjp(p * jv - p * jnp.sum(p * jv, -1, keepdims=True))[0]
        return jax.vmap(one)(V)

    def A(V):
        Vj = jnp.asarray(V)
        out = lam * Vj
        for s in range(0, N, chunk):
            out = out + gnh_chunk(Vj, flat, x[s:s + chunk]) / N
        return np.asarray(out)

    grad1 = jax.grad(lambda fl, xi, yi: ce(f(unravel(fl), xi), yi))
    g_q = np.asarray(jax.vmap(grad1, (None, 0, 0))(flat, xq, yq))
    t0 = time.perf_counter()
    X = np.zeros_like(g_q)
    R = g_q.copy()
    Pd = R.copy()
    rs = np.sum(R * R, 1)
    bn = np.sqrt(np.sum(g_q * g_q, 1))
    steps = 0
    while steps < spec.ref_max_steps and np.max(np.sqrt(rs) / bn) > spec.ref_tol:
        AP = A(Pd)
        a = rs / np.sum(Pd * AP, 1)
        X += a[:, None] * Pd
        R -= a[:, None] * AP
        rs_new = np.sum(R * R, 1)
        Pd = R + (rs_new / rs)[:, None] * Pd
        rs = rs_new
        steps += 1
        with open(workdir / "reference.log", "a") as log:
            log.write(f"step {steps} rel. residual {np.max(np.sqrt(rs) / bn):.3e} "
                      f"{time.perf_counter() - t0:.1f} s\n")
    true_res = np.sqrt(np.sum((A(X) - g_q) ** 2, 1)) / bn
    if np.max(true_res) > 10 * spec.ref_tol:
        raise RuntimeError(f"{spec.name}: float64 CG reference did not converge "
                           f"({steps} steps, relative residual {np.max(true_res):.2e})")

    @jax.jit
    def scores_chunk(X, fl, xc, yc):  # (n_ref, chunk): JVP of the per-example losses along x_t
        def losses(ff):
            return ce(f(unravel(ff), xc), yc)
        return jax.vmap(lambda v: jax.jvp(losses, (fl,), (v,))[1])(X)

    S = np.concatenate([np.asarray(scores_chunk(jnp.asarray(X), flat, x[s:s + chunk], y[s:s + chunk]))
                        for s in range(0, N, chunk)], 1) / N
    np.save(workdir / "scores_reference.npy", S)
    return {"method": f"float64 CG on the exact GNH, tol {spec.ref_tol:g}", "cg_steps": steps,
            "max_rel_residual": float(np.max(true_res)), "seconds": time.perf_counter() - t0,
            "n_ref": spec.n_ref}


def _vm_mb(pid: int, field: str = "VmHWM") -> float | None:
    """``VmHWM`` (peak resident set size) or ``VmRSS`` of a running process, from ``/proc``."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


MAX_RSS_MB = float(os.environ.get("INFLUX_BENCH_MAX_RSS_MB", 0.5 * os.sysconf("SC_PHYS_PAGES")
                                  * os.sysconf("SC_PAGE_SIZE") / 2**20))


def run_sub(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """Runs ``cmd`` (with ``env`` added to the environment), returns its last JSON line; the
    child's peak RSS is also observed from outside (``VmHWM``, polled), so a run that times
    out still reports its peak so far."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    import threading

    buf = {}
    reader = threading.Thread(target=lambda: buf.update(zip(("out", "err"), p.communicate())), daemon=True)
    reader.start()
    hwm, over = 0.0, False
    while reader.is_alive() and time.perf_counter() - t0 < timeout:
        hwm = max(hwm, _vm_mb(p.pid) or 0.0)
        over = (_vm_mb(p.pid, "VmRSS") or 0.0) > MAX_RSS_MB
        if over:  # a shared machine: stop before it runs out of memory
            break
        reader.join(0.5)
    if reader.is_alive():
        p.kill()
        reader.join()
        why = (f"stopped at {hwm:.0f} MB resident (over the cap MAX_RSS_MB = {MAX_RSS_MB:.0f} MB, "
               "$INFLUX_BENCH_MAX_RSS_MB)" if over else f"timeout after {timeout:.0f} s")
        return {"ok": False, "error": why, "peak_rss_mb_observed": hwm,
                "wall_seconds": time.perf_counter() - t0}
    lines = [ln for ln in buf.get("out", "").splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"ok": False, "error": f"exit {p.returncode}: {buf.get('err', '')[-2000:]}",
                "peak_rss_mb_observed": hwm, "wall_seconds": time.perf_counter() - t0}
    out = json.loads(lines[-1])
    out.update(ok=True, peak_rss_mb_observed=hwm, wall_seconds=time.perf_counter() - t0)
    return out


def pearson(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def run_model(spec: Spec, workdir: Path, timeout: float) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    data = make_data(spec)
    weights, log = train(spec, data)
    flat = flatten(weights)
    np.savez(workdir / "weights.npz", **flat)
    np.savez(workdir / "data.npz", **data)
    import jax.numpy as jnp

    params = unflatten({a: jnp.asarray(b) for a, b in flat.items()})
    logits = apply_fn_for(spec.name)(params, jnp.asarray(data["x_query"]))
    np.save(workdir / "logits_jax.npy", np.asarray(logits))
    (workdir / "spec.json").write_text(json.dumps({**asdict(spec), "tf": TF}))
    res = {"spec": asdict(spec), "n_params": int(sum(v.size for v in flat.values())), "train": log}
    me = [sys.executable, "-m", "benchmarks.models", "--side"]
    res["influx"] = run_sub(me + ["influx", "--model", spec.name, "--workdir", str(workdir)], timeout)
    if spec.peer and spec.samples is None:  # also at kronfluence's own setting: one sampled label
        res["influx_sampled"] = run_sub(me + ["influx", "--model", spec.name, "--workdir", str(workdir),
                                              "--samples", "1", "--tag", "influx_sampled"], timeout)
        res["influx_budget"] = run_sub(me + ["influx", "--model", spec.name, "--workdir", str(workdir),
                                             "--budget-mb", str(SMALL_BUDGET_MB), "--tag", "influx_budget"],
                                       timeout)
        env = {k: v.format(workdir=workdir) for k, v in CACHE_ENV.items()}
        shutil.rmtree(workdir / "jax_cache", ignore_errors=True)
        fill = run_sub(me + ["influx", "--model", spec.name, "--workdir", str(workdir),
                             "--tag", "influx_fill"], timeout, env)
        res["influx_cached"] = (run_sub(me + ["influx", "--model", spec.name, "--workdir", str(workdir),
                                              "--tag", "influx_cached"], timeout, env)
                                if fill.get("ok") else fill)
    if spec.peer:
        res["kronfluence"] = run_sub([str(peer_python()), str(ROOT / "benchmarks/peers/models_torch.py"),
                                      "--workdir", str(workdir)], timeout)
    if spec.n_ref:
        res["reference"] = run_sub(me + ["reference", "--model", spec.name, "--workdir", str(workdir)],
                                   timeout)
        if res["reference"].get("ok"):
            ref = np.load(workdir / "scores_reference.npy")
            for side in SIDES:
                r = res.get(side, {})
                path = workdir / f"scores_{side}.npy"
                if r.get("ok") and path.exists():
                    sc = np.load(path)[: spec.n_ref]
                    r["pearson"] = pearson(sc, ref)
                    r["norm_ratio_to_reference"] = float(np.linalg.norm(sc) / np.linalg.norm(ref))
    k = res.get("kronfluence", {})
    for side in SIDES[:-1]:
        i = res.get(side, {})
        if not (k.get("ok") and i.get("ok")):
            continue
        ki = np.load(workdir / "scores_kronfluence.npy")
        pi, pk = i.get("pearson", np.nan), k.get("pearson", np.nan)
        cmp = {"pearson_influx_kronfluence": pearson(np.load(workdir / f"scores_{side}.npy"), ki),
               "speedup_cold": k["seconds"] / i["seconds_cold"],
               "speedup_warm": k["seconds"] / i["seconds_warm"],
               "memory_ratio": i["peak_rss_mb_observed"] / k["peak_rss_mb_observed"]}
        cmp["targets"] = {"5x_faster_cold": cmp["speedup_cold"] >= 5,
                          "5x_faster_warm": cmp["speedup_warm"] >= 5,
                          "pearson_not_worse": bool(pi >= pk - 1e-3),
                          "memory_not_larger": cmp["memory_ratio"] <= 1}
        if side == "influx":
            res.update(cmp)
        else:
            res[f"vs_kronfluence_{side}"] = cmp
    return res


# --------------------------------------------------------------------------- report
def _f(v, fmt="{:.3g}"):
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else fmt.format(v)


def table(results: dict) -> str:
    rows = ["| model | P | N | queries | side | seconds (cold / warm) | peak RSS MB | Pearson vs f64 ref | "
            "parameters in Kronecker blocks |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["models"].items():
        s = r["spec"]
        for side in SIDES:
            if side not in r:
                continue
            d = r[side]
            if not d.get("ok"):
                rows.append(f"| {name} | {r['n_params']:,} | {s['n_train']} | {s['n_query']} | "
                            f"{SIDE_NAMES[side]} | "
                            f"failed: {d.get('error', '')[:120].replace('|', '/')} | "
                            f"{_f(d.get('peak_rss_mb_observed'), '>= {:.0f}')} | | |")
                continue
            sec = (f"{_f(d['seconds_cold'])} / {_f(d.get('seconds_warm'))}" if side != "kronfluence"
                   else _f(d["seconds"]))
            rows.append(f"| {name} | {r['n_params']:,} | {s['n_train']} | {s['n_query']} | "
                        f"{SIDE_NAMES[side]} | {sec} | "
                        f"{_f(d['peak_rss_mb_observed'], '{:.0f}')} | {_f(d.get('pearson'), '{:.3f}')} | "
                        f"{_f(d.get('coverage', d.get('tracked_share')), '{:.3f}')} |")
    lines = ["\n".join(rows), ""]
    for name, r in results["models"].items():
        for side, c in (("influx", r), *((sd, r.get(f"vs_kronfluence_{sd}", {}))
                                           for sd in ("influx_sampled", "influx_budget", "influx_cached"))):
            if "targets" in c:
                lines.append(f"- {name}, {SIDE_NAMES[side]}: kronfluence/influx time "
                             f"{c['speedup_cold']:.2f}x (cold), {c['speedup_warm']:.2f}x (compiled); "
                             f"influx/kronfluence peak memory "
                             f"{c['memory_ratio']:.2f}; Pearson(influx, kronfluence) "
                             f"{c['pearson_influx_kronfluence']:.3f}; targets {c['targets']}")
        if r.get("reference", {}).get("ok"):
            ref = r["reference"]
            lines.append(f"- {name} reference: {ref['method']}, {ref['cg_steps']} steps, relative "
                         f"residual {ref['max_rel_residual']:.1e}, {ref['n_ref']} queries x all N, "
                         f"{ref['seconds']:.0f} s")
        load0, load1 = (r.get("loadavg_start", results.get("loadavg_start")),
                        r.get("loadavg_end", results.get("loadavg_end")))
        lines.append(f"- {name}: run {r.get('date', '-')}, {_f(r.get('seconds'), '{:.0f}')} s, load average "
                     f"(1, 5, 15 min) {load0} at the start, {load1} at the end on "
                     f"{results.get('cores')} cores")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run, minutes)")
    ap.add_argument("--only", default="cnn,transformer,mlp10m")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/influx_models_bench"))
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess")
    ap.add_argument("--table", action="store_true", help="print the tables of the results file only")
    ap.add_argument("--side", choices=["influx", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--samples", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tag", default="influx", help=argparse.SUPPRESS)
    ap.add_argument("--budget-mb", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side:  # a subprocess: one JSON line on stdout
        spec = Spec(**{k: v for k, v in json.loads((args.workdir / "spec.json").read_text()).items()
                       if k != "tf"})
        out = (influx_side(spec, args.workdir, args.samples, args.tag, args.budget_mb)
               if args.side == "influx" else reference(spec, args.workdir))
        print(json.dumps(out))
        return
    specs = QUICK if args.quick else FULL
    out = RESULTS / ("models_quick.json" if args.quick else "models.json")
    from benchmarks.common import machine

    # models run separately (--only) are merged into one file; each keeps its own load average
    results = json.loads(out.read_text()) if out.exists() else {"models": {}}
    if args.table:
        print(table(results))
        return
    results.update(quick=args.quick, cores=os.cpu_count(), machine=machine())
    for name in args.only.split(","):
        print(f"[{name}] ...", flush=True)
        t0, load0 = time.perf_counter(), loadavg()
        r = run_model(specs[name], args.workdir / name, args.timeout)
        r.update(loadavg_start=load0, loadavg_end=loadavg(), seconds=time.perf_counter() - t0,
                 date=results["machine"]["date"])
        if out.exists():  # another run may have written other models meanwhile
            results["models"] = {**json.loads(out.read_text())["models"], **results["models"]}
        results["models"][name] = r
        out.write_text(json.dumps(results, indent=1, default=float))
        print(json.dumps({k: v for k, v in r.items() if k != "spec"}, default=float), flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
