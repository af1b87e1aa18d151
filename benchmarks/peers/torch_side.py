"""The peer half of the benchmark: pyDVL and kronfluence on the shared problem.

Run with the PEER venv's python (``benchmarks/peers_setup.sh``), never imported by influx.
It is a small JSON-lines server so that ``compare_peers.py`` can alternate influx and peer
runs in one session without paying torch's import for every run::

    python benchmarks/peers/torch_side.py --problem digits --weights W.npz --workdir DIR

stdin, one JSON object per line::

    {"cmd": "check"}                      -> logits and per-example losses written as .npy
    {"cmd": "run", "method": "pydvl_cg", "repeats": 3, "options": {...}}
    {"cmd": "hvp_ratio", "repeats": 20}   -> torch.func grad / HVP / GNHVP timings
    {"cmd": "quit"}

stdout: one JSON object per command (everything else the libraries print goes to stderr).

Measurements, per method:
- ``warmup_seconds``: first call (fit + scores), then ``repeats`` more calls whose median is
  ``seconds``; ``fit_seconds`` / ``score_seconds`` split the median call where the library
  separates the stages.
- ``products``: curvature-vector products in units of one product over the whole training
  set (a minibatch product of b examples counts b/N), counted by wrapping pyDVL's
  ``_ModelBasedBatchOperation.apply``/``apply_to_dict``; ``P`` for the dense direct solve.
  kronfluence exposes none (its cost is data passes: covariance, eigendecomposition,
  eigenvalue correction, then per-example gradients), so it reports ``null``.
- ``peak_rss_mb``: the largest resident-set-size increase over the RSS before the call,
  sampled every 2 ms from /proc/self/statm by a thread (``malloc_trim(0)`` first so freed
  arenas of an earlier method are not reused silently). Process-level, so it counts torch's
  allocator caches and temporaries alike.
- scores: ``(n_test, n_train)`` in the influx convention (``to_influx_scale``) as .npy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.peers.measure import PeakRSS  # noqa: E402
from benchmarks.peers.problem import PROBLEMS, load_data, test_indices, to_influx_scale  # noqa: E402


class ProductCounter:
    """Counts pyDVL curvature products (vectors x examples) by wrapping its batch ops."""

    def __init__(self):
        self.vector_examples = 0
        self.calls = 0

    def install(self):
        from pydvl.influence.torch import batch_operation as bo

        cls = bo._ModelBasedBatchOperation
        if getattr(cls, "_influx_counted", False):
            return self
        orig_apply, orig_dict = cls.apply, cls.apply_to_dict
        counter = self

        def apply(self, batch, tensor):
            n_vec = tensor.shape[0] if tensor.ndim == 2 else 1
            counter.vector_examples += n_vec * batch.x.shape[0]
            counter.calls += 1
            return orig_apply(self, batch, tensor)

        def apply_to_dict(self, batch, mat):
            first = next(iter(mat.values()))
            shape0 = self.input_dict_structure[next(iter(mat))]
            n_vec = first.shape[0] if first.ndim > len(shape0) else 1
            counter.vector_examples += n_vec * batch.x.shape[0]
            counter.calls += 1
            return orig_dict(self, batch, mat)

        cls.apply, cls.apply_to_dict, cls._influx_counted = apply, apply_to_dict, True
        return self

    def reset(self):
        self.vector_examples = 0
        self.calls = 0


class Side:
    """Model, data and the peer methods for one problem."""

    def __init__(self, problem_name: str, weights_path: Path, workdir: Path):
        import torch

        torch.manual_seed(0)
        self.torch = torch
        self.problem = PROBLEMS[problem_name]
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        w = dict(np.load(weights_path))
        data = load_data(self.problem)
        ti = test_indices(self.problem, len(data["x_test"]))
        self.x_train = torch.from_numpy(data["x_train"])
        self.y_train = torch.from_numpy(data["y_train"].astype(np.int64))
        self.x_test = torch.from_numpy(data["x_test"][ti])
        self.y_test = torch.from_numpy(data["y_test"][ti].astype(np.int64))
        self.N = len(self.x_train)
        self.model = self._build_model(w)
        self.counter = ProductCounter()

    def _build_model(self, w):
        torch, nn = self.torch, self.torch.nn
        n = len([k for k in w if k.startswith("w")])
        layers = []
        for i in range(n):
            lin = nn.Linear(*w[f"w{i}"].shape)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(w[f"w{i}"].T.copy()))
                lin.bias.copy_(torch.from_numpy(w[f"b{i}"]))
            layers.append(lin)
            if i < n - 1:
                layers.append(nn.Tanh())
        return nn.Sequential(*layers).eval()

    # ----------------------------------------------------------------- checks
    def check(self) -> dict:
        torch = self.torch
        with torch.no_grad():
            out = {}
            for split, x, y in (
                ("train", self.x_train, self.y_train),
                ("test", self.x_test, self.y_test),
            ):
                logits = self.model(x)
                loss = torch.nn.functional.cross_entropy(logits, y, reduction="none")
                np.save(self.workdir / f"torch_{split}_logits.npy", logits.numpy())
                np.save(self.workdir / f"torch_{split}_losses.npy", loss.numpy())
                out[f"{split}_logits"] = str(self.workdir / f"torch_{split}_logits.npy")
                out[f"{split}_losses"] = str(self.workdir / f"torch_{split}_losses.npy")
        return out

    # ---------------------------------------------------------------- methods
    def _loader(self, batch_size: int):
        from torch.utils.data import DataLoader, TensorDataset

        return DataLoader(TensorDataset(self.x_train, self.y_train), batch_size=batch_size)

    def _operator_batch(self) -> int:
        # pyDVL's HessianOperator averages chunk means with equal weight, so the batch size
        # must divide N for the operator to be the exact mean Hessian.
        return 1000 if self.N % 1000 == 0 else self.N

    def min_test_grad_norm(self) -> float:
        """Smallest gradient norm of the per-example test losses (float32)."""
        torch = self.torch
        norms = []
        for i in range(len(self.x_test)):
            self.model.zero_grad()
            out = self.model(self.x_test[i : i + 1])
            torch.nn.functional.cross_entropy(out, self.y_test[i : i + 1]).backward()
            norms.append(
                float(torch.sqrt(sum((q.grad**2).sum() for q in self.model.parameters())))
            )
        self.model.zero_grad()
        return min(norms)

    def _pydvl(self, method: str, options: dict):
        import torch.nn.functional as F
        from pydvl.influence.torch import (
            ArnoldiInfluence,
            CgInfluence,
            DirectInfluence,
            EkfacInfluence,
            LissaInfluence,
        )

        p, lam = self.problem, self.problem.regularization
        loss = F.cross_entropy
        if method == "pydvl_direct":
            model = DirectInfluence(self.model, loss, regularization=lam)
        elif method in ("pydvl_cg", "pydvl_cg_block"):
            # pyDVL 0.10.0 stops CG when ||r|| < max(rtol**2 * y_norm, atol**2), with y_norm
            # taken over the batch axis in the one-at-a-time variant; the same relative
            # tolerance as influx (||r|| <= cg_tol ||b|| for every test gradient b) is
            # expressed through atol, with rtol = 0, and the same step cap.
            atol = float(np.sqrt(p.cg_tol * self.min_test_grad_norm()))
            model = CgInfluence(
                self.model,
                loss,
                regularization=lam,
                rtol=0.0,
                atol=atol,
                maxiter=p.cg_max_steps,
                solve_simultaneously=method == "pydvl_cg_block",
            )
        elif method in ("pydvl_lissa", "pydvl_lissa_scaled"):
            kw = {"scale": float(options["scale"])} if method == "pydvl_lissa_scaled" else {}
            model = LissaInfluence(
                self.model, loss, regularization=lam, maxiter=p.lissa_depth, **kw
            )
        elif method == "pydvl_arnoldi":
            # krylov_dimension: scipy eigsh's default ncv, passed explicitly so that both
            # sides use the same Krylov dimension (problem.arnoldi_krylov)
            model = ArnoldiInfluence(self.model, loss, regularization=lam, rank=p.arnoldi_rank,
                                     krylov_dimension=p.arnoldi_krylov)
        elif method == "pydvl_ekfac":
            model = EkfacInfluence(self.model, update_diagonal=True, hessian_regularization=lam)
        else:
            raise ValueError(method)
        batch = p.lissa_batch_size if "lissa" in method else self._operator_batch()
        loader = self._loader(batch)
        t0 = time.perf_counter()
        model = model.fit(loader)
        t1 = time.perf_counter()
        scores = model.influences(self.x_test, self.y_test, self.x_train, self.y_train)
        t2 = time.perf_counter()
        return scores.detach().numpy(), t1 - t0, t2 - t1

    def _kronfluence(self, method: str, options: dict):
        import logging

        import torch
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task
        from torch.utils.data import TensorDataset

        class ClassificationTask(Task):
            def compute_train_loss(self, batch, model, sample=False):
                x, y = batch
                logits = model(x)
                if sample:
                    with torch.no_grad():
                        probs = torch.softmax(logits.detach(), -1)
                        y = torch.multinomial(probs, num_samples=1).flatten()
                return torch.nn.functional.cross_entropy(logits, y, reduction="sum")

            def compute_measurement(self, batch, model):
                x, y = batch
                return torch.nn.functional.cross_entropy(model(x), y, reduction="sum")

        strategy = method.split("_", 1)[1]  # "ekfac" | "kfac"
        import copy

        model = prepare_model(copy.deepcopy(self.model), ClassificationTask())
        out = self.workdir / "kronfluence"
        analyzer = Analyzer(
            analysis_name=f"{self.problem.name}_{strategy}",
            model=model,
            task=ClassificationTask(),
            cpu=True,
            disable_tqdm=True,
            output_dir=str(out),
            log_level=logging.WARNING,
        )
        train_ds = TensorDataset(self.x_train, self.y_train)
        test_ds = TensorDataset(self.x_test, self.y_test)
        bs = self.problem.kfac_batch_size
        t0 = time.perf_counter()
        analyzer.fit_all_factors(
            factors_name=strategy,
            dataset=train_ds,
            per_device_batch_size=bs,
            factor_args=FactorArguments(strategy=strategy),
            overwrite_output_dir=True,
        )
        t1 = time.perf_counter()
        analyzer.compute_pairwise_scores(
            scores_name=f"{strategy}_scores",
            factors_name=strategy,
            query_dataset=test_ds,
            train_dataset=train_ds,
            per_device_query_batch_size=len(test_ds),
            per_device_train_batch_size=bs,
            score_args=ScoreArguments(damping_factor=self.problem.regularization),
            overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores(f"{strategy}_scores")["all_modules"]
        t2 = time.perf_counter()
        return scores.detach().numpy(), t1 - t0, t2 - t1

    def run(self, method: str, repeats: int, options: dict, warmup: bool = True) -> dict:
        torch = self.torch
        runner = self._kronfluence if method.startswith("kronfluence") else self._pydvl
        if method.startswith("pydvl"):
            self.counter.install()
        times, fits, scs, products, peak = [], [], [], [], 0
        warm = None
        raw = None
        first = 0 if warmup else 1
        budget = float(options.get("time_budget", float("inf")))
        spent = 0.0
        for i in range(first, repeats + 1):
            if i >= 1 and spent > budget:
                # over budget: a slow method (torch compiles nothing, so its first call
                # is representative) is reported from the runs made so far
                break
            self.counter.reset()
            torch.manual_seed(0)
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                raw, tf, ts = runner(method, options)
                dt = time.perf_counter() - t0
            spent += dt
            peak = max(peak, mem.increase)
            products.append(self.counter.vector_examples / self.N)
            if i == 0:
                warm = dt
            else:
                times.append(dt)
                fits.append(tf)
                scs.append(ts)
        scores = to_influx_scale(raw, self.N)
        path = self.workdir / f"scores_{method}.npy"
        np.save(path, scores)
        prods = products[-1]
        if method == "pydvl_direct":
            prods = float(self.problem.n_params)  # dense Hessian: P columns
        elif method.startswith("kronfluence") or method == "pydvl_ekfac":
            prods = None
        return {
            "method": method,
            "warmup_seconds": warm,
            "seconds": statistics.median(times) if times else warm,
            "timed_runs": len(times),
            "all_seconds": times,
            "fit_seconds": statistics.median(fits) if fits else None,
            "score_seconds": statistics.median(scs) if scs else None,
            "products": prods,
            "peak_rss_mb": peak / 2**20,
            "scores_path": str(path),
            "finite": bool(np.all(np.isfinite(scores))),
            "options": options,
        }

    # ---------------------------------------------------------- HVP cost ratio
    def hvp_ratio(self, repeats: int) -> dict:
        """torch.func grad vs HVP vs GNHVP on MLP 784-256-256-10, batch 1024, float32."""
        torch = self.torch
        from torch.func import functional_call, grad, jvp, vjp

        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Linear(784, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256),
            torch.nn.Tanh(), torch.nn.Linear(256, 10),
        )
        params = {k: v.detach() for k, v in net.named_parameters()}
        x = torch.randn(1024, 784)
        y = torch.randint(0, 10, (1024,))
        v = {k: torch.randn_like(t) for k, t in params.items()}

        def loss(p):
            return torch.nn.functional.cross_entropy(functional_call(net, p, (x,)), y)

        def f_grad():
            return grad(loss)(params)

        def f_hvp():  # forward-over-reverse
            return jvp(grad(loss), (params,), (v,))[1]

        def f_gnhvp():  # J^T H_out J v
            def out(p):
                return functional_call(net, p, (x,))

            z, jv = jvp(out, (params,), (v,))
            prob = torch.softmax(z, -1)
            hjv = (prob * jv - prob * (prob * jv).sum(-1, keepdim=True)) / x.shape[0]
            _, pullback = vjp(out, params)
            return pullback(hjv)[0]

        res = {"model": "MLP 784-256-256-10 tanh", "batch": 1024, "dtype": "float32",
               "threads": torch.get_num_threads()}
        for name, fn in (("grad", f_grad), ("hvp", f_hvp), ("gnhvp", f_gnhvp)):
            fn()
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            res[f"{name}_seconds"] = statistics.median(ts)
        res["hvp_over_grad"] = res["hvp_seconds"] / res["grad_seconds"]
        res["gnhvp_over_grad"] = res["gnhvp_seconds"] / res["grad_seconds"]
        return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", required=True, choices=sorted(PROBLEMS))
    ap.add_argument("--weights", required=True, type=Path)
    ap.add_argument("--workdir", required=True, type=Path)
    args = ap.parse_args()
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # libraries' prints must not corrupt the protocol
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    side = Side(args.problem, args.weights, args.workdir)
    versions = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    for mod in ("pydvl", "kronfluence", "numpy"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod).__version__
    real_stdout.write(json.dumps({"ready": True, "versions": versions}) + "\n")
    real_stdout.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        try:
            cmd = msg["cmd"]
            if cmd == "quit":
                break
            if cmd == "check":
                reply = side.check()
            elif cmd == "run":
                reply = side.run(
                    msg["method"],
                    int(msg.get("repeats", 2)),
                    msg.get("options", {}),
                    warmup=bool(msg.get("warmup", True)),
                )
            elif cmd == "hvp_ratio":
                reply = side.hvp_ratio(int(msg.get("repeats", 20)))
            else:
                raise ValueError(f"unknown cmd {cmd!r}")
            reply["ok"] = True
        except Exception as e:  # report, keep serving
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}",
                     "traceback": traceback.format_exc()[-3000:]}
        real_stdout.write(json.dumps(reply) + "\n")
        real_stdout.flush()


if __name__ == "__main__":
    main()
