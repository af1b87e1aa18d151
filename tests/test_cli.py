"""The ``influx`` command, run as a subprocess (``python -m influx``)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd, timeout=600):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "influx", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_help(tmp_path):
    r = run_cli("--help", cwd=tmp_path)
    assert r.returncode == 0
    for word in ("demo", "fragility", "gaps", "mislabeled"):
        assert word in r.stdout
    r = run_cli("fragility", "--help", cwd=tmp_path)
    assert r.returncode == 0
    for opt in ("--dataset", "--data-dir", "--depths", "--widths", "--solver", "--damping", "--seed",
                "--out", "--quick"):
        assert opt in r.stdout


@pytest.mark.parametrize("args, needle", [
    (("fragility", "--dataset", "nope"), "unknown data set"),
    (("gaps", "--dataset", "concrete", "--data-dir", "/no/such/dir"), "does not exist"),
    (("mislabeled", "--dataset", "mnist", "--data-dir", "."), "MNIST"),
    (("fragility", "--depths", "1,x"), "integers"),
    (("fragility", "--depths", "0,2"), ">= 1"),
    (("gaps", "--widths", "2.5"), "integers"),
    (("mislabeled", "--fraction", "1.5"), "fraction"),
    (("mislabeled", "--methods", "direct,oracle"), "unknown method"),
    (("nonsense",), "invalid choice"),
])
def test_errors_are_one_line(tmp_path, args, needle):
    extra = ("--no-progress",) if args[0] != "nonsense" else ()
    r = run_cli(*args, *extra, cwd=tmp_path)
    assert r.returncode in (1, 2), r
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert needle in lines[0]
    assert not (tmp_path / "influx-out").exists()  # nothing written on failure


def _check_numbers(obj, path=""):
    """Every correlation in [-1, 1], every fraction/AUC in [0, 1], every number finite."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_numbers(v, f"{path}[{i}]")
    elif isinstance(obj, float):
        assert math.isfinite(obj), path
        key = path.rsplit(".", 1)[-1]
        if key.startswith(("pearson", "spearman")):
            assert -1 - 1e-9 <= obj <= 1 + 1e-9, path
        if key == "auc" or ".found." in path or path.endswith(("found", "inspected")) or "found[" in path:
            assert -1e-9 <= obj <= 1 + 1e-9, path


def _check_demo_dir(out: Path):
    for name in ("report.md", "results.json", "fragility.png", "gaps.png", "mislabeled.png"):
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 200, name
    doc = json.loads((out / "results.json").read_text())
    assert set(doc) >= {"meta", "fragility", "gaps", "mislabel"}
    _check_numbers(doc)
    frag = doc["fragility"]["rows"]
    assert frag and all(r["grad_norm"] < 1e-4 for r in frag)
    for r in doc["mislabel"]["rows"]:
        for v in r["found"].values():
            assert 0 <= v <= 1
    report = (out / "report.md").read_text()
    for word in ("Fragility", "Gap decomposition", "Mislabel detection", "fragility.png", "Command:"):
        assert word in report
    return doc


def test_demo_quick(tmp_path):
    r = run_cli("demo", "--quick", "--no-progress", "--out", "demo", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "demo"
    assert str(out.name) in r.stdout.splitlines()[-1]  # the output directory is named at the end
    _check_demo_dir(out)


@pytest.mark.slow
def test_demo_full(tmp_path):
    r = run_cli("demo", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    outs = list((tmp_path / "influx-out").glob("demo-*"))
    assert len(outs) == 1
    assert str(outs[0].name) in r.stdout.splitlines()[-1]
    doc = _check_demo_dir(outs[0])
    assert len(doc["fragility"]["rows"]) == 4


@pytest.mark.slow
def test_study_commands(tmp_path):
    r = run_cli("fragility", "--quick", "--no-progress", "--depths", "2", "--weight-decays", "0.001",
                "--out", "f", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "f" / "fragility.png").is_file()
    r = run_cli("mislabeled", "--quick", "--no-progress", "--n-train", "150", "--solver", "cg", "--out", "m",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((tmp_path / "m" / "results.json").read_text())
    assert [row["method"] for row in doc["mislabel"]["rows"]] == ["cg", "grad_dot", "loss", "random"]
    r = run_cli("gaps", "--quick", "--no-progress", "--dataset", "diabetes", "--steps", "100", "--out", "g",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "g" / "gaps.png").is_file()
