"""One process of the 2-process scoring test (tests/test_multihost.py); not collected by pytest.

Usage: ``python tests/_multihost_child.py ROOT OUT PROCESS_ID PORT MODE``. Joins a 2-process
``jax.distributed`` run on 127.0.0.1:PORT (CPU, gloo collectives, 2 forced devices per
process via XLA_FLAGS set by the parent). MODE ``all`` runs every case below, writes the
results to OUT (``<case>_<pid>.npy`` and ``messages_<pid>.json``), then starts a run into
``OUT/killed`` whose stream blocks after 3 chunks (the parent kills both processes there);
MODE ``resume`` resumes that run in fresh processes (``resume_<pid>.npy``, ``messages_resume_<pid>.json``).
"""

import json
import sys
import time
from pathlib import Path

root, out, pid, port, mode = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
sys.path.insert(0, root)

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the default; stated for clarity
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=60)

import numpy as np  # noqa: E402

from influx import scoring, solvers  # noqa: E402
from influx.errors import InfluxError  # noqa: E402
from tests.conftest import make_problem  # noqa: E402

N_TRAIN, N_TEST, CHUNK = 45, 4, 10  # 10 examples per chunk, padded to 12 over 4 devices
obj, params, (x, y) = make_problem("tanh_mlp", n=N_TRAIN + N_TEST, seed=3)
TRAIN = (np.asarray(x[:N_TRAIN]), np.asarray(y[:N_TRAIN]))
TEST = (np.asarray(x[N_TRAIN:]), np.asarray(y[N_TRAIN:]))
OPTS = dict(damping=0.05, solver=solvers.direct(), chunk_size=CHUNK, progress=False)

assert jax.process_count() == 2 and len(jax.devices()) == 4, jax.devices()
messages = {}


def stream(crash_after=None, block_after=None):
    for c, k in enumerate(range(0, N_TRAIN, CHUNK)):
        if c == crash_after:
            raise RuntimeError("simulated crash")
        if c == block_after:
            time.sleep(3600)  # the parent kills this process here
        yield TRAIN[0][k:k + CHUNK], TRAIN[1][k:k + CHUNK]


KILLED = dict(OPTS, out_dir=out / "killed", top_k=3, curvature_data=TRAIN, num_train=N_TRAIN)
if mode == "resume":
    r = scoring.score(obj, params, stream(), TEST, **KILLED)
    np.save(out / f"resume_{pid}.npy", np.asarray(r.scores))
    messages = {"resumed_from": r.info["resumed_from"], "complete": r.manifest["complete"]}
    (out / f"messages_resume_{pid}.json").write_text(json.dumps(messages))
    jax.distributed.shutdown()
    sys.exit(0)


def expect_error(name, **kw):
    try:
        scoring.score(obj, params, kw.pop("train", TRAIN), kw.pop("test", TEST), **{**OPTS, **kw})
    except (ValueError, TypeError) as e:
        messages[name] = f"{type(e).__name__}: {e}"
    else:
        messages[name] = "no error"


# bad configurations: every process raises, none hangs
expect_error("disagree", damping=0.05 if pid == 0 else 0.06)
expect_error("bad_on_one", test=TEST if pid == 0 else (TEST[0], TEST[1] + 9))
expect_error("local_devices", devices=jax.local_devices())


class Records:
    """A random-access source (the tfds.data_source protocol) that counts its reads."""

    def __init__(self):
        self.read = set()

    def __len__(self):
        return N_TRAIN

    def __getitem__(self, i):
        self.read.add(int(i))
        return {"image": TRAIN[0][i], "label": TRAIN[1][i]}


# process 0's failures (a failed test-side solve, a foreign out_dir) raise the same class on both
def expect_influx_error(name, **kw):
    try:
        scoring.score(obj, params, TRAIN, TEST, **{**OPTS, **kw})
    except InfluxError as e:
        messages[name] = f"{type(e).__name__}: {e}"
    else:
        messages[name] = "no error"


expect_influx_error("solve_fails", solver=solvers.cg(tol=1e-12, max_steps=1))
if pid == 0:
    (out / "foreign").mkdir()
    (out / "foreign" / "scores.npy").write_bytes(b"a user's file")
expect_influx_error("foreign", out_dir=out / "foreign")


# a stream that raises on process 1 only: both raise (process 1 its own error)
try:
    scoring.score(obj, params, stream(crash_after=2 if pid == 1 else None), TEST, curvature_data=TRAIN,
                  num_train=N_TRAIN, **OPTS)
except (RuntimeError, ValueError) as e:
    messages["stream_one"] = f"{type(e).__name__}: {e}"


# arrays -> out_dir with top-k (process 0 writes, process 1 opens the finished files)
r = scoring.score(obj, params, TRAIN, TEST, out_dir=out / "full", top_k=3, **OPTS)
np.save(out / f"arrays_{pid}.npy", np.asarray(r.scores))
np.save(out / f"topk_{pid}.npy", np.stack([r.top_k.helpful_indices, r.top_k.harmful_indices]))
messages["arrays_info"] = {k: r.info[k] for k in ("process_index", "process_count", "n_train", "scored")}
messages["arrays_devices"] = len(r.info["devices"])

# a random-access source, per-example path, in memory: each process reads only its rows
src = Records()
r = scoring.score(obj, params, src, TEST, method="per_example", curvature_data=TRAIN, **OPTS)
np.save(out / f"random_access_{pid}.npy", np.asarray(r.scores))
messages["records_read"] = sorted(src.read)


# a stream that dies after 3 chunks (on both processes), then a resumed run
opts = dict(OPTS, out_dir=out / "crash", top_k=3, curvature_data=TRAIN, num_train=N_TRAIN)
try:
    scoring.score(obj, params, stream(crash_after=3), TEST, **opts)
except RuntimeError as e:
    messages["crash"] = str(e)
if pid == 0:
    messages["crash_manifest"] = json.loads((out / "crash" / "manifest.json").read_text())["done_chunks"]
r = scoring.score(obj, params, stream(), TEST, **opts)
messages["resumed_from"] = r.info["resumed_from"]
messages["resumed_complete"] = r.manifest["complete"]
np.save(out / f"resumed_{pid}.npy", np.asarray(r.scores))

(out / f"messages_{pid}.json").write_text(json.dumps(messages, indent=1))
scoring.score(obj, params, stream(block_after=3), TEST, **KILLED)  # never returns: killed at chunk 3
