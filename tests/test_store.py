"""influx._store: the resumable chunk store (manifest as commit point, checksums, lock, paths)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from influx import _store
from influx.errors import ResourceError, StateError

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (3, 10)
INPUTS = {"data": "abc", "options.damping": 0.001}


def _open(path, axis=1, inputs=INPUTS, **kw):
    return _store.open_store(path, kind="test", inputs=inputs, shape=SHAPE, dtype=np.float64, axis=axis,
                             array="a.npy", owned=("side.*.bin",), **kw)


def _fill(path, upto=(4, 7), axis=1):
    rng = np.random.default_rng(0)
    full = rng.normal(size=SHAPE)
    with _open(path, axis=axis) as st:
        start = 0
        for i, stop in enumerate(upto):
            block = full[:, start:stop] if axis == 1 else full[start:stop]
            st.commit(stop, block, files={"side": (f"side.{i}.bin", lambda fh, i=i: fh.write(bytes([i])))},
                      meta={"i": i})
            start = stop
    return full


@pytest.mark.parametrize("axis", [0, 1])
def test_commit_and_resume(tmp_path, axis):
    shape = SHAPE if axis == 1 else SHAPE[::-1]
    full = np.random.default_rng(1).normal(size=shape)
    with _store.open_store(tmp_path, kind="t", inputs=INPUTS, shape=shape, axis=axis, array="a.npy") as st:
        assert st.done == 0 and not st.resumed
        st.commit(2, full[:, :2] if axis == 1 else full[:2])
    with _store.open_store(tmp_path, kind="t", inputs=INPUTS, shape=shape, axis=axis, array="a.npy") as st:
        assert st.resumed and st.done == 2 and st.chunks == [(0, 2)]
        st.commit(shape[axis], full[:, 2:] if axis == 1 else full[2:])
        st.finish(meta={"note": 1})
    ld = _store.load_store(tmp_path, kind="t")
    assert ld.complete and ld.meta == {"note": 1}
    np.testing.assert_array_equal(ld.array, full)
    assert sorted(os.listdir(tmp_path)) == [".influx.lock", "a.npy", "manifest.json"]


def test_side_files_rotate_and_are_verified(tmp_path):
    _fill(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("side.*")) == ["side.1.bin"]
    with _open(tmp_path) as st:
        assert st.file("side").read_bytes() == b"\x01" and st.meta == {"i": 1}
    (tmp_path / "side.1.bin").write_bytes(b"\x05")
    with pytest.raises(StateError, match="side.1.bin does not match its checksum"):
        _open(tmp_path)
    (tmp_path / "side.1.bin").unlink()
    with pytest.raises(StateError, match="side.1.bin is missing"):
        _open(tmp_path)


def test_missing_truncated_or_altered_array_is_refused(tmp_path):
    _fill(tmp_path)
    a = tmp_path / "a.npy"
    good = a.read_bytes()
    a.write_bytes(good[: len(good) // 2])
    with pytest.raises(StateError, match="a.npy: .*bytes, expected"):
        _open(tmp_path)
    changed = bytearray(good)
    changed[-8 * 4] ^= 1  # row 2, column 6: inside the committed chunk [4, 7)
    a.write_bytes(bytes(changed))
    with pytest.raises(StateError, match=r"chunk \[4, 7\).*checksum"):
        _open(tmp_path)
    a.write_bytes(b"not an npy file at all" + good[30:])
    with pytest.raises(StateError, match="a.npy: not a readable .npy file"):
        _open(tmp_path)
    a.unlink()
    with pytest.raises(StateError, match="a.npy is missing.*never resumed as zeros"):
        _open(tmp_path)


def test_hand_edited_or_invalid_manifest(tmp_path):
    _fill(tmp_path)
    mpath = tmp_path / "manifest.json"
    man = json.loads(mpath.read_text())
    for edit in ({"done_chunks": 5}, {"done": 10}, {"chunks": man["chunks"][1:]}):
        mpath.write_text(json.dumps({**man, **edit}))
        with pytest.raises(StateError, match="inconsistent"):
            _open(tmp_path)
    for text in ("", "{not json", "[]"):
        mpath.write_text(text)
        with pytest.raises(StateError, match="manifest.json: not a"):
            _open(tmp_path)


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/passwd", "side.x.bin/../../y", ".."])
def test_manifest_paths_outside_are_refused(tmp_path, name):
    d = tmp_path / "d"
    _fill(d)
    (tmp_path / "outside.bin").write_bytes(b"keep me")
    man = json.loads((d / "manifest.json").read_text())
    man["files"]["side"]["name"] = name
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StateError, match="not a file inside"):
        _open(d)
    with pytest.raises(StateError, match="not a file inside"):
        _store.load_store(d, kind="test", owned=("side.*.bin",))
    assert (tmp_path / "outside.bin").read_bytes() == b"keep me"
    man["files"]["side"]["name"] = "side.1.bin"
    man["array"] = "../a.npy"
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StateError):
        _open(d)


def test_foreign_directory_is_refused(tmp_path):
    (tmp_path / "scores.npy").write_bytes(b"mine")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(StateError, match="not created by influx.*notes.txt, scores.npy"):
        _open(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "scores.npy"]  # nothing written
    d = tmp_path / "d"
    _fill(d)
    (d / "vectors.npy").write_bytes(b"user file")
    with pytest.raises(StateError, match="does not own: vectors.npy"):
        _open(d)


def test_fingerprint_mismatch_names_the_key(tmp_path):
    _fill(tmp_path)
    with pytest.raises(_store.InputsMismatch, match=r"options.damping \(0.002 now, 0.001 in the directory\)"):
        _open(tmp_path, inputs={**INPUTS, "options.damping": 0.002})
    with pytest.raises(ValueError, match="differs in: data"):  # also a ValueError, as before
        _open(tmp_path, inputs={**INPUTS, "data": "other"})
    with pytest.raises(StateError, match="axis"):
        _open(tmp_path, axis=0)
    # nothing committed yet: a new fingerprint starts over
    d = tmp_path / "empty"
    _open(d).close()
    with _open(d, inputs={**INPUTS, "data": "new"}) as st:
        assert st.manifest["inputs"]["data"] == "new" and st.done == 0


def test_lock_in_one_process(tmp_path):
    st = _open(tmp_path)
    with pytest.raises(StateError, match=f"directory in use by process {os.getpid()}"):
        _open(tmp_path)
    st.close()
    _open(tmp_path).close()


_HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    import numpy as np
    from influx import _store
    st = _store.open_store({d!r}, kind="test", inputs={{}}, shape=(2, 2), axis=1, array="a.npy")
    print("locked", flush=True)
    time.sleep(60)
""")


def test_lock_across_processes(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER.format(root=str(ROOT), d=str(tmp_path))],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(StateError, match=f"directory in use by process {proc.pid}"):
            _store.open_store(tmp_path, kind="test", inputs={}, shape=(2, 2), axis=1, array="a.npy")
    finally:
        proc.kill()
        proc.wait()
    # the lock dies with its process: the directory opens again
    _store.open_store(tmp_path, kind="test", inputs={}, shape=(2, 2), axis=1, array="a.npy").close()


def test_disk_space_is_checked_before_creating(tmp_path, monkeypatch):
    class Usage:
        free = 100

    monkeypatch.setattr(_store.shutil, "disk_usage", lambda p: Usage)
    with pytest.raises(ResourceError, match=r"a.npy needs 4.2 KB of disk space but only 100 B"):
        _open(tmp_path / "d")
    assert not (tmp_path / "d" / "a.npy").exists()


def test_not_a_writable_directory(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StateError, match="not a directory"):
        _open(f)
    with pytest.raises(StateError, match="cannot create out_dir"):
        _open(f / "sub")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        with pytest.raises(StateError, match="cannot write to out_dir"):
            _open(ro)
