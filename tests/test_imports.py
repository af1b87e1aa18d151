"""The library stays apart from its research harness.

``import influx`` loads jax, optax, numpy and flax only: scikit-learn, matplotlib and tqdm
come with the ``studies`` extra (``pip install "influx[studies]"``) and are imported by the
studies, plots and loaders when used. Each check runs in a fresh interpreter, since this
test process has long imported them.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ("sklearn", "matplotlib", "tqdm")


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_influx_loads_no_harness_dependency():
    r = _python(f"""
        import sys
        import influx
        assert "influx.metrics" not in sys.modules  # imported on first use
        assert influx.metrics.correlations is not None  # an attribute after `import influx`
        import influx.data, influx.studies  # the loaders and studies import them only when used
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {HARNESS!r})
        print("LOADED", loaded)
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LOADED []" in r.stdout, r.stdout


def test_library_works_without_the_studies_extra():
    """With scikit-learn, matplotlib and tqdm unimportable, influence still computes."""
    r = _python(f"""
        import sys
        for name in {HARNESS!r}:
            sys.modules[name] = None  # makes `import name` fail, as if not installed
        import jax, jax.numpy as jnp, numpy as np
        import influx
        import influx.data

        x = jnp.asarray(np.random.default_rng(0).normal(size=(12, 3)))
        y = (x @ jnp.asarray([1.0, -2.0, 0.5]))[:, None]
        obj = influx.Objective(lambda p, x: x @ p, influx.losses.squared_error, l2=1e-2)
        params = jnp.zeros((3, 1))
        s = influx.influence(obj, params, (x, y), (x[:2], y[:2]), damping=1e-3,
                             solver=influx.solvers.direct())
        assert s.shape == (2, 12) and bool(jnp.all(jnp.isfinite(s))), s
        try:
            influx.data.load("iris")
        except ImportError as e:
            print("IMPORT-ERROR", e)
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    # a bundled set needs scikit-learn: the loader says which extra to install
    assert "IMPORT-ERROR" in r.stdout and "influx[studies]" in r.stdout, r.stdout


def test_core_dependencies_exclude_the_harness():
    """pyproject: the library's install dependencies are jax, jaxlib, flax, optax and numpy;
    scikit-learn, matplotlib and tqdm come with the `studies` extra, which the README's demo
    command installs and the `test` extra includes."""
    import re

    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = lambda req: re.split(r"[<>=!~\[;\s]", req, maxsplit=1)[0].lower()
    assert {name(r) for r in project["dependencies"]} == {"jax", "jaxlib", "flax", "optax", "numpy"}
    extras = project["optional-dependencies"]
    assert {name(r) for r in extras["studies"]} == {"scikit-learn", "matplotlib", "tqdm"}
    assert "influx[studies]" in extras["test"] and "pdoc" in {name(r) for r in extras["test"]}
    readme = (ROOT / "README.md").read_text().splitlines()
    demo = readme[readme.index("<!-- demo-command -->") + 2]
    assert 'pip install ".[studies]"' in demo and demo.endswith("influx demo")


def test_renamed_modules_keep_their_former_names():
    """influx.attribution (was influx.influence, shadowed by the function) and
    influx.studies.gap_study (was influx.studies.gaps, confused with influx.gaps): the former
    names import the same modules and do not shadow the function."""
    from influx.influence import default_solver

    import influx

    assert callable(influx.influence) and influx.influence is influx.attribution.influence
    assert default_solver is influx.attribution.default_solver
    from influx.studies import gap_study, gaps

    assert gaps is gap_study and gaps.GapsConfig is influx.studies.GapsConfig
