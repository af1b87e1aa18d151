"""The JAX half of the peer benchmark: train once, export, float64 dense reference.

Runs in influx's environment. Training uses plain jax + optax (full-batch Adam on the
objective ``mean CE + l2/2 ||theta||^2``); the weights are written to an .npz in the layout
of ``problem.py`` and loaded by the torch side.

Dense reference (float64): ``H = d^2/dtheta^2 mean_i CE_i`` built column block by column
block from Hessian-vector products (forward-over-reverse, ``vmap`` over basis vectors), the
GNH ``mean_i J_i^T (diag p_i - p_i p_i^T) J_i`` from per-example output Jacobians in chunks;
then ``S = (1/N) G_test (H + (l2 + damping) I)^{-1} G_train^T`` by Cholesky (eigh when not
positive definite, which is reported). Cost: P HVPs over the data plus an O(P^3) factorisation,
O(P^2) memory (1.3 GB at P = 12.7k; the float64 eigendecomposition of MNIST's 12.7k x 12.7k
Hessian took 43 min on 2 cores). Used for ``problem.reference == "dense"`` (digits).

CG reference (float64, ``problem.reference == "cg"``, MNIST): conjugate gradients on
``(M + lambda I) x = g_t`` for the ``n_test`` test gradients at once (``vmap`` of a
``lax.while_loop`` CG, exact float64 curvature-vector products), stopped at
``||r|| <= reference_cg_tol ||g_t||`` (1e-10); the true relative residual is recomputed and
reported. Requires ``M + lambda I`` positive definite: the extreme eigenvalues of ``M`` are
estimated by 120 steps of float64 Lanczos (full re-orthogonalisation) and a non-positive
``eig_min + lambda`` raises. Cost: ``n_test x`` (a few hundred) products, seconds to a
minute. Written independently of influx's solvers so the reference does not share their code.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from benchmarks.peers.problem import Problem, init_weights, load_data, test_indices


def _jax():
    import jax

    return jax


def weights_to_params(weights: dict[str, np.ndarray], dtype=None):
    import jax.numpy as jnp

    n = len([k for k in weights if k.startswith("w")])
    return [
        {"b": jnp.asarray(weights[f"b{i}"], dtype), "w": jnp.asarray(weights[f"w{i}"], dtype)}
        for i in range(n)
    ]


def params_to_weights(params) -> dict[str, np.ndarray]:
    out = {}
    for i, layer in enumerate(params):
        out[f"w{i}"] = np.asarray(layer["w"], np.float32)
        out[f"b{i}"] = np.asarray(layer["b"], np.float32)
    return out


def apply_fn(params, x):
    """MLP logits: tanh hidden layers, linear output (``x @ w + b`` per layer)."""
    import jax.numpy as jnp

    h = x
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def ce_per_example(logits, y):
    import jax

    logp = jax.nn.log_softmax(logits)
    return -logp[jnp_arange(y.shape[0]), y]


def jnp_arange(n):
    import jax.numpy as jnp

    return jnp.arange(n)


def train(problem: Problem, data: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
    """Full-batch Adam on ``mean CE + l2/2 ||theta||^2`` (float32); returns weights + log."""
    import jax
    import jax.numpy as jnp
    import optax

    params = weights_to_params(init_weights(problem), jnp.float32)
    x, y = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
    opt = optax.adam(problem.learning_rate)

    def objective(p, x, y):
        sq = sum(jnp.sum(leaf**2) for leaf in jax.tree_util.tree_leaves(p))
        return jnp.mean(ce_per_example(apply_fn(p, x), y)) + 0.5 * problem.l2 * sq

    @jax.jit
    def run(p, x, y):  # data as arguments: closed-over arrays get constant-folded
        def step(carry, _):
            p, s = carry
            v, g = jax.value_and_grad(objective)(p, x, y)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), v

        (p, _), losses = jax.lax.scan(step, (p, opt.init(p)), None, length=problem.train_steps)
        return p, losses

    t0 = time.perf_counter()
    params, losses = run(params, x, y)
    losses = np.asarray(losses)
    grads = jax.grad(objective)(params, x, y)
    gnorm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(grads))))
    acc = float(jnp.mean(jnp.argmax(apply_fn(params, jnp.asarray(data["x_test"])), 1)
                         == jnp.asarray(data["y_test"])))
    log = {
        "train_seconds": time.perf_counter() - t0,
        "final_objective": float(losses[-1]),
        "final_grad_norm": gnorm,
        "test_accuracy": acc,
    }
    return params_to_weights(params), log


def problem_tag(problem: Problem) -> str:
    """Short hash of the problem definition: cached weights/references follow its changes."""
    import hashlib

    keys = ("dataset", "sizes", "l2", "damping", "n_test", "train_steps", "learning_rate", "seed")
    spec = repr([(k, getattr(problem, k)) for k in keys])
    return hashlib.sha256(spec.encode()).hexdigest()[:8]


def weights_path(workdir: Path, problem: Problem) -> Path:
    return workdir / f"{problem.name}_{problem_tag(problem)}_weights.npz"


def load_or_train(problem: Problem, workdir: Path) -> tuple[dict, dict, dict]:
    """Weights from ``weights_path(workdir, problem)`` or trained and written there."""
    data = load_data(problem)
    path = weights_path(workdir, problem)
    if path.exists():
        w = dict(np.load(path))
        log = {"cached": True}
    else:
        w, log = train(problem, data)
        workdir.mkdir(parents=True, exist_ok=True)
        np.savez(path, **w)
    return w, data, log


def _reference_inputs(problem: Problem, weights, data):
    """The float64 inputs both references share: ``(params, flat, unravel, P, x, y, N, xt,
    yt, lam)`` with the test points of ``problem`` and ``lam = l2 + damping``."""
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    params = weights_to_params(weights, jnp.float64)
    flat, unravel = ravel_pytree(params)
    P = flat.size
    x = jnp.asarray(data["x_train"], jnp.float64)
    y = jnp.asarray(data["y_train"])
    N = x.shape[0]
    ti = test_indices(problem, len(data["x_test"]))
    xt = jnp.asarray(data["x_test"][ti], jnp.float64)
    yt = jnp.asarray(data["y_test"][ti])
    lam = problem.regularization
    return params, flat, unravel, P, x, y, N, xt, yt, lam


def dense_reference(problem: Problem, weights, data, *, block: int = 512, chunk: int = 1000):
    """Float64 dense Hessian and GNH references and their score matrices.

    Returns dict with ``scores_hessian``, ``scores_gnh`` (n_test, n_train), eigenvalue
    diagnostics and timings. Must be called with ``jax_enable_x64`` on.
    """
    import jax

    assert jax.config.jax_enable_x64, "dense_reference needs jax_enable_x64"
    params, flat, unravel, P, x, y, N, xt, yt, lam = _reference_inputs(problem, weights, data)
    t0 = time.perf_counter()

    H = dense_curvature(params, x, y, kind="hessian", block=block)
    t_h = time.perf_counter() - t0
    t0 = time.perf_counter()
    G = dense_curvature(params, x, y, kind="gnh", block=block)
    t_g = time.perf_counter() - t0

    per_ex_grad = jax.jit(
        jax.vmap(
            jax.grad(lambda f, xi, yi: ce_per_example(apply_fn(unravel(f), xi[None]), yi[None])[0]),
            in_axes=(None, 0, 0),
        )
    )
    g_test = np.asarray(per_ex_grad(flat, xt, yt))  # (T, P)

    def solve(M):
        A = M + lam * np.eye(P)
        import scipy.linalg as sla

        info = {}
        try:
            c = sla.cho_factor(A, lower=True, check_finite=False)
            X = sla.cho_solve(c, g_test.T, check_finite=False)
            info["positive_definite"] = True
        except np.linalg.LinAlgError:
            w, V = np.linalg.eigh(A)
            X = V @ ((V.T @ g_test.T) / w[:, None])
            info["positive_definite"] = False
            info["min_eig_damped"] = float(w[0])
        return X, info

    out = {"n_params": int(P), "n_train": int(N), "lambda": lam}
    for name, M, t_build in (("hessian", H, t_h), ("gnh", G, t_g)):
        t0 = time.perf_counter()
        X, info = solve(M)
        S = np.zeros((len(xt), N))
        for s in range(0, N, chunk):
            gt = np.asarray(per_ex_grad(flat, x[s : s + chunk], y[s : s + chunk]))
            S[:, s : s + chunk] = (gt @ X).T / N
        out[f"scores_{name}"] = S
        if "min_eig_damped" in info:  # exact, from the eigh fallback
            info.update(eig_min=info["min_eig_damped"] - lam, eig_max=_extreme_eigs(M)["eig_max"])
        else:
            info.update(_extreme_eigs(M))
        info["build_seconds"] = t_build
        info["solve_seconds"] = time.perf_counter() - t0
        out[f"info_{name}"] = info
    return out


def _curvature_product(kind: str, unravel, n: int):
    """``prod(v, flat, x, y)``: mean-loss Hessian (``kind="hessian"``) or GNH times ``v``."""
    import jax
    import jax.numpy as jnp

    if kind == "hessian":

        def prod(v, f, xx, yy):
            def mean_loss(ff):
                return jnp.sum(ce_per_example(apply_fn(unravel(ff), xx), yy)) / n

            return jax.jvp(jax.grad(mean_loss), (f,), (v,))[1]
    elif kind == "gnh":

        def prod(v, f, xx, yy):
            def net(ff):
                return apply_fn(unravel(ff), xx)

            z, vjp_fn = jax.vjp(net, f)
            p = jax.nn.softmax(z)
            jv = jax.jvp(net, (f,), (v,))[1]
            hjv = (p * jv - p * jnp.sum(p * jv, -1, keepdims=True)) / n
            return vjp_fn(hjv)[0]
    else:
        raise ValueError(f"kind must be 'hessian' or 'gnh', got {kind!r}")
    return prod


def lanczos_extremes(mv, p: int, *, steps: int = 120, seed: int = 0) -> dict[str, float]:
    """Extreme eigenvalues of a symmetric operator from ``steps`` float64 Lanczos steps with
    full re-orthogonalisation (numpy; ``mv`` maps a (P,) float64 array to one)."""
    rng = np.random.default_rng(seed)
    steps = min(steps, p)
    Q = np.zeros((steps + 1, p))
    q = rng.standard_normal(p)
    Q[0] = q / np.linalg.norm(q)
    alpha, beta = np.zeros(steps), np.zeros(steps)
    m = steps
    for j in range(steps):
        w = np.array(mv(Q[j]), np.float64)  # a writable copy
        alpha[j] = Q[j] @ w
        for _ in range(2):
            w -= Q[: j + 1].T @ (Q[: j + 1] @ w)
        beta[j] = np.linalg.norm(w)
        if beta[j] < 1e-12:
            m = j + 1
            break
        Q[j + 1] = w / beta[j]
    T = np.diag(alpha[:m]) + np.diag(beta[: m - 1], 1) + np.diag(beta[: m - 1], -1)
    ev = np.linalg.eigvalsh(T)
    return {"eig_max": float(ev[-1]), "eig_min": float(ev[0]),
            "eig_method": f"float64 Lanczos, {m} steps"}


def cg_reference(problem: Problem, weights, data, *, max_steps: int = 5000, chunk: int = 1000):
    """Float64 Hessian and GNH score matrices by tightly converged batched CG (see the
    module docstring); the same return layout as :func:`dense_reference`."""
    import jax
    import jax.numpy as jnp

    assert jax.config.jax_enable_x64, "cg_reference needs jax_enable_x64"
    params, flat, unravel, P, x, y, N, xt, yt, lam = _reference_inputs(problem, weights, data)
    tol = problem.reference_cg_tol

    per_ex_grad = jax.jit(
        jax.vmap(
            jax.grad(lambda f, xi, yi: ce_per_example(apply_fn(unravel(f), xi[None]), yi[None])[0]),
            in_axes=(None, 0, 0),
        )
    )
    g_test = per_ex_grad(flat, xt, yt)  # (T, P)
    out = {"n_params": int(P), "n_train": int(N), "lambda": lam}
    for kind in ("hessian", "gnh"):
        t0 = time.perf_counter()
        prod = _curvature_product(kind, unravel, N)
        mv1 = jax.jit(prod)
        info = lanczos_extremes(lambda v, mv1=mv1: mv1(jnp.asarray(v), flat, x, y), P)
        if info["eig_min"] + lam <= 0:
            raise ValueError(f"{problem.name}: {kind} + lambda I is not positive definite "
                             f"(Lanczos eig_min {info['eig_min']:.3g}, lambda {lam}); CG "
                             "reference needs more damping")
        t_eig = time.perf_counter() - t0

        @jax.jit
        def solve(B, f, xx, yy, prod=prod):
            def A(v):
                return prod(v, f, xx, yy) + lam * v

            def one(b):
                bn = jnp.linalg.norm(b)

                def cond(c):
                    k, _, _, _, rs = c
                    return (jnp.sqrt(rs) > tol * bn) & (k < max_steps)

                def body(c):
                    k, xk, r, p, rs = c
                    Ap = A(p)
                    a = rs / (p @ Ap)
                    xk, r = xk + a * p, r - a * Ap
                    rs_new = r @ r
                    return k + 1, xk, r, r + (rs_new / rs) * p, rs_new

                k, xk, _, _, _ = jax.lax.while_loop(
                    cond, body, (0, jnp.zeros_like(b), b, b, b @ b))
                return xk, k, jnp.linalg.norm(A(xk) - b) / bn

            return jax.vmap(one)(B)

        t0 = time.perf_counter()
        X, steps, rel_res = solve(g_test, flat, x, y)
        X = np.asarray(X)
        S = np.zeros((len(xt), N))
        for s in range(0, N, chunk):
            gt = np.asarray(per_ex_grad(flat, x[s : s + chunk], y[s : s + chunk]))
            S[:, s : s + chunk] = (gt @ X.T).T / N
        out[f"scores_{kind}"] = S
        info.update(method=f"float64 CG, tol {tol:g}", positive_definite=True,
                    cg_steps_max=int(np.max(steps)), cg_steps_total=int(np.sum(steps)),
                    max_rel_residual=float(np.max(rel_res)), eig_seconds=t_eig,
                    solve_seconds=time.perf_counter() - t0)
        if not np.all(np.asarray(steps) < max_steps):
            raise RuntimeError(f"{problem.name}: float64 CG reference hit max_steps={max_steps}"
                               f" (max relative residual {info['max_rel_residual']:.2e})")
        out[f"info_{kind}"] = info
    return out


def dense_curvature(params, x, y, *, kind: str, block: int = 512) -> np.ndarray:
    """Dense float64 mean-loss Hessian or GNH of the MLP, exploiting the first layer.

    The first layer enters the loss only through its pre-activations ``a_i = x~_i W~``
    (``x~ = [1, x]``, ``W~ = [b0; w0]``, which is exactly ``ravel_pytree``'s order ``b0, w0``),
    so its block is ``(1/N) sum_i (x~_i x~_i^T) kron M_i`` with ``M_i = d^2 l_i / da^2`` (Hessian)
    or ``J_i^T (diag p_i - p_i p_i^T) J_i``, ``J_i = dz_i/da_i`` (GNH): ``h(h+1)/2`` weighted Gram
    matrices, ``O(N d^2 h^2 / 2)`` flops. Every other row/column (all later layers, and their
    cross terms with the first layer) comes from exact curvature-vector products with basis
    vectors (``P - P0`` of them). Equal to ``jax.hessian`` of the mean loss (tested on digits).
    """
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    flat, unravel = ravel_pytree(params)
    P = flat.size
    N, d = x.shape
    h = params[0]["b"].shape[0]
    P0 = (d + 1) * h

    # data and parameters are arguments, not closed-over constants: XLA would otherwise
    # constant-fold the (N, d) x (d, h) products at compile time, for minutes.
    prod = _curvature_product(kind, unravel, N)

    cols = jax.jit(jax.vmap(prod, in_axes=(0, None, None, None)))
    M = np.zeros((P, P))
    eye = np.eye(P)[P0:]
    for s in range(0, P - P0, block):
        M[P0 + s : P0 + s + block] = np.asarray(cols(jnp.asarray(eye[s : s + block]), flat, x, y))
    M[:P0, P0:] = M[P0:, :P0].T

    # first-layer block
    first, rest = params[0], params[1:]

    def tail(a):
        hdn = jnp.tanh(a)
        return apply_fn(rest, hdn[None])[0] if rest else hdn

    def m_hess(a, yi):
        return jax.hessian(lambda aa: ce_per_example(tail(aa)[None], yi[None])[0])(a)

    def m_gnh(a, yi):
        J = jax.jacfwd(tail)(a)
        pr = jax.nn.softmax(tail(a))
        A = jnp.diag(pr) - jnp.outer(pr, pr)
        return J.T @ A @ J

    a = np.asarray(x) @ np.asarray(first["w"]) + np.asarray(first["b"])
    Ms = np.asarray(jax.jit(jax.vmap(m_hess if kind == "hessian" else m_gnh))(a, y)) / N
    xt = np.concatenate([np.ones((N, 1)), np.asarray(x)], axis=1)  # (N, d+1)
    B = M[:P0, :P0].reshape(d + 1, h, d + 1, h)  # view: B[q, r, q', s]
    for r in range(h):
        Y = xt[:, :, None] * Ms[:, None, r, r:]  # (N, d+1, h-r)
        Gm = (xt.T @ Y.reshape(N, -1)).reshape(d + 1, d + 1, h - r)
        for j, s_ in enumerate(range(r, h)):
            B[:, r, :, s_] = Gm[:, :, j]
            if s_ != r:
                B[:, s_, :, r] = Gm[:, :, j].T
    return 0.5 * (M + M.T)


def _extreme_eigs(M: np.ndarray) -> dict[str, float]:
    """Largest and smallest eigenvalue of a symmetric matrix (full eigvalsh if small)."""
    P = M.shape[0]
    if P <= 4000:
        w = np.linalg.eigvalsh(M)
        return {"eig_max": float(w[-1]), "eig_min": float(w[0])}
    rng = np.random.default_rng(0)

    def power(A_mv, iters=300):
        v = rng.standard_normal(P)
        v /= np.linalg.norm(v)
        lam = 0.0
        for _ in range(iters):
            w = A_mv(v)
            lam = float(v @ w)
            v = w / np.linalg.norm(w)
        return lam

    lmax = power(lambda v: M @ v)
    shifted = power(lambda v: lmax * v - M @ v, iters=600)
    return {"eig_max": lmax, "eig_min": lmax - shifted, "eig_min_method": "power iteration"}


def reference_path(workdir: Path, problem: Problem) -> Path:
    return workdir / f"{problem.name}_{problem_tag(problem)}_reference.npz"


def main() -> None:
    """``python -m benchmarks.peers.jax_side --problem NAME --workdir DIR``: train (if not
    cached) and write the float64 dense reference to ``DIR/NAME_reference.npz``."""
    import argparse
    import json

    import jax

    jax.config.update("jax_enable_x64", True)
    from benchmarks.peers.problem import PROBLEMS

    ap = argparse.ArgumentParser()
    ap.add_argument("--problem", required=True)
    ap.add_argument("--workdir", required=True, type=Path)
    args = ap.parse_args()
    problem = PROBLEMS[args.problem]
    weights, data, _ = load_or_train(problem, args.workdir)
    t0 = time.perf_counter()
    if problem.reference == "cg":
        ref = cg_reference(problem, weights, data)
    else:
        ref = dense_reference(problem, weights, data)
        for k in ("info_hessian", "info_gnh"):
            ref[k]["method"] = "float64 dense Cholesky" + (
                "" if ref[k].get("positive_definite") else " (eigh: not PD)")
    info = {k: v for k, v in ref.items() if not k.startswith("scores")}
    info["seconds"] = time.perf_counter() - t0
    np.savez(
        reference_path(args.workdir, problem),
        scores_hessian=ref["scores_hessian"],
        scores_gnh=ref["scores_gnh"],
        info=json.dumps(info),
    )
    print(json.dumps(info))


if __name__ == "__main__":
    main()
