"""The ``influx`` command, run as a subprocess (``python -m influx``)."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from influx import cli
from influx.errors import InputError, SolveError

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("INFLUX_DATA_DIR", None)  # tests name their data directory (or its absence) explicitly
    return env


def run_cli(*args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "influx", *args], cwd=cwd, env=_env(), capture_output=True,
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


@pytest.mark.parametrize("args, needle", [
    (("gaps", "--dataset", ""), "--dataset"),
    (("fragility", "--dataset", " "), "--dataset"),
    (("gaps", "--dataset", "diabetes,,digits"), "--dataset"),
    (("mislabeled", "--quick", "--n-train", "1"), "too small"),
    (("mislabeled", "--quick", "--n-train", "12"), "too small"),
    (("gaps", "--quick", "--n-train", "5"), "too small"),
    (("fragility", "--quick", "--n-train", "4"), "too small"),
    (("fragility", "--top-k", "2"), "top_k"),
    (("fragility", "--dataset", "mnist"), "--data-dir"),  # no INFLUX_DATA_DIR, no ../shared/data
    (("mislabeled", "--solver", "cg", "--methods", "loss"), "not both"),
])
def test_input_errors_before_any_work(tmp_path, monkeypatch, capsys, args, needle):
    """Bad input found before any work: one line, exit status 2, nothing written (in-process:
    the subprocess runs above already show there is no traceback)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("INFLUX_DATA_DIR", raising=False)
    assert cli.main([*args, "--no-progress"]) == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0], lines
    assert list(tmp_path.iterdir()) == []


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


# --------------------------------------------------------------------------- --quick sizes


def _help(command, capsys) -> str:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    return " ".join(capsys.readouterr().out.split())


def _config(argv):
    args = cli.build_parser().parse_args(argv)
    make = {"fragility": cli._fragility_config, "gaps": cli._gaps_config, "mislabeled": cli._mislabel_config}
    return make[argv[0]](args)


def _quick_text(help_text: str) -> str:
    return help_text.split("--quick", 2)[2].split("--seed")[0]  # the option's help, not the usage line


def test_quick_configs_use_the_sizes_their_help_states(capsys):
    """Every ``--quick`` run gets the sizes its ``--help`` states (n_train was overridden with
    None, so gaps --quick ran on all of digits and mislabeled --quick on 1438 examples)."""
    ints = lambda text: tuple(int(v) for v in text.split(","))
    h = _quick_text(_help("mislabeled", capsys))
    m = re.search(r"small: (\d+) training examples, width (\d+), methods ([\w,]+); on mnist (\d+) test", h)
    assert m, h
    cfg = _config(["mislabeled", "--quick"])
    assert (cfg.n_train, cfg.width, ",".join(cfg.methods)) == (int(m[1]), int(m[2]), m[3])
    cfg = _config(["mislabeled", "--quick", "--dataset", "mnist"])
    assert cfg.n_test == int(m[4]) and cfg.n_train == int(m[1])

    h = _quick_text(_help("gaps", capsys))
    m = re.search(r"at most (\d+) training examples per data set, widths ([\d,]+), ([\d,]+) training steps, "
                  r"(\d+) removed x (\d+) test points; on mnist (\d+) training / (\d+) test", h)
    assert m, h
    for argv in (["gaps", "--quick"], ["gaps", "--quick", "--dataset", "digits"]):
        cfg = _config(argv)
        assert (cfg.n_train, cfg.widths, cfg.steps, cfg.n_removed, cfg.n_test_points) == (
            int(m[1]), ints(m[2]), ints(m[3]), int(m[4]), int(m[5]))
    cfg = _config(["gaps", "--quick", "--dataset", "mnist"])
    assert (cfg.n_train, cfg.n_test) == (int(m[6]), int(m[7]))

    h = _quick_text(_help("fragility", capsys))
    m = re.search(r"depths ([\d,]+), widths ([\d,]+), weight decays ([\d.,]+), top-(\d+) removed for each of "
                  r"(\d+) test points; on mnist (\d+) training / (\d+) test", h)
    assert m, h
    cfg = _config(["fragility", "--quick"])
    assert (cfg.depths, cfg.widths, cfg.weight_decays, cfg.top_k, cfg.n_test_points) == (
        ints(m[1]), ints(m[2]), tuple(float(v) for v in m[3].split(",")), int(m[4]), int(m[5]))
    assert cfg.n_train is None  # all of Iris
    cfg = _config(["fragility", "--quick", "--dataset", "mnist"])
    assert (cfg.n_train, cfg.n_test) == (int(m[6]), int(m[7]))

    # what the user gives wins over the quick sizes
    assert _config(["gaps", "--quick", "--n-train", "300"]).n_train == 300
    assert _config(["mislabeled", "--quick", "--n-train", "150", "--width", "8"]).width == 8
    assert _config(["fragility", "--quick", "--dataset", "mnist", "--n-test", "50"]).n_test == 50


# --------------------------------------------------------------------------- errors and bugs


@pytest.mark.parametrize("exc, status", [(InputError("bad --x"), 2), (SolveError("no convergence"), 1),
                                         (FileNotFoundError("no such file"), 1)])
def test_influx_errors_are_one_line(monkeypatch, capsys, exc, status):
    def fail(args):
        raise exc

    monkeypatch.setattr(cli, "_fragility_config", fail)
    assert cli.main(["fragility", "--no-progress"]) == status
    err = capsys.readouterr().err
    assert err.strip() == f"influx fragility: error: {exc}"


@pytest.mark.parametrize("exc", [TypeError("a bug"), ValueError("a bug"), IndexError("a bug")])
def test_bugs_are_not_hidden(monkeypatch, exc):
    """Only influx's own errors become one-line messages: a TypeError or plain ValueError
    from a bug propagates with its traceback."""
    def fail(args):
        raise exc

    monkeypatch.setattr(cli, "_fragility_config", fail)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(type(exc), match="a bug"):
        cli.main(["fragility", "--no-progress"])
    assert signal.getsignal(signal.SIGINT) is before  # the previous handler is restored


def test_missing_studies_extra_names_it(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None; from influx.cli import main; "
            "sys.exit(main(['demo', '--quick', '--no-progress']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert 'pip install "influx[studies]"' in lines[0] and "matplotlib" in lines[0], r.stderr
    assert not (tmp_path / "influx-out").exists()


# --------------------------------------------------------------------------- Ctrl-C


@pytest.mark.parametrize("delay", [0.2, 2.0, 5.0])
def test_sigint_exits_130_cleanly(tmp_path, delay):
    """SIGINT during a run (compiling, training, solving) ends it with 130 and
    ``interrupted``: never a crash at interpreter shutdown, never an ignored signal.

    The signal is sent ``delay`` seconds after the demo announces its first study (before
    that the interpreter is still importing jax, outside influx's control)."""
    import threading

    # SIGINT at its default in the child even when this test runs as a background job
    # (which starts with SIGINT ignored, and the command keeps an ignored SIGINT ignored)
    p = subprocess.Popen([sys.executable, "-m", "influx", "demo", "--quick", "--no-progress", "--out", "d"],
                         cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    lines, started = [], threading.Event()

    def read():
        for line in p.stderr:
            lines.append(line)
            if line.startswith("[1/3]"):
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert started.wait(180), "".join(lines)[-2000:]
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail(f"no exit within 60 s of SIGINT: {''.join(lines)[-2000:]}")
    finally:
        if p.poll() is None:
            p.kill()
    reader.join(10)
    err = "".join(lines)
    assert p.returncode == 130, (p.returncode, err[-3000:])
    assert "interrupted" in err
    assert "Fatal" not in err and "Traceback" not in err and "Segmentation" not in err, err[-3000:]
    assert not (tmp_path / "d").exists()  # nothing half-written
