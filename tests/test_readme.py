"""The README's two commands are the ones CI and users run; keep them consistent."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _command_after(marker):
    lines = (ROOT / "README.md").read_text().splitlines()
    i = lines.index(marker)
    assert lines[i + 1].startswith("```"), "a fenced code block must follow the marker"
    return lines[i + 2]


def test_readme_starts_with_the_two_commands():
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:20])
    assert "<!-- demo-command -->" in head and "<!-- test-command -->" in head
    assert "influx demo" in _command_after("<!-- demo-command -->")
    assert "pytest" in _command_after("<!-- test-command -->")


def test_ci_runs_exactly_the_readme_test_command():
    out = subprocess.run(
        ["awk", "/<!-- test-command -->/{getline; getline; print; exit}", "README.md"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert out == _command_after("<!-- test-command -->")
    assert re.search(r"awk '/<!-- test-command -->/", (ROOT / ".ci/run").read_text())


def test_readme_quickstart_runs():
    """The README's Python quick start is executed as written (float32, CPU)."""
    text = (ROOT / "README.md").read_text()
    code = text.split("## Quick start", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    import jax

    with jax.enable_x64(False):
        ns = {}
        exec(compile(code, "README quick start", "exec"), ns)
    import numpy as np

    assert np.asarray(ns["scores"]).shape == (len(ns["ds"].test[1]), len(ns["ds"].train[1]))
    assert np.all(np.isfinite(ns["scores"])) and np.all(np.asarray(ns["self_scores"]) > 0)
    assert ns["r"].delta.shape == (4, len(ns["ds"].test[1]))
    assert np.all(np.isfinite(ns["r"].delta))
