"""Multi-host scoring: 2 processes on 127.0.0.1 (jax.distributed, CPU gloo collectives).

Each process has 2 forced CPU devices, so the mesh spans 4 devices over 2 "hosts". The
child (tests/_multihost_child.py) runs every case; here we compare its outputs with the
single-process influence matrix.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import influx
from influx import solvers
from tests.conftest import make_problem

ROOT = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).with_name("_multihost_child.py")
N_TRAIN, N_TEST, CHUNK = 45, 4, 10  # as in the child
TIMEOUT_S = 240  # a hang (e.g. a missed collective) fails the test instead of blocking CI


def _gloo_available():
    try:
        from jax._src.lib import _jax

        return hasattr(_jax, "make_gloo_tcp_collectives")
    except ImportError:
        return False


pytestmark = pytest.mark.skipif(not _gloo_available(),
                                reason="this jaxlib has no gloo CPU collectives (multi-process CPU runs)")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(out: Path, mode: str):
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    procs = []
    for pid in range(2):
        log = open(out / f"log_{mode}_{pid}.txt", "w")  # closed in _finish
        args = [sys.executable, str(CHILD), str(ROOT), str(out), str(pid), str(port), mode]
        procs.append((subprocess.Popen(args, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log))
    return procs


def _finish(procs, deadline, *, kill=False):
    """Waits for (or with ``kill`` kills) both processes; fails with their logs on an error."""
    for p, _ in procs:
        if kill:
            p.kill()
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p, log in procs:
        if p.poll() is None:  # a hang: fail instead of blocking CI
            p.kill()
            p.wait()
        log.close()
    if not kill:
        for pid, (p, log) in enumerate(procs):
            text = Path(log.name).read_text()
            assert p.returncode == 0, f"process {pid} exited with {p.returncode}:\n{text[-4000:]}"


def _wait_for(predicate, procs, deadline, what):
    while not predicate():
        if time.monotonic() > deadline or any(p.poll() is not None for p, _ in procs):
            _finish(procs, deadline, kill=True)
            logs = "\n".join(Path(log.name).read_text()[-3000:] for _, log in procs)
            pytest.fail(f"multi-process run: {what} did not happen in time / a process exited:\n{logs}")
        time.sleep(0.1)


def _done_chunks(path: Path):
    try:
        return json.loads(path.read_text())["done_chunks"]
    except (OSError, ValueError, KeyError):
        return -1


@pytest.fixture(scope="module")
def reference():
    obj, params, (x, y) = make_problem("tanh_mlp", n=N_TRAIN + N_TEST, seed=3)
    train = (np.asarray(x[:N_TRAIN]), np.asarray(y[:N_TRAIN]))
    test = (np.asarray(x[N_TRAIN:]), np.asarray(y[N_TRAIN:]))
    return np.asarray(influx.influence(obj, params, train, test, damping=0.05, solver=solvers.direct(),
                                       chunk_size=CHUNK))


def test_two_processes_match_single_process(tmp_path, reference):
    assert jax.process_count() == 1  # the parent itself is an ordinary single-process run
    deadline = time.monotonic() + TIMEOUT_S
    procs = _start(tmp_path, "all")
    # the children finish every case, then block in a stream after committing 3 chunks of
    # OUT/killed: kill both there (SIGKILL, no cleanup) and resume in two fresh processes
    _wait_for(lambda: all((tmp_path / f"messages_{i}.json").exists() for i in range(2))
              and _done_chunks(tmp_path / "killed" / "manifest.json") == 3, procs, deadline,
              "the cases and the first 3 chunks of the killed run")
    _finish(procs, deadline, kill=True)
    killed = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert killed["done_chunks"] == 3 and not killed["complete"]
    _finish(_start(tmp_path, "resume"), deadline)
    msgs = [json.loads((tmp_path / f"messages_{pid}.json").read_text()) for pid in range(2)]

    # bad configurations: every process raised a clear error (none hung)
    for m in msgs:
        assert "processes disagree" in m["disagree"] and "options" in m["disagree"], m["disagree"]
        assert "devices of every process" in m["local_devices"], m["local_devices"]
    assert "out of range" in msgs[1]["bad_on_one"], msgs[1]["bad_on_one"]  # its own error
    assert "failed on process(es) [1]" in msgs[0]["bad_on_one"], msgs[0]["bad_on_one"]
    assert "out of range" in msgs[0]["bad_on_one"]
    assert msgs[1]["stream_one"] == "RuntimeError: simulated crash"
    assert msgs[0]["stream_one"].startswith("ValueError: influx.scoring.score failed on process(es) [1]")

    for pid, m in enumerate(msgs):
        assert m["arrays_info"] == {"process_index": pid, "process_count": 2, "n_train": N_TRAIN,
                                    "scored": N_TRAIN}
        assert m["arrays_devices"] == 4
        for case in ("arrays", "random_access", "resumed"):
            np.testing.assert_allclose(np.load(tmp_path / f"{case}_{pid}.npy"), reference, rtol=1e-12,
                                       atol=1e-15, err_msg=f"{case}, process {pid}")
    # both processes return the same matrix and top-k; the file is the one process 0 wrote
    arrays = np.load(tmp_path / "arrays_0.npy")
    np.testing.assert_array_equal(arrays, np.load(tmp_path / "arrays_1.npy"))
    full_file = tmp_path / "full" / "scores.npy"
    np.testing.assert_array_equal(arrays, np.load(full_file))
    topk = np.load(tmp_path / "topk_0.npy")
    np.testing.assert_array_equal(topk, np.load(tmp_path / "topk_1.npy"))
    np.testing.assert_array_equal(topk[0], np.argsort(-reference, axis=1, kind="stable")[:, :3])
    np.testing.assert_array_equal(topk[1], np.argsort(reference, axis=1, kind="stable")[:, :3])
    manifest = json.loads((tmp_path / "full" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["done"] == N_TRAIN

    # a random-access source: together the processes read every record of the scoring pass,
    # and neither read all of chunks 1.. (chunk 0 is read whole by each for the input checks)
    reads = [set(m["records_read"]) for m in msgs]
    assert reads[0] | reads[1] == set(range(N_TRAIN))
    for r in reads:
        assert not set(range(CHUNK, N_TRAIN)) <= r

    # kill (a stream that dies after 3 chunks on both processes) and resume: identical file
    assert msgs[0]["crash"] == "simulated crash" and msgs[0]["crash_manifest"] == 3
    for m in msgs:
        assert m["resumed_from"] == 3 * CHUNK and m["resumed_complete"]
    assert (tmp_path / "crash" / "scores.npy").read_bytes() == full_file.read_bytes()
    # killed (SIGKILL on both processes after 3 committed chunks) and resumed in fresh processes
    for pid in range(2):
        m = json.loads((tmp_path / f"messages_resume_{pid}.json").read_text())
        assert m == {"resumed_from": 3 * CHUNK, "complete": True}, m
        np.testing.assert_array_equal(np.load(tmp_path / f"resume_{pid}.npy"), arrays)
    assert (tmp_path / "killed" / "scores.npy").read_bytes() == full_file.read_bytes()
