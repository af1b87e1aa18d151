"""kronfluence half of ``benchmarks/models.py``: EK-FAC influence on the same CNN / transformer.

Run with the peer venv's python (torch CPU, kronfluence 1.0.1), never imported by influx::

    python benchmarks/peers/models_torch.py --workdir DIR

``DIR`` holds ``spec.json``, ``weights.npz`` (the JAX weights, ``"/"``-joined keys) and
``data.npz`` written by ``benchmarks/models.py``. The torch model computes the same function
(checked: the largest logit difference is reported as ``max_logit_diff``, from the JAX logits
in ``logits_jax.npy`` when present). kronfluence: ``fit_all_factors(strategy="ekfac")`` then
``compute_pairwise_scores`` with ``damping_factor = l2 + damping``; train and measurement
losses are summed cross-entropies (its convention); the training loss samples labels from the
model when kronfluence asks (``sample=True``, its default Fisher). Scores are divided by ``N``
(influx convention) and saved as ``scores_kronfluence.npy``. Prints one JSON line: seconds
(fit + scores, one call: torch compiles nothing), fit/score split, ``peak_rss_mb``
(``ru_maxrss`` of this process), the share of parameters kronfluence tracks.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np


def build(spec, tf, w, torch):
    nn = torch.nn
    T = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731

    def linear(prefix):
        m = nn.Linear(*w[f"{prefix}/w"].shape)
        with torch.no_grad():
            m.weight.copy_(T(w[f"{prefix}/w"].T))
            m.bias.copy_(T(w[f"{prefix}/b"]))
        return m

    if spec["name"] == "cnn":
        def conv(prefix):
            k = w[f"{prefix}/w"]  # (kh, kw, in, out) -> (out, in, kh, kw)
            m = nn.Conv2d(k.shape[2], k.shape[3], k.shape[:2], padding=1)
            with torch.no_grad():
                m.weight.copy_(T(k.transpose(3, 2, 0, 1)))
                m.bias.copy_(T(w[f"{prefix}/b"]))
            return m

        class CNN(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv1, self.conv2 = conv("conv1"), conv("conv2")
                self.fc1, self.fc2 = linear("fc1"), linear("fc2")
                self.pool = nn.AvgPool2d(2)

            def forward(self, x):  # x: (B, 28, 28, 1) as in JAX
                h = x.permute(0, 3, 1, 2)
                h = self.pool(torch.relu(self.conv1(h)))
                h = self.pool(torch.relu(self.conv2(h)))
                h = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)  # JAX's NHWC flatten order
                return self.fc2(torch.relu(self.fc1(h)))
        return CNN()

    if spec["name"] == "transformer":
        d, H = tf["d"], tf["heads"]

        def ln(prefix):
            m = nn.LayerNorm(d, eps=1e-5)
            with torch.no_grad():
                m.weight.copy_(T(w[f"{prefix}/scale"]))
                m.bias.copy_(T(w[f"{prefix}/bias"]))
            return m

        class Block(nn.Module):
            def __init__(self, i):
                super().__init__()
                p = f"block{i}"
                self.ln1, self.ln2 = ln(f"{p}/ln1"), ln(f"{p}/ln2")
                self.q, self.k, self.v, self.o = (linear(f"{p}/{n}") for n in "qkvo")
                self.fc1, self.fc2 = linear(f"{p}/fc1"), linear(f"{p}/fc2")

            def forward(self, h):
                B, S, _ = h.shape
                a = self.ln1(h)
                q, k, v = (m(a).reshape(B, S, H, d // H) for m in (self.q, self.k, self.v))
                att = torch.softmax(torch.einsum("bthc,bshc->bhts", q, k) / np.sqrt(d // H), -1)
                o = torch.einsum("bhts,bshc->bthc", att, v).reshape(B, S, d)
                h = h + self.o(o)
                return h + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(h)), approximate="tanh"))

        class Transformer(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Embedding(tf["vocab"], d)
                with torch.no_grad():
                    self.emb.weight.copy_(T(w["emb"]))
                self.pos = nn.Parameter(T(w["pos"]).clone())
                self.blocks = nn.ModuleList([Block(i) for i in range(tf["blocks"])])
                self.lnf, self.head = ln("lnf"), linear("head")

            def forward(self, x):
                h = self.emb(x.long()) + self.pos
                for b in self.blocks:
                    h = b(h)
                return self.head(self.lnf(h).mean(1))
        return Transformer()
    raise ValueError(spec["name"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, type=Path)
    args = ap.parse_args()
    real_stdout, sys.stdout = sys.stdout, sys.stderr  # library prints must not corrupt the protocol
    warnings.filterwarnings("ignore")
    import torch
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    cfg = json.loads((args.workdir / "spec.json").read_text())
    w = dict(np.load(args.workdir / "weights.npz"))
    data = dict(np.load(args.workdir / "data.npz"))
    model = build(cfg, cfg["tf"], w, torch).eval()
    xtr, ytr = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"].astype(np.int64))
    xq, yq = torch.from_numpy(data["x_query"]), torch.from_numpy(data["y_query"].astype(np.int64))
    N = len(xtr)
    out = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    with torch.no_grad():
        lq = model(xq).numpy()
    jl = args.workdir / "logits_jax.npy"
    if jl.exists():
        out["max_logit_diff"] = float(np.max(np.abs(lq - np.load(jl))))

    class ClassificationTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return torch.nn.functional.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return torch.nn.functional.cross_entropy(model(x), y, reduction="sum")

    task = ClassificationTask()
    model = prepare_model(model, task)
    n_all = sum(p.numel() for p in model.parameters())
    tracked = sum(p.numel() for m in model.modules()
                  if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for p in m.parameters())
    out["tracked_share"] = tracked / n_all
    analyzer = Analyzer(analysis_name=cfg["name"], model=model, task=task, cpu=True, disable_tqdm=True,
                        output_dir=str(args.workdir / "kronfluence"), log_level=logging.WARNING)
    train_ds, query_ds = TensorDataset(xtr, ytr), TensorDataset(xq, yq)
    bs = 256
    t0 = time.perf_counter()
    analyzer.fit_all_factors(factors_name="ekfac", dataset=train_ds, per_device_batch_size=bs,
                             factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
    t1 = time.perf_counter()
    analyzer.compute_pairwise_scores(
        scores_name="ekfac_scores", factors_name="ekfac", query_dataset=query_ds, train_dataset=train_ds,
        per_device_query_batch_size=len(query_ds), per_device_train_batch_size=bs,
        score_args=ScoreArguments(damping_factor=cfg["l2"] + cfg["damping"]), overwrite_output_dir=True)
    scores = analyzer.load_pairwise_scores("ekfac_scores")["all_modules"].detach().numpy()
    t2 = time.perf_counter()
    np.save(args.workdir / "scores_kronfluence.npy", np.asarray(scores, np.float64) / N)
    out.update(seconds=t2 - t0, fit_seconds=t1 - t0, score_seconds=t2 - t1,
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               finite=bool(np.all(np.isfinite(scores))))
    real_stdout.write(json.dumps(out) + "\n")
    real_stdout.flush()


if __name__ == "__main__":
    main()
