"""Which training sequences taught a small transformer a fact? EK-FAC influence vs grad-dot and TracIn.

    python examples/transformer_facts.py            # ~2-5 minutes on 2 CPU cores
    python examples/transformer_facts.py --quick    # smoke test, well under a minute

1. Generated text: every one of ``--facts`` synthetic facts ("the code of NAME is D D .",
   a random two-digit code per name) is stated by ``--mentions`` training sequences in
   different phrasings ("NAME has code D D .", "code for NAME : D D ."); as many filler
   sequences mention the names without their codes ("NAME likes the river .") or are
   common sentences ("the cat saw a red house ."). Sequences are padded to ``T`` tokens;
   padding labels are ``-100``.
2. A decoder-only transformer (token and position embeddings, ``--blocks`` blocks of causal
   ``flax.nnx.MultiHeadAttention``, LayerNorm and an MLP, per-token logits) is trained in a
   user-written optax loop on the objective influx assumes: mean over sequences of the
   summed next-token cross-entropy (``influx.losses.token_cross_entropy``) + ``l2/2 ||theta||^2``.
3. For every fact a query "the code of NAME is" with the answer span "D D" (the prompt's
   labels are ``-100``): the measurement is the summed token loss over the answer span
   (``influx.measurements.sequence_loss()``). Every training sequence is scored by
   EK-FAC influence (``influx.solvers.ekfac``: Kronecker factors for the embeddings, the
   attention projections and the MLPs, the sampled Fisher for the T x V token outputs),
   by grad-dot (``influx.grad_dot``) and by TracIn over training checkpoints
   (``influx.tracin``). recall@k: the share of the sequences that stated the fact among
   the ``k`` highest scores (the most helpful: removing them raises the answer's loss most),
   averaged over facts; chance is about ``k / N``.

Prints a table. Low recall is reported, never an error; errors fail the run. Measured on
2 CPU cores (shared with other jobs; float32, seed 0): full run, 240 sequences, 110k
parameters: recall@10 EK-FAC 0.45, TracIn 0.25, grad-dot 0.22 (chance 0.04), peak memory
1.4 GB; ``--quick`` (72 sequences, 29k parameters): 0.72, 0.33, 0.19 (chance 0.14).
EK-FAC's relative residuals against the damped Gauss-Newton matrix are large (tens to
hundreds at ``damping=1e-3``): its ranking is useful long before its solves are accurate.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import influx

PAD, BOS = 0, 1
WORDS = ["the", "code", "of", "is", ".", "has", "for", ":", "likes", "saw", "a", "river", "tree", "house",
         "cat", "dog", "red", "blue", "big", "small", "walks", "near", "and", "with"]
DIGITS = 10
TEMPLATES = (  # how a fact is stated: (words before NAME, words between NAME and the code)
    (["the", "code", "of"], ["is"]),
    ([], ["has", "code"]),
    (["code", "for"], [":"]),
)
FILLER_OBJECTS = ["river", "tree", "house", "cat", "dog"]
PHRASES = ["a big dog walks near the river .", "the cat saw a red house .", "a small tree and a blue house .",
           "the dog walks with the cat .", "a red cat saw the big tree .", "the river is near the house ."]


class Vocab:
    """Token ids: PAD, BOS, the words, the digits, then one token per name."""

    def __init__(self, n_names: int):
        self.words = {w: 2 + i for i, w in enumerate(WORDS)}
        self.digit0 = 2 + len(WORDS)
        self.name0 = self.digit0 + DIGITS
        self.size = self.name0 + n_names

    def ids(self, words):
        return [self.words[w] for w in words]


def make_corpus(n_facts: int, mentions: int, fillers_per_fact: int, seq_len: int, seed: int):
    """Training sequences ``(N, T)`` and next-token labels (``-100`` padding), which fact each
    sequence states (``-1``: filler), and the queries: inputs, labels (``-100`` but the answer)."""
    rng = np.random.default_rng(seed)
    voc = Vocab(n_facts)
    codes = rng.integers(0, DIGITS, size=(n_facts, 2))
    seqs, states = [], []
    for f in range(n_facts):
        name, code = voc.name0 + f, [voc.digit0 + int(d) for d in codes[f]]
        for m in range(mentions):
            pre, mid = TEMPLATES[m % len(TEMPLATES)]
            seqs.append(voc.ids(pre) + [name] + voc.ids(mid) + code + voc.ids(["."]))
            states.append(f)
        for _ in range(fillers_per_fact):
            if rng.random() < 0.5:  # mentions a name (maybe this one), never a code
                other = voc.name0 + int(rng.integers(n_facts))
                verb = str(rng.choice(["likes", "saw", "walks"]))
                words = [verb, "the", str(rng.choice(FILLER_OBJECTS)), "."]
                seqs.append([other] + voc.ids(words))
            else:  # one of a few fixed sentences (common text the model learns well)
                seqs.append(voc.ids(PHRASES[int(rng.integers(len(PHRASES)))].split()))
            states.append(-1)
    order = rng.permutation(len(seqs))
    seqs = [seqs[i] for i in order]
    states = np.asarray(states)[order]
    x, y = _pad([[BOS] + s for s in seqs], seq_len)
    # queries: "<bos> the code of NAME is" -> "D D"; only the answer tokens are measured
    qx, qy = [], []
    for f in range(n_facts):
        prompt = [BOS] + voc.ids(["the", "code", "of"]) + [voc.name0 + f] + voc.ids(["is"])
        answer = [voc.digit0 + int(d) for d in codes[f]]
        xi, yi = _pad([prompt + answer], seq_len)
        yi[0, :len(prompt) - 1] = -100  # labels y_t predict x_{t+1}: the prompt's are masked
        qx.append(xi[0])
        qy.append(yi[0])
    return voc, (x, y), states, (np.stack(qx), np.stack(qy))


def _pad(seqs, seq_len):
    """Inputs (PAD after the end) and next-token labels (-100 at and after the last token)."""
    x = np.full((len(seqs), seq_len), PAD, np.int32)
    y = np.full((len(seqs), seq_len), -100, np.int32)
    for i, s in enumerate(seqs):
        s = s[:seq_len + 1]
        x[i, :min(len(s), seq_len)] = s[:seq_len]
        y[i, :len(s) - 1] = s[1:]
    return x, y


class Block(nnx.Module):
    def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.att = nnx.MultiHeadAttention(num_heads=heads, in_features=d, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, h, mask):
        h = h + self.att(self.ln1(h), mask=mask)
        return h + self.down(jax.nn.gelu(self.up(self.ln2(h))))


class DecoderLM(nnx.Module):
    """Token + position embeddings, causal blocks, a final LayerNorm and per-token logits."""

    def __init__(self, vocab: int, seq_len: int, d: int, heads: int, blocks: int, rngs: nnx.Rngs):
        self.tok = nnx.Embed(vocab, d, rngs=rngs)
        self.pos = nnx.Embed(seq_len, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, heads, rngs) for _ in range(blocks)])
        self.ln = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, tokens):  # (B, T) int -> (B, T, V) logits
        h = self.tok(tokens) + self.pos(jnp.arange(tokens.shape[-1]))
        mask = nnx.make_causal_mask(tokens)
        for blk in self.blocks:
            h = blk(h, mask)
        return self.head(self.ln(h))


def train(apply_fn, params, data, *, l2, steps, lr, batch, checkpoints, seed=0):
    """Adam on mean_i token_cross_entropy_i + l2/2 ||theta||^2 (the objective influx assumes),
    minibatches, cosine decay; returns the final params, ``checkpoints`` evenly spaced
    snapshots with the learning rate in use at each (for TracIn) and the final objective."""
    sched = optax.cosine_decay_schedule(lr, steps, alpha=0.02)
    opt = optax.adam(sched)
    x, y = data

    def objective(p, xb, yb):
        ce = influx.losses.token_cross_entropy(apply_fn(p, xb), yb).mean()
        return ce + 0.5 * l2 * sum(jnp.vdot(a, a) for a in jax.tree_util.tree_leaves(p))

    @jax.jit
    def step(p, s, xb, yb):
        val, g = jax.value_and_grad(objective)(p, xb, yb)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, val

    rng = np.random.default_rng(seed)
    state = opt.init(params)
    every = max(1, steps // checkpoints)
    ckpts, lrs = [], []
    for i in range(steps):
        idx = rng.choice(len(x), min(batch, len(x)), replace=False)
        params, state, _ = step(params, state, x[idx], y[idx])
        if (i + 1) % every == 0 and len(ckpts) < checkpoints:
            ckpts.append(params)
            lrs.append(float(sched(i)))
    return params, ckpts, lrs, float(objective(params, x, y))


def recall_at_k(scores, states, k):
    """Mean over queries (fact f = row) of |top-k by score ∩ {m : states[m] == f}| / |{...}|."""
    s = np.asarray(scores, dtype=float)
    if not np.all(np.isfinite(s)):
        raise RuntimeError(f"non-finite scores ({np.sum(~np.isfinite(s))} of {s.size})")
    top = np.argsort(-s, axis=1)[:, :k]
    rec = [np.mean(states[top[f]] == f) * k / max(1, np.sum(states == f)) for f in range(s.shape[0])]
    return float(np.mean(rec))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small corpus and model (a smoke test)")
    ap.add_argument("--facts", type=int, default=None, help="synthetic facts (default 40; quick: 12)")
    ap.add_argument("--mentions", type=int, default=3, help="training sequences stating each fact")
    ap.add_argument("--fillers", type=int, default=3, help="filler sequences per fact")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--width", type=int, default=None, help="model width (default 64; quick: 32)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 1500; quick: 400)")
    ap.add_argument("--l2", type=float, default=1e-4)
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--samples", type=int, default=4, help="sampled labels per sequence for EK-FAC's Fisher")
    ap.add_argument("--k", type=int, default=10, help="recall@k")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    facts = args.facts or (12 if args.quick else 40)
    width = args.width or (32 if args.quick else 64)
    steps = args.steps or (400 if args.quick else 1500)
    seq_len = 10
    t0 = time.perf_counter()

    voc, train_data, states, (qx, qy) = make_corpus(facts, args.mentions, args.fillers, seq_len, args.seed)
    n = len(states)
    model = DecoderLM(voc.size, seq_len, width, 4, args.blocks, nnx.Rngs(args.seed))
    apply_fn, params = influx.flax.from_nnx(model)
    n_params = sum(a.size for a in jax.tree_util.tree_leaves(params))
    print(f"corpus: {n} training sequences ({facts} facts x {args.mentions} statements, "
          f"{n - facts * args.mentions} fillers), T = {seq_len}, vocabulary {voc.size}; "
          f"model: {args.blocks} blocks, width {width}, {n_params:,} parameters")

    x, y = jnp.asarray(train_data[0]), jnp.asarray(train_data[1])
    params, ckpts, lrs, final = train(apply_fn, params, (x, y), l2=args.l2, steps=steps, lr=3e-3,
                                      batch=64, checkpoints=5, seed=args.seed)
    qx, qy = jnp.asarray(qx), jnp.asarray(qy)
    logits = apply_fn(params, qx)
    answer = np.asarray(qy) >= 0
    correct = np.all(np.where(answer, np.asarray(jnp.argmax(logits, -1)) == np.asarray(qy), True), axis=1)
    print(f"trained {steps} steps: objective {final:.4f}; the model answers {correct.mean():.0%} of the "
          f"{facts} fact queries ({time.perf_counter() - t0:.1f}s)")

    obj = influx.Objective(apply_fn, influx.losses.token_cross_entropy, l2=args.l2)
    measure = influx.measurements.sequence_loss()  # summed token loss over the answer span
    cov = influx.solvers.ekfac.coverage(apply_fn, params, x[:1])
    rows = []

    t = time.perf_counter()
    # tol=inf: accept the Kronecker-factored approximation explicitly; the true relative residual
    # of every solve is still measured and reported
    solver = influx.solvers.ekfac(tol=math.inf, samples=args.samples, key=args.seed)
    s_ek, info = influx.influence(obj, params, (x, y), (qx, qy), damping=args.damping, solver=solver,
                                  measurement=measure, return_info=True)
    f = influx.measurements.bind(obj, measure)
    b_norm = jax.vmap(lambda e: jnp.linalg.norm(
        jax.flatten_util.ravel_pytree(jax.grad(f)(params, e))[0]))((qx, qy))
    rel = np.asarray(info.residual_norm) / np.asarray(b_norm)  # ||(C + lambda I) x - b|| / ||b||
    rows.append(("EK-FAC influence", s_ek, time.perf_counter() - t))
    t = time.perf_counter()
    s_gd = influx.grad_dot(obj, params, (x, y), (qx, qy), measurement=measure)
    rows.append(("grad-dot", s_gd, time.perf_counter() - t))
    t = time.perf_counter()
    s_tr = influx.tracin(obj, ckpts, (x, y), (qx, qy), lrs, measurement=measure)
    rows.append((f"TracIn ({len(ckpts)} checkpoints)", s_tr, time.perf_counter() - t))

    k = args.k
    chance = k / n  # expected recall@k of a random ranking
    print(f"\nEK-FAC: {cov:.0%} of the parameters in Kronecker blocks, {args.samples} sampled labels per "
          f"sequence; relative residual of the solves (true, against the damped GNH): median "
          f"{np.median(rel):.3g}")
    print(f"\n{'method':<26} {'recall@' + str(k):>10} {'recall@' + str(args.mentions):>10} {'time (s)':>9}")
    for name, s, dt in rows:
        print(f"{name:<26} {recall_at_k(s, states, k):>10.3f} "
              f"{recall_at_k(s, states, args.mentions):>10.3f} {dt:>9.1f}")
    print(f"{'chance':<26} {min(1.0, chance):>10.3f}")
    print(f"\ntotal {time.perf_counter() - t0:.1f}s")
    return {name: recall_at_k(s, states, k) for name, s, _ in rows}


if __name__ == "__main__":
    main()
