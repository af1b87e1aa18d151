"""Benchmark: influx against peer libraries (pyDVL, kronfluence), side by side in one run.

Same data, same MLP, the same trained weights (trained once here with jax + optax, exported
to .npz, loaded into an equivalent torch module; logits and losses must agree to 1e-5 before
anything is timed), same damping, same test points, same solver settings
(``benchmarks/peers/problem.py``). The peers run in their own virtual environment
(``benchmarks/peers_setup.sh``; ``$PEER_VENV``, default ``.peer-venv``) as a JSON-lines
server subprocess, so the influx and peer runs alternate in one session:
for each solver family, round r = 1..3: influx, then each peer method; a method whose call
takes > 10 s runs in round 1 only; the median of the timed calls is reported.

Accuracy: every score matrix (n_test x n_train, influx convention
``S = (1/N) g_test^T (H + lambda I)^{-1} g_train``) against a float64 reference computed in
JAX (``benchmarks/peers/jax_side.py``, its own subprocess with x64; dense Cholesky on digits,
tightly converged CG on MNIST, cached in --workdir): Pearson correlation and relative
Frobenius error. Timed runs are float32 on both sides.

Time limits: a peer call has 60 s (pyDVL's one-at-a-time CG and its LiSSA 30 s; a timeout
is reported as a lower bound on the ratio), and the whole run a --budget (570 s; 170 s with
--quick) after which later rounds are dropped and remaining families skipped.

    python -m benchmarks.compare_peers            # digits + MNIST (~10 min on 2 idle cores)
    python -m benchmarks.compare_peers --quick    # digits only, one round (< 3 min)

Writes benchmarks/results/peers.json and the '## Peers' section of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peers import jax_side  # noqa: E402
from benchmarks.peers.measure import PeakRSS  # noqa: E402
from benchmarks.peers.problem import (  # noqa: E402
    PROBLEMS,
    Problem,
    forward_numpy,
    per_example_ce_numpy,
    score_accuracy,
    test_indices,
)
from benchmarks.peers.report import fmt, machine, replace_section, table  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# (family, influx solver, peer methods)
FAMILIES = [
    ("direct", "direct", ["pydvl_direct"]),
    ("cg", "cg", ["pydvl_cg", "pydvl_cg_block"]),
    ("lissa", "lissa", ["pydvl_lissa", "pydvl_lissa_scaled"]),
    ("arnoldi", "arnoldi", ["pydvl_arnoldi"]),
    ("ekfac", "ekfac", ["kronfluence_ekfac", "pydvl_ekfac"]),
    ("kfac", "kfac", ["kronfluence_kfac"]),
]
TOL_MATCH = 1e-5  # losses: absolute; logits: relative to max(1, max |logit|)
# seconds one peer call (warm-up + repeats) may take before it is recorded as a timeout
# (the ratio is then reported as a lower bound, "> x")
PEER_TIMEOUT = {"digits": 60.0, "mnist": 75.0}
# peer methods known to be pathologically slow on CPU (pyDVL's one-right-hand-side-at-a-time
# CG and its LiSSA loop re-enter Python for every product: > 240 s on digits in earlier runs):
# capped at a shorter limit, still reported as a lower bound; --full lifts the caps
SLOW_PEERS = {"pydvl_cg": 30.0, "pydvl_lissa": 30.0, "pydvl_lissa_scaled": 30.0}
# configurations skipped by default (they cannot finish within the budget; --full runs them)
SKIP_DEFAULT = {
    "mnist": {"pydvl_lissa_scaled": "pyDVL's LiSSA on MNIST: > 30 s per call already for the "
                                    "default scale (see pydvl_lissa); --full runs it"},
}
SKIP_QUICK = {"pydvl_cg", "pydvl_lissa", "pydvl_lissa_scaled"}
# a method whose first timed call takes longer than this is not repeated in later rounds
EXPENSIVE_S = 10.0


def peer_python() -> Path:
    venv = Path(os.environ.get("PEER_VENV", ROOT / ".peer-venv"))
    return venv / "bin" / "python"


# ------------------------------------------------------------------ peer server
class PeerServer:
    """The torch side as a subprocess speaking JSON lines (see peers/torch_side.py)."""

    def __init__(self, problem: Problem, weights: Path, workdir: Path, *, timeout: float):
        self.args = [
            str(peer_python()), str(ROOT / "benchmarks" / "peers" / "torch_side.py"),
            "--problem", problem.name, "--weights", str(weights), "--workdir", str(workdir),
        ]
        self.timeout = timeout
        self.log = open(workdir / "peer_stderr.log", "a")
        self._start()

    def _start(self):
        self.proc = subprocess.Popen(
            self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
            text=True, bufsize=1,
        )
        self.hello = self._read(timeout=300)
        if not self.hello or not self.hello.get("ready"):
            raise RuntimeError(f"peer side did not start: {self.hello}")

    def _read(self, timeout: float):
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {"ok": False, "error": "peer process exited"}

    def ask(self, msg: dict, timeout: float | None = None) -> dict:
        if self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        t = timeout or self.timeout
        reply = self._read(t)
        if reply is None:  # timed out: kill this server, start a fresh one
            self.proc.kill()
            self.proc.wait()
            self._start()
            return {"ok": False, "error": f"timeout: no result within {t:.0f} s", "timeout": True,
                    "timeout_s": t}
        return reply

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


# ------------------------------------------------------------------ influx side
def influx_status() -> str | None:
    """None when influx.influence and influx.solvers.{direct,cg,lissa,arnoldi} import."""
    try:
        import influx  # noqa: F401
        from influx import solvers  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"influx not importable: {type(e).__name__}: {e}"
    if not hasattr(influx, "influence"):
        return "influx.influence not available yet"
    return None


def make_influx_solver(name: str, problem: Problem):
    import jax

    from influx import solvers

    if not hasattr(solvers, name):
        raise NotImplementedError(f"influx.solvers.{name} not available")
    if name == "direct":
        return solvers.direct()
    if name == "cg":
        # block CG for the 16 test gradients (one shared Krylov space), as pyDVL's block CG
        return solvers.cg(tol=problem.cg_tol, max_steps=problem.cg_max_steps, block=True)
    if name == "lissa":
        return solvers.lissa(
            scale=None, depth=problem.lissa_depth, samples=1,
            batch_size=problem.lissa_batch_size, key=jax.random.key(problem.seed),
        )
    if name == "arnoldi":
        # projection-only estimator (Schioppa et al.; pyDVL's ArnoldiInfluence), the same
        # rank and Krylov dimension as pyDVL; no residual check (pyDVL computes none)
        return solvers.arnoldi(rank=problem.arnoldi_rank, iterations=problem.arnoldi_krylov,
                               complement=False, residual=False)
    if name in ("ekfac", "kfac"):
        # factors of the Gauss-Newton matrix (exact output-Hessian factors, no sampled
        # labels); no residual check (the peers compute none)
        return getattr(solvers, name)(residual=False)
    raise ValueError(name)


def _products(info, name: str, problem: Problem, n_train: int):
    """Curvature products in full-data units, from ``InfluenceInfo.iterations`` (summed over
    the test vectors; LiSSA's minibatch products count ``batch_size / N``); ``P`` for
    ``direct`` (dense materialisation)."""
    if name == "direct":
        return float(problem.n_params)
    if name in ("ekfac", "kfac"):
        return None  # no curvature-vector products: factor passes over the data
    it = getattr(info, "iterations", None)
    if it is None:
        return None
    total = float(np.sum(np.asarray(it)))
    if name == "lissa":
        total *= min(problem.lissa_batch_size, n_train) / n_train
    if name == "arnoldi":  # + the Lanczos products of prepare
        total += problem.arnoldi_krylov
    return total


class InfluxSide:
    def __init__(self, problem: Problem, weights: dict, data: dict, workdir: Path):
        import jax.numpy as jnp

        import influx

        self.problem = problem
        self.workdir = workdir
        self.params = jax_side.weights_to_params(weights, jnp.float32)
        self.train = (jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"]))
        ti = test_indices(problem, len(data["x_test"]))
        self.test = (jnp.asarray(data["x_test"][ti]), jnp.asarray(data["y_test"][ti]))
        self.obj = influx.Objective(
            jax_side.apply_fn, influx.losses.softmax_cross_entropy, l2=problem.l2
        )
        self.N = len(data["x_train"])
        self._solvers: dict = {}

    def run(self, name: str, repeats: int, warmup: bool, time_budget: float) -> dict:
        import jax

        import influx

        # one Solver object per method for the whole session: solvers hash by identity as
        # static jit arguments, so a fresh object per round would recompile every round
        if name not in self._solvers:
            self._solvers[name] = make_influx_solver(name, self.problem)
        solver = self._solvers[name]
        times, warm, peak, scores, info = [], None, 0, None, None
        for i in range(0 if warmup else 1, repeats + 1):
            if i >= 2 and sum(times) > time_budget:
                break
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                scores, info = influx.influence(
                    self.obj, self.params, self.train, self.test, kind="hessian",
                    damping=self.problem.damping, solver=solver, return_info=True,
                    on_failure="keep",  # the approximate solvers' own answers: accuracy is measured below
                )
                jax.block_until_ready(scores)
                dt = time.perf_counter() - t0
            peak = max(peak, mem.increase)
            if i == 0:
                warm = dt
            else:
                times.append(dt)
        scores = np.asarray(scores, np.float64)
        path = self.workdir / f"scores_influx_{name}.npy"
        np.save(path, scores)
        return {"scores_path": str(path),
            "method": f"influx_{name}", "warmup_seconds": warm, "all_seconds": times,
            "seconds": statistics.median(times), "timed_runs": len(times),
            "peak_rss_mb": peak / 2**20,
            "products": _products(info, name, self.problem, self.N), "scores": scores,
            "converged": None if info.converged is None else bool(np.all(info.converged)),
            "finite": bool(np.all(np.isfinite(scores))),
        }


def hvp_ratio_jax(repeats: int) -> dict:
    """grad / HVP / GNHVP timings on MLP 784-256-256-10, batch 1024, float32 (jit)."""
    import jax
    import jax.numpy as jnp

    try:
        from influx import gnhvp, hvp

        source = "influx.hvp / influx.gnhvp"
    except ImportError:
        hvp = gnhvp = None
        source = "plain jax (influx.hvp not available)"
    key = jax.random.key(0)
    ks = jax.random.split(key, 6)
    sizes = (784, 256, 256, 10)
    params = [
        {"b": jnp.zeros((b,)), "w": jax.random.normal(k, (a, b)) / np.sqrt(a)}
        for k, a, b in zip(ks, sizes[:-1], sizes[1:])
    ]
    x = jax.random.normal(ks[4], (1024, 784))
    y = jax.random.randint(ks[5], (1024,), 0, 10)
    v = jax.tree_util.tree_map(lambda t: jnp.ones_like(t) * 0.01, params)

    def net(p):
        return jax_side.apply_fn(p, x)

    def loss_out(z):
        return jnp.mean(jax_side.ce_per_example(z, y))

    def loss(p):
        return loss_out(net(p))

    f_grad = jax.jit(jax.grad(loss))
    if hvp is not None:
        f_hvp = jax.jit(lambda p, v: hvp(loss, p, v))
        f_gn = jax.jit(lambda p, v: gnhvp(net, loss_out, p, v))
    else:
        f_hvp = jax.jit(lambda p, v: jax.jvp(jax.grad(loss), (p,), (v,))[1])

        def _gn(p, v):
            z, jv = jax.jvp(net, (p,), (v,))
            hjv = jax.jvp(jax.grad(loss_out), (z,), (jv,))[1]
            return jax.vjp(net, p)[1](hjv)[0]

        f_gn = jax.jit(_gn)
    res = {"model": "MLP 784-256-256-10 tanh", "batch": 1024, "dtype": "float32",
           "source": source}
    for name, fn, a in (("grad", f_grad, (params,)), ("hvp", f_hvp, (params, v)),
                        ("gnhvp", f_gn, (params, v))):
        jax.block_until_ready(fn(*a))
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*a))
            ts.append(time.perf_counter() - t0)
        res[f"{name}_seconds"] = statistics.median(ts)
    res["hvp_over_grad"] = res["hvp_seconds"] / res["grad_seconds"]
    res["gnhvp_over_grad"] = res["gnhvp_seconds"] / res["grad_seconds"]
    return res


# ------------------------------------------------------------------ driver
def check_equivalence(peer: PeerServer, influx_logits: dict, weights, data, ti) -> dict:
    reply = peer.ask({"cmd": "check"})
    if not reply.get("ok"):
        raise RuntimeError(f"peer check failed: {reply.get('error')}")
    out = {}
    for split, x, y in (
        ("train", data["x_train"], data["y_train"]),
        ("test", data["x_test"][ti], data["y_test"][ti]),
    ):
        ref = forward_numpy(weights, x)
        tl = np.load(reply[f"{split}_logits"])
        tloss = np.load(reply[f"{split}_losses"])
        jl = influx_logits[split]
        jloss = per_example_ce_numpy(jl.astype(np.float64), y)
        # float32 logits of magnitude ~10 carry round-off of ~1e-6 per operation, so logits
        # are compared relative to their scale (max(1, max |logit|)); losses absolutely
        scale = max(1.0, float(np.max(np.abs(ref))))
        out[split] = {
            "max_abs_logits_torch_vs_jax": float(np.max(np.abs(tl - jl))),
            "logit_scale": scale,
            "max_abs_loss_torch_vs_jax": float(np.max(np.abs(tloss - jloss))),
            "max_abs_logits_torch_vs_float64": float(np.max(np.abs(tl - ref))),
            "max_abs_logits_jax_vs_float64": float(np.max(np.abs(jl - ref))),
        }
        if (out[split]["max_abs_logits_torch_vs_jax"] > TOL_MATCH * scale
                or out[split]["max_abs_loss_torch_vs_jax"] > TOL_MATCH):
            raise AssertionError(f"torch and JAX models disagree on {split}: {out[split]}")
    out["passed"] = True
    return out


def ensure_reference(problem: Problem, workdir: Path, timeout: float) -> dict:
    path = jax_side.reference_path(workdir, problem)
    if not path.exists():
        cmd = [sys.executable, "-m", "benchmarks.peers.jax_side", "--problem", problem.name,
               "--workdir", str(workdir)]
        subprocess.run(cmd, cwd=ROOT, check=True, timeout=timeout)
    z = np.load(path)
    return {"hessian": z["scores_hessian"], "gnh": z["scores_gnh"],
            "info": json.loads(str(z["info"]))}


def accuracy(entry: dict, ref: dict | None) -> None:
    if ref is None:
        entry.pop("scores", None)
        return
    s = entry.pop("scores", None)
    if s is None and entry.get("scores_path"):
        s = np.load(entry["scores_path"])
    if s is None:
        return
    entry["vs_hessian"] = score_accuracy(s, ref["hessian"])
    entry["vs_gnh"] = score_accuracy(s, ref["gnh"])


def run_problem(problem: Problem, args, hvp_ratio: dict) -> dict:
    import jax.numpy as jnp

    workdir = args.workdir / problem.name
    workdir.mkdir(parents=True, exist_ok=True)
    out: dict = {"problem": problem.name, "sizes": list(problem.sizes),
                 "n_params": problem.n_params, "l2": problem.l2, "damping": problem.damping,
                 "n_test": problem.n_test, "settings": {
                     "cg_tol": problem.cg_tol, "cg_max_steps": problem.cg_max_steps,
                     "lissa_depth": problem.lissa_depth,
                     "lissa_batch_size": problem.lissa_batch_size,
                     "arnoldi_rank": problem.arnoldi_rank}}
    t0 = time.perf_counter()
    weights, data, train_log = jax_side.load_or_train(problem, args.workdir)
    out["training"] = train_log
    out["n_train"] = len(data["x_train"])
    wpath = jax_side.weights_path(args.workdir, problem)
    ref = None
    if not args.no_reference:
        try:
            ref = ensure_reference(problem, args.workdir, timeout=args.reference_timeout)
            out["reference"] = ref["info"]
            out["reference"]["gnh_vs_hessian"] = score_accuracy(ref["gnh"], ref["hessian"])
        except (subprocess.SubprocessError, OSError) as e:
            out["reference_error"] = f"{type(e).__name__}: {e}"
    out["setup_seconds"] = time.perf_counter() - t0

    ti = test_indices(problem, len(data["x_test"]))
    params = jax_side.weights_to_params(weights, jnp.float32)
    jl = {"train": np.asarray(jax_side.apply_fn(params, jnp.asarray(data["x_train"]))),
          "test": np.asarray(jax_side.apply_fn(params, jnp.asarray(data["x_test"][ti])))}
    peer = PeerServer(problem, wpath, workdir, timeout=600)
    out["peer_versions"] = peer.hello["versions"]
    try:
        out["equivalence"] = check_equivalence(peer, jl, weights, data, ti)
        if hvp_ratio is not None and "torch" not in hvp_ratio:
            r = peer.ask({"cmd": "hvp_ratio", "repeats": args.hvp_repeats})
            hvp_ratio["torch"] = r
        status = influx_status()
        influx_side = InfluxSide(problem, weights, data, workdir) if status is None else None
        lam_max = (ref["info"]["info_hessian"]["eig_max"] if ref else 1.0) + problem.regularization
        rows = []
        for family, inf_name, peers in FAMILIES:
            if args.families and family not in args.families:
                continue
            entries: dict[str, dict] = {}
            if _left(args) <= 0:
                for k in ([f"influx_{inf_name}"] if inf_name else []) + peers:
                    entries[k] = {"method": k, "skipped": "time budget (--budget) spent"}
                rows.append({"family": family, "entries": entries})
                continue
            for r in range(args.rounds):
                if inf_name is not None:
                    key = f"influx_{inf_name}"
                    _run_influx(entries, key, influx_side, status, inf_name, args, r)
                for m in peers:
                    why = skip_reason(m, problem, args)
                    if why:
                        entries[m] = {"method": m, "skipped": why}
                        continue
                    prev = entries.get(m, {})
                    if prev.get("error") or (r > 0 and _expensive(prev)):
                        continue  # failed, timed out, or too slow to repeat: one round only
                    if r > 0 and _left(args) < 2 * EXPENSIVE_S:
                        continue  # repeats only while the time budget lasts
                    if r == 0 and _left(args) < 10:
                        entries[m] = {"method": m, "skipped": "time budget (--budget) spent"}
                        continue
                    opts = {"time_budget": args.time_budget}
                    if m == "pydvl_lissa_scaled":
                        opts["scale"] = 1.5 * lam_max
                    reply = peer.ask({"cmd": "run", "method": m, "repeats": args.repeats,
                                      "options": opts, "warmup": r == 0},
                                     timeout=peer_timeout(m, problem, args))
                    print(f"  [{problem.name}] {m} round {r}: "
                          f"{reply.get('seconds', reply.get('error'))}", flush=True)
                    _merge(entries, m, reply)
            for e in entries.values():
                if "all_seconds" in e and e["all_seconds"]:
                    e["seconds"] = statistics.median(e["all_seconds"])
                accuracy(e, ref)
            rows.append({"family": family, "entries": entries})
        out["families"] = rows
    finally:
        peer.close()
    return out


def _left(args) -> float:
    """Seconds left of the run's --budget."""
    return args.budget - (time.perf_counter() - args.t_start)


def skip_reason(m: str, problem: Problem, args) -> str | None:
    if m in args.skip:
        return "skipped by --skip"
    if args.full:
        return None
    if m == "pydvl_direct" and problem.n_params > 5000:
        return (f"dense torch.func.hessian over P={problem.n_params} columns: estimated far "
                "above the time budget (run with --full)")
    if m in SKIP_DEFAULT.get(problem.name, {}):
        return SKIP_DEFAULT[problem.name][m]
    if args.quick and m in SKIP_QUICK:
        return "skipped in --quick (known to take > 30 s per call)"
    return None


def peer_timeout(m: str, problem: Problem, args) -> float:
    t = args.peer_timeout or PEER_TIMEOUT[problem.name]
    t = max(10.0, min(t, _left(args)))
    if args.quick:
        t = min(t, 30.0)
    if m in SLOW_PEERS and not args.full:
        t = min(t, SLOW_PEERS[m])
    return t


def _expensive(entry: dict) -> bool:
    """True when one call of the method took > EXPENSIVE_S: later rounds skip it."""
    ts = [t for t in entry.get("all_seconds", []) if t] or (
        [entry["warmup_seconds"]] if entry.get("warmup_seconds") else [])
    return bool(ts) and min(ts) > EXPENSIVE_S


def _run_influx(entries, key, side, status, name, args, r):
    if name == "direct" and side is not None and side.problem.n_params > 5000 and not args.full:
        entries[key] = {"method": key, "skipped": "dense P x P materialisation skipped for "
                        f"P={side.problem.n_params} (run with --full)"}
        return
    if status is not None:
        entries[key] = {"method": key, "error": status, "not_available": True}
        return
    prev = entries.get(key, {})
    if prev.get("error") or prev.get("skipped") or (r > 0 and _expensive(prev)):
        return
    if r > 0 and _left(args) < 2 * EXPENSIVE_S:
        return
    try:
        res = side.run(name, args.repeats, warmup=r == 0, time_budget=args.time_budget)
        print(f"  [{side.problem.name}] {key} round {r}: {res['seconds']:.3g} s", flush=True)
    except NotImplementedError as e:
        res = {"method": key, "error": str(e), "not_available": True, "ok": False}
    except Exception as e:  # noqa: BLE001
        res = {"method": key, "error": f"{type(e).__name__}: {e}", "ok": False,
               "traceback": traceback.format_exc()[-2000:]}
        print(f"  [{side.problem.name}] {key} FAILED: {res['error']}", flush=True)
    _merge(entries, key, res)


def _merge(entries: dict, key: str, res: dict) -> None:
    if not res.get("ok", True) or res.get("error"):
        entries[key] = {"method": key, **{k: v for k, v in res.items() if k != "ok"}}
        return
    if key not in entries:
        entries[key] = dict(res)
        return
    e = entries[key]
    e["all_seconds"] = e.get("all_seconds", []) + res.get("all_seconds", [])
    e["peak_rss_mb"] = max(e.get("peak_rss_mb", 0), res.get("peak_rss_mb", 0))
    for k in ("scores", "scores_path", "products", "finite", "fit_seconds", "score_seconds"):
        if k in res:
            e[k] = res[k]


# ------------------------------------------------------------------ report
def _acc(e):
    a = e.get("vs_hessian")
    if not a:
        return "-"
    return f"{fmt(a['pearson'])} / {fmt(a['rel_error'])}"


def _time(e):
    if e is None:
        return "-"
    if e.get("skipped"):
        return "skipped"
    if e.get("not_available"):
        return "n/a"
    if e.get("error"):
        return f"> {e['timeout_s']:.0f} (timeout)" if e.get("timeout") else "failed"
    return fmt(e.get("seconds"))


def _target(i_e: dict, e: dict, ratio) -> str:
    """Issue 7's target: influx >= 5x faster at equal or better accuracy against the Hessian
    reference: Pearson r within 1e-3 of the peer's and relative error at most 1.1x the
    peer's (errors below 1e-3 count as equal)."""
    if ratio is None:
        return "-"
    fast = float(str(ratio).lstrip("> ")) >= 5.0
    if str(ratio).startswith(">") and not fast:
        return "unknown (peer timed out)"
    ia, pa = i_e.get("vs_hessian"), e.get("vs_hessian")
    if ia is None or (pa is None and not e.get("timeout")):
        return ("met (speed; no accuracy)" if fast else "missed (speed)")
    if pa is None:
        return "met (speed bound; peer accuracy unknown)" if fast else "missed (speed)"
    acc_ok = (ia["pearson"] >= pa["pearson"] - 1e-3 and
                            ia["rel_error"] <= max(1.1 * pa["rel_error"], 1e-3))
    if fast and acc_ok:
        return "met"
    return "missed (" + ", ".join(w for w, bad in (("speed", not fast),
                                                   ("accuracy", not acc_ok)) if bad) + ")"


def family_summary(results: dict) -> list[list]:
    """One row per (problem, family): influx against the *fastest* peer of the family that
    finished (a timed-out peer gives a lower bound only when no peer of the family finished),
    with the measured ratio and the verdict on issue 7's 5x target."""
    rows = []
    for pr in results["problems"]:
        for fam in pr.get("families", []):
            ents = fam["entries"]
            peers = [e for k, e in ents.items() if not k.startswith("influx_")]
            done = [e for e in peers if e.get("seconds") and not e.get("error")]
            timed_out = [e for e in peers if e.get("timeout")]
            if done:
                e = min(done, key=lambda e: e["seconds"])
            elif timed_out:
                e = max(timed_out, key=lambda e: e["timeout_s"])
            else:
                why = sorted({str(e.get("skipped") or e.get("error") or "?") for e in peers})
                rows.append([pr["problem"], fam["family"], "-", "-", "-", "-", "-",
                             "no peer run: " + "; ".join(w.split(":")[0] for w in why)])
                continue
            i_e = next((x for k, x in ents.items() if k.startswith("influx_")), None)
            ratio, verdict = None, "-"
            if i_e and i_e.get("seconds") and not i_e.get("error"):
                ratio = (e["seconds"] / i_e["seconds"] if e.get("seconds") and not e.get("error")
                         else f"> {e['timeout_s'] / i_e['seconds']:.3g}")
                verdict = _target(i_e, e, ratio)
            elif i_e and i_e.get("skipped"):
                verdict = "influx skipped"
            rows.append([pr["problem"], fam["family"], (i_e or {}).get("method", "-"),
                         _time(i_e), e["method"], _time(e), fmt(ratio), verdict])
    return rows


def markdown(results: dict) -> str:
    header = ["problem", "family", "influx", "influx s", "peer", "peer s", "peer/influx",
              ">= 5x at equal acc.", "influx r / rel.err", "peer r / rel.err", "products influx / peer",
              "peak MB influx / peer", "warm-up s influx / peer"]
    rows = []
    for pr in results["problems"]:
        if "error" in pr:
            rows.append([pr["problem"], "-", "-", "-", "-", "-", pr["error"][:80]] + ["-"] * 6)
            continue
        for fam in pr["families"]:
            ents = fam["entries"]
            inf = next((e for k, e in ents.items() if k.startswith("influx_")), None)
            for k, e in ents.items():
                if k.startswith("influx_"):
                    continue
                i_e = inf
                ratio, target = None, "-"
                if i_e and i_e.get("seconds") and not i_e.get("error"):
                    if e.get("seconds") and not e.get("error"):
                        ratio = e["seconds"] / i_e["seconds"]
                    elif e.get("timeout"):
                        ratio = f"> {e['timeout_s'] / i_e['seconds']:.3g}"
                    target = _target(i_e, e, ratio)
                rows.append([
                    pr["problem"], fam["family"], (i_e or {}).get("method", "-"),
                    _time(i_e) if i_e else "n/a", k, _time(e), fmt(ratio), target,
                    _acc(i_e) if i_e else "-", _acc(e),
                    f"{fmt((i_e or {}).get('products'))} / {fmt(e.get('products'))}",
                    f"{fmt((i_e or {}).get('peak_rss_mb'))} / {fmt(e.get('peak_rss_mb'))}",
                    f"{fmt((i_e or {}).get('warmup_seconds'))} / {fmt(e.get('warmup_seconds'))}",
                ])
    summary = family_summary(results)
    parts = ["Per solver family, influx against the fastest peer of the family (issue 7's "
             "target: >= 5x faster at equal or better accuracy):\n\n" + table(
                 ["problem", "family", "influx", "influx s", "fastest peer", "peer s",
                  "peer/influx", "5x target"], summary),
             "All pairs:\n\n" + table(header, rows)]
    flags = [f"{pr['problem']}/{k}" for pr in results["problems"] for fam in pr.get("families", [])
             for k, e in fam["entries"].items() if e.get("converged") is False]
    if flags:
        parts.append("influx solves that reported non-convergence (for CG on an indefinite "
                     "damped Hessian: negative curvature): " + ", ".join(flags) + ".")
    ref_rows = []
    for pr in results["problems"]:
        if pr.get("reference"):
            ih, ig = pr["reference"]["info_hessian"], pr["reference"]["info_gnh"]
            method = ih.get("method") or ("float64 dense Cholesky" if ih.get("positive_definite")
                                          else "float64 dense eigh (not PD)")
            if ih.get("max_rel_residual") is not None:
                method += (f" (rel. residual <= {ih['max_rel_residual']:.1e}, "
                           f"{ih.get('cg_steps_max')} steps)")
            ref_rows.append([pr["problem"], f"{'-'.join(map(str, pr['sizes']))}", pr["n_params"],
                             pr["n_train"], pr["l2"], pr["damping"], ih["eig_min"], ih["eig_max"],
                             ig["eig_max"], method, pr["reference"]["seconds"],
                             pr["reference"]["gnh_vs_hessian"]["pearson"]])
    if ref_rows:
        parts.append("Problems and float64 references (eigenvalues of the undamped "
                     "mean-loss Hessian / GNH; lambda = l2 + damping; every method solves "
                     "with H + lambda I, which is positive definite on both problems):\n\n"
                     + table(["problem", "MLP", "P", "N", "l2", "damping", "H eig min",
                              "H eig max", "GNH eig max", "reference method", "reference s",
                              "r(GNH ref, H ref)"], ref_rows))
    hv = results.get("hvp_ratio") or {}
    if hv:
        hrows = []
        for side in ("influx", "torch"):
            h = hv.get(side)
            if h and "grad_seconds" in h:
                hrows.append([side if side != "torch" else "torch.func", h["grad_seconds"] * 1e3,
                              h["hvp_seconds"] * 1e3, h["gnhvp_seconds"] * 1e3,
                              h["hvp_over_grad"], h["gnhvp_over_grad"]])
        parts.append("HVP / GNHVP cost relative to one gradient (MLP 784-256-256-10 tanh, "
                     "batch 1024, float32, median):\n\n" + table(
                         ["side", "grad ms", "HVP ms", "GNHVP ms", "HVP/grad", "GNHVP/grad"],
                         hrows))
    return "\n\n".join(parts)


NOTES = """\
How to read it: `peer/influx` is the ratio of median wall times (>1: influx faster). Issue
7's target is >= 5 at equal or better accuracy: Pearson r within 1e-3 of the peer's and
relative error at most 1.1x the peer's (errors below 1e-3 count as equal). `> x`: the peer
hit its time limit, so the ratio is a lower bound (a capped peer's accuracy is unknown,
which the verdict says). `r / rel.err`: Pearson correlation and relative Frobenius error
of the (n_test x n_train) score matrix against the float64 **Hessian** reference (the
EK-FAC/K-FAC of both sides approximate the GNH/Fisher; their accuracy against the GNH
reference is in `results/peers.json`). Products: curvature-vector products in
units of one product over the whole training set (a minibatch of b examples counts b/N),
summed over the right-hand sides; dense direct solves count P. Peak MB: largest RSS
increase over the RSS before the call (sampled every 2 ms), first call included. Timed
runs are float32 on both sides. Cheap methods run in 3 alternating rounds (influx, then
each peer) of 2 timed calls each, a method whose call takes > 10 s in one round of one
call; the median of the timed calls is reported, warm-up (first call: compilation for
influx) separately. Single calls are noisy on this 2-vCPU machine: influx's direct solve on
digits takes either 0.56 s (both cores busy) or 1.0-1.1 s (its single-core speed: 0.95-1.0
s every call when pinned to one core with `taskset`), about half of the calls each, also
when it runs alone; the median of more calls is stabler, and `all_seconds` in the JSON
keeps every sample.

Settings (`benchmarks/peers/problem.py`, identical on both sides): both solve
`(H + (l2 + damping) I) x = g` with the mean-loss Hessian; peers get
`regularization = l2 + damping` (their loss has no weight decay). Damping 1e-3 on digits,
1e-2 on MNIST (at 1e-3 the MNIST damped Hessian is indefinite: lowest eigenvalue
-0.0037 + 0.002). pyDVL and kronfluence return `g_test^T (H + lambda I)^-1 g_train`;
influx's convention divides that by N (the predicted change of test loss when the
training example is removed); every peer matrix is converted before comparison. CG:
`||r|| <= 1e-4 ||b||`, at most 1000 steps, on both sides (pyDVL through `atol` with
`rtol = 0`: pyDVL 0.10.0's own rule compares the residual with `rtol**2` times a norm over
the batch axis, below float32 round-off, so with `maxiter = 10 P` it would never stop);
`pydvl_cg` is pyDVL's default one-right-hand-side-at-a-time CG, `pydvl_cg_block` its block
CG. LiSSA: depth 1000, batch 128 on both sides; influx estimates its scale by power
iteration, `pydvl_lissa` uses pyDVL's default `scale = 10`, `pydvl_lissa_scaled`
`1.5 lambda_max` from the reference (an advantage the peer would not have). Arnoldi: rank
32 and Krylov dimension 65 (scipy `eigsh`'s default `ncv`, passed to pyDVL explicitly) on
both sides; both use the projection-only estimator `U diag(1/(lambda_i + lambda)) U^T g`
(`influx.solvers.arnoldi(complement=False)`); influx runs one Lanczos pass of 65 products,
pyDVL's ARPACK restarts until its Ritz values converge to 1e-6 (more products, same
subspace quality or better). EK-FAC / K-FAC: kronfluence's default analyzer workflow (true
Fisher with sampled labels, float32 factors) and pyDVL's `EkfacInfluence` (one pseudo-gradient
per example, see 4 below)
with `damping_factor` / `regularization = l2 + damping`; influx's `solvers.ekfac()` /
`solvers.kfac()` (exact output-Hessian factors of the Gauss-Newton matrix: the expectation
of the sampled Fisher, without its noise; `residual=False`). Skipped or capped
by default (`--full` lifts it): pyDVL's dense direct on MNIST (P = 12,730 Hessian columns
by `torch.func`), influx's dense direct on MNIST, pyDVL's scaled LiSSA on MNIST; pyDVL's
one-at-a-time CG and LiSSA are capped at 30 s per call (lower bounds).

Where the gap comes from:

1. Compilation and per-call overhead. influx traces the whole computation (curvature
   product, solver loop as `lax.while_loop`/`scan`, scoring) once and XLA fuses it: the
   cost is paid once (the warm-up column) and a warm call runs no Python per product. The
   peers re-enter Python for every product: pyDVL's CG and LiSSA loops are Python loops
   over `torch.func` calls (LiSSA: 1000 steps, each a separate minibatch HVP with its
   dispatch overhead), its Arnoldi drives ARPACK through a scipy `LinearOperator` with a
   torch/numpy round-trip per product; kronfluence fits covariance, eigendecomposition and
   eigenvalue-correction passes with module hooks and writes factors and scores to disk.
   This overhead dominates on these small models, where one product is milliseconds.
2. Batching of right-hand sides. influx solves all 16 test gradients together with
   batched products (`vmap` over right-hand sides, block CG): one pass over the data per
   step serves every right-hand side. pyDVL's default CG solves them one after another
   (16x the data passes); its block CG batches them (the `pydvl_cg_block` row).
3. JVP scoring. influx scores the training set with one JVP of the per-example losses
   along each solved vector (`n_test` forward-mode passes over the data, no per-example
   gradients are stored); pyDVL forms per-example gradients of the whole training set
   (an N x P matrix, hence its peak memory) and multiplies, kronfluence computes
   per-example gradients with hooks, layer by layer.
4. EK-FAC / K-FAC: influx's factor passes are one compiled `vmap` over examples per data
   chunk (layer inputs and output gradients captured by tracing `apply_fn`, covariances
   as one matrix product per chunk), and scoring with the factored inverse is one batched
   apply per test vector followed by JVP scoring; kronfluence runs its passes through
   PyTorch module hooks with per-batch Python and writes factors and scores to disk.
   The three EK-FACs do not approximate quite the same matrix: influx factors the GNH
   exactly (all columns of the output-Hessian square root `L`, `S = E[sum_c g_c g_c^T]`),
   kronfluence samples one label per example (the same `S` in expectation, plus noise),
   and pyDVL 0.10 uses one pseudo-gradient per example, the *sum* of the columns of `L`
   (`empirical_cross_entropy_loss_fn`: `sum_c sqrt(p_c) log p_c`), i.e.
   `S = E[L 1 1^T L^T]`, which is not the Fisher. On a confidently classified example
   (`p_y = 1 - e`, the rest spread over 9 classes) that pseudo-gradient's squared norm is
   about `10 e` against the Fisher's trace `2 e`, so pyDVL's curvature is larger and its
   scores smaller. All three EK-FACs overestimate the score magnitudes here (score-matrix
   norm over the GNH reference's, from the cached runs: digits influx 3.9, kronfluence 5.4,
   pyDVL 2.4; MNIST 1.34 / 1.41 / 1.05), and pyDVL's inflated curvature happens to offset
   part of it: its relative error is lower against both references while the
   correlations are within 0.01 of influx's. influx keeps the Fisher (the matrix the
   method is defined with, and kronfluence's), so this family misses the accuracy rule
   against pyDVL although it is 29-118x faster.
5. Where influx is not 5x faster the table says so. Direct (digits, 4.2x): both sides build
   the dense 2410 x 2410 Hessian from P forward-over-reverse columns over 1,437 examples,
   about 42 GFLOP (a generic AD Hessian cannot skip the `x dW` products of the one-hot
   tangents). influx's takes 0.42-0.45 s (~95 GFLOP/s on these 2 cores, whose peak for one
   large float32 product is ~210), the Cholesky 0.05 s, test gradients, triangular solves
   and JVP scoring the rest; 5x needs the whole call under 0.5 s, i.e. the Hessian near
   the machine's peak. LiSSA on MNIST (2.9x): the same 1000 minibatch steps on both sides;
   each influx step is one gather and one batched HVP for all 16 right-hand sides whose
   two (128 x 784) x (784 x 256) products take 0.82 ms in a standalone compiled call
   (including its dispatch), so the loop needs about 0.8 s, plus 0.25 s for the automatic
   scale (Lanczos on the full operator and 4 minibatches; pyDVL's fixed default scale costs
   nothing): 5x (0.9 s) is out of reach on this machine. On digits (6x) the step is small
   enough that overhead still counts and influx's compiled loop wins. CG: both sides run
   block CG (one Krylov space shared by the 16 right-hand sides; influx's
   `cg(block=True)`, orthonormal search directions, dependent ones dropped); influx's
   product is 3-5x cheaper per vector. Independent CGs (`cg()`) need about twice the
   products here (digits: 62 steps for the slowest of 16 against 30 block steps).
6. XLA compile options: on the CPU influx compiles its solver, curvature and scoring
   programs with XLA's own dot emitter instead of YNNPACK fusions (`influx._xla`), 1.07-1.3x
   faster for direct, CG and LiSSA (section "XLA compile options"); the peers run with
   PyTorch's defaults and 2 threads.
"""


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="digits only, one round, known-slow peers skipped (< 3 min)")
    ap.add_argument("--problems", default=None, help="comma list (default digits,mnist)")
    ap.add_argument("--families", default=None, help="comma list of solver families")
    ap.add_argument("--skip", default="", help="comma list of peer methods to skip")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed repeats per round (default 2)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="alternation rounds (default 3; 1 with --quick); a method whose call "
                         f"takes > {EXPENSIVE_S:g} s runs in the first round only")
    ap.add_argument("--full", action="store_true",
                    help="also run the skipped/capped peers (dense P x P on MNIST, pyDVL's "
                         "LiSSA on MNIST) without the short caps")
    ap.add_argument("--peer-timeout", type=float, default=None,
                    help="seconds per peer call (default: per problem, PEER_TIMEOUT)")
    ap.add_argument("--time-budget", type=float, default=EXPENSIVE_S,
                    help="stop timed repeats of one method once they used this many seconds")
    ap.add_argument("--reference-timeout", type=float, default=900.0)
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run (default 570, 170 with --quick): later "
                         "rounds are dropped and remaining families skipped when it is spent, "
                         "peer timeouts shrink to what is left")
    ap.add_argument("--hvp-repeats", type=int, default=20)
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the float64 dense reference (no accuracy columns)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/influx-peers"))
    ap.add_argument("--out", type=Path, default=RESULTS / "peers.json")
    ap.add_argument("--readme", type=Path, default=ROOT / "benchmarks" / "README.md")
    ap.add_argument("--merge", nargs="+", type=Path, default=None,
                    help="no runs: merge the problems of earlier result files into --out "
                         "and the README section")
    ap.add_argument("--note", default=None, help="a paragraph for the README section")
    args = ap.parse_args(argv)
    if args.merge:
        return write_merged(args)
    probs = args.problems.split(",") if args.problems else (
        ["digits"] if args.quick else ["digits", "mnist"])
    args.families = args.families.split(",") if args.families else None
    args.skip = [s for s in args.skip.split(",") if s]
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.budget = args.budget or (170.0 if args.quick else 570.0)
    args.t_start = time.perf_counter()
    if args.quick:
        args.hvp_repeats = min(args.hvp_repeats, 5)
    if not peer_python().exists():
        raise SystemExit(f"peer venv not found at {peer_python()}: run "
                         "benchmarks/peers_setup.sh (or set PEER_VENV)")
    results = {"benchmark": "peers", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "command": "python -m benchmarks.compare_peers " + " ".join(
                   argv if argv is not None else sys.argv[1:]),
               "machine": machine(), "loadavg_start": os.getloadavg(), "quick": args.quick,
               "repeats": args.repeats, "rounds": args.rounds, "problems": []}
    hvp = {}
    try:
        hvp["influx"] = hvp_ratio_jax(args.hvp_repeats)
    except Exception as e:  # noqa: BLE001
        hvp["influx"] = {"error": f"{type(e).__name__}: {e}"}
    t0 = time.perf_counter()
    for name in probs:
        print(f"== {name}", flush=True)
        try:
            results["problems"].append(run_problem(PROBLEMS[name], args, hvp))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            results["problems"].append({"problem": name, "error": f"{type(e).__name__}: {e}"})
    results["hvp_ratio"] = hvp
    results["seconds"] = time.perf_counter() - t0
    results["loadavg_end"] = os.getloadavg()
    for pr in results["problems"]:
        if pr.get("peer_versions"):
            results["peer_versions"] = pr["peer_versions"]
    write_report(results, args)
    return results


def merge_problems(problems: list[dict]) -> list[dict]:
    """Problems of several runs, one per name: a later run's families and entries replace
    the earlier ones of the same name, except entries that the later run skipped."""
    out: dict[str, dict] = {}
    for pr in problems:
        name = pr["problem"]
        if name not in out or "error" in out[name]:
            out[name] = json.loads(json.dumps(pr))
            continue
        if "error" in pr:
            continue
        fams = {f["family"]: f for f in out[name]["families"]}
        for fam in pr.get("families", []):
            tgt = fams.get(fam["family"])
            if tgt is None:
                out[name]["families"].append(json.loads(json.dumps(fam)))
                continue
            for k, e in fam["entries"].items():
                if not e.get("skipped") or k not in tgt["entries"]:
                    tgt["entries"][k] = e
    return list(out.values())


def write_merged(args) -> dict:
    parts = [json.loads(p.read_text()) for p in args.merge]
    results = dict(parts[0])
    results["problems"] = merge_problems([pr for part in parts for pr in part["problems"]])
    results["merged_from"] = [str(p) for p in args.merge]
    hv = [part for part in parts if (part.get("hvp_ratio") or {}).get("torch")]
    if hv:  # the HVP/grad measurement of the run that started on the least loaded machine
        best = min(hv, key=lambda part: (part.get("loadavg_start") or [float("inf")])[0])
        results["hvp_ratio"] = best["hvp_ratio"]
    results["seconds"] = sum(part.get("seconds", 0) for part in parts)
    results["quick"] = any(part.get("quick") for part in parts)
    write_report(results, args, command=(
        results.get("command") if len(parts) == 1 else "runs merged with --merge"))
    return results


def write_report(results: dict, args, command: str | None = None) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=float))
    md = markdown(results)
    print(md)
    m = results["machine"]
    cmd = (command or results.get("command")
           or "python -m benchmarks.compare_peers" + " --quick" * args.quick).strip()
    body = (f"Run {results['date']} on {m.get('cpu', '?')} ({m.get('cpu_count')} cores, "
            f"{m.get('memory_gib')} GiB), jax {m.get('jax')} / jaxlib {m.get('jaxlib')} on "
            f"{m.get('device')}; peers: {results.get('peer_versions')}. "
            f"`{cmd}`, "
            f"{results['seconds']:.0f} s; load average "
            f"{[round(x, 1) for x in results.get('loadavg_start') or []]} at the "
            "start.\n\n" + (getattr(args, "note", None) or "") + "\n\n" + md + "\n\n" + NOTES)
    replace_section(args.readme, "## Peers", body)


if __name__ == "__main__":
    main()
